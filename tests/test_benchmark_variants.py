"""benchmarks/variants.py: the random models drawn directly in their encoding (the 8B shape's
way) are files llamarun loads, with the sizes, untied output and value spread asked for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")


def _load_variants():  # noqa: ANN202
    """benchmarks/variants.py by its path: benchmarks/ never goes on sys.path, where its
    script names would shadow installed packages for every later test (once a file named
    kernels.py there hid Hugging Face's `kernels` package from transformers)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "variants.py"
    spec = importlib.util.spec_from_file_location("llamarun_benchmarks_variants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


variants = _load_variants()

from llamarun.loaders import load_checkpoint  # noqa: E402
from llamarun.loaders.gguf import dequantize_tensor, read_gguf_file  # noqa: E402
from llamarun.model import Span  # noqa: E402


def test_random_encoded_blocks_decode_to_the_spread_of_random_tensor() -> None:
    qt = variants.QT
    for qtype in (qt.Q4_0, qt.Q8_0):
        raw = variants.random_encoded(3, (64, 256), qtype)
        assert raw.nbytes == variants.encoded_nbytes((64, 256), qtype)
        values = variants.gguf.quants.dequantize(raw, qtype).reshape(-1)
        assert values.size == 64 * 256
        assert 0.017 < float(values.std()) < 0.023, qtype
        assert abs(float(values.mean())) < 0.002
        again = variants.random_encoded(3, (64, 256), qtype)
        assert np.array_equal(raw, again)  # seeded per tensor
        assert not np.array_equal(raw, variants.random_encoded(4, (64, 256), qtype))
    with pytest.raises(ValueError):
        variants.random_encoded(0, (4, 32), qt.Q4_1)


def test_an_untied_random_model_written_encoded_loads_and_runs(tmp_path: Path) -> None:
    shape = variants.Llama1BShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                  vocab_size=512, context=64, tied=False, name="tiny untied")
    plan = list(variants._llama_plan(shape))
    assert plan[-1].name == "output.weight"
    index = {t.name: i for i, t in enumerate(plan)}
    paths = variants.write_variants(
        tmp_path, "tiny", "llama", variants._llama_fields(shape), plan, None, ("Q4_0",),
        lambda name, s, q: variants.random_encoded(index[name], s, q))
    path = paths["Q4_0"]
    file = read_gguf_file(path)
    assert file.tensors["token_embd.weight"].type_name == "Q8_0"
    assert file.tensors["output.weight"].type_name == "Q4_0"
    emb = dequantize_tensor(file, "token_embd.weight")
    out = dequantize_tensor(file, "output.weight")
    assert not torch.equal(emb, out)  # untied
    ck = load_checkpoint(path, device="cpu", dtype="float32", max_seq_len=16)
    logits = ck.model.forward_spans(torch.tensor([1, 5, 9]), [Span(0, 0, 3)])
    assert logits.shape == (3, 512) and torch.isfinite(logits).all()
