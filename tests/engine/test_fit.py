"""The training engine on a small MLP: accumulation, exact resume, callbacks and extra losses, the non-finite
stop, the run-folder guard, batch sharding and config validation. Every job (train, sparsify, finetune,
predictors) runs on this loop; their own tests cover what they add."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.engine import (
    Callback,
    Checkpointing,
    LoopConfig,
    NonFiniteLossError,
    fit,
    load_checkpoint_folder,
    shard,
)

DATA = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (256,), generator=torch.Generator().manual_seed(1))
CONFIG = LoopConfig(steps=12, lr=1e-2, warmup_steps=2, clip_grad=1.0, eval_every=4)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(size: int = 16, stop_after: int | None = None):
    """Endless batches in a fixed order; raises after ``stop_after`` batches (an interrupted run)."""
    generator = torch.Generator().manual_seed(2)
    drawn = 0
    while True:
        if drawn == stop_after:
            raise RuntimeError("interrupted")
        index = torch.randint(0, len(DATA), (size,), generator=generator)
        drawn += 1
        yield DATA[index], LABELS[index]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def evaluate(model):
    return {"val_loss": F.cross_entropy(model(DATA), LABELS).item()}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulating_two_half_batches_equals_one_batch():
    one, two = mlp(), mlp()
    fit(one, batches(32), loss_fn, CONFIG, progress=False)
    halves = (part for x, y in batches(32) for part in ((x[:16], y[:16]), (x[16:], y[16:])))
    fit(two, halves, loss_fn, LoopConfig(**{**CONFIG.__dict__, "accumulate": 2}), progress=False)
    for key, value in weights(one).items():
        torch.testing.assert_close(weights(two)[key], value, rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tmp_path):
    whole = mlp()
    expected = fit(whole, batches(), loss_fn, CONFIG, evaluate=evaluate,
                   checkpoint=Checkpointing(tmp_path / "whole", {"run": 1}), progress=False)
    cut = Checkpointing(tmp_path / "cut", {"run": 1})
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(mlp(), batches(stop_after=10), loss_fn, CONFIG, evaluate=evaluate, checkpoint=cut, progress=False)
    assert load_checkpoint_folder(cut.folder)[1]["step"] == 8
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # a new run may not overwrite it
        fit(mlp(), batches(), loss_fn, CONFIG, checkpoint=cut, progress=False)
    with pytest.raises(ValueError, match=r"configuration differs.*run"):
        fit(mlp(), batches(), loss_fn, CONFIG, checkpoint=Checkpointing(cut.folder, {"run": 2}), resume=True,
            progress=False)
    resumed_model = mlp()
    resumed = fit(resumed_model, batches(), loss_fn, CONFIG, evaluate=evaluate, checkpoint=cut, resume=True,
                  progress=False)
    assert resumed.start_step == 8 and resumed.step == 12 and resumed.history == expected.history
    assert all(torch.equal(weights(resumed_model)[k], v) for k, v in weights(whole).items())


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="resume needs checkpoint="):
        fit(mlp(), batches(), loss_fn, CONFIG, resume=True)
    with pytest.raises(ValueError, match="no checkpoint in"):
        fit(mlp(), batches(), loss_fn, CONFIG, checkpoint=Checkpointing(tmp_path, {}), resume=True)


def test_callbacks_and_extra_losses_see_the_steps():
    seen = {"steps": [], "extra": [], "evals": [], "epochs": []}

    class Record(Callback):
        def on_step(self, step, model, batch, loss):
            seen["steps"].append(step)
            assert isinstance(model, nn.Sequential) and math.isfinite(loss)

        def on_eval(self, step, model, entry):
            assert not model.training  # evaluated in eval mode
            entry["mine"] = float(step)
            seen["evals"].append(step)

        def on_epoch_end(self, epoch, model):
            seen["epochs"].append(epoch)

    def extra(step, model):
        seen["extra"].append(step)
        return torch.zeros(())

    config = LoopConfig(**{**CONFIG.__dict__, "steps_per_epoch": 6, "eval_every": 5})
    result = fit(mlp(), batches(), loss_fn, config, evaluate=evaluate, extra_losses=[extra], callbacks=[Record()],
                 progress=False)
    assert seen["steps"] == list(range(1, 13)) and seen["extra"] == list(range(12))
    assert seen["evals"] == [5, 10, 12] and seen["epochs"] == [1, 2]
    assert [entry["mine"] for entry in result.history] == [5.0, 10.0, 12.0]
    assert set(result.history[0]) == {"step", "lr", "train_loss", "val_loss", "mine"}


def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    model = mlp()
    kept = {}

    class Keep(Callback):
        def on_step(self, step, model, batch, loss):
            kept.update(weights(model))

    def nan_at_step_7(step, model):
        return torch.tensor(math.nan if step == 6 else 0.0)

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7") as err:
        fit(model, batches(), loss_fn, CONFIG, extra_losses=[nan_at_step_7], callbacks=[Keep()],
            checkpoint=Checkpointing(tmp_path, {}), progress=False)
    assert str(tmp_path) in str(err.value) and load_checkpoint_folder(tmp_path)[1]["step"] == 4
    assert all(torch.equal(weights(model)[k], v) for k, v in kept.items())  # step 7 changed nothing


def test_too_few_batches_are_reported():
    with pytest.raises(ValueError, match="ran out after 5 batches"):
        fit(mlp(), [next(batches()) for _ in range(5)], loss_fn, CONFIG, progress=False)


def test_shard_cuts_every_tensor_of_a_batch_evenly():
    batch = ("task", {"ids": torch.arange(8).view(4, 2)}, torch.arange(4))
    first, second = shard(batch, 0, 2), shard(batch, 1, 2)
    assert first[0] == "task" and first[1]["ids"].tolist() == [[0, 1], [2, 3]] and second[2].tolist() == [2, 3]
    with pytest.raises(ValueError, match="multiple of 3"):
        shard(batch, 0, 3)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", math.nan, "lr=nan"), ("steps", 0, "steps=0"), ("accumulate", 1.5, "accumulate=1.5"),
    ("warmup_steps", 20, "warmup_steps=20"), ("clip_grad", -1.0, "clip_grad=-1.0"), ("eval_every", True, "eval_every"),
])
def test_bad_loop_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(**{**CONFIG.__dict__, field: value})
