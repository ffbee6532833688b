"""Install a hash-pinned lock file with several pip processes at once (``make install``).

pip unpacks and byte-compiles one wheel after another, on one core: the main lock's ~200
packages took 118 s on the 2-core machine. Every requirement in the lock is pinned with its
hashes and installed with ``--no-deps``, so the lock splits into disjoint parts, each a valid
hash-checked requirements file, that separate pip processes install side by side into the
same environment (61 s with two; the same ``pip freeze``). ``pip check`` afterwards (Makefile)
proves the installed set complete and consistent. Arguments after ``--`` are one more pip
process of their own (torch, from its own index when one is given).

Usage: python lock/install.py JOBS LOCK_FILE [-- PIP_INSTALL_ARGS...]
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def requirement_blocks(text: str) -> tuple[list[str], list[str]]:
    """(global option lines, one block per requirement with its ``--hash`` continuation lines);
    comments and blank lines dropped."""
    options: list[str] = []
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():  # a continuation of the requirement above (its hashes)
            if not blocks:
                raise ValueError(f"continuation line before any requirement: {line.strip()!r}")
            blocks[-1].append(line)
        elif line.startswith("-"):  # e.g. --extra-index-url: every part needs it
            options.append(line)
        else:
            blocks.append([line])
    return options, ["\n".join(block) for block in blocks]


def split_lock(text: str, jobs: int) -> list[str]:
    """The lock as ``jobs`` requirements files (fewer when it holds fewer requirements), each
    with the global options. Round-robin over the sorted lock, so that large and small wheels
    mix in every part."""
    options, blocks = requirement_blocks(text)
    parts = [blocks[i::jobs] for i in range(max(1, jobs))]
    return ["\n".join([*options, *part]) + "\n" for part in parts if part]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python lock/install.py JOBS LOCK_FILE [-- PIP_INSTALL_ARGS...]",
              file=sys.stderr)
        return 2
    jobs, lock = int(argv[0]), Path(argv[1])
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    parts = split_lock(lock.read_text(encoding="utf-8"), jobs)
    with tempfile.TemporaryDirectory(prefix="lock-parts-") as tmp:
        commands: dict[str, list[str]] = {}
        for i, part in enumerate(parts):
            path = Path(tmp) / f"part{i}.txt"
            path.write_text(part, encoding="utf-8")
            names = [block.split("==")[0] for block in requirement_blocks(part)[1]]
            commands[f"{lock} part {i + 1} of {len(parts)} ({names[0]} ... {names[-1]})"] = [
                *pip, "--require-hashes", "-r", str(path)]
        if extra:
            commands[" ".join(extra)] = [*pip, *extra]
        procs = {label: subprocess.Popen(command) for label, command in commands.items()}
        codes = {label: proc.wait() for label, proc in procs.items()}
    failed = {label: code for label, code in codes.items() if code}
    for label, code in failed.items():
        print(f"lock/install.py: pip install of {label} exited with {code} (its error above)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
