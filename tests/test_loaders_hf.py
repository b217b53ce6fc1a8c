"""HF folders: sharded safetensors, pytorch_model.bin, tied embeddings; and loader errors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from llamarun.config import ModelArgs
from llamarun.errors import CheckpointError, ConfigError
from llamarun.device import attention_dtype
from llamarun.loaders import detect_layout, load_checkpoint
from model_util import (meta_to_hf, random_meta_state_dict, rel_err, split_meta,
                        transformers_model, write_hf_folder, write_meta_folder)

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=64,
                 head_dim=8, max_seq_len=128)
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 8]])


def run(ck) -> torch.Tensor:
    ck.model.reset_caches()
    with torch.inference_mode():
        return ck.model(TOKENS, torch.arange(TOKENS.shape[1]))


@pytest.fixture(scope="module")
def sd():
    return random_meta_state_dict(ARGS, seed=3)


@pytest.fixture(scope="module")
def reference(sd):
    with torch.inference_mode():
        return transformers_model(ARGS, sd)(TOKENS).logits


def test_sharded_safetensors_with_index(tmp_path, sd, reference):
    folder = write_hf_folder(tmp_path / "m", ARGS, sd, shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    assert rel_err(run(load_checkpoint(folder, device="cpu", dtype="float32")), reference) <= 1e-4


def test_pytorch_model_bin_shards(tmp_path, sd, reference):
    folder = tmp_path / "bin"
    folder.mkdir()
    hf_sd = meta_to_hf(sd, ARGS)
    names = sorted(hf_sd)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: hf_sd[n] for n in part}, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text((write_hf_folder(tmp_path / "c", ARGS, sd) /
                                         "config.json").read_text())
    assert rel_err(run(load_checkpoint(folder, device="cpu", dtype="float32")), reference) <= 1e-4


def test_missing_lm_head_means_tied_embeddings(tmp_path):
    tied = ARGS.replace(tie_embeddings=True)
    sd = random_meta_state_dict(tied, seed=4)
    folder = write_hf_folder(tmp_path / "t", ARGS, sd)  # config says untied, no lm_head in file
    ck = load_checkpoint(folder, device="cpu", dtype="float32")
    assert ck.args.tie_embeddings
    assert ck.model.output.weight.data_ptr() == ck.model.tok_embeddings.weight.data_ptr()
    with torch.inference_mode():
        ref = transformers_model(tied, sd)(TOKENS).logits
    assert rel_err(run(ck), ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_are_close_to_float32(tmp_path, sd, reference, dtype):
    ck = load_checkpoint(write_hf_folder(tmp_path / "h", ARGS, sd), device="cpu", dtype=dtype)
    assert ck.model.tok_embeddings.weight.dtype == dtype
    # The cache (and attention) run in float32 on CPU, where 16-bit attention is slow.
    assert ck.model.layers[0].attention.kv_cache.k_cache.dtype == attention_dtype(ck.device, dtype)
    assert rel_err(run(ck), reference) <= 5e-2


def test_meta_folder_of_the_same_weights_matches(tmp_path, sd, reference):
    folder = write_meta_folder(tmp_path / "m", _params(), split_meta(sd, 2, embedding_dim=1))
    ck = load_checkpoint(folder, device="cpu", dtype="float32")
    assert ck.args.replace(max_seq_len=ARGS.max_seq_len) == ARGS
    assert rel_err(run(ck), reference) <= 1e-4


# --- errors: typed, one line, naming the file and the tensor -----------------------------

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        detect_layout(tmp_path)


def test_missing_tensor_names_file_and_tensor(tmp_path, sd):
    broken = {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w2.weight"}
    folder = write_meta_folder(tmp_path / "m", _params(), [broken])
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.weight is missing"):
        load_checkpoint(folder, device="cpu")


def test_misshaped_tensor_names_file_and_tensor(tmp_path, sd):
    broken = dict(sd)
    broken["layers.0.attention.wk.weight"] = torch.zeros(8, 32)
    folder = write_hf_folder(tmp_path / "h", ARGS, broken)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor layers\.0\.attention"
                                              r"\.wk\.weight has shape \(8, 32\), expected \(16, 32\)"):
        load_checkpoint(folder, device="cpu")


def test_config_inconsistent_with_weights(tmp_path, sd):
    folder = write_hf_folder(tmp_path / "h", ARGS, sd)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.2\.\S+ is missing"):
        load_checkpoint(folder, device="cpu")


def test_unexpected_tensor(tmp_path, sd):
    extra = dict(sd)
    extra["layers.0.attention.wq.bias"] = torch.zeros(32)
    folder = write_meta_folder(tmp_path / "m", _params(), [extra])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: unexpected tensor "
                                              r"layers\.0\.attention\.wq\.bias"):
        load_checkpoint(folder, device="cpu")


def test_corrupt_files(tmp_path, sd):
    folder = write_hf_folder(tmp_path / "h", ARGS, sd)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_checkpoint(folder, device="cpu")
    meta = write_meta_folder(tmp_path / "m", _params(), [sd])
    (meta / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot read"):
        load_checkpoint(meta, device="cpu")
    (meta / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="params.json: not valid JSON"):
        load_checkpoint(meta, device="cpu")


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_arbitrary_pickles_are_never_executed(tmp_path, sd):
    meta = write_meta_folder(tmp_path / "m", _params(), [sd])
    with open(meta / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_checkpoint(meta, device="cpu")


def test_shard_gap_and_mismatched_shards(tmp_path, sd):
    shards = split_meta(sd, 2, embedding_dim=0)
    folder = write_meta_folder(tmp_path / "m", _params(), shards)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth is missing"):
        load_checkpoint(folder, device="cpu")
    shards[1].pop("norm.weight")
    folder = write_meta_folder(tmp_path / "m2", _params(), shards)
    with pytest.raises(CheckpointError, match="norm.weight is not in every shard"):
        load_checkpoint(folder, device="cpu")


def _params() -> dict:
    return {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100,
            "multiple_of": 64, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5}


def test_progress_reports_each_layer(tmp_path, sd):
    calls = []
    load_checkpoint(write_hf_folder(tmp_path / "p", ARGS, sd), device="cpu",
                    progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, ARGS.n_layers + 1) for i in range(1, ARGS.n_layers + 2)]
