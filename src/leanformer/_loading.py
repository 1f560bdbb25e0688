"""Reading model files with leanformer's error rule: a bad, damaged or hostile file is one line naming it.

Never a traceback from deep inside torch or transformers, and never the advice torch gives for a refused pickle
(re-running with ``weights_only=False`` would run whatever code the file carries).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import pickle
import shutil
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ._io import sha256_of, write_json_atomic


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


CACHE_ENV = "LEANFORMER_CACHE"  # where converted models are kept; default ~/.cache/leanformer


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "leanformer")


def causal_lm_folder(path: str | PathLike, cache_dir: str | PathLike | None = None) -> Path:
    """A Hugging Face folder for the causal LM at ``path``: the folder itself, or, for a GGUF file (llama.cpp's
    format), the folder converted from it: dequantized to fp32 weights in safetensors with its tokenizer, made
    on first use under ``cache_dir`` (default ``$LEANFORMER_CACHE`` or ~/.cache/leanformer), named by the file's
    sha256 and found again by its path, size and modification time, so that later loads take seconds instead of
    a dequantization. Nothing is downloaded."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise ValueError(f"--model {path}: no such file or folder")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"--model {path}: expected a Hugging Face model folder or a .gguf file")
    root = Path(cache_dir or cache_root()) / "gguf"
    known = _converted_before(root, path)
    if known is not None:
        return known
    folder = root / f"{path.stem}-{sha256_of(path)[:16]}"
    if not (folder / "config.json").is_file():
        _convert_gguf(path, folder)
    _write_stamp(folder, path)
    return folder


_STAMP = "leanformer-source.json"  # in a converted folder: the file it came from, so a reload need not hash it


def _file_stat(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _converted_before(root: Path, path: Path) -> Path | None:
    """The folder converted from this very file (same path, size and modification time), found without reading
    the file: hashing a multi-GB GGUF on every load would cost seconds."""
    here = _file_stat(path)
    for stamp in root.glob(f"{glob.escape(path.stem)}-*/{_STAMP}"):
        try:
            if json.loads(stamp.read_text()) == here and (stamp.parent / "config.json").is_file():
                return stamp.parent
        except (OSError, ValueError):
            continue
    return None


def _write_stamp(folder: Path, path: Path) -> None:
    write_json_atomic(folder / _STAMP, _file_stat(path))


def _convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize ``path`` with transformers' GGUF reader and save it as a plain folder, atomically: a model
    loaded from GGUF refuses ``save_pretrained`` (it is marked quantized), the same class built from its config
    without ``quantization_config`` takes its weights and saves as any model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except ImportError as err:
        raise ValueError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from err
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path}: not a GGUF model transformers can read ({first_line(err)})") from err
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # another process may have finished first: its folder is as good
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
