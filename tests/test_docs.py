"""The README and the guides under docs/ cannot drift from the code.

What runs where (CI runs `make test` through `.ci/run`, so all of this runs there too):

* **Runnable blocks** - fenced blocks whose info string is ``bash runnable`` - are run
  command by command (``bash -c``, from the top of a copy of the repository's tracked files
  in a fresh git repo, with this test's virtualenv as ``.venv``) and must exit 0. They are
  kept cheap (params checks, ``dvc dag``, ``dvc status``, ``--print-command``): the whole
  set takes well under a minute. ``make`` runs with ``-o install`` so the copy reuses the
  installed environment instead of installing it again.
* **Every other fenced bash command** is checked without running it (training, a GPU, a
  hub download or a cloud remote cannot run in a test): each ``make`` target and variable
  exists in the Makefile; each ``python -m reprotune...`` module, ``python script.py`` and
  ``bash script.sh`` exists, and every ``--option`` it is given appears in its ``--help``;
  each ``dvc exp run -S key=value`` is a valid params.yaml setting (all of one command's
  ``-S`` together, through the same validation as the stages); each stage named to
  ``dvc repro`` / ``dvc exp run`` exists in dvc.yaml. Other programs (git, pip, cp, hf, gh)
  are left to their own documentation.
* **Links and numbers**: relative links and images resolve (anchors included), the README
  links every guide, each row of a "Measured" table names where its figure comes from, every
  ``bench/...`` path quoted exists, and the README is at most 250 lines with a DAG picture
  that shows exactly dvc.yaml's stages.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from reprotune.params import ParamsError, validate_all

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```+\s*([^\n`]*)$")
SHELLS = {"bash", "sh", "shell", "console"}
MAKE = "make() { command make -o install \"$@\"; }\n"  # reuse the installed venv
# phrases about how the project was built rather than how to use it
HISTORY = re.compile(r"\b(this session|before this work|the old code|issue \d+)\b", re.I)


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    """(info string, first line number, text) of every fenced block of a Markdown file."""
    out, info, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line.strip())
        if info is None and m:
            info, start, body = m.group(1).strip(), n + 1, []
        elif info is not None and line.strip().startswith("```"):
            out.append((info, start, "\n".join(body)))
            info = None
        elif info is not None:
            body.append(line.strip() if line.startswith("   ") else line)
    return out


def _commands(text: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _simple(command: str) -> list[list[str]]:
    """The simple commands of a line (split at &&, ||, |, ;), as tokens without comments."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    parts, cur = [], []
    for tok in lex:
        if tok in {"&&", "||", "|", ";", "&", "<", ">", ">>"}:
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    parts.append(cur)
    return [p for p in parts if p]


def _shell_blocks(runnable: bool) -> list[tuple[str, str]]:
    """(``file:line``, command) of the bash blocks, runnable ones or the others."""
    out = []
    for path in DOCS:
        for info, start, text in _blocks(path):
            words = info.split()
            if not words or words[0] not in SHELLS or ("runnable" in words) != runnable:
                continue
            for cmd in _commands(text):
                out.append((f"{path.relative_to(ROOT)}:{start}", cmd))
    return out


# --------------------------------------------------------------------------- static checks
@cache
def _makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"\$\((\w+)\)", text)) | set(re.findall(r"^(\w+)\s*[?:]?=", text, re.M))
    return targets, variables


@cache
def _help(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed: {proc.stderr[-500:]}"
    return proc.stdout


def _options(tokens: list[str]) -> list[str]:
    return [t.split("=")[0] for t in tokens if t.startswith("--")]


def _has_option(help_text: str, opt: str) -> bool:
    return re.search(re.escape(opt) + r"(?![\w-])", help_text) is not None


@cache
def _stage_names() -> set[str]:
    return set(YAML(typ="safe", pure=True).load((ROOT / "dvc.yaml").read_text())["stages"])


def _check_params(settings: list[str], where: str) -> None:
    """All ``-S`` of one command applied together to params.yaml must validate; a sweep
    (``-S 'lr=3e-4,1e-3'``) must validate at each of its values."""
    yaml = YAML(typ="safe", pure=True)
    raw = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    choices = []
    for setting in settings:
        key, _, value = setting.partition("=")
        choices.append((key, [value] if value.startswith("[") else value.split(",")))

    def apply(params: dict, key: str, value: str) -> None:
        node = params
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.load(value)

    for i, (key, values) in enumerate(choices):
        for value in values:
            trial = copy.deepcopy(raw)
            for j, (k, vs) in enumerate(choices):
                apply(trial, k, value if j == i else vs[0])
            try:
                validate_all(trial)
            except ParamsError as exc:
                raise AssertionError(f"{where}: -S {key}={value}: {exc}") from None


def _check(tokens: list[str], where: str) -> None:
    prog, args = tokens[0], tokens[1:]
    if prog == "make":
        targets, variables = _makefile()
        for a in args:
            if "=" in a:
                assert a.split("=")[0] in variables, f"{where}: make variable {a} is not used"
            elif not a.startswith("-"):
                assert a in targets, f"{where}: no make target {a!r}"
    elif prog == "python" and args[:1] == ["-m"] and args[1].startswith("reprotune"):
        module, rest = args[1], args[2:]
        path = ROOT / "src" / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), \
            f"{where}: no module {module}"
        sub = [rest[0]] if rest and not rest[0].startswith("-") and re.fullmatch(r"[a-z-]+", rest[0]) else []
        if _options(rest):
            text = _help("-m", module, *sub)
            for opt in _options(rest):
                assert _has_option(text, opt), f"{where}: {module} {' '.join(sub)} has no option {opt}"
    elif prog in {"python", "bash"} and args and args[0].endswith((".py", ".sh")):
        assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
        if prog == "python" and _options(args[1:]):
            text = _help(args[0])
            for opt in _options(args[1:]):
                assert _has_option(text, opt), f"{where}: {args[0]} has no option {opt}"
    elif prog == "dvc" and args[:2] in (["exp", "run"], ["repro"]) or args[:1] == ["repro"]:
        rest = args[2:] if args[0] == "exp" else args[1:]
        settings, targets, skip = [], [], False
        for i, a in enumerate(rest):
            if skip:
                skip = False
                continue
            if a in ("-S", "--set-param"):
                settings.append(rest[i + 1])
                skip = True
            elif a in ("-n", "--name"):
                skip = True
            elif not a.startswith("-"):
                targets.append(a)
        _check_params(settings, where)
        for t in targets:
            assert t.split("@")[0] in _stage_names(), f"{where}: no stage {t!r} in dvc.yaml"


@pytest.mark.parametrize(("where", "command"), _shell_blocks(runnable=False))
def test_documented_commands_match_the_code(where: str, command: str) -> None:
    for tokens in _simple(command):
        _check(tokens, where)


# --------------------------------------------------------------------------- runnable blocks
@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tracked files in a fresh git repo, this venv as its .venv."""
    dest = tmp_path_factory.mktemp("docs") / "reprotune"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(Path(sys.prefix))  # a symlinked venv, ignored by .gitignore
    env = _env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def _env(root: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(root / "src"), DVC_NO_ANALYTICS="1",
                HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@t")


def test_there_are_runnable_blocks() -> None:
    assert len(_shell_blocks(runnable=True)) >= 5


@pytest.mark.parametrize(("where", "command"), _shell_blocks(runnable=True))
def test_runnable_commands_run(repo_copy: Path, where: str, command: str) -> None:
    proc = subprocess.run(["bash", "-c", MAKE + command], cwd=repo_copy, env=_env(repo_copy),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo_copy, capture_output=True,
                            text=True, check=True).stdout
    assert ".venv" not in status


# --------------------------------------------------------------------------- links, numbers
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _prose(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path)):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to missing {target}"
        if anchor:
            assert anchor in _anchors(dest), f"{path.name}: no heading #{anchor} in {dest.name}"


def test_readme_is_a_landing_page_linking_every_guide() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, len(lines)
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README.read_text(encoding="utf-8")))
    guides = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert guides <= linked, f"guides the README does not link: {sorted(guides - linked)}"


DEMO_DVC_YAML = "data/raw/dvc.yaml"  # the demo stage lives there: it runs only while named
DEMO_INPUT = "data/raw/demo.jsonl"


def _demo_stages() -> list[str]:
    return list(YAML(typ="safe", pure=True).load((ROOT / DEMO_DVC_YAML).read_text())["stages"])


def test_readme_dag_shows_exactly_the_stages() -> None:
    text = README.read_text(encoding="utf-8")
    picture = text[text.index("## The pipeline"):]
    picture = picture[picture.index("```"):]
    picture = picture[:picture.index("```", 3)]
    boxes = set(re.findall(r"\| ([\w@./:-]+) \|", picture))
    yaml = YAML(typ="safe", pure=True)
    stages = yaml.load((ROOT / "dvc.yaml").read_text())["stages"]
    inputs = yaml.load((ROOT / "params.yaml").read_text())["ingest"]["inputs"]
    expected = {f"{n}@{i}" for n, st in stages.items() if "foreach" in st for i in inputs} | {
        n for n, st in stages.items() if "foreach" not in st} | {
        f"{DEMO_DVC_YAML}:{n}" for n in _demo_stages() if DEMO_INPUT in inputs}
    assert boxes == expected, ("the README's DAG is stale: paste the output of `dvc dag` "
                               f"(missing {sorted(expected - boxes)}, extra {sorted(boxes - expected)})")


def test_pipeline_guide_has_a_row_per_stage() -> None:
    text = (ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w@<>]+)` \|", text, re.M))
    stages = YAML(typ="safe", pure=True).load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = {f"{n}@<file>" if "foreach" in st else n for n, st in stages.items()} | set(
        _demo_stages())
    assert rows == expected, (f"docs/pipeline.md's stage table: missing {sorted(expected - rows)}, "
                              f"extra {sorted(rows - expected)}")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_numbers_name_their_source_and_docs_speak_to_users(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    # scripts anywhere; results files where quoted as a source (not as an `--out` to write)
    refs = set(re.findall(r"\b(bench/[\w./-]+\.(?:py|sh))", text)) | set(
        re.findall(r"(?<!--out )\b(bench/results/[\w.-]+\.json)", _prose(path)))
    for ref in refs:
        assert (ROOT / ref).is_file(), f"{path.name}: {ref} does not exist"
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line
        elif "measured" in section.lower() and line.startswith("|") and not re.match(
                r"^\|[\s|:-]+\|$", line) and not line.startswith("| what"):
            source = line.rstrip("|").split("|")[-1]
            assert "bench/" in source or "`" in source, f"{path.name}: no source in {line}"
    prose = _prose(path)
    assert not HISTORY.search(prose), f"{path.name}: {HISTORY.search(prose).group(0)!r}"


def _declared_outputs() -> dict[str, set[str]]:
    """{stage name: every path it declares as an output, metric or plot} (demo included)."""
    yaml = YAML(typ="safe", pure=True)
    stages = {**yaml.load((ROOT / "dvc.yaml").read_text())["stages"],
              **yaml.load((ROOT / DEMO_DVC_YAML).read_text())["stages"]}
    out: dict[str, set[str]] = {}
    for name, st in stages.items():
        body = st.get("do", st)
        paths = {next(iter(o)) if isinstance(o, dict) else o
                 for kind in ("outs", "metrics", "plots") for o in body.get(kind) or []}
        # read@<file>: ${item} is the input's path
        out[name] = {p.replace("${item}", "<file>") for p in paths}
    return out


def test_design_dag_names_exactly_the_stages() -> None:
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    dag = text[text.index("## DAG"):]
    dag = dag[dag.index("```") + 3:]
    dag = dag[:dag.index("```")]
    named = set(re.findall(r"[a-z_]+(?:@<file>)?", dag))
    expected = {f"{n}@<file>" if n == "read" else n for n in _declared_outputs()}
    assert expected <= named, f"docs/DESIGN.md's DAG lacks {sorted(expected - named)}"
    words = {w for w in named if "_" in w or "@" in w}  # stage-like words only
    assert words <= expected | {"review_wins"}, sorted(words - expected)


def test_design_files_table_matches_dvc_yaml() -> None:
    """Each path of DESIGN.md's Files table is declared by the stage said to write it
    (or lies inside a folder it declares), unless the row says it is not a DVC output."""
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    table = text[text.index("## Files"):]
    table = table[:table.index("\n## ")]
    declared = _declared_outputs()
    rows = re.findall(r"^\| `([^`]+)`(?:, `[^`]+`)* \| ([^|]+) \| (.*) \|$", table, re.M)
    assert len(rows) >= 20, len(rows)
    checked = 0
    for path, writers, content in rows:
        if "not a DVC output" in content or "not in dvc.yaml" in content or "shipped" in writers:
            continue
        m = re.match(r"(.*)\{([^}]+)\}(.*)", path)
        paths = [f"{m[1]}{alt}{m[3]}" for alt in m[2].split(",")] if m else [path]
        stages = [w.split("@")[0] for w in re.findall(r"[a-z_]+(?:@<file>)?", writers)]
        for stage in stages:
            assert stage in declared, f"DESIGN.md: {path}: no stage {stage!r} in dvc.yaml"

        def declares(stage: str, p: str) -> bool:
            p = p.rstrip("/")
            pattern = re.sub(r"<\w+>", "*", p)  # <stage>, <file>, <method>, * stand for names
            return any(p == d or p.startswith(d + "/") or fnmatch.fnmatch(d, pattern)
                       for d in declared[stage])

        for p in paths:  # each path is declared by a stage the row names, and each such
            assert any(declares(st, p) for st in stages), (  # stage declares one of them
                f"DESIGN.md: {p} is written by none of {stages} in dvc.yaml")
            checked += 1
        for st in stages:
            assert any(declares(st, p) for p in paths), f"DESIGN.md: {st} declares no {path}"
    assert checked >= 20, checked
