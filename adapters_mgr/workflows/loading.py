"""A PeftModel with a catalog adapter active, on the shared base (for people who call peft themselves)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from adapters_mgr.catalog.records import Ref
from adapters_mgr.errors import Conflict
from adapters_mgr.lora.base_model import head_for
from adapters_mgr.lora.quiet import known_warnings_silenced
from adapters_mgr.store import CONFIG_FILE, WEIGHTS_FILE, read_safetensors_header
from adapters_mgr.workflows.workspace import Workspace

if TYPE_CHECKING:
    from torch import nn


@known_warnings_silenced()  # PeftModel.from_pretrained trips a transformers deprecation (lora/quiet.py)
def load(ws: Workspace, ref: Ref, *, base_model: nn.Module | None = None, force: bool = False) -> Any:
    """Adapters of one base share one PeftModel: loading another adds it by name (peft ``load_adapter``
    + ``set_adapter``), so the base is never copied. ``base_model``: attach to your own model instead
    (its weight hash is checked)."""
    from peft import PeftModel  # heavy (torch): only when a model is really loaded

    node = ws.get(ref)
    if node.status == "deleted":
        raise Conflict(f"adapter {node.id} is deleted; `adapters-mgr restore {node.id}` first")
    folder = ws.verified_folder(node)
    base_row = ws.base(node.base_id)
    shapes = read_safetensors_header(folder / WEIGHTS_FILE)
    head = head_for(json.loads((folder / CONFIG_FILE).read_text()), shapes)
    adapter_name = f"a{node.id}"
    if base_model is not None:
        ws.check_base_hash(base_model, base_row, force=force, context="the given base_model")
        return PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter_name)
    key = (base_row["id"], head.key)
    peft_model = ws.peft_models.get(key)
    if peft_model is None:
        model = ws.base_model(base_row["id"], head, force=force)
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
        ws.peft_models[key] = peft_model
    elif adapter_name not in peft_model.peft_config:
        peft_model.load_adapter(str(folder), adapter_name=adapter_name)
    peft_model.set_adapter(adapter_name)
    peft_model.eval()
    return peft_model
