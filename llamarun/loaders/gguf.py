"""GGUF files (llama.cpp's format): Llama metadata into ModelArgs, tensors dequantized lazily.

The header is parsed here with the `gguf` package's constants (its GGUFReader builds a numpy
view per string, about 3 s for a 49K-token vocabulary); the tensor data stays in a private
mmap and each tensor is dequantized on request by `gguf.quants`, llama.cpp's own reference.
"""

from __future__ import annotations

import dataclasses
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.quants import dequantize

from llamarun.config import ModelArgs, RopeScaling
from llamarun.errors import CheckpointError, ConfigError
from llamarun.loaders.files import check_regular
from llamarun.loaders.fuse import RawCheckpoint
from llamarun.quant import GGUF_INT4_TYPES, GGUF_SYMMETRIC_INT4_TYPES, Int4Parts, gguf_int4
from llamarun.preflight import check_plausible
from llamarun.rope import rope_frequencies

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})

_SCALARS: dict[int, tuple[str, int]] = {  # value type -> (struct code, size)
    GGUFValueType.UINT8: ("B", 1), GGUFValueType.INT8: ("b", 1),
    GGUFValueType.UINT16: ("H", 2), GGUFValueType.INT16: ("h", 2),
    GGUFValueType.UINT32: ("I", 4), GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4), GGUFValueType.BOOL: ("?", 1),
    GGUFValueType.UINT64: ("Q", 8), GGUFValueType.INT64: ("q", 8),
    GGUFValueType.FLOAT64: ("d", 8),
}
_NP_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}

_LAYER = re.compile(r"blk\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 scaling, stored as per-frequency divisors
_MAX_ARRAY_DEPTH = 8  # arrays of arrays: real files nest one level at most


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file, with its shape in PyTorch order (rows last-but-one)."""

    name: str
    qtype: int  # a GGMLQuantizationType value (kept an int: files may hold types we don't know)
    shape: tuple[int, ...]  # reversed GGUF dims: (out_features, in_features) for a matrix
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        """The ggml type's name (Q4_K, F16, ...) or 'type N' for an unknown one."""
        try:
            return GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"type {self.qtype}"


@dataclass
class GGUFFile:
    """A parsed GGUF header: metadata, tensor table, and the file mapped copy-on-write."""

    path: Path
    version: int
    metadata: dict[str, Any]  # strings as str, string arrays as list[str], numeric arrays as numpy
    tensors: dict[str, GGUFTensorInfo]
    data: np.ndarray | None  # uint8 view of the whole file (None when opened for metadata only)
    mm: mmap.mmap | None = None

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that has been copied out (they leave the RSS; the
        file stays mapped and would be read again if the tensor were)."""
        if self.mm is None or not hasattr(self.mm, "madvise"):
            return
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = -(-info.offset // page) * page  # whole pages inside the tensor only
        end = (info.offset + info.nbytes) // page * page
        if end > start:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor, as a uint8 view of the mapped file."""
        assert self.data is not None, "opened with tensors=False"
        info = self.tensors[name]
        return self.data[info.offset:info.offset + info.nbytes]


class _Cursor:
    """Sequential little-endian reads from a buffer, raising CheckpointError past the end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def scalar(self, code: str, size: int) -> Any:
        if self.pos + size > self.size:
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return int(self.scalar("I", 4))

    def u64(self) -> int:
        return int(self.scalar("Q", 8))

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def room(self, count: int, size: int, what: str) -> None:
        """Raise CheckpointError unless `count` items of at least `size` bytes fit in what is
        left (a header claiming 10^18 entries ends here, not in a loop or a huge list)."""
        if count * size > self.size - self.pos:
            raise CheckpointError(f"{self.path}: truncated GGUF header ({what}: {count} entries "
                                  "do not fit in the file)")

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise CheckpointError(f"{self.path}: metadata {key} nests arrays more than "
                                      f"{_MAX_ARRAY_DEPTH} deep")
            etype, count = self.u32(), self.u64()
            if etype == GGUFValueType.STRING:
                self.room(count, 8, f"metadata {key}")
                return [self.string() for _ in range(count)]
            if etype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[etype])
                end = self.pos + count * dt.itemsize
                if end > self.size:
                    raise CheckpointError(f"{self.path}: truncated GGUF header (metadata {key})")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos = end
                return arr
            if etype == GGUFValueType.ARRAY:
                self.room(count, 12, f"metadata {key}")
                return [self.value(GGUFValueType.ARRAY, key, depth + 1) for _ in range(count)]
        raise CheckpointError(f"{self.path}: metadata {key} has unknown GGUF value type {vtype}")


def read_gguf_file(path: Path, *, tensors: bool = True) -> GGUFFile:
    """Parse a GGUF header; with tensors=True also map the file for tensor_bytes()."""
    check_regular(path, what="GGUF file")
    try:
        with path.open("rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if tensors else mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise CheckpointError(f"{path}: cannot map GGUF file ({e})") from None
    cur = _Cursor(mm, path)
    if len(mm) < 8 or mm[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
        raise CheckpointError(f"{path}: GGUF version {version} is not supported{hint}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    cur.room(n_kv, 8 + 4 + 1, "metadata")  # key length, value type, one byte of value
    cur.room(n_tensors, 8 + 4 + 4 + 8, "tensor table")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.u32(), key)
    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions")
        dims = tuple(cur.u64() for _ in range(n_dims))
        infos.append((name, cur.u32(), tuple(reversed(dims)), cur.u64()))
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool):
        raise CheckpointError(f"{path}: general.alignment must be an integer, got "
                              f"{_short(alignment)}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment {alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    table: dict[str, GGUFTensorInfo] = {}
    for name, qtype, shape, offset in infos:
        nbytes = _nbytes(path, name, qtype, shape)
        start = data_start + offset
        if nbytes is not None and start + nbytes > len(mm):
            raise CheckpointError(f"{path}: tensor {name} extends past the end of the file "
                                  "(truncated download?)")
        table[name] = GGUFTensorInfo(name, qtype, shape, start, nbytes or 0)
    data = np.frombuffer(mm, dtype=np.uint8) if tensors else None
    if not tensors:
        mm.close()
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=table, data=data,
                    mm=mm if tensors else None)


def _nbytes(path: Path, name: str, qtype: int, shape: tuple[int, ...]) -> int | None:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        return None  # an unknown type: reported when the tensor is read
    n = 1
    for d in shape[:-1]:
        n *= d
    cols = shape[-1] if shape else 1
    if cols % block:
        raise CheckpointError(f"{path}: tensor {name} has rows of {cols} values, not a multiple "
                              f"of the {GGMLQuantizationType(qtype).name} block size {block}")
    return n * (cols // block) * type_size


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The metadata key/value pairs of a GGUF file (tensor data is not mapped)."""
    return read_gguf_file(path, tensors=False).metadata


def dequantize_tensor(file: GGUFFile, name: str, rows: slice | None = None) -> torch.Tensor:
    """One tensor (or a slice of its rows) as a CPU torch tensor: F32/F16/BF16 as stored (mmap
    views), the rest float32."""
    info = file.tensors[name]
    if rows is not None:
        n_rows = info.shape[0] if len(info.shape) > 1 else 1
        start, stop, _ = rows.indices(n_rows)
        row_bytes = info.nbytes // max(1, n_rows)
        info = dataclasses.replace(info, shape=(max(0, stop - start), *info.shape[1:]),
                                   offset=info.offset + start * row_bytes,
                                   nbytes=max(0, stop - start) * row_bytes)
    if info.qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(GGMLQuantizationType(t).name for t in SUPPORTED_TYPES))
        raise CheckpointError(f"{file.path}: tensor {name} has type {info.type_name}, which "
                              f"llamarun does not support (supported: {supported})")
    assert file.data is not None, "opened with tensors=False"
    raw = file.data[info.offset:info.offset + info.nbytes]
    qtype = GGMLQuantizationType(info.qtype)
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(info.shape))
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(info.shape))
    if qtype == GGMLQuantizationType.BF16:
        return torch.from_numpy(raw.view(np.int16).reshape(info.shape)).view(torch.bfloat16)
    rows = raw.reshape(-1, raw.size // max(1, int(np.prod(info.shape[:-1]))))
    out = np.empty((rows.shape[0], info.shape[-1] if info.shape else 1), dtype=np.float32)
    step = max(1, (8 << 20) // max(1, out.shape[1] * 4))  # ~8 MB of output at a time
    try:
        for i in range(0, rows.shape[0], step):  # in chunks: gguf.quants makes temporaries
            out[i:i + step] = dequantize(rows[i:i + step], qtype)
    except Exception as e:  # the gguf package raises several types on malformed blocks
        raise CheckpointError(f"{file.path}: cannot dequantize tensor {name} ({info.type_name}: "
                              f"{e})") from None
    return torch.from_numpy(out.reshape(info.shape))


def meta_name(gguf_name: str) -> str:
    """The Meta name for a llama.cpp tensor name (unknown names are returned unchanged)."""
    if gguf_name in _TOP_MAP:
        return _TOP_MAP[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return gguf_name


def _number(value: Any, key: str, src: str) -> Any:
    """A metadata value that must be a number: strings, booleans, NaN and infinities are
    ConfigErrors naming the key (int("64") must not quietly accept a string)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{src}: metadata {key} must be a number, got {_short(value)}")
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        raise ConfigError(f"{src}: metadata {key} must be a finite number, got {value}")
    return value


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _decimal(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    if not abs(value) < 3.4e38:  # beyond float32 (kept, and refused by the config checks)
        return float(value)
    return float(str(np.float32(value)))


def model_args(file: GGUFFile) -> ModelArgs:
    """ModelArgs from the `llama.*` metadata of a GGUF file."""
    md, src = file.metadata, str(file.path)
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or arch != "llama":  # an array would not compare to a str
        raise ConfigError(f"{src}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = md.get(f"llama.{key}", default)
        if value is None and required:
            raise ConfigError(f"{src}: metadata key llama.{key} is missing")
        if isinstance(value, (np.ndarray, list)):
            raise ConfigError(f"{src}: metadata llama.{key} is an array (per-layer sizes are "
                              "not supported)")
        return _number(value, f"llama.{key}", src)

    if get("expert_count", 0):
        raise ConfigError(f"{src}: llama.expert_count={get('expert_count')} (mixture of experts) "
                          "is not supported")

    def size(key: str, default: Any = None, *, required: bool = False) -> int:
        value = get(key, default, required=required)
        if not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{src}: metadata llama.{key} must be an integer, got {_short(value)}")
        return int(value)

    dim = size("embedding_length", required=True)
    n_heads = size("attention.head_count", required=True)
    head_dim = size("attention.key_length", 0) or (dim // n_heads if n_heads > 0 else 0)
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ConfigError(f"{src}: llama.rope.dimension_count {rot} differs from the head size "
                          f"{head_dim} (partial rotary embeddings are not supported)")
    vocab = get("vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        if isinstance(tokens, (list, np.ndarray)):
            vocab = len(tokens)
        elif "token_embd.weight" in file.tensors:
            vocab = file.tensors["token_embd.weight"].shape[0]
        else:
            raise ConfigError(f"{src}: cannot tell the vocabulary size (no llama.vocab_size)")
    theta = _decimal(get("rope.freq_base", 10000.0))
    scaling = _rope_scaling(file, head_dim, theta)
    try:
        return ModelArgs(
            dim=dim,
            n_layers=size("block_count", required=True),
            n_heads=n_heads,
            n_kv_heads=size("attention.head_count_kv", 0) or n_heads,
            vocab_size=int(vocab),
            hidden_dim=size("feed_forward_length", required=True),
            head_dim=head_dim,
            norm_eps=_decimal(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings="output.weight" not in file.tensors,
            max_seq_len=size("context_length", 2048),
        )
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


def _rope_scaling(file: GGUFFile, head_dim: int, theta: float) -> RopeScaling | None:
    md, src = file.metadata, str(file.path)
    kind = md.get("llama.rope.scaling.type", "none")
    if not isinstance(kind, str):
        raise ConfigError(f"{src}: metadata llama.rope.scaling.type must be a string, got "
                          f"{_short(kind)}")
    factor = _decimal(_number(md.get("llama.rope.scaling.factor", 0.0), "llama.rope.scaling.factor",
                              src) or _number(md.get("llama.rope.scale_linear", 0.0),
                                              "llama.rope.scale_linear", src))
    if ROPE_FREQS in file.tensors:
        return _llama3_scaling(file, head_dim, theta)
    if kind == "none" and factor in (0.0, 1.0):
        return None
    if kind in ("linear", "none") and factor > 0:
        return None if factor == 1.0 else RopeScaling(rope_type="linear", factor=factor)
    raise ConfigError(f"{src}: llama.rope.scaling.type {kind!r} is not supported "
                      "(supported: none, linear, and Llama 3.1 rope_freqs)")


def _llama3_scaling(file: GGUFFile, head_dim: int, theta: float) -> RopeScaling:
    """Recover Llama 3.1 scaling from llama.cpp's rope_freqs tensor (divisor per frequency)."""
    src = str(file.path)
    divisors = dequantize_tensor(file, ROPE_FREQS).double().flatten()
    if divisors.numel() != head_dim // 2:
        raise ConfigError(f"{src}: tensor {ROPE_FREQS} has {divisors.numel()} values, "
                          f"expected {head_dim // 2}")
    orig = int(_number(file.metadata.get("llama.rope.scaling.original_context_length", 8192),
                       "llama.rope.scaling.original_context_length", src))
    scaling = RopeScaling(rope_type="llama3", factor=float(divisors.max()), low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=orig)
    base = rope_frequencies(head_dim, theta, None).double()
    want = base / divisors
    if not torch.allclose(rope_frequencies(head_dim, theta, scaling).double(), want, rtol=1e-4):
        raise ConfigError(f"{src}: tensor {ROPE_FREQS} does not match Llama 3.1 RoPE scaling "
                          "(low_freq_factor 1, high_freq_factor 4)")
    return scaling


def read_gguf(path: Path) -> RawCheckpoint:
    """Open a GGUF file lazily and describe it as a RawCheckpoint in Meta's layout."""
    file = read_gguf_file(path)
    args = model_args(file)
    check_plausible(args, n_tensors=len(file.tensors), source=str(path))
    to_gguf: dict[str, str] = {}
    for gguf_name in file.tensors:
        if gguf_name != ROPE_FREQS:
            to_gguf[meta_name(gguf_name)] = gguf_name

    # llama.cpp's converter stores q/k rows in Meta's interleaved RoPE order (it undoes HF's
    # permutation; transformers re-applies it when loading a GGUF), so no row shuffle is needed.
    def get(name: str) -> torch.Tensor:
        return dequantize_tensor(file, to_gguf[name])

    def where(name: str) -> str:
        return f"{path} ({to_gguf[name]})" if name in to_gguf else str(path)

    md = file.metadata
    extra: dict[str, object] = {
        "gguf_version": file.version,
        "name": md.get("general.name"),
        "file_type": md.get("general.file_type"),
        "tensor_types": sorted({file.tensors[n].type_name for n in to_gguf.values()}),
        "chat_template": md.get("tokenizer.chat_template"),
        "tokenizer_model": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
    }
    def stored(name: str) -> str:
        return file.tensors[to_gguf[name]].type_name

    def int4(name: str) -> Int4Parts | None:
        info = file.tensors[to_gguf[name]]
        if info.qtype not in GGUF_INT4_TYPES or len(info.shape) != 2:
            return None
        return gguf_int4(file.tensor_bytes(info.name), info.qtype, (info.shape[0], info.shape[1]))

    return RawCheckpoint(args=args, layout="gguf", path=path, names=set(to_gguf), get=get,
                         where=where, extra=extra, types=stored, int4=int4,
                         release=lambda name: file.release(to_gguf[name]),
                         get_rows=lambda name, a, b: dequantize_tensor(file, to_gguf[name],
                                                                       slice(a, b)),
                         int4_types=frozenset(GGMLQuantizationType(t).name for t in GGUF_INT4_TYPES),
                         int4_symmetric_types=frozenset(GGMLQuantizationType(t).name
                                                        for t in GGUF_SYMMETRIC_INT4_TYPES))
