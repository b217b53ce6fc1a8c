"""GGUF loading: metadata, every supported tensor type, tied output, errors, and SmolLM2 vs transformers."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT

from fixtures_util import require_fixture, require_default_model
from gguf_util import (
    k_quant_model,
    full_logits,
    greedy,
    model_from_meta,
    roundtrip,
    tensor_types,
    write_llama_gguf,
)
from llamarun.config import ModelArgs, RopeScaling, read_json
from llamarun.errors import CheckpointError, ConfigError
from llamarun.loaders import load_checkpoint, read_checkpoint
from llamarun.loaders.gguf import dequantize_tensor, read_gguf, read_gguf_file
from llamarun.rope import rope_frequencies

# "Once upon a time, there was a little girl named Lily. She loved" in tok512 ids, with BOS.
STORY_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
             401, 396]

# Max |logit difference| to the original float32 model, per type, about twice what was measured
# (stories260K's logits span about ±15 and its 260K weights are very sensitive to 4-bit rounding;
# measured: F16 0.011, BF16 0.081, Q8_0 0.21, Q5_0 1.95, Q5_1 1.72, Q4_0 4.5, Q4_1 3.0;
# the random K-quant model: Q6_K 0.31, Q5_K 0.59, Q4_K 1.32).
TOLERANCE = {QT.F32: 0.0, QT.F16: 0.025, QT.BF16: 0.2, QT.Q8_0: 0.5, QT.Q5_0: 4.0, QT.Q5_1: 3.5,
             QT.Q4_0: 9.0, QT.Q4_1: 6.0, QT.Q6_K: 0.6, QT.Q5_K: 1.2, QT.Q4_K: 2.6}
BLOCK_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q4_0, QT.Q4_1]
K_TYPES = [QT.Q6_K, QT.Q5_K, QT.Q4_K]


@pytest.fixture(scope="module")
def stories() -> tuple[dict[str, torch.Tensor], ModelArgs]:
    folder = require_fixture("stories260K", "meta")
    sd = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)
    args = ModelArgs.from_params(read_json(folder / "params.json"))
    return {k: v.float() for k, v in sd.items()}, args


@pytest.fixture(scope="module")
def stories_ref(stories) -> torch.Tensor:
    sd, args = stories
    return full_logits(model_from_meta(sd, args), STORY_IDS)


def _load(path: Path, dtype: str = "float32"):
    # Dequantized (quantize="none"): the numbers must equal a float32 model's; the quantized
    # storage of the same files is tested in test_quant.py.
    return load_checkpoint(path, device="cpu", dtype=dtype, max_seq_len=64, quantize="none")


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_stories_gguf_in_each_type_matches_float32_model(qtype, stories, stories_ref, tmp_path):
    sd, args = stories
    types = tensor_types(sd, qtype)  # ffn_down rows (172) fit no 32-block: F16, as llama.cpp falls back
    path = write_llama_gguf(tmp_path / f"stories.{qtype.name}.gguf", sd, args, types)
    ck = _load(path)
    assert ck.layout == "gguf"
    assert ck.args == args.replace(tie_embeddings=False)
    got = full_logits(ck.model, STORY_IDS)
    # Same numbers as a float32 model holding the dequantized weights: layout, names, q/k order.
    dequantized = {k: roundtrip(v, types[k]) for k, v in sd.items()}
    expect = full_logits(model_from_meta(dequantized, args), STORY_IDS)
    if qtype == QT.F32:
        assert torch.equal(got, stories_ref)
    else:
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-5)
    err = (got - stories_ref).abs().max().item()
    assert err <= TOLERANCE[qtype], f"{qtype.name}: max logit error {err}"
    assert got[-1].argmax() == stories_ref[-1].argmax() or qtype in (QT.Q4_0, QT.Q4_1)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_quant_gguf_matches_float32_model(qtype, tmp_path):
    sd, args = k_quant_model()
    types = tensor_types(sd, qtype)
    assert all(t == qtype for k, t in types.items() if sd[k].dim() == 2)
    path = write_llama_gguf(tmp_path / f"k.{qtype.name}.gguf", sd, args, types)
    raw = read_gguf(path)
    assert raw.extra["tensor_types"] == sorted(["F32", qtype.name])
    ck = _load(path)
    ids = list(range(3, 40, 3))
    got = full_logits(ck.model, ids)
    dequantized = {k: roundtrip(v, types[k]) for k, v in sd.items()}
    torch.testing.assert_close(got, full_logits(model_from_meta(dequantized, args), ids),
                               atol=1e-4, rtol=1e-5)
    ref = full_logits(model_from_meta(sd, args), ids)
    err = (got - ref).abs().max().item()
    assert err <= TOLERANCE[qtype], f"{qtype.name}: max logit error {err}"


def test_tied_output_when_output_weight_is_absent(stories, tmp_path):
    sd, args = stories
    tied = {k: v for k, v in sd.items() if k != "output.weight"}
    path = write_llama_gguf(tmp_path / "tied.gguf", tied, args, tensor_types(tied, QT.F32))
    ck = _load(path)
    assert ck.args.tie_embeddings
    assert ck.model.output.weight is ck.model.tok_embeddings.weight
    # stories260K's classifier is a copy of the embedding, so tied == untied.
    torch.testing.assert_close(full_logits(ck.model, STORY_IDS),
                               full_logits(model_from_meta(sd, args), STORY_IDS), atol=0, rtol=0)


def test_bfloat16_load_of_f16_file(stories, stories_ref, tmp_path):
    sd, args = stories
    path = write_llama_gguf(tmp_path / "f16.gguf", sd, args, tensor_types(sd, QT.F16))
    ck = _load(path, "bfloat16")
    assert ck.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert (full_logits(ck.model, STORY_IDS) - stories_ref).abs().max() < 0.5


def test_folder_with_one_gguf_and_header_matches_gguf_reader(stories, tmp_path):
    sd, args = stories
    path = write_llama_gguf(tmp_path / "m.gguf", sd, args, tensor_types(sd, QT.Q8_0),
                            chat_template="{{ messages[0]['content'] }}")
    raw = read_checkpoint(tmp_path)
    assert raw.layout == "gguf" and raw.path == path
    assert raw.extra["chat_template"] == "{{ messages[0]['content'] }}"
    ours = read_gguf_file(path)
    ref = gguf.GGUFReader(path)
    assert ours.version == 3
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type and info.offset == t.data_offset
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(ours.tensor_bytes(t.name), np.asarray(t.data).view(np.uint8).ravel())
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            value = ours.metadata[key]
            assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents()


def test_metadata_into_model_args(stories, tmp_path):
    sd, args = stories

    def extra(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    path = write_llama_gguf(tmp_path / "lin.gguf", sd, args, tensor_types(sd, QT.F32), extra=extra)
    got = read_gguf(path).args
    assert got == args.replace(rope_scaling=RopeScaling(rope_type="linear", factor=2.0))


def test_llama31_rope_freqs_tensor_becomes_llama3_scaling(tmp_path):
    sd, args = k_quant_model()
    args = args.replace(rope_theta=500000.0)
    want = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)
    base = rope_frequencies(args.head_dim, args.rope_theta, None).double()
    divisors = (base / rope_frequencies(args.head_dim, args.rope_theta, want).double()).float()

    def extra(w: gguf.GGUFWriter) -> None:
        w.add_tensor("rope_freqs.weight", divisors.numpy())
        w.add_rope_scaling_orig_ctx_len(64)

    path = write_llama_gguf(tmp_path / "l31.gguf", sd, args, tensor_types(sd, QT.F32), extra=extra)
    raw = read_gguf(path)
    assert raw.args.rope_scaling == want
    assert "rope_freqs.weight" not in raw.names


def test_other_architecture_is_a_clear_error(stories, tmp_path):
    sd, args = stories
    path = write_llama_gguf(tmp_path / "q.gguf", sd, args, tensor_types(sd, QT.F32),
                            architecture="qwen2")
    with pytest.raises(ConfigError, match=r"q\.gguf.*architecture 'qwen2' is not supported"):
        read_gguf(path)


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    sd, args = k_quant_model()
    types = tensor_types(sd, QT.F16)
    path = tmp_path / "q2k.gguf"

    def extra(w: gguf.GGUFWriter) -> None:
        size = gguf.GGML_QUANT_SIZES[QT.Q2_K][1] * args.dim // 256
        w.add_tensor("blk.0.ffn_up.weight", np.zeros((args.hidden_dim, size), np.uint8),
                     raw_dtype=QT.Q2_K)

    del sd["layers.0.feed_forward.w3.weight"]
    write_llama_gguf(path, sd, args, types, extra=extra)
    with pytest.raises(CheckpointError, match=r"q2k\.gguf: tensor blk\.0\.ffn_up\.weight has type "
                                              r"Q2_K, which llamarun does not support"):
        _load(path)


def test_truncated_and_non_gguf_files_are_clear_errors(stories, tmp_path):
    sd, args = stories
    path = write_llama_gguf(tmp_path / "t.gguf", sd, args, tensor_types(sd, QT.F32))
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: tensor .* extends past the end"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"head\.gguf: truncated GGUF header"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + data[4:200])
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a GGUF file"):
        read_gguf(tmp_path / "bad.gguf")


def test_fast_paths_equal_gguf_dequantize(tmp_path):
    """dequantize_tensor returns exactly gguf-py's numbers (F16/BF16 as stored, others float32)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 256, generator=g)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    qtypes = [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
    from gguf_util import quantize

    blobs = {q: quantize(w.numpy(), q) for q in qtypes}
    for q, data in blobs.items():
        writer.add_tensor(q.name, data, raw_dtype=None if q == QT.F16 else q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = read_gguf_file(tmp_path / "t.gguf")
    for q, data in blobs.items():
        got = dequantize_tensor(f, q.name)
        want = torch.from_numpy(data.astype(np.float32) if q == QT.F16
                                else gguf.quants.dequantize(data, q))
        assert got.shape == (8, 256)
        assert torch.equal(got.float(), want), q.name


# ---- the real default model against transformers ----

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nName three colors of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return require_default_model()


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    """transformers' own GGUF conversion (config, dequantization, q/k permutation, tying)."""
    transformers = pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    else:
        # from_pretrained(gguf_file=...) refuses to run without `accelerate` (a declared test
        # extra); this is the conversion it runs, called directly.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights

        config = transformers.AutoConfig.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
        with no_init_weights():  # every weight is overwritten below; random init takes seconds
            model = transformers.LlamaForCausalLM(config).float()
        tensors = load_gguf_checkpoint(str(smollm2), return_tensors=True,
                                       model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
        assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
        model.tie_weights()
    assert isinstance(model, transformers.LlamaForCausalLM) and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.dtype == torch.float32
    return model.eval()


@pytest.fixture(scope="module")
def ours_smollm2(smollm2):
    return load_checkpoint(smollm2, device="cpu", dtype="float32", max_seq_len=96, quantize="none")


def test_smollm2_metadata(ours_smollm2):
    args = ours_smollm2.args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (576, 30, 9, 3, 1536)
    assert (args.vocab_size, args.head_dim, args.rope_theta, args.max_seq_len) == (49152, 64, 100000.0, 8192)
    assert args.tie_embeddings and args.rope_scaling is None
    assert ours_smollm2.raw.extra["tensor_types"] == ["F32", "Q4_1", "Q8_0"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_matches_transformers(prompt, smollm2, ours_smollm2, hf_smollm2):
    from llamarun.tokenizer.gguf import load_gguf_tokenizer

    ids = load_gguf_tokenizer(smollm2).encode_with_special(prompt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps of a 135M model: 2 threads were ~4x slower on 2 cores
    try:
        ours, steps = greedy(ours_smollm2.model, ids, 32)
    finally:
        torch.set_num_threads(threads)
    # transformers' greedy continuation equals ours iff, fed our tokens, its argmax at every step
    # is our next token: one forward pass checks all 32 steps (and their logits).
    with torch.inference_mode():
        logits = hf_smollm2(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1:]
    assert logits.argmax(-1).tolist() == ours
    torch.testing.assert_close(torch.stack(steps), logits, atol=2e-3, rtol=1e-4)


def test_smollm2_load_is_fast(smollm2):
    start = time.perf_counter()
    ck = load_checkpoint(smollm2, device="cpu", dtype="bfloat16", max_seq_len=64, quantize="none")
    elapsed = time.perf_counter() - start
    assert ck.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert elapsed < 30  # a few seconds on 2 cores; generous against a busy machine
