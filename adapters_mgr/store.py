"""Adapter weights on disk: one standard PEFT folder per distinct content, written atomically.

Layout under ``<root>/store``::

    objects/<key>/adapter_config.json         key = sha256(config sha + weights sha)
    objects/<key>/adapter_model.safetensors
    tmp/<random>/                             staging; anything here after a crash is garbage
    quarantine/<key>-<time>/                  folders whose bytes no longer match the catalog

Folders are immutable once renamed into ``objects``. Two registrations of the same bytes share one
folder, so nothing is stored twice. Only safetensors is accepted: a pickle ``.bin`` can run code.
A source folder is validated (config is a LoRA config, weights open as safetensors) before anything
is written under ``store``, so a refused adapter leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters_mgr.errors import IntegrityError, InvalidInput, NotFound

# gc's default grace (git prune's idea): an orphan or staging folder younger than this may belong to
# a register in another process, between its store rename and its catalog insert.
GC_GRACE_SECONDS = 3600.0

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# torch.save writes a zip archive; a plain pickle (protocol >= 2) starts with PROTO 0x80 + version.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = tuple(bytes([0x80, proto]) for proto in range(2, 6))
RESAVE_HINT = "re-save it with save_pretrained(..., safe_serialization=True)"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


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


def _touch(path: Path) -> None:
    """Set a folder's mtime to now (gc measures a folder's age by it); a vanished folder is ignored."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_taken(dest: Path) -> bool:
    """True when ``dest`` holds something a folder rename must not replace: a file or a non-empty folder."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        return True
    return dest.is_dir() and any(dest.iterdir())


def _refuse_taken(dest: Path, *, replace_empty: bool, label: str) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise InvalidInput(f"{label} {dest} is a file, not a folder; choose a new folder path")
    if dest.is_dir() and not replace_empty:
        raise InvalidInput(f"{label} {dest} already exists; choose a new folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise InvalidInput(f"{label} {dest} exists and is not empty; choose a new folder")


@contextlib.contextmanager
def atomic_folder(dest: Path, *, replace_empty: bool = False, replace: bool = False,
                  label: str = "destination") -> Iterator[Path]:
    """Write a whole folder at once: yields a fresh, empty temporary folder beside ``dest`` (same file
    system); when the block succeeds its files are fsynced and it is renamed to ``dest``; when the
    block raises (Ctrl-C included) it is removed and ``dest`` is left as it was. Readers therefore
    never see a half-written ``dest``.

    What may already be at ``dest``: nothing by default; an empty folder with ``replace_empty`` (the
    rename replaces it atomically); anything with ``replace`` (removed just before the rename).
    Otherwise ``InvalidInput`` naming ``label`` and ``dest`` is raised: before the block runs when
    ``dest`` is taken or cannot be created, at the rename when someone else filled it meanwhile.

    Example:
        >>> with atomic_folder(Path("exports/model")) as tmp:               # doctest: +SKIP
        ...     model.save_pretrained(str(tmp))
    """
    dest = Path(dest)
    if not replace:
        _refuse_taken(dest, replace_empty=replace_empty, label=label)
    blocker = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InvalidInput(f"cannot create {label} {dest}: {blocker} is a file, not a folder; choose another path")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise InvalidInput(
            f"cannot create {label} {dest}: {exc.strerror or _one_line(exc)}; choose a folder you can write"
        ) from exc
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file() and not path.is_symlink():
                _fsync_file(path)
        _fsync_dir(tmp)
        if replace:
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest, ignore_errors=True)
            else:
                dest.unlink(missing_ok=True)
        elif not replace_empty and (dest.exists() or dest.is_symlink()):
            raise InvalidInput(f"{label} {dest} was created by someone else meanwhile; choose a new folder")
        try:
            os.rename(tmp, dest)  # replaces an empty folder; refuses a non-empty one
        except OSError as exc:
            if not replace and _is_taken(dest):
                raise InvalidInput(
                    f"{label} {dest} was filled by someone else meanwhile; choose a new folder"
                ) from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)


@dataclass
class StagedAdapter:
    """A complete PEFT folder in ``tmp``, hashed and fsynced, not yet visible."""

    path: Path
    weights_sha256: str
    config_sha256: str
    bytes: int
    peft_config: dict[str, Any]
    shapes: dict[str, list[int]] = field(default_factory=dict)  # tensor name -> shape, from the header

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.config_sha256}:{self.weights_sha256}".encode()).hexdigest()


def read_lora_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` after checking that PEFT reads it as a LoRA config."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} holds binary data, not JSON; it must be a PEFT LoRA config") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or _one_line(exc)}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidInput(
            f"{path} must hold a JSON object (a PEFT LoRA config), not a JSON {type(config).__name__}"
        )
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        what = "has no peft_type" if peft_type is None else f"has peft_type {peft_type!r}"
        raise InvalidInput(f"{path} {what}; only LoRA adapters (peft_type \"LORA\") are accepted")
    rank = config.get("r")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise InvalidInput(f"{path}: LoRA rank r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise InvalidInput(f"{path}: lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise InvalidInput(f"{path}: target_modules must be a module name or a list of names, got {targets!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise InvalidInput(f"{path}: base_model_name_or_path must be a string, got {base!r}")
    from peft import LoraConfig, PeftConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys from newer PEFT versions are dropped, as PEFT does
            PeftConfig.from_peft_type(**LoraConfig.check_kwargs(**config))
    except Exception as exc:  # noqa: BLE001 - whatever PEFT rejects, the user gets one line naming the file
        raise InvalidInput(f"{path} is not a LoRA config PEFT can read: {_one_line(exc)}") from exc
    return config


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors header of ``path`` (no tensor is loaded).

    Anything else is refused naming the file; a pickle or ``torch.save`` zip (which can run code
    when loaded) is recognised by its first bytes, whatever the file is called.
    """
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = list(fh.get_slice(key).get_shape())
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError...: all mean "not usable"
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
        except OSError:
            head = b""
        if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
            raise InvalidInput(
                f"{path} is not a safetensors file (pickle .bin adapters are refused: loading one can run "
                f"code); {RESAVE_HINT}"
            ) from exc
        raise InvalidInput(f"{path} is not a valid safetensors file ({_one_line(exc)}); {RESAVE_HINT}") from exc
    if not shapes:
        raise InvalidInput(f"{path} holds no tensors; an adapter needs its LoRA weights")
    return shapes


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def header_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, parsed directly: no torch, no tensor read.

    For files already accepted (a stored adapter, a base checkpoint) where :func:`read_safetensors_header`'s
    full check is not needed and importing torch would cost a catalog-only command a second. An
    unreadable or malformed header raises ``InvalidInput`` naming the file.
    """
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {size} out of range")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return {str(k): [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"cannot read the safetensors header of {path}: {_one_line(exc)}") from exc


def check_peft_folder(folder: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Refuse anything that is not a safetensors LoRA PEFT folder, naming what is wrong.

    Reads only: nothing is written anywhere. Returns the config and the weights' tensor shapes.
    """
    folder = Path(folder)
    hint = f"pass the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}"
    if folder.exists() and not folder.is_dir():
        raise InvalidInput(f"{folder} is a file, not a PEFT adapter folder; {hint}")
    if not folder.is_dir():
        raise NotFound(f"adapter folder {folder} does not exist; {hint}")
    if not (folder / CONFIG_FILE).is_file():
        raise InvalidInput(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InvalidInput(
                f"{folder / pickles[0]} is a pickle checkpoint; only safetensors adapters are accepted "
                "(re-save with save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidInput(f"{folder} has no {WEIGHTS_FILE}")
    config = read_lora_config(folder / CONFIG_FILE)
    shapes = read_safetensors_header(folder / WEIGHTS_FILE)
    return config, shapes


def newest_mtime(path: Path) -> float | None:
    """The newest mtime of a folder and its direct entries (a file still being written counts);
    None when the folder is gone."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return None
    try:
        for entry in os.scandir(path):
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                continue
    except (FileNotFoundError, NotADirectoryError):
        pass
    return newest


def age_seconds(path: Path, now: float | None = None) -> float | None:
    """Seconds since ``path`` (or anything directly in it) last changed; None when it is gone."""
    mtime = newest_mtime(path)
    return None if mtime is None else max(0.0, (time.time() if now is None else now) - mtime)


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
        """Copy a PEFT folder's two files into staging (other files are ignored).

        The folder is validated first, so a refused one writes nothing under the store.
        """
        folder = Path(folder)
        check_peft_folder(folder)
        tmp = self.new_tmp_dir()
        try:
            shutil.copyfile(folder / CONFIG_FILE, tmp / CONFIG_FILE)
            shutil.copyfile(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.finish_staging(tmp)

    def stage_model(self, peft_model: Any, adapter_name: str | None = None) -> StagedAdapter:
        """Save one adapter of an in-memory PeftModel into staging as a standard PEFT folder."""
        name = adapter_name or getattr(peft_model, "active_adapter", "default")
        if not isinstance(name, str):
            raise InvalidInput(f"model has several active adapters {name}; pass adapter_name=")
        if name not in getattr(peft_model, "peft_config", {}):
            raise InvalidInput(f"model has no adapter named {name!r}; it has {list(peft_model.peft_config)}")
        peft_type = getattr(peft_model.peft_config[name], "peft_type", None)
        if str(getattr(peft_type, "value", peft_type)) != "LORA":
            raise InvalidInput(f"adapter {name!r} is a {peft_type} adapter; only LoRA adapters are accepted")
        tmp = self.new_tmp_dir()
        try:
            save_dir = tmp / "_save"
            peft_model.save_pretrained(str(save_dir), selected_adapters=[name], safe_serialization=True)
            # peft writes non-default adapters into a sub-folder named after the adapter.
            src = save_dir if name == "default" else save_dir / name
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                os.replace(src / fname, tmp / fname)
            shutil.rmtree(save_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.finish_staging(tmp)

    def finish_staging(self, tmp: Path) -> StagedAdapter:
        """Fsync, re-validate and hash the staged copy (the source may have changed since it was
        checked); on any failure the staging folder is removed."""
        try:
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                _fsync_file(tmp / fname)
            _fsync_dir(tmp)
            peft_config = read_lora_config(tmp / CONFIG_FILE)
            shapes = read_safetensors_header(tmp / WEIGHTS_FILE)
            return StagedAdapter(
                path=tmp,
                weights_sha256=sha256_file(tmp / WEIGHTS_FILE),
                config_sha256=sha256_file(tmp / CONFIG_FILE),
                bytes=(tmp / WEIGHTS_FILE).stat().st_size + (tmp / CONFIG_FILE).stat().st_size,
                peft_config=peft_config,
                shapes=shapes,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, staged: StagedAdapter) -> str:
        """Make staged content visible under its key (atomic rename); dedupe identical content.

        The folder's mtime is set to now at the rename (and when an existing folder is reused), so
        until the catalog row is inserted it is a *young* orphan that ``gc`` leaves alone during its
        grace period.
        """
        self.ensure()
        final = self.path(staged.key)
        if final.exists():
            _touch(final)
            shutil.rmtree(staged.path, ignore_errors=True)
            return staged.key
        _touch(staged.path)
        try:
            os.rename(staged.path, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(staged.path, ignore_errors=True)  # a concurrent writer won the race
        _touch(final)
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
    """Copy a stored adapter to ``dest`` atomically, with a provenance file beside the PEFT files.

    ``dest`` must be a new or an empty folder; anything else is refused with ``InvalidInput``.
    """
    dest = Path(dest)
    with atomic_folder(dest, replace_empty=True, label="export destination") as tmp:
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(src / fname, tmp / fname)
        (tmp / "adapters_mgr.json").write_text(json.dumps(provenance, indent=2, default=str))
    return dest


def read_provenance(folder: Path) -> dict[str, Any]:
    """The ``adapters_mgr.json`` that :func:`export_folder` writes beside the PEFT files ({} if none)."""
    prov_file = folder / "adapters_mgr.json"
    if not prov_file.is_file():
        return {}
    try:
        provenance = json.loads(prov_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{prov_file} is not valid JSON: {exc}; fix or remove it") from exc
    bad = not isinstance(provenance, dict) or any(
        not isinstance(provenance.get(k, {}), dict) for k in ("adapter", "base")
    )
    if bad:
        raise InvalidInput(
            f"{prov_file} is not an adapters_mgr provenance file (expected a JSON object with 'adapter' and "
            "'base' objects); fix or remove it"
        )
    return provenance
