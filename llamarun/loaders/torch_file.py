"""Reading torch.save'd state dicts (Meta shards, pytorch_model*.bin) safely and lazily."""

from __future__ import annotations

from pathlib import Path

import torch

from llamarun.errors import CheckpointError


def first_line(e: Exception) -> str:
    """'Type: first line of the message', for one-line errors from library exceptions."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors, mmapped and read with weights_only=True (never arbitrary objects)."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or non-weight pickles
        raise CheckpointError(f"{path}: cannot read weights ({first_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd
