"""Serving: the hot-swap engine, the catalog-following Scorer, recomputed recommendations."""
