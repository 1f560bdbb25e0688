"""SMoRA adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``, plus the router
(``...lora_router.weight``) and the balance bias (``...lora_biases``) named as the official SMoRA code names them,
and ``modules_to_save`` weights under their own names, as PEFT saves them. Adapters written by the official code
(peft_type SRMOLE) load too.

Why ``peft.get_peft_model(model, SMoRAConfig(...))`` is not offered: PEFT's ``register_peft_method`` accepts only
names already in its closed ``PeftType`` enum, so an outside package could register SMoRA only by patching PEFT,
which leanformer does not do. `add_smora` / `save_adapter` / `load_adapter` give the same workflow and files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .._io import atomic_write, write_json_atomic
from .._loading import read_safetensors
from .._targets import selects
from .config import PEFT_TYPE, SMoRAConfig
from .layer import feature_sizes
from .model import add_smora, smora_layers, target_names

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
_PREFIX = "base_model.model."
_ADAPTER_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_router.weight", "lora_biases")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `save_adapter` writes, by PEFT key: each adapter's tensors and the ``modules_to_save`` weights."""
    layers = smora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SMoRA adapters (call add_smora or load_adapter first)")
    config = next(iter(layers.values())).config
    state = {}
    for name, layer in layers.items():
        own = layer.state_dict()
        for key in _ADAPTER_TENSORS:
            state[f"{_PREFIX}{name}.{key}"] = own[key]
    for name, module in model.named_modules():
        if name and selects(config.modules_to_save, name):
            for key, tensor in module.state_dict().items():
                state[f"{_PREFIX}{name}.{key}"] = tensor
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's SMoRA adapter (and ``modules_to_save``) to ``directory`` in PEFT's layout; returns it."""
    directory = Path(directory)
    state = adapter_state_dict(model)
    config = next(iter(smora_layers(model).values())).config
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json_atomic(directory / CONFIG_NAME, config.to_peft_dict(base_model_name_or_path))
    readme = _readme(config, base_model_name_or_path, len(smora_layers(model)))
    atomic_write(directory / README_NAME, lambda tmp: Path(tmp).write_text(readme))
    return directory


def _readme(config: SMoRAConfig, base_model_name_or_path: str | None, layers: int) -> str:
    """What a person (or PEFT's user) who finds the folder needs: what it is and how to load it. PEFT writes a
    README.md into its adapter folders too; PEFT itself cannot load this one."""
    base = f"`{base_model_name_or_path}`" if base_model_name_or_path else "the base model it was trained on"
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    return f"""# SMoRA adapter (leanformer)

A rank-wise mixture-of-experts LoRA (SMoRA, Zhao et al. 2025) on {layers} layers of {base}, written by
leanformer in PEFT's file layout: `{CONFIG_NAME}` (peft_type `{PEFT_TYPE}`) and `{WEIGHTS_NAME}`.

PEFT cannot load it (`PeftModel.from_pretrained` fails with `KeyError: '{PEFT_TYPE}'`: PEFT has no SMoRA type).
Load it with leanformer into the same base model:

```python
import leanformer

model = ...  # {base}, built or loaded as for training
leanformer.load_adapter(model, "path/to/this/folder")
```

Settings: r={config.r}, active_r={config.active_r}, lora_alpha={config.lora_alpha}, target_modules={targets},
modules_to_save={", ".join(config.modules_to_save) or "none"}, gate_scores={config.gate_scores}.
"""


def read_adapter_config(directory: str | Path) -> SMoRAConfig:
    """The `SMoRAConfig` of a saved adapter (ours or the official code's); bad files raise ValueError."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} does not exist: not an adapter directory")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return SMoRAConfig.from_peft_dict(values, str(path))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a saved SMoRA adapter into ``model``: adds the adapters first if the model has none (a fresh base
    model), then copies every tensor in. Nothing is unpickled; a missing or unexpected tensor or a wrong shape
    raises ValueError naming the file and key, before the model is changed."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors, _ = read_safetensors(directory / WEIGHTS_NAME)
    fresh = not smora_layers(model)
    if fresh:
        expected = _expected_shapes(model, config)
    else:
        expected = {key: tuple(tensor.shape) for key, tensor in adapter_state_dict(model).items()}
    path = directory / WEIGHTS_NAME
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, this model needs {shape}")
    if fresh:
        add_smora(model, config)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, tensor in tensors.items():
            module_name, _, attr = key.removeprefix(_PREFIX).rpartition(".")
            getattr(modules[module_name], attr).copy_(tensor)
    return model


def _expected_shapes(model: nn.Module, config: SMoRAConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes an adapter for ``model`` has, computed without changing the model."""
    modules = dict(model.named_modules())
    shapes = {}
    for name in target_names(model, config):
        in_features, out_features = feature_sizes(modules[name])
        shapes.update({f"{_PREFIX}{name}.lora_A.weight": (config.r, in_features),
                       f"{_PREFIX}{name}.lora_B.weight": (out_features, config.r),
                       f"{_PREFIX}{name}.lora_router.weight": (config.experts, in_features),
                       f"{_PREFIX}{name}.lora_biases": (config.experts,)})
    for name, module in modules.items():
        if name and selects(config.modules_to_save, name):
            shapes.update({f"{_PREFIX}{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return shapes
