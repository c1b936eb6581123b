"""Adapter weights on disk: one standard PEFT folder per distinct content, written atomically.

Layout under ``<root>/store``::

    objects/<key>/adapter_config.json         key = sha256(config sha + weights sha)
    objects/<key>/adapter_model.safetensors
    tmp/<random>/                             staging; anything here after a crash is garbage
    quarantine/<key>-<time>/                  folders whose bytes no longer match the catalog

Folders are immutable once renamed into ``objects``. Two registrations of the same bytes share one
folder, so nothing is stored twice. Only safetensors is accepted: a pickle ``.bin`` can run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters_mgr.errors import IntegrityError, InvalidInput, NotFound

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StagedAdapter:
    """A complete PEFT folder in ``tmp``, hashed and fsynced, not yet visible."""

    path: Path
    weights_sha256: str
    config_sha256: str
    bytes: int
    peft_config: dict[str, Any]

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.config_sha256}:{self.weights_sha256}".encode()).hexdigest()


def check_peft_folder(folder: Path) -> None:
    """Refuse anything that is not a safetensors PEFT folder, naming what is wrong."""
    if not folder.is_dir():
        raise NotFound(f"adapter folder {folder} does not exist")
    if not (folder / CONFIG_FILE).exists():
        raise InvalidInput(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    if not (folder / WEIGHTS_FILE).exists():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InvalidInput(
                f"{folder / pickles[0]} is a pickle checkpoint; only safetensors adapters are accepted "
                "(re-save with save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidInput(f"{folder} has no {WEIGHTS_FILE}")


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.quarantine_dir = root / "quarantine"

    def ensure(self) -> None:
        for d in (self.objects, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.objects / key

    def new_tmp_dir(self) -> Path:
        self.ensure()
        path = self.tmp / f"{uuid.uuid4().hex}"
        path.mkdir()
        return path

    # -- staging --------------------------------------------------------------------------
    def stage_folder(self, folder: Path) -> StagedAdapter:
        """Copy a PEFT folder's two files into staging (other files are ignored)."""
        folder = Path(folder)
        check_peft_folder(folder)
        tmp = self.new_tmp_dir()
        shutil.copyfile(folder / CONFIG_FILE, tmp / CONFIG_FILE)
        shutil.copyfile(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        return self.finish_staging(tmp)

    def stage_model(self, peft_model: Any, adapter_name: str | None = None) -> StagedAdapter:
        """Save one adapter of an in-memory PeftModel into staging as a standard PEFT folder."""
        name = adapter_name or getattr(peft_model, "active_adapter", "default")
        if not isinstance(name, str):
            raise InvalidInput(f"model has several active adapters {name}; pass adapter_name=")
        if name not in getattr(peft_model, "peft_config", {}):
            raise InvalidInput(f"model has no adapter named {name!r}; it has {list(peft_model.peft_config)}")
        tmp = self.new_tmp_dir()
        save_dir = tmp / "_save"
        peft_model.save_pretrained(str(save_dir), selected_adapters=[name], safe_serialization=True)
        # peft writes non-default adapters into a sub-folder named after the adapter.
        src = save_dir if name == "default" else save_dir / name
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            os.replace(src / fname, tmp / fname)
        shutil.rmtree(save_dir)
        return self.finish_staging(tmp)

    def finish_staging(self, tmp: Path) -> StagedAdapter:
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            _fsync_file(tmp / fname)
        _fsync_dir(tmp)
        config_text = (tmp / CONFIG_FILE).read_text()
        try:
            peft_config = json.loads(config_text)
        except json.JSONDecodeError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InvalidInput(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
        return StagedAdapter(
            path=tmp,
            weights_sha256=sha256_file(tmp / WEIGHTS_FILE),
            config_sha256=sha256_file(tmp / CONFIG_FILE),
            bytes=(tmp / WEIGHTS_FILE).stat().st_size + (tmp / CONFIG_FILE).stat().st_size,
            peft_config=peft_config,
        )

    def commit(self, staged: StagedAdapter) -> str:
        """Make staged content visible under its key (atomic rename); dedupe identical content."""
        self.ensure()
        final = self.path(staged.key)
        if final.exists():
            shutil.rmtree(staged.path, ignore_errors=True)
            return staged.key
        try:
            os.rename(staged.path, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(staged.path, ignore_errors=True)  # a concurrent writer won the race
        _fsync_dir(self.objects)
        return staged.key

    def discard(self, staged: StagedAdapter) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)

    # -- reading and checking ------------------------------------------------------------
    def verified_path(self, key: str, weights_sha256: str, config_sha256: str | None, label: str) -> Path:
        """The folder for ``key`` after checking both files against the catalog's checksums."""
        folder = self.path(key)
        weights = folder / WEIGHTS_FILE
        if not weights.exists():
            raise IntegrityError(f"{label}: weights file {weights} is missing; run `adapters-mgr verify`")
        actual = sha256_file(weights)
        if actual != weights_sha256:
            raise IntegrityError(
                f"{label}: {weights} has sha256 {actual[:12]}…, catalog says {weights_sha256[:12]}…; "
                "the file was changed after registration — refusing to load it"
            )
        if config_sha256 is not None:
            config = folder / CONFIG_FILE
            if not config.exists() or sha256_file(config) != config_sha256:
                raise IntegrityError(
                    f"{label}: {config} differs from the registered config; refusing to load it"
                )
        return folder

    def keys(self) -> list[str]:
        if not self.objects.exists():
            return []
        return sorted(p.name for p in self.objects.iterdir() if p.is_dir())

    def tmp_dirs(self) -> list[Path]:
        if not self.tmp.exists():
            return []
        return sorted(self.tmp.iterdir())

    def remove(self, key: str) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)

    def quarantine(self, key: str) -> Path:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        dest = self.quarantine_dir / f"{key}-{stamp}"
        os.rename(self.path(key), dest)
        return dest


def export_folder(src: Path, dest: Path, provenance: dict[str, Any]) -> Path:
    """Copy a stored adapter to ``dest`` atomically, with a provenance file beside the PEFT files."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInput(f"export destination {dest} exists and is not empty; choose a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(src / fname, tmp / fname)
        (tmp / "adapters_mgr.json").write_text(json.dumps(provenance, indent=2, default=str))
        for f in tmp.iterdir():
            _fsync_file(f)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
