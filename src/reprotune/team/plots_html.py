"""The HTML template that makes ``dvc plots show`` / ``dvc plots diff`` render offline.

DVC fills a page template's ``{plot_divs}`` with one ``<div>`` per plot, each calling
``vegaEmbed(...)``, and its ``{scripts}`` with ``<script src>`` tags pointing at a CDN. This
template has no ``{scripts}``: it inlines the vendored Vega, Vega-Lite and Vega-Embed from
``plots/vendor/`` instead, so the page (and a copy of it sent as a CI artifact) needs no
network. ``.dvc/config`` points ``plots.html_template`` at it.

``python -m reprotune.team.plots_html`` rebuilds ``plots/offline.html`` after a vendor update.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]  # src/reprotune/team/plots_html.py -> repo
VENDOR_DIR = ROOT / "plots" / "vendor"
TEMPLATE = ROOT / "plots" / "offline.html"
# Load order matters: vega-lite and vega-embed expect the globals of the ones before.
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")

# Runs before DVC's per-plot scripts: SVG output (text stays text, so titles can be found and
# copied), no action menu (its "Open in editor" link needs the network), and every failed
# plot recorded in window.reprotunePlots so a browser test can tell a blank page from a
# drawn one.
EMBED_DEFAULTS = """
window.reprotunePlots = {started: 0, rendered: 0, errors: []};
(function () {
  var embed = window.vegaEmbed;
  window.vegaEmbed = function (el, spec, opts) {
    var state = window.reprotunePlots;
    state.started += 1;
    var options = Object.assign({renderer: "svg", actions: false}, opts || {});
    return embed(el, spec, options).then(function (result) {
      state.rendered += 1;
      return result;
    }, function (err) {
      state.errors.push(String(el) + ": " + String(err && err.message || err));
      throw err;
    });
  };
})();
"""

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>reprotune plots</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; margin: 16px; }}
        body > div {{ display: inline-block; vertical-align: top; margin: 8px 16px 16px 0; }}
        body > div > p {{ font-weight: bold; margin: 0 0 4px 0; }}
        img {{ max-width: 560px; }}
    </style>
</head>
<body>
    <h1 style="font-size: 1.2em">reprotune plots</h1>
    {{plot_divs}}
</body>
</html>
"""


def _inline(name: str, code: str) -> str:
    # Inline script bodies end at the first "</script"; the vendored builds contain none,
    # and escaping it keeps that true after an update.
    body = code.replace("</script", "<\\/script").strip()
    return f"    <!-- {name}: see plots/vendor/README.md -->\n    <script>{body}</script>"


def build_template(vendor_dir: Path = VENDOR_DIR) -> str:
    """The page template: DVC's placeholders, the vendored libraries inlined, embed defaults."""
    scripts = [_inline(n, (vendor_dir / n).read_text(encoding="utf-8")) for n in SCRIPTS]
    scripts.append(_inline("embed defaults", EMBED_DEFAULTS))
    return PAGE.format(scripts="\n".join(scripts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprotune.team.plots_html", description=__doc__)
    parser.add_argument("--out", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    html = build_template()
    args.out.write_text(html, encoding="utf-8")
    log.info("wrote %s (%d kB)", args.out, len(html) // 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
