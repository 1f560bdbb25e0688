"""MNIST idx files through `load_data`, on tiny idx files written here with struct (+ gzip)."""

import gzip
import re
import struct

import pytest
import torch

from leanformer.data import load_data


def write_idx(path, magic, dims, body):
    """An idx file: big-endian magic and dims, then raw bytes; gzip if the name ends in .gz."""
    data = struct.pack(f">{1 + len(dims)}I", magic, *dims) + bytes(body)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_pair(folder, prefix, labels, size=5, gz=True):
    """An images/labels pair whose images are constant, each at a brightness set by its label."""
    ext = ".gz" if gz else ""
    pixels = bytes(20 * label + i % 7 for i, label in enumerate(labels) for _ in range(size * size))
    images = write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", 2051, (len(labels), size, size), pixels)
    labels_file = write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", 2049, (len(labels),), labels)
    return images, labels_file


def all_labels(dataset):
    return torch.stack([dataset[i][1] for i in range(len(dataset))])


def test_train_and_t10k_pairs_are_train_and_val(tmp_path):
    write_pair(tmp_path, "train", [0, 1, 2] * 6)
    write_pair(tmp_path, "t10k", [2, 1, 0, 0], gz=False)
    data = load_data(str(tmp_path))
    assert (len(data.train), len(data.val)) == (18, 4)
    assert (data.in_chans, data.num_classes, data.img_size, data.class_names) == (1, 3, 5, ["0", "1", "2"])
    image, label = data.val[0]
    assert image.shape == (1, 5, 5) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert all_labels(data.val).tolist() == [2, 1, 0, 0]
    train = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std()) - 1) < 0.05  # train statistics


def test_single_pair_is_split_stratified_and_fixed_by_seed(tmp_path):
    write_pair(tmp_path, "t10k", [c for c in range(5) for _ in range(10)])
    data = load_data(str(tmp_path), val_fraction=0.2, seed=3)
    assert torch.bincount(all_labels(data.val)).tolist() == [2] * 5
    assert torch.bincount(all_labels(data.train)).tolist() == [8] * 5
    again = load_data(str(tmp_path), val_fraction=0.2, seed=3)
    assert torch.equal(again.val.images, data.val.images) and torch.equal(again.train[7][0], data.train[7][0])
    other = load_data(str(tmp_path), val_fraction=0.2, seed=4)
    assert not torch.equal(other.val.images, data.val.images)


def test_images_file_path_finds_labels_beside_it_and_resizes(tmp_path):
    images, _ = write_pair(tmp_path, "digits", [0, 1] * 5, size=6, gz=False)
    data = load_data(str(images), img_size=12)
    assert data.img_size == 12 and data.train[0][0].shape == (1, 12, 12)
    assert len(data.train) + len(data.val) == 10 and "digits-images-idx3-ubyte" in data.source


def test_uncompressed_copy_is_preferred_over_gz(tmp_path):
    write_pair(tmp_path, "train", [0, 1] * 4, gz=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")  # as torchvision leaves both beside
    assert len(load_data(str(tmp_path)).train) == 6


def _bad_magic(d):
    write_pair(d, "t10k", [0, 1] * 5)
    return write_idx(d / "t10k-images-idx3-ubyte.gz", 2049, (10, 5, 5), bytes(250))


def _bad_label_magic(d):
    write_pair(d, "t10k", [0, 1] * 5)
    return write_idx(d / "t10k-labels-idx1-ubyte.gz", 2051, (10,), bytes(10))


def _truncated_images(d):
    write_pair(d, "t10k", [0, 1] * 5)
    return write_idx(d / "t10k-images-idx3-ubyte.gz", 2051, (10, 5, 5), bytes(249))


def _truncated_header(d):
    write_pair(d, "t10k", [0, 1] * 5)
    path = d / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08"))
    return path


def _corrupt_gzip(d):
    write_pair(d, "t10k", [0, 1] * 5)
    path = d / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    return path


def _missing_labels(d):
    images, labels = write_pair(d, "t10k", [0, 1] * 5)
    labels.unlink()
    return images


@pytest.mark.parametrize(("make", "expected"), [
    (_bad_magic, r"bad magic number 2049; expected 2051"),
    (_bad_label_magic, r"bad magic number 2051; expected 2049"),
    (_truncated_images, r"size does not match header.*\(10, 5, 5\)"),
    (_truncated_header, r"truncated idx file: 3 bytes"),
    (_corrupt_gzip, r"cannot read the file"),
    (_missing_labels, r"no labels file beside it; expected .*t10k-labels-idx1-ubyte"),
])
def test_broken_file_is_named_with_what_was_expected(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        load_data(str(tmp_path))


def test_count_mismatch_names_both_files_and_counts(tmp_path):
    images, _ = write_pair(tmp_path, "t10k", [0, 1] * 5)
    labels = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, (9,), [0, 1] * 4 + [0])
    with pytest.raises(ValueError, match=f"{re.escape(str(images))} holds 10 images but {re.escape(str(labels))} "
                                         "holds 9 labels"):
        load_data(str(tmp_path))


def test_val_label_out_of_train_range(tmp_path):
    write_pair(tmp_path, "train", [0, 1] * 4)
    _, labels = write_pair(tmp_path, "t10k", [0, 5])
    with pytest.raises(ValueError, match=re.escape(str(labels)) + r": label 5 is out of range; expected 0\.\.1"):
        load_data(str(tmp_path))


def test_unpaired_prefixes_are_rejected(tmp_path):
    write_pair(tmp_path, "train", [0, 1] * 4)
    write_pair(tmp_path, "test", [0, 1] * 2)
    with pytest.raises(ValueError, match=r"found idx pairs \['test', 'train'\].*'t10k'"):
        load_data(str(tmp_path))
