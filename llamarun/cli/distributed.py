"""Tensor-parallel runs from the CLI: `--tp N` launches torchrun's agent, ranks join the group,
rank 0 alone reads input (and prints), and every rank sees what it read."""

from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import uuid
from collections.abc import Callable
from typing import TypeVar

from llamarun.cli import console
from llamarun.errors import InvalidArgumentError

T = TypeVar("T")
_CHILD = "LLAMARUN_TP_LAUNCHED"  # set for the ranks that `--tp` starts


def take_tp_flag(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N, the other arguments) for `--tp N` / `--tp=N` anywhere in argv; (None, argv) without.
    `--tp 1` runs in this process."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--tp":
            if i + 1 >= len(argv):
                _usage("--tp needs a number of processes")
            value, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        elif arg.startswith("--tp="):
            value, rest = arg[5:], argv[:i] + argv[i + 1:]
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                _usage(f"--tp must be an integer at least 1, got {value!r}")
            n = int(value)
            return (None if n == 1 else n), rest
    return None, argv


def _usage(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def launch(n: int, argv: list[str]) -> int:
    """Run `llamarun ARGV` on n processes of this host under torchrun's agent (rendezvous on a
    free loopback port); return the job's exit status (the first failed rank's).

    Rank 0 prints as usual; the other ranks' stderr is kept apart and shown only when they
    failed on their own (an error every rank hits is printed once, by rank 0).
    """
    if os.environ.get("WORLD_SIZE") not in (None, "1"):
        _usage("--tp inside a torchrun job: give the number of processes to torchrun instead")
    import tempfile

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the agent's own notes are noise here
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[_CHILD] = "1"  # the ranks inherit it
    with tempfile.TemporaryDirectory(prefix="llamarun-tp-") as logs:
        specs = DefaultLogsSpecs(log_dir=logs, redirects={r: Std.ERR for r in range(1, n)})
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, logs_specs=specs,
                              run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                              rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
        try:
            elastic_launch(config, sys.executable)("-m", "llamarun", *argv)
        except ChildFailedError as e:
            codes = {rank: f.exitcode for rank, f in e.failures.items()}
            if codes.get(0, 0) in (0, 143) or codes.get(0, 0) < 0:
                # rank 0 did not fail by itself (it was stopped): say why the others did
                _show_rank_errors(logs)
            return next((c for c in codes.values() if c > 0), 1)
        except (KeyboardInterrupt, SignalException) as e:  # Ctrl-C or SIGTERM to the launcher
            signum = getattr(e, "sigval", 2)
            return 128 + int(signum)
    return 0


def _show_rank_errors(logs: str) -> None:
    from pathlib import Path

    seen: set[str] = set()
    for path in sorted(Path(logs).rglob("stderr.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("error:") and line not in seen:
                seen.add(line)
                sys.stderr.write(line + "\n")


def join_job() -> None:
    """In a process started by torchrun (WORLD_SIZE > 1), join the process group and make
    ranks other than 0 quiet."""
    from llamarun.parallel import from_env, init_group

    try:
        job = from_env(os.environ)
    except InvalidArgumentError as e:
        _usage(str(e))
        return
    if job is None:
        return
    import torch

    timeout = float(os.environ.get("LLAMARUN_TP_TIMEOUT", "120"))
    init_group(job, cuda=torch.cuda.is_available(), timeout_s=timeout)
    console.set_rank(job.rank)
    global _joined
    _joined = True
    atexit.register(leave)


_joined = False


def joined() -> bool:
    """Whether this process is a rank of a tensor-parallel job."""
    return _joined


def stopped_by_launcher() -> bool:
    """Whether a SIGTERM here most likely comes from the launcher ending the job because another
    rank failed (`--tp` says why itself; other ranks than 0 stay quiet anyway)."""
    return _joined and (console.rank != 0 or os.environ.get(_CHILD) == "1")


def leave() -> None:
    """Leave the process group before the interpreter tears down (without this, gloo can
    abort a rank on its way out)."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (exiting anyway)
        pass


def rank0(read: Callable[[], T]) -> T:
    """`read()` on rank 0, its result (or its EOFError / KeyboardInterrupt / error) on every
    rank; just `read()` outside a job."""
    from llamarun.parallel import broadcast_object, current

    job = current()
    if job is None:
        return read()
    box: tuple[str, object] = ("ok", None)
    if job.rank == 0:
        try:
            box = ("ok", read())
        except (EOFError, KeyboardInterrupt) as e:
            box = ("raise", type(e).__name__)
        except Exception as e:  # noqa: BLE001 (re-raised on every rank)
            box = ("error", e)
    kind, value = broadcast_object(box)  # type: ignore[misc]
    if kind == "raise":
        raise EOFError if value == "EOFError" else KeyboardInterrupt
    if kind == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def shared_seed(seed: int | None) -> int | None:
    """In a job, a seed every rank shares (rank 0's draw when none was given), so that all
    ranks sample the same tokens."""
    from llamarun.parallel import current

    if current() is None or seed is not None:
        return seed
    return rank0(lambda: random.SystemRandom().randrange(2**63))
