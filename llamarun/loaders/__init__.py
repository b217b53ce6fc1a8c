"""Load a checkpoint (Meta folder, HF folder or GGUF file) into a ready Transformer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llamarun.config import ModelArgs
from llamarun.device import resolve_device, resolve_dtype
from llamarun.errors import CheckpointError
from llamarun.loaders.fuse import Progress, RawCheckpoint, build_state_dict, resolve_tied
from llamarun.loaders.hf import is_hf_folder, read_hf
from llamarun.loaders.meta import is_meta_folder, read_meta
from llamarun.model import Transformer

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 4096  # cache length when the caller gives none (models allow up to 128K)


@dataclass
class Checkpoint:
    """A loaded model with what was learned while loading it."""

    model: Transformer
    args: ModelArgs
    layout: str  # "meta" | "hf" | "gguf"
    path: Path
    device: torch.device
    dtype: torch.dtype
    raw: RawCheckpoint


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def detect_layout(path: Path) -> tuple[str, Path]:
    """('meta' | 'hf' | 'gguf', the path to read) from the contents of `path`."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if _is_gguf_file(path):
            return "gguf", path
        raise CheckpointError(f"{path}: not a GGUF file; give a folder for Meta or HF checkpoints")
    if is_hf_folder(path):
        return "hf", path
    if is_meta_folder(path):
        return "meta", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files; name one of them")
    raise CheckpointError(f"{path}: no checkpoint found (looked for params.json + consolidated.*.pth, "
                          "config.json + *.safetensors / pytorch_model*.bin, or a .gguf file)")


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Open a checkpoint lazily, whatever its layout."""
    layout, target = detect_layout(Path(path))
    if layout == "meta":
        raw = read_meta(target)
    elif layout == "hf":
        raw = read_hf(target)
    else:
        from llamarun.loaders.gguf import read_gguf

        raw = read_gguf(target)
    return resolve_tied(raw)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "auto", max_seq_len: int | None = None,
                    max_batch_size: int = 1, progress: Progress | None = None) -> Checkpoint:
    """Load a checkpoint into a Transformer on `device` in `dtype`, with its KV cache set up.

    max_seq_len is the KV cache length: by default the model's context, capped at 4096.
    progress(done, total) is called as layers are converted (for a progress bar).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    raw = read_checkpoint(path)
    sd = build_state_dict(raw, dtype=dt, device=dev, progress=progress)
    with torch.device("meta"):
        model = Transformer(raw.args)
    model.load_state_dict(sd, strict=True, assign=True)
    if raw.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.eval().requires_grad_(False)
    seq = max_seq_len or min(raw.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    model.setup_caches(max_batch_size, seq)
    log.debug("loaded %s checkpoint %s (%s, %s)", raw.layout, raw.path, dev, dt)
    return Checkpoint(model=model, args=raw.args, layout=raw.layout, path=raw.path, device=dev,
                      dtype=dt, raw=raw)
