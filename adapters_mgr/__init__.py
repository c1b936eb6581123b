"""adapters-mgr: incremental LoRA adapters for BERT recommenders, with a DuckDB catalog.

Public API: :class:`AdapterManager` and the error types. Everything else is an implementation detail.
"""

from adapters_mgr.errors import AdaptersMgrError, Conflict, IntegrityError, InvalidInput, Locked, NotFound
from adapters_mgr.manager import AdapterManager

__all__ = ["AdapterManager", "AdaptersMgrError", "Conflict", "IntegrityError", "InvalidInput", "Locked", "NotFound"]
__version__ = "0.1.0"
