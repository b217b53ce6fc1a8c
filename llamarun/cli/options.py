"""The model and sampling flags, declared once for every command and checked once.

`@model_command(...)` gives a command the model flags (and, with `sampling=True`, the sampling
flags) and hands it one `ModelOptions` (and one `SamplingFlags`) instead of a dozen parameters.
Before the command's body runs, the wrapper sets up logging, checks every flag it added (so a bad
value is the only line printed, before a model is chosen), and, under `--tp N`, checks N against
the model and the machine before any process is started. The body runs inside `cli_errors`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llamarun.cli import console, settings
from llamarun.errors import InvalidArgumentError
from llamarun.resolve import ENV_VAR

COMPILE_ENV_VAR = "LLAMARUN_COMPILE"
MODEL_PANEL = "Model"
SAMPLING_PANEL = "Sampling"
SPEC_PANEL = "Speculative decoding"
_DEFAULTS = settings.DEFAULT_SAMPLING
_FROM_MODEL = "or the model's generation_config.json"


@dataclass(frozen=True)
class ModelOptions:
    """The model flags every command takes."""

    model: str | Path | None
    device: str = "auto"
    dtype: str = "auto"
    max_seq_len: int | None = None
    compile: bool | None = None  # None: in the background where that works, else not
    verbose: bool = False
    quantize: str = "auto"
    group_size: int = 32
    threads: int | None = None  # None: default_threads()


@dataclass(frozen=True)
class SamplingFlags:
    """The sampling flags as given (None: not given, so a saved chat's or the model's default
    applies)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def given(self) -> dict[str, object]:
        """The settings by their `/set` names (None where not given), as model_sampling takes."""
        return {name: getattr(self, name) for name in settings.SETTINGS}


@dataclass(frozen=True)
class SpecOptions:
    """The speculative-decoding flags (none given: plain decoding)."""

    draft_model: str | None = None
    draft_tokens: int | None = None
    lookup: int | None = None

    @property
    def enabled(self) -> bool:
        return self.draft_model is not None or self.lookup is not None

    def config(self) -> Any:
        """The speculative.SpecConfig these flags ask for (checks them)."""
        from llamarun.speculative import DEFAULT_DRAFT_TOKENS, SpecConfig

        if self.draft_model is not None and self.lookup is not None:
            raise InvalidArgumentError("give --draft-model or --lookup, not both")
        if self.draft_tokens is not None and not self.enabled:
            raise InvalidArgumentError("--draft-tokens needs --draft-model or --lookup")
        return SpecConfig(draft_tokens=self.draft_tokens or DEFAULT_DRAFT_TOKENS,
                          lookup=self.lookup)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- the declarations ----------------------------------------------------------------------

def _opt(*decls: str, panel: str, **kw: Any) -> Any:
    return typer.Option(*decls, rich_help_panel=panel, **kw)


_MODEL_PARAMS: list[tuple[str, Any, object]] = [  # (name, annotation, default)
    ("model", Annotated[Optional[str], _opt(
        "--model", "-m", metavar="PATH|REPO", show_default=False, panel=MODEL_PANEL,
        help=f"Meta or HF checkpoint folder, a GGUF file, or a Hugging Face repo id (ORG/NAME) "
             f"in the local HF cache (default: ${ENV_VAR}, else the single checkpoint under "
             "./checkpoints/, else the embedded default model; `llamarun list` shows them all)")],
     None),
    ("device", Annotated[str, _opt(
        "--device", metavar="DEVICE", panel=MODEL_PANEL, help="auto, cpu, cuda or cuda:N")],
     "auto"),
    ("dtype", Annotated[str, _opt(
        "--dtype", metavar="DTYPE", panel=MODEL_PANEL,
        help="auto, float32, bfloat16 or float16. auto: on CPU the stored precision (float16 "
             "becomes bfloat16; quantized weights compute in bfloat16 where the CPU has native "
             "bf16, else float32); bfloat16 on CUDA")], "auto"),
    ("quantize", Annotated[str, _opt(
        "--quantize", metavar="MODE", panel=MODEL_PANEL,
        help="Weight storage: auto (keep a GGUF's quantized tensors quantized, dense ones dense), "
             "none (dequantize everything into --dtype), int8 (per channel) or int4 (groupwise); "
             "int8/int4 on an already quantized file re-quantize its dequantized weights")],
     "auto"),
    ("group_size", Annotated[int, _opt(
        "--group-size", metavar="N", panel=MODEL_PANEL, help="int4 group size: 32, 64 or 128")],
     32),
    ("max_seq_len", Annotated[Optional[int], _opt(
        "--max-seq-len", metavar="N", show_default=False, panel=MODEL_PANEL,
        help="KV cache length in tokens (default: the model's context, at most 4096)")], None),
    ("threads", Annotated[Optional[int], _opt(
        "--threads", metavar="N", show_default=False, panel=MODEL_PANEL,
        help="CPU threads for the model's work (default: $OMP_NUM_THREADS, else the cores this "
             f"process may use ({usable_cores()}), shared among the ranks of a --tp job)")],
     None),
    ("compile", Annotated[Optional[bool], _opt(
        "--compile/--no-compile", envvar=COMPILE_ENV_VAR, show_default=False, panel=MODEL_PANEL,
        help="torch.compile the decode step. Default: chat and serve compile it in the "
             "background while replies start at once, and it takes over between replies "
             "(cached for later runs), except on CPUs where llamarun's fused kernels run the "
             "whole eager step (faster there); other commands stay eager. --compile: compile "
             "before the first reply; --no-compile: never")], None),
    ("verbose", Annotated[bool, _opt(
        "--verbose", "-v", panel=MODEL_PANEL, help="Debug logging, and tracebacks on errors")],
     False),
]


def _sampling_params(max_tokens: int) -> list[tuple[str, Any, object]]:
    return [
        ("max_tokens", Annotated[Optional[int], _opt(
            "--max-tokens", "-n", metavar="N", show_default=False, panel=SAMPLING_PANEL,
            help=f"Most tokens to generate (default {max_tokens})")], None),
        ("temperature", Annotated[Optional[float], _opt(
            "--temperature", "-t", metavar="T", show_default=False, panel=SAMPLING_PANEL,
            help=f"0 = greedy (deterministic); default {_DEFAULTS.temperature}, {_FROM_MODEL}")],
         None),
        ("top_k", Annotated[Optional[int], _opt(
            "--top-k", metavar="K", show_default=False, panel=SAMPLING_PANEL,
            help=f"Keep the k most likely tokens (0 = off); default {_DEFAULTS.top_k}, "
                 f"{_FROM_MODEL}")], None),
        ("top_p", Annotated[Optional[float], _opt(
            "--top-p", metavar="P", show_default=False, panel=SAMPLING_PANEL,
            help="Keep the most likely tokens up to this probability mass (1 = off); default "
                 f"{_DEFAULTS.top_p}, {_FROM_MODEL}")], None),
        ("min_p", Annotated[Optional[float], _opt(
            "--min-p", metavar="P", show_default=False, panel=SAMPLING_PANEL,
            help="Drop tokens less likely than this fraction of the top token (0 = off); "
                 f"default {_DEFAULTS.min_p}, {_FROM_MODEL}")], None),
        ("repeat_penalty", Annotated[Optional[float], _opt(
            "--repeat-penalty", metavar="X", show_default=False, panel=SAMPLING_PANEL,
            help=f"Penalise tokens seen in the last {_DEFAULTS.repeat_last_n} (1 = off); "
                 f"default {_DEFAULTS.repeat_penalty}, {_FROM_MODEL}")], None),
        ("seed", Annotated[Optional[int], _opt(
            "--seed", "-s", metavar="N", show_default=False, panel=SAMPLING_PANEL,
            help="Seed for a reproducible sampled output (default: a fresh one each run)")],
         None),
        ("stop", Annotated[Optional[list[str]], _opt(
            "--stop", metavar="TEXT", show_default=False, panel=SAMPLING_PANEL,
            help="Stop when this text appears (not printed); repeatable (default: none)")],
         None),
    ]


def _spec_params() -> list[tuple[str, Any, object]]:
    from llamarun.speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, MAX_LOOKUP_NGRAM

    return [
        ("draft_model", Annotated[Optional[str], _opt(
            "--draft-model", metavar="PATH|REPO", show_default=False, panel=SPEC_PANEL,
            help="Decode speculatively: this smaller model (or the same one stored smaller, "
                 "e.g. int4) drafts tokens that the model checks several at a time; it must "
                 "share the model's vocabulary. Greedy output stays the same token for token "
                 "(default: plain decoding)")],
         None),
        ("lookup", Annotated[Optional[int], _opt(
            "--lookup", metavar="N", show_default=False, panel=SPEC_PANEL,
            help="Decode speculatively without a second model: drafts continue the latest "
                 "earlier match of the text's last n-gram (n up to N, at most "
                 f"{MAX_LOOKUP_NGRAM}; 3 is a good start). Fast where the output repeats its "
                 "input (rewriting, summaries, code edits); default: off")], None),
        ("draft_tokens", Annotated[Optional[int], _opt(
            "--draft-tokens", metavar="K", show_default=False, panel=SPEC_PANEL,
            help=f"Most tokens drafted a step (1-{MAX_DRAFT_TOKENS}, default "
                 f"{DEFAULT_DRAFT_TOKENS}); each request adapts it to what it gets accepted")],
         None),
    ]


# For commands that load no model (`list`): the same flag, outside the Model panel.
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, and tracebacks on errors")]


# --- the decorator -------------------------------------------------------------------------

def model_command(*, sampling: bool = False, compile: bool = True, speculative: bool = False,
                  max_tokens: int = 256) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the model flags (`--compile` only with compile=True), with
    sampling=True the sampling flags (`-n` defaulting to max_tokens), and with speculative=True
    the speculative-decoding flags.

    The command takes `opts: ModelOptions` (and `flags: SamplingFlags`, `spec: SpecOptions`)
    in their place.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())
        own = [p for p in own if p.name not in ("opts", "flags", "spec")]
        added = [(n, a, d) for n, a, d in _MODEL_PARAMS if compile or n != "compile"]
        if sampling:
            added = _sampling_params(max_tokens) + added
        if speculative:
            added = added + _spec_params()
        names = {n for n, _, _ in added}
        clash = names & {p.name for p in own}
        if clash:  # a programming error, caught by the help tests
            raise TypeError(f"{fn.__name__} declares shared options itself: {sorted(clash)}")

        def command(**kwargs: Any) -> Any:
            shared = {n: kwargs.pop(n) for n in names}
            opts = ModelOptions(
                model=shared["model"], device=shared["device"], dtype=shared["dtype"],
                max_seq_len=shared["max_seq_len"], compile=shared.get("compile", False),
                verbose=shared["verbose"], quantize=shared["quantize"],
                group_size=shared["group_size"], threads=shared["threads"])
            if sampling:
                kwargs["flags"] = SamplingFlags(**{
                    n: shared[n] for n in ("max_tokens", "temperature", "top_k", "top_p",
                                           "min_p", "repeat_penalty", "seed")},
                    stop=tuple(shared["stop"] or ()))
            if speculative:
                kwargs["spec"] = SpecOptions(shared["draft_model"], shared["draft_tokens"],
                                             shared["lookup"])
            from llamarun.cli import distributed
            from llamarun.cli.common import check_model_options, cli_errors, utf8_text

            import torch

            threads = torch.get_num_threads()  # put back after the command (in-process callers)
            console.setup_logging(opts.verbose)
            with cli_errors(opts.verbose), _restore_threads(threads):
                if sampling:
                    flags: SamplingFlags = kwargs["flags"]
                    settings.check_flags(flags.given())
                    kwargs["flags"] = SamplingFlags(**{
                        **{n: getattr(flags, n) for n in settings.SETTINGS},
                        "stop": tuple(utf8_text(s, "--stop") for s in flags.stop)})
                check_model_options(opts)
                if speculative:
                    spec: SpecOptions = kwargs["spec"]
                    spec.config()
                    if spec.draft_model is not None and distributed._planned is not None:
                        raise InvalidArgumentError("--draft-model cannot be combined with --tp "
                                                   "(--lookup N can)")
                distributed.before_launch(opts)  # --tp N: checked here, then the ranks start
                return fn(**kwargs, opts=opts)

        params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
                  for n, a, d in added]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature([*own, *params])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in [*own, *params]}
        command.__name__, command.__qualname__ = fn.__name__, fn.__qualname__
        command.__doc__, command.__module__ = fn.__doc__, fn.__module__
        return command

    return decorate


@contextmanager
def _restore_threads(n: int) -> Iterator[None]:
    try:
        yield
    finally:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


# --- threads -------------------------------------------------------------------------------

def default_threads(env: Mapping[str, str]) -> int:
    """$OMP_NUM_THREADS (its first value), else the usable cores, divided among the ranks a
    tensor-parallel job runs on this host."""
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise InvalidArgumentError(
                f"OMP_NUM_THREADS must be a positive integer, got {omp!r} (or give --threads N)")
        return int(first)
    local = env.get("LOCAL_WORLD_SIZE", "").strip() or "1"  # set by torchrun
    if not local.isdigit() or int(local) < 1:
        raise InvalidArgumentError(f"LOCAL_WORLD_SIZE must be a positive integer, got {local!r}")
    return max(1, usable_cores() // int(local))


def check_threads(threads: int | None) -> None:
    """--threads: at least 1 (a note when it exceeds the usable cores)."""
    settings.check_min("--threads", threads, 1)
    if threads is not None and threads > usable_cores():
        console.note(f"--threads {threads} is more than the {usable_cores()} cores this process "
                     "may use: the threads will take turns on them")


def apply_threads(threads: int | None) -> int:
    """Set torch's thread count (the flag, else the default); return it."""
    import torch

    n = threads if threads is not None else default_threads(os.environ)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
