"""Weights in transparent huge pages: where they land, and that nothing else changes."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from llamarun import hugepages
from llamarun.config import ModelArgs
from llamarun.loaders import load_checkpoint
from model_util import random_meta_state_dict, write_meta_folder

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux")
                               or not hasattr(mmap, "MADV_HUGEPAGE"),
                               reason="transparent huge pages are a Linux feature")


def vm_flags(t: torch.Tensor) -> set[str]:
    """The VmFlags of the mapping that holds t's first byte (/proc/self/smaps)."""
    addr = t.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@linux_thp
def test_empty_starts_on_a_huge_page_marked_for_huge_pages():
    t = hugepages.empty((3, hugepages.HUGE_PAGE // 4), torch.float32)  # 3 huge pages
    assert t.shape == (3, hugepages.HUGE_PAGE // 4) and t.dtype == torch.float32
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    assert "hg" in vm_flags(t)  # MADV_HUGEPAGE
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * t.numel()


@linux_thp
def test_placed_copies_values_and_leaves_small_or_other_tensors_alone():
    big = torch.randint(-128, 128, (1500, 2048), dtype=torch.int8)  # ~2.9 MiB
    out = hugepages.placed(big)
    assert out.data_ptr() != big.data_ptr() and torch.equal(out, big) and out.dtype == torch.int8
    assert "hg" in vm_flags(out)
    small = torch.randn(100, 100)
    assert hugepages.placed(small) is small
    strided = torch.randn(2048, 1024).t()
    assert hugepages.placed(strided) is strided
    on_meta = torch.empty(4096, 4096, device="meta")
    assert hugepages.placed(on_meta) is on_meta


@linux_thp
@pytest.mark.parametrize("quantize,tied", [("none", False), ("none", True), ("int8", False),
                                           ("int8", True), ("int4", False)])
def test_loaded_weights_are_in_huge_pages_but_an_untied_embedding(tmp_path, monkeypatch,
                                                                   quantize, tied):
    params = {"dim": 1024, "n_layers": 1, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 1024,
              "multiple_of": 256, "norm_eps": 1e-5}
    sd = random_meta_state_dict(ModelArgs.from_params(params))
    if tied:  # no output weight: the embedding is the output layer too
        del sd["output.weight"]
    folder = write_meta_folder(tmp_path / "m", params, [sd])

    def load():
        return load_checkpoint(folder, device="cpu", dtype="float32", quantize=quantize,
                               max_seq_len=16).model

    model = load()
    placed = model.state_dict()
    big = [name for name, t in placed.items() if hugepages.serves(t)]
    # the feed-forward's fused weight at least (dense 22 MiB, int8 5.5, int4 2.8)
    assert "layers.0.feed_forward.w13.weight" in big
    for name in big:
        t = placed[name]
        if name == "tok_embeddings.weight" and not tied:  # read a row a token: left as made
            assert "hg" not in vm_flags(t)
        else:
            assert "hg" in vm_flags(t) and t.data_ptr() % hugepages.HUGE_PAGE == 0, name
    if quantize == "none":
        assert "tok_embeddings.weight" in big  # (4 MiB: so the case above was checked)
        assert torch.equal(placed["layers.0.feed_forward.w13.weight"],
                           torch.cat([sd["layers.0.feed_forward.w1.weight"],
                                      sd["layers.0.feed_forward.w3.weight"]]))
    # every tensor the same as a load without huge pages makes it
    monkeypatch.setattr(hugepages, "_MADV", None)
    plain = load().state_dict()
    assert placed.keys() == plain.keys()
    for name, t in plain.items():
        assert "hg" not in vm_flags(t), name
        assert torch.equal(placed[name], t) and placed[name].dtype == t.dtype, name
