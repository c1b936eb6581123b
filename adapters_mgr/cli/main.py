"""The ``adapters-mgr`` command: a thin shell over :class:`AdapterManager`.

Typer (on Click) gives typed options, help and completion for free; rich draws the tables and
trees. Every listing takes ``--json``. Errors print one line and exit non-zero (the exit code says
which kind, see :mod:`adapters_mgr.errors`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from adapters_mgr.catalog.lineage import batch_summary
from adapters_mgr.catalog.records import Adapter
from adapters_mgr.cli.data import data_app
from adapters_mgr.cli.options import JsonOpt, WideOpt, parse_json_option, with_dataclass_options
from adapters_mgr.cli.render import (
    TABLE_ROWS,
    cap_rows,
    console,
    err_console,
    fmt,
    item_titles,
    lineage_tree,
    primary_metric_text,
    print_json,
    print_literal_table,
    prior_lift,
    prior_lift_text,
    say,
    table_fetch_limit,
    warn,
)
from adapters_mgr.errors import AdaptersMgrError, InvalidInput, NotFound, first_line
from adapters_mgr.manager import AdapterManager
from adapters_mgr.store import GC_GRACE_SECONDS
from adapters_mgr.workflows.config import UpdateConfig

try:  # Typer >= 0.2x carries its own copy of Click; older Typer raises click's own exceptions
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

# A group called bare (e.g. `adapters-mgr data`) raises this to show its help; Click < 8.2 has none.
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    c for c in [getattr(click_exceptions, "NoArgsIsHelpError", None)] if c is not None
)

app = typer.Typer(
    name="adapters-mgr",
    help="Incremental LoRA adapters for BERT recommenders: catalog, lineage, aliases, rollback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
alias_app = typer.Typer(help="List, set or remove aliases (movable pointers such as production).")
app.add_typer(alias_app, name="alias")
app.add_typer(data_app, name="data")


@dataclass
class CliState:
    """What the root callback parsed: where the catalog lives and how to report errors."""

    root: Path | None = None
    debug: bool = False
    _manager: AdapterManager | None = field(default=None, repr=False)

    def manager(self) -> AdapterManager:
        if self._manager is None:
            self._manager = AdapterManager(self.root)
        return self._manager


def _mgr(ctx: typer.Context) -> AdapterManager:
    state: CliState = ctx.obj
    return state.manager()


@app.callback()
def _root(
    ctx: typer.Context,
    root: Annotated[
        Path | None,
        typer.Option("--root", envvar="ADAPTERS_MGR_ROOT", help="Manager root folder (default ./.adapters)."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.", metavar="")] = False,
) -> None:
    ctx.obj = CliState(root=root, debug=debug)


LS_COLUMNS = ["id", "adapter", "kind", "task", "aliases", "status", "metrics", "created"]
LS_KEEP = ("id", "adapter", "aliases", "metrics")  # never cut: what a row is, where it serves, how good
LS_DROP = ("created", "task", "kind", "status")  # left out in this order when 80 columns cannot hold them


@app.command()
def init(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Create the root folder, the catalog and the store (safe to repeat)."""
    info = _mgr(ctx).init()
    if json_out:
        print_json(info)
    else:
        say(f"initialised {info['root']} (catalog {info['catalog']})")


@app.command("register-base")
def register_base(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Checkpoint folder, hub id, or 'default' (embedded MiniLM).")] = (
        "default"
    ),
    name: Annotated[str | None, typer.Option(help="Human name for the base.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a base model by the sha256 of its weights."""
    mgr = _mgr(ctx)
    base_id = mgr.register_base(source, name=name)
    row = mgr.base(base_id)
    if json_out:
        print_json(row)
    else:
        say(f"base {base_id} ({row['name']}, {row['num_parameters']:,} parameters)")


@app.command()
def bases(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List registered base models."""
    rows = _mgr(ctx).bases()
    if json_out:
        print_json(rows)
    else:
        print_literal_table(rows, ["id", "name", "architecture", "num_parameters", "source", "created_at"],
                            title="bases", keep=("id", "name", "num_parameters"), drop=("created_at", "architecture"))


@app.command()
def register(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="A PEFT adapter folder (safetensors).")],
    name: Annotated[str, typer.Option(help="Adapter name; versions count up per name.")],
    base: Annotated[str | None, typer.Option(help="Base id or name (default: from adapter_config.json).")] = None,
    parent: Annotated[list[str] | None, typer.Option(help="Parent ref, or REF:RELATION[:WEIGHT].")] = None,
    batch: Annotated[list[str] | None, typer.Option(help="Training data batch id (repeatable).")] = None,
    eval_batch: Annotated[list[str] | None, typer.Option(help="Evaluation data batch id (repeatable).")] = None,
    metrics: Annotated[str | None, typer.Option(help='Metrics as JSON, e.g. \'{"auc": 0.71}\'.')] = None,
    task: Annotated[str | None, typer.Option(help="ranker, retriever, or your own task name.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register an adapter trained elsewhere (a standard PEFT folder)."""
    mgr = _mgr(ctx)
    parents = [_parse_parent(p) for p in parent or []]
    metric_values = parse_json_option(metrics, "--metrics", '{"auc": 0.71}', object_only=True)
    aid = mgr.register(folder, name=name, base=base, parents=parents, batches=batch or [],
                       eval_batches=eval_batch or [], metrics=metric_values, task=task)
    _print_node(mgr.get(aid), json_out, verb="registered")


def _parse_parent(text: str) -> tuple[Any, ...]:
    parts = text.split(":")
    if len(parts) == 1:
        return (parts[0],)
    if len(parts) == 2:
        return (parts[0], parts[1])
    try:
        return (parts[0], parts[1], float(parts[2]))
    except ValueError as exc:
        raise InvalidInput(f"invalid parent {text!r}: use REF, REF:RELATION or REF:RELATION:WEIGHT") from exc


def _print_node(node: Any, json_out: bool, verb: str | None = None) -> None:
    if json_out:
        print_json(node.to_dict())
    elif verb:
        say(f"{verb} adapter {node.id} ({node.ref}, {node.kind}, {node.bytes or 0:,} bytes)")


@app.command("ls")
def ls(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="Only this adapter name.")] = None,
    kind: Annotated[str | None, typer.Option(help="trained, merged, stack or imported.")] = None,
    alias: Annotated[str | None, typer.Option(help="Only the node this alias points at.")] = None,
    status: Annotated[str, typer.Option(help="active, deleted, missing, corrupt or all.")] = "active",
    base: Annotated[str | None, typer.Option(help="Base id or name.")] = None,
    task: Annotated[str | None, typer.Option(help="ranker, retriever ...")] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="At most this many rows.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help=f"Table: every row (default: newest {TABLE_ROWS}).",
        metavar="")] = False,
    fields: Annotated[str | None, typer.Option(
        help="JSON: only these comma-separated fields per row, e.g. id,name,version,aliases,metrics.")] = None,
    wide: WideOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """List adapters, newest first (--json lists every match unless --limit)."""
    filters = dict(name=name, kind=kind, alias=alias, status=status, base=base, task=task)
    wanted = _json_fields(fields)
    if fields is not None and not json_out:
        raise InvalidInput("--fields picks JSON fields: add --json (the table has its own columns; --wide for all)")
    if json_out:
        text = _mgr(ctx).list_json(**filters, limit=limit)
        if wanted:
            text = json.dumps([{k: row.get(k) for k in wanted} for row in json.loads(text)], indent=2)
        sys.stdout.write(text + "\n")
        return
    adapters = _mgr(ctx).list(**filters, limit=table_fetch_limit(limit, show_all))
    adapters, note = cap_rows(adapters, limit, show_all)
    rows = [
        {"id": a.id, "adapter": a.ref, "kind": a.kind, "task": a.task, "status": a.status,
         "aliases": a.aliases, "metrics": primary_metric_text(a.metrics),
         "created": a.created_at.strftime("%m-%d %H:%M")}
        for a in adapters
    ]
    print_literal_table(rows, LS_COLUMNS, title=f"{len(rows)} adapter(s)" + (f" ({note})" if note else ""),
                        keep=LS_KEEP, drop=LS_DROP, wide=wide)


def _to_minutes(rows: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """Rows with one time column as ``YYYY-MM-DD HH:MM`` text (for a table; JSON keeps the full time)."""
    return [{**r, column: r[column].strftime("%Y-%m-%d %H:%M")} if isinstance(r.get(column), datetime) else r
            for r in rows]


def _json_fields(fields: str | None) -> list[str]:
    """``--fields id,name`` as a checked list (an unknown name: one line with the valid ones)."""
    if fields is None:
        return []
    wanted = [f.strip() for f in fields.split(",") if f.strip()]
    valid = [f.name for f in dataclasses.fields(Adapter)]
    unknown = [f for f in wanted if f not in valid]
    if unknown or not wanted:
        raise InvalidInput(f"invalid --fields {fields!r}: use comma-separated names among {', '.join(valid)}")
    return wanted


@app.command()
def show(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Id, NAME@VERSION or alias.")],
         json_out: JsonOpt = False) -> None:
    """Everything the catalog knows about one node."""
    mgr = _mgr(ctx)
    lin = mgr.lineage(ref, depth=1)
    node = lin.root
    data = node.to_dict()
    data["parents"] = [e.to_dict() for e in lin.parents_of(node.id)]
    data["children"] = [e.to_dict() for e in lin.children_of(node.id)]
    data["batches"] = lin.batches.get(node.id, [])
    if json_out:
        print_json(data)
        return
    order = ["id", "name", "version", "kind", "task", "status", "aliases", "base_id", "lora_rank", "lora_alpha",
             "target_modules", "trainable_params", "bytes", "weights_sha256", "stack_mode", "metrics",
             "hyperparams", "description", "created_at"]
    rows = [{"field": k, "value": fmt(data.get(k))} for k in order if data.get(k) not in (None, [], {})]
    rows += [{"field": "parent", "value": f"#{e['parent_id']} {e['relation']}"
              + (f" w={e['weight']:g}" if e["weight"] is not None else "")} for e in data["parents"]]
    rows += [{"field": "child", "value": f"#{e['child_id']} {e['relation']}"} for e in data["children"]]
    for role in dict.fromkeys(b["role"] for b in data["batches"]):  # one row per role, batches as runs
        links = [b for b in data["batches"] if b["role"] == role]
        total = sum(b["num_rows"] or 0 for b in links)
        rows.append({"field": f"batch ({role})",
                     "value": batch_summary(links).removeprefix(f"{role} ") + f", rows={total:,}"})
    print_literal_table(rows, ["field", "value"], title=f"adapter {node.id} ({node.ref})", fold=["value"])


@app.command()
def lineage(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Id, NAME@VERSION or alias.")],
    depth: Annotated[int | None, typer.Option(min=0, help="Stop after this many generations each way.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="tree, json or mermaid.")] = "tree",
    full: Annotated[bool, typer.Option(
        "--full", help="Tree: every batch one by one (not as runs), every generation of long linear runs, and "
                       "each stack member's own ancestry.", metavar="")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Ancestors and descendants of a node with relations, data batches and metrics."""
    if output_format not in ("tree", "json", "mermaid"):
        raise InvalidInput(f"invalid --format {output_format!r}: use tree, json or mermaid")
    lin = _mgr(ctx).lineage(ref, depth=depth)
    if json_out or output_format == "json":
        print_json(lin.to_dict())
    elif output_format == "mermaid":
        sys.stdout.write(lin.to_mermaid() + "\n")
    else:
        console.print(lineage_tree(lin, full=full))


@alias_app.callback(invoke_without_command=True)
def alias_list(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List aliases (when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _mgr(ctx).aliases()
    if json_out:
        print_json(rows)
    else:
        print_literal_table(_to_minutes(rows, "updated_at"), ["alias", "adapter_id", "ref", "status", "updated_at"],
                            title="aliases", keep=("alias", "adapter_id", "ref", "status", "updated_at"),
                            drop=("updated_at", "status"))


@alias_app.command("set")
def alias_set(ctx: typer.Context, alias: str, ref: str,
              reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
              json_out: JsonOpt = False) -> None:
    """Point ALIAS at REF."""
    target = _mgr(ctx).set_alias(alias, ref, reason=reason)
    _moved(alias, target, json_out)


@alias_app.command("rm")
def alias_rm(ctx: typer.Context, alias: str, json_out: JsonOpt = False) -> None:
    """Remove ALIAS (its history stays)."""
    previous = _mgr(ctx).remove_alias(alias)
    if json_out:
        print_json({"alias": alias, "removed": True, "was": previous})
    else:
        say(f"removed alias {alias} (was #{previous})")


def _moved(alias: str, target: int, json_out: bool, verb: str = "now points at") -> None:
    if json_out:
        print_json({"alias": alias, "adapter_id": target})
    else:
        say(f"{alias} {verb} adapter {target}")


@app.command()
def promote(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Id, NAME@VERSION or alias.")],
            alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
            reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
            json_out: JsonOpt = False) -> None:
    """Point an alias (default production) at REF."""
    _moved(alias, _mgr(ctx).promote(ref, alias, reason=reason), json_out)


@app.command()
def rollback(ctx: typer.Context, alias: Annotated[str, typer.Argument(help="Alias to move back.")] = "production",
             to: Annotated[str | None, typer.Option(help="Target (default: the previous one).")] = None,
             reason: Annotated[str | None, typer.Option(help="Why, for the history.")] = None,
             json_out: JsonOpt = False) -> None:
    """Move an alias back to its previous target (or --to a given one). Nothing is deleted."""
    _moved(alias, _mgr(ctx).rollback(alias, to, reason=reason), json_out, verb="rolled back to")


@app.command()
def history(ctx: typer.Context, alias: Annotated[str | None, typer.Argument(help="One alias (default all).")] = None,
            json_out: JsonOpt = False) -> None:
    """Every move of an alias: set, promote, rollback, remove."""
    rows = _mgr(ctx).alias_history(alias)
    if alias is not None and not rows:  # never set, promoted or removed: as unknown as `rollback` finds it
        raise NotFound(f"no alias {alias!r} has ever existed; list them with `adapters-mgr alias`")
    if json_out:
        print_json(rows)
    else:
        print_literal_table(_to_minutes(rows, "moved_at"),
                            ["id", "alias", "action", "from_id", "to_id", "reason", "moved_at"], title="alias history",
                            keep=("id", "alias", "action", "from_id", "to_id", "moved_at"), fold=["reason"])


@app.command()
def events(ctx: typer.Context, limit: Annotated[int, typer.Option(min=0, help="Newest N events.")] = 30,
           operation: Annotated[str | None, typer.Option(help="Only this operation.")] = None,
           json_out: JsonOpt = False) -> None:
    """The append-only event log of mutating operations."""
    rows = _mgr(ctx).events(limit=limit, operation=operation)
    if json_out:
        print_json(rows)
    else:
        print_literal_table(_to_minutes(rows, "ts"), ["id", "ts", "operation", "outcome", "args", "detail"],
                            title="events", keep=("id", "ts", "operation", "outcome"))


@app.command()
def delete(ctx: typer.Context, ref: str,
           force: Annotated[bool, typer.Option(help="Delete even if an alias or descendant needs it.",
               metavar="")] = False,
           reason: Annotated[str | None, typer.Option(help="Why, for the event log.")] = None,
           json_out: JsonOpt = False) -> None:
    """Soft-delete a node (rows and files stay; `restore` undoes it)."""
    node_id = _mgr(ctx).delete(ref, force=force, reason=reason)
    if json_out:
        print_json({"id": node_id, "status": "deleted"})
    else:
        say(f"deleted adapter {node_id} (soft; `adapters-mgr restore {node_id}` undoes it)")


@app.command()
def restore(ctx: typer.Context, ref: str, json_out: JsonOpt = False) -> None:
    """Undo a soft delete."""
    node_id = _mgr(ctx).restore(ref)
    if json_out:
        print_json({"id": node_id, "status": "active"})
    else:
        say(f"restored adapter {node_id}")


@app.command()
def verify(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Check every stored file against the catalog; exit 1 when something is wrong."""
    report = _mgr(ctx).verify()
    if json_out:
        print_json(report)
    elif report["ok"]:
        say(f"ok: {report['adapters_checked']} adapter(s), {report['folders']} folder(s) verified")
    else:
        print_literal_table(report["problems"], ["kind", "adapter_id", "store_key", "detail"], title="problems",
                            keep=("kind", "adapter_id"), fold=["detail"])
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def gc(ctx: typer.Context, dry_run: Annotated[bool, typer.Option(help="Only say what would be done.",
    metavar="")] = False,
       grace: Annotated[float, typer.Option(
           min=0, help="Keep orphan/staging folders changed less than this many seconds ago: they may belong "
                       "to a registration still running in another process. 0 after a crash.")] = GC_GRACE_SECONDS,
       json_out: JsonOpt = False) -> None:
    """Remove orphans and staging leftovers; mark missing/corrupt rows (rows are never deleted)."""
    report = _mgr(ctx).gc(dry_run=dry_run, grace=grace)
    if json_out:
        print_json(report)
    elif not report["actions"]:
        say("nothing to clean")
    else:
        print_literal_table(report["actions"], ["action", "adapter_id", "store_key", "path"],
                            title="would do" if dry_run else "done", keep=("action", "adapter_id"), fold=["path"])


@app.command()
def export(ctx: typer.Context, ref: str, folder: Path, json_out: JsonOpt = False) -> None:
    """Copy an adapter out as a standard PEFT folder (plus adapters_mgr.json provenance)."""
    dest = _mgr(ctx).export(ref, folder)
    if json_out:
        print_json({"ref": ref, "folder": str(dest)})
    else:
        say(f"exported {ref} to {dest}")


@app.command("import")
def import_(ctx: typer.Context, folder: Path,
            name: Annotated[str | None, typer.Option(help="Adapter name (default: from provenance or folder).")] = None,
            base: Annotated[str | None, typer.Option(help="Base id or name.")] = None,
            task: Annotated[str | None, typer.Option(help="Task name.")] = None,
            json_out: JsonOpt = False) -> None:
    """Register an outside PEFT folder as an imported node."""
    mgr = _mgr(ctx)
    aid = mgr.import_peft(folder, name=name, base=base, task=task)
    _print_node(mgr.get(aid), json_out, verb="imported")


@app.command()
def stack(ctx: typer.Context, refs: Annotated[list[str], typer.Argument(help="Adapters to stack, in order.")],
          weights: Annotated[str | None, typer.Option(help="Comma-separated weights, one per adapter.")] = None,
          mode: Annotated[str, typer.Option(help="weights (summed deltas) or ensemble (averaged outputs).")] = (
              "weights"
          ),
          name: Annotated[str | None, typer.Option(help="Name of the stack node.")] = None,
          json_out: JsonOpt = False) -> None:
    """Register a stack node: several adapters active at once."""
    mgr = _mgr(ctx)
    node_id = mgr.stack(refs, _parse_weights(weights), mode, name=name)
    _print_node(mgr.get(node_id), json_out, verb="stacked")


# what `train` accepts, checked before anything heavy loads (a test keeps them equal to the task and
# policy registries, which import torch)
TRAIN_TASKS = ("ranker", "retriever")
TRAIN_POLICIES = ("fresh", "warm_start", "stack", "long_short")


@app.command()
@with_dataclass_options(UpdateConfig, after="batches")
def train(
    ctx: typer.Context,
    batches: Annotated[list[str] | None, typer.Argument(help="Batch ids to train on (default: the latest).")] = None,
    parent: Annotated[str | None, typer.Option(help="Parent node (id, NAME@VERSION or alias).")] = None,
    name: Annotated[str | None, typer.Option(help="Adapter name (default: the task).")] = None,
    base: Annotated[str | None, typer.Option(help="Base id or name (default: parent's, else embedded MiniLM).")] = None,
    eval_batch: Annotated[list[str] | None, typer.Option(help="Eval batch (default: the next one in time).")] = None,
    promote: Annotated[str | None, typer.Option(help="always or if_better.")] = None,
    alias: Annotated[str, typer.Option(help="Alias the gate compares with and moves.")] = "production",
    tolerance: Annotated[float, typer.Option(help="if_better: allowed drop of the primary metric.")] = 0.0,
    json_out: JsonOpt = False,
    **config: Any,
) -> None:
    """Train an incremental LoRA update on data batches; register it with lineage; optionally promote."""
    # **config: one option per UpdateConfig field (--task ... --max-eval-rows), its default and help from there
    for option, value, choices in (("--task", config.get("task"), TRAIN_TASKS),
                                   ("--policy", config.get("policy"), TRAIN_POLICIES),
                                   ("--promote", promote, (None, "always", "if_better"))):
        if value not in choices:  # refused before torch is imported or any model loaded
            raise InvalidInput(f"invalid {option} {value!r}: use one of {', '.join(c for c in choices if c)}")
    result = _mgr(ctx).train_update(
        batches or "latest", **config, parent=parent, name=name, base=base, eval_batches=eval_batch or None,
        promote=promote, alias=alias, tolerance=tolerance, progress=not json_out,
    )
    if (getattr(result, "extra", None) or {}).get("role") == "worker":  # other processes of a launch: rank 0 reports
        return
    if json_out:
        print_json(result.__dict__)
        return
    metric = result.metrics.get("primary_metric")
    line = f"trained node {result.node_id} (adapter {result.adapter_id}) on {', '.join(result.train_batches)}: "
    line += f"{metric}={fmt(result.metrics.get(metric))}" + prior_lift_text(result.metrics)
    if result.baseline:
        line += f" vs {alias} #{result.baseline['node_id']} {fmt(result.baseline.get(metric))}"
    if result.decision:
        line += f"; {'promoted to ' + alias if result.promoted else 'kept ' + alias}"
    say(line)
    lift = prior_lift(result.metrics)
    if lift is not None and lift <= 0:
        warn(f"warning: node {result.node_id} ranks its eval rows no better than its prior alone (AUC "
             f"{fmt(result.metrics['auc'])} vs {fmt(result.metrics['prior_auc'])}): it learned nothing worth "
             "serving; try a lower --lr (a long run at a high rate can collapse to the prior) or more rows")


@app.command()
def reproduce(ctx: typer.Context, ref: str, json_out: JsonOpt = False) -> None:
    """Re-train a recorded adapter from its recorded config and batches; exit 1 unless the bytes match."""
    report = _mgr(ctx).reproduce(ref)
    if json_out:
        print_json(report)
    else:
        verdict = "identical" if report["identical"] else "DIFFERENT"
        say(f"adapter {report['adapter_id']}: reproduced weights are {verdict} "
             f"({report['reproduced_sha256'][:12]}… vs recorded {report['recorded_sha256'][:12]}…)")
    if not report["identical"]:
        raise typer.Exit(1)


@app.command()
def merge(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(help="Adapters (or a stack node) to merge, oldest first.")],
    method: Annotated[str, typer.Option(help="cat, svd, linear, ties, dare_linear or dare_ties.")] = "cat",
    weights: Annotated[str | None, typer.Option(help="Comma-separated weights, one per adapter.")] = None,
    target_rank: Annotated[int | None, typer.Option(min=1, help="Rank of the result (svd and *_svd methods).")] = None,
    density: Annotated[float | None, typer.Option(help="Kept fraction for ties/dare, in (0, 1].")] = None,
    name: Annotated[str | None, typer.Option(help="Name of the merged adapter.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Merge adapters into one new adapter (merged_from edges, recipe and reconstruction error recorded)."""
    mgr = _mgr(ctx)
    node_id = mgr.merge(refs, method, _parse_weights(weights), target_rank=target_rank, density=density, name=name)
    node = mgr.get(node_id)
    if json_out:
        print_json(node.to_dict())
    else:
        err = (node.metrics or {}).get("reconstruction_error")
        say(f"merged into adapter {node.id} ({node.ref}, {method}, reconstruction error {fmt(err)})")


def _parse_weights(weights: str | None) -> list[float] | None:
    try:
        return [float(w) for w in weights.split(",")] if weights else None
    except ValueError as exc:
        raise InvalidInput(f"invalid --weights {weights!r}: give numbers separated by commas") from exc


@app.command()
def fold(ctx: typer.Context, ref: str, folder: Path, json_out: JsonOpt = False) -> None:
    """Export base + the node's deltas as a plain transformers checkpoint folder."""
    out = _mgr(ctx).fold(ref, folder)
    if json_out:
        print_json({"ref": ref, "folder": str(out)})
    else:
        say(f"folded {ref} into {out} (loads with transformers from_pretrained, no peft needed)")


@app.command()
def compact(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias whose stack to compact.")] = "production",
    max_depth: Annotated[int, typer.Option(min=1, help="Compact stacks of more adapters than this.")] = 4,
    method: Annotated[str, typer.Option(help="cat (lossless) or svd (small, with --target-rank).")] = "cat",
    target_rank: Annotated[int | None, typer.Option(min=1, help="Rank for svd.")] = None,
    tolerance: Annotated[float, typer.Option(help="Allowed drop of the primary metric to move the alias.")] = 0.005,
    eval_batch: Annotated[list[str] | None, typer.Option(help="Batches to evaluate on.")] = None,
    max_eval_rows: Annotated[int | None, typer.Option(min=1, help="Subsample eval rows (as train did).")] = None,
    seed: Annotated[int, typer.Option(help="Subsample seed (as train's --seed).")] = 0,
    max_length: Annotated[int, typer.Option(min=8, help="Max tokens per text pair.")] = 64,
    json_out: JsonOpt = False,
) -> None:
    """Merge a deep stack into one adapter; move the alias only if it evaluates within tolerance."""
    report = _mgr(ctx).compact(alias, max_depth=max_depth, method=method, target_rank=target_rank,
                               tolerance=tolerance, eval_batches=eval_batch or None, max_eval_rows=max_eval_rows,
                               seed=seed, max_length=max_length)
    if json_out:
        print_json(report)
    elif not report["compacted"]:
        say(f"nothing to do: {report['reason']}")
    else:
        verdict = f"{alias} moved to {report['merged']}" if report["moved"] else f"{alias} kept on {report['stack']}"
        say(f"compacted stack {report['stack']} into adapter {report['merged']}: {report['metric']} "
             f"{fmt(report['merged_metric'])} vs {fmt(report['stack_metric'])} on {report['eval_label']}; {verdict}")


@app.command()
def recommend(
    ctx: typer.Context,
    user: str,
    alias: Annotated[str, typer.Option(help="Retriever node or alias.")] = "production",
    ranker: Annotated[str | None, typer.Option(help="Ranker node or alias to rerank the top candidates.")] = None,
    k: Annotated[int, typer.Option(min=1, help="How many items.")] = 10,
    top_m: Annotated[int, typer.Option(min=1, help="Candidates the ranker reranks.")] = 50,
    include_seen: Annotated[bool, typer.Option(help="Also recommend items the user already interacted with.",
        metavar="")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Top-K items for one user, computed now (retriever over the catalog, optional ranker rerank)."""
    mgr = _mgr(ctx)
    _check_user(mgr, user)  # before the scorer loads a model
    scorer = mgr.scorer(alias, ranker=ranker)
    try:
        recs = scorer.recommend(user, k, exclude_seen=not include_seen, top_m=top_m)
        nodes = scorer.active_nodes
    finally:
        scorer.close()
    titles = item_titles(mgr, [r["item_id"] for r in recs])
    for rank, rec in enumerate(recs, start=1):
        rec["rank"] = rank
        rec["title"] = titles.get(rec["item_id"])
    if json_out:
        print_json({"user": user, "nodes": nodes, "items": recs})
    else:
        served = ", ".join(f"{role} #{node}" for role, node in nodes.items()) if isinstance(nodes, dict) else nodes
        print_literal_table(recs, ["rank", "item_id", "title", "score"], title=f"user {user}: {served}",
                            keep=("rank", "item_id", "score"))


def _check_user(mgr: AdapterManager, user: str) -> None:
    """``NotFound`` (exit 3) for a user with neither a user row nor an interaction in the catalog.

    Why refuse instead of recommending as a cold user: an unknown id is far more often a typo or
    the wrong catalog than a new user, and a cold-start list printed for it looked like a real answer.
    """
    rows = mgr.catalog.query(
        "SELECT 1 AS hit FROM users WHERE user_id::VARCHAR = ? UNION ALL "
        "SELECT 1 FROM interactions WHERE user_id::VARCHAR = ? LIMIT 1", [user, user])
    if not rows:
        raise NotFound(f"no user {user!r} in the catalog (no user row, no interaction); users come from "
                       "`adapters-mgr data sync`")


@app.command()
def recompute(
    ctx: typer.Context,
    alias: Annotated[str, typer.Option(help="Retriever alias or node.")] = "production",
    users: Annotated[str, typer.Option(help="changed (new events since the last run) or all.")] = "changed",
    k: Annotated[int, typer.Option(min=1, help="List length.")] = 10,
    ranker: Annotated[str | None, typer.Option(help="Ranker node or alias to rerank the top candidates.")] = None,
    top_m: Annotated[int, typer.Option(min=1, help="Candidates the ranker reranks.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Recompute top-K lists into the recommendations table (one atomic run, with the node that made it)."""
    report = _mgr(ctx).recompute(alias, users=users, k=k, ranker=ranker, top_m=top_m, progress=not json_out)
    if json_out:
        print_json(report)
    else:
        say(f"run {report['run_id']}: {report['users']} user(s), {report['rows']} rows from node "
             f"{report['node_id']}" + (f" reranked by {report['ranker_node_id']}" if report["ranker_node_id"]
                                       else "") + f" in {report['wall_s']:.1f}s")


@app.command()
def score(
    ctx: typer.Context,
    pairs: Annotated[Path, typer.Argument(
        help="CSV or JSONL with user_id,item_id (or user_text,item_text, + prior_logit for a ranker with the prior).")],
    ref: Annotated[str, typer.Option("--node", help="Node or alias to score with.")] = "production",
    output: Annotated[Path | None, typer.Option(help="Write scores here (CSV); default stdout.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Score a file of pairs: catalog ids (texts rendered from the catalog) or raw texts."""
    if not pairs.exists():
        raise InvalidInput(f"pairs file {pairs} does not exist")
    if pairs.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    else:
        with open(pairs, newline="") as fh:
            rows = list(csv.DictReader(fh))
    if not rows:
        raise InvalidInput(f"pairs file {pairs} has no rows")
    mgr = _mgr(ctx)
    scorer = mgr.scorer(ref)
    try:
        if {"user_text", "item_text"} <= set(rows[0]):
            prior_logits = [float(r["prior_logit"]) for r in rows] if "prior_logit" in rows[0] else None
            values = scorer.score_texts([r["user_text"] for r in rows], [r["item_text"] for r in rows],
                                        prior_logits=prior_logits)
        elif {"user_id", "item_id"} <= set(rows[0]):
            values = scorer.score([r["user_id"] for r in rows], [r["item_id"] for r in rows])
        else:
            raise InvalidInput(f"{pairs} needs columns user_id,item_id or user_text,item_text; got {sorted(rows[0])}")
        node = scorer.active
    finally:
        scorer.close()
    out_rows = [{**r, "score": float(v), "node_id": node} for r, v in zip(rows, values, strict=True)]
    if json_out:
        print_json(out_rows)
        return
    target = open(output, "w", newline="") if output else sys.stdout  # noqa: SIM115 - stdout is not ours to close
    try:
        writer = csv.DictWriter(target, fieldnames=list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    finally:
        if output:
            target.close()


@app.command()
def demo(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option(help="Tiny random BERT + synthetic stream: the whole flow in ~1 min.",
        metavar="")] = False,
    full: Annotated[bool, typer.Option(help="The whole MovieLens stream, no subsampling (hours on CPU).",
        metavar="")] = False,
    report: Annotated[Path | None, typer.Option(help="Report folder (default ROOT/report).")] = None,
) -> None:
    """The MovieLens incremental-update demo: sync, train, gated weekly updates, lineage, compaction,
    rollback followed by a running scorer, recomputed recommendations, and a report folder."""
    from adapters_mgr.demo import run_demo  # heavy (torch): only `adapters-mgr demo` pays for it

    state: CliState = ctx.obj
    root = Path(state.root) if state.root is not None else Path(".adapters-demo")
    run_demo(root, quick=quick, full=full, report_dir=report)


def _click_error_line(exc: click_exceptions.ClickException) -> str:
    """Click's error as one line, instead of its Usage/Try/Error block: the message and where help is."""
    message = " ".join(exc.format_message().split())
    if not isinstance(exc, click_exceptions.UsageError):
        return f"error: {message}"
    command = exc.ctx.command_path if exc.ctx is not None else "adapters-mgr"
    return f"error: {message} (see '{command} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning our errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ADAPTERS_MGR_DEBUG") == "1"
    try:
        code = app(args=args, prog_name="adapters-mgr", standalone_mode=False)
        if isinstance(code, int) and code:  # click returns typer.Exit codes when not standalone
            sys.exit(code)
    except AdaptersMgrError as exc:
        if debug:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted", markup=False)
        sys.exit(130)
    except _NO_ARGS_IS_HELP as exc:  # a group called bare: its help is the answer
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except click_exceptions.ClickException as exc:  # bad option value, missing argument, unknown command ...
        err_console.print(_click_error_line(exc), markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # anything unexpected
        if debug:
            raise
        err_console.print(f"error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
