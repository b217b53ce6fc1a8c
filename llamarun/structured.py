"""Structured output: JSON schemas and grammars enforced while decoding, with llguidance.

A `Grammar` is checked text in llguidance's form, made from a JSON schema, "any JSON object",
a GBNF or Lark grammar, or a regex; it does not depend on a tokenizer, so a bad one is refused
before a model is loaded (CLI) or a request is queued (server). A `GrammarCompiler` binds
grammars to one tokenizer (building llguidance's view of its vocabulary once, and caching each
grammar's matcher); its `constraint(grammar)` is a `sampling.Constraint`: the scheduler asks it
for one processor per request, which masks the tokens that cannot come next in that row's
logits and is told each token sampled. Once the grammar is complete only the tokenizer's stop
ids are allowed, so a reply ends with finish_reason "stop".

Why llguidance (not xgrammar): it installs as one 8 MB wheel with no dependencies (xgrammar
pulls triton, 1 GB, and transformers), and its mask costs well under a millisecond per token
on SmolLM2's and Llama 3's vocabularies (see benchmarks/structured.py), a few percent at most
of a decode step on CPU.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from llamarun.errors import InvalidArgumentError
from llamarun.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_SPEC_BYTES = 256 * 1024  # a schema or grammar's text; past it, compiling takes seconds
MAX_CACHED = 64  # compiled grammars kept per tokenizer

# llguidance's own bounds on a grammar's size and the work of building its lexer and of each
# mask: a grammar past them is refused with their message, in well under a second.
_LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, max_lexer_states=50_000,
               step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)

# How JSON is laid out: `{"a": 1, "b": [2, 3]}`, Python's json.dumps style, which models write
# anyway. Free whitespace would let a model pad an object with newlines until it runs out of
# tokens (a known failure of small models under JSON constraints).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# "Any JSON object": an object, at the top level, whatever it holds.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


class GrammarError(InvalidArgumentError):
    """A schema or grammar that cannot be used: invalid, unsupported or too large (one line)."""


@dataclass(frozen=True)
class Grammar:
    """A checked grammar in llguidance's serialized form. kind: "json_object", "json_schema",
    "grammar" (GBNF or Lark) or "regex"; `schema` is the JSON schema, when it is one."""

    kind: str
    text: str
    schema: Any = None


def _lib() -> Any:
    import llguidance

    return llguidance


def _limits() -> Any:
    return _lib().LLParserLimits(**_LIMITS)


def _check(grammar: str, what: str) -> None:
    """Refuse a grammar llguidance cannot build (an unsupported keyword, a missing rule,
    a limit passed), naming `what`."""
    bad, messages = _lib().LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_limits())
    if bad:
        raise GrammarError(f"{what}: {_one_line(messages[0] if messages else 'invalid')}")


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_size(text: str, what: str) -> None:
    n = len(text.encode("utf-8", "surrogatepass"))
    if n > MAX_SPEC_BYTES:
        raise GrammarError(f"{what} is too large: {n} bytes (at most {MAX_SPEC_BYTES})")


def json_object() -> Grammar:
    """Any JSON object."""
    return json_schema(JSON_OBJECT_SCHEMA, what="json_object", kind="json_object")


def json_schema(schema: Any, *, what: str = "the JSON schema", kind: str = "json_schema") -> Grammar:
    """A JSON schema (a dict, or its JSON text): what the output must validate against.

    Raises GrammarError for text that is not JSON, a schema that is not an object (or a
    boolean), a keyword llguidance does not implement (named), or one too large.
    """
    if isinstance(schema, str):
        _check_size(schema, what)
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"{what} is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    if schema is False:
        raise GrammarError(f"{what} is `false`: no output can match it")
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object, got {type(schema).__name__}")
    text = json.dumps(schema, ensure_ascii=False)
    _check_size(text, what)
    try:
        grammar = _lib().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{what}: {_one_line(str(e))}") from None
    _check(grammar, what)
    return Grammar(kind, grammar, schema)


def grammar(text: str, *, what: str = "the grammar") -> Grammar:
    """A GBNF grammar (llama.cpp's: `root ::= ...`) or a Lark one (llguidance's: `start: ...`),
    told apart by llguidance."""
    _check_size(text, what)
    if not text.strip():
        raise GrammarError(f"{what} is empty")
    lib = _lib()
    try:
        lark = lib.gbnf_to_lark.any_to_lark(text)
    except Exception as e:  # the converter raises bare Exceptions for a bad GBNF
        raise GrammarError(f"{what}: {_one_line(str(e))}") from None
    out = lib.LLMatcher.grammar_from_lark(lark)
    _check(out, what)
    return Grammar("grammar", out)


def regex(pattern: str, *, what: str = "the regex") -> Grammar:
    """Output matching a regular expression (Rust regex syntax, anchored at both ends)."""
    _check_size(pattern, what)
    out = _lib().LLMatcher.grammar_from_regex(pattern)
    _check(out, what)
    return Grammar("regex", out)


class GrammarCompiler:
    """Grammars bound to one tokenizer. llguidance's view of the vocabulary (each id's bytes;
    control tokens marked as special, so no grammar ever allows them) is built on first use
    (about a second for 128k ids) and kept; each grammar's matcher is compiled once and copied
    for each request. Safe to use from several threads."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # grammar text -> matcher (a prototype)

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a constrained output (the tokenizer's stop ids)."""
        tok = self.tokenizer
        ids = sorted(tok.stop_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
        if not ids:
            raise GrammarError(f"tokenizer {tok.source or tok.kind} has no stop token: a "
                               "constrained output could never end")
        return ids

    def _tokenizer(self) -> Any:
        if self._lltok is None:
            self._lltok = _lltokenizer(self.tokenizer, self.stop_ids)
        return self._lltok

    def constraint(self, grammar: Grammar) -> GrammarConstraint:
        """A Constraint enforcing `grammar` (GrammarError if it cannot be built for this
        tokenizer's vocabulary)."""
        lib = _lib()
        with self._lock:
            proto = self._cache.get(grammar.text)
            if proto is not None:
                self._cache.move_to_end(grammar.text)
            else:
                lltok = self._tokenizer()
                proto = lib.LLMatcher(lltok, grammar.text, log_level=0, limits=_limits())
                if proto.is_error():
                    raise GrammarError(f"the {grammar.kind.replace('_', ' ')}: "
                                       f"{_one_line(proto.get_error())}")
                self._cache[grammar.text] = proto
                while len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
        return GrammarConstraint(grammar, proto, self.tokenizer.vocab_size, self.stop_ids)


class GrammarConstraint:
    """A grammar bound to a tokenizer: makes a fresh GrammarMask per request."""

    def __init__(self, grammar: Grammar, matcher: Any, vocab_size: int,
                 stop_ids: Sequence[int]) -> None:
        self.grammar = grammar
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = tuple(stop_ids)

    def processor(self, device: torch.device) -> GrammarMask:
        return GrammarMask(self._matcher.deep_copy(), self.vocab_size, self.stop_ids, device)


class GrammarMask:
    """One request's matcher as a logits processor: -inf on every token the grammar does not
    allow next. The bitmask (one bit per id, 32 to an int32 word) is computed by llguidance
    into a CPU buffer, copied to the logits' device (vocab/8 bytes) and expanded there.

    `prepare()` starts the next mask on a worker thread (llguidance releases the GIL while it
    computes), so the scheduler calls it before a forward pass and the mask is ready, or
    nearly, when the pass's logits are; `allowed()` waits for it, or computes it itself."""

    def __init__(self, matcher: Any, vocab_size: int, stop_ids: Sequence[int],
                 device: torch.device) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = tuple(stop_ids)
        self.words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # (words,) on the host
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)  # (32,)
        self.failed = False
        self._next: Future[None] | None = None  # the mask being computed for the next token

    def prepare(self) -> None:
        """Start computing the mask for the next token (the matcher is not touched again
        until `allowed()` has it)."""
        if self._next is None and not self.failed:
            self._next = _mask_worker().submit(self._compute)

    def _compute(self) -> None:
        words = self.words
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def allowed(self, device: torch.device) -> torch.Tensor:
        """The allowed ids now, as a (vocab_size,) bool tensor on `device`."""
        if not self.failed:
            pending, self._next = self._next, None
            if pending is None:
                self._compute()
            else:
                pending.result()
            if self.matcher.is_error():  # a limit passed mid-way: end the output here
                log.warning("structured output stopped: %s", _one_line(self.matcher.get_error()))
                self.failed = True
        if self.failed:
            ids = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
            return torch.zeros(self.vocab_size, dtype=torch.bool, device=device).index_fill_(0, ids, True)
        bits = (self.words.to(device).unsqueeze(-1) >> self.shifts) & 1  # (words, 32)
        return bits.view(-1)[:self.vocab_size].bool()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (vocab,) -> logits with -inf where the grammar forbids the token (ids past
        the tokenizer's vocabulary, a padded output layer's, are always forbidden)."""
        allowed = self.allowed(logits.device)
        n = logits.shape[-1]
        if n > self.vocab_size:
            allowed = torch.cat([allowed, allowed.new_zeros(n - self.vocab_size)])
        elif n < self.vocab_size:
            allowed = allowed[:n]
        return logits.masked_fill(~allowed, -torch.inf)

    def push(self, token: torch.Tensor) -> None:
        if self._next is not None:  # a mask nobody asked for (its pass failed): let it finish
            self._next.result()
            self._next = None
        if not self.failed and not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        """Whether the grammar has matched and a stop id was taken."""
        return self.matcher.is_stopped()


_WORKER: ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _mask_worker() -> ThreadPoolExecutor:
    """The thread that computes masks while the forward pass runs (one: the masks of a step's
    rows are each well under a millisecond)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(1, thread_name_prefix="llamarun-mask")
        return _WORKER


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each id's bytes (control tokens as 0xFF + their
    text: llguidance's mark for special tokens), the stop and BOS ids, and a tokenize call."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]) -> None:
        control = tokenizer.control_ids
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(control)
        self.tokens = [b"\xff" + tokenizer.piece(i).encode("utf-8", "replace") if i in control
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self._tokenizer = tokenizer
        self._ids: dict[bytes, int] | None = None  # bytes -> id, for greedy tokenizing

    def __call__(self, text: bytes | str) -> list[int]:
        """Ids whose bytes are exactly `text` (llguidance tokenizes the text a grammar forces):
        the tokenizer's own encoding when it spells `text` (SentencePiece's adds a leading
        space, byte-level BPE may not round-trip a split character), else the longest
        vocabulary entry at each point."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = self._tokenizer.encode(data.decode("utf-8", "replace"), bos=False)
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        if self._ids is None:
            special = set(self.special_token_ids)
            self._ids = {}
            for i, b in enumerate(self.tokens):
                if b and i not in special:
                    self._ids.setdefault(b, i)
            self._longest = max(map(len, self._ids), default=1)
        out, at = [], 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                found = self._ids.get(data[at:at + n])
                if found is not None:
                    out.append(found)
                    at += n
                    break
            else:  # a byte no token spells: llguidance then masks what it cannot reach
                at += 1
        return out


def _lltokenizer(tokenizer: Tokenizer, stop_ids: Sequence[int]) -> Any:
    lib = _lib()
    return lib.LLTokenizer(lib.TokenizerWrapper(_Vocabulary(tokenizer, stop_ids)),
                           n_vocab=tokenizer.vocab_size, eos_token=list(stop_ids))
