"""Hot-swap serving engine: one base in memory, any adapter / stack / merged node activated in place.

``HotSwapModel`` holds ONE base model (ranker: the sequence classifier with its head; retriever: the
encoder) and switches the active node without reloading it and without peft layers:

- **Folded fast path** (``weights`` mode): each adapted layer's weight is written as
  ``W = addmm(W0, B_cat, A_cat)`` where ``B_cat @ A_cat = sum_i w_i * (alpha_i / r_i) * B_i A_i``,
  and the newest adapter's head is copied into the classifier (the documented head rule, same as
  ``ScoringModel`` and ``merge``). A request then costs exactly what the bare base costs.
- **Bit-exact restore**: the first time a tensor is touched, a pristine copy is kept; switching
  away writes ``W0`` (or ``W0 + new delta``) from that copy, never ``W - delta``. No drift can
  accumulate, however many switches (tested with 1,000).
- **Ensemble** mode: each adapter is folded in turn (weight 1, its own head), its outputs computed,
  and the outputs averaged with normalised weights, exactly as ``ScoringModel`` does (ranker: mean
  P(like); retriever: ``sqrt(w_i) * e_i`` concatenated so dot products are the weighted mean cosine).
  Because that mutates weights per request, ensemble requests run one at a time.
- **Atomic switches**: a readers/writer lock. Requests hold the read lock for their whole duration;
  ``activate`` prepares everything (reads files, builds factors) *outside* the lock and takes the
  write lock only for the in-place copies (well under a millisecond on MiniLM). A request is scored
  wholly by the old or wholly by the new node. ``pinned()`` holds one node across several calls.
- **Caching**: adapter tensors are cached per folder, keyed by path + sha256 of the safetensors
  bytes (a cheap ``stat`` decides whether the file must be re-read and re-hashed); prepared nodes are
  cached too, so switching back (rollback) costs only the in-place fold.

Example:
    >>> engine = HotSwapModel(base, tokenizer, "ranker")
    >>> engine.activate([("store/a1", 1.0), ("store/a2", 1.0)], mode="weights", label=42)   # doctest: +SKIP
    >>> engine.score_pairs(["user: likes jazz"], ["item: a jazz record"])                 # doctest: +SKIP
    >>> engine.activate(None)                                      # bare base, bit-exact  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters_mgr.errors import Conflict, InvalidInput
from adapters_mgr.lora.adapters import AdapterSource, InMemoryAdapter, has_injected_adapters, read_adapter_config
from adapters_mgr.lora.peft_scoring import check_combination
from adapters_mgr.lora.tasks import Task, get_task
from adapters_mgr.lora.tasks.retriever import encode_texts
from adapters_mgr.lora.tensors import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraTensors,
    check_compatible,
    check_fits,
    head_of,
    parse_state_dict,
    stacked_factors,
)


# -- readers/writer lock ------------------------------------------------------------------------------
class RWLock:
    """Many readers or one writer; writers are preferred (a steady stream of requests cannot starve a
    switch). Reads are re-entrant per thread (``pinned()`` + ``score_pairs`` inside it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writer or self._waiting_writers:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise Conflict("cannot switch the active node from inside pinned() on the same thread")
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# -- adapter tensor cache -----------------------------------------------------------------------------
class AdapterCache:
    """LoRA tensors per folder, keyed by resolved path + sha256 of ``adapter_model.safetensors``.

    A ``stat`` (size, mtime, inode of both files) decides whether the cached sha still holds; when it
    changed, the file is read once, hashed and parsed. Identical bytes under two paths share tensors.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._by_path: OrderedDict[str, tuple[tuple[Any, ...], str]] = OrderedDict()
        self._by_sha: OrderedDict[str, LoraTensors] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0

    @staticmethod
    def _signature(folder: Path) -> tuple[Any, ...]:
        sig: tuple[Any, ...] = ()
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            st = os.stat(folder / name)
            sig += (st.st_size, st.st_mtime_ns, st.st_ino)
        return sig

    def get(self, source: AdapterSource) -> LoraTensors:
        if isinstance(source, InMemoryAdapter):
            return parse_state_dict(source.config, dict(source.state_dict), "<in-memory adapter>", None)
        folder = Path(source).resolve()
        config = None
        try:
            sig = self._signature(folder)
        except FileNotFoundError:
            config = read_adapter_config(folder)  # raises NotFound for a folder that is not PEFT
            raise InvalidInput(f"{folder} has no {WEIGHTS_FILE}; only safetensors PEFT folders are supported") from None
        key = str(folder)
        with self._lock:
            hit = self._by_path.get(key)
            if hit is not None and hit[0] == sig and hit[1] in self._by_sha:
                self._by_path.move_to_end(key)
                self._by_sha.move_to_end(hit[1])
                return self._by_sha[hit[1]]
        from safetensors.torch import load

        config = config or read_adapter_config(folder)
        data = (folder / WEIGHTS_FILE).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        tensors = parse_state_dict(config, load(data), key, sha)
        with self._lock:
            self.reads += 1
            self._by_path[key] = (sig, sha)
            self._by_sha[sha] = tensors
            while len(self._by_sha) > self.max_entries:
                self._by_sha.popitem(last=False)
            while len(self._by_path) > 4 * self.max_entries:
                self._by_path.popitem(last=False)
        return tensors


# -- nodes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    """What to activate: adapters with weights, the combination mode, and a label (e.g. the node id)."""

    adapters: tuple[tuple[AdapterSource, float], ...]
    mode: str = "weights"
    label: Any = None
    shape: Any = None
    """A two-tower ranker node's ``RankerShape`` (its scale and bias); None: the engine task's own."""


@dataclass(frozen=True)
class _Pass:
    """One forward pass: factors to fold per layer, the head to load (None: the base's), output weight."""

    weight: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class PreparedNode:
    """A node ready to be folded: everything read, checked and laid out; activation is only copies."""

    label: Any
    mode: str
    passes: tuple[_Pass, ...]
    sources: tuple[str, ...]
    shas: tuple[str | None, ...]
    weights: tuple[float, ...]
    shape: Any = None


BARE = PreparedNode(label=None, mode="weights", passes=(_Pass(1.0, {}, None),), sources=(), shas=(), weights=())


class HotSwapModel:
    """One base in memory; activate adapters / weighted stacks / ensembles / merged adapters in place.

    ``task`` is ``'ranker'`` (the base must be a 2-label sequence classifier) or ``'retriever'`` (any
    BERT; its encoder is used). The base is modified in place while a node is active and restored
    bit-exactly by ``activate(None)`` or ``release()``; nothing else should use it meanwhile.
    """

    def __init__(self, base: nn.Module, tokenizer: Any, task: str | Task, *, max_length: int = 64,
                 batch_size: int = 128, cache: AdapterCache | None = None, node_cache_size: int = 32,
                 fold_threads: int | None = 1) -> None:
        self.task = get_task(task)
        self.model = self.task.task_model(base)
        if has_injected_adapters(self.model):
            raise InvalidInput("the base has peft layers attached; release() them before serving")
        self.model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache = cache or AdapterCache()
        self.device = next(self.model.parameters()).device
        self._params = dict(self.model.named_parameters())
        self._pristine: dict[str, torch.Tensor] = {}
        self._modified: set[str] = set()
        self._applied: _Pass | None = None
        self._node: PreparedNode = BARE
        self._lock = RWLock()
        self._ensemble_mutex = threading.RLock()
        self._prep_lock = threading.Lock()
        self._nodes: OrderedDict[tuple[Any, ...], PreparedNode] = OrderedDict()
        self._node_cache_size = node_cache_size
        self.switches = 0
        self.fold_threads = fold_threads

    # -- state ---------------------------------------------------------------------------------------
    @property
    def active(self) -> Any:
        """The label of the active node (None: the bare base)."""
        return self._node.label

    @property
    def active_node(self) -> PreparedNode:
        return self._node

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Any]:
        """Hold the active node for several calls (e.g. a whole recompute); yields its label.
        Switches wait until the block ends."""
        with self._lock.read():
            yield self._node.label

    # -- preparing -----------------------------------------------------------------------------------
    def prepare(self, adapters: Sequence[tuple[AdapterSource, float]] | NodeSpec | None, mode: str = "weights",
                *, label: Any = None) -> PreparedNode:
        """Read (cached), validate and lay out a node without touching the model or taking the lock."""
        shape = None
        if isinstance(adapters, NodeSpec):
            adapters, mode, label, shape = adapters.adapters, adapters.mode, adapters.label, adapters.shape
        if adapters is None:
            return BARE if label is None else PreparedNode(label, "weights", BARE.passes, (), (), ())
        pairs = list(adapters)
        weights = [float(w) for _, w in pairs]
        check_combination(weights, mode)
        tensors = [self.cache.get(src) for src, _ in pairs]
        key = (mode, tuple((t.sha256 or id(t), w) for t, w in zip(tensors, weights, strict=True)))
        with self._prep_lock:
            cached = self._nodes.get(key) if all(t.sha256 for t in tensors) else None
        if cached is not None:
            same = (cached.label, cached.shape) == (label, shape)
            return cached if same else replace(cached, label=label, shape=shape)
        check_compatible(tensors, task_type=self.task.peft_task_type)
        check_fits(self.model, tensors)
        if mode == "weights":
            head = head_of(tensors)
            passes = (self._make_pass(1.0, stacked_factors(tensors, weights), head),)
        else:
            total = sum(weights)
            passes = tuple(
                self._make_pass(w / total, stacked_factors([t], [1.0]), dict(t.extras))
                for t, w in zip(tensors, weights, strict=True) if w > 0
            )
        node = PreparedNode(label, mode, passes, tuple(t.source for t in tensors), tuple(t.sha256 for t in tensors),
                            tuple(weights), shape)
        if all(t.sha256 for t in tensors):
            with self._prep_lock:
                self._nodes[key] = node
                while len(self._nodes) > self._node_cache_size:
                    self._nodes.popitem(last=False)
        return node

    def _make_pass(self, weight: float, factors: dict[str, tuple[torch.Tensor, ...]],
                   head: dict[str, torch.Tensor]) -> _Pass:
        layout = {}
        for path, (b, a) in factors.items():
            param = self._params[f"{path}.weight"]
            layout[path] = (b.to(param.device), a.to(param.device))
        head_t = {p: t.to(self._params[p].device, self._params[p].dtype) for p, t in head.items()}
        return _Pass(weight, layout, head_t or None)

    # -- switching ------------------------------------------------------------------------------------
    def activate(self, adapters: Sequence[tuple[AdapterSource, float]] | NodeSpec | PreparedNode | None,
                 mode: str = "weights", *, label: Any = None) -> Any:
        """Make a node active in place (no base reload); ``None`` restores the bare base. Returns the label.

        Everything that can fail (reading, validating) happens before the switch; the switch itself
        waits for running requests to finish and blocks new ones only for the in-place copies.
        """
        node = adapters if isinstance(adapters, PreparedNode) else self.prepare(adapters, mode, label=label)
        with self._lock.write(), _threads(self.fold_threads):
            try:
                self._apply(node.passes[0])
            except BaseException:
                self._apply(BARE.passes[0])
                self._node = BARE
                raise
            self._node = node
            self.switches += 1
        return node.label

    @torch.no_grad()
    def _apply(self, new: _Pass) -> None:
        """Write ``new`` into the weights from the pristine copies; untouched tensors are restored."""
        if self._applied is new:
            return
        self._applied = None
        targets = {f"{p}.weight" for p in new.factors} | set(new.head or ())
        for name in sorted(self._modified - targets):
            self._params[name].data.copy_(self._pristine[name])
            self._modified.discard(name)
        for path, (b, a) in new.factors.items():
            name = f"{path}.weight"
            param = self._params[name]
            pristine = self._pristine_of(name)
            if param.dtype == torch.float32:
                torch.addmm(pristine, b, a, out=param.data)
            else:
                param.data.copy_(torch.addmm(pristine.float(), b, a))
            self._modified.add(name)
        for name, tensor in (new.head or {}).items():
            self._pristine_of(name)
            self._params[name].data.copy_(tensor)
            self._modified.add(name)
        self._applied = new

    def _pristine_of(self, name: str) -> torch.Tensor:
        if name not in self._pristine:
            if name in self._modified:  # pragma: no cover - guarded by construction
                raise Conflict(f"{name} was modified before its pristine copy was taken")
            self._pristine[name] = self._params[name].detach().clone()
        return self._pristine[name]

    def is_pristine(self) -> bool:
        """True when no node is folded and every touched tensor equals its pristine copy bit for bit."""
        with self._lock.read():
            return not self._modified and all(
                torch.equal(self._params[n], t) for n, t in self._pristine.items()
            )

    def release(self) -> nn.Module:
        """Restore the bare base (bit-exact) and return the task model."""
        self.activate(None)
        return self.model

    # -- scoring ---------------------------------------------------------------------------------------
    def _run(self, fn: Any) -> tuple[list[tuple[float, Any]], PreparedNode]:
        with self._lock.read():
            node = self._node
            if node.mode == "weights":
                return [(1.0, fn(node))], node
            with self._ensemble_mutex:
                outputs = []
                for p in node.passes:
                    self._apply(p)
                    outputs.append((p.weight, fn(node)))
                return outputs, node

    def score_pairs(self, user_texts: Sequence[str], item_texts: Sequence[str], *, with_node: bool = False,
                    offsets: np.ndarray | None = None) -> Any:
        """Ranker: P(like) per pair; retriever: similarity (dot of the encodings) per pair. float64.
        ``with_node=True`` returns ``(scores, label)`` of the node that scored the whole request.
        ``offsets``: the as-of prior's logits (ranker nodes trained with the prior), added once to
        each pass's residual logit, exactly as ``ScoringModel.score_pairs`` does."""
        if len(user_texts) != len(item_texts):
            raise InvalidInput(f"{len(user_texts)} user texts but {len(item_texts)} item texts")
        if self.task.name == "retriever":
            if offsets is not None:
                raise InvalidInput("prior offsets apply to the ranker only")
            with self._lock.read():
                users, label = self.encode(user_texts, with_node=True)
                items = self.encode(item_texts)
            scores = np.sum(users * items, axis=1).astype(np.float64)
            return (scores, label) if with_node else scores
        outputs, node = self._run(lambda node: self.task.pass_scores(
            self.model, self.tokenizer, list(user_texts), list(item_texts),
            max_length=self.max_length, batch_size=self.batch_size, device=self.device, offsets=offsets,
            shape=node.shape,
        ))
        scores = sum(w * out for w, out in outputs)
        return (scores, node.label) if with_node else scores

    def encode(self, texts: Sequence[str], *, with_node: bool = False) -> Any:
        """Retriever: unit embeddings (weights mode) or ``sqrt(w_i) * e_i`` concatenated (ensemble)."""
        if self.task.name != "retriever":
            raise InvalidInput(f"encode needs a retriever engine, this one serves a {self.task.name}")
        outputs, node = self._run(lambda _node: encode_texts(
            self.model, self.tokenizer, list(texts),
            max_length=self.max_length, batch_size=self.batch_size, device=self.device,
        ))
        if node.mode == "weights":
            emb = outputs[0][1]
        else:
            emb = np.concatenate([np.sqrt(w) * e for w, e in outputs], axis=1).astype(np.float32)
        return (emb, node.label) if with_node else emb

    def score_texts(self, user_texts: Sequence[str], item_texts: Sequence[str], *, with_node: bool = False,
                    offsets: np.ndarray | None = None) -> Any:
        """Raw-text scores: ranker P(like) per pair; retriever cosine similarity per pair."""
        return self.score_pairs(user_texts, item_texts, with_node=with_node, offsets=offsets)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the fold with ``n`` intra-op threads. The fold is a dozen small ``addmm``s: one thread costs
    about a millisecond on MiniLM, while a multi-threaded barrier on an oversubscribed CPU (shared
    machine, cgroup quota) was measured to stall for ~180 ms. No request runs during a switch."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = ["AdapterCache", "HotSwapModel", "NodeSpec", "PreparedNode", "RWLock"]
