"""Crash injection for tests: ``ADAPTERS_MGR_FAULT=register:renamed`` kills the process right there.

Why an environment variable: crash-consistency tests run the real code in a subprocess and need it
to die at an exact point (after staging, after the rename, inside the open transaction) without
any test-only branches leaking into the API.
"""

from __future__ import annotations

import os


def maybe_crash(point: str) -> None:
    """Hard-exit (no cleanup, no finally blocks) when the fault hook names this point."""
    wanted = os.environ.get("ADAPTERS_MGR_FAULT")
    if wanted and wanted == point:
        os._exit(137)
