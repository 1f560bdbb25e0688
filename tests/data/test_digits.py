import pytest
import torch

from leanformer.data import load_digits_split


def test_split_is_stratified_fixed_and_resized():
    train, val = load_digits_split(32, seed=1)
    images, labels = train.tensors
    assert images.shape[1:] == (1, 32, 32) and len(train) + len(val) == 1797
    counts = torch.bincount(val.tensors[1], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # about 20% of each class (174-183 per class)
    again, _ = load_digits_split(32, seed=1)
    assert torch.equal(again.tensors[0], images)
    other, _ = load_digits_split(32, seed=2)
    assert not torch.equal(other.tensors[1], labels)
    assert abs(float(images.mean())) < 0.05


@pytest.mark.parametrize(("kwargs", "field"), [(dict(img_size=4), "img_size"), (dict(img_size=32, val_fraction=1.0),
                                                                                  "val_fraction")])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        load_digits_split(**kwargs)
