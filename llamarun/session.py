"""ChatSession: a conversation whose history stays in the KV cache between turns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from llamarun.errors import PromptTooLongError
from llamarun.generation import Generation, GenerationResult
from llamarun.sampling import Constraint, SamplingParams
from llamarun.tokenizer import ChatFormat
from llamarun.tokenizer.chat import Message


class ChatEngine(Protocol):
    """What a conversation needs of an engine (llamarun.engine.Engine is one)."""

    chat_format: ChatFormat

    @property
    def max_seq_len(self) -> int: ...

    def generate(self, prompt_ids: Sequence[int], *, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (),
                 constraint: Constraint | None = None,
                 on_done: Callable[[GenerationResult], None] | None = None) -> Generation: ...


class ChatSession:
    """Alternating user/assistant turns; each turn prefills only the tokens the cache lacks.

    The session keeps the ids of the conversation as the model saw them (its replies as sampled,
    not re-encoded), so a turn is those ids plus the new message; the engine reuses whatever prefix
    of them a cache slot still holds. When a turn would not fit (its tokens plus room for a
    reply), the oldest whole turns are dropped (the system prompt is kept) and the dialog is
    encoded afresh.
    """

    def __init__(self, engine: ChatEngine, *, system: str | None = None) -> None:
        self.engine = engine
        self.system = system
        self._messages: list[Message] = []
        self._ids: list[int] | None = None  # the conversation's ids so far, when they follow on
        self._active: Generation | None = None
        self.last_result: GenerationResult | None = None
        self.last_prefill = 0  # tokens prefilled by the last turn

    @property
    def messages(self) -> list[Message]:
        """The user/assistant turns, without the system prompt."""
        return self._messages

    @messages.setter
    def messages(self, turns: list[Message]) -> None:
        """Replace the turns (a resumed conversation): they are encoded afresh at the next send,
        and the engine prefills only what its cache lacks of them."""
        self._messages = list(turns)
        self._ids = None

    @property
    def dialog(self) -> list[Message]:
        """The messages the model sees: the system prompt, then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages]

    @property
    def context_used(self) -> int:
        """Tokens of the conversation so far."""
        return len(self._ids or ())

    @property
    def context_left(self) -> int:
        """Context positions still free."""
        return self.engine.max_seq_len - self.context_used

    def clear(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self._close_active()
        self.messages = []
        self._ids = None

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the history is kept and re-encoded at the next turn."""
        self._close_active()
        self.system = text or None
        self._ids = None

    def send(self, text: str, *, sampling: SamplingParams | None = None, max_new_tokens: int = 512,
             stop: Sequence[str] = (), constraint: Constraint | None = None) -> Generation:
        """Add a user message and stream the assistant's reply (matching `constraint`, if any:
        a JSON schema or grammar from llamarun.structured)."""
        self._close_active()
        user: Message = {"role": "user", "content": text}
        limit = self.engine.max_seq_len
        reserve = min(max_new_tokens, limit // 4)  # room a reply needs before old turns are dropped
        ids = self._prompt(user)
        dropped = 0
        if len(ids) + reserve > limit and len(self.messages) >= 2:
            dropped = self._drop_to_fit(user, limit - reserve)
            ids = self._prompt(user)
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"the message needs {len(ids)} tokens with the system prompt, but the context "
                f"holds {limit}; shorten it or raise --max-seq-len")
        self.messages.append(user)

        def done(result: GenerationResult) -> None:
            self._active = None
            self.last_result = result
            self.last_prefill = result.prefill_tokens
            if result.completion_tokens == 0:  # cancelled before a token: the turn never happened
                self.messages.pop()
                return
            self._ids = ids + list(result.token_ids)
            self.messages.append({"role": "assistant", "content": result.text})

        gen = self.engine.generate(ids, sampling=sampling, max_new_tokens=max_new_tokens,
                                   stop=stop, constraint=constraint, on_done=done)
        gen.dropped_turns = dropped
        self._active = gen
        return gen

    def _drop_to_fit(self, user: Message, budget: int) -> int:
        """Drop the fewest oldest turns (a user message and its reply each) after which the
        dialog with `user` takes at most `budget` tokens, or all of them; return how many.

        A binary search over the number dropped: the dialog is encoded O(log turns) times, not
        once per dropped turn (a long resumed chat would take quadratic time).
        """
        turns = self.messages
        pairs = len(turns) // 2

        def fits(k: int) -> bool:
            self.messages = turns[2 * k:]
            return len(self._prompt(user)) <= budget

        lo, hi = 1, pairs  # the answer lies in lo..hi (hi: all, whether or not that fits)
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        self.messages = turns[2 * lo:]
        return lo

    def _prompt(self, user: Message) -> list[int]:
        """The conversation's ids with `user` added, up to the assistant's reply."""
        fmt = self.engine.chat_format
        if self._ids is not None and self.messages:
            return self._ids + fmt.encode_followup(self.dialog, [user])
        return fmt.encode_dialog([*self.dialog, user])

    def _close_active(self) -> None:
        gen, self._active = self._active, None
        if gen is not None:
            gen.close()  # its on_done records the reply, or forgets the message if none came
