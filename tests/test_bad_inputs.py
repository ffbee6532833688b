"""The hostile-input corpus: every file in tests/data/bad_inputs/ ends exactly as asserted here.

Each file either becomes rows (kept + rejected per reason, counts adding up) or stops the
ingest stage with ONE line naming the file and the fix, as the stage decides it with the
default params. The files are written by tests/data/bad_inputs/make_corpus.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reprotune import io
from reprotune.data.inputs import IngestError, check_files, ingest_files
from reprotune.data.readers import InputFileError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad_inputs"
MIN_KEPT = 0.5  # params.yaml default of ingest.min_kept_ratio


def rows(rows_in: int, kept: int, **rejected: int) -> dict:
    return {"rows_in": rows_in, "kept": kept, "rejected": rejected}


def error(*fragments: str) -> dict:
    return {"error": fragments}


ICONV = ("not UTF-8 text", "iconv -f GBK -t UTF-8")
NO_ROWS = ("the file yields no rows",)
OUTCOMES: dict[str, dict] = {
    # encodings: UTF-8/16/32 read (rows counted as rows, not lines); anything else refused
    "utf8_bom.jsonl": rows(3, 3),
    "utf16_le_bom.json": rows(3, 3),
    "utf16_be_bom.jsonl": rows(3, 3),
    "utf16_le_no_bom.jsonl": rows(3, 3),
    "utf32_le_bom.json": rows(3, 3),
    "gbk.json": error(*ICONV),
    "gbk.jsonl": error(*ICONV),
    "gb18030.csv": error(*ICONV),
    "one_latin1_line.jsonl": rows(4, 3, parse_error=1),  # one corrupt line, not the file
    # JSON documents
    "truncated_array.json": rows(6, 5, parse_error=1),  # complete rows + one tail reject
    "truncated_after_element.json": rows(7, 6, parse_error=1),
    "array_missing_comma.json": error("line 3 column 1", "array is broken before its end"),
    "trailing_garbage.json": rows(4, 3, parse_error=1),
    "jsonl_named_json.json": rows(3, 3),
    "array_of_strings.json": rows(5, 3, parse_error=2),
    "scalar.json": error("kept 0 of 1 rows", "top reason parse_error"),
    "jsonl_with_array_line.jsonl": rows(4, 3, parse_error=1),
    "empty.jsonl": error(*NO_ROWS),
    "blank_lines.json": error(*NO_ROWS),
    "empty_array.json": error(*NO_ROWS),
    "crlf.jsonl": rows(3, 3),
    "u2028_in_string.jsonl": rows(3, 3),  # a line separator inside a string is not a new row
    "duplicate_keys.jsonl": rows(4, 3, parse_error=1),
    "lone_surrogate.jsonl": rows(4, 3, parse_error=1),
    "nan_infinity.jsonl": rows(7, 5, non_finite_number=2),
    "nan_tool_argument.jsonl": rows(3, 2, non_finite_number=1),
    "control_chars_kept.jsonl": rows(3, 3),
    # CSV
    "csv_unclosed_quote.csv": error("csv_unclosed_quote.csv: line 3", "never closed"),
    "csv_field_count.csv": rows(4, 3, parse_error=1),
    "csv_bom_crlf_multiline.csv": rows(2, 2),
    "csv_header_only.csv": error(*NO_ROWS),
    # Parquet
    "parquet_null_answer.parquet": rows(4, 3, missing_field=1),  # NaN in an unused column is fine
    "parquet_nan_answer.parquet": rows(3, 2, non_finite_number=1),
    "not_parquet.parquet": error("not a readable Parquet file"),
    # shapes and fields
    "wrong_types.jsonl": rows(10, 7, wrong_type=3),
    "number_answer.jsonl": rows(3, 3),
    "missing_fields.jsonl": rows(5, 3, missing_field=2),
    "roles.jsonl": rows(9, 5, unknown_role=1, role_order=1, no_assistant_turn=1,
                        ends_on_non_assistant=1),
    "bad_history.jsonl": rows(4, 3, wrong_type=1),
    "whitespace_answer.jsonl": rows(3, 3),  # kept here; dedup drops it as empty_answer
    "content_parts_value.jsonl": rows(3, 3),
    "content_parts_image.jsonl": rows(4, 3, wrong_type=1),
    # markup injection
    "special_tokens.jsonl": rows(11, 6, special_token=5),
    "tool_name_injection.jsonl": rows(4, 3, invalid_tool_call=1),
    "tool_argument_markup.jsonl": rows(4, 3, special_token=1),
    "tools_schema_markup.jsonl": rows(4, 3, special_token=1),
    "tools_unwrapped.jsonl": rows(1, 1),
    "unsupported.xml": error("unsupported file type '.xml'"),
    # one document (format.mode: chat refuses it at check: tests/test_layouts.py)
    "csv_named_txt.txt": rows(1, 1),
    # issue 18: nesting bounded, CSV headers and long cells, exact numbers, right messages
    "deep_nesting.jsonl": rows(4, 3, parse_error=1),  # the deep line is one reject
    "deep_array_element.json": rows(4, 3, parse_error=1),
    "deep_brackets.json": error("kept 0 of 1 rows", "nested 9999 levels deep"),
    "csv_duplicate_header.csv": error("line 1", "column 'output' twice", "rename or remove"),
    "csv_long_cell.csv": rows(2, 2),  # 140,000 characters in one cell: read, not "unclosed"
    "numbers_as_text.jsonl": rows(4, 4),
    "latin1.jsonl": error("not UTF-8 text", "iconv -f WINDOWS-1252 -t UTF-8"),
    "gzip.jsonl": error("gzip-compressed", "gunzip -c"),
    "a_directory.jsonl": error("is a directory"),
    "object_as_text.jsonl": rows(4, 3, wrong_type=1),
    "raw_cr_in_string.jsonl": rows(4, 3, parse_error=1),  # one reject, not two half rows
    "reasoning_and_name.jsonl": rows(3, 3),
    "loss_weight.jsonl": rows(7, 4, invalid_loss_weight=2, no_trained_turn=1),
    # issue 28: the right fix for the cause, and preference data never read silently
    "utf16_le_bom_stray_byte.json": error("ends in the middle of a UTF-16-LE character",
                                          "last byte (0a at offset 302)", "truncate -s -1"),
    "truncated_in_escape.json": rows(4, 3, parse_error=1),  # cut inside a \u escape
    "pretty_printed.jsonl": error("line 1: one JSON value spans lines 1-4", "rename it to .json",
                                  "jq -c ."),
    "pretty_printed.json": rows(5, 5),  # objects one after another, each over 4 lines
    "csv_double_bom.csv": rows(2, 2),  # the second U+FEFF is not part of the column name
    "empty_rejected.jsonl": rows(3, 3),  # dedup drops rows 1 and 3 as empty_answer
    # unpaired KTO rows are read as such (issue 29), never as SFT
    "kto_trl.jsonl": rows(4, 4),
    "kto_llamafactory.jsonl": rows(3, 3),
}


def test_every_corpus_file_has_an_outcome() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.suffix != ".py"}
    assert files == set(OUTCOMES)
    assert len(files) >= 67


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_outcome(name: str) -> None:
    path = str(CORPUS / name)
    want = OUTCOMES[name]
    if "error" in want:
        with pytest.raises((InputFileError, IngestError)) as exc:
            res = ingest_files([path])
            check_files(res, [path], MIN_KEPT)
        msg = str(exc.value)
        assert name in msg and "\n" not in msg
        for fragment in want["error"]:
            assert fragment in msg
        return
    res = ingest_files([path])
    check_files(res, [path], MIN_KEPT)
    c = res.counts
    got = {"rows_in": c["rows_in"], "kept": c["kept"],
           "rejected": {k: v for k, v in c["rejected"].items() if v}}
    assert got == want
    assert c["rows_in"] == c["kept"] + c["rejected_total"] == len(res.records) + len(res.rejects)
    for rej in res.rejects:  # every reject says where and why
        assert rej["source"] == path and rej["line"] >= 1 and rej["reason"] and rej["detail"]


def test_exact_text_of_odd_but_valid_rows() -> None:
    def answers(name: str) -> list[str]:
        return [r["messages"][-1]["content"] for r in ingest_files([str(CORPUS / name)]).records]

    assert answers("u2028_in_string.jsonl")[0] == "第一行\u2028第二行"
    assert answers("control_chars_kept.jsonl")[0] == "响铃\u0007、空字符\u0000、制表\t都保留"
    assert answers("number_answer.jsonl")[0] == "2"
    assert answers("whitespace_answer.jsonl")[0] == "   "
    assert answers("content_parts_value.jsonl")[0] == "你好！有什么事？"
    csv_rows = ingest_files([str(CORPUS / "csv_bom_crlf_multiline.csv")]).records
    assert csv_rows[0]["messages"][0]["content"] == "多行\r\n问题"  # quoted CRLF kept as is
    tools = ingest_files([str(CORPUS / "tools_unwrapped.jsonl")]).records[0]["tools"]
    assert tools[0]["type"] == "function" and list(tools[0]["function"]["parameters"]) == [
        "type", "required", "properties"]
    assert ingest_files([str(CORPUS / "utf16_le_no_bom.jsonl")]).records[0]["messages"][0][
        "content"] == "问题 1：一加一等于几？"
    # issue 18
    assert answers("numbers_as_text.jsonl") == ["1.50", "1e5", "-0", "3.14159265358979323846264338"]
    assert answers("csv_long_cell.csv") == ["长" * 140_000, "短答案"]
    obj = ingest_files([str(CORPUS / "object_as_text.jsonl")]).rejects[0]
    assert obj["detail"] == "instruction must be a string, got object"
    deep = ingest_files([str(CORPUS / "deep_nesting.jsonl")]).rejects[0]
    assert deep["line"] == 3 and "nested 10001 levels deep (more than 100" in deep["detail"]
    cr = ingest_files([str(CORPUS / "raw_cr_in_string.jsonl")]).rejects[0]
    assert cr["line"] == 3 and "Invalid control character" in cr["detail"]
    res = ingest_files([str(CORPUS / "reasoning_and_name.jsonl")])
    assert res.records[0]["messages"][1]["reasoning_content"] == "1 + 1 = 2，很简单。"
    assert res.records[1]["messages"][1]["reasoning_content"] == "要查天气。"
    assert res.counts["dropped_message_keys"] == {"name": 2, "tool_call_id": 1, "tool_calls.id": 1}
    res = ingest_files([str(CORPUS / "loss_weight.jsonl")])
    assert res.records[0]["messages"][1]["loss_weight"] == 0
    assert res.counts["loss_weight_zero_turns"] == 1
    assert [(r["line"], r["reason"]) for r in res.rejects] == [
        (3, "invalid_loss_weight"), (4, "invalid_loss_weight"), (5, "no_trained_turn")]


@pytest.mark.parametrize("name, fragment", [
    ("gbk.json", "iconv -f GBK -t UTF-8"),
    ("csv_unclosed_quote.csv", "never closed"),
    ("scalar.json", "ingest.min_kept_ratio"),
    ("csv_duplicate_header.csv", "column 'output' twice"),
    ("deep_brackets.json", "nested 9999 levels deep"),
    ("utf16_le_bom_stray_byte.json", "Remove it: truncate -s -1 data/raw/utf16_le_bom_stray_byte"),
    ("pretty_printed.jsonl", "rename it to .json"),
])
def test_stage_stops_with_one_line(tmp_path: Path, name: str, fragment: str) -> None:
    """The read stage of the file, as DVC runs it: exit 1, one line on stderr, no traceback."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(CORPUS / name, raw / name)
    shutil.copy(CORPUS / "utf8_bom.jsonl", raw / "good.jsonl")  # a fine file beside it
    (tmp_path / "params.yaml").write_text(
        f"ingest:\n  inputs: [data/raw/good.jsonl, data/raw/{name}]\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "read.py"), "--input",
                           f"data/raw/{name}", "--out", f"data/interim/read/data/raw/{name}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"read: data/raw/{name}") and fragment in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "interim" / "ingested.jsonl").exists()


def test_outputs_are_written_with_default_permissions(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        io.write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
        with io.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".formatted.parquet.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".base.x1.tmp").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    n = io.clean_stale_temporaries(tmp_path / "out" / "formatted.parquet", tmp_path / "base")
    assert n == 2 and sorted(p.name for p in tmp_path.rglob("*")) == ["keep.json", "out"]


def test_issue28_fixes_work_and_rows_are_exact(tmp_path: Path) -> None:
    """The fix each issue-28 message gives works, and what is read is exactly the file."""
    # a stray byte after UTF-16 text: `truncate -s -1` as told, then all rows read
    stray = tmp_path / "stray.json"
    shutil.copy(CORPUS / "utf16_le_bom_stray_byte.json", stray)
    with pytest.raises(InputFileError, match=f"Remove it: truncate -s -1 {stray} "):
        ingest_files([str(stray)])
    subprocess.run(["truncate", "-s", "-1", str(stray)], check=True)
    assert ingest_files([str(stray)]).counts["kept"] == 3
    # a JSON array cut inside a \u escape: its complete rows, then one reject for the tail
    res = ingest_files([str(CORPUS / "truncated_in_escape.json")])
    assert [r["messages"][0]["content"] for r in res.records] == [
        f"问题 {i}：一加一等于几？" for i in (1, 2, 3)]
    assert res.rejects[0]["line"] == 4 and "truncated (Invalid \\uXXXX escape)" in \
        res.rejects[0]["detail"]
    # pretty-printed JSONL: renamed to .json as told, the 5 objects are 5 rows at their lines
    res = ingest_files([str(CORPUS / "pretty_printed.json")])
    assert [r["source"].rsplit(":", 1)[1] for r in res.records] == ["1", "5", "9", "13", "17"]
    assert res.records[4]["messages"][0]["content"] == "问题 4：一加一等于几？"
    # a second BOM before a CSV header: the column is `instruction`, the text unchanged
    res = ingest_files([str(CORPUS / "csv_double_bom.csv")])
    assert [m["content"] for m in res.records[1]["messages"]] == ["问题二", "答案二"]


def test_empty_rejected_answer_is_dropped_like_an_empty_chosen_one() -> None:
    """Ingest keeps empty answers on purpose; dedup's quality filter drops them, for the
    rejected side of a pair as for the chosen side (reason empty_answer)."""
    from types import SimpleNamespace

    from reprotune.data import quality

    res = ingest_files([str(CORPUS / "empty_rejected.jsonl")])
    assert [r["preference"]["rejected"][0]["content"] for r in res.records] == ["", "五。", "七。"]
    filters = quality.make_filters(SimpleNamespace(min_chars=1, max_chars=10_000,
                                                   max_repetition=0.5))
    assert [quality.first_failure(r, filters) for r in res.records] == [
        "empty_answer", None, "empty_answer"]


def test_unpaired_kto_rows_are_read_with_their_flag() -> None:
    res = ingest_files([str(CORPUS / "kto_trl.jsonl")])
    assert [r["kto"]["desirable"] for r in res.records] == [True, False, True, False]
    assert all(r["label"] is None for r in res.records)  # the flag is not a class label
    res = ingest_files([str(CORPUS / "kto_llamafactory.jsonl")])
    assert [r["kto"] for r in res.records] == [{"prompt_turns": 1, "desirable": d}
                                                for d in (True, False, False)]
    # a class label that is not true/false stays a label of an ordinary SFT row
    from reprotune.data.ingest import convert_row

    assert convert_row({"prompt": "q", "completion": "a", "label": "positive"})[1]["label"] == \
        "positive"


def test_symlink_in_raw_pointing_outside_names_a_fix_that_works(tmp_path: Path,
                                                                 monkeypatch) -> None:
    from reprotune.data.inputs import check_inputs

    outside = tmp_path / "home" / "my.jsonl"
    outside.parent.mkdir()
    shutil.copy(CORPUS / "utf8_bom.jsonl", outside)
    repo = tmp_path / "repo"
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "my.jsonl").symlink_to(outside)
    monkeypatch.chdir(repo)
    with pytest.raises(IngestError) as exc:
        check_inputs(["data/raw/my.jsonl"])
    msg = str(exc.value)
    assert f"is a symbolic link to {outside}" in msg
    fix = msg.split("track it: ", 1)[1].split(" && dvc add")[0]
    assert fix == f"rm data/raw/my.jsonl && cp {outside} data/raw/my.jsonl"
    subprocess.run(fix, shell=True, check=True)
    check_inputs(["data/raw/my.jsonl"])  # now a file inside data/raw/
    assert not Path("data/raw/my.jsonl").is_symlink()
