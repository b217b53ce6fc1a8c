"""Tensor-parallel runs from the CLI: `--tp N` checks N against the model and the machine, then
launches torchrun's agent; ranks join the group, rank 0 alone reads input (and prints), and
every rank sees what it read. A rank that fails ends the job with one line naming it."""

from __future__ import annotations

import atexit
import logging
import os
import random
import signal
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from llamarun.cli import console
from llamarun.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from llamarun.cli.options import ModelOptions
    from llamarun.loaders.fuse import RawCheckpoint
    from llamarun.parallel import TPPlan

T = TypeVar("T")
_CHILD = "LLAMARUN_TP_LAUNCHED"  # set for the ranks that `--tp` starts
TIMEOUT_ENV_VAR = "LLAMARUN_TP_TIMEOUT"
# A rank whose collective failed because another rank went away exits with this status, so that
# the launcher can tell the rank that failed first from those it took down with it.
PEER_LOST = 75
# Host memory a rank takes beyond its share of the model: Python, torch and llamarun imported
# (about 230 MiB measured with torch 2.13), gloo's buffers.
PROCESS_BYTES = 256 << 20


class LaunchRanks(BaseException):
    """The command's flags and `--tp N` were checked: start the N ranks (raised through the
    command, caught by cli.main)."""


_planned: int | None = None  # `--tp N` given to this process (the launcher)


def plan(n: int) -> None:
    """Make this process the launcher of an n-rank job: the next model command checks its flags
    and n, then raises LaunchRanks instead of running."""
    global _planned
    _planned = n


def before_launch(opts: ModelOptions) -> None:
    """In the launcher: check `--tp N` against the model and this machine, then raise
    LaunchRanks. Elsewhere: nothing."""
    if _planned is None:
        return
    tp_timeout(os.environ)  # every rank reads it: a bad value is one line here, not n
    check_world(_planned, opts)
    raise LaunchRanks


def check_world(n: int, opts: ModelOptions, *, available: int | None = None) -> None:
    """Raise InvalidArgumentError unless n ranks split the model (its query and KV heads and
    FFN width) and this host can hold them: a GPU each on CUDA, a core each and the memory of
    all n on CPU. `available` overrides the measured free host memory (tests)."""
    from llamarun.device import resolve_device
    from llamarun.loaders import read_checkpoint
    from llamarun.parallel import TPPlan
    from llamarun.resolve import resolve_model

    from llamarun.cli.options import usable_cores

    resolved = resolve_model(opts.model, env=os.environ, cwd=Path.cwd())
    raw = read_checkpoint(resolved.path)
    shard = TPPlan.make(raw.args, 0, n)  # says which sizes work when n does not
    device = resolve_device(opts.device)
    if device.type == "cuda":
        import torch

        count = torch.cuda.device_count()
        if n > count:
            raise InvalidArgumentError(f"--tp {n} needs {n} GPUs (one per process); this machine "
                                       f"has {count}")
        return
    cores = usable_cores()
    if n > cores:
        raise InvalidArgumentError(f"--tp {n} needs a CPU core per process; this process may use "
                                   f"{cores}")
    per_rank = _rank_bytes(raw, shard, opts, device) + PROCESS_BYTES
    if available is None:
        from llamarun.preflight import available_bytes

        available = available_bytes(device)
    if available is not None and n * per_rank > available:
        from llamarun.preflight import gib

        raise InvalidArgumentError(
            f"--tp {n} needs about {gib(n * per_rank)} of memory ({n} processes of "
            f"{gib(per_rank)}, Python and torch included), {gib(available)} available; "
            "use fewer processes")


def _rank_bytes(raw: RawCheckpoint, shard: TPPlan, opts: ModelOptions,
                device: torch.device) -> int:
    """Bytes of one rank's share of the model (weights as planned, KV cache, RoPE table), as
    the loader's own check will count them."""
    from llamarun.device import resolve_dtype
    from llamarun.loaders import DEFAULT_MAX_SEQ_LEN
    from llamarun.loaders.fuse import FLOAT_TYPES, plan_formats
    from llamarun.preflight import memory_need

    formats = plan_formats(raw, opts.quantize, opts.group_size, shard=shard)
    stored = None
    if raw.args.n_layers and formats["layers.0.attention.wqkv.weight"].kind == "dense":
        stored = FLOAT_TYPES.get(raw.stored_type("layers.0.attention.wq.weight"))
    dtype = resolve_dtype(opts.dtype, device, stored=stored)
    seq = opts.max_seq_len or min(raw.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    return memory_need(raw.args, device=device, dtype=dtype, max_seq_len=seq, formats=formats,
                       world=shard.world).total


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
            if n > 1 and os.environ.get("WORLD_SIZE") not in (None, "1"):
                _usage("--tp inside a torchrun job: give the number of processes to torchrun "
                       "instead")
            return (None if n == 1 else n), rest
    return None, argv


def _usage(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def launch(n: int, argv: list[str]) -> int:
    """Run `llamarun ARGV` on n processes of this host under torchrun's agent (rendezvous on a
    free loopback port); return the job's exit status.

    Rank 0 prints as usual; the other ranks' stderr is kept apart and shown only when they
    failed on their own (an error every rank hits is printed once, by rank 0). A rank that
    died (killed, crashed, or exited without a message) is named in one line.
    """
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
            message, status = failure_report(codes, _rank_logs(logs))
            if message:
                sys.stderr.write(message + "\n")
            return status
        except (KeyboardInterrupt, SignalException) as e:  # Ctrl-C or SIGTERM to the launcher
            signum = getattr(e, "sigval", 2)
            return 128 + int(signum)
    return 0


def failure_report(codes: Mapping[int, int], logs: Mapping[int, str]) -> tuple[str, int]:
    """(What to print, the job's exit status) for the ranks that failed: `codes` are their exit
    statuses (negative: the signal that killed them), `logs` the stderr of ranks 1 and up.

    The rank that failed first is the one that neither lost contact with another rank
    (PEER_LOST) nor was stopped by the agent (SIGTERM) once another had failed. Rank 0 prints
    its own error; another rank's error lines are shown once; a rank that was killed, crashed
    or ended without a message is named with what happened.
    """
    term = int(signal.SIGTERM)
    followers = {PEER_LOST, 128 + term, -term}
    first = {r: c for r, c in sorted(codes.items()) if c not in followers}
    if not first:
        return ("error: the ranks lost contact with each other (one stopped answering for "
                f"${TIMEOUT_ENV_VAR} seconds, or its connection broke)", 1)
    if first.get(0, 0) > 0:  # rank 0 failed by itself and has said why
        return "", first[0]
    lines: list[str] = []
    status = 0
    for rank, code in first.items():
        if code < 0:
            lines.append(f"error: rank {rank} was {_signal_text(-code)}; the job stopped")
            status = status or 128 - code
            continue
        own = [line for line in logs.get(rank, "").splitlines() if line.startswith("error:")]
        if own:
            lines += [line for line in own if line not in lines]
        else:
            tail = [line.strip() for line in logs.get(rank, "").splitlines() if line.strip()]
            said = f": {tail[-1][:300]}" if tail else " without a message"
            lines.append(f"error: rank {rank} exited with status {code}{said}; the job stopped")
        status = status or code
    from llamarun.errors import clean_message

    return "\n".join(clean_message(line) for line in lines), status or 1


def _signal_text(signum: int) -> str:
    """`killed by SIGKILL (...)` / `stopped by SIGSEGV (a crash)`."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:
        return f"killed by {name} (by a user, or by the system when memory ran out)"
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        return f"stopped by {name} (a crash)"
    return f"killed by {name}"


def _rank_logs(logs: str) -> dict[int, str]:
    """The stderr each rank from 1 on wrote (torchrun's agent keeps it under logs/.../N/)."""
    out: dict[int, str] = {}
    for path in Path(logs).rglob("stderr.log"):
        try:
            rank = int(path.parent.name)
            out[rank] = path.read_text(errors="replace")
        except (ValueError, OSError):
            continue
    return out


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

    timeout = tp_timeout(os.environ)
    init_group(job, cuda=torch.cuda.is_available(), timeout_s=timeout)
    console.set_rank(job.rank)
    global _joined
    _joined = True
    atexit.register(leave)


_joined = False


def tp_timeout(env: Mapping[str, str]) -> float:
    """$LLAMARUN_TP_TIMEOUT: seconds a rank waits for the others (default 120)."""
    text = env.get(TIMEOUT_ENV_VAR, "").strip()
    if not text:
        return 120.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 30 * 86400:  # NaN fails too
        _usage(f"{TIMEOUT_ENV_VAR} must be a number of seconds from 1 to 2592000 (30 days), "
               f"got {text!r}")
    return value


def joined() -> bool:
    """Whether this process is a rank of a tensor-parallel job."""
    return _joined


def stopped_by_launcher() -> bool:
    """Whether a SIGTERM here most likely comes from the launcher ending the job because another
    rank failed (`--tp` says why itself; other ranks than 0 stay quiet anyway)."""
    return _joined and (console.rank != 0 or os.environ.get(_CHILD) == "1")


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank went away or stopped answering
    (parallel.is_peer_failure), rather than this rank's own problem."""
    from llamarun.parallel import is_peer_failure as check

    return check(e)


def peer_lost(e: BaseException) -> None:
    """Report a lost peer in one line, unless `--tp`'s launcher will name the rank that failed
    (it knows which; this rank only saw its connection break)."""
    if os.environ.get(_CHILD) == "1":
        return
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    first = first.split("] ", 1)[-1]  # gloo's "[../gloo/transport/tcp/pair.cc:534] " prefix
    first = first.split(". ", 1)[0]  # its first sentence ("Read error ...: Connection reset")
    console.error(f"lost contact with another rank ({first[:200]}); the job cannot go on")


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
