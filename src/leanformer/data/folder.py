"""Image folders in class-per-subfolder layout (`root/<class>/*.png`), optionally pre-split as
`root/train/<class>/...` + `root/val/<class>/...`.

Images are decoded lazily, one per item, so a folder larger than memory still trains. Every file is
verified (Pillow's `verify()`: headers and checksums) and decoded once at load time, so an unreadable or
truncated image is reported up front, naming the file, instead of crashing an epoch midway.
Images are delivered at DEFAULT_IMG_SIZE unless img_size is given: folders mix sizes, so there is
no native size to keep. Normalisation statistics come from a seeded sample of at most STATS_SAMPLE
train images, which estimates the mean/std well without decoding the whole folder at load time.

Every image is read to [0, 1] by its true range, whatever Pillow mode it opens in:

- 8-bit modes (1, L, P, RGB, CMYK) are divided by 255: bilevel "1" is 0 or 1, a palette image takes its
  palette's colours, CMYK goes through Pillow's CMYK -> RGB conversion;
- transparency (LA, RGBA, a palette or colour key with transparent entries) is composited onto black, so the
  colour stored under a transparent pixel, which nothing shows, never reaches the model;
- "I;16" (16-bit greyscale PNG/TIFF, any byte order) is divided by 65535, not clipped to 255 (white);
- "I" (32-bit integers) is read as 16-bit: its values must lie in 0..65535, else the file is refused;
- "F" (32-bit float) is taken as already in [0, 1]: a value outside it (or not finite) refuses the file.

Any other mode (LAB, YCbCr, ...) is refused at load time with the file's name and mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .split import DataSplit, Normalise, channel_stats, stratified_split, warn_if_few_classes

DEFAULT_IMG_SIZE = 64
STATS_SAMPLE = 1000
_BAR_FROM = 2000  # images: checking fewer takes a second or two, no bar needed
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # one range, four byte orders
_WIDE_MODES = frozenset(_SIXTEEN_BIT_MODES + ("I", "F"))  # single-channel, more than 8 bits: read as floats
_SUPPORTED_MODES = _EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES + ("I", "F")
_GREY_MODES = frozenset({"1", "L", "LA"}) | _WIDE_MODES


class ImageFiles(Dataset):
    """Image files with int64 labels, decoded to `mode`, resized and normalised in __getitem__."""

    def __init__(self, files: list[Path], labels: torch.Tensor, mode: str, normalise: Normalise) -> None:
        self.files, self.labels, self.mode, self.normalise = files, labels, mode, normalise

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalise(_decode(self.files[index], self.mode, self.normalise.size)), self.labels[index]


def load_image_folder(root: Path, img_size: int | None, val_fraction: float, seed: int) -> DataSplit:
    """Train/val from an image folder (see `leanformer.data.load_data`); classes are sorted subfolder names."""
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() != val_dir.is_dir():
        present, missing = (train_dir, val_dir) if train_dir.is_dir() else (val_dir, train_dir)
        raise ValueError(f"{root}: has {present.name}/ but no {missing.name}/; expected both (a train/val layout) "
                         "or neither (class subfolders, split by val_fraction)")
    if train_dir.is_dir():
        class_names = _class_dirs(train_dir)
        train_files, train_labels = _scan(train_dir, class_names)
        val_files, val_labels = _scan(val_dir, class_names)
        source = f"image folder {train_dir} (train) and {val_dir} (val)"
    else:
        class_names = _class_dirs(root)
        files, labels = _scan(root, class_names)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        train_files, train_labels = [files[i] for i in train_idx], labels[train_idx]
        val_files, val_labels = [files[i] for i in val_idx], labels[val_idx]
        source = f"image folder {root}, stratified split (val_fraction={val_fraction}, seed={seed})"
    mode = _check_images(train_files + val_files)
    warn_if_few_classes(len(class_names), class_names, str(train_dir if train_dir.is_dir() else root))
    size = DEFAULT_IMG_SIZE if img_size is None else img_size
    sample = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE]
    normalise = Normalise(*channel_stats(_decode(train_files[i], mode, size)[None] for i in sample.sort().values),
                          size=size)
    return DataSplit(train=ImageFiles(train_files, train_labels, mode, normalise),
                     val=ImageFiles(val_files, val_labels, mode, normalise), in_chans=1 if mode == "L" else 3,
                     num_classes=len(class_names), img_size=size, class_names=class_names,
                     source=f"{source}, {len(train_files) + len(val_files)} {mode} images")


def _class_dirs(root: Path) -> list[str]:
    """Sorted names of the visible subfolders of `root`, one per class."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class subfolders; expected one subfolder of PNG/JPEG/BMP images per class")
    return names


def _scan(root: Path, class_names: list[str]) -> tuple[list[Path], torch.Tensor]:
    """Image files under each root/<class>/ (recursively, sorted), labelled by the class's index in class_names."""
    names = _class_dirs(root)
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise ValueError(f"{root}: classes {unknown} are not among the train classes {class_names}")
    files, labels = [], []
    for name in names:
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"{root / name}: class folder holds no images; expected PNG/JPEG/BMP files "
                             f"({', '.join(sorted(EXTENSIONS))})")
        files += found
        labels += [class_names.index(name)] * len(found)
    return files, torch.tensor(labels, dtype=torch.long)


def _check_images(files: list[Path]) -> str:
    """Verify and decode every file as an image of a supported mode; "L" if all are single-channel, else "RGB".

    Decoding is what finds a truncated JPEG (its headers verify), and "I"/"F" values need the pixels to be
    checked against their range: a refusal belongs at load time, not an epoch in.
    """
    grey = True
    for path in tqdm(files, desc="checking images", unit="img", leave=False, disable=len(files) < _BAR_FROM):
        mode = _verified_mode(path)
        if mode not in _SUPPORTED_MODES:
            raise ValueError(f"{path}: mode {mode} is not supported; expected one of {', '.join(_SUPPORTED_MODES)}")
        image = _read(path)
        if mode in ("I", "F"):
            _wide_pixels(path, image)
        grey = grey and mode in _GREY_MODES
    return "L" if grey else "RGB"


def _verified_mode(path: Path) -> str:
    """The Pillow mode of `path`, after `verify()` checked its headers and checksums."""
    try:
        with Image.open(path) as image:
            image.verify()
            return image.mode
    except Exception as err:  # Pillow raises many types for bad files; report them all the same way
        raise _unreadable(path, err) from err


def _read(path: Path) -> Image.Image:
    """The decoded image of `path`, in memory with the file closed; a file that fails to decode is named."""
    try:
        with Image.open(path) as image:
            return image.copy()  # decodes; keeps mode, palette and transparency info
    except Exception as err:  # verify() passed but decoding failed, e.g. a truncated JPEG
        raise _unreadable(path, err) from err


def _decode(path: Path, mode: str, size: int) -> torch.Tensor:
    """A float32 (C, size, size) image in [0, 1] (C = 1 for mode "L", 3 for "RGB"); see the module docstring for
    how each Pillow mode gets there. Pillow resizes (antialiased) before the tensor exists."""
    image = _read(path)
    if image.mode in _WIDE_MODES:
        unit = Image.fromarray(_wide_pixels(path, image), mode="F")
        pixels = torch.from_numpy(np.array(unit.resize((size, size), Image.Resampling.BILINEAR)))[None]
        return pixels.expand(3, -1, -1).clone() if mode == "RGB" else pixels
    resized = _on_black(image).convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return pixels.float().div_(255.0)


def _on_black(image: Image.Image) -> Image.Image:
    """`image` composited onto black if it has transparency, else itself: what a transparent pixel stores is
    arbitrary (often white or a stale colour), black is what it shows over nothing."""
    if not image.has_transparency_data:
        return image
    rgba = image.convert("RGBA")
    return Image.composite(rgba.convert("RGB"), Image.new("RGB", image.size), rgba.getchannel("A"))


def _wide_pixels(path: Path, image: Image.Image) -> np.ndarray:
    """The float32 (H, W) pixels in [0, 1] of an I;16*, I or F image; ValueError naming the file if an I or F
    image holds values outside the range its mode is read with (0..65535, 0..1)."""
    pixels = np.asarray(image)
    if image.mode == "F":
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(pixels).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(f"{path}: mode F holds values in [{low:g}, {high:g}]; expected 0..1 (float images are "
                             "read as already scaled to [0, 1])")
        return pixels.astype(np.float32)
    if image.mode == "I":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{path}: mode I holds values in [{low}, {high}]; expected 0..65535 (32-bit integer "
                             "images are read as 16-bit)")
    return (pixels.astype(np.float32) / 65535.0).astype(np.float32)


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path}: unreadable or corrupt image ({type(err).__name__}: {err})")
