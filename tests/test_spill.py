"""spill.DiskTexts: texts in a temporary file, read back exactly, stale stores removed."""

import pytest

from reprotune.data.spill import DiskTexts


def test_disk_texts_read_back_exactly() -> None:
    texts = ["", "héllo wörld", "今天天气很好", "a\nb\tc", "🙂 emoji", "x" * 5000]
    store = DiskTexts(texts)
    assert len(store) == len(texts) and list(store) == texts
    assert store[1] == texts[1] and store[-1] == texts[-1] and store[2:5] == texts[2:5]
    assert store[4:2] == [] and store[::2] == texts[::2]
    assert store.lengths.tolist() == [len(t) for t in texts]
    with pytest.raises(IndexError):
        _ = store[len(texts)]


def test_disk_texts_remove_what_a_killed_run_left(tmp_path, monkeypatch) -> None:
    """A SIGKILLed dedup/split cannot remove its text store; the next one does (dead pid only)."""
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale, live = tmp_path / f"reprotune-texts-{gone}-a", tmp_path / f"reprotune-texts-{os.getppid()}-b"
    for d in (stale, live):
        d.mkdir()
    texts = DiskTexts(["一，二", "b"])
    assert list(texts) == ["一，二", "b"]
    assert not stale.exists() and live.exists()
    assert [p.name.startswith(f"reprotune-texts-{os.getpid()}-") for p in tmp_path.iterdir()
            if p not in (live,)] == [True]
