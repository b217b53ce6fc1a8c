"""Linear and embedding modules over int8 and int4 weights, and the pass that puts them in a model.

On CPU, int8 products run llamarun's own kernel where the CPU has AVX512-VNNI (up to
kernels.MAX_ROWS rows) or AVX2 without AVX-512 (up to kernels.INT8_AVX2_MAX_ROWS), and 4-bit
ones where it has AVX2 but not AVX-512 (llamarun.kernels decides);
other products run PyTorch's weight-only kernels (`_weight_int8pack_mm`,
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
from llamarun.device import DENSE_ROWS, linear, quant_kernels
from llamarun.quant.formats import Int4Parts, Int8Parts, WeightFormat

KERNEL_DTYPE = torch.bfloat16  # the activation dtype of the CPU weight-only kernels


def _one_token(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.shape[:-1].numel() == 1


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with q (out, in) int8 and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, *, kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    @staticmethod
    def state(parts: Int8Parts, *, device: torch.device, dtype: torch.dtype,
              kernel: bool) -> dict[str, torch.Tensor]:
        """The module's buffers for `parts` (scales in the kernel's dtype where one runs)."""
        return {"weight": parts.q.to(device).contiguous(),
                "scales": parts.scale.to(device=device, dtype=KERNEL_DTYPE if kernel else dtype)}

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight (out, in) in `dtype`."""
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Where PyTorch's approximate kernel would run, llamarun's (VNNI, M <= 8) may instead
        y = kernels.int8_linear(x, self.weight, self.scales) if self.kernel else None
        if y is not None:
            return y
        if _one_token(x) and not self.kernel:
            return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales.to(x.dtype)
        rows = x.shape[:-1].numel()
        if self.kernel and rows < DENSE_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(rows, self.in_features).to(KERNEL_DTYPE), self.weight, self.scales)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return linear(x, self.dense(x.dtype))


class Int4Linear(nn.Module):
    """y = x @ W^T with W in 4-bit groups along `in` (see quant.formats for the convention).

    Three layouts, chosen once at load: on CPUs where llamarun's 4-bit kernel serves
    (kernels.int4_layout: AVX2 without AVX-512) its own ("llamarun": nibbles in tiles of 8 rows
    and blocks of 64 values, see kernels.int4_pack; float16 scales and zeros in the same tiles,
    see kernels.int4_pack_groups); on other CPUs PyTorch's int4pack ("int4pack",
    `_weight_int4pack_mm_for_cpu`, bfloat16 scales and zeros); elsewhere plain nibbles
    ("plain", low nibble = even column), dequantized into the product. Products the
    kernel does not serve (more than kernels.INT4_MAX_ROWS rows) dequantize the weight instead.
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int,
                 kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.layout = _int4_layout(kernel, group_size)
        if self.layout == "llamarun":
            shape = kernels.int4_groups_shape(out_features, in_features, group_size)
            self.register_buffer("weight", torch.empty(shape[0] * kernels.INT4_TILE,
                                                       -(-in_features // 64) * 32,
                                                       dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(shape, dtype=torch.float16))
            self.register_buffer("zeros", torch.empty(shape, dtype=torch.float16))
            return
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2))

    @staticmethod
    def state(parts: Int4Parts, *, device: torch.device, dtype: torch.dtype,
              kernel: bool) -> dict[str, torch.Tensor]:
        """The module's buffers for `parts`."""
        q = parts.q.to(device)
        layout = _int4_layout(kernel, parts.group_size)
        if layout == "llamarun":
            k = q.shape[1]
            return {"weight": kernels.int4_pack(q),
                    "scales": kernels.int4_pack_groups(parts.scale.to(device), k),
                    "zeros": kernels.int4_pack_groups(parts.zero.to(device), k)}
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
            zeros = kernels.int4_unpack_groups(self.zeros, self.out_features, groups)
            w = w * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]
            return w.view(self.out_features, self.in_features)
        if self.layout == "int4pack":  # the packing is opaque: run the kernel on the identity
            eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.weight.device)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.weight, self.group_size, self.scales_and_zeros).t().to(dtype)
        q = torch.stack([self.weight & 0x0F, self.weight >> 4], dim=-1).view(self.out_features, -1)
        sz = self.scales_and_zeros.to(dtype)
        w = (q.to(dtype) - 8).view(self.out_features, groups, self.group_size)
        w = w * sz[:, :, 0].t()[..., None] + sz[:, :, 1].t()[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "llamarun":
            y = kernels.int4_linear(x, self.weight, self.scales, self.zeros, self.group_size,
                                    self.out_features)
            return y if y is not None else F.linear(x, self.dense(x.dtype))
        if self.layout == "int4pack":
            rows = x.shape[:-1].numel()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(rows, self.in_features).to(KERNEL_DTYPE), self.weight, self.group_size,
                self.scales_and_zeros)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dense(x.dtype))


def _int4_layout(kernel: bool, group_size: int) -> str:
    """Int4Linear's layout: "llamarun", "int4pack" (CPU kernels) or "plain"."""
    if not kernel:
        return "plain"
    return "llamarun" if kernels.int4_layout(group_size) else "int4pack"


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


def _kernels(device: torch.device, in_features: int) -> tuple[bool, bool]:
    int8_kernel, int4_kernel = quant_kernels(device)
    # _weight_int8pack_mm reads rows in blocks of 16 values: other widths give wrong results.
    return int8_kernel and in_features % 16 == 0, int4_kernel


def quantized_module(fmt: WeightFormat, in_features: int, out_features: int, *,
                     device: torch.device) -> nn.Module:
    """An empty Int8Linear / Int4Linear for `fmt` (on the current default device)."""
    int8_kernel, int4_kernel = _kernels(device, in_features)
    if fmt.kind == "int8":
        return Int8Linear(in_features, out_features, kernel=int8_kernel)
    if fmt.kind == "int4":
        return Int4Linear(in_features, out_features, group_size=fmt.group_size, kernel=int4_kernel)
    raise ValueError(f"not a quantized format: {fmt}")


def module_state(fmt: WeightFormat, parts: Int8Parts | Int4Parts, *, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers of the module quantized_module(fmt, ...) makes, for `parts`."""
    int8_kernel, int4_kernel = _kernels(device, parts.q.shape[1])
    if isinstance(parts, Int8Parts):
        return Int8Linear.state(parts, device=device, dtype=dtype, kernel=int8_kernel)
    return Int4Linear.state(parts, device=device, dtype=dtype, kernel=int4_kernel)


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
