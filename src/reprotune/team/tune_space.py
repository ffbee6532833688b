"""The search space and budget of ``make tune``, read from a versioned file (``tune.yaml``).

No stage reads the file, so editing the budget or the space never invalidates a stage (the
``check`` stage depends on all of params.yaml). :func:`load_config` checks its shape and
:func:`check_against_project` checks it against the project before any trial starts: every
key must be a params.yaml key, both bounds (and every choice) must pass the same validation
as ``dvc exp run`` (:func:`reprotune.params.read_params`), and the metric must be one a stage
writes. Every error is one line naming the file and key.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from reprotune.params import ParamsError, read_params
from reprotune.scorecard import lookup

KINDS = ("float", "log", "int", "categorical")
SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("none", "median", "successive_halving")
DIRECTIONS = ("minimize", "maximize")
VAL_CURVE = "metrics/curves/plots/metrics/val_loss.tsv"  # what the pruners read
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}")
TOP_KEYS = {"study", "metric", "direction", "targets", "n_trials", "timeout", "sampler", "seed",
            "startup_trials", "pruner", "space"}
PRUNER_KEYS = {"type", "startup_trials", "warmup_steps", "min_resource", "reduction_factor"}
SPACE_KEYS = {"type", "low", "high", "step", "choices", "grid"}


class TuneError(ValueError):
    """The tune config is unusable; the message names the file and the key."""


@dataclass(frozen=True)
class ParamSpace:
    """How one params.yaml key (dotted, e.g. ``train.warmup_ratio``) is searched."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    grid: tuple[Any, ...] = ()  # the grid sampler's values when they cannot be derived

    def grid_values(self) -> list[Any]:
        """The values the grid sampler tries (explicit ``grid``, choices, ints, or steps)."""
        if self.grid:
            return list(self.grid)
        if self.kind == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None and self.step is not None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        values = [self.low + i * self.step for i in range(n + 1)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]

    def edges(self) -> list[Any]:
        """The values that must all be valid params: both bounds, every choice and grid value."""
        return [*(v for v in (self.low, self.high) if v is not None), *self.choices, *self.grid]


@dataclass(frozen=True)
class TuneConfig:
    """A study: what to search, what to optimise, how long, with which sampler and pruner."""

    study: str
    metric: str                    # "file:dotted.key"
    direction: str
    space: tuple[ParamSpace, ...]
    n_trials: int = 20
    timeout: float | None = None   # seconds for one `make tune` run
    sampler: str = "tpe"
    seed: int = 0
    startup_trials: int = 5        # TPE / GP: random trials before the model is used
    targets: tuple[str, ...] = ()  # `dvc exp run` targets; () = the whole pipeline
    pruner: str = "none"
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0
    pruner_min_resource: int = 1
    pruner_reduction_factor: int = 3


def _fail(path: Path, key: str, msg: str) -> TuneError:
    return TuneError(f"{path}: {key}: {msg}")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _unknown(path: Path, where: str, got: dict[str, Any], known: set[str]) -> None:
    for k in got:
        if k not in known:
            near = difflib.get_close_matches(str(k), sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(known))}"
            raise _fail(path, f"{where}{k}", f"unknown key{hint}")


def _space(path: Path, key: str, raw: Any) -> ParamSpace:
    where = f"space.{key}"
    if not isinstance(raw, dict):
        raise _fail(path, where, "expected a mapping such as {type: log, low: 1.0e-5, high: 1.0e-3}")
    _unknown(path, f"{where}.", raw, SPACE_KEYS)
    kind = raw.get("type")
    if kind not in KINDS:
        raise _fail(path, f"{where}.type", f"{kind!r} is not one of {', '.join(KINDS)}")
    grid = tuple(raw.get("grid") or ())
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(path, f"{where}.choices", "a categorical param needs a non-empty list")
        return ParamSpace(key, kind, choices=tuple(choices), grid=grid)
    low, high, step = raw.get("low"), raw.get("high"), raw.get("step")
    for name, v in (("low", low), ("high", high)):
        if not _number(v) or (kind == "int" and not isinstance(v, int)):
            raise _fail(path, f"{where}.{name}", f"{v!r} is not {'an integer' if kind == 'int' else 'a number'}")
    if low >= high:
        raise _fail(path, where, f"low ({low}) must be below high ({high})")
    if kind == "log" and low <= 0:
        raise _fail(path, f"{where}.low", f"a log param needs low > 0, not {low}")
    if step is not None and (not _number(step) or step <= 0 or kind == "log"):
        raise _fail(path, f"{where}.step", f"{step!r}: a positive number, for float/int params only")
    if kind == "int" and step is not None and not isinstance(step, int):
        raise _fail(path, f"{where}.step", f"{step!r}: an int param steps by a whole number "
                                           f"(1, 2, ...); use type: float for a step of {step}")
    if kind == "int" and step is None:
        step = 1
    return ParamSpace(key, kind, low=low, high=high, step=step, grid=grid)


def load_config(path: str | Path) -> TuneConfig:
    """Read and shape-check a tune config; raises :class:`TuneError`."""
    path = Path(path)
    if not path.is_file():
        raise TuneError(f"{path}: file not found (run from the repository root, or pass --config)")
    from ruamel.yaml.error import YAMLError

    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise TuneError(f"{path}: {where}not valid YAML: "
                        f"{getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TuneError(f"{path}: expected a mapping at the top level")
    _unknown(path, "", raw, TOP_KEYS)
    study = str(raw.get("study", ""))
    if not STUDY_NAME.fullmatch(study):
        raise _fail(path, "study", f"{study!r}: letters, digits, - and _ (it names the experiments)")
    metric = raw.get("metric", "metrics/train.json:best_val_loss")
    if not isinstance(metric, str) or ":" not in metric:
        raise _fail(path, "metric", f"{metric!r}: write it as file:key, e.g. metrics/eval.json:bleu")
    direction = raw.get("direction", "minimize")
    if direction not in DIRECTIONS:
        raise _fail(path, "direction", f"{direction!r} is not one of {', '.join(DIRECTIONS)}")
    ints = {k: raw.get(k, d) for k, d in (("n_trials", 20), ("seed", 0), ("startup_trials", 5))}
    for k, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "n_trials" else 0):
            raise _fail(path, k, f"{v!r}: expected an integer >= {1 if k == 'n_trials' else 0}")
    timeout = raw.get("timeout")
    if timeout is not None and (not _number(timeout) or timeout <= 0):
        raise _fail(path, "timeout", f"{timeout!r}: seconds > 0, or null for none")
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _fail(path, "sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
    targets = raw.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _fail(path, "targets", f"{targets!r}: a list of stage names, e.g. [train]")
    pruner = raw.get("pruner") or {"type": "none"}
    pruner = {"type": pruner} if isinstance(pruner, str) else pruner
    if not isinstance(pruner, dict):
        raise _fail(path, "pruner", "expected a mapping such as {type: median, startup_trials: 2}")
    _unknown(path, "pruner.", pruner, PRUNER_KEYS)
    if pruner.get("type", "none") not in PRUNERS:
        raise _fail(path, "pruner.type", f"{pruner.get('type')!r} is not one of {', '.join(PRUNERS)}")
    for k, lo in (("startup_trials", 0), ("warmup_steps", 0), ("min_resource", 1),
                  ("reduction_factor", 2)):
        v = pruner.get(k, lo if k != "startup_trials" else 2)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise _fail(path, f"pruner.{k}", f"{v!r}: expected an integer >= {lo}")
    if pruner.get("type", "none") != "none" and direction != "minimize":
        raise _fail(path, "pruner", f"the pruners read the val-loss curve ({VAL_CURVE}); they "
                                    f"need direction: minimize (or pruner: none)")
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise _fail(path, "space", "at least one param, e.g. lr: {type: log, low: 1.0e-4, high: 1.0e-2}")
    space = tuple(_space(path, str(k), v) for k, v in space_raw.items())
    if sampler == "grid":
        for p in space:
            if p.kind == "log" and not p.grid or p.kind == "float" and p.step is None and not p.grid:
                raise _fail(path, f"space.{p.key}", "the grid sampler needs its values: add "
                                                    "grid: [...] (or step: for a float)")
    return TuneConfig(study=study, metric=metric, direction=direction, space=space,
                      n_trials=ints["n_trials"], timeout=timeout, sampler=sampler,
                      seed=ints["seed"], startup_trials=ints["startup_trials"],
                      targets=tuple(targets), pruner=pruner.get("type", "none"),
                      pruner_startup_trials=pruner.get("startup_trials", 2),
                      pruner_warmup_steps=pruner.get("warmup_steps", 0),
                      pruner_min_resource=pruner.get("min_resource", 1),
                      pruner_reduction_factor=pruner.get("reduction_factor", 2))


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with each dotted key of ``overrides`` set (what ``-S`` does)."""
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def validate(params: dict[str, Any]) -> None:
    """The check stage's validation of a whole params.yaml (raises ParamsError)."""
    with tempfile.TemporaryDirectory(prefix="reprotune-tune-") as tmp:
        path = Path(tmp) / "params.yaml"
        with path.open("w", encoding="utf-8") as fh:
            YAML(typ="safe", pure=True).dump(params, fh)
        read_params(path)


def _leaves(params: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in params.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _outputs(stage: dict[str, Any]) -> list[str]:
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind) or []:
            paths += list(entry) if isinstance(entry, dict) else [entry]
    return [str(p) for p in paths]


def _upstream(stages: dict[str, Any], targets: tuple[str, ...]) -> set[str]:
    """The target stages and every stage whose outputs they (transitively) depend on."""
    todo, seen = list(targets), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in stages:
            continue
        seen.add(name)
        deps = [str(d) for d in stages[name].get("deps") or []]
        for other, stage in stages.items():
            if any(d == o or d.startswith(o.rstrip("/") + "/") for d in deps for o in _outputs(stage)):
                todo.append(other)
    return seen


def check_against_project(cfg: TuneConfig, config_path: str | Path, params: dict[str, Any],
                          dvc_yaml: dict[str, Any], metric_data: dict[str, Any] | None = None
                          ) -> None:
    """Refuse a space or metric the project cannot run, before the first trial.

    ``metric_data`` is the metric file as the workspace has it (None when not written yet):
    a key it lacks is refused too.
    """
    path = Path(config_path)
    leaves = _leaves(params)
    for p in cfg.space:
        if p.key not in leaves:
            near = difflib.get_close_matches(p.key, leaves, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(path, f"space.{p.key}", f"not a key of params.yaml{hint}")
        for value in p.edges():
            try:
                validate(with_overrides(params, {p.key: value}))
            except ParamsError as exc:
                raise _fail(path, f"space.{p.key}", f"{value!r} is outside what params.yaml "
                                                    f"accepts ({exc})") from None
    stages = dvc_yaml.get("stages") or {}
    unknown = [t for t in cfg.targets if t not in stages]
    if unknown:
        raise _fail(path, "targets", f"{unknown[0]!r} is not a stage of dvc.yaml")
    file = cfg.metric.rpartition(":")[0]
    writers = [n for n, s in stages.items() if file in _outputs(s)]
    if not writers:
        raise _fail(path, "metric", f"{file} is not written by any stage of dvc.yaml")
    if cfg.targets and not set(writers) & _upstream(stages, cfg.targets):
        raise _fail(path, "metric", f"{file} is written by stage {writers[0]}, which targets "
                                    f"{list(cfg.targets)} do not run; add it to targets")
    key = cfg.metric.rpartition(":")[2]
    if metric_data is not None and not _number(lookup(metric_data, key)):
        numbers = [k for k in _leaves(metric_data) if _number(lookup(metric_data, k))]
        near = difflib.get_close_matches(key, numbers, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise _fail(path, "metric", f"{file} has no number {key!r}{hint}")
