"""ProSparse end to end: config and schedule, the three steps, evaluation history, checkpoint and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from leanformer import create_model
from leanformer.data import lm_batches, lm_eval_batches
from leanformer.engine.checkpoint import NonFiniteLossError, load_checkpoint_folder
from leanformer.sparsity.activations import FATReLU
from leanformer.sparsity.ffn import find_ffns
from leanformer.sparsity.prosparse_training import (
    TASK_LOSSES,
    ProSparseConfig,
    causal_lm_loss,
    classification_loss,
    prosparse,
    task_loss_for,
)
from leanformer.sparsity.regularize import PROSPARSE_7B, ProSparseSchedule

transformers = pytest.importorskip("transformers")

SEQ_LEN = 16
# a short run: 4 ReLU-only steps, then a warmup at 0.05 and a rise to 0.5
RUN = {"steps": 12, "relu_steps": 4, "stages": ((4, 0.05), (8, 0.5)), "lr": 3e-3, "batch_size": 4,
       "seq_len": SEQ_LEN, "eval_every": 4}


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      hidden_act="silu")
    return transformers.LlamaForCausalLM(config)


def corpus() -> torch.Tensor:
    text = b"First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 12
    return torch.tensor(list(text))


def data(config: ProSparseConfig):
    tokens = corpus()
    train = lm_batches(tokens[:800], config.batch_size, config.seq_len, torch.Generator().manual_seed(config.seed))
    return train, lm_eval_batches(tokens[800:], config.batch_size, config.seq_len)


def run(config: ProSparseConfig, **kwargs):
    model = tiny_llama()
    train, val = data(config)
    return model, prosparse(model, train, config, val, progress=False, **kwargs)


def interrupted(batches, after: int):
    """The batches, then an exception in place of batch ``after`` (a run killed mid-way)."""
    for i, batch in enumerate(batches):
        if i == after:
            raise RuntimeError("interrupted")
        yield batch


# ---------------------------------------------------------------- config


def test_default_schedule_is_the_7b_table_scaled_to_the_run():
    config = ProSparseConfig(steps=1650)
    assert config.relu_phase_steps == 500
    assert config.schedule.stages == ProSparseSchedule(PROSPARSE_7B).scaled(1650).stages
    assert ProSparseConfig().threshold == 0.01 and ProSparseConfig().normalization == "mean"


def test_explicit_phase_and_stages_are_counted_after_it():
    config = ProSparseConfig(**RUN)
    assert config.schedule.stages == ((4, 0.0), (8, 0.05), (12, 0.5))
    assert [config.schedule(t) for t in (0, 3, 4, 7)] == [0.0, 0.0, 0.05, 0.05]
    no_relu = ProSparseConfig(steps=10, relu_steps=0, stages=[[10, 0.1]])
    assert no_relu.stages == ((10, 0.1),) and no_relu.schedule.stages == ((10, 0.1),)
    default_stages = ProSparseConfig(steps=200, relu_steps=50).schedule.stages
    assert default_stages[0] == (50, 0.0) and default_stages[-1] == (200, 0.2)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"steps": 0}, "steps"),
    ({"steps": 1.5}, "steps"),
    ({"relu_steps": 1000}, "relu_steps"),
    ({"relu_steps": -1}, "relu_steps"),
    ({"stages": [[10, -1.0]]}, r"stages\[0\] lambda"),
    ({"stages": [[2000, 0.1]]}, "stages"),
    ({"threshold": -0.01}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"lr": 0}, "lr"),
    ({"min_lr": 1.0}, "min_lr"),
    ({"warmup_steps": 5000}, "warmup_steps"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"clip_grad": 0}, "clip_grad"),
    ({"batch_size": 0}, "batch_size"),
    ({"seq_len": True}, "seq_len"),
    ({"eval_every": 0}, "eval_every"),
    ({"seed": "0"}, "seed"),
    ({"normalization": "max"}, "normalization"),
    ({"steps": 10}, "steps=10"),  # too few for the default 7B stages
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ProSparseConfig(**kwargs)


def test_config_round_trips_through_json():
    config = ProSparseConfig(**RUN)
    values = json.loads(json.dumps(config.to_dict()))
    assert values == config.to_dict() and ProSparseConfig.from_dict(values) == config
    with pytest.raises(ValueError, match="unknown"):
        ProSparseConfig.from_dict({"epochs": 3})


def test_task_loss_table():
    assert task_loss_for(tiny_llama()) is causal_lm_loss
    assert task_loss_for(create_model("swin_nano_patch2_window4_32")) is classification_loss
    assert TASK_LOSSES["MSMLP"] is classification_loss
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        task_loss_for(nn.Linear(2, 2))


def test_causal_lm_loss_is_next_token_cross_entropy():
    model = tiny_llama()
    tokens = corpus()[:33][None]
    ours = causal_lm_loss(model, (tokens[:, :-1], tokens[:, 1:]))
    reference = model(input_ids=tokens, labels=tokens).loss  # HF shifts the labels itself; attention is causal
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


# ---------------------------------------------------------------- the three steps


def test_three_steps_on_a_tiny_llama():
    config = ProSparseConfig(**RUN, threshold=0.01)
    model, result = run(config)
    for ffn in find_ffns(model):  # step 3: FATReLU in every FFN
        assert isinstance(ffn.act, FATReLU) and ffn.act.threshold == 0.01
    assert not model.training
    assert [entry["step"] for entry in result.history] == [4, 8, 12]
    assert [entry["lambda"] for entry in result.history] == [0.0, 0.05, pytest.approx(config.schedule(11))]
    assert result.schedule == [[4, 0.0], [8, 0.05], [12, 0.5]] and result.start_step == 0
    assert result.initial_sparsity < 0.01  # SiLU: almost no exact zeros
    assert result.history[-1]["sparsity"] > 0.3  # ReLU: exact zeros
    assert result.final_sparsity >= result.history[-1]["sparsity"]  # FATReLU zeroes at least as much as ReLU
    assert result.final_perplexity == pytest.approx(torch.tensor(result.final_val_loss).exp().item())
    assert result.report.average_sparsity == result.final_sparsity and len(result.report.layers) == 2
    values = json.loads(json.dumps(result.to_dict()))
    assert values["report"]["layers"][0]["hidden"] == 64 and values["config"]["threshold"] == 0.01


def test_regularisation_adds_sparsity_beyond_relu():
    plain = ProSparseConfig(**{**RUN, "stages": ((8, 0.0),)})
    _, relu_only = run(plain)
    _, regularised = run(ProSparseConfig(**{**RUN, "stages": ((4, 2.0), (8, 10.0))}))
    assert regularised.history[-1]["sparsity"] > relu_only.history[-1]["sparsity"] + 0.1
    assert regularised.history[0] == relu_only.history[0]  # same seed, same ReLU-only phase


def test_image_backbone_uses_classification_loss():
    model = create_model("swin_nano_patch2_window4_32", in_chans=1, num_classes=3, img_size=16)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 16, 16, generator=generator), torch.randint(3, (4,), generator=generator))
               for _ in range(6)]
    config = ProSparseConfig(steps=4, relu_steps=1, stages=((3, 0.1),), eval_every=2, lr=1e-3)
    result = prosparse(model, batches[:4], config, batches[4:], progress=False)
    assert all(isinstance(ffn.act, FATReLU) for ffn in find_ffns(model))
    assert [entry["step"] for entry in result.history] == [2, 4] and result.final_sparsity > 0.3


# ---------------------------------------------------------------- checkpoint and resume


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    config = ProSparseConfig(**RUN)
    straight, expected = run(config, checkpoint_dir=tmp_path / "straight")

    train, val = data(config)
    with pytest.raises(RuntimeError, match="interrupted"):
        prosparse(tiny_llama(), interrupted(train, after=6), config, val, progress=False,
                  checkpoint_dir=tmp_path / "killed")
    meta = json.loads((tmp_path / "killed" / "meta.json").read_text())
    assert meta["step"] == 4  # the last evaluation before the interruption

    resumed, got = run(config, checkpoint_dir=tmp_path / "killed", resume=True)
    assert got.start_step == 4 and got.history == expected.history
    assert got.final_val_loss == expected.final_val_loss and got.final_sparsity == expected.final_sparsity
    want = straight.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_resume_checks(tmp_path):
    config = ProSparseConfig(**RUN)
    run(config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run(config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot resume.*lr"):
        run(ProSparseConfig(**{**RUN, "lr": 1e-3}), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run(config, resume=True)
    with pytest.raises(ValueError, match="no checkpoint in .*none"):
        run(config, checkpoint_dir=tmp_path / "none", resume=True)


def test_bad_batches_are_reported():
    config = ProSparseConfig(**RUN)
    train, val = data(config)
    with pytest.raises(ValueError, match="re-iterable"):
        prosparse(tiny_llama(), train, config, iter(val), progress=False)
    with pytest.raises(ValueError, match="ran out after 5 batches"):
        prosparse(tiny_llama(), [next(train) for _ in range(5)], config, val, progress=False)
    with pytest.raises(ValueError, match="empty"):
        prosparse(tiny_llama(), train, config, [], progress=False)
    with pytest.raises(ValueError, match="no task loss known"):
        prosparse(nn.Linear(2, 2), train, config, val, progress=False)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    config = ProSparseConfig(**RUN)
    steps = []

    def exploding(model, batch):
        loss = causal_lm_loss(model, batch)
        if model.training:  # evaluations call it too
            steps.append(1)
            if len(steps) == 7:
                return loss * math.nan
        return loss

    train, val = data(config)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7") as err:
        prosparse(tiny_llama(), train, config, val, progress=False, checkpoint_dir=tmp_path, loss_fn=exploding)
    assert str(tmp_path) in str(err.value)
    assert load_checkpoint_folder(tmp_path)[1]["step"] == 4  # the evaluation before, intact
    assert not (tmp_path / ".lock").exists()


def test_disk_full_during_a_checkpoint_says_which_one_is_kept(tmp_path, monkeypatch):
    import errno
    import os

    from leanformer.engine import checkpoint
    from leanformer.engine.checkpoint import CheckpointWriteError

    save_file, written = checkpoint.save_file, []

    def fills_the_disk(tensors, path):
        written.append(path)
        if len(written) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    config = ProSparseConfig(steps=4, relu_steps=1, stages=((2, 0.1),), lr=1e-3, eval_every=2, batch_size=2,
                             seq_len=16)
    with pytest.raises(CheckpointWriteError, match=rf"No space left on device: .*: the last good checkpoint, "
                                                   rf"{tmp_path / 'ck'}, is kept"):
        run(config, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert load_checkpoint_folder(tmp_path / "ck")[1]["step"] == 2
