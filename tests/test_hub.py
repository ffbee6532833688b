"""Hub datasets in ingest.inputs (reprotune.data.hub): pinned manifests read from a local
HF-cache-like folder, offline, through the real read and ingest stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reprotune import io
from reprotune.data import hub
from reprotune.params import ParamsError, read_params

ROOT = Path(__file__).resolve().parents[1]
SHA1, SHA2, SHA3 = "1" * 40, "2" * 40, "3" * 40
MANIFEST = "data/raw/sft.hub.yaml"


def _snapshot(cache: Path, repo: str, sha: str, files: dict[str, object], ref: str | None = "main"
              ) -> Path:
    """One cached snapshot as huggingface_hub lays it out: datasets--owner--name/refs/<ref>
    holds the sha, snapshots/<sha>/ the files (a list of rows -> Parquet or JSONL, a str ->
    the text)."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / sha
    for name, content in files.items():
        path = snap / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(content), path)
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content),
                            encoding="utf-8")
    if ref:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(sha, encoding="utf-8")
    return snap


TRAIN = [{"instruction": "把苹果翻译成英文", "output": "apple", "created_at": "2024-01-02"},
         {"instruction": "2+2?", "output": "4", "created_at": "2024-01-03"},
         {"instruction": "no answer", "output": None, "created_at": "2024-01-04"}]
TRAIN_2 = [{"instruction": "3+3?", "output": "6", "created_at": "2024-01-05"}]
TEST = [{"instruction": "t", "output": "u", "created_at": "2024-02-01"}]
JSONL = '{"instruction": "q", "output": "a"}\n{oops\n{"instruction": "r", "output": "b"}\n'
MULTI_README = """---
configs:
- config_name: zh
  data_files:
  - split: train
    path: zh/train.jsonl
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
---
# two subsets
"""


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repo-like folder with data/raw/ and an HF cache holding acme/sft at SHA1 (main)
    and SHA2 (two train shards), and acme/multi (subsets zh/en) at SHA3."""
    cache = tmp_path / "hf"
    _snapshot(cache, "acme/sft", SHA2, {"data/train-00000-of-00002.parquet": TRAIN,
                                        "data/train-00001-of-00002.parquet": TRAIN_2,
                                        "data/test-00000-of-00001.parquet": TEST}, ref=None)
    _snapshot(cache, "acme/sft", SHA1, {"data/train-00000-of-00001.parquet": TRAIN,
                                        "data/test-00000-of-00001.parquet": TEST})
    _snapshot(cache, "acme/multi", SHA3, {
        "README.md": MULTI_README,
        "zh/train.jsonl": [{"instruction": "你好", "output": "您好"}],
        "en/train.jsonl": [{"instruction": "hi", "output": "hello"}, {"instruction": "a", "output": "b"}]})
    _snapshot(cache, "acme/jsonl", SHA3, {"train.jsonl": JSONL})
    _snapshot(cache, "acme/broken", SHA1, {"data/train-00000-of-00001.parquet": "not Parquet"})
    (tmp_path / "data/raw").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def _manifest(project: Path, path: str = MANIFEST, **kw: object) -> str:
    body = {"hub": "acme/sft", "split": "train", "subset": None, "revision": SHA1, **kw}
    text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items() if v is not ...)
    (project / path).write_text(text, encoding="utf-8")
    return path


def _run(project: Path, inputs: list[str], ingest: str = "") -> subprocess.CompletedProcess:
    """The read stage of each input, then the ingest stage, as dvc.yaml runs them (the
    first failing process is returned)."""
    (project / "params.yaml").write_text(
        f"ingest:\n  inputs: [{', '.join(inputs)}]\n{ingest}", encoding="utf-8")
    for path in inputs:
        proc = subprocess.run([sys.executable, str(ROOT / "stages/read.py"), "--input", path,
                               "--out", f"data/interim/read/{path}"], cwd=project,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            return proc
    return subprocess.run([sys.executable, str(ROOT / "stages/ingest.py")], cwd=project,
                          capture_output=True, text=True, timeout=120)


def test_stage_reads_pinned_split_next_to_a_local_file(project: Path) -> None:
    _manifest(project)
    io.write_jsonl(project / "data/raw/local.jsonl", [{"instruction": "q", "output": "a"}])
    proc = _run(project, [MANIFEST, "data/raw/local.jsonl"], "  keep_fields: [created_at]\n")
    assert proc.returncode == 0, proc.stderr
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    rejects = io.read_jsonl(project / "data/interim/rejected.jsonl")
    m = io.read_json(project / "metrics/ingest.json")
    assert [r["source"] for r in recs] == [f"{MANIFEST}:1", f"{MANIFEST}:2", "data/raw/local.jsonl:1"]
    assert recs[0]["messages"] == [{"role": "user", "content": "把苹果翻译成英文"},
                                   {"role": "assistant", "content": "apple"}]
    assert recs[1]["meta"] == {"created_at": "2024-01-03"}
    assert [(r["source"], r["line"], r["reason"], r["field"]) for r in rejects] == [
        (MANIFEST, 3, "missing_field", "output")]
    f = m["files"][MANIFEST]
    assert f["hub"] == {"hub": "acme/sft", "split": "train", "subset": None, "revision": SHA1}
    assert (f["rows_in"], f["kept"], f["rejected"]) == (3, 2, {"missing_field": 1})
    assert "hub" not in m["files"]["data/raw/local.jsonl"]
    assert (m["rows_in"], m["kept"], m["rejected_total"]) == (4, 3, 1)


def test_revision_picks_the_snapshot_and_shards_number_on(project: Path) -> None:
    _manifest(project, revision=SHA2)
    assert _run(project, [MANIFEST]).returncode == 0
    m = io.read_json(project / "metrics/ingest.json")
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    assert m["files"][MANIFEST]["hub"]["revision"] == SHA2
    assert m["files"][MANIFEST]["rows_in"] == 4  # both shards of SHA2, not SHA1's one
    assert [r["source"] for r in recs][-1] == f"{MANIFEST}:4"
    _manifest(project, split="test")
    assert _run(project, [MANIFEST]).returncode == 0
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    assert [r["messages"][0]["content"] for r in recs] == ["t"]


def test_records_equal_those_of_the_same_local_parquet(project: Path) -> None:
    """The hub path converts exactly like a local file: same records but for `source`."""
    _manifest(project)
    pq.write_table(pa.Table.from_pylist(TRAIN), project / "data/raw/same.parquet")
    ingest = "  keep_fields: [created_at]\n"
    assert _run(project, [MANIFEST, "data/raw/same.parquet"], ingest).returncode == 0
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    rejects = io.read_jsonl(project / "data/interim/rejected.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if k != "source"}  # noqa: E731
    assert [strip(r) for r in recs[:2]] == [strip(r) for r in recs[2:]]
    assert [strip(r) for r in rejects[:1]] == [strip(r) for r in rejects[1:]]


def test_a_malformed_jsonl_line_is_one_rejected_row(project: Path) -> None:
    """A hub JSONL file goes through the same reader as a local one: the broken line is
    rejected with its number and raw text, the rows around it are kept."""
    _manifest(project, hub="acme/jsonl", revision=SHA3)
    proc = _run(project, [MANIFEST])
    assert proc.returncode == 0, proc.stderr
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    rejects = io.read_jsonl(project / "data/interim/rejected.jsonl")
    assert [r["source"] for r in recs] == [f"{MANIFEST}:1", f"{MANIFEST}:3"]
    assert [(r["line"], r["reason"], r["raw"]) for r in rejects] == [(2, "parse_error", "{oops")]


def test_other_file_types_stream_through_datasets(project: Path) -> None:
    """A gzipped JSONL shard (a type ingest does not read itself) is streamed by datasets."""
    import gzip

    snap = _snapshot(project / "hf", "acme/gz", SHA1, {})
    (snap / "data").mkdir(parents=True)
    with gzip.open(snap / "data/train-00000-of-00001.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRAIN))
    _manifest(project, hub="acme/gz")
    proc = _run(project, [MANIFEST], "  columns: {output: output}\n")
    assert proc.returncode == 0, proc.stderr
    recs = io.read_jsonl(project / "data/interim/ingested.jsonl")
    m = io.read_json(project / "metrics/ingest.json")
    assert [r["source"] for r in recs] == [f"{MANIFEST}:1", f"{MANIFEST}:2"]
    assert recs[0]["messages"][0]["content"] == "把苹果翻译成英文"
    assert m["files"][MANIFEST]["rejected"] == {"missing_field": 1}


def test_subset_from_readme_configs(project: Path) -> None:
    _manifest(project, hub="acme/multi", subset="en", revision=SHA3)
    assert _run(project, [MANIFEST]).returncode == 0
    m = io.read_json(project / "metrics/ingest.json")
    assert m["files"][MANIFEST]["hub"]["subset"] == "en" and m["kept"] == 2


def test_same_manifest_same_bytes(project: Path) -> None:
    _manifest(project)
    assert _run(project, [MANIFEST]).returncode == 0
    first = (project / "data/interim/ingested.jsonl").read_bytes()
    assert _run(project, [MANIFEST]).returncode == 0
    assert (project / "data/interim/ingested.jsonl").read_bytes() == first


def test_pin_writes_the_sha_of_the_cached_branch(project: Path) -> None:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "reprotune.data.hub", "pin", "acme/sft",
                           "--split", "train", "--out", MANIFEST], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert SHA1 in proc.stdout
    src = hub.load_manifest(project / MANIFEST)
    assert src == hub.HubSource(hub="acme/sft", split="train", subset=None, revision=SHA1)
    # an explicit sha is kept as given (it need not be what main points at)
    proc = subprocess.run([sys.executable, "-m", "reprotune.data.hub", "pin", "acme/sft",
                           "--split", "test", "--revision", SHA2, "--out", MANIFEST],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert hub.load_manifest(project / MANIFEST).revision == SHA2
    # a split the snapshot lacks is refused and nothing is written
    before = (project / MANIFEST).read_bytes()
    proc = subprocess.run([sys.executable, "-m", "reprotune.data.hub", "pin", "acme/sft",
                           "--split", "validation", "--out", MANIFEST], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "split: 'validation'" in proc.stderr
    assert (project / MANIFEST).read_bytes() == before


# --------------------------------------------------------------------------- bad input
BAD = {
    "not cached": ({"hub": "acme/nothere"}, {},
                   ["hub: acme/nothere", "not in the HF cache", "not cached at all",
                    "hf download acme/nothere --repo-type dataset --revision " + SHA1]),
    "sha not cached": ({"revision": "4" * 40}, {},
                       ["hub: acme/sft at revision " + "4" * 40, "hf download"]),
    "branch": ({"revision": "main"}, {},
               ["revision: 'main' is not a commit sha", f"pin `revision: {SHA1}`"]),
    "not a sha": ({"revision": "v1"}, {},
                  ["revision: 'v1' is not a commit sha",
                   "python -m reprotune.data.hub pin acme/sft --split train --revision v1"]),
    "split": ({"split": "validation"}, {},
              ["split: 'validation' is not a split of acme/sft", "its splits: train, test"]),
    "subset": ({"hub": "acme/multi", "revision": SHA3, "subset": "fr"}, {},
               ["subset: 'fr' is not a subset of acme/multi", "its subsets: zh, en"]),
    "no subset": ({"hub": "acme/multi", "revision": SHA3}, {},
                  ["subset: missing, and acme/multi@333333333333 has several",
                   "its subsets: zh, en"]),
    "column": ({}, {"instruction": "question"},
               ["ingest.columns.instruction: column 'question' is not in acme/sft",
                "its columns: instruction, output, created_at"]),
    "unknown key": ({"revison": SHA1}, {}, ["revison: unknown key (did you mean 'revision'?)"]),
    "bad id": ({"hub": "acme/sft/extra"}, {}, ["hub: 'acme/sft/extra' is not a hub repo id"]),
    "missing key": ({"split": ...}, {}, ["split: missing"]),
    "broken file": ({"hub": "acme/broken"}, {},
                    ["acme/broken@111111111111: ", "not a readable Parquet file",
                     "if the cached copy is damaged: `hf download acme/broken", "--force-download"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_the_key(project: Path, case: str) -> None:
    manifest, columns, expected = BAD[case]
    _manifest(project, **manifest)
    start = time.monotonic()
    proc = _run(project, [MANIFEST], f"  columns: {json.dumps(columns)}\n")
    assert time.monotonic() - start < 60  # offline: no network wait
    assert proc.returncode != 0
    assert proc.stderr.startswith(f"read: {MANIFEST}: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not (project / "data/interim/ingested.jsonl").exists()


def test_missing_manifest(project: Path) -> None:
    proc = _run(project, ["data/raw/gone.hub.yaml"])
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "hub manifest not found" in proc.stderr and "reprotune.data.hub pin" in proc.stderr


@pytest.mark.parametrize("entry, fix", [
    ({"hub": "shibing624/alpaca-zh", "split": "train"}, "data/raw/alpaca-zh.hub.yaml"),
    ("shibing624/alpaca-zh", "python -m reprotune.data.hub pin shibing624/alpaca-zh --split train"),
])
def test_params_refuse_inline_hub_entries(tmp_path: Path, entry: object, fix: str) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(f"ingest:\n  inputs: [data/raw/demo.jsonl, {json.dumps(entry)}]\n", encoding="utf-8")
    with pytest.raises(ParamsError) as exc:
        read_params(p)
    msg = str(exc.value)
    assert msg.startswith("ingest.inputs[1]: ") and "\n" not in msg
    assert fix in msg and "revision: <40-hex commit sha>" in msg


def test_offline_switch() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    code = "from reprotune.data import hub; print(hub.offline())"
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True,  # noqa: E731
                                   text=True, check=True).stdout.strip()
    assert run(env) == "False"
    assert run({**env, "HF_DATASETS_OFFLINE": "1"}) == "True"
    assert run({**env, "HF_HUB_OFFLINE": "true"}) == "True"


def test_unreachable_hub_fails_at_once_and_pin_falls_back_to_the_cache(project: Path) -> None:
    """Online mode with a hub that refuses connections (a closed local port, so no real
    network is touched): an uncached revision fails in one request, without retries; pin
    resolves the branch from the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    _manifest(project, revision="4" * 40)
    (project / "params.yaml").write_text(f"ingest:\n  inputs: [{MANIFEST}]\n", encoding="utf-8")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "stages/read.py"), "--input", MANIFEST,
                           "--out", f"data/interim/read/{MANIFEST}"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not in the HF cache" in proc.stderr and "the hub cannot be reached" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "reprotune.data.hub", "pin", "acme/sft",
                           "--split", "train", "--out", "data/raw/p.hub.yaml"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert hub.load_manifest(project / "data/raw/p.hub.yaml").revision == SHA1


@pytest.mark.slow
def test_dvc_reruns_the_read_stage_when_the_pinned_revision_changes(project: Path) -> None:
    """`dvc repro ingest` in a copy of the repo: a manifest is an exact dependency, so pinning
    another revision rereads exactly that input, and an unchanged one reruns nothing."""
    import re
    import shutil

    repo = project / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("tests/", "docs/", "bench/")):
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "dvc.lock").unlink(missing_ok=True)
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    params = params.replace("  - data/raw/demo.jsonl\n", f"  - {MANIFEST}\n", 1)
    assert f"  - {MANIFEST}\n" in params
    (repo / "params.yaml").write_text(params, encoding="utf-8")
    _manifest(repo)
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *a: subprocess.run(a, cwd=repo, env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        assert run(*cmd).returncode == 0
    dvc = str(Path(sys.executable).parent / "dvc")

    def repro() -> set[str]:
        proc = run(dvc, "repro", "ingest")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return set(re.findall(r"Running stage '([\w@./-]+)'", proc.stdout + proc.stderr))

    assert repro() == {"check", f"read@{MANIFEST}", "ingest"}
    m = io.read_json(repo / "metrics/ingest.json")
    assert (m["files"][MANIFEST]["hub"]["revision"], m["rows_in"]) == (SHA1, 3)
    assert repro() == set()
    _manifest(repo, revision=SHA2)
    assert repro() == {f"read@{MANIFEST}", "ingest"}
    m = io.read_json(repo / "metrics/ingest.json")
    assert (m["files"][MANIFEST]["hub"]["revision"], m["rows_in"]) == (SHA2, 4)


def test_rows_stream_in_batches_with_continuous_lines(project: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 2 rows over two shards (3 + 1 rows): every row once, lines 1..4 in order."""
    monkeypatch.setattr(hub, "BATCH", 2)
    _manifest(project, revision=SHA2)
    rows = list(hub.iter_rows(project / MANIFEST))
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert [r.data["instruction"] for r in rows] == [r["instruction"] for r in TRAIN + TRAIN_2]
    assert {r.source for r in rows} == {str(project / MANIFEST)}


@pytest.mark.slow
def test_bench_hub_read(tmp_path: Path) -> None:
    """bench/hub_read.py: both inputs read, same records but for the source file."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench/hub_read.py"), "--rows", "1000",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rows_in=1000 ") == 2 and "'rc': 0" in proc.stdout
    assert "same records but for the source file: True" in proc.stdout
