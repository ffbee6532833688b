"""``python -m reprotune.data.hub pin ...``: see :mod:`reprotune.data.hub.pin`."""

from reprotune.data.hub.pin import main

raise SystemExit(main())
