"""A seeded corpus of varied strings for comparing tokenizers with their references, plus HF test folders."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

# Hand-written tricky cases: whitespace edges, special-token text in user input, byte-fallback material.
TRICKY: list[str] = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    " \t \n ",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  Hello   world  ",
    "Hello\n\nworld\n",
    "\r\n\r\nWindows line endings\r\n",
    "This is a test sentence.",
    "<s>",
    "</s>",
    "<unk>",
    "<s>[INST] <<SYS>>\nhi\n<</SYS>>\n\nquestion [/INST]",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_5|><|python_tag|><|eom_id|>",
    "<|im_start|>user\nhello<|im_end|>",
    "<|endoftext|>",
    "a<s>b</s>c",
    "1234567890",
    "3.14159265358979",
    "-1,000,000.00 €",
    "2024-01-31T23:59:59Z",
    "https://example.com/path?query=1&x=%20y#frag",
    "user@example.org",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, {"nested": null}], "s": "\\u00e9"}',
    "    indented\n        more\n",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 문장입니다.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир!",
    "Ελληνικά κείμενα",
    "עברית",
    "ไทย",
    "😀😃😄",
    "👨‍👩‍👧‍👦 family",
    "🏳️‍🌈 flag",
    "👍🏽 thumbs",
    "é vs é (combining)",
    "ﬁ ligature, Ⅻ numeral, ① circled",
    "zero\u200bwidth\u200cjoin\u200d",
    "\u00a0non-breaking\u00a0space",
    "\u3000ideographic space",
    "tab\tseparated\tvalues",
    "CAPS lock AND MiXeD CaSe",
    "don't won't they're I'm we'll he'd it's",
    "DON'T WON'T THEY'RE",
    "....!!!???,,,;;;",
    "a" * 300,
    " " * 100,
    "\n" * 50,
    "ab " * 100,
    "\x00\x01\x7f control chars",
    "\ufeffBOM at start",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛",
    "▁already▁has▁metaspace",
    "Ġbyte Ġlevel Ċ",
    "<0xE2><0x82><0xAC>",
]

_PROSE = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the sunshine.",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "Tokenizers split text into pieces.",
    "Llama models predict the next token.",
    "However, the results were inconclusive.",
    "Why? Because nobody asked.",
    "\"Quoted speech,\" she said.",
    "(parenthetical remark)",
]
_CODE = [
    "import numpy as np",
    "x = np.zeros((3, 4), dtype=np.float32)",
    "if __name__ == '__main__':",
    "    main()",
    "fn main() -> Result<(), Box<dyn Error>> {",
    "SELECT * FROM users WHERE id = 42;",
    "<div class=\"box\">&nbsp;</div>",
    "$ ls -la | grep '.py' > out.txt",
    "#include <stdio.h>",
    "console.log(`value: ${v}`);",
]
_NUMBERS = ["0", "7", "42", "123456", "3.5", "1e-9", "0xFF", "2^31-1", "99.99%", "1/3", "007", "1,234"]
_URLS = ["http://a.b", "https://github.com/meta-llama/llama3", "ftp://x.y/z", "www.example.com/a_b-c", "C:\\Users\\x"]
_MULTI = [
    "東京", "我爱你", "ありがとう", "사랑해", "السلام عليكم", "हिन्दी", "Москва", "Ünïcödé", "çà et là", "straße",
    "Ελλάδα", "ภาษาไทย", "Tiếng Việt", "עִבְרִית", "ქართული", "Українська", "नमस्कार", "漢字かなカナ",
]
_EMOJI = ["😀", "🚀", "👩‍💻", "👨‍👩‍👧", "🏳️‍⚧️", "❤️", "🇫🇷", "👋🏿", "🤖", "🧑‍🔬", "✨", "🙂‍↔️"]
_SPECIAL = [
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>",
    "<|reserved_special_token_0|>", "<|im_start|>", "<|im_end|>", "<|",
]
_SPACES = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\n ", "", "\r\n", "    ", " " * 9]
_CATEGORIES = [_PROSE, _CODE, _NUMBERS, _URLS, _MULTI, _EMOJI, _SPECIAL]


def build_corpus(n: int = 1000, seed: int = 1234) -> list[str]:
    """`TRICKY` plus `n` random mixtures of prose, code, numbers, URLs, scripts, emoji and special-token text."""
    rng = random.Random(seed)
    out = list(TRICKY)
    for _ in range(n):
        parts: list[str] = []
        if rng.random() < 0.2:
            parts.append(rng.choice(_SPACES))
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(rng.choice(_CATEGORIES)))
            parts.append(rng.choice(_SPACES))
        if rng.random() < 0.5:
            parts.pop()
        if rng.random() < 0.1:  # a few random code points, including rare planes
            parts.append("".join(chr(rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0x1F000, 0x1FAFF)])) for _ in range(3)))
        out.append("".join(parts))
    return [s for s in out if not any(0xD800 <= ord(c) <= 0xDFFF for c in s)]


CORPUS: list[str] = build_corpus()


# ---- Hugging Face test folders built from the shared fixtures (written under tmp_path, never into the repo) ----

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML_TEMPLATE = (  # SmolLM2-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (  # meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

FEATURES_TEMPLATE = (  # exercises tojson (ensure_ascii=False), namespace, loop controls, trim/lstrip blocks
    "{%- set ns = namespace(n=0) -%}\n"
    "{{ bos_token }}\n"
    "{% for m in messages %}\n"
    "    {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
    "    {% set ns.n = ns.n + 1 %}\n"
    "<{{ m['role'] }} n={{ ns.n }}>{{ m | tojson }}</{{ m['role'] }}>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_hf_folder(
    dest: Path,
    source: Path,
    *,
    chat_template: str | None = None,
    extra_special: Sequence[str] = (),
    eos_token: str = "</s>",
) -> Path:
    """Copy stories260K/hf's tokenizer files to `dest` so transformers loads tokenizer.json verbatim."""
    import tokenizers

    dest.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    if extra_special:
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in extra_special])
    tok.save(str(dest / "tokenizer.json"))
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 would otherwise rebuild a Llama pipeline
    cfg["eos_token"] = eos_token
    cfg.pop("added_tokens_decoder", None)
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    shutil.copy(source / "generation_config.json", dest / "generation_config.json")
    return dest


@lru_cache(maxsize=2)
def _llama3_tokenizer_json(fixtures: Path) -> str:
    """tokenizer.json text converted from Meta's tiktoken file by transformers (cached: ~2 s per conversion)."""
    import tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = json.loads((fixtures / "llama3-tokenizer" / "special_tokens.json").read_text())
    names = [name for name, _ in spec["conventions"]["llama3.1+"]["special_tokens"]]
    tok = TikTokenConverter(
        vocab_file=str(fixtures / "llama3-tokenizer" / "tokenizer.model"), pattern=spec["pat_str"], extra_special_tokens=names
    ).converted()
    tok.post_processor = tokenizers.processors.TemplateProcessing(  # what Meta's HF repos ship
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", 128000)]
    )
    return tok.to_str()


def make_llama3_hf_folder(dest: Path, fixtures: Path, *, chat_template: str | None = LLAMA3_TEMPLATE) -> Path:
    """A Llama-3-Instruct-like HF folder: tokenizer.json converted from Meta's tiktoken file by transformers."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(_llama3_tokenizer_json(fixtures), encoding="utf-8")
    cfg: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    (dest / "generation_config.json").write_text(json.dumps(gen))
    return dest
