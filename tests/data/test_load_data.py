"""`load_data`: dispatch on the spec, argument checks, the embedded digits and the real MNIST test set."""

import dataclasses
from pathlib import Path

import pytest
import torch

from leanformer.data import DataSplit, load_data, load_digits_split

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
MNIST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_digits_is_the_embedded_default():
    data = load_data("digits", seed=1)
    assert isinstance(data, DataSplit)
    assert (data.in_chans, data.num_classes, data.img_size) == (1, 10, 32)
    assert data.class_names == [str(c) for c in range(10)]
    train, _ = load_digits_split(32, seed=1)
    assert torch.equal(data.train.tensors[0], train.tensors[0])
    assert load_data("digits", img_size=16).train[0][0].shape == (1, 16, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.img_size = 8


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"shared MNIST test set not found at {MNIST}")
def test_real_mnist_test_set_is_split_stratified():
    data = load_data(str(MNIST), seed=0)
    assert (len(data.train), len(data.val)) == (8000, 2000)
    assert (data.in_chans, data.num_classes, data.img_size) == (1, 10, 28)
    assert data.train[0][0].shape == (1, 28, 28)
    val_counts = torch.bincount(data.val.labels, minlength=10)
    assert (torch.bincount(data.train.labels, minlength=10) + val_counts).tolist() == MNIST_COUNTS
    assert ((val_counts - torch.tensor(MNIST_COUNTS) * 0.2).abs() <= 0.5).all()
    again = load_data(str(MNIST / "t10k-images-idx3-ubyte.gz"), seed=0)
    assert torch.equal(again.val.labels, data.val.labels) and torch.equal(again.val[5][0], data.val[5][0])


@pytest.mark.parametrize(("spec", "kwargs", "expected"), [
    ("no/such/dir", {}, r"data 'no/such/dir': expected 'digits' or an existing path"),
    ("", {}, r"data '': expected 'digits' or an existing path"),
    ("digits", {"img_size": 0}, r"img_size=0: expected a positive integer"),
    ("digits", {"img_size": 2.5}, r"img_size=2.5: expected a positive integer"),
    ("digits", {"img_size": 4}, r"img_size=4: digits are 8x8"),
    ("digits", {"val_fraction": 1.0}, r"val_fraction=1.0: expected a number strictly between 0 and 1"),
])
def test_bad_spec_or_argument(spec, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        load_data(spec, **kwargs)


def test_path_that_is_neither_idx_nor_folder(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(ValueError, match=f"{path}: not a dataset; expected an MNIST"):
        load_data(str(path))


def test_empty_folder_has_no_classes(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no class subfolders"):
        load_data(str(tmp_path))
