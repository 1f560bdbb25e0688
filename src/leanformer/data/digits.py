"""The embedded default dataset: scikit-learn's digits (1,797 real 8x8 grey images, 10 classes).

It ships inside scikit-learn, so `make run` needs no download. Images are scaled to [0, 1],
normalised with the training split's mean/std and resized to the model's input size.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .split import Normalise, channel_stats, check_fraction, stratified_split

NUM_CLASSES = 10
IN_CHANS = 1


def load_digits_split(img_size: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) datasets of (1, img_size, img_size) float images and int64 labels.

    The split is stratified and fixed by `seed`, so runs with the same seed see the same data.
    The whole set is 1,797 tiny images, so it is transformed once up front (no per-item work).
    """
    check_fraction(val_fraction)
    if img_size < 8:
        raise ValueError(f"img_size={img_size}: digits are 8x8, expected img_size >= 8")
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    images = Normalise(*channel_stats([images[train_idx]]), size=img_size)(images)
    return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx])
