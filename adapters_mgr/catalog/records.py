"""Typed views of catalog rows, and resolution of user references (id, name@version, alias)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from adapters_mgr.catalog.db import fetch_dicts, from_json
from adapters_mgr.errors import InvalidInput, NotFound

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
KINDS = ("trained", "merged", "stack", "imported")
RELATIONS = ("warm_start", "stacked_on", "merged_from", "imported")
STATUSES = ("active", "deleted", "missing", "corrupt")

Ref = int | str

_JSON_COLS = ("peft_config", "target_modules", "hyperparams", "metrics")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid adapter name {name!r}: use a letter, then letters, digits, '.', '_' or '-' (max 128)"
        )
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise InvalidInput(
            f"invalid alias {alias!r}: use a lowercase letter, then lowercase letters, digits, '_' or '-'"
        )
    return alias


@dataclass
class Adapter:
    """One catalog node: a trained/merged/imported adapter version, or a stack of them."""

    id: int
    name: str
    version: int
    kind: str
    task: str | None
    base_id: str
    status: str
    created_at: datetime
    updated_at: datetime
    peft_config: dict[str, Any] | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | None = None
    store_key: str | None = None
    bytes: int | None = None
    weights_sha256: str | None = None
    config_sha256: str | None = None
    trainable_params: int | None = None
    hyperparams: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    stack_mode: str | None = None
    description: str | None = None
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["updated_at"] = self.updated_at.isoformat()
        return data

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Adapter:
        data = dict(row)
        for col in _JSON_COLS:
            data[col] = from_json(data.get(col))
        data["aliases"] = list(data.get("aliases") or [])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


ADAPTER_SELECT = """
SELECT a.*, coalesce((SELECT list(al.name ORDER BY al.name) FROM aliases al WHERE al.adapter_id = a.id), [])
       AS aliases
FROM adapters a
"""


def fetch_adapter(con: duckdb.DuckDBPyConnection, adapter_id: int) -> Adapter:
    rows = fetch_dicts(con, ADAPTER_SELECT + " WHERE a.id = ?", [adapter_id])
    if not rows:
        raise NotFound(f"no adapter with id {adapter_id}; list them with `adapters-mgr ls`")
    return Adapter.from_row(rows[0])


def resolve(con: duckdb.DuckDBPyConnection, ref: Ref) -> int:
    """An adapter id from ``42``, ``'42'``, ``'name@3'``, ``'name@latest'``, an alias, or a name.

    Aliases win over names on purpose: ``production`` should always mean the alias.
    """
    if isinstance(ref, bool):
        raise InvalidInput(f"invalid adapter reference {ref!r}")
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        row = con.execute("SELECT id FROM adapters WHERE id = ?", [int(ref)]).fetchone()
        if row is None:
            raise NotFound(f"no adapter with id {ref}; list them with `adapters-mgr ls`")
        return int(row[0])
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInput(f"invalid adapter reference {ref!r}: give an id, NAME@VERSION or an alias")
    if "@" in ref:
        name, _, version = ref.partition("@")
        if version in ("", "latest"):
            row = con.execute(
                "SELECT id FROM adapters WHERE name = ? AND status = 'active' ORDER BY version DESC LIMIT 1",
                [name],
            ).fetchone()
        elif version.isdigit():
            row = con.execute(
                "SELECT id FROM adapters WHERE name = ? AND version = ?", [name, int(version)]
            ).fetchone()
        else:
            raise InvalidInput(f"invalid version in {ref!r}: use NAME@3 or NAME@latest")
        if row is None:
            raise NotFound(f"no adapter {ref}; list versions with `adapters-mgr ls --name {name}`")
        return int(row[0])
    row = con.execute("SELECT adapter_id FROM aliases WHERE name = ?", [ref]).fetchone()
    if row is not None:
        return int(row[0])
    row = con.execute(
        "SELECT id FROM adapters WHERE name = ? AND status = 'active' ORDER BY version DESC LIMIT 1", [ref]
    ).fetchone()
    if row is not None:
        return int(row[0])
    raise NotFound(f"no adapter, alias or name {ref!r}; see `adapters-mgr ls` and `adapters-mgr alias`")
