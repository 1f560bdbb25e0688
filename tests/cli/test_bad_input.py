"""Bad input is a clear one-line error (exit code 2) before any work, and nothing is lost (issue 13, section 3):
unusable output locations, system errors (disk full during a checkpoint), damaged or hostile model files, sizes
that cannot fit in memory, and the smaller cases (commas in --tasks paths, profile --depth, forward --batch-size,
generate --max-new-tokens)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from leanformer.cli import bench as bench_cli
from leanformer.cli import finetune as finetune_cli
from leanformer.cli import train as train_cli
from leanformer.cli.main import build_parser, main
from leanformer.engine import checkpoint
from leanformer.engine.checkpoint import load_checkpoint_folder
from leanformer.models._registry import model_entrypoint, weight_bytes
from leanformer.sparsity.speed import synthetic_layers
from leanformer.train import loop

TINY_TRAIN = ["train", "--img-size", "16", "--batch-size", "64", "--no-progress"]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def forbid(monkeypatch, target: str) -> None:
    """Make ``target`` (module.attribute) fail the test if called: the work it starts must not begin."""
    module, _, name = target.rpartition(".")

    def started(*args, **kwargs):
        raise AssertionError(f"{target} was called: work started before the bad input was refused")

    monkeypatch.setattr(f"{module}.{name}", started)


# -- output locations --------------------------------------------------------------------------------------


@pytest.fixture
def folder_commands(tiny_bert_dir, relu_dir, lm_text) -> dict[str, tuple[list[str], str, str, str]]:
    """command -> (its arguments but the output, the output flag, the work that must not start, a name the
    command writes in its folder and a wrong kind of thing put there: 'file:NAME' or 'folder:NAME')."""
    return {
        "train": (TINY_TRAIN, "--output", "leanformer.train.loop.load_data", "file:last"),
        "sparsify": (["sparsify", "--model", "swin_nano_patch2_window4_32", "--no-progress"], "--out",
                     "leanformer.cli.sparsify.load_data", "file:checkpoint"),
        "finetune": (["finetune", "--base", str(tiny_bert_dir), "--tasks", "a=x.tsv", "--no-progress"], "--out",
                     "leanformer.cli.finetune.load_tasks", "file:adapter"),
        "predictors": (["predictors", "--model", str(relu_dir), "--data", str(lm_text), "--no-progress"], "--out",
                       "leanformer.cli.predictors.load_sparsified_lm", "folder:predictors.json"),
    }


def _place(tmp_path: Path, where: str, wrong: str) -> tuple[Path, Path]:
    """(the output folder to give, the path the error must name) for one kind of unusable folder."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    if where == "a file":
        return a_file, a_file
    if where == "under a file":
        return a_file / "run", a_file
    kind, name = wrong.split(":")
    out = tmp_path / "run"
    out.mkdir()
    if kind == "folder":
        (out / name).mkdir()
    else:
        (out / name).write_text("in the way")
    return out, out / name


@pytest.mark.parametrize("where", ["a file", "under a file", "a file or folder in the way inside it"])
@pytest.mark.parametrize("command", ["train", "sparsify", "finetune", "predictors"])
def test_an_unusable_output_folder_is_refused_before_any_work(command, where, folder_commands, tmp_path,
                                                               monkeypatch, capsys):
    argv, flag, work, wrong = folder_commands[command]
    forbid(monkeypatch, work)
    out, named = _place(tmp_path, where, wrong)
    before = sorted(tmp_path.rglob("*"))
    assert main([*argv, flag, str(out)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"leanformer {command}: error: {flag} {out}") and str(named) in line, line
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, nothing deleted


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch, capsys):
    forbid(monkeypatch, "leanformer.train.loop.load_data")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main([*TINY_TRAIN, "--output", str(locked / "run")]) == 2
    assert f"{locked} is not writable" in one_error_line(capsys)


@pytest.mark.parametrize("where", ["a folder", "under a file"])
@pytest.mark.parametrize(("command", "work"), [
    (["bench", "sparse-ffn", "--d-model", "32", "--d-ff", "64"], "leanformer.cli.bench.time_sparse_ffn"),
    (["profile", "--model", "swin_nano_patch2_window4_32"], "leanformer.cli.profile.create_model"),
])
def test_an_unusable_plot_path_is_refused_before_any_work(command, work, where, tmp_path, monkeypatch, capsys):
    forbid(monkeypatch, work)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    plot, named = (tmp_path, tmp_path) if where == "a folder" else (a_file / "x.png", a_file)
    assert main([*command, "--plot", str(plot)]) == 2
    line = one_error_line(capsys)
    assert f"error: --plot {plot}" in line and str(named) in line, line


def test_train_checks_every_name_its_run_writes():
    assert set(train_cli.OUTPUT_FOLDERS + train_cli.OUTPUT_FILES) == set(loop.RUN_OUTPUTS)
    assert set(finetune_cli.OUTPUT_FOLDERS) <= set(finetune_cli.RUN_OUTPUTS)


# -- errors of the system ----------------------------------------------------------------------------------


def test_an_os_error_is_one_line_naming_the_path(monkeypatch, capsys):
    def denied(pattern="*"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/srv/models/registry")

    monkeypatch.setattr("leanformer.cli.models.list_models", denied)
    assert main(["models"]) == 2
    assert one_error_line(capsys) == "leanformer models: error: Permission denied: /srv/models/registry"
    with pytest.raises(PermissionError):  # --debug: the traceback
        main(["--debug", "models"])


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    save_file, steps = checkpoint.save_file, []

    def fills_the_disk(tensors, path):
        """Writes the first epoch's checkpoint; the disk is full when the second one is half written."""
        step = Path(path).name.split(".")[1]  # .state-<step>.safetensors.<random>.tmp
        steps.append(step)
        if step != steps[0]:
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    assert main([*TINY_TRAIN, "--epochs", "2", "--output", str(out)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("leanformer train: error: No space left on device: "), line
    assert f"the last good checkpoint, {out / 'last'}, is kept" in line and f"--resume {out}" in line, line
    assert not list((out / "last").glob(".*.tmp"))  # the half-written file is gone
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert load_checkpoint_folder(out / "last")[1]["epoch"] == 1
    assert main(["train", "--resume", str(out), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 1
    assert load_checkpoint_folder(out / "last")[1]["epoch"] == 2


# -- damaged and hostile model files -----------------------------------------------------------------------


class Payload:
    """Pickles as a shell command that leaves a file behind: what a malicious pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damage(folder: Path, how: str, marker: Path) -> None:
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
        torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")


@pytest.mark.parametrize(("how", "message"), [
    ("truncated", "a safetensors file is damaged or truncated"),
    ("malicious", "could not be read: refused, it is a pickle holding objects other than tensors"),
])
@pytest.mark.parametrize("command", ["generate", "sparsify"])
def test_a_damaged_or_hostile_model_folder_is_one_line(command, how, message, tiny_llama, lm_text, tmp_path,
                                                       capsys):
    folder = tiny_llama(tmp_path / "model", "relu" if command == "generate" else "silu")
    marker = tmp_path / "payload-ran"
    _damage(folder, how, marker)
    argv = (["generate", "--model", str(folder), "--prompt", "To be", "--no-progress"] if command == "generate" else
            ["sparsify", "--model", str(folder), "--data", str(lm_text), "--out", str(tmp_path / "out"),
             "--no-progress"])
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"leanformer {command}: error: --model {folder}") and message in line, line
    assert "weights_only" not in line and not marker.exists()  # the payload never ran


def test_finetune_names_a_truncated_encoder(tiny_bert_dir, keyword_task_files, tmp_path, capsys):
    base = tmp_path / "encoder"
    shutil.copytree(tiny_bert_dir, base)
    _damage(base, "truncated", tmp_path / "unused")
    train, test = keyword_task_files["topic"]
    assert main(["finetune", "--base", str(base), "--tasks", f"topic={train}::{test}", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{base}: a safetensors file is damaged or truncated" in one_error_line(capsys)


# -- sizes that cannot fit ---------------------------------------------------------------------------------


def _machine_with(monkeypatch, available: int) -> None:
    monkeypatch.setattr("leanformer._machine.available_memory_bytes", lambda: available)


def test_bench_refuses_a_shape_that_cannot_fit_before_allocating(monkeypatch, capsys):
    _machine_with(monkeypatch, 16 * 2**30)
    forbid(monkeypatch, "leanformer.cli.bench.time_sparse_ffn")
    assert main(["bench", "sparse-ffn", "--d-model", "1000000"]) == 2
    line = one_error_line(capsys)
    assert "1000000x2816" in line and "needs about" in line and "16.0 GiB of memory available" in line, line


def test_the_bench_estimate_covers_what_it_allocates():
    layers = synthetic_layers(64, 256, sparsity=0.5, count=3)
    allocated = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    allocated += sum(layer.down_proj.weight.nbytes for layer in layers)  # the neuron-major copy
    estimate = bench_cli.sparse_ffn_bytes(64, 256, 1, True, ("exact",), 3)
    assert allocated <= estimate < 1.1 * allocated
    assert bench_cli.sparse_ffn_bytes(64, 256, 1, True, ("exact", "predictor"), 3) > estimate


def _weights_of_the_default_model() -> int:
    return weight_bytes(lambda: model_entrypoint("swin_nano_patch2_window4_32")(in_chans=1, num_classes=10,
                                                                                  img_size=16))


def test_train_refuses_when_weights_grads_and_adamw_moments_cannot_fit(monkeypatch, tmp_path, capsys):
    weights = _weights_of_the_default_model()
    _machine_with(monkeypatch, int(2.5 * weights))  # the weights fit, their training state does not
    forbid(monkeypatch, "leanformer.train.loop.load_data")
    assert main([*TINY_TRAIN, "--output", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "weights, gradients and AdamW's two moments" in line and "GiB of memory available" in line, line


def test_train_refuses_an_absurd_model_before_loading_the_data(monkeypatch, tmp_path, capsys):
    forbid(monkeypatch, "leanformer.train.loop.load_data")
    assert main([*TINY_TRAIN, "--model-arg", "embed_dim=960000", "--output", str(tmp_path / "run")]) == 2
    assert "needs about" in one_error_line(capsys)


def test_train_within_memory_is_not_refused(monkeypatch):
    _machine_with(monkeypatch, 5 * _weights_of_the_default_model() + 2**30)
    train_cli.check_training_fits(train_cli.TrainConfig(img_size=16))  # no error


# -- smaller cases -----------------------------------------------------------------------------------------


def test_task_paths_may_contain_commas():
    assert finetune_cli.parse_tasks(["a=runs,v2/train.tsv::runs,v2/test.tsv,b=y.tsv", "c=z,1.tsv"]) == {
        "a": ("runs,v2/train.tsv", "runs,v2/test.tsv"), "b": ("y.tsv", None), "c": ("z,1.tsv", None)}
    args = build_parser().parse_args(["finetune", "--base", "b", "--tasks", "a=x.tsv", "--tasks", "b=y.tsv"])
    assert args.tasks == ["a=x.tsv", "b=y.tsv"]  # --tasks repeated adds tasks, it does not replace them


def test_finetune_reads_task_files_from_a_folder_with_a_comma(tiny_bert_dir, keyword_task_files, tmp_path, capsys):
    folder = tmp_path / "tasks,v2"
    folder.mkdir()
    specs = []
    for name, files in keyword_task_files.items():
        copies = [shutil.copy(path, folder / path.name) for path in files]
        specs.append(f"{name}={copies[0]}::{copies[1]}")
    assert main(["finetune", "--base", str(tiny_bert_dir), "--tasks", ",".join(specs), "--r", "4", "--active-r",
                 "2", "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--compute", "gather",
                 "--no-progress", "--json", "--out", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["tasks"]) == set(keyword_task_files)
    assert all(task["train"].startswith(str(folder)) for task in result["tasks"].values())


def test_profile_refuses_a_negative_depth(monkeypatch, tmp_path, capsys):
    forbid(monkeypatch, "leanformer.cli.profile.create_model")
    assert main(["profile", "--depth", "-1", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--depth=-1: expected 0" in one_error_line(capsys)


def test_forward_refuses_a_batch_larger_than_the_data(capsys):
    assert main(["forward", "--model", "swin_nano_patch2_window4_32", "--batch-size", "100000"]) == 2
    assert "--batch-size=100000: the digits' validation split has 359 images" in one_error_line(capsys)


@pytest.fixture
def short_context_dir(relu_dir, tmp_path) -> Path:
    """The ReLU LLaMA with a context of 20 positions."""
    folder = tmp_path / "short"
    shutil.copytree(relu_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20}))
    return folder


def test_generate_caps_new_tokens_at_the_context_and_says_so(short_context_dir, monkeypatch, capsys):
    monkeypatch.setenv("LEANFORMER_NATIVE", "0")
    prompt = "To be, or not"  # 13 bytes: 7 positions left
    assert main(["generate", "--model", str(short_context_dir), "--prompt", prompt, "--max-new-tokens", "64",
                 "--max-active", "1", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["max_new_tokens"] == 7 and result["prompt_tokens"] + result["new_tokens"] <= 20
    notice = captured.err.strip().splitlines()
    assert notice == ["leanformer generate: note: --max-new-tokens 64 capped at 7: the model's context holds 20 "
                      "tokens (max_position_embeddings) and the prompt takes 13"]


def test_generate_refuses_a_prompt_longer_than_the_context(short_context_dir, capsys):
    assert main(["generate", "--model", str(short_context_dir), "--prompt", "x" * 20, "--no-progress"]) == 2
    assert "--prompt encodes to 20 tokens, but the model's context holds 20" in one_error_line(capsys)
