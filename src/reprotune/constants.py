"""Constants shared by several phases (data and train), defined once.

Only plain values live here, so any module may import this one without pulling in anything
else (no import cycles).
"""

from __future__ import annotations

# The label of a token that is not a training target (the prompt, padding, a packed sample's
# first token). PyTorch's ``cross_entropy`` and transformers' losses skip it by default.
IGNORE_INDEX = -100
