"""Rank-wise mixture-of-experts LoRA adapters (SMoRA), in PEFT's file format.

    model = add_smora(model, SMoRAConfig(r=64, active_r=8, target_modules="all-linear"))
    ... train ...
    save_adapter(model, "adapter/")            # adapter_config.json + adapter_model.safetensors
    load_adapter(fresh_base_model, "adapter/")
"""

from .config import SMoRAConfig
from .layer import SMoRALinear
from .model import add_smora, disable_adapters, routing_report, smora_layers
from .peft import adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = ["SMoRAConfig", "SMoRALinear", "adapter_state_dict", "add_smora", "disable_adapters", "load_adapter",
           "read_adapter_config", "routing_report", "save_adapter", "smora_layers"]
