"""Fetch MovieLens-100K into the cache folder (GroupLens, else RecBole's wheel on PyPI).

    python scripts/fetch_movielens.py [--cache DIR]

The data is never committed (its licence forbids redistribution); it lives only in the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_mgr.data import movielens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="default: $ADAPTERS_MGR_CACHE or ~/.cache/adapters-mgr")
    args = ap.parse_args()
    print(movielens.fetch(args.cache, progress=print))


if __name__ == "__main__":
    main()
