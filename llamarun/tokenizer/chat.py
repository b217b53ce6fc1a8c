"""Chat formats: a dialog of {"role", "content"} messages -> the token ids the model sees."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from llamarun.errors import InvalidArgumentError, TokenizerError
from llamarun.tokenizer.base import Tokenizer
from llamarun.tokenizer.guard import ContentGuard
from llamarun.tokenizer.sandbox import TemplateLimits
from llamarun.tokenizer.templates import ChatTemplate

Message = dict[str, str]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class ChatFormat(ABC):
    """Turns messages into token ids, for a fresh prompt or for extending a KV cache."""

    name: str

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def encode_dialog(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the whole dialog; with `add_generation_prompt`, ending where the assistant reply starts."""

    @abstractmethod
    def encode_followup(self, history: list[Message], new_messages: list[Message]) -> list[int]:
        """Ids to append after `history` (ending in the generated assistant reply, stop id not cached).

        Returns the assistant end-of-turn tokens, the new turn(s), then the generation prompt.
        """


def _check_followup(history: list[Message], new_messages: list[Message]) -> None:
    if not history or history[-1].get("role") != "assistant":
        raise InvalidArgumentError("encode_followup needs a history that ends with the assistant's reply")
    if not new_messages:
        raise InvalidArgumentError("encode_followup needs at least one new message")


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 `chat_completion`: `<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>` per turn."""

    name = "llama2"

    def encode_dialog(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Encode as Meta's reference; a dialog ending with the assistant is closed with EOS."""
        dialog = list(messages)
        if dialog and dialog[0].get("role") == "system":
            if len(dialog) < 2:
                raise InvalidArgumentError("a Llama 2 dialog needs a user message after the system prompt")
            dialog = [
                {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
                *dialog[2:],
            ]
        return self._encode_turns(dialog)

    def encode_followup(self, history: list[Message], new_messages: list[Message]) -> list[int]:
        """`</s>` closing the cached reply, then each new `<s>[INST] ... [/INST]` turn."""
        _check_followup(history, new_messages)
        eos = self.tokenizer.eos_id
        if eos is None:
            raise TokenizerError(f"tokenizer {self.tokenizer.source} has no EOS token to close the Llama 2 turn")
        return [eos, *self._encode_turns(new_messages)]

    def _encode_turns(self, dialog: list[Message]) -> list[int]:
        roles = [m.get("role") for m in dialog]
        if not dialog or any(r != "user" for r in roles[::2]) or any(r != "assistant" for r in roles[1::2]):
            raise InvalidArgumentError(
                "Llama 2 chat supports 'system' first, then alternating 'user'/'assistant' starting with 'user'"
            )
        ids: list[int] = []
        tok = self.tokenizer
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
            ids.extend(tok.encode(text, bos=True, eos=True))
        if roles[-1] == "user":
            ids.extend(tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True))
        return ids


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 format: `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        ids = {t: tokenizer.special_id(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"tokenizer {tokenizer.source} lacks Llama 3 chat tokens: {', '.join(missing)}")
        self._bot, self._start, self._end, self._eot = (int(i) for i in ids.values())  # type: ignore[arg-type]

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`."""
        tok = self.tokenizer
        return [self._start, *tok.encode(role, bos=False), self._end, *tok.encode("\n\n", bos=False)]

    def encode_message(self, message: Message) -> list[int]:
        """Header, stripped content, `<|eot_id|>`."""
        content = self.tokenizer.encode(message["content"].strip(), bos=False)
        return [*self.encode_header(message["role"]), *content, self._eot]

    def encode_dialog(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """`<|begin_of_text|>`, each message, then the assistant header when asked."""
        ids = [self._bot]
        for message in messages:
            ids.extend(self.encode_message(message))
        if add_generation_prompt:
            ids.extend(self.encode_header("assistant"))
        return ids

    def encode_followup(self, history: list[Message], new_messages: list[Message]) -> list[int]:
        """`<|eot_id|>` closing the cached reply, the new messages, the assistant header."""
        _check_followup(history, new_messages)
        ids = [self._eot]
        for message in new_messages:
            ids.extend(self.encode_message(message))
        return [*ids, *self.encode_header("assistant")]


class HFTemplateChatFormat(ChatFormat):
    """A Hugging Face Jinja `chat_template`, rendered as transformers does, tokenized without adding BOS.

    Message contents stay text (see guard.py): the ids equal transformers' `apply_chat_template`
    unless a content spells a special token, which then comes out as plain text tokens.
    """

    name = "hf-template"

    def __init__(self, tokenizer: Tokenizer, template: str, *, origin: str = "", limits: TemplateLimits | None = None) -> None:
        super().__init__(tokenizer)
        self.source = template
        self._template = ChatTemplate(template, origin=origin, limits=limits)
        self.origin = self._template.origin
        self._guard = ContentGuard(tokenizer)
        self._special_tokens: dict[str, str] = {}
        for key, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
            if i is not None:
                self._special_tokens[key] = tokenizer.piece(i)

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text the template produces (special-token text in contents included as it is)."""
        return self._render(messages, add_generation_prompt, tools)

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads the `tools` variable (transformers' apply_chat_template(tools=))."""
        return "tools" in self.source

    def _render(self, messages: list[Any], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        return self._template.render(
            messages, add_generation_prompt=add_generation_prompt, special_tokens=self._special_tokens,
            tools=tools,
        )

    def encode_dialog(self, messages: list[Message], *, add_generation_prompt: bool = True,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render, then encode the template's text with special tokens and the contents as text
        (`tools`: function definitions, for a template that renders them)."""
        marked, marks = self._guard.mark(messages, template=self.source)
        text = self._render(marked, add_generation_prompt, tools)
        if not text.strip():
            raise self._template.error(f"renders nothing for {len(messages)} message(s)")
        return self._guard.encode(text, marks)

    def encode_followup(self, history: list[Message], new_messages: list[Message]) -> list[int]:
        """The text the template puts after the cached reply's content, up to the new generation prompt."""
        _check_followup(history, new_messages)
        marked, marks = self._guard.mark([*history, *new_messages], template=self.source)
        n = len(history)
        cached = self._render(marked[: n - 1], True)
        full = self._render(marked, True)
        reply = str(marked[n - 1]["content"]).strip()
        at = full.find(reply, len(cached)) if full.startswith(cached) else -1
        if at < 0:
            raise self._template.error("does not render the conversation as an extension of its prefix")
        return self._guard.encode(full[at + len(reply) :], marks)


class BrokenChatFormat(ChatFormat):
    """A chat template that cannot be used: raw completion still works, any chat raises `error`."""

    name = "hf-template (broken)"

    def __init__(self, tokenizer: Tokenizer, error: TokenizerError) -> None:
        super().__init__(tokenizer)
        self.error = error

    def encode_dialog(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Raise the template's error."""
        raise self.error

    def encode_followup(self, history: list[Message], new_messages: list[Message]) -> list[int]:
        """Raise the template's error."""
        raise self.error


class PlainChatFormat(ChatFormat):
    """No chat format known: message contents joined by blank lines, as a raw completion prompt."""

    name = "plain"

    def encode_dialog(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """BOS per the tokenizer's settings, then the contents separated by "\\n\\n"."""
        text = "\n\n".join(m["content"] for m in messages)
        if add_generation_prompt and messages:
            text += "\n\n"
        return self.tokenizer.encode(text, bos=self.tokenizer.add_bos)

    def encode_followup(self, history: list[Message], new_messages: list[Message]) -> list[int]:
        """The new contents, each preceded by "\\n\\n", then "\\n\\n"."""
        _check_followup(history, new_messages)
        text = "".join("\n\n" + m["content"] for m in new_messages) + "\n\n"
        return self.tokenizer.encode(text, bos=False)
