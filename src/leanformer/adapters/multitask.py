"""Multi-task text classification with SMoRA or LoRA adapters on a frozen Hugging Face encoder.

SMoRA (Zhao et al. 2025) is a multi-task method: one adapter shared by many tasks, whose ranks the router
assigns per token. `finetune(base_dir, tasks, config)` trains it, or PEFT's LoRA as the peer, under the same
conditions, so two runs that differ only in ``config.adapter`` compare like for like:

- the same Linears are adapted (the ones `target_names` selects for the SMoRA config,
  handed to PEFT as an explicit list), and nothing else of the encoder trains;
- the same classifier: mean pooling over real tokens (as sentence-transformers pools all-MiniLM-L6-v2) and one
  Linear head per task, trained in full and saved with the adapter (``modules_to_save``);
- the same batches: each step is one task's batch, the task drawn with probability proportional to its training
  set size (examples-proportional mixing, as in T5) or uniformly, each task's examples visited in shuffled
  epochs, all drawn from one ``torch.Generator`` seeded by ``config.seed`` alone;
- the same optimiser: AdamW over the trainable parameters, linear warmup then cosine decay.

Test accuracy per task is measured every ``eval_every`` steps and at the end; with an output folder the run is
checkpointed then (adapter, heads, optimizer and RNG only: the frozen encoder is read again from ``base_dir``),
can be resumed exactly, and ends with the adapter in PEFT's layout plus ``metrics.json`` and ``labels.json``.

This module is the job on the training engine; its parts live beside it: `finetune_config` (the run's
configuration), `classifier` (the model and its adapters), `task_batches` (labels, tokenisation, batches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import write_files_atomic, write_json_atomic
from .._runfolder import claim_run_folder
from ..data.text import load_tokenizer
from ..engine import Callback, Checkpointing, LoopConfig, check_resume, fit, process_group
from .classifier import MultiTaskClassifier, activated_adapter_params, add_adapters
from .finetune_config import FinetuneConfig
from .model import routing_report, smora_layers
from .peft import load_adapter, save_adapter
from .task_batches import EncodedTask, Tasks, encode_task, task_batches, task_labels

__all__ = ["FinetuneResult", "RUN_OUTPUTS", "finetune", "load_finetuned", "task_loss"]


@dataclass
class FinetuneResult:
    """What a run reached.

    tasks: per task its train/test files and sizes, labels and final test accuracy. accuracy: final test
        accuracy per task; average_accuracy: their mean.
    trainable_params: adapters and heads. adapted_linears: the Linears that got an adapter.
    activated_params_per_token: see `activated_adapter_params`.
    seconds_per_step: median wall time of a training step (forward, backward, update) in this session, after its
        first few steps; None if no step ran. seconds: training time of this session (evaluations excluded).
    steps_per_task: steps each task got; data_order_sha256: a digest of every batch drawn (task and example
        indices), equal for runs that saw the same data in the same order.
    routing (SMoRA): from the last evaluation, ``train`` (the training steps since the evaluation before) and
        ``test`` (the test sets): mean and max MaxVio over layers, dead experts summed over layers, tokens.
    history: one entry per evaluation: step, lr, train_loss (mean since the previous one), accuracy per task,
        average_accuracy, and routing (SMoRA).
    """

    config: dict
    base: str
    tasks: dict[str, dict]
    accuracy: dict[str, float]
    average_accuracy: float
    trainable_params: int
    adapted_linears: list[str]
    activated_params_per_token: int
    steps: int
    start_step: int
    seconds: float
    seconds_per_step: float | None
    steps_per_task: dict[str, int]
    data_order_sha256: str
    routing: dict | None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _routing_summary(report: dict[str, dict]) -> dict:
    """One line of `routing_report`: MaxVio mean and max over the layers that routed tokens, dead experts."""
    violations = [layer["max_violation"] for layer in report.values() if layer["max_violation"] is not None]
    return {"mean_max_violation": statistics.fmean(violations) if violations else None,
            "max_max_violation": max(violations) if violations else None,
            "dead_experts": sum(layer["dead_experts"] or 0 for layer in report.values()),
            "layers": len(report), "tokens": max((layer["tokens"] for layer in report.values()), default=0)}


def _evaluate(model: nn.Module, tests: Mapping[str, EncodedTask], batch_size: int, device: torch.device,
              routing: bool) -> dict:
    """Test accuracy per task and on average; with ``routing`` (SMoRA) the routing of the training steps since the
    last evaluation and of the test sets, counters reset after each."""
    train_routing = _routing_summary(routing_report(model, reset=True)) if routing else None
    accuracy = _accuracy(model, tests, batch_size, device)
    entry = {"accuracy": accuracy, "average_accuracy": statistics.fmean(accuracy.values())}
    if routing:
        entry["routing"] = {"train": train_routing, "test": _routing_summary(routing_report(model, reset=True))}
    return entry


@torch.no_grad()
def _accuracy(model: nn.Module, tests: Mapping[str, EncodedTask], batch_size: int, device: torch.device) -> dict:
    model.eval()
    accuracy = {}
    for task, data in tests.items():
        correct = 0
        for start in range(0, len(data), batch_size):
            inputs, labels = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
            correct += int((model(**inputs, task=task).argmax(-1) == labels).sum())
        accuracy[task] = correct / len(data)
    model.train()
    return accuracy



RUN_OUTPUTS = ("checkpoint", "adapter", "metrics.json", "labels.json")


def finetune(base_dir: str | Path, tasks: Tasks, config: FinetuneConfig, out_dir: str | Path | None = None,
             resume: bool = False, progress: bool = True, device: str | torch.device | None = None,
             overwrite: bool = False) -> FinetuneResult:
    """Train one adapter (``config.adapter``) and a head per task on ``tasks`` over the encoder in ``base_dir``.

    tasks: name -> (train, test) `TaskData`; a task's classes are its training labels (`label_vocab`), and a
        test label outside them raises ValueError naming the file and line, before anything is loaded.
    out_dir: if given, checkpoints go to out_dir/checkpoint at every evaluation, and at the end the adapter to
        out_dir/adapter (PEFT layout: adapter_config.json + adapter_model.safetensors, heads included), the
        result to out_dir/metrics.json and each task's classes to out_dir/labels.json (see `load_finetuned`).
    resume: continue the run checkpointed in out_dir/checkpoint (same base, tasks and config), ending exactly as
        the uninterrupted run would. device: default CUDA if available, else CPU.
    overwrite: a new run may replace the run in out_dir (its checkpoint, adapter and metrics are deleted first);
        without it such a folder is refused. out_dir's lock is held while the run goes on (another process
        writing it is refused), and a non-finite training loss stops the run there (`NonFiniteLossError`), the
        last checkpoint kept as it was.
    """
    labels, summary = task_labels(tasks)
    out_dir = None if out_dir is None else Path(out_dir)
    checkpoint_dir = None if out_dir is None else out_dir / "checkpoint"
    check_resume(checkpoint_dir, resume, "out_dir")
    with process_group() as ctx, claim_run_folder(out_dir if ctx.is_main else None, RUN_OUTPUTS, resume=resume,
                                                  overwrite=overwrite):
        return _finetune(base_dir, tasks, config, out_dir if ctx.is_main else None, checkpoint_dir, resume,
                         progress and ctx.is_main, torch.device(device) if device else ctx.device, labels, summary)


def _finetune(base_dir: str | Path, tasks: Tasks, config: FinetuneConfig, out_dir: Path | None,
              checkpoint_dir: Path | None, resume: bool, progress: bool, device: torch.device,
              labels: dict, summary: dict) -> FinetuneResult:
    """`finetune` once the tasks are checked and its output folder (if any) is held by this process (under
    torchrun: ``out_dir`` is None but in the first process, which writes the outputs)."""
    base_dir = Path(base_dir)
    tokenizer = load_tokenizer(base_dir)
    if tokenizer is None or tokenizer.pad_token is None:
        raise ValueError(f"{base_dir}: expected a Hugging Face encoder folder with a tokenizer that pads "
                         "(tokenizer.json or tokenizer_config.json, and a pad token)")
    train_sets = {n: encode_task(tokenizer, tasks[n][0], labels[n][0], config.max_length) for n in tasks}
    test_sets = {n: encode_task(tokenizer, tasks[n][1], labels[n][1], config.max_length) for n in tasks}

    torch.manual_seed(config.seed)
    classifier = MultiTaskClassifier.from_pretrained(base_dir, {n: len(s["labels"]) for n, s in summary.items()})
    model, shapes = add_adapters(classifier.to(device), config)
    layers = smora_layers(model)
    identity = {**config.to_dict(), "base": str(base_dir), "tasks": summary}  # what must not change on resume
    batches = task_batches({n: len(s) for n, s in train_sets.items()}, config.batch_size, config.seed,
                           config.task_sampling)
    digest, steps_per_task = hashlib.sha256(), dict.fromkeys(tasks, 0)

    def drawn():  # every batch drawn, those a resumed run skips included, goes into the digest and the counts
        for task, index in batches:
            digest.update(task.encode() + b":" + index.numpy().tobytes())
            steps_per_task[task] += 1
            yield (task, *train_sets[task].batch(index, device))

    if layers:
        routing_report(model, reset=True)
    loop = LoopConfig(steps=config.steps, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup,
                      weight_decay=config.weight_decay, clip_grad=config.clip_grad, eval_every=config.eval_every,
                      desc=f"finetune {config.adapter}")
    checkpoint = None if checkpoint_dir is None else Checkpointing(
        checkpoint_dir, identity, trainable_only=True,
        extra=lambda: {"compute": {name: layer.compute for name, layer in layers.items()}})
    done = fit(model, drawn(), task_loss, loop,
               evaluate=lambda model: _evaluate(model, test_sets, config.batch_size, device, routing=bool(layers)),
               callbacks=[_ComputePaths(layers)], checkpoint=checkpoint, resume=resume, find_unused_parameters=True,
               progress=progress)

    last = done.history[-1]
    params = [p for p in model.parameters() if p.requires_grad]
    result = FinetuneResult(
        config=config.to_dict(), base=str(base_dir),
        tasks={name: {**task, "accuracy": last["accuracy"][name]} for name, task in summary.items()},
        accuracy=last["accuracy"],
        average_accuracy=last["average_accuracy"], trainable_params=sum(p.numel() for p in params),
        adapted_linears=list(shapes), activated_params_per_token=activated_adapter_params(shapes, config),
        steps=done.step, start_step=done.start_step, seconds=done.seconds, seconds_per_step=done.seconds_per_step,
        steps_per_task=steps_per_task, data_order_sha256=digest.hexdigest(), routing=last.get("routing"),
        history=done.history)
    if out_dir is not None:
        _save_outputs(model, result, out_dir)
    return result


def task_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Cross-entropy of one task's batch: (task, inputs, labels)."""
    task, inputs, labels = batch
    return F.cross_entropy(model(**inputs, task=task), labels)


class _ComputePaths(Callback):
    """A resumed SMoRA run computes on the paths "auto" chose when it started (equal outputs, not equal bits)."""

    def __init__(self, layers: dict):
        self.layers = layers

    def on_resume(self, meta: dict, model: nn.Module) -> None:
        if "compute" not in meta:
            raise ValueError("checkpoint: field 'compute' is missing (the adapter layers' compute paths)")
        for name, path in meta["compute"].items():
            self.layers[name].compute = path


def _save_outputs(model: nn.Module, result: FinetuneResult, out_dir: Path) -> None:
    """The adapter in PEFT's layout (heads included), metrics.json and labels.json."""
    adapter_dir = out_dir / "adapter"
    if smora_layers(model):
        save_adapter(model, adapter_dir, base_model_name_or_path=result.base)
    else:
        model.peft_config["default"].base_model_name_or_path = result.base  # PEFT finds no name on a plain module
        write_files_atomic(adapter_dir, model.save_pretrained)
    write_json_atomic(out_dir / "labels.json", {name: task["labels"] for name, task in result.tasks.items()})
    write_json_atomic(out_dir / "metrics.json", result.to_dict())


def load_finetuned(out_dir: str | Path, base_dir: str | Path) -> tuple[nn.Module, dict[str, list[str]]]:
    """(model in eval mode, classes per task) of a `finetune` output folder over the encoder in ``base_dir``:
    call ``model(input_ids=..., attention_mask=..., task=name)``; logit i is ``classes[name][i]``."""
    out_dir = Path(out_dir)
    labels_path, config_path = out_dir / "labels.json", out_dir / "adapter" / "adapter_config.json"
    for path in (labels_path, config_path):
        if not path.is_file():
            raise ValueError(f"{out_dir}: not a finetune output folder ({path} is missing)")
    labels = json.loads(labels_path.read_text())
    classifier = MultiTaskClassifier.from_pretrained(base_dir, {task: len(names) for task, names in labels.items()})
    if json.loads(config_path.read_text()).get("peft_type") == "LORA":
        import peft

        model = peft.PeftModel.from_pretrained(classifier, str(config_path.parent))
    else:
        model = load_adapter(classifier, config_path.parent)
    return model.eval(), labels
