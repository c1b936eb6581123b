"""Scorer: catalog-aware serving. Resolves nodes and aliases in the catalog, then hot-swaps them on
one in-memory base per task (:class:`~adapters_mgr.serving.engine.HotSwapModel`).

It follows an alias: :meth:`Scorer.refresh` (or a polling thread) re-reads the alias with one
short catalog read and switches when another process promoted or rolled back. It keeps its own base
copies (never the manager's training base), because a folded node changes weights in place.

A ranker node trained with the as-of prior (recipe recorded with its adapters) scores
``sigmoid(prior_logit + residual)``: the scorer asks the data layer for the prior's logits of the
pairs, from every event synced so far (or strictly before ``as_of``), and the engine adds them once
to the model's residual. Nodes from before the prior score as they always did.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.records import Adapter
from adapters_mgr.errors import InvalidInput, NotFound
from adapters_mgr.lora.base_model import load_base_model
from adapters_mgr.lora.ranker_shape import CROSS
from adapters_mgr.lora.tasks import get_task
from adapters_mgr.serving.engine import HotSwapModel, NodeSpec
from adapters_mgr.serving.topk import seen_items, top_k

RERANK_TOP_M = 50


class TextSource(Protocol):
    """Renders catalog users and items as the texts a model reads (the data layer does)."""

    def user_texts(self, users: Sequence[str], as_of: Any = None, *,
                   templates: dict[str, str] | None = None) -> dict[str, str]: ...

    def item_texts(self, as_of: Any = None, *, templates: dict[str, str] | None = None) -> dict[str, str]: ...

    def pair_prior_logits(self, users: list[Any], items: list[Any], as_of: Any = None, *,
                          recipe: Any = None) -> np.ndarray | None: ...

    def item_popularity(self, items: list[Any], as_of: Any = None, *, recipe: Any = None) -> np.ndarray: ...

    def templates(self) -> dict[str, str]: ...

    def user_history_texts(self, user_ids: list[str], as_of: Any = None, *, item_template: str) -> dict[str, str]: ...

    def item_content_texts(self, as_of: Any = None, *, item_template: str) -> dict[str, str]: ...


class ServingSource(Protocol):
    """What serving needs from the rest of the system (a Workspace provides it): nodes and their
    verified folders, bases, texts. Why a protocol: serving depends only on lora/ and catalog/, so a
    serving process can be built on any object that offers these, never on the manager."""

    catalog: Catalog
    data: TextSource

    def get(self, ref: Any) -> Adapter: ...
    def members(self, node: Adapter) -> tuple[list[tuple[Adapter, float]], str]: ...
    def newest_templates(self, adapters: list[Adapter]) -> dict[str, str] | None: ...
    def prior_recipe(self, adapters: list[Adapter]) -> Any: ...
    def popularity_recipe(self, adapters: list[Adapter]) -> Any: ...
    def ranker_shape(self, adapters: list[Adapter]) -> Any: ...
    def adapter_folder(self, ref: Any) -> Path: ...
    def alias_target(self, alias: str) -> int | None: ...
    def base(self, ref: str) -> dict[str, Any]: ...
    def tokenizer(self, base_ref: str) -> Any: ...
    def check_base_hash(self, model: Any, row: dict[str, Any], *, force: bool, context: str) -> None: ...


class Scorer:
    """Score and recommend with catalog nodes; switch nodes in place without reloading the base.

    >>> scorer = mgr.scorer("production")                   # doctest: +SKIP
    >>> scorer.score(["u1"], ["i9"]); scorer.recommend("u1", k=10)   # doctest: +SKIP
    >>> mgr.rollback("production"); scorer.refresh()         # picks up the move  # doctest: +SKIP
    """

    def __init__(self, source: ServingSource, node_or_alias: Any = None, *, ranker: Any = None,
                 max_length: int = 64, batch_size: int = 128) -> None:
        self.src = source
        self.max_length = max_length
        self.batch_size = batch_size
        self._engines: dict[tuple[str, str, str], HotSwapModel] = {}  # (base, task, ranker shape)
        self._shapes: dict[str, str] = {}  # task -> the shape of its active node ('cross' for the retriever)
        self._refs: dict[str, Any] = {}  # task -> the ref (alias or id) that task follows
        self._nodes: dict[str, Adapter] = {}  # task -> active node
        self._templates: dict[str, dict[str, str] | None] = {}  # task -> the texts' templates it was trained on
        self._priors: dict[str, Any] = {}  # task -> the prior recipe its node adds (``.used``: whether it adds one)
        self._popularity: Any = None  # the retriever node's popularity term (``.used``, weights, ``term``)
        self._lock = threading.RLock()
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._item_cache: dict[tuple[Any, ...], tuple[list[str], np.ndarray]] = {}
        if node_or_alias is not None:
            self.activate(node_or_alias)
        if ranker is not None:
            self.activate(ranker)

    # -- nodes -------------------------------------------------------------------------------------
    def _engine(self, base_id: str, task: str, shape: str = "cross") -> HotSwapModel:
        """One engine (one base in memory) per base, task and ranker shape: a cross-encoder folds
        heads into a sequence classifier, a tower ranker folds deltas into the encoder alone."""
        key = (base_id, task, shape)
        engine = self._engines.get(key)
        if engine is None:
            recipe = get_task(task, shape=shape) if task == "ranker" else get_task(task)
            row = self.src.base(base_id)
            model = load_base_model(row["source"], recipe.head)
            self.src.check_base_hash(model, row, force=False, context=f"serving base {base_id}")
            engine = HotSwapModel(model, self.src.tokenizer(base_id), recipe, max_length=self.max_length,
                                  batch_size=self.batch_size)
            self._engines[key] = engine
        return engine

    def _spec(self, node: Adapter, members: list[tuple[Adapter, float]], mode: str, shape: Any = None) -> NodeSpec:
        return NodeSpec(tuple((str(self.src.adapter_folder(m.id)), float(w)) for m, w in members), mode, node.id,
                        shape)

    def activate(self, node_or_alias: Any) -> int:
        """Activate a node (id, NAME@VERSION) or follow an alias; returns the node id now active."""
        node = self.src.get(node_or_alias)
        if node.task not in ("ranker", "retriever"):
            raise InvalidInput(f"adapter {node.id} is for task {node.task!r}; the scorer serves ranker or retriever")
        if node.status != "active":
            raise InvalidInput(f"adapter {node.id} is {node.status}; it cannot be served")
        members, mode = self.src.members(node)  # once: a lineage query for stack nodes
        shape = self.src.ranker_shape([m for m, _ in members]) if node.task == "ranker" else CROSS
        engine = self._engine(node.base_id, node.task, shape.shape)
        # reads and checks outside the switch; a tower node carries its own scale and bias
        prepared = engine.prepare(self._spec(node, members, mode, shape if shape.tower else None))
        templates = self.src.newest_templates([m for m, _ in members])
        recipe = self.src.prior_recipe([m for m, _ in members])
        pop = self.src.popularity_recipe([m for m, _ in members]) if node.task == "retriever" else None
        with self._lock:
            previous = self._engine_for(node.task) if node.task in self._nodes else None
            engine.activate(prepared)
            if previous is not None and previous is not engine:
                previous.activate(None)  # the other shape's engine goes back to its bare base
            self._shapes[node.task] = shape.shape
            self._refs[node.task] = node_or_alias
            self._nodes[node.task] = node
            self._templates[node.task] = templates
            self._priors[node.task] = recipe
            if node.task == "retriever":
                self._popularity = pop
        return node.id

    def recorded_templates(self, node: Adapter) -> dict[str, str] | None:
        """The text templates the node's newest trained adapter recorded (None: the catalog's current).

        Why: a model reads text rendered the way it was trained; after ``data set-template`` the
        catalog renders differently, but a node trained before keeps its own templates.
        """
        members, _ = self.src.members(node)
        return self.src.newest_templates([m for m, _ in members])

    @property
    def active(self) -> int | None:
        """The node id in use (the retriever's when both a retriever and a ranker are active)."""
        node = self._nodes.get("retriever") or self._nodes.get("ranker")
        return node.id if node else None

    @property
    def active_nodes(self) -> dict[str, int]:
        return {task: node.id for task, node in self._nodes.items()}

    def refresh(self) -> bool:
        """Re-resolve followed aliases (one short catalog read each); switch if they moved."""
        changed = False
        for task, ref in list(self._refs.items()):
            target = self.src.alias_target(ref) if isinstance(ref, str) and not ref.isdigit() else None
            if target is not None and target != self._nodes[task].id:
                self.activate(ref)
                changed = True
        return changed

    def start_polling(self, interval_s: float = 5.0) -> None:
        """Follow aliases in the background: ``refresh()`` every ``interval_s`` seconds."""
        if interval_s <= 0:
            raise InvalidInput(f"polling interval must be positive, got {interval_s}")
        self.stop_polling()
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a transient lock or read error must not kill serving
                    continue

        self._poller = threading.Thread(target=loop, name="adapters-mgr-refresh", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    def _engine_for(self, task: str) -> HotSwapModel:
        node = self._nodes.get(task)
        if node is None:
            raise InvalidInput(f"no {task} node is active; activate one first")
        return self._engine(node.base_id, task, self._shapes.get(task, "cross"))

    def _primary_task(self) -> str:
        if "ranker" in self._nodes:
            return "ranker"
        if "retriever" in self._nodes:
            return "retriever"
        raise InvalidInput("no node is active; activate an adapter or alias first")

    # -- scoring -----------------------------------------------------------------------------------
    def uses_prior(self, task: str = "ranker") -> bool:
        """Whether the active ``task`` node adds the as-of prior to its model's residual."""
        recipe = self._priors.get(task)
        return bool(recipe is not None and recipe.used)

    def prior_logits(self, users: Sequence[Any], items: Sequence[Any], *, as_of: Any = None) -> np.ndarray | None:
        """The active ranker's prior logits of the pairs (None when it adds no prior)."""
        if not self.uses_prior("ranker"):
            return None
        return self.src.data.pair_prior_logits([str(u) for u in users], [str(i) for i in items], as_of,
                                               recipe=self._priors["ranker"])

    def score_texts(self, user_texts: Sequence[str], item_texts: Sequence[str], *,
                    prior_logits: Sequence[float] | None = None) -> np.ndarray:
        """Raw text in: ranker P(like) per pair (when a ranker is active), else retriever similarity.

        A ranker trained with the prior needs the pairs' ``prior_logits`` (texts carry no ids to
        compute them from): :meth:`score` computes them, or ``DataAPI.prior_logits`` for rows."""
        task = self._primary_task()
        offsets = None
        if task == "ranker" and self.uses_prior():
            if prior_logits is None:
                raise InvalidInput(f"ranker node {self._nodes['ranker'].id} adds the as-of prior to its model's "
                                   "output; pass prior_logits (or score catalog ids with score())")
            offsets = np.asarray(prior_logits, dtype=np.float64)
        return self._engine_for(task).score_texts(list(user_texts), list(item_texts), offsets=offsets)

    def score(self, users: Sequence[Any], items: Sequence[Any], *, as_of: Any = None) -> np.ndarray:
        """Catalog ids in: texts rendered from the catalog (as of ``as_of``, default now), then scored;
        a ranker with the prior adds its logit as of the same time."""
        users = [str(u) for u in users]
        items = [str(i) for i in items]
        task = self._primary_task()
        user_text, item_text = self._texts(task, sorted(set(users)), as_of)
        missing = [i for i in items if i not in item_text]
        if missing:
            raise NotFound(f"unknown item {missing[0]!r}; it has no interactions or attributes in the catalog")
        offsets = self.prior_logits(users, items, as_of=as_of) if task == "ranker" else None
        return self.score_texts([user_text[u] for u in users], [item_text[i] for i in items], prior_logits=offsets)

    def _texts(self, task: str, users: list[str], as_of: Any) -> tuple[dict[str, str], dict[str, str]]:
        """(user texts, item texts) as the active ``task`` node was trained to read them: rendered with
        its recorded templates, or for a history ranker the users' histories strictly before
        ``as_of`` and the items' content texts (``adapters_mgr.data.history``)."""
        templates = self._templates.get(task)
        if task == "ranker" and self._shapes.get(task) == "history":
            item_template = (templates or self.src.data.templates())["item"]
            return (self.src.data.user_history_texts(users, as_of, item_template=item_template),
                    self.src.data.item_content_texts(as_of, item_template=item_template))
        return (self.src.data.user_texts(users, as_of, templates=templates),
                self.src.data.item_texts(as_of, templates=templates))

    def item_embeddings(self, as_of: Any = None) -> tuple[list[str], np.ndarray]:
        """Every catalog item encoded by the active retriever (cached per node and time)."""
        engine = self._engine_for("retriever")
        key = (self._nodes["retriever"].id, str(as_of))
        if key not in self._item_cache:
            texts = self.src.data.item_texts(as_of, templates=self._templates.get("retriever"))
            ids = sorted(texts)
            self._item_cache = {key: (ids, engine.encode([texts[i] for i in ids]))}
        return self._item_cache[key]

    def retrieval_scores(self, user_emb: np.ndarray, item_emb: np.ndarray, item_ids: Sequence[str], *,
                         as_of: Any = None) -> np.ndarray:
        """The active retriever's (users x items) scores: the dot product of the encodings, or for a
        node trained with the popularity term ``sim_weight * dot + pop_weight * log(count + smoothing)``
        with each item's interactions strictly before ``as_of`` (None: everything synced so far) and
        the node's recorded weights (float64, as evaluation computes them)."""
        pop = self._popularity
        if pop is None or not pop.used:
            return user_emb @ item_emb.T
        counts = self.src.data.item_popularity(list(item_ids), as_of, recipe=pop)
        sim = np.asarray(user_emb, dtype=np.float64) @ np.asarray(item_emb, dtype=np.float64).T
        return pop.sim_weight * sim + pop.pop_weight * pop.term(counts)[None, :]

    def recommend(self, user: Any, k: int = 10, *, exclude_seen: bool = True, top_m: int = RERANK_TOP_M,
                  as_of: Any = None) -> list[dict[str, Any]]:
        """Top-``k`` items for one user: the retriever ranks the whole catalog; an active ranker
        reranks the retriever's top ``top_m`` (two-stage)."""
        return self.recommend_many([user], k, exclude_seen=exclude_seen, top_m=top_m, as_of=as_of)[str(user)]

    def recommend_many(self, users: Sequence[Any], k: int = 10, *, exclude_seen: bool = True,
                       top_m: int = RERANK_TOP_M, as_of: Any = None) -> dict[str, list[dict[str, Any]]]:
        """Top-``k`` for many users at once: one retriever pass and one ranker request for them all."""
        if k <= 0:
            raise InvalidInput(f"k must be positive, got {k}")
        users = [str(u) for u in users]
        ids, item_emb = self.item_embeddings(as_of)
        user_text = self.src.data.user_texts(users, as_of, templates=self._templates.get("retriever"))
        unknown = [u for u in users if u not in user_text]
        if unknown:
            raise NotFound(f"unknown user {unknown[0]!r}; it has no interactions or attributes in the catalog")
        engine = self._engine_for("retriever")
        user_emb = engine.encode([user_text[u] for u in users])
        seen = seen_items(self.src.catalog, users) if exclude_seen else {}
        ranker = "ranker" in self._nodes
        first = top_k(self.retrieval_scores(user_emb, item_emb, ids, as_of=as_of), ids, users, seen,
                      max(k, top_m) if ranker else k)
        if not ranker:
            return first
        if self._templates.get("ranker") != self._templates.get("retriever") or self._shapes.get("ranker") == "history":
            user_text, item_text = self._texts("ranker", users, as_of)  # each stage reads its own training texts
        else:
            item_text = self.src.data.item_texts(as_of, templates=self._templates.get("ranker"))
        rank_engine = self._engine_for("ranker")
        # every candidate pair of every user in one request: the engine fills whole batches across
        # users (a user's top_m alone leaves most of a batch empty) and the prior is one query
        pairs = [(user, c["item_id"]) for user in users for c in first[user]]
        logits = self.prior_logits([u for u, _ in pairs], [i for _, i in pairs], as_of=as_of)
        scores = rank_engine.score_pairs([user_text[u] for u, _ in pairs], [item_text[i] for _, i in pairs],
                                         offsets=logits)
        out: dict[str, list[dict[str, Any]]] = {}
        start = 0
        for user in users:
            cands = first[user]
            mine = scores[start:start + len(cands)]
            start += len(cands)
            order = np.argsort(-mine, kind="stable")[:k]
            out[user] = [{"item_id": cands[i]["item_id"], "score": float(mine[i]),
                          "retriever_score": cands[i]["score"]} for i in order]
        return out

    def close(self) -> None:
        """Stop polling and restore every base (bit-exact)."""
        self.stop_polling()
        for engine in self._engines.values():
            engine.release()
