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
                  f"{st['role']}, epoch {st['epoch']}, version {st['version']}, up {st['uptime_s']:.0f} s")
    _failover(st.get("failover") or {})
    b = st["blocks"]
    console.print(f"blocks: {b['used']} numbers in use of {b['max']}; slots {b['slots_total'] - b['slots_free']} "
                  f"used, {b['slots_free']} free; {b['old_versions_pending']} old versions held for readers")
    t = Table(title="segments (storage devices)")
    for c in ("segment", "state", "size", "slots", "used", "free"):
        t.add_column(c, justify="right" if c not in ("segment", "state") else "left")
    for s in st["segments"]:
        t.add_row(s["name"], s.get("state", "in service"), _size(s["size"]), str(s["slots"]), str(s["used"]),
                  str(s["free"]))
    console.print(t)
    devs = st.get("devices") or {}
    job = devs.get("replace")
    if job:
        eta = f", {job['eta_s']:.0f} s left" if job.get("eta_s") is not None else ""
        console.print(f"replacing device {job['device']} ({job['mode']}): {job['phase']}, {job['done']} of "
                      f"{job['blocks']} blocks, {_size(job['bytes'])} at {_size(job['bytes_s'])}/s{eta}")
    elif devs.get("detached"):
        console.print(f"[bold red]DETACHED[/bold red] device(s) {', '.join(map(str, devs['detached']))}: their "
                      "blocks are unavailable; `appliance device replace` refills them from a peer")
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
    oldest = (f"oldest version {r['oldest_pin']}, pid {r['oldest_pin_pid']}, {r['oldest_pin_age_s']} s"
              if r.get("oldest_pin_pid") else f"oldest version {r['oldest_pin'] or '-'}")
    console.print(f"readers: {r['active']} pinned ({oldest}), {r['slots_in_use']} of {r['slots']} slots, "
                  f"old versions {_size(r['old_versions_bytes'])}; "
                  f"clients: {cl['connected']} connected, {cl['refused']} refused, {cl['dropped']} dropped")
    if r.get("warning"):
        console.print(f"WARNING: readers hold old versions: {r['warning']}")
    console.print(f"change log: serial {lg['serial']}, {_size(lg['head'] - lg['tail'])} retained of {_size(lg['size'])}")
    mem = st.get("memory")
    if mem:
        kind = "lz4 backup blocks" if mem.get("compressed") else "blocks"
        hp = mem.get("huge_pages") or {}
        pages = (f"; segments in 2 MiB pages: {_size(hp['bytes'])} of {_size(hp['of'])}" if hp.get("bytes")
                 else f"; segments in 4 KiB pages (/dev/shm huge={hp['dev_shm']})" if hp else "")
        console.print(f"memory: {_size(mem['bytes_used'])} of {kind} in use ({_size(mem['bytes_live'])} live){pages}")
    dur = st.get("durability")
    if dur:
        _durability(dur)
    cold = (st.get("recovery") or {}).get("cold_start")
    if cold:
        console.print(f"cold start: {'checkpoint ' + cold['checkpoint'] + ' (serial ' + str(cold['checkpoint_serial']) + ')' if cold['checkpoint'] else 'no checkpoint'}"
                      f", {cold['records_replayed']} log records replayed ({cold['entries_replayed']} entries) "
                      f"to serial {cold['serial']}, in {cold['seconds']:.2f} s"
                      + (" (" + ", ".join(f"{k} {v:.2f} s" for k, v in cold["phases"].items()) + ")"
                         if cold.get("phases") else "")
                      + (f"; log cut: {cold['log_cut']['reason']}" if cold.get("log_cut") else ""))
    rep = st.get("replication")
    if rep and rep.get("role") == "primary":
        t = Table(title=f"secondaries (quorum {rep['quorum']}, {rep['waiting_commits']} commits awaiting backup)")
        for c in ("secondary", "mode", "state", "connected", "healthy", "acked serial", "lag txns",
                  "lag bytes", "lag s", "note"):
            t.add_column(c)
        for name, x in sorted(rep["secondaries"].items()):
            note = x.get("error") or x.get("warning") or ""
            if x.get("degraded"):
                note = "DEGRADED (out of the quorum) " + note
            if x.get("batch"):
                note = "BATCH MODE: acknowledges on receipt, applies nothing until it catches up " + note
            if x.get("copy"):
                cp = x["copy"]
                note = f"copy {cp['blocks']}/{cp['total']} blocks, {cp['rate_mb_s']} MB/s, eta {cp['eta_s']} s"
            lag = x["lag"]
            t.add_row(name, x["mode"], x["state"], "yes" if x["connected"] else "no",
                      "yes" if x["healthy"] else "no", str(x["acked_serial"]), str(lag["transactions"]),
                      _size(lag.get("bytes", 0)), f"{lag['seconds']:.3f}", note)
        console.print(t)
        for w in rep.get("waiting", ())[:5]:
            console.print(f"awaiting backup: transaction {w['txn']} (serial {w['serial']}) for {w['waiting_s']:.1f} s, "
                          f"from {', '.join(w['waiting_for']) or '-'}" + ("; its client has its answer" if w["answered"] else ""))
    elif rep and rep.get("role") == "secondary":
        ag = rep.get("agent") or {}
        console.print(f"secondary of {rep['primary']}: applied serial {rep['applied_serial']}, "
                      f"{'copying, ' if rep['copying'] else ''}agent {'attached' if ag.get('attached') else 'absent'}"
                      f", link {ag.get('state', '?')}"
                      + (f"; its primary reported serial {ag['primary_serial']}: {ag['behind_serials']} serials "
                         "behind (what a promote now would miss)" if ag.get("behind_serials") else ""))
        if rep.get("needs_copy"):
            console.print(f"needs a block copy from its primary: it refused the stream ({rep['needs_copy']})")
        b = rep.get("batch") or {}
        if b.get("state") == "suspended":
            at = b.get("at")
            console.print(f"BATCH MODE since {_when(int(b['since'] * 1e9))}: reads see serial {b['frozen_serial']}"
                          + (f" rewound to serial {at['to_serial']}" if at else "") +
                          f"; received up to {b.get('received') or '-'}, backlog {_size(b.get('backlog_bytes') or 0)}",
                          highlight=False)
        elif b.get("state") == "catching_up":
            console.print(f"catching up after a batch: {_size(b.get('backlog_bytes') or 0)} left, eta "
                          f"{b.get('eta_s')} s", highlight=False)
    hist = (rep or {}).get("agent", {}).get("history") or {}
    if hist.get("enabled"):
        console.print(f"log history: {hist['files']} files, {_size(hist['disk_bytes'])} on disk, serials "
                      f"{hist['first_serial']}..{hist['last_serial']} ({hist['dir']})"
                      + (f"; {hist['warning']}" if hist.get("warning") else ""))
    h = st.get("history") or {}
    w = h.get("rewind_window")
    if w:
        console.print(f"rewind window: back to serial {w['serial']} ({_when(w.get('time_ns'))}, from the "
                      f"{w['source']})", highlight=False)
    if h.get("writes_held"):
        wh = h["writes_held"]
        console.print(f"WRITES HELD for {wh['what']} (pid {wh['pid']}) for {wh['held_s']} s; "
                      f"{wh['writes_waiting']} waiting", highlight=False)
    if h.get("progress"):
        console.print(f"in progress: {h['progress']}", highlight=False)


def _durability(d: dict) -> None:
    """The [durability] lines of `appliance status`."""
    console.print(f"durability: {d['dir']}, log_sync {d['log_sync']}; durable serial {d['durable_serial']} "
                  f"(written {d['written_serial']}), {_size(d['log_bytes_since_checkpoint'])} of log since the last "
                  f"checkpoint in {d['log_files']} file(s), {d['fsyncs']} fsyncs")
    last = d.get("last_checkpoint")
    if last:
        console.print(f"last checkpoint: {last['file']} (serial {last['serial']}, version {last['version']}"
                      + (f", {_size(last['bytes'])} in {last['seconds']:.2f} s" if last.get("bytes") else "") + ")")
    else:
        console.print("last checkpoint: none")
    cp = d.get("checkpoint")
    if cp:
        console.print(f"checkpoint {cp['number']} running: {cp['blocks']}/{cp['total']} blocks, "
                      f"{_size(cp['bytes'])}, {cp['rate_mb_s']} MB/s")
    if d.get("error"):
        console.print(f"WARNING: the log cannot be written: {d['error']}; commits are refused until it can")
    if d.get("needs_checkpoint"):
        console.print(f"WARNING: a checkpoint is needed: {d['needs_checkpoint']}")
    if (d.get("checkpoints") or {}).get("last_error"):
        console.print(f"WARNING: the last checkpoint failed: {d['checkpoints']['last_error']}")


def devices(devs: list[dict]) -> None:
    t = Table(title="storage devices")
    for c in ("device", "segment", "state", "size", "slots used", "blocks", "bytes", "checksums"):
        t.add_column(c, justify="left" if c in ("segment", "state", "checksums") else "right")
    for d in devs:
        t.add_row(str(d["index"]), d["name"], d["state"], _size(d["size"]), f"{d['used']} of {d['slots']}",
                  str(d["blocks"]), _size(d["bytes"]), f"{d['damaged']} DAMAGED" if d["damaged"] else "ok")
    console.print(t)
    for d in devs:
        if d["damaged"]:
            console.print(f"device {d['index']}: {d['damaged']} damaged block(s); `appliance repair --device "
                          f"{d['index']}` copies its blocks again from a peer", soft_wrap=True)


def _failover(fo: dict) -> None:
    f = fo.get("fenced")
    if f:
        by = f"{f['by']!r} is primary" if f.get("by") else "another appliance is primary"
        console.print(f"[bold red]FENCED[/bold red]: {by} at epoch {f['epoch']}; this primary takes no writes "
                      "(appliance rejoin makes it a secondary)")
    p = fo.get("promoted")
    if p:
        console.print(f"promoted to primary at epoch {p['epoch']} from serial {p['serial']} in {p['seconds']:.2f} s"
                      + (f"; up to {p['behind_serials']} serials of the old primary may be missing"
                         if p.get("behind_serials") else ""))
    r = fo.get("rewound")
    if r:
        console.print(f"rewound: {r['transactions']} transaction(s) undone (serials {r['from_serial']}.."
                      f"{r['to_serial']}), {r['blocks_to_copy']} block(s) copied from the new primary")
    if fo.get("repair_pending"):
        console.print(f"blocks waiting for a copy from the primary: {fo['repair_pending']}")


class phase_progress:
    """A progress display for work in phases (rejoin): ``show(phase, done,
    total)`` updates it; shown on a terminal (or with APPLIANCE_PROGRESS=1)."""

    def __init__(self, title: str, enabled: bool = True) -> None:
        show = enabled and (console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1")
        self.progress = Progress(TextColumn(title), TextColumn("{task.fields[phase]}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=console, disable=not show)

    def __enter__(self):
        self.progress.__enter__()
        task = self.progress.add_task("work", total=None, phase="")

        def show(phase: str, done: int | None, total: int | None) -> None:
            self.progress.update(task, phase=phase, completed=done or 0, total=total)
        return show

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _records(source, lines: list):
    """Records of a JSON-lines file; `lines` gets each record's line number."""
    name = getattr(source, "name", "<input>")
    for lineno, line in enumerate(source, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise errors.WrongTypeError(f"{name}:{lineno}: not a JSON object (invalid JSON: {exc})", line=lineno) from None
        if not isinstance(rec, dict):
            raise errors.WrongTypeError(f"{name}:{lineno}: a record must be a JSON object, not "
                                        f"{type(rec).__name__}", line=lineno)
        lines.append(lineno)
        yield rec


def load_with_progress(db, table: str, source, batch: int, skip_existing: bool = False) -> int:
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

        lines: list[int] = []
        loaded = [0]

        def tick_and_mark(n: int) -> None:
            loaded[0] = n
            tick(n)

        try:
            return db.load(table, _records(source, lines), batch=batch, progress=tick_and_mark,
                           skip_existing=skip_existing)
        except errors.UnavailableError as e:
            raise _stopped(e, getattr(source, "name", "<input>"), loaded[0], lines) from None
        except errors.ApplianceError as e:
            i = e.details.get("index")
            if isinstance(i, int) and 0 <= loaded[0] + i < len(lines):
                name = getattr(source, "name", "<input>")
                line = lines[loaded[0] + i]
                raise type(e)(f"{name}:{line}: {e.message} ({loaded[0]} records loaded before this batch)",
                              code=e.code, **{**e.details, "line": line}) from None
            raise


def _stopped(e: errors.UnavailableError, name: str, done: int, lines: list[int]) -> errors.UnavailableError:
    """The controller went away during a load: what is committed, what may be."""
    upto = f" (up to line {lines[done - 1]} of {name})" if done else f" from {name}"
    pending = lines[done:]
    maybe = ""
    if pending:
        span = f"lines {pending[0]}..{pending[-1]}" if len(pending) > 1 else f"line {pending[0]}"
        maybe = (f"; the batch of {span} may have committed too" if e.details.get("sent", True)
                 else f"; the batch of {span} was not")
    return errors.UnavailableError(f"{e.message}. {done} records were committed{upto}{maybe}",
                                   code=e.code, **{**e.details, "committed": done,
                                                   "line": pending[0] if pending else None})


def copy_progress(poll, copies_before: int, timeout: float) -> dict:
    """Follow a block copy in status with a progress bar until it is done."""
    import time
    show = console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1"
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("copying"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, disable=not show) as progress:
        task = progress.add_task("copy", total=None, info="")
        while True:
            st = poll()
            cp = st.get("copy")
            if cp:
                progress.update(task, total=cp["total"], completed=cp["blocks"],
                                info=f"{cp['bytes'] / 1e6:.1f} MB at {cp['rate_mb_s']} MB/s")
            if st.get("copies", 0) > copies_before and st.get("state") == "streaming":
                if progress.tasks[0].total:
                    progress.update(task, completed=progress.tasks[0].total)
                return st
            if time.monotonic() > deadline:
                raise errors.UnavailableError(f"copy did not finish within {timeout} s: {st}")
            time.sleep(0.1)


def replace_progress(run, show: bool = True) -> dict:
    """`run(tick)` with a progress bar of a device replacement: tick gets
    status ``devices.replace`` (phase, blocks, done, bytes, rate)."""
    with phase_progress("replacing device", enabled=show) as bar:
        def tick(job: dict) -> None:
            rate = f" {job['bytes_s'] / 1e6:.1f} MB/s" if job.get("bytes_s") else ""
            bar(f"{job['phase']}{rate}", job["done"], job["blocks"])
        return run(tick)


# -- going back in time (cli/history.py) -----------------------------------------------------------

def jsonable(v):
    """json.dumps default: bytes as text where they are, else their hex."""
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(v).hex()
    return str(v)


def _when(ns) -> str:
    import datetime
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="milliseconds")


def _fields(b, a) -> str:
    """What changed between two images of a record, field by field."""
    if b is None and a is None:
        return ""
    if b is None:
        return "+ " + json.dumps(a, default=jsonable)
    if a is None:
        return "- " + json.dumps(b, default=jsonable)
    diff = [f"{f}: {json.dumps(b.get(f), default=jsonable)} -> {json.dumps(a.get(f), default=jsonable)}"
            for f in list(b) + [f for f in a if f not in b] if b.get(f) != a.get(f)]
    return ", ".join(diff) or "(unchanged)"


def history(res: dict) -> None:
    txns = res["transactions"]
    for t in txns:
        prog = t["program"] or "-"
        if t.get("version"):
            prog += f" (version {t['version']})"
        console.print(f"[bold]txn {t['txn']}[/bold]  serial {t['serial']}  {_when(t['time_ns'])}  program {prog}  "
                      f"input {json.dumps(t['input'], default=jsonable)}", highlight=False)
        for c in t["changes"]:
            b = None if c.get("b_unknown") else c.get("b")
            a = None if c.get("a_unknown") else c.get("a")
            what = _fields(b, a) if not (c.get("b_unknown") or c.get("a_unknown")) else \
                f"B {json.dumps(c.get('b'), default=jsonable) if not c.get('b_unknown') else 'unknown'}, " \
                f"A {json.dumps(c.get('a'), default=jsonable) if not c.get('a_unknown') else 'unknown'}"
            console.print(f"  {c['kind']:<6} {c['table']}[{c['key']!r}]  {what}", highlight=False)
    w = res.get("window") or {}
    more = f"; more from serial {res['next']} (--since {res['next']})" if res.get("next") is not None else ""
    console.print(f"{len(txns)} transaction(s){more}; rewind window back to serial {w.get('serial', '-')} "
                  f"({_when(w.get('time_ns'))}, {w.get('source', 'no history')})", highlight=False)


def with_progress(label: str, work, poll, run):
    """Run `work()` (through `run`, which turns errors into exits) in a
    thread while a progress line follows `poll()` (the controller's
    history.progress in status)."""
    import threading
    out: dict = {}

    def target():
        try:
            out["result"] = work()
        except BaseException as e:   # re-raised below, in the caller's thread
            out["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    show = console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1"
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.fields[info]}"), console=console,
                  disable=not show) as progress:
        task = progress.add_task(label, total=None, info="")
        while t.is_alive():
            t.join(0.2)
            if t.is_alive():
                p = poll() or {}
                if p:
                    info = f"{p.get('phase', '')}: {p.get('entries', 0):,} log entries read"
                    if p.get("parts"):
                        info += f", part {p.get('part')}/{p['parts']} committing"
                    progress.update(task, info=info)
        progress.update(task, total=1, completed=1)
    if "error" in out:
        return run(_raise, out["error"])
    return out["result"]


def _raise(e):
    raise e


def restored(res: dict) -> None:
    what = f" of table {res['table']}" if res.get("table") else (f" of blocks {res['blocks']}" if res.get("blocks")
                                                                  else "")
    if res.get("dry_run"):
        console.print(f"dry run: restoring{what} to serial {res['to_serial']} would change {res['records']} "
                      f"record(s) (undoing {res['transactions']} transaction(s), {res['entries']} B-log records)",
                      highlight=False)
        for c in res.get("changes", ()):
            console.print(f"  {c['table']}[{c['key']!r}]  {_fields(c['now'], c['then'])}", highlight=False)
        if res["records"] > len(res.get("changes", ())):
            console.print(f"  ... and {res['records'] - len(res['changes'])} more", highlight=False)
        return
    if not res["records"]:
        console.print(f"nothing to restore{what}: no record differs from serial {res['to_serial']}", highlight=False)
        return
    console.print(f"restored {res['records']} record(s){what} to serial {res['to_serial']}: undid "
                  f"{res['transactions']} transaction(s), {res['entries']} B-log records, in {res['seconds']} s; "
                  f"committed as transaction(s) {', '.join(map(str, res['txns']))} (program restore), "
                  f"serial {res['serial']}", highlight=False)


def cancelled(res: dict) -> None:
    if res.get("dry_run"):
        console.print(f"dry run: cancelling transaction {res['txn']} (serial {res['serial']}, program "
                      f"{res['program'] or '-'}) would put back {res['records']} record(s):", highlight=False)
        for c in res.get("changes", ()):
            console.print(f"  {c['table']}[{c['key']!r}]  {_fields(c['now'], c['then'])}", highlight=False)
        return
    console.print(f"cancelled transaction {res['txn']}: {res['records']} record(s) put back by transaction "
                  f"{res['cancel_txn']} (program cancel), serial {res['cancel_serial']}", highlight=False)


class steps:
    """A progress bar for a local operation's phases: the context gives a
    callback progress(phase, done, total)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self):
        show = console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1"
        self.p = Progress(TextColumn("{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, disable=not show)
        self.p.__enter__()
        self.task = self.p.add_task(self.label, total=None, phase=self.label)
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        self.p.update(self.task, phase=f"{self.label}: {phase}", completed=done, total=total)

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)


def rerun(rep: dict) -> None:
    if rep["to_serial"] is None:
        console.print(f"{rep['program']}: no transaction of it in the log history; nothing to re-run",
                      highlight=False)
        return
    head = "dry run: " if rep["dry_run"] else ""
    n = len(rep["transactions"])
    how: dict = {}
    for t in rep["transactions"]:
        key = "cancelled" if t["cancelled"] else t["how"]
        how[key] = how.get(key, 0) + 1
    console.print(f"{head}restore to serial {rep['to_serial']} (before {rep['program']}'s first transaction), "
                  f"then re-run {n} transaction(s): " + ", ".join(f"{v} {k}" for k, v in sorted(how.items())),
                  highlight=False)
    for t in rep["transactions"]:
        if t["cancelled"]:
            console.print(f"  txn {t['txn']} ({t['program']}) is cancelled now: {t['cancelled']}", highlight=False)
    for d in rep["differences"]:
        console.print(f"  {d['table']}[{d['key']!r}]  {_fields(d['now'], d['after'])}", highlight=False)
    if not rep["dry_run"]:
        console.print(f"committed {len(rep['committed'])} transaction(s) in {rep['seconds'].get('total')} s; "
                      f"to undo the rerun: appliance restore --to {rep['before_serial']}", highlight=False)


def catch_up(poll, timeout: float = 3600.0) -> dict:
    """Follow a secondary catching up after a batch until it is done."""
    import time
    show = console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1"
    deadline = time.monotonic() + timeout
    st = poll()
    with Progress(TextColumn("catching up"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, disable=not show) as progress:
        task = progress.add_task("catch up", total=None, info="")
        first = None
        while True:
            st = poll()
            left = st.get("backlog_bytes")
            if st.get("state") is None and not left:
                break
            if left is not None:
                first = first or max(left, 1)
                progress.update(task, total=first, completed=max(0, first - left),
                                info=f"{left / 1e6:.1f} MB left, eta {st.get('eta_s')} s")
            if time.monotonic() > deadline:
                raise errors.UnavailableError(f"catch-up did not finish within {timeout} s: {st}")
            time.sleep(0.1)
    return st


def batch(action: str, st: dict) -> None:
    if st.get("state") == "suspended":
        at = st.get("at")
        past = (f"; rewound to serial {at['to_serial']} ({at['records']} records put back)" if at else "")
        console.print(f"batch mode: reads see one frozen state, serial {st['frozen_serial']}{past}; "
                      f"received since: up to serial {st.get('received') or st['frozen_serial']}, backlog "
                      f"{_size(st.get('backlog_bytes') or 0)}", highlight=False)
    elif st.get("state") == "catching_up":
        console.print(f"catching up: applied serial {st['applied_serial']}, {_size(st.get('backlog_bytes') or 0)} "
                      f"left, eta {st.get('eta_s')} s", highlight=False)
    else:
        console.print(f"not in batch mode: applied serial {st['applied_serial']}", highlight=False)
