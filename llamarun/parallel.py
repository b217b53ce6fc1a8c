"""Tensor parallelism on torch.distributed: one process per device, each holding a slice.

A `TPPlan` says which part of every weight a rank holds, in Meta's split: the fused Q/K/V and
gate/up projections are column-parallel (the rank's query heads, its KV heads, its share of the
FFN), the output and down projections row-parallel followed by one all-reduce, and the embedding
and output layers vocab-parallel (a masked lookup summed across ranks; logits all-gathered).
KV heads fewer than ranks are replicated, as Meta does. `shard_model` is the pass that turns a
model built on the meta device into a rank's model; the loaders read only the rank's slices
(`TPPlan.slice_of`). Launch with torchrun (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llamarun.config import ModelArgs
from llamarun.errors import InvalidArgumentError
from llamarun.model import Linear, Transformer
from llamarun.scheduler import Stopped

COLLECTIVE_TIMEOUT_S = 120.0  # a rank that stops answering ends the job after this long
_local_rank = 0  # this process's LOCAL_RANK once init_group has run


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> list[int]:
    """World sizes that split this model: they divide the query heads and the FFN width, and
    divide the KV heads or are a multiple of them."""
    return [n for n in range(1, limit + 1)
            if args.n_heads % n == 0 and args.hidden_dim % n == 0
            and (args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0)]


@dataclass(frozen=True)
class TPPlan:
    """Which slice of each weight rank `rank` of `world` holds."""

    rank: int
    world: int
    heads: int  # query heads on this rank
    kv_heads: int  # KV heads on this rank
    kv_start: int  # its first KV head
    hidden: int  # FFN width on this rank
    vocab: int  # embedding/output rows on this rank (the whole vocabulary when not split)
    vocab_start: int
    head_dim: int

    @classmethod
    def make(cls, args: ModelArgs, rank: int, world: int) -> TPPlan:
        """The plan for one rank; InvalidArgumentError (saying which sizes work) if `world` does
        not split the model."""
        if world not in valid_world_sizes(args, limit=max(world, 1)):
            ok = ", ".join(map(str, valid_world_sizes(args)))
            raise InvalidArgumentError(
                f"{world} ranks cannot split this model ({args.n_heads} query heads, "
                f"{args.n_kv_heads} KV heads, FFN width {args.hidden_dim}); use one of: {ok}")
        heads = args.n_heads // world
        group = args.n_heads // args.n_kv_heads  # query heads per KV head
        kv_heads = max(1, args.n_kv_heads // world)
        kv_start = rank * heads // group if kv_heads == 1 else rank * kv_heads
        split_vocab = args.vocab_size % world == 0
        vocab = args.vocab_size // world if split_vocab else args.vocab_size
        return cls(rank=rank, world=world, heads=heads, kv_heads=kv_heads, kv_start=kv_start,
                   hidden=args.hidden_dim // world, vocab=vocab,
                   vocab_start=rank * vocab if split_vocab else 0, head_dim=args.head_dim)

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of checkpoint tensor `name` (Meta name, unfused) that this rank
        reads, or None for the whole tensor (norms)."""
        hd = self.head_dim
        key = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if key == "attention.wq.weight":
            return 0, self.rank * self.heads * hd, (self.rank + 1) * self.heads * hd
        if key in ("attention.wk.weight", "attention.wv.weight"):
            return 0, self.kv_start * hd, (self.kv_start + self.kv_heads) * hd
        if key == "attention.wo.weight":
            return 1, self.rank * self.heads * hd, (self.rank + 1) * self.heads * hd
        if key in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
            return 0, self.rank * self.hidden, (self.rank + 1) * self.hidden
        if key == "feed_forward.w2.weight":
            return 1, self.rank * self.hidden, (self.rank + 1) * self.hidden
        if key in ("tok_embeddings.weight", "output.weight"):
            return 0, self.vocab_start, self.vocab_start + self.vocab
        return None

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's slice of a tensor of `shape`."""
        cut = self.slice_of(name)
        if cut is None:
            return shape
        dim, start, stop = cut
        return tuple(stop - start if d == dim else n for d, n in enumerate(shape))


class Collectives:
    """A rank's communication: sum partial outputs, gather vocabulary slices. The loader binds
    the plan once the model's sizes are known."""

    def __init__(self, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self._plan: TPPlan | None = None
        self.timing = False  # when True, `seconds` adds up the time spent in collectives
        self.seconds = 0.0

    def bind(self, plan: TPPlan) -> None:
        """Use `plan` (this rank's slices) from now on."""
        self._plan = plan

    @property
    def plan(self) -> TPPlan:
        if self._plan is None:
            raise RuntimeError("no tensor-parallel plan yet: load a model with this rank first")
        return self._plan

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x across ranks (row-parallel outputs)."""
        timed = self.timing and not torch.compiler.is_compiling()
        start = _now(x) if timed else 0.0
        dist.all_reduce(x, group=self.group)
        if timed:
            self.seconds += _now(x) - start
        return x

    def embed(self, table: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of `tokens` from a vocab-parallel table: each rank looks up the ids it
        holds (zeros elsewhere), and the sum across ranks is every row."""
        local = tokens - self.plan.vocab_start
        mine = (local >= 0) & (local < self.plan.vocab)
        h = table(torch.where(mine, local, torch.zeros_like(local)))
        h = h * mine.unsqueeze(-1).to(h.dtype)
        return self.reduce(h)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits (..., vocab / world) joined along the vocabulary."""
        parts = [torch.empty_like(logits) for _ in range(self.plan.world)]
        timed = self.timing and not torch.compiler.is_compiling()
        start = _now(logits) if timed else 0.0
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        if timed:
            self.seconds += _now(logits) - start
        return torch.cat(parts, dim=-1)


def _now(x: torch.Tensor) -> float:
    """The time, after the work queued on x's device (for timing collectives)."""
    import time

    from llamarun.device import synchronize

    synchronize(x.device)
    return time.perf_counter()


class _Replicated:
    """A vocabulary held whole by every rank (a size the world does not divide)."""

    def embed(self, table: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return table(tokens)

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def shard_model(model: Transformer, plan: TPPlan, comm: Collectives) -> Transformer:
    """Turn a model built on the meta device into rank `plan.rank`'s part of it (in place):
    local-sized projections, attention over the rank's heads, and the collectives after the
    row-parallel products and around the vocabulary."""
    args = model.args
    dim = args.dim
    hd = plan.head_dim
    for layer in model.layers:
        attn = layer.attention
        attn.n_heads, attn.n_kv_heads = plan.heads, plan.kv_heads
        attn.wqkv = Linear(dim, (plan.heads + 2 * plan.kv_heads) * hd)
        attn.wo = Linear(plan.heads * hd, dim)
        attn.reduce = comm.reduce
        ffn = layer.feed_forward
        ffn.w13 = Linear(dim, 2 * plan.hidden)
        ffn.w2 = Linear(plan.hidden, dim)
        ffn.reduce = comm.reduce
    if plan.vocab != args.vocab_size:
        model.tok_embeddings = nn.Embedding(plan.vocab, dim)
        model.output = Linear(dim, plan.vocab)
        model.vocab = comm
    else:
        model.vocab = _Replicated()
    # model.args keeps the whole model's sizes: what it computes (all the logits) is unchanged.
    return model


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int


def from_env(env: Mapping[str, str]) -> Distributed | None:
    """The job torchrun describes in `env` (RANK, WORLD_SIZE, LOCAL_RANK), or None outside one
    (or in a job of one process)."""
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InvalidArgumentError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InvalidArgumentError(f"RANK {rank} is not in 0..{world - 1}")
    return Distributed(rank, world, local)


def init_group(job: Distributed, *, cuda: bool, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Join the job's process group: gloo for CPU tensors, and NCCL for CUDA ones where there
    are GPUs. A collective that waits longer than timeout_s (a rank died or hangs) fails."""
    global _local_rank
    _local_rank = job.local_rank
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=job.rank, world_size=job.world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def rank_device(job: Distributed, device: torch.device) -> torch.device:
    """This rank's device: on CUDA one GPU per process, chosen by LOCAL_RANK."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if job.local_rank >= count:
        raise InvalidArgumentError(f"rank {job.rank} needs GPU {job.local_rank} but this machine "
                                   f"has {count}: use at most {count} processes per node")
    device = torch.device("cuda", job.local_rank)
    torch.cuda.set_device(device)
    return device


def current() -> Distributed | None:
    """This process's job, once init_group has run (None otherwise)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return Distributed(dist.get_rank(), dist.get_world_size(), _local_rank)



def broadcast_object(obj: object, src: int = 0, group: Any = None) -> object:
    """`obj` from rank `src` on every rank (prompts, chat lines, seeds)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def control_group() -> Any:
    """A gloo group for messages that may be long in coming (a server's next request): its
    collectives wait days, not COLLECTIVE_TIMEOUT_S. Every rank must call it, in the same order."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))


def gather_object(obj: object) -> list[object]:
    """`obj` from every rank, on every rank."""
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def torchrun_command(n: int, argv: list[str]) -> list[str]:
    """The command that runs `llamarun ARGV` on n ranks of this host with torchrun."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
            "--standalone", "-m", "llamarun", *argv]


class PeerLost(Stopped):
    """A collective failed because another rank went away or stopped answering: the job cannot
    go on (a server answers 503 and stops)."""


LOST_MESSAGE = ("the server lost contact with another rank of its tensor-parallel job and is "
                "stopping")


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank went away or stopped answering
    (gloo's "Connection closed by peer", a timeout), rather than this rank's own problem."""
    if isinstance(e, (dist.DistError, PeerLost)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "gloo", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "Timed out", "timed out"))


class LeaderRunner:
    """Rank 0's runner in a tensor-parallel server: every forward pass it runs is first sent to
    the other ranks (see follow), so that they run the same ones with it, on slots kept in the
    same state through their own cache managers.

    A pass whose collectives fail because a rank went away raises PeerLost, as does every pass
    after it (none goes into the broken group again); `lost` keeps the collective's error and
    `on_lost(PeerLost)` is called once, from the thread that ran the pass, so that the server
    can stop.
    """

    def __init__(self, runner: Any, group: Any, *,
                 on_lost: Callable[[PeerLost], None] | None = None) -> None:
        self._runner = runner
        self._group = group
        self.device = runner.device
        self.cache = runner.cache
        self.on_lost = on_lost
        self.lost: BaseException | None = None

    @property
    def max_seq_len(self) -> int:
        return self._runner.max_seq_len

    @property
    def compiled_ready(self) -> bool:
        return self._runner.compiled_ready

    def run(self, writes: Sequence[Any], *, compiled: bool = False) -> torch.Tensor:
        if self.lost is not None:
            raise PeerLost(LOST_MESSAGE) from self.lost
        message = ("run", [(w.slot.index, len(w.slot.ids), list(w.ids), w.logits) for w in writes],
                   compiled)
        try:
            broadcast_object(message, group=self._group)
            return self._runner.run(writes, compiled=compiled)
        except Exception as e:
            if not is_peer_failure(e):
                raise
            self.lost = e
            lost = PeerLost(LOST_MESSAGE)
            if self.on_lost is not None:
                self.on_lost(lost)
            raise lost from e

    def close(self) -> None:
        """Let the other ranks' follow() return (nothing to tell once the group broke)."""
        if self.lost is None:
            broadcast_object(("stop",), group=self._group)


def follow(runner: Any, group: Any) -> None:
    """On ranks other than 0 of a tensor-parallel server: run the passes rank 0's LeaderRunner
    sends, on this rank's slots (cut back to what the leader's held first), until it closes."""
    from llamarun.runner import Write

    cache = runner.cache
    while True:
        message = broadcast_object(None, group=group)
        if message[0] == "stop":  # type: ignore[index]
            return
        _, entries, compiled = message  # type: ignore[misc]
        writes = []
        for index, kept, ids, logits in entries:
            slot = cache.slots[index]
            cache.truncate(slot, kept)
            writes.append(Write(slot, ids, tuple(logits)))
        runner.run(writes, compiled=compiled)
