"""The ``appliance`` commands that go back in time: history, restore,
cancel, rerun, batch. Each calls the client library (Client.history,
.restore, .cancel_txn, .rerun, .batch: the same from Python), prints for a
human or ``--json``, shows a progress bar on long work and asks before it
changes data unless ``--yes``.
"""
from __future__ import annotations

import json
import sys

import click

from .. import errors

__all__ = ["COMMANDS"]


def _main():
    from . import __main__ as cli
    return cli


CONFIG = click.option("--config", "-c", "config_path", required=True, metavar="FILE",
                      type=click.Path(dir_okay=False), help="the appliance's TOML configuration")
JSON = click.option("--json", "as_json", is_flag=True, help="machine-readable output")
YES = click.option("--yes", is_flag=True, help="do not ask for confirmation")
DRY = click.option("--dry-run", is_flag=True, help="change nothing: list what would change")
TIMEOUT = click.option("--timeout", default=60.0, show_default=True,
                       help="seconds to wait for open transactions to end (new writes wait meanwhile)")


def _connect(config_path: str):
    cli = _main()
    cfg = cli._load(config_path)
    try:
        import appliance
        return appliance.connect(cfg, wait=0)
    except errors.ApplianceError as e:
        raise cli._fail(e) from None


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Refused without --yes (there is no terminal to ask on).")
    click.confirm(question, abort=True)


def _run(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except errors.ApplianceError as e:
        raise _main()._fail(e) from None


def _render():
    """cli.render (and rich) only when a command prints: this module is
    imported by every process the `appliance` command starts."""
    from . import render
    return render


def _json(obj) -> None:
    click.echo(json.dumps(obj, default=_render().jsonable))


@click.command()
@CONFIG
@click.option("--program", help="only transactions run by this program (a T log's program name)")
@click.option("--table", help="only transactions that changed this table")
@click.option("--key", help="only those that changed this record of --table (its primary key)")
@click.option("--since", help="from this serial or time (ISO 8601, or -5m, -2h ...)")
@click.option("--until", help="up to this serial or time")
@click.option("--limit", default=1000, show_default=True, help="at most this many transactions")
@JSON
def history(config_path, program, table, key, since, until, limit, as_json):
    """Which transactions changed a table or a record, in order, with B and A images."""
    if key is not None and table is None:
        raise click.UsageError("--key needs --table")
    db = _connect(config_path)
    try:
        from ..client.recovery import key_of
        k = _run(key_of, db, table, key) if key is not None else None
        res = _run(db.history, program=program, table=table, key=k, since=since, until=until, limit=limit)
    finally:
        db.close()
    if as_json:
        _json(res)
    else:
        _render().history(res)


@click.command()
@CONFIG
@click.option("--to", "to", required=True, help="a serial, or a time (ISO 8601, or -5m, -2h ...)")
@click.option("--table", help="restore only this table")
@click.option("--blocks", help="restore only the records changed in these block numbers (1,2,7-9)")
@DRY
@YES
@TIMEOUT
@JSON
def restore(config_path, to, table, blocks, dry_run, yes, timeout, as_json):
    """Point-in-time restore: B logs applied in reverse back to --to."""
    from ..client.recovery import target_of
    tgt = _run(target_of, to)
    nums = _blocks(blocks) if blocks else None
    db = _connect(config_path)
    try:
        what = f"table {table}" if table else (f"blocks {blocks}" if nums else "the whole database")
        if not dry_run:
            _confirm(yes, f"Restore {what} of {db.name!r} to {tgt.describe()} (every later change to it is "
                          "undone, as a logged transaction)?")
        res = _render().with_progress(f"restore to {tgt.describe()}", lambda: db.restore(
            tgt, table=table, blocks=nums, dry_run=dry_run, timeout=timeout), lambda: _progress(db), _run)
    finally:
        db.close()
    if as_json:
        _json(res)
    else:
        _render().restored(res)


@click.command(name="cancel")
@CONFIG
@click.argument("txn", type=int)
@DRY
@YES
@TIMEOUT
@JSON
def cancel(config_path, txn, dry_run, yes, timeout, as_json):
    """Undo committed transaction TXN everywhere from its B logs."""
    db = _connect(config_path)
    try:
        if not dry_run:
            _confirm(yes, f"Undo transaction {txn} on {db.name!r} and its secondaries?")
        res = _render().with_progress(f"cancel transaction {txn}", lambda: db.cancel_txn(
            txn, dry_run=dry_run, timeout=timeout), lambda: _progress(db), _run)
    finally:
        db.close()
    if as_json:
        _json(res)
    else:
        _render().cancelled(res)


@click.command()
@CONFIG
@click.option("--program", required=True, help="the faulty program, as its T logs name it (module:function)")
@click.option("--fixed", required=True, help="the corrected program (module:function)")
@click.option("--since", help="re-run from its first transaction after this serial or time")
@click.option("--path", "paths", multiple=True, type=click.Path(file_okay=False),
              help="a folder to import programs from (repeatable; also $PYTHONPATH)")
@DRY
@YES
@TIMEOUT
@JSON
def rerun(config_path, program, fixed, since, paths, dry_run, yes, timeout, as_json):
    """Restore to before --program's first transaction, then re-run every later one (it with --fixed)."""
    db = _connect(config_path)
    try:
        if not dry_run:
            _confirm(yes, f"Restore {db.name!r} to before {program}'s first transaction and re-run every "
                          f"later one ({program} with {fixed})?")
        with _render().steps("rerun") as step:
            rep = _run(db.rerun, program, fixed, since=since, dry_run=dry_run, path=tuple(paths),
                       timeout=timeout, progress=step)
    finally:
        db.close()
    out = rep.as_dict()
    if as_json:
        _json(out)
    else:
        _render().rerun(out)


@click.command()
@click.argument("action", type=click.Choice(["begin", "end", "status"]))
@CONFIG
@click.option("--at", help="begin: first rewind to this serial or time (a read-only view of the past)")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="end: wait until the secondary has caught up (progress bar)")
@JSON
def batch(action, config_path, at, wait, as_json):
    """Referential batch mode on a secondary: begin (frozen reads), end (catch up), status."""
    db = _connect(config_path)
    try:
        res = _run(db.batch, action, at)
        if action == "end" and wait:
            res = _render().catch_up(lambda: _run(db.batch, "status"))
    finally:
        db.close()
    if as_json:
        _json(res)
    else:
        _render().batch(action, res)


def _progress(db) -> dict | None:
    try:
        return db.status()["history"]["progress"]
    except errors.ApplianceError:
        return None


def _blocks(text: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise click.BadParameter(f"{text!r}: block numbers like 1,2,7-9", param_hint="--blocks") from None
    if not out:
        raise click.BadParameter("no block numbers", param_hint="--blocks")
    return out


COMMANDS = [history, restore, cancel, rerun, batch]
