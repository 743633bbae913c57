"""Output for the CLI: tables and progress bars (rich). No logic here."""
from __future__ import annotations

import json
import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import errors

console = Console()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status(st: dict) -> None:
    console.print(f"[bold]appliance {st['name']}[/bold]  running (controller pid {st['pid']}), "
                  f"epoch {st['epoch']}, version {st['version']}, up {st['uptime_s']:.0f} s")
    b = st["blocks"]
    console.print(f"blocks: {b['used']} numbers in use of {b['max']}; slots {b['slots_total'] - b['slots_free']} "
                  f"used, {b['slots_free']} free; {b['old_versions_pending']} old versions held for readers")
    t = Table(title="segments (storage devices)")
    for c in ("segment", "size", "slots", "used", "free"):
        t.add_column(c, justify="right" if c != "segment" else "left")
    for s in st["segments"]:
        t.add_row(s["name"], _size(s["size"]), str(s["slots"]), str(s["used"]), str(s["free"]))
    console.print(t)
    t = Table(title="tables")
    for c in ("table", "records", "primary key", "alternate keys"):
        t.add_column(c)
    for tb in st["tables"]:
        t.add_row(tb["name"], str(tb["records"]), tb["primary_key"], ", ".join(tb["alternate_keys"]))
    console.print(t)
    tx = st["transactions"]
    console.print(f"transactions: {tx['active']} active, {tx['committed']} committed, {tx['cancelled']} "
                  f"cancelled, {tx['deadlocks']} deadlocks, {tx['lock_timeouts']} lock timeouts; "
                  f"last committed {tx['last_txn']}; {tx['locks_held']} locks held")
    r, lg, cl = st["readers"], st["log"], st["clients"]
    console.print(f"readers: {r['active']} pinned (oldest version {r['oldest_pin'] or '-'}); "
                  f"clients: {cl['connected']} connected, {cl['refused']} refused, {cl['dropped']} dropped")
    console.print(f"change log: serial {lg['serial']}, {_size(lg['head'] - lg['tail'])} retained of {_size(lg['size'])}")
    for extra in ("replication",):
        if st.get(extra):
            console.print(f"{extra}: {json.dumps(st[extra], default=str)}")


def _records(source):
    for lineno, line in enumerate(source, 1):
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except ValueError as exc:
            name = getattr(source, "name", "<input>")
            raise errors.WrongTypeError(f"{name}:{lineno}: not a JSON object: {exc}", line=lineno) from None


def load_with_progress(db, table: str, source, batch: int) -> int:
    total = None
    try:
        if source.seekable() and source.name not in ("<stdin>", "-"):
            total = sum(1 for ln in source if ln.strip())
            source.seek(0)
    except (OSError, AttributeError):
        total = None
    show = console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1"
    with Progress(TextColumn("loading {task.fields[table]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
                  disable=not show) as progress:
        task = progress.add_task("load", total=total, table=table, rate="")
        start = progress.get_time()

        def tick(n: int) -> None:
            el = max(progress.get_time() - start, 1e-9)
            progress.update(task, completed=n, rate=f"{n / el:,.0f} rec/s")

        return db.load(table, _records(source), batch=batch, progress=tick)
