"""Tool calling: OpenAI `tools` rendered into the prompt, the model's calls parsed back.

Tools go into the prompt through the model's own chat template (its `tools` variable, as
transformers' `apply_chat_template(tools=...)` passes them); a Meta Llama 3 checkpoint with no
template gets Meta's Llama 3.1 JSON tool-call format (LLAMA31_JSON_TOOLS below: the tools in the
first user message, a call answered as `{"name": ..., "parameters": {...}}`, tool results under
the `ipython` role). A reply is a tool call when its whole text is one (or a list of them, or
`<tool_call>...</tool_call>` blocks, as Hermes-style templates ask for). With tool_choice
"required" or a named function the call is constrained by a JSON schema, so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llamarun import structured
from llamarun.errors import InvalidArgumentError
from llamarun.tokenizer import ChatFormat
from llamarun.tokenizer.chat import HFTemplateChatFormat, Llama3ChatFormat

# Meta's JSON-based tool calling for Llama 3.1 (llama-models' prompt format; the tools in the
# first user message, as the Hugging Face template does by default), as a Jinja template.
LLAMA31_JSON_TOOLS = """{{- bos_token }}
{%- if messages and messages[0].role == 'system' %}
{%- set system = messages[0].content | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}
{%- if tools is not none %}
{%- if not messages or messages[0].role != 'user' %}
{{- raise_exception('tools go into the first user message, and there is none') }}
{%- endif %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n' }}
{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}
{{- 'Do not use variables.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{{- messages[0].content | trim + '<|eot_id|>' }}
{%- set messages = messages[1:] %}
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'tool' or m.role == 'ipython' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
{%- if m.content is mapping or (m.content is iterable and m.content is not string) %}{{- m.content | tojson }}
{%- else %}{{- m.content }}{%- endif %}
{{- '<|eot_id|>' }}
{%- elif m.tool_calls %}
{%- for c in m.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + c.function.name + '\", \"parameters\": ' + c.function.arguments | tojson + '}<|eot_id|>' }}
{%- endfor %}
{%- else %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

MAX_TOOLS = 128


class ToolError(InvalidArgumentError):
    """Tools or a tool choice that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: its id, the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """As an item of OpenAI's `message.tool_calls` (with `index` for a stream's delta)."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class Tools:
    """A request's tools: the function definitions, and which the model may or must call."""

    functions: tuple[dict[str, Any], ...]  # OpenAI's {"name", "description", "parameters"}
    choice: str  # "auto", "none", "required", or a function's name
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]

    @property
    def for_template(self) -> list[dict[str, Any]]:
        """The tools as the template gets them (OpenAI's {"type": "function", "function": ...})."""
        return [{"type": "function", "function": f} for f in self.functions]

    def grammar(self) -> structured.Grammar | None:
        """What the reply must match: for "required", one call (or a list of calls, when parallel
        calls are allowed), for a named function one call of it; else None."""
        if self.choice in ("auto", "none"):
            return None
        chosen = [f for f in self.functions if self.choice == "required" or f["name"] == self.choice]
        calls = [{"type": "object",
                  "properties": {"name": {"const": f["name"]},
                                 "parameters": f.get("parameters") or {"type": "object"}},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for f in chosen]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.choice == "required" and self.parallel:  # one call, or a list of them
            schema = {"anyOf": [schema, {"type": "array", "items": schema, "minItems": 1}]}
        try:
            return structured.json_schema(schema, what="the tools' parameters")
        except structured.GrammarError as e:
            raise ToolError(str(e), "tools") from None


def parse_tools(tools: Any, tool_choice: Any = None, parallel: Any = None) -> Tools | None:
    """Check OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` (ToolError naming the
    field); None when no tools are given."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} functions", "tools")
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        f = tool.get("function")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not re.fullmatch(
                r"[A-Za-z0-9_.-]{1,64}", f["name"]):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, _ . or -",
                            f"{where}.function.name")
        params = f.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ToolError(f"{where}.function.parameters must be a JSON schema object",
                                f"{where}.function.parameters")
            try:
                structured.json_schema(params, what=f"{where}.function.parameters")
            except structured.GrammarError as e:
                raise ToolError(str(e), f"{where}.function.parameters") from None
        functions.append({k: v for k, v in f.items() if k in ("name", "description", "parameters")})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools name the same function twice", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        if name not in names:
            raise ToolError(f"tool_choice names no function among the tools ({', '.join(names)})",
                            "tool_choice")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise ToolError("tool_choice must be 'auto', 'none', 'required' or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    return Tools(tuple(functions), choice, parallel is not False)


def tool_format(chat_format: ChatFormat) -> HFTemplateChatFormat:
    """The chat format that renders tools for this model: its own template if that reads
    `tools`, Meta's Llama 3.1 JSON format for a Llama 3 checkpoint with no template; else
    ToolError (param "tools")."""
    if isinstance(chat_format, HFTemplateChatFormat):
        if chat_format.renders_tools:
            return chat_format
        raise ToolError(f"the model's chat template ({chat_format.origin or 'given'}) does not "
                        "render tools", "tools")
    if isinstance(chat_format, Llama3ChatFormat):
        return HFTemplateChatFormat(chat_format.tokenizer, LLAMA31_JSON_TOOLS,
                                    origin="Meta's Llama 3.1 JSON tool format")
    raise ToolError(f"the model's chat format ({chat_format.name}) cannot render tools", "tools")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as templates take them: an assistant's tool_calls with their arguments
    as objects (transformers' convention), a tool result with its tool_call_id."""
    out = []
    for n, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for k, c in enumerate(m["tool_calls"]):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise ToolError(f"messages.{n}.tool_calls.{k} must be {{\"type\": \"function\", "
                                    f"\"function\": {{\"name\": ..., \"arguments\": ...}}}}",
                                    f"messages.{n}.tool_calls.{k}")
                f = dict(f)
                args = f.get("arguments")
                if isinstance(args, str):
                    try:
                        f["arguments"] = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # not JSON: the template gets the text
                calls.append({"id": c.get("id"), "type": "function", "function": f})
            m["tool_calls"] = calls
        out.append(m)
    return out


_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_PREFIXES = ("<|python_tag|>", "<tool_call>", "{", "[")


def may_be_call(text: str) -> bool:
    """Whether a reply starting with `text` may still turn out to be a tool call (a stream
    holds such text back until it knows)."""
    s = text.lstrip()
    return not s or any(s.startswith(p) or p.startswith(s) for p in _PREFIXES)


def parse_calls(text: str, names: list[str]) -> list[ToolCall]:
    """The tool calls a reply's whole text makes (empty if it is not tool calls): one JSON
    object {"name", "parameters" (or "arguments")}, a list of them or several separated by
    `;`, optionally after `<|python_tag|>`, or `<tool_call>` blocks. A call must name one of
    `names` and give its arguments as an object."""
    s = text.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>"):].strip()
    blocks = _BLOCK.findall(s)
    if blocks:
        if _BLOCK.sub("", s).strip():
            return []
        items: list[Any] = []
        for b in blocks:
            try:
                items.append(json.loads(b))
            except ValueError:
                return []
    else:
        try:
            value = json.loads(s)
            items = value if isinstance(value, list) else [value]
        except ValueError:
            try:
                items = [json.loads(part) for part in s.split(";") if part.strip()]
            except ValueError:
                return []
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        args = item.get("parameters", item.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return []
        if not isinstance(args, dict):
            return []
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", item["name"],
                              json.dumps(args, ensure_ascii=False)))
    return calls


def reply_calls(text: str, names: list[str], parallel: bool) -> list[ToolCall]:
    """The tool calls a finished reply makes (parse_calls): the first only, unless parallel
    calls are allowed."""
    calls = parse_calls(text, names)
    return calls if parallel else calls[:1]


# -- streaming calls as they are generated ------------------------------------------------------

_TAG = "<|python_tag|>"
_BLOCK_TAGS = ("<tool_call>", "</tool_call>")
_KEYS = ('"parameters"', '"arguments"')


@dataclass(frozen=True)
class PartialCall:
    """A call as far as a reply has written it: its name, and its arguments' text so far."""

    name: str
    arguments: str
    complete: bool  # the arguments' closing brace has been written


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _literal(s: str, i: int, *options: str) -> tuple[int, bool]:
    """Past whichever of `options` the text has at i: (its end, True); (-1, True) if the text
    ends inside one of them; (-1, False) if it has none of them."""
    for lit in options:
        if s.startswith(lit, i):
            return i + len(lit), True
    return -1, any(lit.startswith(s[i:]) for lit in options)


def _literals(s: str, i: int, *steps: tuple[str, ...]) -> tuple[int, bool]:
    """Past one of each step's options in turn, with whitespace after each (see _literal)."""
    for options in steps:
        i, fits = _literal(s, i, *options)
        if i < 0:
            return i, fits
        i = _skip_ws(s, i)
    return i, True


def _value_end(s: str, i: int) -> int:
    """The end of the JSON object or array starting at i, or -1 if the text ends before it."""
    depth, in_string, j = 0, False, i
    while j < len(s):
        c = s[j]
        if in_string:
            if c == "\\":
                j += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return -1


def scan_calls(text: str, names: list[str]) -> tuple[list[PartialCall], bool]:
    """The tool calls a reply's text has begun so far: each call whose name is written, with
    its arguments' raw text up to where the text ends. The flag is False once the text strays
    from the form that can be streamed (`{"name": ..., "parameters": {...}}` objects, optionally
    after `<|python_tag|>`, in a list, separated by `;`, or in `<tool_call>` blocks); parse_calls
    still judges the whole reply."""
    calls: list[PartialCall] = []
    s, n = text, len(text)
    i = _skip_ws(s, 0)
    j, fits = _literal(s, i, _TAG)
    if j >= 0:
        i = j
    elif i < n and fits:
        return calls, True
    while True:
        while i < n:  # between calls
            if s[i].isspace() or s[i] in "[],;":
                i += 1
                continue
            j, fits = _literal(s, i, *_BLOCK_TAGS)
            if j < 0:
                break
            i = j
        if i == n or (s[i] == "<" and fits):
            return calls, True
        if s[i] != "{":
            return calls, False
        i, fits = _literals(s, _skip_ws(s, i + 1), ('"name"',), (":",))
        if i < 0:
            return calls, fits
        if i == n:
            return calls, True
        if s[i] != '"':
            return calls, False
        end = s.find('"', i + 1)  # a function's name has no escapes (parse_tools checks)
        if end < 0:
            return calls, any(('"' + name).startswith(s[i:]) for name in names)
        name = s[i + 1:end]
        if name not in names:
            return calls, False
        calls.append(PartialCall(name, "", False))
        i, fits = _literals(s, _skip_ws(s, end + 1), (",",), _KEYS, (":",))
        if i < 0:
            return calls, fits
        if i == n:
            return calls, True
        if s[i] != "{":  # arguments as a string, say: not streamed
            return calls, False
        end = _value_end(s, i)
        calls[-1] = PartialCall(name, s[i:] if end < 0 else s[i:end], end >= 0)
        if end < 0:
            return calls, True
        i = _skip_ws(s, end)
        i, fits = _literal(s, i, "}")
        if i < 0:
            return calls, fits


class CallStream:
    """A reply's tool calls, streamed as it is generated (OpenAI's `delta.tool_calls`): a call's
    id, type and name as soon as its name is written, then its arguments' text as it comes.
    Text that may still become a call is held back; text that cannot is the reply's content
    (`content` turns True and `text` holds what was held)."""

    def __init__(self, names: list[str], parallel: bool = True) -> None:
        self.names, self.parallel = names, parallel
        self.text = ""
        self.content = False  # the reply is text, not calls
        self._ids: list[str] = []  # the calls whose heads went out
        self._sent: list[int] = []  # characters of each call's arguments that went out

    @property
    def calling(self) -> bool:
        """Whether the reply is tool calls (a call's head has gone out)."""
        return bool(self._ids)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Take the reply's next text; the tool_calls deltas it completes."""
        self.text += text
        if self.content:
            return []
        if not self._ids and not may_be_call(self.text):
            self.content = True
            return []
        calls, _ = scan_calls(self.text, self.names)
        return self._deltas(calls)

    def finish(self, stopped: bool) -> list[dict[str, Any]]:
        """The deltas still due when the reply ends (`stopped`: it ended by itself, not at a
        token limit). A reply whose calls could not be streamed is judged whole here."""
        if self.content:
            return []
        whole = reply_calls(self.text, self.names, self.parallel) if stopped else []
        if not self._ids:
            if not whole:
                self.content = True
                return []
            return self._deltas([PartialCall(c.name, c.arguments, True) for c in whole])
        out = []  # calls whose arguments were not streamed (given as a string, say)
        for k, c in enumerate(whole[:len(self._ids)]):
            if self._sent[k] == 0 and c.arguments:
                out.append({"index": k, "function": {"arguments": c.arguments}})
                self._sent[k] = len(c.arguments)
        return out

    def _deltas(self, calls: list[PartialCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for k, c in enumerate(calls if self.parallel else calls[:1]):
            if k == len(self._ids):
                self._ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self._sent.append(0)
                out.append({"index": k, "id": self._ids[k], "type": "function",
                            "function": {"name": c.name, "arguments": ""}})
            if len(c.arguments) > self._sent[k]:
                out.append({"index": k, "function": {"arguments": c.arguments[self._sent[k]:]}})
                self._sent[k] = len(c.arguments)
        return out
