"""A Jinja sandbox that bounds what an untrusted chat template may compute: time, text and numbers.

Python threads cannot be stopped, so the checks are cooperative: every call, attribute lookup,
operator, filter, loop step and piece of output goes through a hook that looks at a deadline and
at a budget of characters (and list items) the rendering may still create. Operators and methods
whose result could be huge (`'A' * 10**10`, `7 ** 300000000`, `s.center(10**10)`, `'%9999999999d'`)
are refused before they run; everything else is charged after it ran, which bounds chains of
smaller steps (a string doubled in a loop, escaped a thousand times).
"""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.nodes
import jinja2.visitor
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class TemplateLimits:
    """What one rendering of a chat template may use."""

    time_s: float = 1.0
    # Characters (and list items) a rendering may create in all: this many, plus per_input_char
    # for each character of the messages, so long conversations render like short ones.
    chars: int = 8_000_000
    per_input_char: int = 16
    int_bits: int = 65_536


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A template went past a TemplateLimits bound."""


class TemplateBudget:
    """The deadline and the characters left for one rendering."""

    def __init__(self, limits: TemplateLimits, input_chars: int = 0) -> None:
        self.limits = limits
        self.total = limits.chars + limits.per_input_char * input_chars
        self.left = self.total
        self.deadline = time.monotonic() + limits.time_s

    def tick(self) -> None:
        """Raise once the deadline has passed."""
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {self.limits.time_s:g} s")

    def ahead(self, n: int, what: str) -> None:
        """Raise if something of n characters or items would not fit."""
        if n > self.left:
            raise TemplateLimitError(f"{what} would make {n} characters or items, more than the "
                                     f"{self.total} a rendering may create")

    def charge(self, obj: Any) -> Any:
        """Count what `obj` holds against the budget; return it."""
        self.tick()
        n = _size(obj)
        if n:
            self.left -= n
            if self.left < 0:
                raise TemplateLimitError(f"it made more than the {self.total} characters or items "
                                         "a rendering may create")
        return obj


_BUDGET: contextvars.ContextVar[TemplateBudget | None] = contextvars.ContextVar("template_budget", default=None)


def current_budget() -> TemplateBudget:
    """The budget of the rendering in progress (a fresh default one outside any, e.g. when compiling)."""
    budget = _BUDGET.get()
    return budget if budget is not None else TemplateBudget(TemplateLimits())


def run_with_budget(budget: TemplateBudget, fn: Callable[[], Any]) -> Any:
    """Call fn() with `budget` as the current budget."""
    token = _BUDGET.set(budget)
    try:
        return fn()
    finally:
        _BUDGET.reset(token)


def _size(obj: Any) -> int:
    if isinstance(obj, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(obj)
    if isinstance(obj, int):
        return obj.bit_length() // 64
    return 0


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ---- operators, methods and format strings whose result size is known before running them

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|[0-9]+)?(?:\.(\*|[0-9]+))?")


def _check_printf(fmt: str, budget: TemplateBudget) -> None:
    for m in _PRINTF.finditer(fmt):
        for field in m.groups():
            if field == "*":
                raise TemplateLimitError("'*' widths in % formats are not allowed")
            if field is not None:
                budget.ahead(int(field), "a % format width")


def _check_format(fmt: str, budget: TemplateBudget) -> None:
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise TemplateLimitError("nested {} fields in format specs are not allowed")
        for number in re.findall(r"[0-9]+", spec or ""):
            budget.ahead(int(number), "a format width")


def _check_binop(op: str, left: Any, right: Any, budget: TemplateBudget) -> None:
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if left.bit_length() * right > budget.limits.int_bits:
            raise TemplateLimitError(f"a power with more than {budget.limits.int_bits} bits")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > budget.limits.int_bits:
                raise TemplateLimitError(f"a product with more than {budget.limits.int_bits} bits")
        elif isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            budget.ahead(len(seq) * _int(n), "a repetition")
    elif op == "%" and isinstance(left, str):
        _check_printf(left, budget)


def _replaced_size(s: str, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(s)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _check_str_method(s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                      budget: TemplateBudget) -> None:
    what = f"str.{name}"
    if name in ("center", "ljust", "rjust", "zfill"):
        budget.ahead(_int(args[0] if args else None), what)
    elif name == "expandtabs":
        size = _int(args[0] if args else kwargs.get("tabsize"), 8)
        budget.ahead(len(s) + s.count("\t") * max(size, 0), what)
    elif name == "replace":
        old, new, *rest = (*args, None, None)[:3]
        budget.ahead(_replaced_size(s, old, new, kwargs.get("count", rest[0] if rest else -1)), what)
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.ahead(len(s) * longest, what)
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        budget.ahead(len(s) * max(len(args[0]) - 1, 0), what)


# ---- filters: checked where their size is known ahead, charged afterwards

def _filter_value_args(fn: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
    rest = args[skip:]
    return (rest[0] if rest else None), rest[1:]


def _check_filter(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  budget: TemplateBudget) -> None:
    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    text = value if isinstance(value, str) else ""
    what = f"the {name} filter"
    if name == "center":
        budget.ahead(_int(arg(0, "width")), what)
    elif name == "indent":
        width = arg(0, "width", 4)
        step = len(width) if isinstance(width, str) else _int(width)
        budget.ahead(len(text) + (text.count("\n") + 1) * step, what)
    elif name == "replace":
        budget.ahead(_replaced_size(text, arg(0, "old"), arg(1, "new"), arg(2, "count")), what)
    elif name == "format":
        _check_printf(text, budget)
    elif name == "batch" and arg(1, "fill_with") is not None:
        budget.ahead(_int(arg(0, "linecount")), what)
    elif name == "slice":
        budget.ahead(_int(arg(0, "slices")), what)
    elif name == "wordwrap":
        wrap = arg(3, "wrapstring")
        budget.ahead(len(text) * (1 + (len(wrap) if isinstance(wrap, str) else 1)), what)
    elif name == "join":
        sep = arg(0, "d", "")
        if isinstance(sep, str) and isinstance(value, (list, tuple, dict, str)):
            budget.ahead(len(sep) * max(len(value) - 1, 0), what)


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.tick()
        value, rest = _filter_value_args(fn, args)
        if name == "join" and value is not None and not isinstance(value, (list, tuple, dict, str)):
            # Materialize iterators so the separator can be counted (jinja's join does list() too).
            skip = len(args) - len(rest) - 1
            value = list(value)
            args = (*args[:skip], value, *rest)
        _check_filter(name, value, rest, kwargs, budget)
        return budget.charge(fn(*args, **kwargs))

    return bounded


def _bounded_iter(value: Any) -> Iterator[Any]:
    """What every `{% for %}` iterates: the loop itself, with a deadline check per step."""
    budget = current_budget()
    for item in value:
        budget.tick()
        yield item


def _charged(value: Any) -> Any:
    """Charge the result of a `~` concatenation (it is built without any other hook)."""
    return current_budget().charge(value)


class _BoundedBuffer(list):  # type: ignore[type-arg]
    """The output buffer of macros, call and set blocks: each piece appended is charged."""

    def append(self, item: Any) -> None:
        super().append(current_budget().charge(item))

    def extend(self, items: Any) -> None:
        items = tuple(items)
        budget = current_budget()
        for item in items:
            budget.charge(item)
        super().extend(items)


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    def buffer(self, frame: jinja2.compiler.Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.bounded_buffer()")


class _Rewriter(jinja2.visitor.NodeTransformer):
    """Loops iterate through `_bounded_iter`; `~` and slice results (built without a hook) are charged."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        node.iter = jinja2.nodes.Filter(node.iter, "_bounded_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        return jinja2.nodes.Filter(node, "_charged", [], [], None, None, lineno=node.lineno)

    def visit_Getitem(self, node: jinja2.nodes.Getitem) -> jinja2.nodes.Node:
        node = self.generic_visit(node)
        if not isinstance(node.arg, jinja2.nodes.Slice) or node.ctx != "load":
            return node
        return jinja2.nodes.Filter(node, "_charged", [], [], None, None, lineno=node.lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' immutable sandbox, with every operation checked against the current budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.globals.pop("lipsum", None)  # lipsum(10**9) builds text in one call
        self.bounded_buffer = _BoundedBuffer

    def finish_setup(self) -> None:
        """Wrap every filter (call after adding the template's own filters)."""
        self.filters = {name: _bounded_filter(name, fn) for name, fn in self.filters.items()}
        self.filters["_bounded_iter"] = _bounded_iter
        self.filters["_charged"] = _charged

    def compile_source(self, source: str) -> jinja2.Template:
        """Parse, rewrite loops and concatenations, compile."""
        ast = self.parse(source)
        ast = _Rewriter().visit(ast)
        ast.set_environment(self)
        return self.from_string(ast)  # type: ignore[arg-type]  # jinja compiles an AST too

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.tick()
        _check_binop(operator, left, right, budget)
        return budget.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = current_budget()
        budget.tick()
        # Bound methods of str and of its subclasses (Markup, from the escape filter).
        if isinstance(__obj, (types.BuiltinMethodType, types.MethodType)) and isinstance(__obj.__self__, str):
            if __obj.__name__ == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(args[0]), *args[1:])
            _check_str_method(__obj.__self__, __obj.__name__, args, kwargs, budget)
        return budget.charge(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        current_budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current_budget().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            _check_format(value.__self__, current_budget())
        return wrapper
