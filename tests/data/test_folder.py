"""Class-per-subfolder image folders through `load_data`, on tiny PNG/BMP/JPEG files written with Pillow."""

import re

import pytest
import torch
from PIL import Image

from leanformer.data import load_data
from leanformer.data.folder import DEFAULT_IMG_SIZE


def write_image(path, mode="L", size=(6, 4), value=0):
    """A constant image (brightness `value`, one channel or RGB) saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, value // 2)).save(path)
    return path


def write_classes(root, counts, mode="L", suffix=".png"):
    """counts[name] constant images per class folder, brightness spread over classes and images."""
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_image(root / name / f"{i:03d}{suffix}", mode, size=(5 + i % 3, 4 + c), value=40 * c + 3 * i)


def all_labels(dataset):
    return torch.stack([dataset[i][1] for i in range(len(dataset))]).tolist()


def test_class_folders_are_split_stratified_and_fixed_by_seed(tmp_path):
    write_classes(tmp_path, {"cat": 5, "ant": 5, "bee": 5})
    (tmp_path / "cat" / "notes.txt").write_text("not an image, ignored")
    data = load_data(str(tmp_path), seed=1)
    assert data.class_names == ["ant", "bee", "cat"] and data.num_classes == 3
    assert (data.in_chans, data.img_size) == (1, DEFAULT_IMG_SIZE)
    image, label = data.train[0]
    assert image.shape == (1, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    assert sorted(all_labels(data.val)) == [0, 1, 2] and len(data.train) == 12
    assert load_data(str(tmp_path), seed=1).val.files == data.val.files
    assert any(load_data(str(tmp_path), seed=s).val.files != data.val.files for s in (2, 3, 4))


def test_normalised_with_train_statistics(tmp_path):
    write_classes(tmp_path, {"a": 6, "b": 6}, suffix=".bmp")
    data = load_data(str(tmp_path), img_size=8)
    train = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert train.shape == (10, 1, 8, 8)
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 0.05


def test_rgb_when_any_image_has_colour(tmp_path):
    write_classes(tmp_path, {"a": 4, "b": 4})
    write_image(tmp_path / "b" / "colour.jpg", "RGB", value=200)
    data = load_data(str(tmp_path), img_size=10)
    assert data.in_chans == 3 and "RGB" in data.source
    assert all(data.train[i][0].shape == (3, 10, 10) for i in range(len(data.train)))


def test_train_val_layout_takes_classes_from_train(tmp_path):
    write_classes(tmp_path / "train", {"a": 3, "b": 3, "c": 3})
    write_classes(tmp_path / "val", {"a": 1, "c": 2})
    data = load_data(str(tmp_path), val_fraction=0.5)
    assert data.class_names == ["a", "b", "c"] and (len(data.train), len(data.val)) == (9, 3)
    assert all_labels(data.val) == [0, 2, 2]


def _no_class_folders(root):
    write_image(root / "loose.png")
    return root, "no class subfolders; expected one subfolder of PNG/JPEG/BMP images per class"


def _empty_class(root):
    write_classes(root, {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    return root / "b", "class folder holds no images; expected PNG/JPEG/BMP"


def _corrupt_image(root):
    write_classes(root, {"a": 3, "b": 3})
    bad = root / "b" / "001.png"
    bad.write_bytes(bad.read_bytes()[:30])
    return bad, "unreadable or corrupt image"


def _not_an_image(root):
    write_classes(root, {"a": 3, "b": 3})
    bad = root / "a" / "fake.jpg"
    bad.write_text("hello")
    return bad, "unreadable or corrupt image"


def _unknown_val_class(root):
    write_classes(root / "train", {"a": 2, "b": 2})
    write_classes(root / "val", {"a": 1, "z": 1})
    return root / "val", r"classes \['z'\] are not among the train classes \['a', 'b'\]"


def _train_without_val(root):
    write_classes(root / "train", {"a": 2, "b": 2})
    return root, "has train/ but no val/"


@pytest.mark.parametrize("make", [_no_class_folders, _empty_class, _corrupt_image, _not_an_image, _unknown_val_class,
                                  _train_without_val])
def test_bad_folder_is_named_with_what_was_expected(tmp_path, make):
    path, expected = make(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + expected):
        load_data(str(tmp_path))


# --- every Pillow mode a folder can hold, read to [0, 1] ----------------------------------------------------------


def _palette(transparent):
    """A one-colour palette image (200, 100, 50); with `transparent`, that entry is fully transparent (PNG tRNS)."""
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50])
    if transparent:
        image.info["transparency"] = 1
    return image


# mode -> (image, format, channel means it must read as): PNG/BMP/JPEG hold most modes; "I" and "F" come from a
# TIFF, which Pillow opens by its content whatever the file's suffix. Alpha is composited on black.
MODES = {
    "1": (Image.new("1", (6, 4), 1), "PNG", [1.0]),
    "L": (Image.new("L", (6, 4), 51), "BMP", [0.2]),
    "LA": (Image.new("LA", (6, 4), (100, 51)), "PNG", [20 / 255]),
    "P": (_palette(False), "PNG", [200 / 255, 100 / 255, 50 / 255]),
    "P transparent": (_palette(True), "PNG", [0.0, 0.0, 0.0]),
    "RGB": (Image.new("RGB", (6, 4), (10, 20, 30)), "PNG", [10 / 255, 20 / 255, 30 / 255]),
    "RGBA": (Image.new("RGBA", (6, 4), (200, 100, 50, 51)), "PNG", [40 / 255, 20 / 255, 10 / 255]),
    "I;16": (Image.new("I;16", (6, 4), 32768), "PNG", [32768 / 65535]),
    "I;16B": (Image.new("I;16B", (6, 4), 16384), "TIFF", [16384 / 65535]),
    "I": (Image.new("I", (6, 4), 49152), "TIFF", [49152 / 65535]),
    "F": (Image.new("F", (6, 4), 0.25), "TIFF", [0.25]),
    "CMYK": (Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG", [1.0, 0.0, 0.0]),
}


def write_folder_of(root, image, fmt):
    """Two classes of two copies of `image` each, saved in `fmt` under .png names."""
    for name in ("a", "b"):
        for i in range(2):
            (root / name).mkdir(parents=True, exist_ok=True)
            image.save(root / name / f"{i}.png", fmt)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reads_to_its_value_range(tmp_path, mode):
    image, fmt, means = MODES[mode]
    write_folder_of(tmp_path, image, fmt)
    data = load_data(str(tmp_path), img_size=8, val_fraction=0.5)
    assert data.in_chans == len(means)
    tolerance = 3 / 255 if fmt == "JPEG" else 1e-6  # JPEG is lossy even on a constant colour
    assert data.train.normalise.mean.tolist() == pytest.approx(means, abs=tolerance)


def test_sixteen_bit_grey_beside_colour_is_grey_in_every_channel(tmp_path):
    write_classes(tmp_path / "train", {"a": 2, "b": 2}, mode="RGB")
    write_classes(tmp_path / "val", {"a": 1, "b": 1}, mode="RGB")
    Image.new("I;16", (6, 4), 32768).save(tmp_path / "val" / "a" / "deep.png")
    data = load_data(str(tmp_path), img_size=8)
    normalise, index = data.val.normalise, [path.name for path in data.val.files].index("deep.png")
    pixels = data.val[index][0] * normalise.std.view(-1, 1, 1) + normalise.mean.view(-1, 1, 1)
    assert pixels.shape == (3, 8, 8)
    assert torch.allclose(pixels, torch.full_like(pixels, 32768 / 65535), atol=1e-5)


@pytest.mark.parametrize(("image", "expected"), [
    (Image.new("I", (6, 4), 70000), r"mode I holds values in \[70000, 70000\]; expected 0..65535"),
    (Image.new("I", (6, 4), -1), r"mode I holds values in \[-1, -1\]; expected 0..65535"),
    (Image.new("F", (6, 4), 3.0), r"mode F holds values in \[3, 3\]; expected 0..1"),
    (Image.new("F", (6, 4), float("nan")), r"mode F holds values in \[nan, nan\]; expected 0..1"),
    (Image.new("LAB", (6, 4)), "mode LAB is not supported; expected one of 1, L, LA, P, RGB, RGBA, CMYK, I;16"),
])
def test_out_of_range_or_unknown_mode_is_refused_with_the_file_name(tmp_path, image, expected):
    write_classes(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "b" / "odd.png"
    image.save(bad, "TIFF")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ": " + expected):
        load_data(str(tmp_path), val_fraction=0.5)
