"""Running one stage script as several processes under ``accelerate launch``.

dvc.yaml keeps one fixed command per stage. A stage that should run data-parallel
(``train.launcher: accelerate`` with ``train.num_processes``, or ``eval.num_processes``)
calls :func:`relaunch`: it starts that many copies of the same script through accelerate's
own launcher (``accelerate.commands.launch``: the parser and ``launch_command`` behind the
``accelerate launch`` CLI) and waits; the copies see :data:`LAUNCHED_ENV`
(:func:`inside_launch`) and do the work. A rank that fails becomes ONE line naming it
(:class:`LaunchError`), and the launcher stops the others instead of leaving them to hang.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAUNCHED_ENV = "REPROTUNE_LAUNCHED"  # set for the processes accelerate starts
DDP_CONFIG = "configs/accelerate/ddp.yaml"  # plain data parallelism (also evaluation's)


class LaunchError(RuntimeError):
    """A multi-process run failed; the message is one line naming the rank and the cause."""


def inside_launch() -> bool:
    """Whether this process was started by a launcher (ours, accelerate's or torchrun)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def available_devices() -> tuple[int, str]:
    """How many processes this machine can give a device: its GPUs, else its CPU cores."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPU(s)"
    from reprotune.runtime import usable_cpus

    return usable_cpus(), "CPU core(s) (no CUDA GPU)"


def free_port() -> int:
    """A TCP port free right now on this machine, for the processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_args(plan: dict[str, Any], script: str | Path, argv: list[str],
                port: int | None = None) -> list[str]:
    """The ``accelerate launch`` arguments for ``plan`` (what :func:`relaunch` runs)."""
    return ["--config_file", plan["config"], "--num_processes", str(plan["num_processes"]),
            "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", str(port or free_port()),
            # precision is train.precision's: the config must not switch autocast on behind it
            "--mixed_precision", plan["mixed_precision"], "--dynamo_backend", "no",
            str(script), *argv]


def _failure_line(exc: BaseException, n: int, role: str = "training") -> str:
    """One line for torch elastic's ChildFailedError, naming the rank that caused it.

    When one rank dies, its peers fail on the broken connection and the launcher stops the
    rest with SIGTERM; so the cause is a rank killed by another signal (SIGKILL, a crash),
    else one that exited with an error, else the first stopped.
    """
    import signal

    failures = getattr(exc, "failures", None) or {}
    if not failures:
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"

    def cause(item: tuple[int, Any]) -> tuple[int, float, int]:
        r, f = item
        code = f.exitcode if f.exitcode is not None else 1
        rank_of_kind = 0 if code < 0 and -code != signal.SIGTERM else 1 if code > 0 else 2
        return rank_of_kind, f.timestamp, r

    r, f = min(failures.items(), key=cause)
    code = f.exitcode
    how = f"was killed by signal {f.signal_name()}" if code is not None and code < 0 else \
        f"exited with code {code}"
    rerun = ("rerun to resume from the last checkpoint" if role == "training"
             else "rerun the stage")
    return (f"{role} process rank {r} of {n} (pid {f.pid}) {how}; the launcher stopped the "
            f"other rank(s) (see rank {r}'s error above, if any); {rerun}")


def relaunch(plan: dict[str, Any], script: str | Path, argv: list[str],
             role: str = "training") -> None:
    """Run ``script argv`` in ``plan['num_processes']`` processes and wait for them.

    Raises :class:`LaunchError` with one line when a process fails.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(launch_args(plan, script, argv))
    os.environ[LAUNCHED_ENV] = "1"  # the started processes train instead of relaunching
    log.info("%s: accelerate, %d processes, %s (%s), %s", role, plan["num_processes"],
             plan["kind"], plan["config"], plan["precision"])
    try:
        launch_command(args)
    except subprocess.CalledProcessError as exc:  # accelerate's one-process launcher
        raise LaunchError(f"the {role} process failed (exit code {exc.returncode}); see "
                              f"its error above") from None
    except ChildFailedError as exc:  # torch elastic's launcher: it names the failed ranks
        raise LaunchError(_failure_line(exc, plan["num_processes"], role)) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    sys.stdout.flush()
