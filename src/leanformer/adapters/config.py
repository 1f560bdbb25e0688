"""`SMoRAConfig`: what `add_smora` adds, validated when it is built, and its PEFT ``adapter_config.json`` form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._checks import is_int, is_real
from .._targets import check_targets

__all__ = ["ALL_LINEAR", "COMPUTE_PATHS", "GATE_SCORES", "PEFT_TYPE", "SMoRAConfig"]

ALL_LINEAR = "all-linear"
GATE_SCORES = ("unbiased", "biased")
COMPUTE_PATHS = ("auto", "gather", "dense")
PEFT_TYPE = "SMORA"
_OFFICIAL_PEFT_TYPE = "SRMOLE"  # StyxXuan/smora's fork of PEFT names the method SRMoLE


@dataclass(frozen=True)
class SMoRAConfig:
    """A rank-wise mixture-of-experts LoRA (SMoRA, Zhao et al. 2025) on the targeted Linear layers.

    r: ranks of each adapter (its A is r x in, its B out x r). active_r: ranks used per token (k).
    lora_alpha: the output is scaled by lora_alpha / active_r, as LoRA scales by lora_alpha / r.
    lora_dropout: dropout on the adapter's (and router's) input.
    target_modules: "all-linear" (every nn.Linear and transformers ``Conv1D`` but the output layer and
        ``modules_to_save``), a regex that must match a module's full name, or a tuple of names, each matching a
        full name or its last components. Named targets may also be 1x1 ``nn.Conv2d`` (ConvNeXt-style FFNs).
    rank_partition: ranks per expert. 1 is SMoRA (every rank an expert); r/E makes E experts of that many ranks
        each (MoLoRA / LoRA-MoE with top-(active_r / rank_partition) routing); active_r must be a multiple of it.
    bias_update_rate: u of the loss-free balancing rule (DeepSeek-V3): after every training forward each expert's
        balance bias moves by u * sign(mean load - its load). 1e-3 is DeepSeek's best; the official code uses 1e-5;
        0 switches balancing off.
    gate_scores: "unbiased" (DeepSeek: the balance bias only selects, gates come from the sigmoid scores) or
        "biased" (the official code: gates from scores + bias).
    compute: "gather" (only the active ranks of B), "dense" (all ranks, inactive ones gated to 0), or "auto":
        whichever `add_smora` measures faster for each layer shape on this machine. Equal outputs and gradients.
    modules_to_save: modules (names as in target_modules) trained in full and saved with the adapter, e.g. a
        classification head.
    """

    r: int = 64
    active_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    rank_partition: int = 1
    bias_update_rate: float = 1e-3
    gate_scores: str = "unbiased"
    compute: str = "auto"
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("r", "active_r", "rank_partition"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.active_r > self.r:
            raise ValueError(f"active_r={self.active_r}: expected at most r={self.r}")
        if self.r % self.rank_partition or self.active_r % self.rank_partition:
            raise ValueError(f"rank_partition={self.rank_partition}: expected a divisor of r={self.r} and of "
                             f"active_r={self.active_r} (experts are blocks of rank_partition ranks)")
        if not is_real(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: expected a positive number")
        if not is_real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: expected a number in [0, 1)")
        if not is_real(self.bias_update_rate) or not math.isfinite(self.bias_update_rate) or self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate!r}: expected a finite number >= 0")
        if self.gate_scores not in GATE_SCORES:
            raise ValueError(f"gate_scores={self.gate_scores!r}: expected one of {', '.join(GATE_SCORES)}")
        if self.compute not in COMPUTE_PATHS:
            raise ValueError(f"compute={self.compute!r}: expected one of {', '.join(COMPUTE_PATHS)}")
        object.__setattr__(self, "target_modules", _names(self.target_modules, "target_modules", allow_pattern=True))
        object.__setattr__(self, "modules_to_save", _names(self.modules_to_save, "modules_to_save"))
        if not self.target_modules:
            raise ValueError("target_modules=(): expected at least one module name, a regex, or 'all-linear'")

    @property
    def experts(self) -> int:
        """Experts per adapter: r / rank_partition (r for SMoRA, where every rank is one)."""
        return self.r // self.rank_partition

    @property
    def active_experts(self) -> int:
        return self.active_r // self.rank_partition

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.active_r

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` payload: our fields plus the keys PEFT's LoRA configs carry."""
        fields = dataclasses.asdict(self)
        fields["target_modules"] = (self.target_modules if isinstance(self.target_modules, str)
                                    else list(self.target_modules))
        fields["modules_to_save"] = list(self.modules_to_save) or None
        return {"peft_type": PEFT_TYPE, "base_model_name_or_path": base_model_name_or_path, "task_type": None,
                "inference_mode": True, "bias": "none", "fan_in_fan_out": False, **fields}

    @classmethod
    def from_peft_dict(cls, values: dict, source: str = "adapter_config.json") -> SMoRAConfig:
        """Read our ``adapter_config.json`` or the official code's (peft_type SRMOLE, ``activate_r``; it balanced
        with u = 1e-5 and gated with biased scores, so those are its defaults here)."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        peft_type = values.get("peft_type")
        if peft_type not in (PEFT_TYPE, _OFFICIAL_PEFT_TYPE):
            raise ValueError(f"{source}: peft_type={peft_type!r} is not a SMoRA adapter (expected {PEFT_TYPE!r} "
                             f"or the official code's {_OFFICIAL_PEFT_TYPE!r}); load LoRA adapters with PEFT")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in values.items() if k in known}
        if peft_type == _OFFICIAL_PEFT_TYPE:
            fields.setdefault("active_r", values.get("activate_r", 8))
            fields.setdefault("bias_update_rate", 1e-5)
            fields.setdefault("gate_scores", "biased")
        if fields.get("modules_to_save") is None:
            fields["modules_to_save"] = ()
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err


def _names(value, field: str, allow_pattern: bool = False) -> str | tuple[str, ...]:
    """A tuple of module names (a list or set is accepted), or, for target_modules, one string: a regex or
    'all-linear' (`leanformer._targets`, the selection language of every config)."""
    if isinstance(value, str) and not allow_pattern:
        value = (value,)
    if value is None:
        raise ValueError(f"{field}=None: expected module names (strings)" + (", a regex or 'all-linear'"
                                                                              if allow_pattern else ""))
    return check_targets(field, value, (ALL_LINEAR,) if allow_pattern else ())
