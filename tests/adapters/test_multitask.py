"""Multi-task fine-tuning on a tiny BERT: both adapters on the same Linears, same data order, saved files, resume."""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch
from safetensors.torch import load_file

from leanformer.adapters import model as adapters_model
from leanformer.adapters import multitask, smora_layers
from leanformer.adapters.classifier import MultiTaskClassifier, activated_adapter_params, add_adapters, mean_pool
from leanformer.adapters.finetune_config import FinetuneConfig
from leanformer.adapters.multitask import finetune, load_finetuned
from leanformer.adapters.task_batches import task_batches
from leanformer.data import load_tokenizer
from leanformer.data.tasks import load_task
from leanformer.engine import loop as engine_loop
from leanformer.engine.checkpoint import NonFiniteLossError, load_checkpoint_folder

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

STEPS = 60
SMALL = {"r": 8, "active_r": 2, "steps": STEPS, "batch_size": 8, "lr": 3e-3, "eval_every": 20, "compute": "gather"}


@pytest.fixture(scope="module")
def tasks(keyword_task_files):
    return {name: (load_task(train), load_task(test)) for name, (train, test) in keyword_task_files.items()}


def run(base, tasks, adapter, out=None, resume=False, **overrides):
    config = FinetuneConfig(**{**SMALL, "adapter": adapter, **overrides})
    return finetune(base, tasks, config, out_dir=out, resume=resume, progress=False)


def test_config_validation_names_the_field():
    for bad, message in ((dict(adapter="dora"), "adapter='dora': expected one of smora, lora"),
                         (dict(steps=0), "steps=0: expected a positive integer"),
                         (dict(warmup_steps=2000), "warmup_steps=2000"),
                         (dict(task_sampling="random"), "task_sampling='random'"),
                         (dict(min_lr=1.0), "min_lr=1.0: expected at most lr"),
                         (dict(active_r=128), "active_r=128: expected at most r=64"),  # validated by SMoRAConfig
                         (dict(gate_scores="x"), "gate_scores='x'")):
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**bad)
    config = FinetuneConfig(target_modules=["query", "value"], steps=50)
    assert config.target_modules == ("query", "value") and config.warmup == 5
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown finetune config field"):
        FinetuneConfig.from_dict({"rank": 4})


def test_task_batches_come_from_the_seed_alone():
    def draw(seed: int, n: int = 400) -> list:
        batches = task_batches({"a": 30, "b": 90}, 8, seed)
        return [(task, index.tolist()) for task, index in itertools.islice(batches, n)]

    assert draw(0) == draw(0) and draw(0) != draw(1)
    counts = collections.Counter(task for task, _ in draw(0, 2000))
    assert 0.2 < counts["a"] / 2000 < 0.3  # proportional to 30 : 90
    uniform = task_batches({"a": 30, "b": 90}, 8, 0, "uniform")
    assert 0.45 < collections.Counter(next(uniform)[0] for _ in range(2000))["a"] / 2000 < 0.55
    one = task_batches({"a": 24}, 8, 3)
    epoch = torch.cat([next(one)[1] for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(24))  # every example once per epoch
    small = next(task_batches({"a": 5}, 8, 0))[1]
    assert sorted(small.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="sampling='x'"):
        task_batches({"a": 1}, 8, 0, "x")


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_both_adapters_on_the_same_linears_only_adapters_and_heads_train(tiny_bert_dir):
    adapted, trainable = {}, {}
    for adapter in ("smora", "lora"):
        torch.manual_seed(0)
        classifier = MultiTaskClassifier.from_pretrained(tiny_bert_dir, {"sentiment": 2, "topic": 3})
        assert classifier.backbone.pooler is None  # mean pooling: BERT's pooler would be an adapter never trained
        assert classifier.head_names == ("heads.sentiment", "heads.topic")
        model, shapes = add_adapters(classifier, FinetuneConfig(adapter=adapter, r=4, active_r=2))
        if adapter == "smora":
            adapted[adapter] = set(smora_layers(model))
        else:
            prefix = "base_model.model."
            adapted[adapter] = {n.removeprefix(prefix) for n, m in model.named_modules()
                                if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert adapted[adapter] == set(shapes)
        trainable[adapter] = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all("lora_" in n or ".heads." in f".{n}" for n in trainable[adapter]), trainable[adapter]
        assert any("heads.topic" in n for n in trainable[adapter])
    assert adapted["smora"] == adapted["lora"] and len(adapted["smora"]) == 12  # 2 layers x 6 Linears
    assert not any("heads" in n for n in adapted["smora"])


def test_activated_params_per_token():
    shapes = {"a": (32, 64), "b": (64, 32)}
    assert activated_adapter_params(shapes, FinetuneConfig(adapter="lora", r=8)) == 8 * 96 * 2
    smora = FinetuneConfig(r=8, active_r=2)  # 8 experts: router in * 8
    assert activated_adapter_params(shapes, smora) == 2 * 96 * 2 + (32 + 64) * 8
    moe = FinetuneConfig(r=8, active_r=4, rank_partition=2)  # 4 experts of 2 ranks
    assert activated_adapter_params(shapes, moe) == 4 * 96 * 2 + (32 + 64) * 4


def test_both_arms_end_to_end_same_data_saved_in_peft_layout(tiny_bert_dir, tasks, tmp_path):
    results = {}
    for adapter in ("smora", "lora"):
        out = tmp_path / adapter
        result = results[adapter] = run(tiny_bert_dir, tasks, adapter, out)
        assert set(result.accuracy) == {"sentiment", "topic"}
        assert result.average_accuracy > 0.6  # a keyword gives each label away; chance is 0.42
        assert [h["step"] for h in result.history] == [20, 40, 60] and result.steps == STEPS
        assert result.seconds_per_step > 0 and len(result.adapted_linears) == 12
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert {"base_model.model.heads.topic.weight", "base_model.model.heads.sentiment.bias"} <= set(weights)
        assert not any("base_layer" in k or "original_module" in k for k in weights)
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert (out / "labels.json").read_text().count("pos") == 1

        model, labels = load_finetuned(out, tiny_bert_dir)  # the saved files give the reported accuracy again
        assert labels == {"sentiment": ["neg", "pos"], "topic": ["business", "politics", "sports"]}
        tokenizer = load_tokenizer(tiny_bert_dir)
        for name, (_, test) in tasks.items():
            inputs = tokenizer(test.texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                predicted = model(**inputs, task=name).argmax(-1).tolist()
            correct = sum(labels[name][p] == y for p, y in zip(predicted, test.labels, strict=True))
            assert correct / len(test) == pytest.approx(result.accuracy[name])
    smora, lora = results["smora"], results["lora"]
    assert smora.data_order_sha256 == lora.data_order_sha256 and smora.steps_per_task == lora.steps_per_task
    assert smora.adapted_linears == lora.adapted_linears
    assert smora.routing["train"]["layers"] == 12 and smora.routing["test"]["tokens"] > 0 and lora.routing is None
    assert smora.activated_params_per_token < lora.activated_params_per_token


@pytest.mark.parametrize(("adapter", "compute"), [("smora", "auto"), ("lora", "gather")])
def test_resume_ends_as_the_uninterrupted_run(tiny_bert_dir, tasks, tmp_path, monkeypatch, adapter, compute):
    # "auto" times the two paths on every add_smora, so its pick can differ between runs on a busy machine; fix
    # the pick, and change it before resuming: the checkpointed paths must win
    picked = {"path": "dense"}
    monkeypatch.setattr(adapters_model, "choose_compute", lambda *args, **kwargs: picked["path"])
    whole = run(tiny_bert_dir, tasks, adapter, tmp_path / "whole", compute=compute)
    step = engine_loop.train_step
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:  # after the checkpoint at step 20
            raise RuntimeError("interrupted")
        return step(*args, **kwargs)

    monkeypatch.setattr(engine_loop, "train_step", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tiny_bert_dir, tasks, adapter, tmp_path / "cut", compute=compute)
    monkeypatch.setattr(engine_loop, "train_step", step)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run(tiny_bert_dir, tasks, adapter, tmp_path / "cut", compute=compute)
    with pytest.raises(ValueError, match=r"configuration differs.*seed"):
        run(tiny_bert_dir, tasks, adapter, tmp_path / "cut", resume=True, compute=compute, seed=1)
    picked["path"] = "gather"
    resumed = run(tiny_bert_dir, tasks, adapter, tmp_path / "cut", resume=True, compute=compute)
    assert resumed.start_step == 20 and resumed.steps == STEPS
    assert resumed.history == whole.history and resumed.data_order_sha256 == whole.data_order_sha256
    expected = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    state = next((tmp_path / "cut" / "checkpoint").glob("state-*.safetensors"))
    assert not any("backbone.embeddings" in k and "lora" not in k for k in load_file(state))  # frozen: not saved


def test_bad_tasks_are_refused_before_training(tiny_bert_dir, tasks, tmp_path):
    train, _ = tasks["topic"]
    unknown = tmp_path / "test.tsv"
    unknown.write_text("the ball\tsports\na vote\telection\n")
    with pytest.raises(ValueError, match=r"test\.tsv, line 2: label 'election' does not occur"):
        run(tiny_bert_dir, {"topic": (train, load_task(unknown))}, "smora")
    with pytest.raises(ValueError, match="task name 'keys'"):
        run(tiny_bert_dir, {"keys": tasks["topic"]}, "smora")
    single = tmp_path / "one.tsv"
    single.write_text("the ball\tsports\n")
    with pytest.raises(ValueError, match="has one label"):
        run(tiny_bert_dir, {"topic": (load_task(single), load_task(single))}, "smora")
    with pytest.raises(ValueError, match="resume needs out_dir"):
        run(tiny_bert_dir, tasks, "smora", resume=True)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_bert_dir, tasks, tmp_path, monkeypatch):
    loss_fn, calls = multitask.task_loss, []

    def exploding(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        return loss * math.inf if len(calls) == 25 else loss

    monkeypatch.setattr(multitask, "task_loss", exploding)
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 25"):
        run(tiny_bert_dir, tasks, "lora", tmp_path)
    assert load_checkpoint_folder(tmp_path / "checkpoint")[1]["step"] == 20
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / ".lock").exists()
