"""Chat templates run with bounded time and memory, and every failure is one TokenizerError line."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from fixtures_util import require_fixture
from llamarun.errors import TokenizerError
from llamarun.tokenizer import load_chat_format, load_tokenizer
from llamarun.tokenizer.chat import BrokenChatFormat
from llamarun.tokenizer.sandbox import TemplateLimits
from llamarun.tokenizer.templates import ChatTemplate
from tokenizer_corpus import CHATML_TEMPLATE, make_hf_folder

MESSAGES = [{"role": "user", "content": "Hi"}]
ORIGIN = "evil.gguf"
# A short deadline keeps the tests that must hit it quick; everything else is refused at once.
FAST = TemplateLimits(time_s=0.3)

HOSTILE = {
    "power": ("{{ 7 ** 300000000 }}", "power"),
    "string repeat": ("{{ 'A' * 10**10 }}", "repetition"),
    "list repeat": ("{{ [1, 2, 3] * 10**9 }}", "repetition"),
    "int squaring": ("{% set ns = namespace(x=3) %}{% for i in range(99) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", "product"),
    "huge range": ("{% for i in range(10**9) %}x{% endfor %}", "range"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    "loops over a string": ("{% set s = 'A' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "longer than"),
    "output flood": ("{% for i in range(100000) %}{% for j in range(100000) %}" + "x" * 50 + "{% endfor %}{% endfor %}",
                     ("characters", "longer than")),
    "macro buffer flood": ("{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}" + "x" * 50
                           + "{% endfor %}{% endfor %}{% endmacro %}{% set x = m() %}", ("characters", "longer than")),
    "macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    "recursion holding text": ("{% macro f(s) %}{{ f(s + 'A') }}{% endmacro %}{{ f('A' * 4000000) }}", "characters"),
    "concat doubling": ("{% set ns = namespace(s='A') %}{% for i in range(99) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "characters"),
    "plus doubling": ("{% set ns = namespace(s='A') %}{% for i in range(99) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "characters"),
    "slices": ("{% set s = 'A' * 7000000 %}{% for i in range(99) %}{% set x = s[1:] %}{% endfor %}", "characters"),
    "str.center": ("{{ 'a'.center(10**10) }}", "center"),
    "str.zfill": ("{{ 'a'.zfill(10**10) }}", "zfill"),
    "Markup.center": ("{{ ('a' | e).center(10**10) }}", "center"),
    "str.replace": ("{% set s = 'A' * 100000 %}{{ s.replace('', s) }}", "replace"),
    "str.join": ("{% set s = 'A' * 1000000 %}{{ s.join(range(100000) | map('string')) }}", ("join", "longer than")),
    "str.expandtabs": ("{{ ('\t' * 1000000).expandtabs(100000) }}", "expandtabs"),
    "str.translate": ("{% set s = 'A' * 100000 %}{{ s.translate({65: 'B' * 100000}) }}", "translate"),
    "center filter": ("{{ 'a' | center(10000000000) }}", "center"),
    "replace filter": ("{% set s = 'A' * 100000 %}{{ s | replace('', s) }}", "replace"),
    "join filter": ("{% set s = 'A' * 1000000 %}{{ range(100000) | join(s) }}", "join"),
    "indent filter": ("{{ ('a\n' * 1000000) | indent(10000) }}", "indent"),
    "wordwrap filter": ("{{ ('a ' * 1000000) | wordwrap(1, wrapstring='x' * 1000) }}", "wordwrap"),
    "batch filter": ("{{ [1] | batch(10**9, 'x') | list }}", "batch"),
    "slice filter": ("{{ [1] | slice(10**9) | list }}", "slice"),
    "tojson chain": ("{% set ns = namespace(s='\\\\') %}{% for i in range(99) %}{% set ns.s = ns.s | tojson %}{% endfor %}", "characters"),
    "printf width": ("{{ '%0999999999d' % 1 }}", "width"),
    "printf star": ("{{ '%*d' % (999999999, 1) }}", "'*'"),
    "format width": ("{{ '{:>9999999999}'.format(1) }}", "width"),
    "format nested width": ("{{ '{:>{w}}'.format(1, w=10**9) }}", "nested"),
    "format filter": ("{{ '%.999999999f' | format(1.5) }}", "width"),
    "tojson indent": ("{{ messages | tojson(indent=10**9) }}", "tojson"),
    "lipsum": ("{{ lipsum(10**9) }}", "lipsum"),
    "syntax": ("{% for %}", "compile"),
    "unknown tag": ("{% include 'x.jinja' %}", "failed"),
    "undefined call": ("{{ foo() }}", "undefined"),
    "python error": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "raise_exception": ("{{ raise_exception('no\x1b[31m\nway') }}", "no"),
    "attribute escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed"),
    "huge template": ("x" * (1 << 19), "characters long"),
}


def _render(source: str, limits: TemplateLimits) -> str:
    return ChatTemplate(source, origin=ORIGIN, limits=limits).render(
        MESSAGES, add_generation_prompt=True, special_tokens={})


def _bounded(source: str, limits: TemplateLimits, *, timeout: float = 10.0) -> dict[str, Any]:
    """Render in a forked child with 1 GiB more address space than now; what it raised, how long, how much."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        code = 0
        try:
            with open("/proc/self/statm") as f:
                size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
            tracemalloc.start()
            start = time.monotonic()
            try:
                _render(source, limits)
                outcome = {"error": None}
            except TokenizerError as e:
                outcome = {"error": str(e)}
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
                outcome = {"error": None, "other": f"{type(e).__name__}: {e}"[:500]}
            outcome["seconds"] = time.monotonic() - start
            outcome["peak"] = tracemalloc.get_traced_memory()[1]
            os.write(write, json.dumps(outcome).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"rendering did not end within {timeout} s")
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert data, "the child died without an answer (killed for memory?)"
    return json.loads(data)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_one_line_error_in_bounded_time_and_memory(name: str) -> None:
    source, expected = HOSTILE[name]
    outcome = _bounded(source, FAST)
    assert "other" not in outcome, outcome
    error = outcome["error"]
    assert error is not None, f"{name} rendered"
    assert error.startswith(f"chat template from {ORIGIN} "), error
    assert any(e in error for e in ((expected,) if isinstance(expected, str) else expected)), error
    assert "\n" not in error and "\x1b" not in error
    assert "out of memory" not in error  # refused by a bound, not saved by the address-space limit
    assert outcome["seconds"] < 2.0, outcome
    assert outcome["peak"] < 200 << 20, outcome


def test_default_deadline_stops_a_busy_template() -> None:
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="longer than 1 s"):
        _render(HOSTILE["nested loops"][0], TemplateLimits())
    assert time.monotonic() - start < 3.0


def test_real_templates_are_not_limited() -> None:
    """Long conversations and the features real templates use stay within the default limits."""
    source = (
        "{%- set ns = namespace(system='') -%}"
        "{%- for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content | trim %}{% endif %}{% endfor -%}"
        "{{ bos_token }}{{ ns.system }}"
        "{%- for m in messages if m.role != 'system' %}"
        "{{ '<|im_start|>' ~ m.role ~ '\n' ~ m.content.strip() ~ '<|im_end|>\n' }}"
        "{{ '%-10s|' % m.role }}{{ '{:>8}'.format(loop.index) }}{{ m | tojson(indent=2) | length }}"
        "{%- endfor %}{{ strftime_now('%Y') | length }}{{ range(100) | join(',') | length }}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "system", "content": " Be brief. "}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " + "word " * 200} for i in range(2000)]
    text = ChatTemplate(source, origin=ORIGIN).render(messages, add_generation_prompt=True, special_tokens={"bos_token": "<s>"})
    assert text.startswith("<s>Be brief.") and text.endswith("<|im_start|>assistant\n")
    assert len(text) > 2000 * 1000
    big = [{"role": "user", "content": "x" * 3_000_000}]  # bigger than the fixed budget: it grows with the input
    assert len(ChatTemplate(CHATML_TEMPLATE).render(big, add_generation_prompt=True, special_tokens={})) > 3_000_000


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("limits") / "chatml", require_fixture("stories260K", "hf"),
                          chat_template=CHATML_TEMPLATE, extra_special=("<|im_start|>", "<|im_end|>"),
                          eos_token="<|im_end|>")


def test_template_that_renders_nothing(hf_folder: Path) -> None:
    fmt = load_chat_format(load_tokenizer(hf_folder), chat_template="{% if false %}x{% endif %}  \n")
    with pytest.raises(TokenizerError, match="renders nothing"):
        fmt.encode_dialog(MESSAGES)


@pytest.mark.parametrize("case", ["syntax", "non-utf8", "bad json", "runtime"])
def test_broken_template_fails_only_when_a_chat_needs_it(hf_folder: Path, tmp_path: Path, case: str) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    if case == "syntax":
        (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    elif case == "non-utf8":
        (folder / "chat_template.jinja").write_bytes(b"{{ '\xff\xfe' }}")
    elif case == "bad json":
        (folder / "chat_template.json").write_text('{"chat_template": ')
    else:
        (folder / "chat_template.jinja").write_text("{{ messages[5].content }}{{ 1 // 0 }}")
    tok = load_tokenizer(folder)  # the tokenizer loads: raw completion does not need the template
    assert tok.encode("Hello", bos=False)
    fmt = load_chat_format(tok, folder)
    assert isinstance(fmt, BrokenChatFormat) == (case != "runtime")
    for call in (lambda: fmt.encode_dialog(MESSAGES),
                 lambda: fmt.encode_followup([*MESSAGES, {"role": "assistant", "content": "a"}], MESSAGES)):
        with pytest.raises(TokenizerError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert f"{folder}{os.sep}chat_template.j" in message, message
