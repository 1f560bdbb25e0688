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
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import config_from_dict, is_int
from .._io import write_files_atomic, write_json_atomic
from .._loading import hf_from_pretrained
from .._runfolder import claim_run_folder
from ..data.tasks import TaskData, encode_labels, label_vocab
from ..data.text import load_tokenizer
from ..engine import Callback, Checkpointing, LoopConfig, check_resume, fit, process_group
from ..engine.optim import check_optimizer_settings
from .config import SMoRAConfig
from .model import add_smora, routing_report, smora_layers, target_names
from .peft import load_adapter, save_adapter

__all__ = ["ADAPTERS", "TASK_SAMPLING", "FinetuneConfig", "FinetuneResult", "MultiTaskClassifier",
           "activated_adapter_params", "add_adapters", "check_task_name", "finetune", "load_finetuned", "mean_pool",
           "task_batches", "task_loss"]

ADAPTERS = ("smora", "lora")
TASK_SAMPLING = ("proportional", "uniform")
WARMUP_FRACTION = 0.1  # default warmup: the SMoRA paper's warmup ratio
_TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

Tasks = Mapping[str, tuple[TaskData, TaskData]]


@dataclass(frozen=True)
class FinetuneConfig:
    """A multi-task fine-tuning run. Saved with every checkpoint, so a resumed run is checked to be the same run.

    adapter: "smora" or "lora" (PEFT's). r, lora_alpha, lora_dropout: both adapters; active_r, rank_partition,
        bias_update_rate, gate_scores, compute: SMoRA only (see `SMoRAConfig`, which validates them; a LoRA run
        records but does not use them).
    target_modules: the Linears to adapt, for both adapters: "all-linear", a regex matching a full module name,
        or a tuple of names (each a full name or its last components).
    steps, batch_size: optimiser steps, each on one task's batch of batch_size examples. max_length: tokens per
        example (longer ones are truncated; batches are padded to their longest example).
    lr, min_lr, warmup_steps, weight_decay, clip_grad: AdamW, linear warmup (None: a tenth of steps) then cosine
        decay to min_lr; norms of the trainable gradients clipped to clip_grad (None: no clipping).
    eval_every: measure test accuracy (and checkpoint) every this many steps, and after the last one.
    task_sampling: "proportional" (a task's share of steps is its share of the training examples) or "uniform".
    seed: the heads' and adapters' initialisation, dropout, and the batches.
    """

    adapter: str = "smora"
    r: int = 64
    active_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    rank_partition: int = 1
    bias_update_rate: float = 1e-3
    gate_scores: str = "unbiased"
    compute: str = "auto"
    target_modules: str | tuple[str, ...] = "all-linear"
    steps: int = 1000
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0
    eval_every: int = 200
    task_sampling: str = "proportional"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter={self.adapter!r}: expected one of {', '.join(ADAPTERS)}")
        if self.task_sampling not in TASK_SAMPLING:
            raise ValueError(f"task_sampling={self.task_sampling!r}: expected one of {', '.join(TASK_SAMPLING)}")
        for name in ("steps", "batch_size", "max_length", "eval_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.warmup_steps is not None and (not is_int(self.warmup_steps)
                                              or not 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: expected an integer in [0, steps={self.steps}] or "
                             f"None (a tenth of steps)")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        check_optimizer_settings(self.lr, self.min_lr, self.weight_decay, self.clip_grad)
        # the adapter fields are SMoRAConfig's: it validates them, and its normalised target_modules is kept
        object.__setattr__(self, "target_modules", self.smora_config().target_modules)

    def smora_config(self, modules_to_save: tuple[str, ...] = ()) -> SMoRAConfig:
        """The `SMoRAConfig` of this run (for "lora" too: its target_modules selects the Linears both adapt)."""
        return SMoRAConfig(r=self.r, active_r=self.active_r, lora_alpha=self.lora_alpha,
                           lora_dropout=self.lora_dropout, target_modules=self.target_modules,
                           rank_partition=self.rank_partition, bias_update_rate=self.bias_update_rate,
                           gate_scores=self.gate_scores, compute=self.compute, modules_to_save=modules_to_save)

    @property
    def warmup(self) -> int:
        """Warmup steps in effect: ``warmup_steps``, or a tenth of ``steps``."""
        return round(WARMUP_FRACTION * self.steps) if self.warmup_steps is None else self.warmup_steps

    def to_dict(self) -> dict:
        """JSON-able fields (target_modules as a list, as JSON gives it back)."""
        values = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            values["target_modules"] = list(self.target_modules)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        return config_from_dict(cls, values, "finetune")


def check_task_name(name: str) -> str:
    """A task name is a head's key in `MultiTaskClassifier.heads` and a module name in adapter files."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"task name {name!r}: expected letters, digits, '_' or '-', starting with a letter "
                         "(and not an nn.ModuleDict attribute such as 'keys')")
    return name


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of real tokens (B, L, H) -> (B, H), padding left out: sentence-transformers'
    pooling, the one all-MiniLM-L6-v2 was trained with."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class MultiTaskClassifier(nn.Module):
    """A text encoder, mean pooling over real tokens, and one Linear head per task on the pooled vector.

    The heads are ``heads.<task>`` in a ModuleDict: PEFT's ModulesToSaveWrapper refuses a ModuleDict, so
    `head_names` lists each head Linear for ``modules_to_save`` (which works for PEFT and for `add_smora`).
    """

    def __init__(self, backbone: nn.Module, num_labels: Mapping[str, int], hidden_size: int):
        super().__init__()
        if not num_labels:
            raise ValueError("num_labels is empty: expected at least one task")
        self.backbone = backbone
        self.heads = nn.ModuleDict({check_task_name(task): nn.Linear(hidden_size, n) for task, n in num_labels.items()})

    @classmethod
    def from_pretrained(cls, base_dir: str | Path, num_labels: Mapping[str, int]) -> MultiTaskClassifier:
        """The encoder of a local Hugging Face folder (nothing is downloaded) with fresh heads."""
        from transformers import AutoModel  # imported here: transformers is slow to import

        backbone = hf_from_pretrained(AutoModel, base_dir)  # a damaged or hostile file: one line naming it
        if getattr(backbone, "pooler", None) is not None and _accepts(type(backbone), "add_pooling_layer"):
            # mean pooling does not use BERT's pooler; without it no adapter is put on a Linear that never trains
            # (None is what the class itself sets for add_pooling_layer=False)
            backbone.pooler = None
        return cls(backbone, num_labels, backbone.config.hidden_size)

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(f"heads.{task}" for task in self.heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, labels of ``task``)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.heads[task](mean_pool(hidden, attention_mask))


def _accepts(cls: type, argument: str) -> bool:
    return argument in inspect.signature(cls.__init__).parameters


def add_adapters(classifier: MultiTaskClassifier, config: FinetuneConfig) -> tuple[nn.Module, dict]:
    """(model to train, {adapted Linear: (in_features, out_features)}): the classifier with SMoRA added in place,
    or wrapped by PEFT's LoRA on the same Linears; only the adapters and the heads train."""
    smora = config.smora_config(classifier.head_names)
    names = target_names(classifier, smora)
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matches no nn.Linear of the encoder")
    shapes = {n: (classifier.get_submodule(n).in_features, classifier.get_submodule(n).out_features) for n in names}
    if config.adapter == "smora":
        return add_smora(classifier, smora), shapes
    import peft  # imported here: optional, and slow to import

    lora = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=names, modules_to_save=list(classifier.head_names))
    return peft.get_peft_model(classifier, lora), shapes


def activated_adapter_params(shapes: Mapping[str, tuple[int, int]], config: FinetuneConfig) -> int:
    """Adapter parameters one token uses: LoRA r * (in + out) per Linear; SMoRA active_r * (in + out) for the
    ranks it routes to, plus its router, in * experts."""
    if config.adapter == "lora":
        return sum(config.r * (i + o) for i, o in shapes.values())
    experts = config.smora_config().experts
    return sum(config.active_r * (i + o) + i * experts for i, o in shapes.values())


def task_batches(sizes: Mapping[str, int], batch_size: int, seed: int,
                 sampling: str = "proportional") -> Iterator[tuple[str, torch.Tensor]]:
    """Endless (task, example indices) batches: the task drawn by ``sampling``, each task's examples visited in
    shuffled epochs (a batch never straddles two; a task smaller than batch_size gives all it has).

    Everything comes from one generator seeded by ``seed``: the same sizes and seed give the same batches,
    whatever model trains on them, and a resumed run can skip the batches already used.
    """
    if sampling not in TASK_SAMPLING:
        raise ValueError(f"sampling={sampling!r}: expected one of {', '.join(TASK_SAMPLING)}")
    if not sizes or any(n < 1 for n in sizes.values()):
        raise ValueError(f"sizes={dict(sizes)}: expected at least one task, each with examples")
    return _batches(dict(sizes), batch_size, torch.Generator().manual_seed(seed), sampling)


def _batches(sizes: dict[str, int], batch_size: int, gen: torch.Generator,
             sampling: str) -> Iterator[tuple[str, torch.Tensor]]:
    names = list(sizes)
    weights = torch.tensor([float(sizes[n]) if sampling == "proportional" else 1.0 for n in names],
                           dtype=torch.float64)
    order = {n: torch.zeros(0, dtype=torch.long) for n in names}
    cursor = dict.fromkeys(names, 0)
    while True:
        task = names[int(torch.multinomial(weights, 1, generator=gen))]
        take = min(batch_size, sizes[task])
        if cursor[task] + take > len(order[task]):
            order[task], cursor[task] = torch.randperm(sizes[task], generator=gen), 0
        yield task, order[task][cursor[task]:cursor[task] + take]
        cursor[task] += take


@dataclass(frozen=True)
class _Encoded:
    """One task split tokenised once, padded to max_length; batches are cut to their longest example."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        mask = self.inputs["attention_mask"][index]
        keep = mask.any(0)  # columns some example of the batch uses (padding on either side)
        inputs = {k: v[index][:, keep].to(device) for k, v in self.inputs.items()}
        return inputs, self.labels[index].to(device)


def _encode(tokenizer, data: TaskData, labels: torch.Tensor, max_length: int) -> _Encoded:
    encoded = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return _Encoded({k: encoded[k] for k in keys}, labels)


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


def _evaluate(model: nn.Module, tests: Mapping[str, _Encoded], batch_size: int, device: torch.device,
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
def _accuracy(model: nn.Module, tests: Mapping[str, _Encoded], batch_size: int, device: torch.device) -> dict:
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


def _task_labels(tasks: Tasks) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict]]:
    """(train and test label ids, description) per task; bad names, single-class tasks and test labels unseen in
    training are refused here, before anything is loaded."""
    if not tasks:
        raise ValueError("tasks is empty: expected at least one (train, test) pair")
    labels, summary = {}, {}
    for name, (train, test) in tasks.items():
        check_task_name(name)
        vocab = label_vocab(train)
        if len(vocab) < 2:
            raise ValueError(f"{train.path}: task {name!r} has one label ({vocab[0]!r}); expected at least 2")
        labels[name] = (encode_labels(train, vocab), encode_labels(test, vocab))
        summary[name] = {"train": train.path, "train_examples": len(train), "test": test.path,
                         "test_examples": len(test), "labels": vocab}
    return labels, summary


# what a run leaves in its output folder: a new run refuses a folder holding any of them (unless overwrite)
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
    labels, summary = _task_labels(tasks)
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
    train_sets = {n: _encode(tokenizer, tasks[n][0], labels[n][0], config.max_length) for n in tasks}
    test_sets = {n: _encode(tokenizer, tasks[n][1], labels[n][1], config.max_length) for n in tasks}

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
