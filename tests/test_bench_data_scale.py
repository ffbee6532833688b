"""bench/data_scale.py runs the five data stages and both near-duplicate steps on planted rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io


@pytest.mark.slow  # seven processes and a tiny base: ~17 s
def test_data_scale_smoke(tmp_path: Path, repo_root: Path) -> None:
    pytest.importorskip("datasketch")
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(repo_root / "bench" / "data_scale.py"), "--rows", "1000",
                    "--work", str(tmp_path / "work"), "--out", str(out)],
                   check=True, capture_output=True, cwd=repo_root)
    (res,) = io.read_json(out)["results"]
    assert res["rows"] == 1000
    assert set(res["stages"]) == {"read", "ingest", "dedup", "format", "split"}
    logs = {f.name: f.read_text()[-2000:] for f in (tmp_path / "work").rglob("logs/*.log")}
    assert all(s["rc"] == 0 for s in res["stages"].values()), (res["stages"], logs)
    # read/ingest of 1,000 rows may end before the first 0.1 s RSS sample (then None, not 0);
    # the longer stages are always sampled
    st = res["stages"]
    assert all((st[name]["peak_rss_mib"] or 0) > 0 for name in ("dedup", "format", "split")), str(st)
    assert all(s["peak_rss_mib"] is None or s["peak_rss_mib"] > 0 for s in st.values()), st
    assert st["format"]["peak_tree_rss_mib"] >= st["format"]["peak_rss_mib"], st
    q = res["dedup_quality"]
    # 100 planted near pairs, 30 exact pairs (NEAR_FRAC, EXACT_FRAC): all found, none wrong
    assert (q["planted_near"], q["planted_exact"]) == (100, 30)
    assert q["near_recall"] == 1.0 and q["exact_recall"] == 1.0
    assert q["precision"] == {"exact_duplicate": 1.0, "near_duplicate": 1.0}
    ours, ds = res["near_dup_step"]["ours"], res["near_dup_step"]["datasketch"]
    assert ours["rows"] == ds["rows"] and ours["eligible"] == ds["eligible"] > 0
    assert ours["recall"] == 1.0 and ds["recall"] == 1.0
    assert ours["pairs"] == ds["pairs"]  # same verification, both found every pair
    split = res["metrics"]["split"]
    assert split["order"]["by"] == "created_at"
    assert sum(split["counts"].values()) + sum(split["leakage"]["dropped"].values()) == split["rows"]
