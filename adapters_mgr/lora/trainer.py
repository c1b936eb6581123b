"""Train one LoRA adapter on a frozen shared base under an update policy.

Why ``accelerate.Accelerator`` and a short loop instead of ``transformers.Trainer``: the retriever
needs a custom in-batch-negatives loss and stacked parents need their dropout kept in eval mode,
both awkward to bolt onto ``Trainer``; ``Trainer`` also writes checkpoints and logs to an output
directory, and this module must write nothing (the manager owns all storage). ``Accelerator`` still
gives device placement, mixed precision and DDP: the same code runs on CPU, one GPU, or several
processes under ``torchrun`` / ``accelerate launch --multi_gpu`` (:func:`process_state`).

Several processes (data-parallel): ``batch_size`` is the GLOBAL batch. Every process draws the same
seeded order of global batches and takes its contiguous slice of each (``batch_size / processes``
rows); DDP averages the gradients, and each slice's mean loss is weighted by its share of the global
batch, so a step's gradient is the gradient of the global batch's mean loss, the step count and the
learning-rate schedule are those of one process. Hence the ranker with every dropout at 0 trains the
same adapter as one process, up to float summation order (tested). What differs: dropout masks are
drawn per process (rank > 0 reseeds after the adapter's seeded initialisation), and the retriever's
in-batch negatives are per process: each process contrasts its slice only (``batch_size / processes
- 1`` negatives per row instead of ``batch_size - 1``), a different objective from one process.

Reproducibility: ``seed`` seeds Python/numpy/torch (``accelerate.utils.set_seed``) before the new
LoRA is initialised, the shuffling uses its own seeded generator, so the same seed and data on the
same CPU give bit-identical adapter tensors (tested).

Nothing is written to disk here. Exceptions (Ctrl-C included) propagate after the base has been
restored to bare, so a failed run leaves neither files nor injected layers behind.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_mgr.errors import InvalidInput
from adapters_mgr.faults import maybe_crash
from adapters_mgr.lora import adapters as peft_wiring
from adapters_mgr.lora.adapters import InMemoryAdapter
from adapters_mgr.lora.peft_scoring import ScoringModel
from adapters_mgr.lora.policies import Plan, Policy, build, plan
from adapters_mgr.lora.settings import LoraSettings
from adapters_mgr.lora.tasks import Task, get_task
from adapters_mgr.progress import progress_bar


@dataclass
class TrainResult:
    """The trained adapter, still attached to the base, and what the run measured.

    ``model`` is a PeftModel holding the new adapter under ``adapter_name`` (and, for ``stack`` /
    ``long_short``, the frozen parents as ``parent_0``, ``parent_1``...). ``node_names`` /
    ``node_weights`` / ``mode`` describe the node to register and serve. Call ``save(folder)`` to
    write the new adapter, then ``release()`` before training again on the same base.
    """

    model: Any
    tokenizer: Any
    task: Task
    adapter_name: str
    policy: str
    settings: LoraSettings
    node_names: list[str]
    node_weights: list[float]
    mode: str
    metrics: dict[str, float]
    samples_per_s: float
    wall_s: float
    trainable_params: int
    steps: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    max_length: int = 64
    eval_batch_size: int = 128

    def save(self, folder: str | Path) -> Path:
        """Write ONLY the new adapter as a standard PEFT folder (parents are already stored)."""
        return peft_wiring.save_adapter(self.model, self.adapter_name, folder)

    def adapter(self) -> InMemoryAdapter:
        """A detached copy of the new adapter (config + tensors) to score or stack without disk."""
        return peft_wiring.adapter_state(self.model, self.adapter_name)

    def scorer(self) -> ScoringModel:
        """Score with the trained node as it will be served (stack/long_short: with the parents)."""
        return ScoringModel.from_peft(
            self.model, self.tokenizer, self.task, self.node_names, self.node_weights, self.mode,
            max_length=self.max_length, batch_size=self.eval_batch_size,
        )

    def release(self) -> nn.Module:
        """Detach all adapters; returns the bare task model (the base's own weights, untouched)."""
        return peft_wiring.release(self.model)


# -- several processes ---------------------------------------------------------------------------
#: How long the other processes wait for the main one's messages: it plans and reads the rows before
#: they can start, and evaluates, stores and registers after training while they wait. A dead peer is
#: noticed at once (its sockets close); this bounds only a live but stuck one.
MAIN_PROCESS_WAIT = timedelta(hours=float(os.environ.get("ADAPTERS_MGR_MAIN_WAIT_HOURS", "24")))


class DistributedError(RuntimeError):
    """A multi-process run that cannot go on: a bad launch, or another process failed. Deliberately
    not an ``AdaptersMgrError``: only the main process records failures in the catalog."""


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def _cpu_only() -> bool:
    """Whether accelerate must be told ``cpu=True``: asked for (``accelerate launch --cpu``), or
    several processes on a machine without an accelerator. accelerate (>= 1.x) makes a MULTI_CPU
    (gloo) process group only with ``cpu=True``; without it, ``torchrun`` on CPU gives every process
    ``DistributedType.NO`` and each trains alone on all the data."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return launched_processes() > 1 and not _has_accelerator()


def process_state() -> Any:
    """accelerate's process state (a per-process singleton), created from the launcher's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl
    on GPUs. Raises DistributedError when a launcher started several processes but the state is
    single-process (something created ``Accelerator()``/``PartialState()`` first without ``cpu=True``
    on a CPU machine): each would otherwise train alone and register."""
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only())
    world = launched_processes()
    if world == 1 and os.environ.get("MASTER_ADDR") and _cpu_only() and not _warned_single:
        # `accelerate launch --cpu --num_processes N` (no --mpirun_hostfile) starts ONE process: its
        # simple launcher sets MASTER_ADDR and ACCELERATE_USE_CPU but starts no other process
        _warned_single.append(True)
        warnings.warn(
            "accelerate launch --cpu runs a single process (accelerate starts several CPU processes only "
            "through mpirun); for data-parallel training on CPU use `accelerate launch --multi_gpu "
            "--num_processes N` (gloo is chosen when there is no GPU) or `torchrun --nproc_per_node N`",
            RuntimeWarning, stacklevel=2,
        )
    if world > 1 and state.num_processes != world:
        raise DistributedError(
            f"launched as {world} processes but accelerate's state is {state.distributed_type} with "
            f"{state.num_processes} process(es); on a CPU machine create Accelerator(cpu=True) (or let "
            "adapters_mgr create the state first)"
        )
    return state


_control_groups: dict[int, Any] = {}
_warned_single: list[bool] = []


@dataclass
class Team:
    """The processes of one run (a team of one without a launcher), and the few messages between the
    main process (rank 0) and the others, over a gloo group that waits ``MAIN_PROCESS_WAIT``."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @classmethod
    def join(cls) -> Team:
        state = process_state()
        if state.num_processes == 1:
            return cls()
        import torch.distributed as dist

        key = id(dist.group.WORLD)
        if key not in _control_groups:  # collective: every rank creates it, once per process group
            _control_groups[key] = dist.new_group(backend="gloo", timeout=MAIN_PROCESS_WAIT)
        return cls(state.process_index, state.num_processes, _control_groups[key])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, message: Any = None) -> Any:
        """The main process's ``message`` (picklable), on every process; the others pass nothing."""
        if self.size == 1:
            return message
        import torch.distributed as dist

        box = [message if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def _shard(collate: Callable[[list[int]], dict[str, Any]], rank: int, world: int
           ) -> Callable[[list[int]], tuple[dict[str, Any], int, int]]:
    """This process's contiguous slice of each global batch: (tensors, rows in the slice, global rows).
    An empty slice (a global batch smaller than the team) collates one row, weighted 0 by the loop, so
    every process still runs forward and backward (DDP needs every trainable parameter used)."""

    def collate_fn(index: list[int]) -> tuple[dict[str, Any], int, int]:
        lo, hi = len(index) * rank // world, len(index) * (rank + 1) // world
        part = index[lo:hi]
        return collate(part or index[:1]), len(part), len(index)

    return collate_fn


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    bad = isinstance(value, bool) or (integer and not isinstance(value, int | np.integer))
    if bad or not (value > 0 and math.isfinite(value)):
        raise InvalidInput(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _train_mode(model: nn.Module, frozen: Sequence[str]) -> None:
    """Train mode, except the frozen parents' LoRA dropout: they must act as they do when served."""
    model.train()
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name in frozen:
                if name in dropouts:
                    dropouts[name].eval()


def train_adapter(
    base_model: nn.Module,
    tokenizer: Any,
    task: str | Task,
    train_examples: Any,
    *,
    settings: LoraSettings | None = None,
    epochs: int = 1,
    lr: float = 5e-4,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    policy: str | Policy = "fresh",
    parents: Sequence[Any] = (),
    new_weight: float = 1.0,
    mode: str = "weights",
    adapter_name: str = "default",
    eval_examples: Any = None,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    eval_batch_size: int = 128,
    progress: bool = True,
    head_lr: float | None = None,
) -> TrainResult:
    """Train a new LoRA adapter for ``task`` on ``base_model`` (frozen, shared, modified only by
    attaching peft layers, which ``TrainResult.release()`` removes).

    Args:
        base_model: the shared base; for the ranker a ``*ForSequenceClassification`` with 2 labels,
            for the retriever a bare encoder or any ``BertFor...`` (its backbone is used).
        tokenizer: the base's tokenizer.
        task: 'ranker' | 'retriever' | a Task.
        train_examples: rows (dicts) or columns with user_id, item_id, user_text, item_text
            (+ label 0/1; the retriever keeps label-1 rows, or all rows if there is no label).
        settings: LoRA shape; ``None`` = defaults, or the parent's shape for ``warm_start``.
        policy: 'fresh' | 'warm_start' | 'stack' | 'long_short' (see ``policies``).
        parents: PEFT folders / ``InMemoryAdapter`` s, or ``(source, weight)`` pairs, oldest first.
        new_weight: weight of the new adapter in the stack / long_short node.
        mode: combination of the node, 'weights' | 'ensemble' ('stack' needs 'weights').
        eval_examples: ranker rows, or for the retriever a dict with rows, catalog, seen; when
            given, ``metrics`` holds the node's eval metrics.
        progress: a report per epoch, main process only (a bar on a terminal, lines in a log: progress.py).
        head_lr: learning rate of the adapter's own head copy (peft ``modules_to_save``; ``None``: ``lr``).
            Why: a residual ranker's head starts at zero, and while it is zero the LoRA matrices get no
            gradient (theirs is proportional to the head's weights): at a LoRA-sized lr the head takes
            the whole run to grow and the residual barely leaves 0 (bench_content: residual std <= 0.03).

    Raises:
        InvalidInput: before any model work, for any bad argument or empty training set.
    """
    started = time.perf_counter()
    task_obj = get_task(task)
    _check_positive("epochs", epochs, integer=True)
    _check_positive("lr", lr)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("eval_batch_size", eval_batch_size, integer=True)
    _check_positive("max_length", max_length, integer=True)
    if head_lr is not None:
        _check_positive("head_lr", head_lr)
    if not 0.0 <= warmup_ratio < 1.0:
        raise InvalidInput(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if weight_decay < 0:
        raise InvalidInput(f"weight_decay must be >= 0, got {weight_decay!r}")
    if settings is not None and not isinstance(settings, LoraSettings):
        raise InvalidInput(f"settings must be a LoraSettings, got {type(settings).__name__}")
    data = task_obj.parse_train(train_examples)
    eval_set = task_obj.parse_eval(eval_examples) if eval_examples is not None else None
    the_plan = plan(task_obj, policy, parents, settings, new_weight, mode, adapter_name)
    task_model = task_obj.task_model(base_model)
    if peft_wiring.has_injected_adapters(task_model):
        raise InvalidInput("the base already has adapters attached; call release() on the previous result first")

    model = build(task_model, task_obj, the_plan, seed)
    try:
        return _fit(model, tokenizer, task_obj, data, eval_set, the_plan, started, epochs=epochs, lr=lr,
                    batch_size=batch_size, max_length=max_length, seed=seed, weight_decay=weight_decay,
                    warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, eval_batch_size=eval_batch_size,
                    progress=progress, head_lr=head_lr)
    except BaseException:
        peft_wiring.release(model)
        raise


def _fit(model: Any, tokenizer: Any, task: Task, data: Any, eval_set: Any, p: Plan, started: float, *,
         epochs: int, lr: float, batch_size: int, max_length: int, seed: int, weight_decay: float,
         warmup_ratio: float, max_grad_norm: float | None, eval_batch_size: int, progress: bool,
         head_lr: float | None = None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, send_to_device
    from transformers import get_scheduler

    process_state()  # before Accelerator(): the process group from the launcher's environment
    # split_batches: one scheduler step per optimizer step (our batches are global ones, split below)
    accelerator = Accelerator(cpu=_cpu_only(), dataloader_config=DataLoaderConfiguration(split_batches=True))
    rank, world = accelerator.process_index, accelerator.num_processes
    trainable = peft_wiring.freeze(model, p.adapter_name)
    peft_wiring.activate(model, p.training_names, p.training_weights)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    params = [param for _, param in named]
    scalars = task.scalars()  # learned numbers the task keeps outside the folder (retriever weights)
    head = [param for name, param in named if "modules_to_save" in name] if head_lr is not None else []
    groups: list[dict[str, Any]] = [{"params": [p_ for p_ in params if not any(p_ is h for h in head)]}]
    if head:
        groups.append({"params": head, "lr": head_lr})
    if scalars:
        groups.append({"params": scalars, "lr": task.scalar_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    # the same seeded order of global batches in every process; each collates its slice of each
    loader = torch.utils.data.DataLoader(
        list(range(len(data))), batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_shard(task.collate(data, tokenizer, max_length), rank, world),
    )
    total_steps = epochs * len(loader)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if rank > 0:  # the adapter's init was seeded alike everywhere; dropout masks must not be alike
        torch.manual_seed(seed + 7_919 * rank)
    frozen = [n for n in p.training_names if n != p.adapter_name]
    losses: list[float] = []
    steps = 0
    loop_started = time.perf_counter()
    for epoch in range(epochs):
        _train_mode(model, frozen)
        epoch_losses = []
        # one iter() of the loader per epoch: a tqdm bar calls iter() on what it wraps when created and
        # again in the loop, and each iter() of a DataLoader draws a seed from its generator, which would
        # change every epoch's order (and break the order the recorded adapters were trained with)
        bar = progress_bar((batch for batch in loader), total=len(loader), leave=False, unit="step",
                           desc=f"train {task.name} {p.policy.name} epoch {epoch + 1}/{epochs}",
                           enabled=progress and accelerator.is_local_main_process)
        for batch, n_local, n_global in bar:
            loss = task.loss(model, send_to_device(batch, accelerator.device))
            if world > 1:
                # DDP averages over processes: weight = share of the global batch x processes
                loss = loss * (n_local * world / n_global)
            accelerator.backward(loss)
            if world > 1:  # outside the model, so DDP does not average them: sum the weighted shares
                for scalar in scalars:
                    if scalar.grad is not None:
                        scalar.grad = accelerator.reduce(scalar.grad, "sum") / world
            if max_grad_norm:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(float(loss.detach()))
            steps += 1
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
            if world > 1:
                maybe_crash(f"train:rank{rank}:step{steps}")
        losses = epoch_losses
    if world > 1:  # each step's global loss: the processes' weighted losses, averaged. The last
        # collective of training: past it, every process has finished (the update workflow registers
        # only then; a process that died before makes this raise in the others)
        summed = accelerator.reduce(torch.tensor(losses, dtype=torch.float64, device=accelerator.device), "sum")
        losses = (summed / world).tolist()
    loop_s = time.perf_counter() - loop_started
    model = accelerator.unwrap_model(model)
    model.eval()
    peft_wiring.freeze(model, None)
    peft_wiring.activate(model, p.node_names, p.node_weights if p.mode == "weights" else None)
    result = TrainResult(
        model=model, tokenizer=tokenizer, task=task, adapter_name=p.adapter_name, policy=p.policy.name,
        settings=p.settings, node_names=p.node_names, node_weights=p.node_weights, mode=p.mode,
        metrics={"train_loss": float(np.mean(losses)) if losses else float("nan"), "n_train": len(data)},
        samples_per_s=len(data) * epochs / loop_s if loop_s > 0 else float("nan"), wall_s=0.0,
        trainable_params=trainable, steps=steps, max_length=max_length, eval_batch_size=eval_batch_size,
        hyperparameters={
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed,
            "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "max_grad_norm": max_grad_norm,
            **({"head_lr": head_lr} if head_lr is not None else {}),
            "policy": p.policy.name, "mode": p.mode, "new_weight": p.new_weight,
            "parent_weights": [parent.weight for parent in p.parents], "lora": p.settings.to_dict(),
            **({"temperature": task.temperature} if hasattr(task, "temperature") else {}),
            **({"processes": world} if world > 1 else {}),
            **task.learned(),
        },
    )
    if eval_set is not None:
        result.metrics.update(task.evaluate(result.scorer(), eval_set))
    result.wall_s = time.perf_counter() - started
    accelerator.free_memory()
    return result


__all__ = ["MAIN_PROCESS_WAIT", "DistributedError", "Team", "TrainResult", "launched_processes",
           "process_state", "train_adapter"]
