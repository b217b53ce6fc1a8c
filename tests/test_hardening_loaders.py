"""Untrusted checkpoint files (issue 9): every bad config, index, weight file or GGUF header ends
in one LlamarunError naming the file, never another exception, a hang or a memory blow-up."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import gguf
import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT

from llamarun.config import ModelArgs, read_json
from llamarun.errors import CheckpointError, ConfigError, LlamarunError
from llamarun.loaders import detect_layout, load_checkpoint
from llamarun.loaders.gguf import read_gguf_file
from gguf_util import write_llama_gguf
from model_util import meta_to_hf, random_meta_state_dict, write_hf_folder, write_meta_folder

REPO = Path(__file__).resolve().parent.parent
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                 head_dim=8, max_seq_len=128)
PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
          "multiple_of": 32, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_seq_len": 128}


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return random_meta_state_dict(ARGS, seed=1)


def hf(tmp_path: Path, sd: dict[str, torch.Tensor], **config: object) -> Path:
    folder = write_hf_folder(tmp_path / "hf", ARGS, sd)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def load(path: Path, **kw: object):  # noqa: ANN201
    return load_checkpoint(path, device="cpu", dtype="float32", **kw)


# --- configs --------------------------------------------------------------------------------

HF_BAD = [
    ({"num_attention_heads": 0}, "num_attention_heads must be positive"),
    ({"num_key_value_heads": 0}, "n_kv_heads must be a positive integer"),
    ({"hidden_size": 0}, "hidden_size must be positive"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor must be a positive"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "factor must be a finite"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": -8, "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 8192}},
     "factor must be a positive"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                       "high_freq_factor": 4, "original_max_position_embeddings": 8192}},
     "must be below high_freq_factor"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false"),
    ({"hidden_size": "32"}, "hidden_size must be an integer, got '32'"),
    ({"num_key_value_heads": 2.5}, "num_key_value_heads must be an integer"),
    ({"vocab_size": [64]}, "vocab_size must be an integer"),
    ({"max_position_embeddings": 0}, "max_seq_len must be a positive integer"),
    ({"rope_theta": "1e4"}, "rope_theta must be a number"),
    ({"num_attention_heads": 3}, "must be a multiple of n_kv_heads"),
    ({"hidden_size": 10 ** 400}, "too large"),
]


@pytest.mark.parametrize(("change", "message"), HF_BAD)
def test_bad_hf_config_values_name_the_file(tmp_path: Path, sd: dict, change: dict,
                                            message: str) -> None:
    folder = hf(tmp_path, sd, **change)
    with pytest.raises(ConfigError) as e:
        load(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: ")
    assert message in str(e.value)


META_BAD = [
    ({"n_heads": 0}, "n_heads must be positive"),
    ({"multiple_of": 0}, "multiple_of must be positive"),
    ({"ffn_dim_multiplier": float("inf")}, "ffn_dim_multiplier must be a finite number"),
    ({"ffn_dim_multiplier": 0}, "ffn_dim_multiplier must be positive"),
    ({"ffn_dim_multiplier": 1e308}, "too large"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope must be true or false"),
    ({"use_scaled_rope": True, "rope_scaling_factor": 0}, "factor must be a positive"),
    ({"vocab_size": "64"}, "vocab_size must be an integer"),
    ({"dim": "x"}, "dim must be an integer"),
]


@pytest.mark.parametrize(("change", "message"), META_BAD)
def test_bad_params_json_values_name_the_file(tmp_path: Path, sd: dict, change: dict,
                                              message: str) -> None:
    folder = write_meta_folder(tmp_path / "m", {**PARAMS, **change}, [sd])
    with pytest.raises(ConfigError) as e:
        load(folder)
    assert str(e.value).startswith(f"{folder / 'params.json'}: ")
    assert message in str(e.value)


def test_deeply_nested_json_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_json(path)


# --- index files ----------------------------------------------------------------------------

def sharded(tmp_path: Path, sd: dict) -> Path:
    return write_hf_folder(tmp_path / "hf", ARGS, sd, shards=2)


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors",
                                   "sub/../../outside.safetensors", "C:\\x.safetensors",
                                   "..\\outside.safetensors", "a\0b"])
def test_index_entries_stay_in_the_folder(tmp_path: Path, sd: dict, entry: str) -> None:
    folder = sharded(tmp_path, sd)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        load(folder)


@pytest.mark.parametrize("value", [1, None, ["a"], {"x": 1}, ""])
def test_index_values_of_the_wrong_type(tmp_path: Path, sd: dict, value: object) -> None:
    folder = sharded(tmp_path, sd)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][sorted(data["weight_map"])[0]] = value
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"weight_map\[.*\] must be a file name"):
        load(folder)


def test_missing_file_listed_in_index_says_so(tmp_path: Path, sd: dict) -> None:
    folder = sharded(tmp_path, sd)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json is missing"):
        load(folder)


def test_folder_without_index_names_the_real_problem(tmp_path: Path, sd: dict) -> None:
    folder = hf(tmp_path, sd)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(folder)
    assert "dangling link" in str(e.value) and "listed in" not in str(e.value)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a regular file"):
        load(folder)


# --- special files --------------------------------------------------------------------------

def _no_hang(fn) -> BaseException | None:  # noqa: ANN001
    """Run fn in a thread; fail the test if it has not finished within 10 s."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "hung on a special file"
    return box[0]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_fifo_in_a_checkpoint_folder_is_refused(tmp_path: Path, sd: dict, name: str) -> None:
    folder = hf(tmp_path, sd)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    err = _no_hang(lambda: load(folder))
    assert isinstance(err, LlamarunError), err
    assert "FIFO" in str(err) and name in str(err)


def test_fifo_or_device_given_as_the_model(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        err = _no_hang(lambda p=path: detect_layout(p))
        assert isinstance(err, CheckpointError), err
        assert "not a regular file" in str(err)


def test_fifo_meta_shard(tmp_path: Path, sd: dict) -> None:
    folder = write_meta_folder(tmp_path / "m", PARAMS, [sd])
    (folder / "consolidated.00.pth").unlink()
    os.mkfifo(folder / "consolidated.00.pth")
    err = _no_hang(lambda: load(folder))
    assert isinstance(err, CheckpointError) and "FIFO" in str(err), err


# --- torch.save files -----------------------------------------------------------------------

def test_legacy_torch_save_loads_without_mmap(tmp_path: Path, sd: dict) -> None:
    folder = write_meta_folder(tmp_path / "m", PARAMS, [sd])
    torch.save(sd, folder / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    ck = load(folder)
    assert torch.equal(ck.model.norm.weight, sd["norm.weight"])


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("\x1b[31mpwned\x1b[0m",))


def test_pickle_payload_refused_without_torch_advice(tmp_path: Path, sd: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    folder = write_meta_folder(tmp_path / "m", PARAMS, [sd])
    for legacy in (False, True):
        torch.save({**sd, "x": _Payload()}, folder / "consolidated.00.pth",
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError) as e:
            load(folder)
        message = str(e.value)
        assert "refused" in message and "GLOBAL print" in message
        assert "weights_only" not in message and "\x1b" not in message and "\n" not in message
    assert "pwned" not in capsys.readouterr().out


# --- NaN / Inf ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path, sd: dict,
                                                          bad: float) -> None:
    broken = dict(sd)
    w = broken["layers.1.feed_forward.w2.weight"].clone()
    w[3, 5] = bad
    broken["layers.1.feed_forward.w2.weight"] = w
    folder = write_hf_folder(tmp_path / "hf", ARGS, broken)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                              r"layers\.1\.feed_forward\.w2\.weight holds NaN"):
        load(folder)


def test_non_finite_weights_in_quantized_gguf(tmp_path: Path, sd: dict) -> None:
    broken = dict(sd)
    w = broken["layers.0.attention.wo.weight"].clone()
    w[0, 0] = float("nan")
    broken["layers.0.attention.wo.weight"] = w
    for qtype in (QT.Q8_0, QT.Q4_0, QT.F16):
        types = {n: (qtype if t.dim() == 2 else QT.F32) for n, t in broken.items()}
        path = write_llama_gguf(tmp_path / f"m-{qtype.name}.gguf", broken, ARGS, types)
        with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wo\.weight holds NaN"):
            load(path)


# --- GGUF headers ---------------------------------------------------------------------------

def gguf_with(tmp_path: Path, sd: dict, extra) -> Path:  # noqa: ANN001
    types = {n: QT.F32 for n in sd}
    return write_llama_gguf(tmp_path / "m.gguf", sd, ARGS, types, extra=extra)


def test_gguf_strings_where_numbers_belong(tmp_path: Path, sd: dict) -> None:
    def extra(w: gguf.GGUFWriter) -> None:
        w.add_string("llama.rope.scaling.type", "linear")
        w.add_string("llama.rope.scaling.factor", "4")

    with pytest.raises(ConfigError, match="llama.rope.scaling.factor must be a number, got '4'"):
        load(gguf_with(tmp_path, sd, extra))


def test_gguf_architecture_array_is_refused(tmp_path: Path, sd: dict) -> None:
    # Found by the fuzz suite: an array compared with "llama" raised numpy's ValueError.
    def extra(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop("general.architecture", None)
        w.add_array("general.architecture", [1, 2, 3])

    with pytest.raises(ConfigError, match="GGUF architecture .* is not supported"):
        load(gguf_with(tmp_path, sd, extra))


def test_gguf_string_size_and_alignment(tmp_path: Path, sd: dict) -> None:
    path = gguf_with(tmp_path, sd, lambda w: w.add_string("general.alignment", "32"))
    with pytest.raises(CheckpointError, match="general.alignment must be an integer"):
        load(path)


def _raw_gguf(kvs: bytes, n_kv: int, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_gguf_deeply_nested_arrays(tmp_path: Path) -> None:
    depth = 100_000
    body = _key("x") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * depth)
    path = tmp_path / "nested.gguf"
    path.write_bytes(_raw_gguf(body + b"\0" * 64, 1))
    with pytest.raises(CheckpointError, match="nests arrays"):
        read_gguf_file(path)


@pytest.mark.parametrize(("n_kv", "n_tensors"), [(2**63, 0), (0, 2**62)])
def test_gguf_absurd_counts_end_at_once(tmp_path: Path, n_kv: int, n_tensors: int) -> None:
    path = tmp_path / "counts.gguf"
    path.write_bytes(_raw_gguf(b"\0" * 64, n_kv, n_tensors))
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        read_gguf_file(path)


def test_gguf_huge_string_array_count(tmp_path: Path) -> None:
    body = _key("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2**60)
    path = tmp_path / "arr.gguf"
    path.write_bytes(_raw_gguf(body + b"\0" * 64, 1))
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        read_gguf_file(path)


# --- memory preflight -----------------------------------------------------------------------

def test_ten_million_layers_refused_fast_and_small(tmp_path: Path, sd: dict) -> None:
    folder = hf(tmp_path, sd, num_hidden_layers=10 ** 7)
    script = textwrap.dedent(f"""
        import time
        from llamarun.loaders import load_checkpoint
        from llamarun.errors import LlamarunError
        def peak():
            return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        imported = peak()
        start = time.perf_counter()
        try:
            load_checkpoint({str(folder)!r}, device="cpu")
        except LlamarunError as e:
            message = str(e)
        seconds = time.perf_counter() - start
        print(seconds, (peak() - imported) * 1024, message)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds, grown, message = out.stdout.split(" ", 2)
    assert float(seconds) < 1.0, out.stdout
    # the refusal's own memory, past what importing torch and llamarun takes (more where Triton
    # is installed: torch._dynamo imports it); 10 ** 7 layers' tensors would be gigabytes
    assert int(grown) < 32 * 2**20, out.stdout
    assert "10000000 layers" in message


@pytest.mark.parametrize("change", [{"hidden_size": 10 ** 9, "head_dim": 8},
                                    {"vocab_size": 10 ** 11},
                                    {"intermediate_size": 10 ** 12}])
def test_absurd_sizes_refused_before_allocating(tmp_path: Path, sd: dict, change: dict) -> None:
    folder = hf(tmp_path, sd, **change)
    with pytest.raises(CheckpointError, match=r"not enough memory on cpu: the model needs .* "
                                              r"GiB .*available"):
        load(folder)


def test_absurd_max_seq_len_suggests_what_fits(tmp_path: Path, sd: dict) -> None:
    folder = hf(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load(folder, max_seq_len=10 ** 30)
    message = str(e.value)
    assert "KV cache" in message and "would fit: --max-seq-len 128" in message
    assert "\n" not in message


def test_preflight_numbers_and_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamarun import kernels
    from llamarun.preflight import check_memory, memory_need

    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                     hidden_dim=14336, head_dim=128, max_seq_len=131072)
    cpu = torch.device("cpu")
    need = memory_need(args, device=cpu, dtype=torch.bfloat16, max_seq_len=8192, slots=2)
    assert need.weights == args.n_params * 2  # bfloat16, untied
    # 2 x layers x slots x kv heads x positions x head_dim values: on CPU a bfloat16 model's
    # cache is bfloat16 where llamarun's attention kernel serves, else float32
    values = 2 * 32 * 2 * 8 * 8192 * 128
    assert need.kv_cache == values * (2 if kernels.attend_available() else 4)
    monkeypatch.setattr(kernels, "attend_available", lambda: False)  # below: a float32 cache
    need = memory_need(args, device=cpu, dtype=torch.bfloat16, max_seq_len=8192, slots=2)
    assert need.kv_cache == values * 4
    with pytest.raises(CheckpointError) as e:
        check_memory(args, device=cpu, dtype=torch.float32, max_seq_len=131072,
                     available=24 << 30)
    message = str(e.value)
    assert "24.0 GiB available" in message and "--dtype bfloat16 with --max-seq-len 4096" in message
    with pytest.raises(CheckpointError, match="--quantize int8 with --max-seq-len 4096"):
        check_memory(args, device=cpu, dtype=torch.bfloat16, max_seq_len=131072,
                     available=12 << 30)
    with pytest.raises(CheckpointError, match=r"would fit: --max-seq-len 2\d{4}\b"):
        check_memory(args, device=cpu, dtype=torch.bfloat16, max_seq_len=131072,
                     available=20 << 30)


def test_slots_count_in_the_kv_cache(tmp_path: Path, sd: dict) -> None:
    from llamarun.preflight import kv_cache_bytes

    ck = load(hf(tmp_path, sd), max_seq_len=64, max_batch_size=3)
    cache = ck.model.layers[0].attention.kv_cache
    actual = 2 * ck.args.n_layers * cache.k_cache.numel() * cache.k_cache.element_size()
    assert actual == kv_cache_bytes(ck.args, max_seq_len=64, slots=3, dtype=torch.float32)


def test_max_seq_len_beyond_context_warns(tmp_path: Path, sd: dict,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import logging

    folder = hf(tmp_path, sd)
    logger = logging.getLogger("llamarun")
    old = logger.propagate
    logger.propagate = True  # a CLI test may have turned it off
    try:
        with caplog.at_level(logging.WARNING, logger="llamarun"):
            load(folder, max_seq_len=256)
    finally:
        logger.propagate = old
    assert any("beyond the model's trained context of 128" in r.getMessage()
               for r in caplog.records)
