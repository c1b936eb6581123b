"""Merge LoRA adapters into one adapter, or fold them into a full transformers checkpoint.

Methods (``merge_adapters(..., method=)``), each realised by peft's ``add_weighted_adapter``:

- ``cat``: exact. The merged adapter's A and B are the sources' factors concatenated (rank = sum of
  ranks, scaling 1), so ``B A = sum_i w_i * (alpha_i / r_i) * B_i A_i`` and its outputs equal the
  ``weights``-mode stack of the same adapters and weights.
- ``svd``: the summed delta ``sum_i w_i dW_i`` truncated to ``target_rank`` by SVD (default: the
  largest source rank, peft's default). At full rank (>= the sum of ranks) it equals ``cat``.
- ``linear``: peft's factor-space weighted sum (A's and B's summed separately with sqrt weights).
  Cheap and rank-preserving but NOT the sum of deltas (cross terms), hence lossy; equal ranks only.
- ``ties``, ``dare_linear``, ``dare_ties``: peft's TIES / DARE on the factors (equal ranks, no
  ``target_rank``); with a ``target_rank`` or unequal ranks, the delta-space variants
  (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``: TIES/DARE on full ``dW_i``, then SVD).
  ``density`` (default 0.5) is the kept fraction; DARE's random drop is seeded by ``seed``.

Heads (ranker): peft refuses ``add_weighted_adapter`` when several adapters carry a
``modules_to_save`` copy of the same module (the classifier). We therefore merge the LoRA layers
only and give the merged adapter the **newest (last) source's head**, the documented rule that
makes ``cat`` equal the ``weights`` stack (see ``adapters_mgr.lora.peft_scoring``).

Reading and checking adapters (``LoraTensors``, ``read_lora``, ``check_compatible``...) and the
stacked deltas shared with the serving engine live in ``adapters_mgr.lora.tensors``.

peft records nothing about a merge, so ``MergeResult.recipe`` (also written to
``out_dir/merge_recipe.json``; the store ignores extra files) holds the sources and their sha256,
weights, method, the peft combination type used, density, ranks, seed, head rule and the
reconstruction error: ``sqrt(sum_l ||dW_l^merged - sum_i w_i dW_l,i||^2) / sqrt(sum_l ||sum_i w_i
dW_l,i||^2)`` over all adapted layers ``l`` (float64). It is measured for every method; ``cat`` gives
float32 rounding only (~1e-8).

Example:
    >>> result = merge_adapters([("a1", 1.0), ("a2", 0.5)], "svd", target_rank=8,
    ...                         base_model=base, out_dir="merged")          # doctest: +SKIP
    >>> PeftModel.from_pretrained(base, "merged")                            # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora import adapters as peft_wiring
from adapters_mgr.lora.adapters import AdapterSource, InMemoryAdapter, copy_config
from adapters_mgr.lora.merge_methods import DENSITY_METHODS, METHODS, check_method
from adapters_mgr.lora.tasks import Task, get_task
from adapters_mgr.lora.tensors import (
    PREFIX,
    WEIGHTS_FILE,
    LoraTensors,
    check_compatible,
    check_fits,
    check_weights,
    head_of,
    parse_state_dict,
    read_lora,
    stacked_factors,
)
from adapters_mgr.store import atomic_folder

DEFAULT_DENSITY = 0.5
RECIPE_FILE = "merge_recipe.json"
FOLD_FILE = "adapters_mgr_fold.json"


def reconstruction_error(sources: Sequence[LoraTensors], weights: Sequence[float],
                         merged: LoraTensors) -> tuple[float, float]:
    """(global relative Frobenius error over all layers, worst single-layer relative error), float64."""
    err2 = ref2 = 0.0
    worst = 0.0
    for path in sources[0].lora:
        target = sum(w * ad.delta(path) for ad, w in zip(sources, weights, strict=True))
        diff = float(torch.linalg.norm(merged.delta(path) - target)) ** 2
        ref = float(torch.linalg.norm(target)) ** 2
        err2 += diff
        ref2 += ref
        worst = max(worst, math.sqrt(diff / ref) if ref > 0 else 0.0)
    return (math.sqrt(err2 / ref2) if ref2 > 0 else 0.0), worst


# -- merge -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeResult:
    recipe: dict[str, Any]
    reconstruction_error: float | None
    out_dir: Path


def _prepare_out_dir(out_dir: str | Path) -> Path:
    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise Conflict(f"output folder {path} exists and is not empty; merged adapters are written to a new folder")
    return path


def _peft_combination(method: str, ranks: set[int], target_rank: int | None, n: int) -> str:
    if n == 1 and method != "svd":
        return "linear"  # peft itself merges a single adapter with 'linear' (exact for one adapter)
    if method in ("cat", "svd"):
        return method
    if method == "linear":
        if len(ranks) > 1:
            raise Conflict(
                f"linear sums the A and B factors and needs equal ranks, got ranks {sorted(ranks)}; use 'svd'"
                " (the exact weighted delta sum truncated to a rank) or 'cat' (lossless)"
            )
        return "linear"
    return method if (target_rank is None and len(ranks) == 1) else f"{method}_svd"


def _checked_inputs(
    folders_and_weights: Sequence[tuple[AdapterSource, float]], out_dir: str | Path, task: str | Task | None,
    base_model: nn.Module, verb: str,
) -> tuple[list[float], Path, list[LoraTensors], str, nn.Module]:
    """Everything merge and fold check before any model work: weights, output folder, compatible
    adapters that fit a bare base. Returns (weights, out, sources, task name, task model)."""
    pairs = list(folders_and_weights)
    if not pairs:
        raise InvalidInput(f"{verb} needs at least one adapter")
    weights = check_weights([w for _, w in pairs])
    out = _prepare_out_dir(out_dir)
    sources = [read_lora(src) for src, _ in pairs]
    if isinstance(task, Task):  # the recipe knows its folders' peft type (a two-tower ranker: FEATURE_EXTRACTION)
        check_compatible(sources, task_type=task.peft_task_type)
        task_name, task_obj = task.name, task
    else:
        task_name = check_compatible(sources, task)
        task_obj = get_task(task_name)
    task_model = task_obj.task_model(base_model)
    if peft_wiring.has_injected_adapters(task_model):
        raise InvalidInput(f"the base already has adapters attached; {verb} needs the bare base (release them)")
    check_fits(task_model, sources)
    return weights, out, sources, task_name, task_model


def merge_adapters(
    folders_and_weights: Sequence[tuple[AdapterSource, float]],
    method: str,
    *,
    target_rank: int | None = None,
    density: float | None = None,
    base_model: nn.Module,
    out_dir: str | Path,
    task: str | Task | None = None,
    seed: int = 0,
) -> MergeResult:
    """Merge adapters with ``method`` into a standard PEFT folder ``out_dir`` (see the module doc).

    ``base_model`` is the shared base (the ranker's sequence classifier, or the encoder); adapters are
    attached to it temporarily and removed again, its weights are never changed. Raises
    ``InvalidInput`` / ``Conflict`` before any model work for bad methods, ranks, densities,
    weights, or incompatible adapters (another task, other target modules, another base).
    """
    from peft import __version__ as peft_version

    check_method(method, target_rank, density)
    weights, out, sources, task_name, task_model = _checked_inputs(folders_and_weights, out_dir, task, base_model,
                                                                   "merge")
    ranks = {r for s in sources for r in s.ranks}
    combination = _peft_combination(method, ranks, target_rank, len(sources))
    dims = [min(b.shape[0], a.shape[1]) for a, b, _ in sources[0].lora.values()]
    if target_rank is not None and target_rank > min(dims):
        raise InvalidInput(f"target_rank {target_rank} exceeds the smallest adapted layer's dimension {min(dims)}")
    if method in DENSITY_METHODS and density is None:
        density = DEFAULT_DENSITY

    merged_state = _peft_merge(task_model, sources, weights, combination, target_rank, density, seed)
    head = head_of(sources)
    newest = sources[-1].config
    merged_rank = int(next(iter(merged_state.values())).shape[0]) if merged_state else 0
    config = copy_config(
        newest, r=merged_rank, lora_alpha=merged_rank, use_rslora=False, alpha_pattern={}, rank_pattern={},
        inference_mode=True, init_lora_weights=True,
    )
    merged = parse_state_dict(config, {**merged_state, **{PREFIX + k: v for k, v in head.items()}}, str(out), None)
    error, worst = reconstruction_error(sources, weights, merged)
    recipe = {
        "method": method,
        "peft_combination_type": combination,
        "sources": [
            {"source": s.source, "sha256": s.sha256, "weight": w, "r": s.rank, "lora_alpha": float(s.config.lora_alpha)}
            for s, w in zip(sources, weights, strict=True)
        ],
        "weights": weights,
        "task": task_name,
        "target_modules": list(sources[0].target_modules),
        "target_rank": target_rank,
        "rank": merged_rank,
        "density": density,
        "majority_sign_method": "total" if "ties" in method else None,
        "seed": seed,
        "head": {"rule": "newest source", "source_index": len(sources) - 1, "tensors": sorted(head)},
        "reconstruction_error": error,
        "reconstruction_error_max_layer": worst,
        "peft_version": peft_version,
        "torch_version": torch.__version__,
    }
    _write_peft_folder(out, config, merged_state, head, recipe)
    return MergeResult(recipe=recipe, reconstruction_error=error, out_dir=out)


def _peft_merge(task_model: nn.Module, sources: Sequence[LoraTensors], weights: list[float], combination: str,
                target_rank: int | None, density: float | None, seed: int) -> dict[str, torch.Tensor]:
    """Run peft's ``add_weighted_adapter`` on the LoRA layers only; return the merged saved-format state."""
    from peft import get_peft_model_state_dict

    model: Any = task_model
    try:
        for i, src in enumerate(sources):
            # task_type=None: a plain PeftModel, so peft does not add the classifier to modules_to_save
            config = copy_config(src.config, task_type=None, modules_to_save=None, inference_mode=True)
            state = {PREFIX + f"{p}.lora_A.weight": a for p, (a, _, _) in src.lora.items()}
            state.update({PREFIX + f"{p}.lora_B.weight": b for p, (_, b, _) in src.lora.items()})
            model = peft_wiring.attach(model, InMemoryAdapter(config, state), f"src{i}")
        names = [f"src{i}" for i in range(len(sources))]
        if len(names) == 1 and combination == "svd":  # peft would switch a single adapter to 'linear'
            names, weights = names * 2, [weights[0] / 2, weights[0] / 2]
        kwargs: dict[str, Any] = {"combination_type": combination}
        if combination.endswith("svd"):
            kwargs["svd_rank"] = target_rank
        if density is not None:
            kwargs["density"] = float(density)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_weighted_adapter(names, weights, "merged", **kwargs)
        state = get_peft_model_state_dict(model, adapter_name="merged")
        return {k: v.detach().to("cpu").float().contiguous().clone() for k, v in state.items()}
    except ValueError as exc:
        raise Conflict(f"peft could not merge these adapters ({combination}): {exc}") from exc
    finally:
        if model is not task_model:
            peft_wiring.release(model)


def _write_peft_folder(out: Path, config: Any, lora_state: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                       recipe: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with atomic_folder(out, replace_empty=True, label="output folder") as tmp:
        state = dict(lora_state)
        state.update({PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in head.items()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")


# -- fold ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_into(model: nn.Module, adapters: Sequence[LoraTensors], weights: Sequence[float]) -> None:
    """Add the weighted deltas to ``model``'s weights in place and load the newest adapter's head.

    The same arithmetic as the serving engine's folded fast path (``addmm(W0, B_cat, A_cat)``), so a
    folded export is bit-identical to the engine's folded weights.
    """
    params = dict(model.named_parameters())
    for path, (b_cat, a_cat) in stacked_factors(adapters, weights).items():
        weight = params[f"{path}.weight"]
        if weight.dtype == torch.float32:
            torch.addmm(weight.detach().clone(), b_cat.to(weight.device), a_cat.to(weight.device), out=weight.data)
        else:
            weight.data.copy_(torch.addmm(weight.float(), b_cat.to(weight.device), a_cat.to(weight.device)))
    for path, tensor in head_of(adapters).items():
        params[path].data.copy_(tensor.to(params[path].device, params[path].dtype))


def fold(
    base_model: nn.Module,
    folders_and_weights: Sequence[tuple[AdapterSource, float]],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    task: str | Task | None = None,
    record_extra: dict[str, Any] | None = None,
) -> Path:
    """Export base + weighted deltas (+ the newest adapter's head) as a plain transformers folder.

    ``base_model`` is not modified (a copy is folded). Ranker adapters give a sequence classifier,
    retriever adapters the bare encoder; both load with ``from_pretrained`` and need no peft. Pass
    ``tokenizer`` to save it alongside. ``adapters_mgr_fold.json`` records the sources and weights.
    """
    weights, out, sources, task_name, task_model = _checked_inputs(folders_and_weights, out_dir, task, base_model,
                                                                   "fold")
    model = copy.deepcopy(task_model)
    fold_into(model, sources, weights)
    with atomic_folder(out, replace_empty=True, label="output folder") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        record = {
            "task": task_name,
            "sources": [{"source": s.source, "sha256": s.sha256, "weight": w} for s, w in zip(sources, weights,
                                                                                            strict=True)],
            "head": {"rule": "newest source", "source_index": len(sources) - 1},
            **(record_extra or {}),
        }
        (tmp / FOLD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


__all__ = [
    "DENSITY_METHODS",
    "FOLD_FILE",
    "METHODS",
    "RECIPE_FILE",
    "MergeResult",
    "fold",
    "fold_into",
    "merge_adapters",
    "reconstruction_error",
]
