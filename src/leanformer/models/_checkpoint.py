"""Reading checkpoint files safely and loading them with clear errors.

Safetensors are read directly; `.pth`-style files only with `torch.load(weights_only=True)`, so
an untrusted file can never run code. A model family module defines `checkpoint_filter_fn(state_dict,
model)` (timm's convention) to translate other key layouts into its own.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from .._loading import first_line, is_refused_pickle, refused_pickle

# safetensors metadata key under which `leanformer.save_pretrained` records changed FFN activations: such a file is
# not a plain checkpoint (loaded as one, the model would silently compute something else)
TRANSFORMS_METADATA_KEY = "leanformer.activations"

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}


def read_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from `{'model': ...}`/`{'state_dict': ...}`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            _refuse_transformed(path)
            state = load_file(str(path), device="cpu")
        elif path.suffix in _TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(
                f"checkpoint {str(path)!r}: unknown file type {path.suffix!r}; expected .safetensors "
                f"or one of {sorted(_TORCH_SUFFIXES)}"
            )
    except ValueError:
        raise
    except Exception as err:  # refused code objects (said in one line), corrupt file, truncated archive, ...
        if is_refused_pickle(err):
            raise refused_pickle(f"checkpoint {str(path)!r}") from err
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {first_line(err)}") from err
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a flat dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _refuse_transformed(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        transformed = TRANSFORMS_METADATA_KEY in (f.metadata() or {})
    if transformed:
        raise ValueError(f"checkpoint {str(path)!r} holds a model with changed FFN activations (ReLU, FATReLU or "
                         "Top-k); load it with leanformer.load_pretrained(folder, model), which puts them back")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise `ValueError` naming missing, unexpected and wrongly shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_checkpoint(model: nn.Module, path: str | PathLike, filter_fn: FilterFn | None = None) -> nn.Module:
    """Load a checkpoint file into `model` in place, translating its key layout with `filter_fn`."""
    state = read_state_dict(path)
    if filter_fn is not None:
        state = filter_fn(state, model)
    check_state_dict(model, state, repr(str(path)))
    model.load_state_dict(state)
    return model
