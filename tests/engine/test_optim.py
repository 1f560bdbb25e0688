import math
import re

import pytest

from leanformer import create_model
from leanformer.engine.optim import lr_at, param_groups
from leanformer.train.config import TrainConfig


def test_schedule_warms_up_then_follows_cosine():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_no_decay_for_norms_biases_and_bias_tables():
    model = create_model("swin_nano_patch2_window4_32", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any("relative_position_bias_table" in n for n in skipped)
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert "norm.weight" in skipped and "head.fc.bias" in skipped
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [(dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(label_smoothing=1.0), "label_smoothing"),
     (dict(clip_grad=0.0), "clip_grad"), (dict(val_fraction=0.0), "val_fraction"), (dict(batch_size=2.5), "batch_size"),
     (dict(min_lr=1.0), "min_lr"), (dict(workers=-1), "workers")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = TrainConfig(epochs=3, model_kwargs={"drop_path_rate": 0.0})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown training config"):
        TrainConfig.from_dict({"epochs": 3, "learning_rate": 1.0})


def test_sampler_shards_cover_the_same_global_batches():
    from leanformer.engine.distributed import ShardedEpochSampler

    single = list(ShardedEpochSampler(103, 8, seed=3))
    shards = [list(ShardedEpochSampler(103, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == 96 and all(len(s) == 48 for s in shards)
    for b in range(12):
        assert sorted(single[b * 8:(b + 1) * 8]) == sorted(shards[0][b * 4:(b + 1) * 4] + shards[1][b * 4:(b + 1) * 4])
    sampler = ShardedEpochSampler(103, 8, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != single
    with pytest.raises(ValueError, match="divisible"):
        ShardedEpochSampler(10, 5, world_size=2)
    evaluation = [list(ShardedEpochSampler(7, 4, r, 2, shuffle=False, drop_last=False)) for r in range(2)]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(lr=math.nan), "lr=nan"), (dict(lr=True), "lr=True"), (dict(lr=math.inf), "lr=inf"),
     (dict(min_lr=math.nan), "min_lr=nan"), (dict(weight_decay=math.inf), "weight_decay=inf"),
     (dict(label_smoothing=math.nan), "label_smoothing=nan"), (dict(clip_grad=math.inf), "clip_grad=inf"),
     (dict(clip_grad=True), "clip_grad=True"), (dict(warmup_epochs=math.inf), "warmup_epochs=inf"),
     (dict(val_fraction=math.nan), "val_fraction=nan"), (dict(epochs=True), "epochs=True"),
     (dict(seed=1.5), "seed=1.5"), (dict(img_size=True), "img_size=True"), (dict(model_kwargs=[1]), "model_kwargs"),
     (dict(model=3), "model=3")],
)
def test_config_refuses_non_finite_and_non_numbers(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kwargs)


def test_one_number_check_for_every_run_config():
    from leanformer.adapters import FinetuneConfig
    from leanformer.sparsity.prosparse_training import ProSparseConfig

    for config in (TrainConfig, ProSparseConfig, FinetuneConfig):
        for name, value in (("lr", math.nan), ("weight_decay", math.inf), ("clip_grad", math.inf), ("lr", True)):
            with pytest.raises(ValueError, match=f"{name}={value!r}: expected a finite number"):
                config(**{name: value})


def test_check_real_names_the_field_and_the_range():
    from leanformer._checks import check_int, check_real

    assert check_real("x", 0.5, minimum=0, maximum=1) == 0.5
    with pytest.raises(ValueError, match=re.escape("x=1.0: expected a finite number in [0, 1)")):
        check_real("x", 1.0, minimum=0, maximum=1, max_open=True)
    with pytest.raises(ValueError, match=re.escape("x=0: expected a finite number > 0 or None (off)")):
        check_real("x", 0, minimum=0, min_open=True, none="off")
    assert check_real("x", None, minimum=0, none="off") is None
    with pytest.raises(ValueError, match=re.escape("n=True: expected an integer >= 1")):
        check_int("n", True, minimum=1)
