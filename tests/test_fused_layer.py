"""kernels.decode_layers: whole layers of an eager pass in one call give, bit for bit, the
logits and KV caches of the layers run op by op (eager or compiled), for every kind of product
and pass; where it does not serve (a tensor-parallel rank's layer, a product no kernel takes, a
compiled pass) a layer runs op by op."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llamarun import kernels
from llamarun.config import ModelArgs
from llamarun.loaders import load_checkpoint
from llamarun.model import Span, Transformer
from llamarun.runner import ROW_BIAS, decode_rows
from model_util import random_meta_state_dict, write_meta_folder

pytestmark = pytest.mark.skipif(not kernels.attend_available(),
                                reason="no attention kernel (AVX2 and FMA): no fused layer here")

# Passes over 3 cache rows: two prompts prefilled together, a decode pass of 3 rows, a decode
# row beside a prompt chunk, one row alone.
PASSES = [
    ([Span(0, 0, 7), Span(1, 0, 3)], [1, 403, 407, 261, 378, 432, 383, 1, 286, 261]),
    ([Span(0, 7, 1), Span(1, 3, 1), Span(2, 0, 1)], [298, 315, 1]),
    ([Span(0, 8, 1), Span(2, 1, 5)], [421, 376, 298, 315, 421, 261]),
    ([Span(1, 4, 1)], [432]),
]


# Every product's width a multiple of 32 (and of 16, which the int8 kernel's modules need),
# except the down projection's 352 inputs for groups of 64: there int4 falls back to int8.
PARAMS = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
          "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0}
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=352,
                 head_dim=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_meta_folder(tmp_path_factory.mktemp("fused") / "m", PARAMS,
                             [random_meta_state_dict(ARGS, seed=3)])


def _model(folder: Path, dtype: str, quantize: str | None, group_size: int = 32) -> Transformer:
    if dtype == "bfloat16" and not kernels.bf16_available() and quantize is None:
        pytest.skip("no bfloat16 kernel (AVX512-BF16) on this machine")
    if quantize == "int8" and not kernels.int8_available():
        pytest.skip("no int8 kernel on this machine")
    if quantize == "int4" and not kernels.int4_available():
        pytest.skip("no 4-bit kernel on this machine")
    ck = load_checkpoint(folder, device="cpu", dtype=dtype, quantize=quantize or "none",
                         group_size=group_size)
    ck.model.setup_caches(3, 32)
    return ck.model


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counters of the layers run by kernels.decode_layers or decode_logits from now on, of
    the heads run by decode_logits, and of the calls given token ids (the stack embeds them)."""
    calls = [0, 0, 0]

    def counting(real, heads):  # type: ignore[no-untyped-def]
        def counted(x, stack, *args):  # type: ignore[no-untyped-def]
            calls[0] += len(stack)
            calls[1] += heads
            calls[2] += x.dtype == torch.int64
            return real(x, stack, *args)
        return counted

    monkeypatch.setattr(kernels, "decode_layers", counting(kernels.decode_layers, 0))
    monkeypatch.setattr(kernels, "decode_logits", counting(kernels.decode_logits, 1))
    return calls


def _run(model: Transformer, fuse: bool, monkeypatch: pytest.MonkeyPatch,
         heads: list[int] | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Every pass's logits, and how many layers each pass ran through decode_layers or
    decode_logits (appended to `heads`: whether decode_logits ran the pass's head, and whether
    the pass's first layer stack took its token ids)."""
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(kernels, "fuse_layers", fuse)
    model.reset_caches()
    logits, fused = [], []
    with torch.inference_mode():
        for spans, ids in PASSES:
            before = list(calls)
            logits.append(model.forward_spans(torch.tensor(ids), spans))
            fused.append(calls[0] - before[0])
            if heads is not None:
                heads.append((calls[1] - before[1], calls[2] - before[2]))
    return logits, fused


def _caches(model: Transformer) -> list[torch.Tensor]:
    return [c.clone() for layer in model.layers
            for c in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache)]


@pytest.mark.parametrize("dtype,quantize", [
    ("float32", None), ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int8"),
    ("float32", "int4"), ("bfloat16", "int4")])
def test_fused_layers_give_the_op_by_op_numbers(folder: Path, dtype: str, quantize: str | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(folder, dtype, quantize)
    heads: list[tuple[int, int]] = []
    fused_logits, fused_calls = _run(model, True, monkeypatch, heads)
    fused_caches = _caches(model)
    plain_heads: list[tuple[int, int]] = []
    plain_logits, plain_calls = _run(model, False, monkeypatch, plain_heads)
    assert plain_calls == [0] * len(PASSES) and plain_heads == [(0, 0)] * len(PASSES)
    layers = len(model.layers)
    # Every pass is fused, but for bfloat16 dense weights the 10-token prefill (the bfloat16
    # kernel takes up to kernels.MAX_ROWS rows: past that, oneDNN's GEMM, op by op). The
    # fused passes begin with the embedding (a plain table, or int8 rows with quantized weights)
    # and end with the final norm and output product (every token's logits) in the same call,
    # whether the rows' ops run whole by each thread (decode: 3 or 1 tokens) or split by rows
    # (6 and 10 tokens).
    first = 0 if dtype == "bfloat16" and quantize is None else layers
    assert fused_calls == [first, layers, layers, layers]
    assert heads == [(int(first > 0), int(first > 0))] + [(1, 1)] * 3
    embedding = type(model.tok_embeddings).__name__
    assert embedding == ("Embedding" if quantize is None else "Int8Embedding")
    for a, b in zip(fused_logits, plain_logits):
        assert torch.equal(a, b)
    for a, b in zip(fused_caches, _caches(model)):
        assert torch.equal(a, b)


def test_int4_layers_mix_kinds_of_products(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In groups of 64 the down projection (352 inputs) stays int8: one layer call computes
    4-bit and int8 products, with the numbers of the layer op by op."""
    model = _model(folder, "bfloat16", "int4", group_size=64)
    layer = model.layers[0]
    kinds = [m.kernel_product(torch.zeros(1, 128, dtype=torch.bfloat16))[0]  # type: ignore[index]
             for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                       layer.feed_forward.w2)]
    assert kinds == [kernels.INT4, kernels.INT4, kernels.INT4, kernels.INT8]
    fused, calls = _run(model, True, monkeypatch)
    assert calls == [len(model.layers)] * len(PASSES)
    plain, _ = _run(model, False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))


def test_a_layer_asks_its_modules_once_per_kind_of_pass(folder: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The model keeps its layers' answers per kind of pass (dtype, rows, ...): later passes of
    that kind call decode_layers without asking the modules again; another kind asks once more."""
    model = _model(folder, "float32", "int8")
    asked: list[int] = []
    real = type(model.layers[0].attention.wqkv).kernel_product

    def counted(module, x):  # type: ignore[no-untyped-def]
        asked.append(x.shape[-2])
        return real(module, x)

    monkeypatch.setattr(type(model.layers[0].attention.wqkv), "kernel_product", counted)
    calls = _count_calls(monkeypatch)
    with torch.inference_mode():
        model.forward_spans(torch.tensor([1, 2, 3]), [Span(0, 0, 3)])
        for i in range(3):
            model.forward_spans(torch.tensor([4 + i]), [Span(0, 3 + i, 1)])
    assert type(model.output) is type(model.layers[0].attention.wqkv)  # (int8 too)
    per_pass = 4 * len(model.layers) + 1  # products the layers ask about, and the head
    assert asked == [3] * per_pass + [1] * per_pass
    assert calls == [4 * len(model.layers), 4, 4]  # each pass's logits by decode_logits


def test_a_model_says_whether_its_decode_pass_is_one_fused_call(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transformer.fuses_decode: the embedding, every layer and the head of an eager one-token
    pass in one decode_logits call (Engine.compile_pays then says a compiled step would not)."""
    model = _model(folder, "float32", "int8")
    assert model.fuses_decode()
    monkeypatch.setattr(kernels, "fuse_layers", False)
    assert not model.fuses_decode()
    monkeypatch.setattr(kernels, "fuse_layers", True)
    model._parts_by_kind.clear()
    monkeypatch.setattr(model.layers[1].attention.wqkv, "kernel_product", lambda x: None)
    assert not model.fuses_decode()  # layer 1 op by op after layer 0's stack: the head too


def test_tensor_parallel_layers_run_op_by_op(folder: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's layer sums its partial outputs between the ops (reduce): never fused."""
    model = _model(folder, "float32", None)
    sums: list[int] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        sums.append(1)
        return t

    for layer in model.layers:
        layer.attention.reduce = layer.feed_forward.reduce = reduce
    _, calls = _run(model, True, monkeypatch)
    assert calls == [0] * len(PASSES)
    assert len(sums) == 2 * len(model.layers) * len(PASSES)


def test_layers_of_products_no_kernel_takes_run_op_by_op(folder: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(folder, "float32", None)
    monkeypatch.setattr(kernels, "f32_available", lambda: False)  # the float32 kernel's check
    _, calls = _run(model, True, monkeypatch)
    assert calls == [0] * len(PASSES)


def test_layers_that_qualify_run_in_one_call_beside_those_that_do_not(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer no kernel serves runs op by op between the runs of layers that decode_layers
    takes, each run one call: the numbers of every layer op by op."""
    model = _model(folder, "float32", "int8")
    plain_logits, _ = _run(model, False, monkeypatch)
    plain_caches = _caches(model)
    first = model.layers[0].attention.wqkv
    monkeypatch.setattr(first, "kernel_product", lambda x: None)  # no kernel: layer 0 op by op
    monkeypatch.setattr(kernels, "fuse_layers", True)
    calls = _count_calls(monkeypatch)
    model.reset_caches()
    with torch.inference_mode():
        logits = [model.forward_spans(torch.tensor(ids), spans) for spans, ids in PASSES]
    # layer 1 alone (and the head), after layer 0 op by op (and the embedding), in every pass
    assert calls == [len(PASSES), len(PASSES), 0]
    assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits))
    assert all(torch.equal(a, b) for a, b in zip(_caches(model), plain_caches))


def test_new_caches_get_new_layer_stacks(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer stack holds its layers' KV caches: setup_caches (new caches) makes the model
    build new ones, which write the new caches."""
    model = _model(folder, "float32", "int8")
    fused_logits, _ = _run(model, True, monkeypatch)
    fused_caches = _caches(model)
    model.setup_caches(3, 32)
    again, calls = _run(model, True, monkeypatch)
    assert calls == [len(model.layers)] * len(PASSES)
    assert all(torch.equal(a, b) for a, b in zip(again, fused_logits))
    assert all(torch.equal(a, b) for a, b in zip(_caches(model), fused_caches))


def test_decode_layers_checks_its_products(folder: Path) -> None:
    model = _model(folder, "float32", None)
    layer = model.layers[0]
    x = torch.randn(1, 128)
    operands = layer.fused_operands(x)
    assert operands is not None
    products = [list(p) for p in operands.products]
    rows, pos = torch.tensor([0]), torch.tensor([0])

    def call(products: list[list]) -> torch.Tensor:  # type: ignore[type-arg]
        stack = kernels.layer_stack([operands._replace(
            products=tuple(tuple(p) for p in products))])  # type: ignore[arg-type]
        return kernels.decode_layers(x, stack, model.freqs, rows, pos)

    assert call(products).shape == x.shape
    bad_kind = [p.copy() for p in products]
    bad_kind[1][0] = 7
    with pytest.raises(RuntimeError, match="product kind"):
        call(bad_kind)
    swapped = [products[0], products[0], products[2], products[3]]  # Q/K/V as the output
    with pytest.raises(RuntimeError):
        call(swapped)
    with pytest.raises(RuntimeError, match="4 products"):
        kernels._extension().LayerStack().add(*operands[:3], products[:3], *operands[4:])
    # decode_layers makes its buffers for the first layer: a stack's layers are all alike
    other = operands._replace(attn_norm=operands.attn_norm.bfloat16(),
                              ffn_norm=operands.ffn_norm.bfloat16())
    with pytest.raises(RuntimeError, match="of one shape and dtype"):
        kernels.layer_stack([operands, other])
    stack = kernels.layer_stack([operands])
    with pytest.raises(RuntimeError, match="the stack has no head"):
        kernels.decode_logits(x, stack, model.freqs, rows, pos)
    head = model.head_operands(x)
    assert head is not None
    with pytest.raises(RuntimeError, match="the head's norm is not of the layers' width"):
        stack.set_head(head.norm[:64], head.eps, head.product)
    with pytest.raises(RuntimeError, match="the head's norm is not of the layers' width"):
        stack.set_head(head.norm.bfloat16(), head.eps, head.product)
    with pytest.raises(RuntimeError, match="the layers' width and dtype"):
        kernels.decode_layers(x.bfloat16(), stack, model.freqs, rows, pos)
    with pytest.raises(RuntimeError, match="the layers' width and dtype"):
        kernels.decode_layers(x[:, :64], stack, model.freqs, rows, pos)
    # freqs: the RoPE table, whose row pos[t] token t takes
    with pytest.raises(RuntimeError, match="a position past the RoPE table"):
        kernels.decode_layers(x, stack, model.freqs[:5], rows, torch.tensor([5]))
    with pytest.raises(RuntimeError, match="the RoPE table"):
        kernels.decode_layers(x, stack, model.freqs[:, :4], rows, pos)
    # token ids, where the stack holds the embedding: their rows are the first layer's input
    ids = torch.tensor([[3]])
    with pytest.raises(RuntimeError, match="token ids, but no embedding"):
        kernels.decode_layers(ids, stack, model.freqs, rows, pos)
    table = model.embedding_operands(x)
    assert table is not None
    with pytest.raises(RuntimeError, match="not a table of the layers' width"):
        stack.set_embedding(table[0][:, :64].contiguous(), table[1])
    with pytest.raises(RuntimeError, match="nor int8 with a float32 scale each"):
        stack.set_embedding(table[0].bfloat16(), table[1])
    stack.set_embedding(*table)
    with pytest.raises(RuntimeError, match="a token id past the embedding's 512 rows"):
        kernels.decode_layers(torch.tensor([[512]]), stack, model.freqs, rows, pos)
    assert torch.equal(kernels.decode_layers(ids, stack, model.freqs, rows, pos),
                       kernels.decode_layers(model.tok_embeddings(ids), stack, model.freqs, rows,
                                             pos))


@pytest.mark.parametrize("dtype,quantize", [("float32", "int4"), ("bfloat16", "int8")])
def test_what_a_pass_returns_stays_the_callers(folder: Path, dtype: str,
                                               quantize: str | None) -> None:
    """A layer stack keeps its decode passes' buffers for its next pass of as many tokens, but
    not the tensor a pass returns: logits (float32, or bfloat16 widened) and a stack's output
    stay as they were after later passes, which give the numbers of passes run on new
    buffers."""
    model = _model(folder, dtype, quantize)
    x = model.tok_embeddings(torch.tensor([[5]]))
    operands = model.layers[0].fused_operands(x)
    assert operands is not None
    stack = kernels.layer_stack([operands])
    rows, pos = torch.tensor([0]), torch.tensor([0])
    first = kernels.decode_layers(x, stack, model.freqs, rows, pos)
    kept = first.clone()
    again = kernels.decode_layers(x, stack, model.freqs, rows, pos)
    assert torch.equal(first, kept) and torch.equal(again, kept) and first.data_ptr() != \
        again.data_ptr()
    model.reset_caches()
    with torch.inference_mode():
        passes = [model.forward_spans(torch.tensor([t]), [Span(0, p, 1)])
                  for p, t in enumerate([5, 9, 11])]
        copies = [p.clone() for p in passes]
        model.forward_spans(torch.tensor([7, 3]), [Span(0, 3, 1), Span(1, 0, 1)])
    assert all(torch.equal(a, b) for a, b in zip(passes, copies))
    fresh = _model(folder, dtype, quantize)  # new stacks: new buffers for every pass
    with torch.inference_mode():
        for p, (t, logits) in enumerate(zip([5, 9, 11], copies)):
            assert torch.equal(fresh.forward_spans(torch.tensor([t]), [Span(0, p, 1)]), logits)


@pytest.fixture
def threads() -> Callable[[int], None]:
    """set(n): torch's thread count for the test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads  # type: ignore[misc]
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype,quantize", [("float32", "int4"), ("bfloat16", "int8"),
                                            ("bfloat16", None)])
def test_a_team_of_threads_gives_one_threads_numbers(folder: Path, dtype: str,
                                                     quantize: str | None,
                                                     threads: Callable[[int], None]) -> None:
    """decode_layers runs its ops with a team of the threads (each product and the attention
    split between them, the other ops by one; at most one member per CPU): logits and caches as
    one thread's, bit for bit, for prompts, decode rows and a decode row past 1,024 positions
    (whose attention one thread splits by parts of keys, a team by heads), with torch's threads
    at 2 and at more than the CPUs."""
    model = _model(folder, dtype, quantize)
    model.setup_caches(2, 1100)
    prompt = torch.randint(1, 512, (1060,), generator=torch.Generator().manual_seed(1))
    passes = [([Span(0, 0, 1060)], prompt), ([Span(0, 1060, 1), Span(1, 0, 1)], [7, 9]),
              ([Span(0, 1061, 1)], [11])]
    runs = []
    for n in (1, 2, len(os.sched_getaffinity(0)) + 2):
        threads(n)
        model.reset_caches()
        with torch.inference_mode():
            logits = [model.forward_spans(torch.as_tensor(ids), spans) for spans, ids in passes]
        runs.append((logits, _caches(model)))
    (one, one_caches), *teams = runs
    for team, team_caches in teams:
        assert all(torch.equal(a, b) for a, b in zip(one, team))
        assert all(torch.equal(a, b) for a, b in zip(one_caches, team_caches))


# Products of 1 MB and more, which a team's members take in pieces (kernels.h: team_pieces):
# the 4-bit gate/up product is 1.5 MB, the int8 head 1.5 MB, the bfloat16 ones 2-6 MB.
BIG_PARAMS = {**PARAMS, "dim": 768, "n_heads": 12, "n_kv_heads": 4, "vocab_size": 2048}
BIG_ARGS = ModelArgs(dim=768, n_layers=2, n_heads=12, n_kv_heads=4, vocab_size=2048,
                     hidden_dim=2048, head_dim=64)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_meta_folder(tmp_path_factory.mktemp("fused-big") / "m", BIG_PARAMS,
                             [random_meta_state_dict(BIG_ARGS, seed=5)])


@pytest.mark.parametrize("dtype,quantize", [("float32", "int4"), ("bfloat16", "int8"),
                                            ("bfloat16", None), ("float32", None)])
def test_a_team_taking_pieces_of_large_products_gives_one_threads_numbers(
        big_folder: Path, dtype: str, quantize: str | None,
        threads: Callable[[int], None]) -> None:
    """Products of 1 MB of weights or more are claimed piece by piece by a team's members (a
    member done with its share takes the other's pieces left), whichever member computes a
    piece: 24 decode passes give one thread's logits, bit for bit."""
    model = _model(big_folder, dtype, quantize)
    model.setup_caches(1, 64)
    prompt = torch.randint(1, 2048, (9,), generator=torch.Generator().manual_seed(2))
    runs = []
    for n in (1, 2):
        threads(n)
        model.reset_caches()
        with torch.inference_mode():
            logits = [model.forward_spans(prompt, [Span(0, 0, 9)])[-1:]]
            for p in range(9, 33):
                token = logits[-1].argmax(-1)
                logits.append(model.forward_spans(token, [Span(0, p, 1)]))
        runs.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_an_error_in_a_team_reaches_the_caller(folder: Path,
                                               threads: Callable[[int], None]) -> None:
    """A check failing inside the team's ops raises here, and the next call runs as before."""
    threads(2)
    model = _model(folder, "float32", "int8")
    x = torch.randn(1, 128)
    operands = model.layers[0].fused_operands(x)
    assert operands is not None
    rows, pos = torch.tensor([0]), torch.tensor([0])
    good = kernels.layer_stack([operands])
    first = kernels.decode_layers(x, good, model.freqs, rows, pos)
    q_kv = operands.products[0]
    bad = kernels.layer_stack([operands._replace(products=(q_kv, q_kv, *operands.products[2:]))])
    with pytest.raises(RuntimeError, match="layer's width"):
        kernels.decode_layers(x, bad, model.freqs, rows, pos)
    assert torch.equal(kernels.decode_layers(x, good, model.freqs, rows, pos), first)


@pytest.mark.slow
def test_compiled_step_gets_the_fused_layers_numbers(folder: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled decode step keeps the layer's ops (inductor's code between the kernels,
    kernels.layer_pass): through inductor and its C++ wrapper, as llamarun compiles, it gives
    the logits and caches of the eager step of fused layers, bit for bit."""
    from llamarun.device import compile_options

    model = _model(folder, "bfloat16", "int4")
    args = (torch.tensor([5, 6]), torch.tensor([0, 1]), torch.tensor([3, 4]),
            (ROW_BIAS, 1 + ROW_BIAS), (4, 5))
    calls = _count_calls(monkeypatch)

    def after_prompts(step: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.reset_caches()
        with torch.inference_mode():
            model.forward_spans(torch.tensor([1, 403, 407, 1, 286, 261, 376]),
                                [Span(0, 0, 3), Span(1, 0, 4)])
            return step(model, *args), _caches(model)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(decode_rows, fullgraph=True, dynamic=True,
                                 options=compile_options(torch.device("cpu")))
        got, got_caches = after_prompts(compiled)
        assert calls[0] == len(model.layers)  # the eager prefill's; none in the compiled step
        want, want_caches = after_prompts(decode_rows)
        assert calls[0] == 3 * len(model.layers)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_caches, want_caches))
