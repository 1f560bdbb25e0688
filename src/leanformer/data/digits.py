"""The embedded default dataset: scikit-learn's digits (1,797 real 8x8 grey images, 10 classes).

It ships inside scikit-learn, so `make run` needs no download. Images are scaled to [0, 1],
normalised with the training split's mean/std and resized to the model's input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

NUM_CLASSES = 10
IN_CHANS = 1


def load_digits_split(img_size: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) datasets of (1, img_size, img_size) float images and int64 labels.

    The split is stratified and fixed by `seed`, so runs with the same seed see the same data.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a number strictly between 0 and 1")
    if img_size < 8:
        raise ValueError(f"img_size={img_size}: digits are 8x8, expected img_size >= 8")
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for cls in range(NUM_CLASSES):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    train_idx, val_idx = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = F.interpolate((images - mean) / std, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx])
