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

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora.adapters import AdapterSource, InMemoryAdapter, read_adapter_config

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5
TASK_OF_PEFT_TYPE = {"SEQ_CLS": "ranker", "FEATURE_EXTRACTION": "retriever"}
PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
RECIPE_FILE = "merge_recipe.json"
FOLD_FILE = "adapters_mgr_fold.json"


# -- reading adapters ---------------------------------------------------------------------------
@dataclass
class LoraTensors:
    """One adapter's tensors, keyed by module path relative to the task model (no peft prefix).

    ``lora[path] = (A, B, scaling)`` with ``dW = scaling * B @ A``; ``extras`` holds the other saved
    tensors (the ranker's ``modules_to_save`` head), keyed by parameter path in the task model.
    """

    source: str
    sha256: str | None
    config: Any
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def task_type(self) -> str:
        value = getattr(self.config, "task_type", None)
        return str(getattr(value, "value", value))

    @property
    def task(self) -> str:
        return TASK_OF_PEFT_TYPE.get(self.task_type, self.task_type)

    @property
    def target_modules(self) -> tuple[str, ...]:
        targets = self.config.target_modules
        return (targets,) if isinstance(targets, str) else tuple(sorted(targets))

    @property
    def ranks(self) -> set[int]:
        return {int(a.shape[0]) for a, _, _ in self.lora.values()}

    @property
    def rank(self) -> int:
        return max(self.ranks) if self.lora else 0

    def delta(self, path: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        a, b, scaling = self.lora[path]
        return scaling * (b.to(dtype) @ a.to(dtype))


def _scaling(config: Any, path: str, rank: int) -> float:
    alpha = float(config.lora_alpha)
    if getattr(config, "alpha_pattern", None):
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(config.alpha_pattern), path)
        alpha = float(config.alpha_pattern.get(key, alpha))
    return alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank


def _check_supported(config: Any, source: str) -> None:
    if getattr(config, "use_dora", False):
        raise InvalidInput(f"{source} is a DoRA adapter; merging, folding and hot swap support plain LoRA only")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        raise InvalidInput(f"{source} trains biases (bias={config.bias!r}); only bias='none' adapters are supported")
    if getattr(config, "fan_in_fan_out", False):
        raise InvalidInput(f"{source} uses fan_in_fan_out (Conv1D layers); BERT-style Linear layers only")


def parse_state_dict(config: Any, state: dict[str, torch.Tensor], source: str, sha256: str | None) -> LoraTensors:
    """Split a peft state dict (as saved: no adapter names in keys) into LoRA factors and extras."""
    _check_supported(config, source)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                factors.setdefault(name.split(marker)[0], {})[part] = tensor
                break
        else:
            if "lora_" in name:
                raise InvalidInput(f"{source}: unsupported LoRA tensor {key!r} (embedding or magnitude vector)")
            extras[name] = tensor
    lora = {}
    for path, pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidInput(f"{source}: layer {path} has only {sorted(pair)}; the adapter file is incomplete")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInput(f"{source}: layer {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, not a LoRA pair")
        lora[path] = (a, b, _scaling(config, path, int(a.shape[0])))
    if not lora:
        raise InvalidInput(f"{source} holds no LoRA layers")
    return LoraTensors(source, sha256, config, lora, extras)


def read_lora(source: AdapterSource) -> LoraTensors:
    """Read a PEFT folder (or an ``InMemoryAdapter``) into ``LoraTensors``; the file is read once and hashed."""
    if isinstance(source, InMemoryAdapter):
        return parse_state_dict(source.config, dict(source.state_dict), "<in-memory adapter>", None)
    from safetensors.torch import load

    folder = Path(source)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidInput(f"{folder} has no {WEIGHTS_FILE}; only safetensors PEFT folders are supported")
    data = weights.read_bytes()
    return parse_state_dict(config, load(data), str(folder), hashlib.sha256(data).hexdigest())


# -- checks ---------------------------------------------------------------------------------------
def check_weights(weights: Sequence[float]) -> list[float]:
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(float(w)):
            raise InvalidInput(f"adapter weights must be finite numbers, got {list(weights)}")
        out.append(float(w))
    return out


def check_compatible(adapters: Sequence[LoraTensors], task: str | None = None) -> str:
    """Same task type and same target modules/layers (ranks may differ); returns the task name."""
    if not adapters:
        raise InvalidInput("need at least one adapter")
    first = adapters[0]
    for i, other in enumerate(adapters[1:], start=1):
        if other.task_type != first.task_type:
            raise Conflict(
                f"adapter #{i} ({other.source}) is a {other.task} adapter (task_type {other.task_type}) but"
                f" adapter #0 ({first.source}) is a {first.task} adapter ({first.task_type}); combine adapters"
                " of one task only"
            )
        if other.target_modules != first.target_modules or set(other.lora) != set(first.lora):
            raise Conflict(
                f"adapter #{i} ({other.source}) targets {list(other.target_modules)} on {len(other.lora)} layers but"
                f" adapter #0 ({first.source}) targets {list(first.target_modules)} on {len(first.lora)} layers;"
                " only adapters with the same target modules can be combined"
            )
    if task is not None and first.task != task:
        raise Conflict(f"{first.source} is a {first.task} adapter, not a {task} adapter")
    return first.task


def check_fits(model: nn.Module, adapters: Sequence[LoraTensors]) -> None:
    """Every adapted layer and head tensor exists in ``model`` (the task model) with matching shape."""
    params = dict(model.named_parameters())
    for ad in adapters:
        for path, (a, b, _) in ad.lora.items():
            weight = params.get(f"{path}.weight")
            if weight is None or tuple(weight.shape) != (b.shape[0], a.shape[1]):
                shape = None if weight is None else tuple(weight.shape)
                raise Conflict(
                    f"{ad.source} does not fit this base: layer {path} needs a {b.shape[0]}x{a.shape[1]} weight,"
                    f" the base has {shape}; was it trained on another base model?"
                )
        for path, tensor in ad.extras.items():
            target = params.get(path)
            if target is None or target.shape != tensor.shape:
                raise Conflict(f"{ad.source} does not fit this base: head tensor {path} missing or of another shape")


def _check_method(method: str, target_rank: Any, density: Any) -> None:
    if method not in METHODS:
        raise InvalidInput(f"unknown merge method {method!r}; choose one of {list(METHODS)} (or fold to export)")
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
            raise InvalidInput(f"target_rank must be a positive integer, got {target_rank!r}; try 8")
        if method in ("cat", "linear"):
            hint = "cat's rank is the sum of the ranks" if method == "cat" else "linear keeps the sources' rank"
            raise InvalidInput(f"target_rank does not apply to {method} ({hint}); use method='svd' to pick a rank")
    if density is not None:
        if method not in DENSITY_METHODS:
            raise InvalidInput(f"density applies to {list(DENSITY_METHODS)} only, not to {method!r}")
        if isinstance(density, bool) or not isinstance(density, int | float) or not 0.0 < float(density) <= 1.0:
            raise InvalidInput(f"density must be in (0, 1], got {density!r}; try 0.5 (keep half the entries)")


# -- deltas shared by merge, fold and serving ------------------------------------------------------
def stacked_factors(adapters: Sequence[LoraTensors], weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per layer ``(B_cat, A_cat)`` with ``B_cat @ A_cat = sum_i w_i * scaling_i * B_i A_i`` (float32).

    The weight and scaling go into B, so folding is one ``addmm(W0, B_cat, A_cat)`` per layer.
    """
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for path in adapters[0].lora:
        bs, as_ = [], []
        for ad, w in zip(adapters, weights, strict=True):
            a, b, scaling = ad.lora[path]
            bs.append(b.float() * float(w * scaling))
            as_.append(a.float())
        out[path] = (torch.cat(bs, dim=1).contiguous(), torch.cat(as_, dim=0).contiguous())
    return out


def head_of(adapters: Sequence[LoraTensors]) -> dict[str, torch.Tensor]:
    """The head tensors used by a combination: the newest (last) adapter's, possibly none."""
    return dict(adapters[-1].extras)


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
    folders_and_weights: Sequence[tuple[AdapterSource, float]], out_dir: str | Path, task: str | None,
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
    task_name = check_compatible(sources, task)

    from adapters_mgr.lora import adapters as peft_wiring
    from adapters_mgr.lora.tasks import get_task

    task_model = get_task(task_name).task_model(base_model)
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
    task: str | None = None,
    seed: int = 0,
) -> MergeResult:
    """Merge adapters with ``method`` into a standard PEFT folder ``out_dir`` (see the module doc).

    ``base_model`` is the shared base (the ranker's sequence classifier, or the encoder); adapters are
    attached to it temporarily and removed again, its weights are never changed. Raises
    ``InvalidInput`` / ``Conflict`` before any model work for bad methods, ranks, densities,
    weights, or incompatible adapters (another task, other target modules, another base).
    """
    from peft import __version__ as peft_version

    _check_method(method, target_rank, density)
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
    config = _copy_config(
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


def _copy_config(config: Any, **changes: Any) -> Any:
    import copy

    new = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def _peft_merge(task_model: nn.Module, sources: Sequence[LoraTensors], weights: list[float], combination: str,
                target_rank: int | None, density: float | None, seed: int) -> dict[str, torch.Tensor]:
    """Run peft's ``add_weighted_adapter`` on the LoRA layers only; return the merged saved-format state."""
    from peft import get_peft_model_state_dict

    from adapters_mgr.lora import adapters as peft_wiring

    model: Any = task_model
    try:
        for i, src in enumerate(sources):
            # task_type=None: a plain PeftModel, so peft does not add the classifier to modules_to_save
            config = _copy_config(src.config, task_type=None, modules_to_save=None, inference_mode=True)
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

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        state = dict(lora_state)
        state.update({PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in head.items()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    task: str | None = None,
) -> Path:
    """Export base + weighted deltas (+ the newest adapter's head) as a plain transformers folder.

    ``base_model`` is not modified (a copy is folded). Ranker adapters give a sequence classifier,
    retriever adapters the bare encoder; both load with ``from_pretrained`` and need no peft. Pass
    ``tokenizer`` to save it alongside. ``adapters_mgr_fold.json`` records the sources and weights.
    """
    import copy

    weights, out, sources, task_name, task_model = _checked_inputs(folders_and_weights, out_dir, task, base_model,
                                                                   "fold")
    model = copy.deepcopy(task_model)
    fold_into(model, sources, weights)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        record = {
            "task": task_name,
            "sources": [{"source": s.source, "sha256": s.sha256, "weight": w} for s, w in zip(sources, weights,
                                                                                            strict=True)],
            "head": {"rule": "newest source", "source_index": len(sources) - 1},
        }
        (tmp / FOLD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = [
    "METHODS",
    "LoraTensors",
    "MergeResult",
    "check_compatible",
    "check_fits",
    "fold",
    "fold_into",
    "merge_adapters",
    "read_lora",
    "reconstruction_error",
    "stacked_factors",
]
