"""The knobs of one incremental update, as one dataclass whose fields carry their defaults and help.

Why a separate module: the same record is the Python API's keyword arguments, the ``train`` CLI's
options (built from these fields, so no default is typed twice) and the ``hyperparams`` recorded
with every trained adapter (so ``reproduce`` rebuilds it from the catalog).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


def knob(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - "help" as in argparse / click
    """A dataclass field with CLI metadata: ``help`` and optional ``min`` (inclusive lower bound)."""
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class UpdateConfig:
    """Every knob of one update; recorded verbatim in the new node's ``hyperparams``."""

    # Where each field shows in ``train --help``: one rich table per panel, so a long on/off pair in
    # one group does not squeeze every other option name into an ellipsis at 80 columns.
    cli_panels: ClassVar[dict[str, tuple[str, ...]]] = {
        "Training": ("epochs", "lr", "head_lr", "warmup_ratio", "batch_size", "max_length", "seed",
                     "max_train_rows", "max_eval_rows"),
        "Replay": ("replay_ratio", "replay_recency", "replay_half_life", "replay_relevance"),
        "Stack": ("mode", "new_weight"),
        "Ranker prior": ("prior", "prior_shrinkage"),
        "Retriever popularity": ("popularity", "popularity_events", "popularity_half_life"),
        "Retriever training": ("popularity_logq",),
    }

    task: str = knob("ranker", "ranker (cross-encoder) or retriever (two-tower).")
    policy: str = knob("fresh", "fresh, warm_start, stack or long_short.")
    rank: int = knob(8, "LoRA rank.", min=1)
    alpha: float = knob(16.0, "LoRA alpha (the delta is scaled by alpha / rank).")
    dropout: float = knob(0.05, "LoRA dropout.", min=0.0)
    target_modules: tuple[str, ...] = knob(("query", "value"), "Modules that get a LoRA (comma-separated).")
    top_layers: int | None = knob(None, "LoRA on the top N encoder layers only (none: all): trains faster, the "
                                        "backward pass stops there.", min=1)
    epochs: int = knob(1, "Passes over the training rows.", min=1)
    lr: float = knob(5e-4, "Learning rate.")
    head_lr: float | None = knob(None, "Learning rate of the ranker's head (none: lr). A residual ranker's head "
                                       "starts at 0 and the LoRA learns only once it has grown.", min=1e-12)
    warmup_ratio: float = knob(0.0, "Fraction of steps with a linear lr warm-up (0 = none).", min=0.0)
    batch_size: int = knob(32, "Training batch size.", min=1)
    max_length: int = knob(64, "Max tokens per text pair.", min=8)
    seed: int = knob(0, "Seed (same seed + data = same weights on CPU).")
    replay_ratio: float = knob(0.0, "Replay rows per new row from earlier batches.", min=0.0)
    replay_recency: str | int | None = knob(None, "Replay only from the last N batches, or a span such as 28d.")
    replay_half_life: float | None = knob(None, "Replay weight halves every this many batches back (none: uniform).")
    replay_relevance: float = knob(0.0, "Extra replay weight for rows of the new batch's users and items.", min=0.0)
    mode: str = knob("weights", "How a stack combines: weights (deltas summed) or ensemble (outputs averaged).")
    new_weight: float = knob(1.0, "Weight of the newly trained adapter in the node to serve (stack, long_short).")
    prior: str = knob("auto", "Ranker: bias (score = as-of like-rate prior logit + the model's residual), "
                              "none (the model alone), or auto (the parent's; bias for a fresh ranker, "
                              "none for a retriever).")
    ranker_shape: str = knob("auto", "Ranker model: cross (a cross-encoder reads user and item text together, "
                                     "its own head), tower (user and item encoded apart, residual = scale x "
                                     "cosine + bias, both learned from 0), history (the tower with the user as "
                                     "the items they liked minus those they disliked before), or auto (the "
                                     "parent's; history for a fresh ranker).")
    prior_shrinkage: float = knob(10.0, "Prior 'bias': pseudo-events that shrink user and item like rates "
                                        "toward the global rate.", min=1e-9)
    popularity: str = knob("auto", "Retriever: log (score = sim_weight x cosine + pop_weight x log(1 + the item's "
                                   "as-of interactions), both learned, starting at 0 and 1: a fresh retriever "
                                   "ranks like popularity), none (the cosine alone), or auto (the parent's; log "
                                   "for a fresh retriever).")
    popularity_events: str = knob("auto", "Retriever popularity counts likes or all (events of any label); auto: "
                                          "the parent's, likes for a fresh retriever.")
    popularity_half_life: float | None = knob(None, "Retriever popularity: an event counts 0.5 ** (age in days / "
                                                    "this); none: the parent's, 14 for a fresh retriever; 0: no "
                                                    "decay.", min=0.0)
    popularity_logq: bool = knob(True, "Retriever with popularity 'log': subtract log of each item's in-batch "
                                       "sampling probability from the training logits (logQ correction).")
    max_train_rows: int | None = knob(None, "Seeded subsample of training rows.", min=1)
    max_eval_rows: int | None = knob(None, "Seeded subsample of eval rows.", min=1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> UpdateConfig:
        """The config recorded in an adapter's ``hyperparams`` (other keys there are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in recorded.items() if k in names}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


__all__ = ["UpdateConfig", "knob"]
