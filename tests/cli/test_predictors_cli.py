"""`leanformer predictors` end to end on a tiny ReLU LLaMA folder: the files it writes load back and fit the model,
the held-out report is what evaluate_predictors measures, errors are one line."""

from __future__ import annotations

import json

import pytest

from leanformer._hf import hf_progress_bars, load_causal_lm
from leanformer.cli.main import main
from leanformer.data import lm_eval_batches, load_text
from leanformer.sparsity import Predictors, ReLUConfig, evaluate_predictors, relufy

pytest.importorskip("transformers")

SEQ_LEN, BATCH, BATCHES = 32, 4, 3
RUN = ["--steps", "20", "--batches", str(BATCHES), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH),
       "--no-progress"]


def test_end_to_end_writes_predictors_that_load_and_fit(fatrelu_dir, lm_text, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predictors", "--model", str(fatrelu_dir), "--data", str(lm_text), "--out", str(out), *RUN,
                 "--target-recall", "0.9", "--val-fraction", "0.2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "predictors.json").read_text())
    assert printed == saved and saved["predictors"] == str(out / "predictors.safetensors")
    assert saved["activation"] == "FATReLU(threshold=0.05) from sparsity.json"
    assert saved["config"]["steps"] == 20 and saved["config"]["target_recall"] == 0.9
    # --batch-size and --val-fraction are about windows and text, not PredictorConfig's batch_size / val_fraction
    assert saved["config"]["batch_size"] == 256 and saved["config"]["val_fraction"] == 0.1
    assert saved["recorded_tokens"] == BATCHES * BATCH * SEQ_LEN
    assert not (fatrelu_dir / "predictors.safetensors").exists()  # --out, not the model folder

    predictors = Predictors.load(out)
    assert predictors.names() == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with hf_progress_bars(False):
        model = relufy(load_causal_lm(fatrelu_dir).eval(), ReLUConfig("fatrelu", 0.05))
    predictors.check_fits(model)
    held_out = lm_eval_batches(load_text(lm_text, 0.2, SEQ_LEN).val, BATCH, SEQ_LEN)[:BATCHES]
    report = evaluate_predictors(model, predictors, [inputs for inputs, _ in held_out])
    assert saved["held_out"] == json.loads(json.dumps(report.to_dict()))
    assert saved["held_out_tokens"] == sum(inputs.numel() for inputs, _ in held_out)
    assert all(layer["recall"] >= 0.9 for layer in saved["fit"]["layers"])  # calibrated to the target


def test_the_table_lists_every_layer(relu_dir, lm_text, tmp_path, capsys):
    assert main(["predictors", "--model", str(relu_dir), "--data", str(lm_text), "--out", str(tmp_path), *RUN]) == 0
    out = capsys.readouterr().out
    assert "recall  precision  true active %  predicted active %" in out
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out and "held-out mean recall" in out
    assert (tmp_path / "predictors.safetensors").is_file() and (tmp_path / "predictors.json").is_file()


def test_help_names_inputs_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predictors", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(word in text for word in ("predictors.safetensors", "predictors.json", "--target-recall",
                                         "(default: 0.95)", "(default: 40)", "sparsity.json"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "{tmp}/missing.txt"], "missing.txt"),
    (["--data", "{text}", "--model", "{silu}"], "hidden_act is 'silu'"),
    (["--data", "{text}", "--batches", "0"], "--batches=0"),
    (["--data", "{text}", "--target-recall", "2"], "target_recall=2.0"),
    (["--data", "{text}", "--seq-len", "5000"], "too short"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, relu_dir, silu_dir, lm_text, tmp_path, capsys):
    paths = {"tmp": tmp_path, "text": lm_text, "silu": silu_dir}
    argv = [arg.format(**paths) for arg in argv]
    model = [] if "--model" in argv else ["--model", str(relu_dir)]
    assert main(["predictors", *model, *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
