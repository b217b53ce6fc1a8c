"""ChatSession: a conversation whose history stays in the KV cache between turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from llamarun.errors import PromptTooLongError
from llamarun.sampling import SamplingParams
from llamarun.tokenizer.chat import Message

if TYPE_CHECKING:
    from llamarun.engine import Engine, Generation, GenerationResult


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """Alternating user/assistant turns; each turn prefills only the tokens the cache lacks.

    When a turn would not fit (its tokens plus room for a reply), the oldest whole turns are
    dropped (the system prompt is kept) and the cache is rebuilt from the longest prefix it shares
    with the shortened dialog.
    """

    def __init__(self, engine: Engine, *, system: str | None = None) -> None:
        self.engine = engine
        self.system = system
        self.messages: list[Message] = []  # user/assistant turns, without the system prompt
        self._cache: list[int] = []  # ids whose keys/values are in the cache at positions 0..n-1
        self._pending: list[int] = []  # ids of the last reply not yet written to the cache
        self._followup = False  # whether the cache holds dialog[:-1] + the reply (minus _pending)
        self._active: Generation | None = None
        self._version = -1  # the engine's cache_version when this session last wrote the cache
        self.last_result: GenerationResult | None = None
        self.last_prefill = 0  # tokens prefilled by the last turn

    @property
    def dialog(self) -> list[Message]:
        """The messages the model sees: the system prompt, then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages]

    @property
    def context_used(self) -> int:
        """Tokens of the conversation held in the KV cache."""
        return len(self._cache) + len(self._pending)

    @property
    def context_left(self) -> int:
        """Cache slots still free."""
        return self.engine.max_seq_len - self.context_used

    def clear(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self._close_active()
        self.messages = []
        self._pending = []
        self._followup = False

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the history is kept and re-encoded at the next turn."""
        self._close_active()
        self.system = text or None
        self._followup = False

    def send(self, text: str, *, sampling: SamplingParams | None = None, max_new_tokens: int = 512,
             stop: Sequence[str] = ()) -> Generation:
        """Add a user message and stream the assistant's reply."""
        self._close_active()
        user: Message = {"role": "user", "content": text}
        if self.engine.cache_version != self._version:  # another generation used the cache
            self._cache, self._pending, self._followup = [], [], False
        limit = self.engine.max_seq_len
        reserve = min(max_new_tokens, limit // 4)  # room a reply needs before old turns are dropped
        start, new = self._plan(user)
        dropped = 0
        while start + len(new) + reserve > limit and len(self.messages) >= 2:
            self.messages = self.messages[2:]  # the oldest user message and its reply
            self._pending = []
            self._followup = False
            dropped += 1
            start, new = self._plan(user)
        if start + len(new) >= limit:
            raise PromptTooLongError(
                f"the message needs {start + len(new)} tokens with the system prompt, but the context "
                f"holds {limit}; shorten it or raise --max-seq-len")
        history = self._cache[:start]
        self.messages.append(user)
        self._cache = history
        self._pending = []
        self._followup = False

        def done(result: GenerationResult) -> None:
            self._active = None
            self.last_result = result
            if result.completion_tokens == 0:  # cancelled during prefill: the turn never happened
                self.messages.pop()
                return
            self._cache = history + new + list(result.token_ids[:result.cached_tokens])
            self._pending = list(result.token_ids[result.cached_tokens:])
            self.messages.append({"role": "assistant", "content": result.text})
            self._followup = True

        gen = self.engine.generate(new, start_pos=start, history=history, sampling=sampling,
                                   max_new_tokens=max_new_tokens, stop=stop, on_done=done)
        gen.dropped_turns = dropped
        self._version = self.engine.cache_version
        self.last_prefill = len(new)
        self._active = gen
        return gen

    def _plan(self, user: Message) -> tuple[int, list[int]]:
        """Where to start prefilling and which ids, to add `user` to the conversation."""
        fmt = self.engine.chat_format
        if self._followup and self.messages:
            return len(self._cache), self._pending + fmt.encode_followup(self.dialog, [user])
        full = fmt.encode_dialog([*self.dialog, user])
        start = min(_common_prefix(self._cache, full), len(full) - 1)
        return start, full[start:]

    def _close_active(self) -> None:
        gen, self._active = self._active, None
        if gen is not None:
            gen.close()  # a started generation records what the cache holds via on_done
            if not gen.done:  # never started: forget its user message
                self.messages.pop()
