"""``appliance demo``: the main job on an embedded default.

Starts a real controller on a temporary configuration (the bank of the
product brief), loads sample accounts, runs on-line transfers from several
client processes while an auditor process sums every balance in consistent
snapshots, shows the status and a transfer's A/B/T logs, then stops the
controller and deletes its segments (unless --keep).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack
from rich.console import Console

from .. import errors

console = Console()

CONFIG = """\
name = "{name}"
[storage]
segments = 4
segment_size = "32MiB"
log_size = "8MiB"
[controller]
socket = "{sock}"
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = {{ id = "int", branch = "str", balance = "int" }}
"""
BRANCHES = ["tokyo", "osaka", "kyoto", "nagoya", "sapporo", "fukuoka"]
START_BALANCE = 100_000


def _transfers(config: str, seed: int, seconds: float, out) -> None:
    import appliance
    db = appliance.connect(config, name=f"teller{seed}")
    n = len(db.table("accounts"))
    rng = random.Random(seed)
    done = retried = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        src, dst = rng.sample(range(1, n + 1), 2)
        amount = rng.randrange(1, 5_000)
        try:
            with db.transaction(program="transfer", input={"src": src, "dst": dst, "amount": amount}) as tx:
                a = tx.get("accounts", src, for_update=True)
                b = tx.get("accounts", dst, for_update=True)
                if a["balance"] < amount:
                    tx.cancel()
                    continue
                tx.update("accounts", src, {"balance": a["balance"] - amount})
                tx.update("accounts", dst, {"balance": b["balance"] + amount})
            done += 1
        except (errors.DeadlockError, errors.LockTimeoutError):
            retried += 1
    out.put(("teller", seed, done, retried))


def _auditor(config: str, seconds: float, out) -> None:
    import appliance
    db = appliance.connect(config, name="auditor")
    totals = set()
    rounds = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with db.snapshot() as snap:
            totals.add(sum(r["balance"] for r in snap.table("accounts").range()))
        rounds += 1
    out.put(("auditor", rounds, sorted(totals)))


def run_demo(accounts: int = 1000, keep: bool = False, seconds: float = 5.0, tellers: int = 4) -> int:
    import appliance
    from ..config import load
    from ..store.segment import unlink_all

    work = Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    name = f"demo{uuid.uuid4().hex[:8]}"
    cfg_path = work / "bank.toml"
    cfg_path.write_text(CONFIG.format(name=name, sock=work / "bank.sock"))
    cfg = load(cfg_path)
    console.rule(f"[bold]appliance demo[/bold]: {name}")
    console.print(f"config {cfg_path}; segments /dev/shm/apl.{name}.*")
    log = open(work / "controller.log", "wb")
    ctl = subprocess.Popen([sys.executable, "-m", "appliance", "controller", "--config", str(cfg_path)],
                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "APPLIANCE_LOG_JSON": "1"})
    try:
        db = _wait(cfg_path, ctl)
        console.print(f"controller pid {ctl.pid} serving; loading {accounts} accounts ...")
        rng = random.Random(1)
        t0 = time.perf_counter()
        n = db.load("accounts", ({"id": i, "branch": rng.choice(BRANCHES), "balance": START_BALANCE}
                                 for i in range(1, accounts + 1)))
        console.print(f"loaded {n} accounts in {time.perf_counter() - t0:.2f} s")
        acc = db.table("accounts")
        total = accounts * START_BALANCE
        console.print(f"accounts[7] = {acc[7]}; {len(acc.find('branch', 'tokyo'))} accounts in tokyo")

        console.print(f"{tellers} teller processes transfer money for {seconds:.0f} s; an auditor sums all "
                      "balances in snapshots meanwhile ...")
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_transfers, args=(str(cfg_path), s, seconds, q)) for s in range(tellers)]
        procs.append(ctx.Process(target=_auditor, args=(str(cfg_path), seconds, q)))
        for p in procs:
            p.start()
        results = [q.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join(10)
        done = sum(r[2] for r in results if r[0] == "teller")
        retried = sum(r[3] for r in results if r[0] == "teller")
        audit = next(r for r in results if r[0] == "auditor")
        final = sum(r["balance"] for r in acc.range())
        console.print(f"transfers committed: {done} ({done / seconds:,.0f}/s), retried after deadlock or "
                      f"lock timeout: {retried}")
        ok = audit[2] == [total] and final == total
        style = "green" if ok else "red"
        console.print(f"[{style}]auditor: {audit[1]} snapshot sums, every one {audit[2]} "
                      f"(expected {total}); final total {final}[/{style}]")
        _show_logs(db)
        st = db.status()
        tx = st["transactions"]
        console.print(f"status: version {st['version']}, {tx['committed']} committed, {tx['cancelled']} "
                      f"cancelled, {tx['deadlocks']} deadlocks; blocks used {st['blocks']['used']}")
        db.close()
        if keep:
            console.print(f"left running: `appliance status --config {cfg_path}`; Ctrl-C stops it")
            try:
                ctl.wait()
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        if ctl.poll() is None:
            ctl.send_signal(signal.SIGTERM)
            try:
                ctl.wait(10)
            except subprocess.TimeoutExpired:
                ctl.kill()
                ctl.wait()
        log.close()
        unlink_all(name, cfg.storage.segments)
        console.print(f"controller stopped; segments removed (logs in {work})")


def _wait(cfg_path: Path, ctl: subprocess.Popen):
    import appliance
    deadline = time.monotonic() + 20
    while True:
        if ctl.poll() is not None:
            raise SystemExit(f"controller exited with status {ctl.returncode}")
        try:
            return appliance.connect(cfg_path, name="demo")
        except errors.UnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _show_logs(db) -> None:
    """The A/B/T logs of the last committed transfer, from the change log."""
    from ..store import changelog
    b = changelog.bounds(db._reader)
    last_begin = None
    entries = []
    for e in changelog.read_entries(db._reader, b["tail"]):
        if e.kind_name == "begin":
            tlog = msgpack.unpackb(e.a)
            if tlog[0] == "transfer":
                last_begin, entries = (e, tlog), []
        elif last_begin and e.txn == last_begin[0].txn and e.file == 0:
            entries.append(e)
    if not last_begin:
        return
    e, tlog = last_begin
    console.print(f"last transfer: transaction {e.txn}, T log {json.dumps(tlog)}")
    for c in entries:
        if c.kind_name in ("update", "insert", "delete"):
            a = msgpack.unpackb(c.a) if c.a else None
            bimg = msgpack.unpackb(c.b) if c.b else None
            console.print(f"  serial {c.serial} {c.kind_name} block {c.block} offset {c.offset}: "
                          f"B {bimg} -> A {a}")
