"""Device and dtype resolution: the only module that looks at device types."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from llamarun import kernels
from llamarun.errors import InvalidArgumentError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda:N' is checked against the machine."""
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {spec!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise InvalidArgumentError(f"device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), read from its features."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def default_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype `auto` means for weights stored as `stored` (None: quantized or unknown)."""
    return auto_dtype(device, stored)[0]


def auto_dtype(device: torch.device, stored: torch.dtype | None = None) -> tuple[torch.dtype, str]:
    """default_dtype and the reason for it, in words (`llamarun info` shows it).

    CPU: the stored precision, as llama.cpp and transformers' torch_dtype="auto" do: float32
    stays float32 (bfloat16 would change greedy output), bfloat16 stays bfloat16, float16 becomes
    bfloat16 (CPU float16 kernels are slow; same size). Quantized weights compute in bfloat16
    where the processor has native bf16, else float32. CUDA: bfloat16 (float16 where bf16 is
    unsupported), the tensor cores' precision.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA computes in bfloat16"
        return torch.float16, "CUDA computes in float16 (this GPU has no bfloat16)"
    if stored == torch.float32:
        return torch.float32, "stored as float32"
    if stored == torch.bfloat16:
        return torch.bfloat16, "stored as bfloat16"
    if stored == torch.float16:
        return torch.bfloat16, "stored as float16, computed as bfloat16 on CPU"
    if cpu_has_fast_bf16():
        return torch.bfloat16, "quantized weights; this CPU has native bfloat16"
    return torch.float32, "quantized weights; this CPU has no native bfloat16"


def resolve_dtype(spec: str | torch.dtype, device: torch.device,
                  stored: torch.dtype | None = None) -> torch.dtype:
    """'auto' -> default_dtype(device, stored); else one of float32, bfloat16, float16."""
    if isinstance(spec, torch.dtype):
        if spec not in _DTYPES.values():
            raise InvalidArgumentError(f"dtype {spec} is not supported")
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return default_dtype(device, stored)
    if spec not in _DTYPES:
        raise InvalidArgumentError(f"unknown dtype {spec!r} (use auto, float32, bfloat16 or float16)")
    return _DTYPES[spec]


def attention_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the KV cache for a model computing in `dtype`.

    On CPU attention computes in float32: PyTorch's CPU attention is several times slower in
    16-bit than in float32 (measured: 113 vs 18 us for one query over 256 cached positions).
    llamarun's attention kernel (kernels.attend) reads a bfloat16 cache, widening each block of
    keys and values to float32 as it reads them: a bfloat16 model's cache is bfloat16 where it
    serves (half the bytes each decode step reads: SmolLM2's heads, one row, 0.25 -> 0.22 ms a
    layer at 3,000 positions and 0.51 -> 0.40 at 6,000, both caches in one process; half the
    memory), float32 elsewhere. Other devices: the model's dtype.
    """
    if device.type != "cpu":
        return dtype
    from llamarun import kernels  # (not at import: the kernels' module imports torch's library)

    bf16 = dtype == torch.bfloat16 and kernels.attend_available()
    return torch.bfloat16 if bf16 else torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (for timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CPUINFO = Path("/proc/cpuinfo")  # Linux: the CPU's model name


def device_name(device: torch.device) -> str:
    """A human-readable name of the device: the GPU's name, or the CPU's model name where Linux
    gives it ("AMD EPYC 9R14 Processor"), else what Python knows ("x86_64", "arm")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in _CPUINFO.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def peak_device_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset; None on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_peak_device_memory(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def is_async(device: torch.device) -> bool:
    """Whether kernels run asynchronously to the host (CUDA), so a loop can queue work ahead."""
    return device.type == "cuda"


# From this many rows on, a product is a GEMM (prefill) rather than a GEMV (decode): quantized
# weights are then dequantized once for a dense GEMM, which beats the weight-only kernels there.
DENSE_ROWS = 16


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                   "_linear_pointwise")


def _onednn_linear_available() -> bool:
    return _ONEDNN_LINEAR  # (a constant: torch.compile traces through this function)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with the fastest dense kernel of the device that treats rows independently.

    On CPU, float32 goes through oneDNN rather than the BLAS `F.linear` calls: measured 2.2-2.8x
    faster for prefill-sized products on an AMD EPYC (MKL picks slow paths on AMD processors), and
    the same numbers to float32 rounding. oneDNN also gives each row the same result whatever the
    other rows and their count, from two rows on (MKL does not: measured), so a single row is
    computed as two: the logits of a sequence then do not depend on what else is in the decode
    batch. llamarun.kernels' products come first where they serve this CPU: float32 of every
    size on AVX2 CPUs (faster than oneDNN up to a few hundred rows), bfloat16 of decode size
    with AVX512-BF16. Everything else is `F.linear`.
    """
    y = kernels.dense_linear(x, weight)  # the one selection point of the products' kernels
    if y is not None:
        return y
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and _onednn_linear_available()):
        rows = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():  # inductor cannot lower the oneDNN op itself
            y = torch.ops.llamarun.onednn_linear(rows, weight)
        else:
            y = _onednn_linear(rows, weight)
        return y.view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight)


def _onednn_linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n = rows.shape[0]
    if n == 1:  # computed as two rows: the same numbers as in a batch
        rows = torch.cat([rows, rows])
    return torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")[:n]


_LIB = torch.library.Library("llamarun", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("onednn_linear", lambda x, weight: _onednn_linear(x.contiguous(), weight), "CPU")


@torch.library.register_fake("llamarun::onednn_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def release_cpu_worker_threads() -> bool:
    """Let the calling thread's OpenMP worker threads go, before another thread takes over the
    computing (the scheduler's loop thread); True when they went.

    GNU OpenMP (PyTorch's CPU runtime on Linux) keeps a pool of worker threads for every thread
    that ever ran a parallel region, and while the pools together hold more threads than there
    are cores, its workers stop spinning between regions: each parallel op of another thread
    then pays for waking them. Measured on 2 cores: a compiled decode step of the default model
    took 20 ms from a second thread against 10 ms from the thread that loaded the model, and 10
    ms again once that thread's pool was released. A pool comes back by itself if the thread
    runs a parallel op again (only slower, never wrong). Does nothing elsewhere (another
    OpenMP runtime, none, or a call from inside a parallel region).
    """
    import ctypes
    import os

    if not torch.backends.openmp.is_available():
        return False
    try:  # the libgomp torch loaded (RTLD_NOLOAD: never load another one)
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        pause = gomp.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(1) == 0  # omp_pause_soft


def uses_cuda_graphs(device: torch.device) -> bool:
    """Whether the compiled decode step is replayed from CUDA graphs (llamarun.graphs records
    them; it does on CUDA)."""
    return device.type == "cuda"


def compile_options(device: torch.device) -> dict[str, object]:
    """Inductor options for the compiled steps: on CPU a C++ wrapper around the generated
    kernels (about 1.5 ms a token less Python for a 30-layer model), and bfloat16 values
    rounded where eager PyTorch rounds them (`emulate_precision_casts`: inductor's fused code
    otherwise keeps some in float32, a residual sum for one, so a prompt chunk prefilled inside
    a compiled bfloat16 pass got other logits than alone, prefilled eagerly: tested); none on
    CUDA (llamarun records its own CUDA graphs, inductor's would re-record at every new
    length).

    Without `size_asserts`: the wrapper otherwise checks the sizes and strides of every weight
    and every op's result at each step (about 10 checks a layer); the weights never change
    after loading and the ops' results are made by the ops the graph was traced with. Measured
    on the default model (Q4_0, Intel Xeon, 2 threads, two engines alternating in one process,
    medians of 8): compiled decode 263.8 -> 283.4 tok/s."""
    if device.type == "cpu":
        return {"cpp_wrapper": True, "emulate_precision_casts": True, "size_asserts": False}
    return {}


def runtime_version(device: torch.device) -> str | None:
    """The CUDA runtime version torch was built with, for a CUDA device; None otherwise."""
    return torch.version.cuda if device.type == "cuda" else None


def quant_kernels(device: torch.device) -> tuple[bool, bool]:
    """Whether PyTorch's CPU weight-only int8 and int4 kernels serve this device (CPU builds
    have both)."""
    cpu = device.type == "cpu"
    return cpu, cpu


def cuda_triton_kernels(device: torch.device) -> bool:
    """Whether llamarun's Triton kernels for int8 weights and for 4-bit ones in the plain layout
    (`quant.cuda_kernels`, 1 to 16 rows) serve this device: CUDA with Triton installed (PyTorch's
    CUDA wheels bring it), compute capability 7.0 and up."""
    from llamarun.quant import cuda_kernels

    return (device.type == "cuda" and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(device) >= cuda_kernels.MIN_CAPABILITY)


def cuda_int4_kernel(device: torch.device) -> bool:
    """Whether PyTorch's CUDA 4-bit kernel (`_weight_int4pack_mm`, tensor cores of compute
    capability 8.0 and up) serves this device."""
    return (device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and torch.cuda.get_device_capability(device) >= (8, 0))


_NO_CACHE_PREFIX = "llamarun-inductor-"  # the private folder compiled code goes to without a cache


def configure_compile_cache() -> Path | None:
    """Point torch.compile's (inductor's) cache at ~/.cache/llamarun/inductor (or
    $XDG_CACHE_HOME/llamarun/inductor); returns the folder in use, None without a cache.

    Inductor reads TORCHINDUCTOR_CACHE_DIR each time it needs its folder, but importing
    torch._dynamo already sets it to a shared, predictable /tmp/torchinductor_USER, so a
    setdefault after that does nothing: the variable is overwritten unless it holds a folder
    the user chose before llamarun started (anything but torch's own default). Without a
    usable home folder, compiled code goes to a private temporary folder that is removed at
    exit and the FX graph and autotune caches are off: compiling still works, nothing is
    reused, and one log line says so. Call it before compiling (it imports inductor's
    code cache, to move its precompiled headers along).
    """
    import logging
    import os
    import sys

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or ""
    if Path(current).name.startswith(_NO_CACHE_PREFIX):
        return None  # a second call, after one that found no usable folder
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return Path(current)  # the user's own choice (or this function's, on a second call)
    try:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: absolute only
        folder = base / "llamarun" / "inductor"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable")
        use: Path | None = folder
    except (OSError, RuntimeError) as e:  # RuntimeError: Path.home() with no home at all
        import atexit
        import shutil
        import tempfile

        use = None
        folder = Path(tempfile.mkdtemp(prefix=_NO_CACHE_PREFIX))  # mode 0700
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False
        inductor_config.autotune_local_cache = False
        logging.getLogger(__name__).warning(
            "no usable cache folder (%s): compiling without a compile cache", e)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    utils = sys.modules.get("torch._inductor.utils")
    if utils is not None:  # folders inductor already looked up are looked up again
        utils.clear_caches()
    # Precompiled C++ headers go to torch's default folder whatever the variable says (a
    # module constant, torch 2.13): moved along.
    import torch._inductor.codecache as codecache

    if hasattr(codecache, "_HEADER_DIR") and hasattr(codecache, "_HEADER_LOCK_DIR"):
        codecache._HEADER_DIR = str(folder / "precompiled_headers")
        codecache._HEADER_LOCK_DIR = str(folder / "precompiled_headers" / "locks")
    return use
