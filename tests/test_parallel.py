"""Tensor parallelism on torch.distributed (gloo, CPU): the split model gives the single-process
logits and tokens, each rank reads only its slices, and failures end the whole job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamarun.config import ModelArgs
from llamarun.errors import InvalidArgumentError
from llamarun.parallel import TPPlan, valid_world_sizes
from engine_util import REPO, stories_meta
from fixtures_util import require_fixture
from gguf_util import QT, tensor_types, write_llama_gguf
from model_util import (
    random_meta_state_dict, rel_err, split_meta, write_hf_folder, write_meta_folder,
)

WORKER = Path(__file__).parent / "tp_worker.py"
# 8 query heads, 2 KV heads: on 4 ranks each KV head is replicated on two ranks.
GQA = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, hidden_dim=128,
                head_dim=8, rope_theta=10000.0, max_seq_len=128)
GQA_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 512,
              "ffn_dim_multiplier": 0.75, "multiple_of": 128, "norm_eps": 1e-5,
              "rope_theta": 10000.0}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    env.pop("LLAMARUN_MODEL", None)
    return env


def run_worker(specs: list[dict], tmp: Path, world: int) -> list[dict]:
    """Results of tests/tp_worker.py on `world` ranks (1: a plain process)."""
    spec_file, out = tmp / f"spec{world}.json", tmp / f"out{world}.pt"
    spec_file.write_text(json.dumps(specs))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world)] if world > 1 else [sys.executable])
    r = subprocess.run([*launch, str(WORKER), str(out), str(spec_file)], capture_output=True,
                       text=True, timeout=300, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The random GQA model as an HF folder, a 2-shard Meta folder and Q8_0 / Q4_0 GGUFs."""
    tmp = tmp_path_factory.mktemp("tp")
    sd = random_meta_state_dict(GQA, seed=3)
    out = {"hf": write_hf_folder(tmp / "hf", GQA, sd, shards=2),
           "meta2": write_meta_folder(tmp / "meta2", GQA_PARAMS,
                                      split_meta(sd, 2, embedding_dim=0))}
    for name, qt in (("q8", QT.Q8_0), ("q4", QT.Q4_0)):
        path = tmp / f"{name}.gguf"
        write_llama_gguf(path, sd, GQA, tensor_types(sd, qt, fallback=QT.F32))
        out[name] = path
    return out


def test_plan_slices_heads_kv_heads_and_ffn() -> None:
    plans = [TPPlan.make(GQA, r, 4) for r in range(4)]
    assert [p.heads for p in plans] == [2] * 4 and [p.kv_heads for p in plans] == [1] * 4
    assert [p.kv_start for p in plans] == [0, 0, 1, 1]  # KV heads replicated on two ranks each
    assert plans[3].slice_of("layers.1.attention.wq.weight") == (0, 48, 64)
    assert plans[3].slice_of("layers.1.attention.wk.weight") == (0, 8, 16)
    assert plans[3].slice_of("layers.0.attention.wo.weight") == (1, 48, 64)
    assert plans[1].slice_of("layers.0.feed_forward.w2.weight") == (1, 32, 64)
    assert plans[2].slice_of("tok_embeddings.weight") == (0, 256, 384)
    assert plans[2].slice_of("layers.0.ffn_norm.weight") is None
    two = TPPlan.make(GQA, 1, 2)
    assert (two.kv_heads, two.kv_start) == (1, 1)
    assert valid_world_sizes(GQA) == [1, 2, 4, 8]
    with pytest.raises(InvalidArgumentError, match=r"3 ranks cannot split .* use one of: 1, 2, 4, 8"):
        TPPlan.make(GQA, 0, 3)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4))


def test_split_model_equals_single_process(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """World sizes 2 and 4, Meta / HF / GGUF (dense, int8, int4), stories260K and a GQA model
    whose KV heads are fewer than the ranks."""
    stories = stories_meta()
    specs = [{"path": str(stories)},
             {"path": str(require_fixture("stories260K", "hf"))},
             {"path": str(checkpoints["hf"])},
             {"path": str(checkpoints["meta2"])},
             {"path": str(checkpoints["q8"]), "quantize": "auto"},
             {"path": str(checkpoints["q4"]), "quantize": "auto"},
             {"path": str(checkpoints["hf"]), "quantize": "int8"}]
    single = run_worker(specs, tmp_path, 1)
    for world in (2, 4):
        split = run_worker(specs, tmp_path, world)
        for spec, one, many in zip(specs, single, split):
            if spec.get("quantize", "none") == "none":
                assert close(many["logits"], one["logits"]), (world, spec)
                assert many["tokens"] == one["tokens"], (world, spec)
            else:  # the CPU int8/int4 kernels take bfloat16 activations: bf16 rounding apart
                assert rel_err(many["logits"], one["logits"]) < 0.03, (world, spec)
    kv = [r["kv_heads"] for r in split[2]["read"]]
    assert kv == [1, 1, 1, 1]  # each rank caches only its (replicated) KV head


def test_each_rank_reads_only_its_slices(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    specs = [{"path": str(checkpoints["hf"])}, {"path": str(checkpoints["meta2"])}]
    whole = run_worker(specs, tmp_path, 1)[0]["read"][0]["bytes"]
    hf, meta = run_worker(specs, tmp_path, 2)
    per_rank = [r["bytes"] for r in hf["read"]]
    # Norms are replicated; everything else is halved.
    assert all(0.45 * whole < b < 0.55 * whole for b in per_rank), (per_rank, whole)
    assert [r["opened"] for r in meta["read"]] == [[0], [1]]  # one shard per rank


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamarun", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(), cwd=REPO)


def test_cli_tp_and_torchrun_give_the_single_process_tokens() -> None:
    m = str(stories_meta())
    args = ["-m", m, "--dtype", "float32", "-t", "0", "-n", "24", "-q", "--no-compile"]
    one = cli("complete", "-p", "Once upon a time", *args)
    assert one.returncode == 0, one.stderr
    two = cli("--tp", "2", "complete", "-p", "Once upon a time", *args)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and two.stderr == ""
    chat = ["chat", "-m", m, "--dtype", "float32", "-t", "0", "-n", "10", "--no-compile"]
    script = "Hi there\nTell me a story\n"
    alone = subprocess.run([sys.executable, "-m", "llamarun", *chat], input=script,
                           capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", "-m", "llamarun", *chat], input=script,
                           capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert ranks.returncode == 0 and alone.returncode == 0, ranks.stderr[-2000:]
    assert ranks.stdout == alone.stdout and len(alone.stdout.splitlines()) == 2


def test_two_hosts_meeting_at_a_loopback_rendezvous() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = str(stories_meta())
    args = ["complete", "-m", m, "--dtype", "float32", "-p", "Once upon a time", "-t", "0",
            "-n", "16", "-q", "--no-compile"]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", "llamarun-test", "--rdzv-conf", "join_timeout=60",
         "-m", "llamarun", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
        for i in (0, 1)]
    try:
        outs = [n.communicate(timeout=150) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    one = cli(*args)
    assert outs[0][0] == one.stdout and outs[1][0] == ""  # the second host's rank is quiet


def test_a_failing_rank_ends_the_job(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoints["meta2"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    # The random model's vocabulary is stories260K's size: borrow its tokenizer.
    (broken / "tokenizer.model").write_bytes((stories_meta() / "tokenizer.model").read_bytes())
    (broken / "consolidated.01.pth").write_bytes(b"not a checkpoint")  # only rank 1 reads it
    start = time.monotonic()
    r = cli("--tp", "2", "info", "-m", str(broken), timeout=120)
    assert r.returncode == 1 and time.monotonic() - start < 90
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "consolidated.01.pth" in lines[0], r.stderr
    bad = cli("--tp", "3", "complete", "-m", str(stories_meta()), "-p", "x", timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: 3 ranks cannot split this model (8 query heads, 4 KV heads, FFN width 172); "
        "use one of: 1, 2, 4"]


@pytest.mark.slow
def test_compiled_decode_step_on_two_ranks(tmp_path: Path) -> None:
    spec = [{"path": str(stories_meta())}]
    eager = run_worker(spec, tmp_path, 1)[0]
    compiled = run_worker([{**spec[0], "compile": True}], tmp_path, 2)[0]
    assert compiled["compiled"] and compiled["tokens"] == eager["tokens"]


def test_bench_reports_each_rank() -> None:
    r = cli("--tp", "2", "bench", "--tokens-per-sec", "-m", str(stories_meta()), "--prompt-tokens",
            "16", "--gen-tokens", "8", "-r", "1", "--no-compile", "--json")
    assert r.returncode == 0, r.stderr
    tp = json.loads(r.stdout)["tensor_parallel"]
    assert tp["world"] == 2 and [x["rank"] for x in tp["ranks"]] == [0, 1]
    assert 0 < tp["collective_share"] < 1 and all(x["peak_rss_bytes"] > 0 for x in tp["ranks"])


def test_serve_on_two_ranks_answers_like_one_process() -> None:
    openai = pytest.importorskip("openai")
    m = str(stories_meta())
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamarun", "--tp", "2", "serve", "-m", m, "--dtype", "float32",
         "--port", "0", "--max-concurrency", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "serving" not in line:
            line = proc.stderr.readline()
        assert "serving" in line, line
        base = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=120)
        for prompt in ("Once upon a time", "The cat sat"):
            r = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0)
            one = cli("complete", "-m", m, "--dtype", "float32", "-p", prompt, "-t", "0", "-n",
                      "12", "-q", "--no-compile")
            assert r.choices[0].text + "\n" == one.stdout
        proc.send_signal(2)  # Ctrl-C: rank 0 drains, the other rank follows it out
        assert proc.wait(60) == 130
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "server stopped" in rest, rest
    finally:
        proc.kill()
        proc.wait()


def test_perplexity_on_two_ranks_equals_one_process() -> None:
    args = ["perplexity", "-m", str(stories_meta()), "--ctx", "128", "--max-tokens", "384",
            "--dtype", "float32", "--json"]
    one, two = cli(*args), cli("--tp", "2", *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout)["perplexity"], json.loads(two.stdout)["perplexity"]
    assert abs(a - b) < 1e-3 * a
