"""Generated texts for the n-gram index tests: near duplicates, unrelated rows, a large vocabulary."""

import numpy as np


def bench_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` pseudo-texts (English-like words and Chinese characters), every 5th a light edit
    of the one before: near duplicates, unrelated rows and a large n-gram vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("bcdfghklmnprstvz")) + rng.choice(list("aeiou"))
                     for _ in range(int(rng.integers(1, 4)))) for _ in range(400)]
    out = []
    for i in range(n):
        if i % 5 == 4:
            t = list(out[-1])
            for k in rng.integers(0, len(t), 3):
                t[k] = "x"
            out.append("".join(t))
        elif i % 2:
            out.append("".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 3000, 120)))
        else:
            out.append(" ".join(rng.choice(words, 60)))
    return out
