"""LoRA hyper-parameters as one validated value, turned into a peft ``LoraConfig`` per task.

Why a dataclass of our own instead of passing ``LoraConfig`` around: the catalog records these few
fields (and only these) for every adapter, the CLI exposes them, and validation must happen before
any model is loaded so a bad rank fails in milliseconds with a message that names the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters_mgr.errors import InvalidInput

#: peft task type per recipe: SEQ_CLS makes peft put the classification head in ``modules_to_save``
#: (so the ranker's head is trained and saved with the adapter); FEATURE_EXTRACTION wraps a bare encoder.
PEFT_TASK_TYPES = {"ranker": "SEQ_CLS", "retriever": "FEATURE_EXTRACTION"}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape and regularisation.

    Example:
        >>> LoraSettings(r=8).to_peft_config("ranker").task_type
        'SEQ_CLS'
    """

    r: int = 8
    """Rank of the update matrices; the adapter has r * (d_in + d_out) parameters per target layer."""
    alpha: float = 16.0
    """Scaling numerator: the delta is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input during training."""
    target_modules: tuple[str, ...] = field(default=("query", "value"))
    """Names of the Linear layers that get a LoRA branch (BERT attention query/value by default)."""
    layers: tuple[int, ...] | None = None
    """Encoder layer indices that get them (peft ``layers_to_transform``); None: every layer. The top
    layers alone train faster (the backward pass stops there) at little cost in quality."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise InvalidInput(f"LoRA layers must be non-negative layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise InvalidInput(f"LoRA rank r must be a positive integer, got {self.r!r}; try r=8")
        if not self.alpha > 0:
            raise InvalidInput(f"LoRA alpha must be positive, got {self.alpha!r}; try alpha=2*r")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInput(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise InvalidInput(
                f"target_modules must be a non-empty list of layer names, got {self.target_modules!r};"
                " for BERT use ['query', 'value']"
            )

    def to_peft_config(self, task: str, task_type: str | None = None) -> Any:
        """A fresh ``peft.LoraConfig`` for ``task`` ('ranker' or 'retriever'); ``task_type``
        overrides the task's usual peft type (a two-tower ranker is a FEATURE_EXTRACTION folder)."""
        from peft import LoraConfig

        if task not in PEFT_TASK_TYPES:
            raise InvalidInput(f"unknown task {task!r}; choose one of {sorted(PEFT_TASK_TYPES)}")
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=list(self.layers) if self.layers is not None else None,
            task_type=task_type or PEFT_TASK_TYPES[task],
            bias="none",
        )

    @staticmethod
    def top(n: int | None, num_layers: int) -> tuple[int, ...] | None:
        """The indices of the top ``n`` of ``num_layers`` encoder layers (None: every layer)."""
        if n is None:
            return None
        if n < 1:
            raise InvalidInput(f"top_layers must be >= 1, got {n!r}")
        if n > num_layers:
            raise InvalidInput(f"top_layers {n} is more than the base's {num_layers} encoder layers")
        return None if n == num_layers else tuple(range(num_layers - n, num_layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the catalog."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_peft_config(cls, config: Any) -> LoraSettings:
        """Read the shape back from a loaded ``LoraConfig`` (e.g. a parent adapter's)."""
        targets: Sequence[str] | str = config.target_modules
        layers = getattr(config, "layers_to_transform", None)
        return cls(
            layers=layers if isinstance(layers, int) or layers else None,  # an int or a list: normalised on init
            r=int(config.r),
            alpha=float(config.lora_alpha),
            dropout=float(config.lora_dropout),
            target_modules=tuple(sorted(targets)) if not isinstance(targets, str) else (targets,),
        )

    def same_shape(self, other: LoraSettings) -> bool:
        """Rank, alpha and targets equal (dropout does not change the saved tensors' meaning)."""
        return (
            self.r == other.r
            and float(self.alpha) == float(other.alpha)
            and self.same_placement(other)
        )

    def same_placement(self, other: LoraSettings) -> bool:
        """The same modules on the same layers: what folding adapters together needs (ranks may differ)."""
        return sorted(self.target_modules) == sorted(other.target_modules) and self.layers == other.layers


__all__ = ["PEFT_TASK_TYPES", "LoraSettings"]
