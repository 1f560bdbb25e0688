"""Datasets the trainer and CLI read, behind one entry point: `load_data(spec)`.

The spec names the source, so the CLI's `--data` needs no per-source flags: "digits" (the embedded
default, no download), an MNIST idx folder or images file, or a class-per-subfolder image folder.
Bad input is rejected here with a `ValueError` naming the file and what was expected, which the CLI
prints as one line. Language-modelling text files have their own entry point, `load_text` (see `text`),
and so do text-classification task files, `load_task` (see `tasks`).
"""

from __future__ import annotations

from pathlib import Path

from . import digits, folder, mnist
from .digits import load_digits_split
from .split import DataSplit, check_fraction
from .tasks import FORMATS as TASK_FORMATS
from .tasks import TaskData, encode_labels, label_vocab, load_task, split_task
from .text import TextSplit, decode_tokens, encode_text, lm_batches, lm_eval_batches, load_text, load_tokenizer

DIGITS_IMG_SIZE = 32


def load_data(spec: str, img_size: int | None = None, val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Train/val datasets of normalised float32 (C, S, S) images and int64 labels, fixed by `seed`.

    spec:
      - "digits": scikit-learn's digits (1 channel, 10 classes); img_size defaults to 32.
      - a folder of MNIST idx files (`<prefix>-images-idx3-ubyte[.gz]` + `<prefix>-labels-idx1-ubyte[.gz]`)
        or one images file with its labels beside it: `train-*` and `t10k-*` pairs are train and val,
        a single pair is split stratified by seed; img_size defaults to the files' size (28).
      - an image folder, `root/<class>/*.png|jpg|bmp` (split stratified by seed) or with `root/train/`
        and `root/val/`; grey ("L") if every image is single-channel, else RGB; img_size defaults to 64.
    Images are normalised per channel with the train split's mean/std. `val_fraction` is used only
    when a single source is split.
    """
    check_fraction(val_fraction)
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size={img_size!r}: expected a positive integer or None (the source's default)")
    if spec == "digits":
        size = DIGITS_IMG_SIZE if img_size is None else img_size
        train, val = load_digits_split(size, val_fraction, seed)
        return DataSplit(train=train, val=val, in_chans=digits.IN_CHANS, num_classes=digits.NUM_CLASSES,
                         img_size=size, class_names=[str(c) for c in range(digits.NUM_CLASSES)],
                         source=f"scikit-learn digits, stratified split (val_fraction={val_fraction}, seed={seed})")
    path = Path(spec)
    if not spec or not path.exists():
        raise ValueError(f"data {spec!r}: expected 'digits' or an existing path (an MNIST idx folder or images "
                         "file, or an image folder); no such path")
    if mnist.is_idx(path):
        return mnist.load_mnist(path, img_size, val_fraction, seed)
    if path.is_dir():
        return folder.load_image_folder(path, img_size, val_fraction, seed)
    raise ValueError(f"{path}: not a dataset; expected an MNIST '<prefix>-images-idx3-ubyte[.gz]' file or a folder")


__all__ = ["TASK_FORMATS", "DataSplit", "TaskData", "TextSplit", "decode_tokens", "encode_labels", "encode_text",
           "label_vocab", "lm_batches", "lm_eval_batches", "load_data", "load_digits_split", "load_task", "load_text",
           "load_tokenizer", "split_task"]
