"""What every image source shares: the `DataSplit` it returns, the seeded stratified split and the
train-statistics normalisation, so digits, MNIST and image folders cannot drift apart.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataSplit:
    """A train/val pair plus what a model needs to be built for it.

    Both datasets yield `(image, label)`: a normalised float32 (in_chans, img_size, img_size)
    tensor and an int64 label in [0, num_classes).
    """

    train: Dataset
    val: Dataset
    in_chans: int
    num_classes: int
    img_size: int
    class_names: list[str]
    source: str


def warn_if_few_classes(num_classes: int, present: Iterable, source: str) -> None:
    """Warn when the model would get classes the data does not have: a single class (nothing to learn), or
    labels so sparse (e.g. {0, 255}) that most of the ``num_classes`` = max label + 1 outputs never occur."""
    present = sorted(set(present))
    if len(present) < 2:
        warnings.warn(f"{source}: only one class ({present[0]!r}): a classifier has nothing to tell apart",
                      stacklevel=3)
    elif len(present) < num_classes / 2:
        shown = ", ".join(map(str, present[:6])) + (", ..." if len(present) > 6 else "")
        warnings.warn(f"{source}: labels {{{shown}}} are {len(present)} distinct values, but the model gets "
                      f"{num_classes} classes (max label + 1); relabel them 0..{len(present) - 1}", stacklevel=3)


def check_fraction(val_fraction: float) -> None:
    """Reject a val_fraction that would leave one side of the split empty by construction."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a number strictly between 0 and 1")


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices holding about `val_fraction` of every class in val.

    Classes are visited in label order with one generator seeded by `seed`, so the split depends
    only on the labels and the seed: runs with the same seed see the same data.
    """
    check_fraction(val_fraction)
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for cls in labels.unique().tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    train, val = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    for name, part in (("train", train), ("val", val)):
        if len(part) == 0:
            raise ValueError(f"{len(labels)} examples with val_fraction={val_fraction} leave the {name} split empty; "
                             "expected more examples per class or a different val_fraction")
    return train, val


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of [0, 1] image batches (N, C, H, W).

    Sums are accumulated in float64 batch by batch, so a large split never needs a float copy of
    itself. A constant channel gets std 1 (centred, not divided by zero).
    """
    total = squares = None
    count = 0
    for batch in batches:
        batch = batch.double()
        sums, sq = batch.sum(dim=(0, 2, 3)), batch.square().sum(dim=(0, 2, 3))
        total, squares = (sums, sq) if total is None else (total + sums, squares + sq)
        count += batch.numel() // batch.shape[1]
    if total is None:
        raise ValueError("no images to compute normalisation statistics from")
    mean = total / count
    std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


@dataclass(frozen=True, eq=False)
class Normalise:
    """Bring [0, 1] images, (C, H, W) or (N, C, H, W), to the model's input: resized to
    `size` x `size` (bilinear, antialiased when shrinking) and standardised per channel with the
    train split's `mean`/`std`, so train and val see exactly the same transform.
    """

    mean: torch.Tensor
    std: torch.Tensor
    size: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batched = images.dim() == 4
        x = images if batched else images.unsqueeze(0)
        height, width = x.shape[-2:]
        if (height, width) != (self.size, self.size):
            shrink = self.size < max(height, width)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink)
        x = (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
        return x if batched else x[0]
