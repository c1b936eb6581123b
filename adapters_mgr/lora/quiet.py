"""Known deprecation warnings of our dependencies, silenced where we call the dependency.

Why: a deprecation inside transformers or peft is not the user's to act on, yet it printed once per
training (peft's ``PeftModel`` constructor calls transformers' deprecated
``is_gradient_checkpointing``, a ``FutureWarning``), which buried the lines that matter in every log.
Each entry below names the message *and* the module that warns, so nothing else is hidden: our own
warnings, and any new warning of a dependency, still show. The filters apply only inside
:func:`known_warnings_silenced`, never process-wide, so a user's own calls into peft are untouched.
Drop an entry when the dependency versions we support no longer warn.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """One dependency warning: its category, a regex its message starts with, the module raising it."""

    category: type[Warning]
    message: str
    module: str
    why: str


KNOWN: tuple[KnownWarning, ...] = (
    KnownWarning(
        FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.",
        "peft (0.21) calls it in PeftModel.__init__; transformers 5.x deprecates it for v6",
    ),
)


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Inside: the :data:`KNOWN` dependency warnings are ignored; every other warning shows as before.

    ``warnings.catch_warnings`` swaps the process's filter list, so keep the block short (one call into
    the dependency), not around a whole training run.
    """
    with warnings.catch_warnings():
        for known in KNOWN:
            warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
        yield


__all__ = ["KNOWN", "KnownWarning", "known_warnings_silenced"]
