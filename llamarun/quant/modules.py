"""Linear and embedding modules over int8 and int4 weights, and the pass that puts them in a model.

On CUDA, 4-bit products run PyTorch's `_weight_int4pack_mm` (compute capability 8.0 and up) on
weights packed once at load into its tile layout, and int8 products of up to 16 rows (and 4-bit
ones the tensor-core kernel does not take) llamarun's Triton kernels (`quant.cuda_kernels`, 7.0
and up; eager passes, and compiled ones of 2-16 rows: a compiled one-row int8 product is
inductor's fused multiply + sum). On CPU, int8 products run llamarun's own kernel where the
CPU has AVX512-VNNI (up to kernels.INT8_VNNI_MAX_ROWS rows) or AVX2 without AVX-512 (up to
kernels.INT8_AVX2_MAX_ROWS), and 4-bit ones where it has AVX2 or AVX-512 (llamarun.kernels
decides); other products run PyTorch's weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), which take bfloat16 activations: other activation dtypes are
cast for the product only (a vector per token). Elsewhere the weight is
dequantized into the activation dtype inside forward, which torch.compile fuses into the product.
Under torch.compile a one-token int8 product is otherwise written as multiply + sum, one fused
reduction over the int8 bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamarun import kernels
from llamarun.device import DENSE_ROWS, cuda_int4_kernel, cuda_triton_kernels, linear, quant_kernels
from llamarun.quant import cuda_kernels
from llamarun.quant.formats import Int4Parts, Int8Parts, WeightFormat

KERNEL_DTYPE = torch.bfloat16  # the activation dtype of the CPU weight-only kernels


def _one_token(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.shape[:-1].numel() == 1


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with q (out, in) int8 and one scale per output row.

    `kernel` (int8_kernel's answer for the device): "cpu" for the CPU kernels (llamarun's, then
    PyTorch's weight-only one), "cuda" for the Triton kernel (quant.cuda_kernels), None where the
    weight is dequantized into the product.
    """

    def __init__(self, in_features: int, out_features: int, *, kernel: str | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    @staticmethod
    def state(parts: Int8Parts, *, device: torch.device, dtype: torch.dtype,
              kernel: str | None) -> dict[str, torch.Tensor]:
        """The module's buffers for `parts` (scales in the kernel's dtype where one runs)."""
        scale_dtype = KERNEL_DTYPE if kernel == "cpu" else dtype
        return {"weight": parts.q.to(device).contiguous(),
                "scales": parts.scale.to(device=device, dtype=scale_dtype)}

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight (out, in) in `dtype`."""
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def kernel_product(self, x: torch.Tensor) -> kernels.Product | None:
        """The product forward(x) hands llamarun's int8 kernel, for kernels.decode_layer (or
        None)."""
        if self.kernel != "cpu":
            return None
        return kernels.int8_product(x, self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Where PyTorch's approximate kernel would run, llamarun's (VNNI, M <= 8) may instead
        cpu = self.kernel == "cpu"
        y = kernels.int8_linear(x, self.weight, self.scales) if cpu else None
        if y is not None:
            return y
        if _one_token(x) and not cpu:  # inductor fuses it into one reduction over the bytes
            return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales.to(x.dtype)
        rows = x.shape[:-1].numel()
        if self.kernel == "cuda" and rows <= cuda_kernels.MAX_ROWS:
            return cuda_kernels.int8_linear(x, self.weight, self.scales)
        if cpu and rows < DENSE_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(rows, self.in_features).to(KERNEL_DTYPE), self.weight, self.scales)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.dtype == torch.bfloat16 and not torch.compiler.is_compiling():
            w = kernels.int8_dequant(self.weight, self.scales)  # dense()'s numbers, faster
            if w is not None:
                return linear(x, w)
        return linear(x, self.dense(x.dtype))


class Int4Linear(nn.Module):
    """y = x @ W^T with W in 4-bit groups along `in` (see quant.formats for the convention).

    Four layouts, chosen once at load (int4_layout): on CUDA PyTorch's tensor-core kernel's
    ("tinygemm", `_weight_int4pack_mm`, int32 tiles made by `_convert_weight_to_int4pack`,
    bfloat16 scales and zeros); on CPUs where llamarun's 4-bit kernel serves
    (kernels.int4_layout: AVX2 or AVX-512) its own ("llamarun": nibbles in tiles of 16 rows
    and blocks of 64 values, see kernels.int4_pack; float16 scales and zeros in the same tiles,
    see kernels.int4_pack_groups; a symmetric weight's zeros, all 0, as an empty tensor: neither
    stored nor read); on other CPUs PyTorch's int4pack ("int4pack",
    `_weight_int4pack_mm_for_cpu`, bfloat16 scales and zeros); elsewhere plain nibbles
    ("plain", low nibble = even column), dequantized into the product. Products the
    kernel does not serve (more than kernels.INT4_MAX_ROWS rows) dequantize the weight instead.
    `kernel` "cuda" (int4_kernel's answer): a plain weight's products of up to 16 rows run the
    Triton kernel (quant.cuda_kernels) instead of dequantizing it (CUDA GPUs the tensor-core
    kernel does not serve).
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int,
                 layout: str, symmetric: bool = False, kernel: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.layout = layout
        self.kernel = kernel
        if layout == "tinygemm":
            inner = _inner_k_tiles(in_features)
            self.register_buffer("weight", torch.empty(
                out_features // 8, in_features // (inner * 16), 32, inner // 2, dtype=torch.int32))
            self.register_buffer("scales_and_zeros", torch.empty(
                in_features // group_size, out_features, 2, dtype=KERNEL_DTYPE))
            return
        if self.layout == "llamarun":
            shape = kernels.int4_groups_shape(out_features, in_features, group_size)
            self.register_buffer("weight", torch.empty(shape[0] * kernels.INT4_TILE,
                                                       -(-in_features // 64) * 32,
                                                       dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(shape, dtype=torch.float16))
            self.register_buffer("zeros", torch.empty(0 if symmetric else shape,
                                                      dtype=torch.float16))
            return
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2))

    @staticmethod
    def state(parts: Int4Parts, *, device: torch.device, dtype: torch.dtype,
              layout: str, symmetric: bool = False) -> dict[str, torch.Tensor]:
        """The module's buffers for `parts` in `layout` (symmetric: parts' zeros are all 0)."""
        q = parts.q.to(device)
        if layout == "tinygemm":  # even columns in the high nibble, as the converter takes them
            q = q.to(torch.int32)
            packed = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
            weight = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(),
                                                                _inner_k_tiles(q.shape[1]))
            sz = torch.stack([parts.scale.t(), parts.zero.t()], dim=-1)  # (K // g, N, 2)
            return {"weight": weight,
                    "scales_and_zeros": sz.to(device=device, dtype=KERNEL_DTYPE).contiguous()}
        if layout == "llamarun":
            k = q.shape[1]
            if symmetric:
                if parts.zero.any():
                    raise ValueError("a symmetric int4 weight has zeros that are not 0")
                zeros = torch.empty(0, dtype=torch.float16, device=device)
            else:
                zeros = kernels.int4_pack_groups(parts.zero.to(device), k)
            return {"weight": kernels.int4_pack(q),
                    "scales": kernels.int4_pack_groups(parts.scale.to(device), k),
                    "zeros": zeros}
        if layout == "int4pack":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        else:
            packed = q[:, 0::2] | (q[:, 1::2] << 4)
        sz = torch.stack([parts.scale.t(), parts.zero.t()], dim=-1)  # (K // g, N, 2)
        sz = sz.to(device=device, dtype=KERNEL_DTYPE if layout == "int4pack" else dtype).contiguous()
        return {"weight": packed.contiguous(), "scales_and_zeros": sz}

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight (out, in) in `dtype`."""
        groups = self.in_features // self.group_size
        if self.layout == "llamarun":
            q = kernels.int4_unpack(self.weight, self.in_features)[:self.out_features]
            w = (q.to(dtype) - 8).view(self.out_features, groups, self.group_size)
            scales = kernels.int4_unpack_groups(self.scales, self.out_features, groups)
            w = w * scales.to(dtype)[..., None]
            if self.zeros.numel():
                zeros = kernels.int4_unpack_groups(self.zeros, self.out_features, groups)
                w = w + zeros.to(dtype)[..., None]
            return w.view(self.out_features, self.in_features)
        if self.layout in ("int4pack", "tinygemm"):  # opaque packings: the kernel on the identity
            eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.weight.device)
            return self._packed_mm(eye).t().to(dtype)
        q = torch.stack([self.weight & 0x0F, self.weight >> 4], dim=-1).view(self.out_features, -1)
        sz = self.scales_and_zeros.to(dtype)
        w = (q.to(dtype) - 8).view(self.out_features, groups, self.group_size)
        w = w * sz[:, :, 0].t()[..., None] + sz[:, :, 1].t()[..., None]
        return w.view(self.out_features, self.in_features)

    def kernel_product(self, x: torch.Tensor) -> kernels.Product | None:
        """The product forward(x) hands llamarun's 4-bit kernel, for kernels.decode_layer (or
        None)."""
        if (self.layout != "llamarun"
                or kernels.int4_gemm_serves(x, self.out_features, self.in_features)):
            return None
        return kernels.int4_product(x, self.weight, self.scales, self.zeros, self.group_size,
                                    self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "llamarun":
            if kernels.int4_gemm_serves(x, self.out_features, self.in_features):  # AMX, prompts
                w = kernels.int4_dequant(self.weight, self.scales, self.zeros, self.group_size,
                                         self.out_features, self.in_features)
                return F.linear(x, w)
            y = kernels.int4_linear(x, self.weight, self.scales, self.zeros, self.group_size,
                                    self.out_features)
            return y if y is not None else F.linear(x, self.dense(x.dtype))
        if self.layout in ("int4pack", "tinygemm"):
            rows = x.shape[:-1].numel()
            y = self._packed_mm(x.reshape(rows, self.in_features).to(KERNEL_DTYPE).contiguous())
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.kernel == "cuda" and x.shape[:-1].numel() <= cuda_kernels.MAX_ROWS:
            return cuda_kernels.int4_linear(x, self.weight, self.scales_and_zeros, self.group_size)
        return F.linear(x, self.dense(x.dtype))

    def _packed_mm(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in) bfloat16 @ W^T by PyTorch's kernel of an opaque layout (int4pack on CPU,
        tinygemm on CUDA)."""
        op = (torch.ops.aten._weight_int4pack_mm_for_cpu if self.layout == "int4pack"
              else torch.ops.aten._weight_int4pack_mm)
        return op(rows, self.weight, self.group_size, self.scales_and_zeros)


def int4_layout(device: torch.device, in_features: int, out_features: int,
                group_size: int) -> str:
    """Int4Linear's layout for a weight (out, in) on `device`: "tinygemm" (CUDA kernel),
    "llamarun" or "int4pack" (CPU kernels), else "plain"."""
    if cuda_int4_kernel(device):
        # The CUDA kernel's tiles: 8 output rows, 32 to 128 inputs; groups of 32 to 256.
        if out_features % 8 == 0 and in_features % 32 == 0 and group_size in (32, 64, 128, 256):
            return "tinygemm"
        return "plain"
    if not quant_kernels(device)[1]:
        return "plain"
    return "llamarun" if kernels.int4_layout(group_size) else "int4pack"


def int4_kernel(device: torch.device, layout: str) -> str | None:
    """Int4Linear's kernel for a weight in `layout` on `device`: "cuda" (the Triton kernel) for
    a plain layout on CUDA where it serves, else None (the layout decides)."""
    return "cuda" if layout == "plain" and cuda_triton_kernels(device) else None


def _inner_k_tiles(in_features: int) -> int:
    """The CUDA kernel's inner tiles along `in` (16 values each): the most of 8, 4, 2 that divide it."""
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


class Int8Embedding(nn.Module):
    """An embedding table stored as per-row int8; rows are dequantized into `dtype` on lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_embeddings))

    @staticmethod
    def state(parts: Int8Parts, *, device: torch.device) -> dict[str, torch.Tensor]:
        """The module's buffers for `parts`."""
        return {"weight": parts.q.to(device).contiguous(), "scales": parts.scale.to(device)}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight).to(self.dtype)
        return rows * self.scales[tokens].to(self.dtype).unsqueeze(-1)

    def kernel_table(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(table, scales) for kernels.layer_stack's embedding, which gives forward's rows in
        `dtype` (None where forward's are of another dtype)."""
        return (self.weight, self.scales) if dtype == self.dtype else None


def int8_kernel(device: torch.device, in_features: int) -> str | None:
    """Int8Linear's kernel for a weight of `in_features` inputs on `device`: "cpu", "cuda" or
    None."""
    if cuda_triton_kernels(device):
        return "cuda"
    # _weight_int8pack_mm reads rows in blocks of 16 values: other widths give wrong results.
    return "cpu" if quant_kernels(device)[0] and in_features % 16 == 0 else None


def quantized_module(fmt: WeightFormat, in_features: int, out_features: int, *,
                     device: torch.device) -> nn.Module:
    """An empty Int8Linear / Int4Linear for `fmt` (on the current default device)."""
    if fmt.kind == "int8":
        return Int8Linear(in_features, out_features, kernel=int8_kernel(device, in_features))
    if fmt.kind == "int4":
        layout = int4_layout(device, in_features, out_features, fmt.group_size)
        return Int4Linear(in_features, out_features, group_size=fmt.group_size, layout=layout,
                          symmetric=fmt.symmetric, kernel=int4_kernel(device, layout))
    raise ValueError(f"not a quantized format: {fmt}")


def module_state(fmt: WeightFormat, parts: Int8Parts | Int4Parts, *, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers of the module quantized_module(fmt, ...) makes, for `parts`."""
    n, k = parts.q.shape
    if isinstance(parts, Int8Parts):
        return Int8Linear.state(parts, device=device, dtype=dtype, kernel=int8_kernel(device, k))
    layout = int4_layout(device, k, n, parts.group_size)
    return Int4Linear.state(parts, device=device, dtype=dtype, layout=layout,
                            symmetric=fmt.symmetric)


def swap_modules(model: nn.Module, formats: dict[str, WeightFormat], *, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Replace each dense module whose weight `formats` marks quantized by its quantized form.

    `formats` maps weight names ("layers.0.attention.wqkv.weight") to formats; run it on the
    model built on the meta device, before loading the state dict.
    """
    for name, fmt in formats.items():
        if fmt.kind == "dense":
            continue
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new: nn.Module = Int8Embedding(old.num_embeddings, old.embedding_dim, dtype=dtype)
        else:
            new = quantized_module(fmt, old.in_features, old.out_features, device=device)
        setattr(parent, attr, new)
