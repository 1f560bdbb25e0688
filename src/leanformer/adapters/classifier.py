"""The multi-task classifier `finetune` trains: a frozen encoder, mean pooling over real tokens, one head per
task, and SMoRA or PEFT's LoRA added on the same Linears (`add_adapters`)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .._loading import hf_from_pretrained
from .finetune_config import FinetuneConfig
from .model import add_smora, target_names

__all__ = ["MultiTaskClassifier", "activated_adapter_params", "add_adapters", "check_task_name", "mean_pool"]

_TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


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
