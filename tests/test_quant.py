"""Quantized weights: exact GGUF 4-bit conversion, int8/int4 modules, load-time formats, dtype auto."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT
from typer.testing import CliRunner

import llamarun.device as device_mod
from fixtures_util import require_default_model, require_fixture
from gguf_util import (
    full_logits, k_quant_model, model_from_meta, quantize, roundtrip, tensor_types,
    write_llama_gguf,
)
from llamarun.cli import app
from llamarun.loaders import load_checkpoint
from llamarun.quant import (
    Int4Linear, Int4Parts, Int8Linear, Int8Parts, dequantize_int4, dequantize_int8, gguf_int4,
    int4_layout, quantize_int4, quantize_int8,
)

CPU = torch.device("cpu")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K], ids=lambda q: q.name)
def test_gguf_4bit_blocks_convert_exactly(qtype: QT) -> None:
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1))
    raw = quantize(w.numpy(), qtype)
    parts = gguf_int4(raw.reshape(-1), int(qtype), (48, 512))
    assert parts.group_size == 32 and parts.q.dtype == torch.uint8 and int(parts.q.max()) <= 15
    assert torch.equal(dequantize_int4(parts), roundtrip(w, qtype))


def test_int8_and_int4_rounding_stay_within_half_a_step() -> None:
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(2)) * 3
    p8 = quantize_int8(w)
    assert ((dequantize_int8(p8) - w).abs() <= p8.scale[:, None] / 2 + 1e-6).all()
    assert int(p8.q.abs().max()) == 127  # the largest value of each row uses the full range
    for g in (32, 64, 128):
        p4 = quantize_int4(w, g)
        step = p4.scale.repeat_interleave(g, dim=1)
        assert ((dequantize_int4(p4) - w).abs() <= step / 2 + 1e-5).all()
        assert p4.q.min() == 0 and p4.q.max() == 15


@pytest.mark.parametrize("kernel", ["cpu", None], ids=["kernel", "generic"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_quantized_linear_computes_the_dequantized_product(kernel: str | None, kind: str,
                                                           rows: int) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g)
    if kind == "int8":
        parts: Int8Parts | Int4Parts = quantize_int8(w)
        module: torch.nn.Module = Int8Linear(256, 96, kernel=kernel)
        state = Int8Linear.state(parts, device=CPU, dtype=torch.float32, kernel=kernel)
        ref_w = dequantize_int8(parts)
    else:
        parts = quantize_int4(w, 32)
        layout = int4_layout(CPU, 256, 96, 32) if kernel else "plain"
        module = Int4Linear(256, 96, group_size=32, layout=layout)
        state = Int4Linear.state(parts, device=CPU, dtype=torch.float32, layout=layout)
        ref_w = dequantize_int4(parts)
    module.load_state_dict(state, assign=True)
    x = torch.randn(2, rows, 256, generator=g)
    y = module(x)
    assert y.shape == (2, rows, 96) and y.dtype == torch.float32
    # The CPU kernels take bfloat16 activations and scales: about 0.3% relative error.
    assert _rel(y, x @ ref_w.t()) < (1e-2 if kernel else 1e-6)
    assert _rel(module.dense(torch.float32), ref_w) < (1e-2 if kernel else 1e-6)


@pytest.mark.parametrize("qtype,expect", [(QT.Q4_K, "int4 (group 32)"), (QT.Q4_0, "int4 (group 32)"),
                                          (QT.Q8_0, "int8"), (QT.Q6_K, "int8"), (QT.BF16, "bfloat16")],
                         ids=lambda v: getattr(v, "name", v))
def test_gguf_tensors_stay_quantized(qtype: QT, expect: str, tmp_path) -> None:
    sd, args = k_quant_model()
    types = tensor_types(sd, qtype)
    path = write_llama_gguf(tmp_path / f"k.{qtype.name}.gguf", sd, args, types)
    ck = load_checkpoint(path, device="cpu", dtype="bfloat16", max_seq_len=64)
    counts = ck.format_counts()
    matrices = 2 + 4 * args.n_layers  # embedding, output, 4 per layer
    if expect.startswith("int4"):  # the embedding is looked up row by row: int8
        assert counts == {expect: matrices - 1, "int8": 1}
    else:
        assert counts == {expect: matrices}
    # Stored about as the file has it: Q4_K's 4.5 bits a weight become 5 (bf16 scale and offset
    # per 32), a 4-bit embedding 8; a float32 copy would be 7x the file.
    weight_bytes = sum(t.numel() * t.element_size() for n, t in ck.model.state_dict().items()
                       if "kv_cache" not in n)
    assert weight_bytes <= 1.25 * path.stat().st_size
    ids = list(range(3, 40, 3))
    got = full_logits(ck.model, ids)
    dequantized = {k: roundtrip(v, types[k]) for k, v in sd.items()}
    expect_logits = full_logits(model_from_meta(dequantized, args), ids)
    # bfloat16 activations and requantization (int8 per row) cost a few percent, not more.
    assert _rel(got, expect_logits) < 0.05


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_q4_0_weights_store_no_zeros(qtype: QT, tmp_path) -> None:
    # Q4_0's zeros are all 0: in the CPU kernel's layout none is stored (or streamed per token);
    # Q4_1's are the blocks' minimums and stay. Either way the logits are the file's.
    sd, args = k_quant_model()
    types = tensor_types(sd, qtype)
    path = write_llama_gguf(tmp_path / f"k.{qtype.name}.gguf", sd, args, types)
    ck = load_checkpoint(path, device="cpu", dtype="float32", max_seq_len=64)
    symmetric = qtype == QT.Q4_0
    int4 = {n: f for n, f in ck.formats.items() if f.kind == "int4"}
    assert int4 and all(f.symmetric == symmetric for f in int4.values())
    module = ck.model.layers[0].feed_forward.w13
    assert isinstance(module, Int4Linear)
    if module.layout == "llamarun":
        assert (module.zeros.numel() == 0) == symmetric
    ids = list(range(3, 40, 3))
    dequantized = {k: roundtrip(v, types[k]) for k, v in sd.items()}
    expect_logits = full_logits(model_from_meta(dequantized, args), ids)
    assert _rel(full_logits(ck.model, ids), expect_logits) < 0.05
    if symmetric:  # (a Q4_1 zero, m + 8 d, is rounded to float16 in the kernel's layout)
        w = module.dense(torch.float32)
        layer = dequantized["layers.0.feed_forward.w1.weight"]
        assert torch.equal(w[:layer.shape[0]], layer.float())


def test_symmetric_int4_module_equals_the_one_with_zeros_stored() -> None:
    # The same Q4_0 numbers with and without stored zeros: the same product, bit for bit.
    g = torch.Generator().manual_seed(5)
    raw = quantize(torch.randn(48, 512, generator=g).numpy(), QT.Q4_0)
    parts = gguf_int4(raw.reshape(-1), int(QT.Q4_0), (48, 512))
    layout = int4_layout(CPU, 512, 48, 32)
    x = torch.randn(3, 512, generator=g)
    ys = []
    for symmetric in (False, True):
        module = Int4Linear(512, 48, group_size=32, layout=layout, symmetric=symmetric)
        module.load_state_dict(Int4Linear.state(parts, device=CPU, dtype=torch.float32,
                                                layout=layout, symmetric=symmetric), assign=True)
        ys.append((module(x), module(x.bfloat16()), module.dense(torch.float32)))
    for a, b in zip(*ys):
        assert torch.equal(a, b)
    assert torch.equal(ys[1][2], dequantize_int4(parts))
    with pytest.raises(ValueError, match="not 0"):
        Int4Linear.state(quantize_int4(torch.randn(48, 512, generator=g), 32), device=CPU,
                         dtype=torch.float32, layout="llamarun", symmetric=True)


def test_quantize_flag_on_a_dense_checkpoint() -> None:
    folder = require_fixture("stories260K", "meta")
    dense = load_checkpoint(folder, device="cpu", dtype="float32")
    ids = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421]
    ref = full_logits(dense.model, ids)
    assert set(dense.formats.values()) == {dense.formats["output.weight"]}  # all dense
    int8 = load_checkpoint(folder, device="cpu", dtype="float32", quantize="int8")
    assert int8.format_counts() == {"int8": 22}
    assert _rel(full_logits(int8.model, ids), ref) < 0.03
    int4 = load_checkpoint(folder, device="cpu", dtype="float32", quantize="int4", group_size=32)
    f = int4.formats
    # wqkv (128 x 64) and wo (64 x 64) fit groups of 32; w13 has 344 rows (not a multiple of 16)
    # and w2 rows of 172 values (not whole groups): those fall back to int8, as do the embedding
    # and the output layer.
    assert str(f["layers.0.attention.wqkv.weight"]) == "int4 (group 32)"
    assert str(f["layers.0.attention.wo.weight"]) == "int4 (group 32)"
    assert {str(f["layers.0.feed_forward.w13.weight"]), str(f["layers.0.feed_forward.w2.weight"]),
            str(f["output.weight"]), str(f["tok_embeddings.weight"])} == {"int8"}
    assert _rel(full_logits(int4.model, ids), ref) < 0.25  # 260K weights: 4 bits hurt


def test_auto_dtype_keeps_the_stored_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = require_fixture("stories260K", "meta")  # float32 weights
    hf = require_fixture("stories260K", "hf")  # bfloat16 weights
    for fast_bf16 in (False, True):  # whatever the CPU
        monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: fast_bf16)
        assert load_checkpoint(meta, device="cpu").dtype == torch.float32
        assert load_checkpoint(hf, device="cpu").dtype == torch.bfloat16  # not inflated
    assert load_checkpoint(hf, device="cpu", dtype="float32").dtype == torch.float32  # if asked
    cpu = torch.device("cpu")
    assert device_mod.default_dtype(cpu, torch.float16) == torch.bfloat16
    assert device_mod.default_dtype(cpu, None) == torch.bfloat16  # quantized, native bf16
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: False)
    assert device_mod.auto_dtype(cpu, None) == (
        torch.float32, "quantized weights; this CPU has no native bfloat16")


def test_default_model_runs_as_stored() -> None:
    path = require_default_model()
    ck = load_checkpoint(path, device="cpu", dtype="float32", max_seq_len=64)
    assert ck.format_counts() == {"int4 (group 32)": 120, "int8": 1}  # Q4_1 layers, Q8_0 embedding
    weight_bytes = sum(t.numel() * t.element_size() for n, t in ck.model.state_dict().items()
                       if "kv_cache" not in n and n != "output.weight")
    assert weight_bytes < path.stat().st_size  # dequantized to float32 it would be 5.5x
    dense = load_checkpoint(path, device="cpu", dtype="float32", max_seq_len=64, quantize="none")
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 2402, 30, 216, 198, 504, 3458]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got, ref = full_logits(ck.model, ids), full_logits(dense.model, ids)
    finally:
        torch.set_num_threads(threads)
    assert _rel(got, ref) < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_info_says_what_each_tensor_became() -> None:
    require_default_model()
    import json

    r = CliRunner().invoke(app, ["info", "--json"], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["weights"] == {"int8": 1, "int4 (group 32)": 120}
    assert d["stored_as"]["layers.0.attention.wqkv.weight"] == "Q4_1 -> int4 (group 32)"
    assert d["stored_as"]["tok_embeddings.weight"] == "Q8_0 -> int8"


@pytest.mark.parametrize("flags,message", [
    (["--quantize", "int3"], "--quantize must be one of auto, none, int8, int4, got 'int3'"),
    (["--quantize", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128, got 48"),
])
def test_bad_quantize_flags_are_one_line(flags: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["info", *flags], env={"LLAMARUN_MODEL": None})
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {message}"


def test_gguf_int4_rejects_other_types() -> None:
    with pytest.raises(ValueError):
        gguf_int4(np.zeros(34, np.uint8), int(QT.Q8_0), (1, 32))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.F16], ids=lambda q: q.name)
def test_row_blocks_read_the_same_numbers_as_whole_tensors(qtype: QT, tmp_path) -> None:
    # Large quantized embeddings are converted a block of rows at a time (bounded memory).
    from llamarun.loaders.fuse import _int8_by_rows
    from llamarun.loaders.gguf import read_gguf

    sd, args = k_quant_model()
    path = write_llama_gguf(tmp_path / "k.gguf", sd, args, tensor_types(sd, qtype))
    raw = read_gguf(path)
    name = "tok_embeddings.weight"
    whole = raw.get(name).float()
    assert torch.equal(raw.get_rows(name, 17, 200).float(), whole[17:200])
    by_rows = _int8_by_rows(raw, name, tuple(whole.shape))
    once = quantize_int8(whole)
    assert torch.equal(by_rows.q, once.q) and torch.equal(by_rows.scale, once.scale)
