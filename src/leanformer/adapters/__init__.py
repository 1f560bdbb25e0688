"""Rank-wise mixture-of-experts LoRA adapters (SMoRA), in PEFT's file format.

    model = add_smora(model, SMoRAConfig(r=64, active_r=8, target_modules="all-linear"))
    ... train ...
    save_adapter(model, "adapter/")            # adapter_config.json + adapter_model.safetensors
    load_adapter(fresh_base_model, "adapter/")
    remove_smora(model)                        # the base model again

`finetune(base_dir, tasks, FinetuneConfig(...))` is the multi-task text-classification job `leanformer finetune`
runs: SMoRA or PEFT's LoRA on a frozen encoder, on the training engine.
"""

from .classifier import MultiTaskClassifier, check_task_name
from .config import SMoRAConfig
from .finetune_config import FinetuneConfig
from .layer import SMoRALinear
from .model import add_smora, disable_adapters, remove_smora, routing_report, smora_layers
from .multitask import RUN_OUTPUTS as FINETUNE_OUTPUTS
from .multitask import FinetuneResult, finetune, load_finetuned
from .peft import adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "FINETUNE_OUTPUTS",
    "FinetuneConfig",
    "FinetuneResult",
    "MultiTaskClassifier",
    "SMoRAConfig",
    "SMoRALinear",
    "adapter_state_dict",
    "add_smora",
    "check_task_name",
    "disable_adapters",
    "finetune",
    "load_adapter",
    "load_finetuned",
    "read_adapter_config",
    "remove_smora",
    "routing_report",
    "save_adapter",
    "smora_layers",
]
