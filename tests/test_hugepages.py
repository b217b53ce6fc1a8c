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
def test_arena_memory_is_marked_for_huge_pages_and_shared_in_order():
    arena = hugepages.Arena()
    a = arena.empty((3, hugepages.HUGE_PAGE // 4), torch.float32)  # 3 huge pages
    assert a.shape == (3, hugepages.HUGE_PAGE // 4) and a.dtype == torch.float32
    assert a.data_ptr() % hugepages.HUGE_PAGE == 0  # a mapping's first tensor
    assert "hg" in vm_flags(a)  # MADV_HUGEPAGE
    b = arena.empty((5,), torch.bfloat16)  # 10 bytes: the next tensor starts a line later
    c = arena.empty((7, 3), torch.int8)
    assert b.data_ptr() == a.data_ptr() + a.nbytes
    assert c.data_ptr() == b.data_ptr() + hugepages.ALIGN
    big = arena.empty((hugepages.CHUNK,), torch.uint8)  # past the mapping's end: a new one
    assert big.data_ptr() % hugepages.HUGE_PAGE == 0 and "hg" in vm_flags(big)
    for t, v in ((a, 1.5), (b, -2.0), (c, 3), (big, 7)):
        t.fill_(v)
    assert float(a.sum()) == 1.5 * a.numel() and b.tolist() == [-2.0] * 5
    assert c.sum() == 63 and int(big[-1]) == 7


@linux_thp
def test_placed_copies_values_and_leaves_strided_or_other_device_tensors_alone():
    arena = hugepages.Arena()
    for t in (torch.randint(-128, 128, (1500, 2048), dtype=torch.int8), torch.randn(100, 100),
              torch.randn(3, 5).bfloat16()):
        out = arena.placed(t)
        assert out.data_ptr() != t.data_ptr() and torch.equal(out, t) and out.dtype == t.dtype
        assert out.data_ptr() % hugepages.ALIGN == 0 and "hg" in vm_flags(out)
    strided = torch.randn(2048, 1024).t()
    assert arena.placed(strided) is strided
    on_meta = torch.empty(4096, 4096, device="meta")
    assert arena.placed(on_meta) is on_meta


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

    # which tensors the loader put in an arena (other code in the process may mark memory of
    # its own for huge pages, which ordinary tensors may reuse: vm_flags cannot tell)
    arena_ptrs: set[int] = set()
    made = hugepages.Arena.empty

    def spy(self, shape, dtype):
        t = made(self, shape, dtype)
        arena_ptrs.add(t.data_ptr())
        return t

    monkeypatch.setattr(hugepages.Arena, "empty", spy)
    model = load()
    placed = model.state_dict()
    for name, t in placed.items():
        if name.startswith("tok_embeddings.") and not tied:  # read a row a token: left as made
            assert t.data_ptr() not in arena_ptrs, name
        else:
            assert t.data_ptr() in arena_ptrs, name
            assert "hg" in vm_flags(t) and t.data_ptr() % hugepages.ALIGN == 0, name
    if quantize == "none":
        assert torch.equal(placed["layers.0.feed_forward.w13.weight"],
                           torch.cat([sd["layers.0.feed_forward.w1.weight"],
                                      sd["layers.0.feed_forward.w3.weight"]]))
    # every tensor the same as a load without huge pages makes it
    monkeypatch.setattr(hugepages, "_MADV", None)
    plain = load().state_dict()
    assert placed.keys() == plain.keys()
    for name, t in plain.items():
        assert torch.equal(placed[name], t) and placed[name].dtype == t.dtype, name
