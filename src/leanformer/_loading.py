"""Reading model files with leanformer's error rule: a bad, damaged or hostile file is one line naming it.

Never a traceback from deep inside torch or transformers, and never the advice torch gives for a refused pickle
(re-running with ``weights_only=False`` would run whatever code the file carries).
"""

from __future__ import annotations

import pickle
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_refused_pickle(err: BaseException) -> bool:
    """Whether ``err`` is torch's ``weights_only`` refusal of a pickle carrying more than tensors (a file that is
    no pickle at all fails with an UnpicklingError too, and is merely unreadable)."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def refused_pickle(what: str) -> ValueError:
    """The error for a pickled file that holds more than tensors: refused, with what to do instead."""
    return ValueError(f"{what} could not be read: refused, it is a pickle holding objects other than tensors, "
                      "which could run code when loaded; leanformer never unpickles them (save the weights as "
                      ".safetensors from a source you trust)")


def hf_from_pretrained(cls: Any, folder: str | PathLike, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` from local files only, its failures as one ValueError naming the folder."""
    folder = Path(folder)
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise (refused_pickle(str(folder)) if is_refused_pickle(err) else
               ValueError(f"{folder}: a weights file is not a readable pickle ({first_line(err)})")) from err
    except SafetensorError as err:
        raise ValueError(f"{folder}: a safetensors file is damaged or truncated ({first_line(err)})") from err
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{folder}: could not load the model: {first_line(err)}") from err


def read_safetensors(path: str | PathLike, what: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming it (``what`` says which file it is meant to
    be, e.g. "predictors file ") if it is missing or unreadable. Nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            return {key: f.get_tensor(key) for key in f.keys()}, metadata  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{what}{path} is not a readable safetensors file: {err}") from err
