"""Damaged and hostile data files are refused at load time, naming the file, without allocating what a header
claims; data that would train a meaningless classifier is warned about."""

from __future__ import annotations

import gzip
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from leanformer.data import load_data


def _jpeg(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")


def _folder(root, classes=("a", "b"), per_class=3):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            _jpeg(root / c / f"{i}.jpg", hash((c, i)) % 1000)
    return root


def test_a_truncated_jpeg_is_named_at_load_time(tmp_path):
    root = tmp_path / "images"
    _folder(root / "train")
    _folder(root / "val")
    bad = root / "val" / "b" / "1.jpg"  # a validation image: not among those decoded for the statistics
    bad.write_bytes(bad.read_bytes()[:-100])  # headers intact: verify() passes
    with pytest.raises(ValueError, match=rf"{bad}: unreadable or corrupt image"):
        load_data(str(root))


@pytest.mark.parametrize("compressed", [False, True])
def test_an_idx_header_announcing_terabytes_is_refused_without_reading_them(tmp_path, compressed):
    header = struct.pack(">4I", 2051, 60000, 60000, 60000)
    images = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compressed else ""))
    payload = header + bytes(1000)
    images.write_bytes(gzip.compress(payload) if compressed else payload)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 2049, 60000) + bytes(60000))
    with pytest.raises(ValueError, match="size does not match header: shape \\(60000, 60000, 60000\\)"):
        load_data(str(images))


def _idx(tmp_path, labels: list[int]):
    n = len(labels)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">4I", 2051, n, 4, 4) + bytes(16 * n))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 2049, n) + bytes(labels))
    return tmp_path / "train-images-idx3-ubyte"


def test_sparse_idx_labels_warn_that_most_classes_never_occur(tmp_path):
    with pytest.warns(UserWarning, match=r"labels \{0, 255\} are 2 distinct values, but the model gets 256"):
        data = load_data(str(_idx(tmp_path, [0, 255] * 10)), val_fraction=0.2)
    assert data.num_classes == 256


def test_a_one_class_folder_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"only one class \('a'\)"):
        load_data(str(_folder(tmp_path / "images", classes=("a",))), val_fraction=0.34)


def test_ordinary_data_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data(str(_idx(tmp_path, list(range(10)) * 3)), val_fraction=0.34)
        load_data(str(_folder(tmp_path / "images")), val_fraction=0.34)


