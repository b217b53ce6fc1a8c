"""Meta folders: the real stories260K model, Meta vs HF layouts, and model-parallel shards."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_util import require_fixture
from llamarun.config import ModelArgs
from llamarun.loaders import load_checkpoint
from llamarun.loaders.meta import merge_shards
from llamarun.rope import rope_frequencies
from model_util import rel_err, split_meta, transformers_model, write_meta_folder

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def stories():
    return require_fixture("stories260K")


@pytest.fixture(scope="module")
def meta_sd(stories):
    return torch.load(stories / "meta" / "consolidated.00.pth", weights_only=True)


@pytest.fixture(scope="module")
def prompt_ids(stories):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(stories / "meta" / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(PROMPT)


def logits(model, ids: list[int]) -> torch.Tensor:
    model.reset_caches()
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids)))


def test_meta_and_hf_layouts_give_identical_logits_in_bfloat16(stories, prompt_ids):
    # hf/ holds the Meta weights rounded to bfloat16 and permuted: loaded in bf16 both are equal.
    meta = load_checkpoint(stories / "meta", device="cpu", dtype="bfloat16")
    hf = load_checkpoint(stories / "hf", device="cpu", dtype="bfloat16")
    assert meta.layout == "meta" and hf.layout == "hf"
    assert meta.args.replace(max_seq_len=hf.args.max_seq_len) == hf.args  # HF wrote 4096
    for name, t in meta.model.state_dict().items():
        assert torch.equal(t, hf.model.state_dict()[name]), name
    assert torch.equal(logits(meta.model, prompt_ids), logits(hf.model, prompt_ids))


def test_hf_load_matches_transformers_on_hf_folder(stories, prompt_ids):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(stories / "hf", dtype=torch.float32).eval()
    ours = load_checkpoint(stories / "hf", device="cpu", dtype="float32")
    with torch.inference_mode():
        theirs = ref(torch.tensor([prompt_ids])).logits
    assert rel_err(logits(ours.model, prompt_ids), theirs) <= 1e-4


def test_greedy_tokens_match_transformers_on_real_fp32_weights(stories, meta_sd, prompt_ids):
    ours = load_checkpoint(stories / "meta", device="cpu", dtype="float32")
    ref = transformers_model(ours.args, meta_sd)
    steps = 32
    with torch.inference_mode():
        theirs = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False,
                              min_new_tokens=steps, attention_mask=torch.ones(1, len(prompt_ids),
                                                                               dtype=torch.long))
        theirs = theirs[0, len(prompt_ids):].tolist()
        model = ours.model
        model.reset_caches()
        out = model(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids)),
                    output_idx=torch.tensor([len(prompt_ids) - 1]))
        mine = []
        pos = len(prompt_ids)
        for _ in range(steps):
            nxt = int(out[0, -1].argmax())
            mine.append(nxt)
            out = model(torch.tensor([[nxt]]), torch.tensor([pos]))
            pos += 1
    assert mine == theirs
    assert len(set(mine)) > 5  # a real story, not one repeated token


@pytest.mark.parametrize("n_shards", [2, 4])
@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_sharded_meta_checkpoint_loads_to_identical_logits(stories, meta_sd, prompt_ids, tmp_path,
                                                           n_shards, style):
    params = json.loads((stories / "meta" / "params.json").read_text())
    if style == "llama2":
        # Llama 2: ParallelEmbedding splits the embedding dim; vocab_size -1; rope.freqs buffer.
        params["vocab_size"] = -1
        freqs = rope_frequencies(8, 10000.0, None)
        shards = split_meta(meta_sd, n_shards, embedding_dim=1, rope_freqs=freqs)
    else:
        shards = split_meta(meta_sd, n_shards, embedding_dim=0)
    assert shards[0]["tok_embeddings.weight"].shape != meta_sd["tok_embeddings.weight"].shape
    folder = write_meta_folder(tmp_path / f"{style}-{n_shards}", params, shards)
    whole = load_checkpoint(stories / "meta", device="cpu", dtype="float32")
    split = load_checkpoint(folder, device="cpu", dtype="float32")
    assert split.raw.extra["n_shards"] == n_shards
    assert split.args == whole.args
    for name, t in whole.model.state_dict().items():
        assert torch.equal(t, split.model.state_dict()[name]), name
    assert torch.equal(logits(whole.model, prompt_ids), logits(split.model, prompt_ids))


def test_more_shards_than_kv_heads_keeps_each_head_once():
    # 8 shards, 4 KV heads: each wk piece appears on two consecutive ranks.
    full = torch.arange(4 * 3 * 5, dtype=torch.float32).view(12, 5)
    heads = list(full.chunk(4))
    parts = [h for h in heads for _ in range(2)]
    assert torch.equal(merge_shards("wk", parts, (12, 5), "x"), full)


def test_meta_params_json_without_max_seq_len_and_with_extra_keys(tmp_path, meta_sd):
    params = {"dim": 64, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 512,
              "multiple_of": 4, "norm_eps": 1e-5, "rope_theta": 10000.0, "some_future_key": 1}
    folder = write_meta_folder(tmp_path / "m", params, [meta_sd])
    ck = load_checkpoint(folder, device="cpu", dtype="float32", max_seq_len=32)
    assert isinstance(ck.args, ModelArgs) and ck.args.hidden_dim == 172
    assert ck.model.max_seq_len == 32


def test_meta_scaled_rope_factor_from_hf_config_beside_original_folder(tmp_path, meta_sd):
    # HF repos of Llama 3.x ship Meta's files in original/ next to a config.json that records
    # the real factor (32 for 3.2); Meta's params.json says only use_scaled_rope.
    params = json.loads((require_fixture("stories260K", "meta", "params.json")).read_text())
    params["use_scaled_rope"] = True
    folder = write_meta_folder(tmp_path / "repo" / "original", params, [meta_sd])
    assert load_checkpoint(folder, device="cpu").args.rope_scaling.factor == 8.0  # Meta's default
    hf = json.loads(require_fixture("stories260K", "hf", "config.json").read_text())
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "repo" / "config.json").write_text(json.dumps(hf))
    scaling = load_checkpoint(folder, device="cpu").args.rope_scaling
    assert scaling.factor == 32.0 and scaling.original_max_position_embeddings == 8192
    params["rope_scaling_factor"] = 16.0  # recorded in params.json: that wins
    (folder / "params.json").write_text(json.dumps(params))
    assert load_checkpoint(folder, device="cpu").args.rope_scaling.factor == 16.0
