"""MNIST-style IDX files (`<prefix>-images-idx3-ubyte[.gz]` + `<prefix>-labels-idx1-ubyte[.gz]`).

The format is read directly (a big-endian header, then raw uint8), so no torchvision is needed.
Every header is checked against the file before any pixel is trusted, and the body is read only
up to the size the header announces, so a truncated or oversized file is reported, not guessed at.
Images stay uint8 in memory and are normalised per item: a 60,000-image train set at 224 pixels
would not fit in memory as floats.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .split import DataSplit, Normalise, channel_stats, stratified_split, warn_if_few_classes

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IMAGES_NAME = re.compile(r"^(?P<prefix>.+)-images-idx3-ubyte(\.gz)?$")


class IdxImages(Dataset):
    """uint8 images (N, 1, H, W) and int64 labels, normalised one item at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalise: Normalise) -> None:
        self.images, self.labels, self.normalise = images, labels, normalise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalise(self.images[index].float().div_(255.0)), self.labels[index]


def is_idx(path: Path) -> bool:
    """True for an images idx file, or a folder holding at least one."""
    if path.is_dir():
        return any(_IMAGES_NAME.match(p.name) for p in path.iterdir() if p.is_file())
    return bool(_IMAGES_NAME.match(path.name))


def load_mnist(path: Path, img_size: int | None, val_fraction: float, seed: int) -> DataSplit:
    """Train/val from an idx folder or images file (see `leanformer.data.load_data`).

    With both `train-*` and `t10k-*` pairs in the folder they are train and val; with a single
    pair it is split stratified by `seed`. img_size defaults to the files' own size (28 for MNIST).
    """
    pairs = _find_pairs(path)
    if set(pairs) == {"train", "t10k"}:
        train_images, train_labels = _read_pair(*pairs["train"])
        val_images, val_labels = _read_pair(*pairs["t10k"])
        num_classes = int(train_labels.max()) + 1
        warn_if_few_classes(num_classes, train_labels.unique().tolist(), str(pairs["train"][1]))
        if int(val_labels.max()) >= num_classes:
            raise ValueError(f"{pairs['t10k'][1]}: label {int(val_labels.max())} is out of range; expected "
                             f"0..{num_classes - 1}, the classes of {pairs['train'][1]}")
        source = f"idx files {pairs['train'][0]} (train) and {pairs['t10k'][0]} (val)"
    elif len(pairs) == 1:
        (images_path, labels_path), = pairs.values()
        images, labels = _read_pair(images_path, labels_path)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        train_images, train_labels = images[train_idx], labels[train_idx]
        val_images, val_labels = images[val_idx], labels[val_idx]
        num_classes = int(labels.max()) + 1
        warn_if_few_classes(num_classes, labels.unique().tolist(), str(labels_path))
        source = f"idx file {images_path}, stratified split (val_fraction={val_fraction}, seed={seed})"
    else:
        raise ValueError(f"{path}: found idx pairs {sorted(pairs)}; expected a single pair, or exactly 'train' and "
                         "'t10k' pairs")
    size = img_size if img_size is not None else max(train_images.shape[-2:])
    chunks = (train_images[i:i + 4096].float().div_(255.0) for i in range(0, len(train_images), 4096))
    normalise = Normalise(*channel_stats(chunks), size=size)
    return DataSplit(train=IdxImages(train_images, train_labels, normalise),
                     val=IdxImages(val_images, val_labels, normalise), in_chans=1, num_classes=num_classes,
                     img_size=size, class_names=[str(c) for c in range(num_classes)], source=source)


def _find_pairs(path: Path) -> dict[str, tuple[Path, Path]]:
    """prefix -> (images file, labels file) for an images file or every images file in a folder.

    When a folder holds both `X` and `X.gz` (as torchvision leaves them), the uncompressed one is used.
    """
    candidates = sorted(path.iterdir()) if path.is_dir() else [path]
    pairs: dict[str, tuple[Path, Path]] = {}
    for images in candidates:
        match = _IMAGES_NAME.match(images.name)
        if match and images.is_file() and (match["prefix"] not in pairs or images.suffix != ".gz"):
            pairs[match["prefix"]] = (images, _labels_beside(images, match["prefix"]))
    return pairs


def _labels_beside(images: Path, prefix: str) -> Path:
    stem = images.parent / f"{prefix}-labels-idx1-ubyte"
    for labels in (stem, stem.with_name(stem.name + ".gz")):
        if labels.is_file():
            return labels
    raise ValueError(f"{images}: no labels file beside it; expected {stem} or {stem.name}.gz")


def _read_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, H, W) and int64 labels (N,), checked to have the same count."""
    images = _read_idx(images_path, IMAGES_MAGIC, ndim=3)
    labels = _read_idx(labels_path, LABELS_MAGIC, ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                         "expected the same count")
    return images.unsqueeze(1), labels.long()


def _read_idx(path: Path, magic: int, ndim: int) -> torch.Tensor:
    """The uint8 array of an idx file whose header must carry `magic` and match the file's size."""
    opener = gzip.open if path.suffix == ".gz" else open
    header_size = 4 + 4 * ndim
    try:
        with opener(path, "rb") as f:
            header = f.read(header_size)
            if len(header) < header_size:
                raise ValueError(f"{path}: truncated idx file: {len(header)} bytes, shorter than its "
                                 f"{header_size}-byte header")
            found, *dims = struct.unpack(f">{1 + ndim}I", header)
            if found != magic:
                raise ValueError(f"{path}: bad magic number {found}; expected {magic} (idx{ndim} unsigned bytes)")
            expected = math.prod(dims)
            if opener is open and path.stat().st_size != header_size + expected:  # before reading any of it
                raise _size_mismatch(path, dims, header_size, path.stat().st_size - header_size)
            body = _read_at_most(f, expected + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read the file ({err})") from err
    if len(body) != expected:
        raise _size_mismatch(path, dims, header_size, len(body), more=len(body) > expected)
    if expected == 0:
        raise ValueError(f"{path}: idx file holds no items (shape {tuple(dims)})")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _read_at_most(f, limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of ``f``, read in chunks: a header may announce terabytes (a hostile or damaged
    file), and only what the file really holds is ever allocated."""
    parts, total = [], 0
    while total < limit:
        part = f.read(min(chunk, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def _size_mismatch(path: Path, dims: list[int], header_size: int, body_bytes: int, more: bool = False) -> ValueError:
    found = f"{header_size + body_bytes}{' or more' if more else ''}"
    return ValueError(f"{path}: size does not match header: shape {tuple(dims)} needs "
                      f"{header_size + math.prod(dims)} bytes (uncompressed), found {found}")
