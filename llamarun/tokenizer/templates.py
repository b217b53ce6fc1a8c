"""Render Hugging Face `chat_template` strings with jinja2 the way transformers' apply_chat_template does,
within the time and memory bounds of sandbox.py."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils

from llamarun.errors import TokenizerError
from llamarun.tokenizer.sandbox import BoundedSandbox, TemplateBudget, TemplateLimitError, TemplateLimits, run_with_budget


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` blocks; render their body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes, like transformers'."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


# json.dumps would repeat a long indent or separator once per value: both stay short.
_MAX_JSON_INDENT = 64


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if width > _MAX_JSON_INDENT or (separators is not None and any(len(str(s)) > _MAX_JSON_INDENT for s in separators)):
        raise TemplateLimitError(f"tojson indents and separators are limited to {_MAX_JSON_INDENT} characters")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Real chat templates are a few kilobytes (the largest, with tool use, tens of kilobytes).
MAX_TEMPLATE_CHARS = 1 << 18


class ChatTemplate:
    """A compiled HF chat template, rendered in a bounded sandbox the way transformers renders it."""

    def __init__(self, source: str, *, origin: str = "", limits: TemplateLimits | None = None) -> None:
        self.origin = origin
        self.limits = limits or TemplateLimits()
        if len(source) > MAX_TEMPLATE_CHARS:
            raise self.error(f"is {len(source)} characters long; llamarun accepts up to {MAX_TEMPLATE_CHARS}")
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.finish_setup()
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = dict
        env.globals["namespace"] = _Namespace
        budget = TemplateBudget(self.limits, len(source))
        try:
            self._template = run_with_budget(budget, lambda: env.compile_source(source))
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise self.error(f"does not compile (line {e.lineno}): {e.message}") from None
        except Exception as e:  # untrusted input: any failure to compile is the template's
            raise self.error(f"does not compile: {_describe(e)}") from None

    def error(self, what: str) -> TokenizerError:
        """A TokenizerError naming where the template came from."""
        name = f"chat template from {self.origin}" if self.origin else "chat template"
        return TokenizerError(_one_line(f"{name} {what}"))

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, special_tokens: dict[str, str],
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render with the variables transformers passes: messages, tools, documents, add_generation_prompt, *_token."""
        messages = [dict(m) for m in messages]
        size = sum(len(str(v)) for m in messages for v in m.values()) + len(json.dumps(tools or []))
        budget = TemplateBudget(self.limits, size)
        variables = dict(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **special_tokens
        )

        def run() -> str:
            out: list[str] = []
            for piece in self._template.generate(**variables):
                out.append(budget.charge(piece))
            return "".join(out)

        try:
            return run_with_budget(budget, run)
        except TemplateLimitError as e:
            raise self.error(f"was stopped: {e}{_where(e)}") from None
        except RecursionError as e:
            raise self.error(f"recursed too deeply{_where(e)}") from None
        except MemoryError as e:
            raise self.error(f"ran out of memory{_where(e)}") from None
        except jinja2.exceptions.TemplateError as e:
            raise self.error(f"failed: {e}{_where(e)}") from None
        except Exception as e:  # untrusted code: whatever it raises is the template's failure
            raise self.error(f"failed: {_describe(e)}{_where(e)}") from None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _where(e: BaseException) -> str:
    """ (line N) for the innermost template frame of the traceback, when jinja left one."""
    line = None
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line is not None else ""


def _one_line(text: str, limit: int = 400) -> str:
    """Control characters (newlines, terminal escapes) shown escaped; long messages cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
