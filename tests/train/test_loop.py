"""The Trainer as a library: it stops at a non-finite loss keeping the last good checkpoint, it refuses an output
folder holding another run unless told to overwrite it, and a resumed run cannot go backwards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanformer.engine.checkpoint import NonFiniteLossError, load_checkpoint_folder
from leanformer.train import TrainConfig, Trainer

TINY = dict(img_size=16, batch_size=64, model_kwargs={"drop_path_rate": 0.0})
STEPS_PER_EPOCH = 22  # 1437 training digits // 64


def nan_from_step(step: int):
    """An extra loss that is 0, then NaN from the given (1-based) training step on (it gets the 0-based step)."""

    def extra(index: int, model: torch.nn.Module) -> torch.Tensor:
        return torch.tensor(math.nan if index + 1 >= step else 0.0)

    return extra


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    bad_step = 2 * STEPS_PER_EPOCH + 3
    trainer = Trainer(TrainConfig(epochs=3, **TINY), output=tmp_path, extra_losses=[nan_from_step(bad_step)],
                      progress=False)
    with pytest.raises(NonFiniteLossError, match=f"loss is nan at step {bad_step}") as err:
        trainer.fit()
    assert str(tmp_path / "last") in str(err.value) and "kept" in str(err.value)
    tensors, meta = load_checkpoint_folder(tmp_path / "last")
    assert meta["epoch"] == 2 and meta["step"] == 2 * STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))
    assert not (tmp_path / "result.json").exists() and not (tmp_path / ".lock").exists()

    with pytest.raises(ValueError, match="already completed 2 epochs"):  # a resumed run cannot go backwards
        Trainer(TrainConfig(epochs=1, **TINY), output=tmp_path, progress=False).fit(resume=tmp_path)


def test_an_output_holding_a_run_is_refused_unless_overwrite(tmp_path):
    config = TrainConfig(epochs=1, **TINY)
    Trainer(config, output=tmp_path, progress=False).fit()
    before = (tmp_path / "result.json").read_text()
    with pytest.raises(ValueError, match="already holds a checkpoint or results") as err:
        Trainer(config, output=tmp_path, progress=False).fit()
    assert str(tmp_path) in str(err.value) and (tmp_path / "result.json").read_text() == before
    with pytest.raises(ValueError, match="overwrite"):  # would delete the very checkpoint it resumes
        Trainer(config, output=tmp_path, progress=False, overwrite=True).fit(resume=tmp_path)
    result = Trainer(TrainConfig(epochs=1, seed=1, **TINY), output=tmp_path, progress=False, overwrite=True).fit()
    assert json.loads((tmp_path / "result.json").read_text())["config"]["seed"] == 1 == result.config["seed"]
    resumed = Trainer(TrainConfig(epochs=1, seed=1, **TINY), output=tmp_path, progress=False).fit(resume=tmp_path)
    assert resumed.epochs_run == 0  # resuming into its own folder is allowed


def test_the_trainer_keeps_the_trained_model_and_records_its_settings(tmp_path):
    """`Trainer.model` is the model the last checkpoint holds; settings go into the checkpoint and the result, and
    a settings key that is a config field is refused."""
    trainer = Trainer(TrainConfig(epochs=1, **TINY), output=tmp_path, progress=False, settings={"note": "x"})
    result = trainer.fit()
    tensors, meta = load_checkpoint_folder(tmp_path / "last")
    state = trainer.model.state_dict()
    assert all(torch.equal(tensors[f"model.{k}"], v) for k, v in state.items())
    assert meta["config"]["note"] == "x" and result.config["note"] == "x"
    with pytest.raises(ValueError, match=r"settings \['epochs'\] are TrainConfig fields"):
        Trainer(TrainConfig(epochs=1, **TINY), progress=False, settings={"epochs": 3})
