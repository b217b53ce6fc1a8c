"""Reading torch.save'd state dicts (Meta shards, pytorch_model*.bin) safely and lazily."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from llamarun.errors import CheckpointError, clean_message
from llamarun.loaders.files import check_regular

def clean(text: str) -> str:
    """`text` without terminal escape sequences or control characters (tabs and newlines kept)."""
    return clean_message(text)


def first_line(e: Exception) -> str:
    """'Type: first line of the message', for one-line errors from library exceptions
    (escape sequences and control characters removed)."""
    text = clean(str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _unpickler_reason(e: Exception) -> str:
    """What torch's weights-only unpickler objected to, without its advice to turn the safety
    off: the text after 'WeightsUnpickler error:' (up to 'Please use ...'), or the first line."""
    text = clean(str(e))
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    if not marker or not lines:
        return first_line(e)
    return re.split(r"\.? Please use", lines[0])[0].rstrip(".")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors read with weights_only=True (never arbitrary objects).

    Files in torch's zip format are memory-mapped; legacy (non-zip) files cannot be, and are
    read whole, still with weights_only=True.
    """
    check_regular(path)
    sd = _load(path, mmap=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd


def _load(path: Path, *, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if reason.startswith(("Unsupported global", "Unsupported class")):
            raise CheckpointError(f"{path}: refused: the file holds Python objects, not only "
                                  f"tensors ({reason}); llamarun reads checkpoints as data "
                                  "only") from None
        raise CheckpointError(f"{path}: cannot read weights ({reason})") from None
    except RuntimeError as e:
        if mmap and "mmap can only be used with files saved with" in str(e):
            return _load(path, mmap=False)  # a legacy torch.save file
        raise CheckpointError(f"{path}: cannot read weights ({first_line(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read weights (nested too deeply)") from None
    except MemoryError:
        raise CheckpointError(f"{path}: cannot read weights (out of memory)") from None
    except Exception as e:  # torch raises many types for corrupt or non-weight pickles
        raise CheckpointError(f"{path}: cannot read weights ({first_line(e)})") from None
