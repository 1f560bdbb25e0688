"""The data side of multi-task fine-tuning: task labels checked, texts tokenised once, and the endless,
seeded stream of one-task batches (`task_batches`) every arm of a comparison draws alike."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..data.tasks import TaskData, encode_labels, label_vocab
from .classifier import check_task_name
from .finetune_config import TASK_SAMPLING

__all__ = ["EncodedTask", "Tasks", "encode_task", "task_batches", "task_labels"]

Tasks = Mapping[str, tuple[TaskData, TaskData]]


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
class EncodedTask:
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


def encode_task(tokenizer, data: TaskData, labels: torch.Tensor, max_length: int) -> EncodedTask:
    encoded = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return EncodedTask({k: encoded[k] for k in keys}, labels)



def task_labels(tasks: Tasks) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict]]:
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
