"""The Workspace: what every workflow works on, instead of the AdapterManager.

It bundles the catalog (state), the store (bytes), the data side (rows and texts) and the shared
frozen bases (loaded once, hash-checked, with their tokenizers). Workflows take a Workspace and
never the façade, so data flows one way: manager -> workflows -> catalog / store / data / lora.

Torch-free on import: a workspace only loads a model when a workflow asks for one, so catalog-only
commands (``ls``, ``lineage``, ``rollback``) start fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_mgr.catalog import bases as base_rows
from adapters_mgr.catalog import nodes
from adapters_mgr.catalog.aliases import current_target
from adapters_mgr.catalog.db import Catalog
from adapters_mgr.catalog.lineage import Lineage, load_lineage
from adapters_mgr.catalog.records import Adapter, Ref, fetch_adapter, fetch_ref, ref_id
from adapters_mgr.catalog.sql import log_event
from adapters_mgr.data import popularity, prior
from adapters_mgr.data.api import DataAPI
from adapters_mgr.errors import Conflict, IntegrityError, InvalidInput
from adapters_mgr.lora import base_model as base_mod
from adapters_mgr.lora.ranker_shape import CROSS, RankerShape, shape_of
from adapters_mgr.store import AdapterStore

if TYPE_CHECKING:
    from torch import nn


def default_root() -> Path:
    return Path(os.environ.get("ADAPTERS_MGR_ROOT") or ".adapters")


class Workspace:
    """Catalog + store + data + the base/tokenizer cache of one manager root."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, lock_timeout: float | None = None) -> None:
        self.root = Path(root if root is not None else default_root()).expanduser().resolve()
        self.catalog = Catalog(self.root / "catalog.duckdb", lock_timeout=lock_timeout)
        self.store = AdapterStore(self.root / "store")
        self.data = DataAPI(self.catalog, self.root)
        self.base_models: dict[tuple[str, str], nn.Module] = {}
        self.peft_models: dict[tuple[str, str], Any] = {}
        self.tokenizers: dict[str, Any] = {}

    # -- nodes ------------------------------------------------------------------------------------
    def get(self, ref: Ref) -> Adapter:
        """One node by id, ``name@version``, alias or name (latest active version)."""
        with self.catalog.connect() as con:
            return fetch_ref(con, ref)

    def lineage(self, ref: Ref, *, depth: int | None = None) -> Lineage:
        if depth is not None and depth < 0:
            raise InvalidInput(f"depth must be >= 0, got {depth}")
        with self.catalog.connect() as con:
            return load_lineage(con, ref_id(con, ref), max_depth=depth if depth is not None else 1_000_000)

    def members(self, node: Adapter) -> tuple[list[tuple[Adapter, float]], str]:
        """The adapters a node activates, with weights, and their combination mode."""
        with self.catalog.connect() as con:
            return nodes.node_members(con, node)

    def newest_templates(self, adapters: list[Adapter]) -> dict[str, str] | None:
        with self.catalog.connect() as con:
            return nodes.newest_templates(con, adapters)

    def with_hyperparams(self, adapters: list[Adapter]) -> list[Adapter]:
        """The adapters with their recorded hyperparams (lineage rows come without them: those are
        read from the catalog, the others are kept as they are)."""
        if all(a.hyperparams is not None for a in adapters):
            return list(adapters)
        with self.catalog.connect() as con:
            return [a if a.hyperparams is not None else fetch_adapter(con, a.id) for a in adapters]

    def prior_recipe(self, adapters: list[Adapter]) -> prior.PriorRecipe:
        """The as-of prior the adapters were trained with: one for all of them (Conflict otherwise),
        ``NO_PRIOR`` for adapters registered before the prior existed."""
        full = self.with_hyperparams(adapters)
        return prior.common_recipe([prior.recipe_of(a.hyperparams) for a in full],
                                   what=f"adapters {[a.id for a in full]}")

    def ranker_shape(self, adapters: list[Adapter]) -> RankerShape:
        """The ranker shape a node scores with: one shape for all members (Conflict otherwise: a
        cross-encoder's head and a tower's cosine cannot be combined), with the newest member's
        learned scale and bias (a stacked adapter was trained on top of its parents)."""
        full = self.with_hyperparams(adapters)
        shapes = {a.id: shape_of(a.hyperparams) for a in full}
        kinds = sorted({s.shape for s in shapes.values()})
        if len(kinds) > 1:
            raise Conflict(f"adapters {sorted(shapes)} are rankers of different shapes ({', '.join(kinds)}); "
                           "combine only rankers of one shape")
        return shapes[max(shapes)] if shapes else CROSS

    def popularity_recipe(self, adapters: list[Adapter]) -> popularity.PopularityRecipe:
        """The retriever popularity term a node scores with: the newest member's recorded recipe and
        learned weights (a stacked adapter was trained on top of its parents, so its weights apply to
        the whole node's similarity); ``NO_POPULARITY`` when no member recorded one (older adapters)."""
        full = self.with_hyperparams(adapters)
        for adapter in sorted(full, key=lambda a: a.id, reverse=True):
            recipe = popularity.recipe_of(adapter.hyperparams)
            if recipe.used:
                return recipe
        return popularity.NO_POPULARITY

    def alias_target(self, alias: str) -> int | None:
        """The node an alias points at now, or None when the alias does not exist."""
        with self.catalog.connect() as con:
            return current_target(con, alias)

    def adapter_folder(self, ref: Ref) -> Path:
        """The verified PEFT folder of an adapter (checksums checked now)."""
        return self.verified_folder(self.get(ref))

    def verified_folder(self, node: Adapter) -> Path:
        if node.kind == "stack" or node.store_key is None:
            raise InvalidInput(f"adapter {node.id} is a {node.kind} node with no weights file of its own")
        if node.status in ("missing", "corrupt"):
            raise IntegrityError(f"adapter {node.id} is marked {node.status}; see `adapters-mgr verify`")
        assert node.weights_sha256 is not None
        return self.store.verified_path(node.store_key, node.weights_sha256, node.config_sha256,
                                        f"adapter {node.id} ({node.ref})")

    def member_folders(self, members: list[tuple[Adapter, float]]) -> list[tuple[str, float]]:
        """``(verified folder, weight)`` per member, as the training and merge code take them."""
        return [(str(self.adapter_folder(m.id)), w) for m, w in members]

    # -- bases ------------------------------------------------------------------------------------
    def base(self, ref: str) -> dict[str, Any]:
        with self.catalog.connect() as con:
            return base_rows.get_base(con, ref)

    def find_base(self, *, sha: str | None = None, ref: str | None = None) -> dict[str, Any] | None:
        with self.catalog.connect() as con:
            return base_rows.find_base(con, sha=sha, ref=ref)

    def base_model(self, base_ref: str, head: base_mod.HeadSpec = base_mod.HeadSpec(), *,
                   force: bool = False) -> nn.Module:
        """The shared frozen base with the given head, loaded once per workspace and hash-checked."""
        row = self.base(base_ref)
        key = (row["id"], head.key)
        model = self.base_models.get(key)
        if model is None:
            model = base_mod.load_base_model(row["source"], head)
            self.check_base_hash(model, row, force=force, context=f"base {row['id']} loaded from {row['source']}")
            self.base_models[key] = model
        return model

    def tokenizer(self, base_ref: str) -> Any:
        """The base's tokenizer, loaded once per workspace."""
        row = self.base(base_ref)
        tok = self.tokenizers.get(row["id"])
        if tok is None:
            tok = self.tokenizers[row["id"]] = base_mod.load_tokenizer(row["source"])
        return tok

    def check_base_hash(self, model: nn.Module, row: dict[str, Any], *, force: bool, context: str) -> None:
        """Refuse a model whose backbone differs from the registered base (``force`` logs and goes on)."""
        actual = base_mod.weights_sha256(model)
        if actual == row["weights_sha256"]:
            return
        if not force:
            raise IntegrityError(
                f"{context}: weights sha256 {actual[:12]}… differ from the registered {row['weights_sha256'][:12]}…; "
                "refusing to load adapters onto a different base; use the base the adapter was registered "
                "with (only the Python API's AdapterManager.load(..., force=True) overrides this, and logs it)"
            )
        with self.catalog.transaction() as con:
            log_event(con, "load", {"base": row["id"], "context": context}, outcome="forced",
                      detail={"expected": row["weights_sha256"], "actual": actual})
