"""``appliance demo``: the main job on an embedded default.

Starts a real appliance pair on loopback — a primary (the bank of the
product brief) and a synchronous secondary, each a controller and a
replication agent — loads sample accounts, runs on-line transfers on the
primary from several client processes while an auditor process sums every
balance in consistent snapshots *on the secondary* (reports without
stopping on-line work), verifies the two are identical block for block,
shows the status and a transfer's A/B/T logs, then stops everything and
deletes the segments (unless --keep).
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
log_size = "16MiB"
[controller]
socket = "{sock}"
[replication]
secret_file = "{secret}"
heartbeat = 0.2
{replication}
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = {{ id = "int", branch = "str", balance = "int" }}
"""
PRIMARY = """role = "primary"
[[replication.secondaries]]
name = "{sname}"
address = "127.0.0.1:{port}"
mode = "sync"
"""
SECONDARY = """role = "secondary"
listen = "127.0.0.1:{port}"
primary = "{pname}"
history_dir = "{history}"
"""
BRANCHES = ["tokyo", "osaka", "kyoto", "nagoya", "sapporo", "fukuoka"]
START_BALANCE = 100_000


def _transfers(config: str, seed: int, seconds: float, out) -> None:
    """One teller: transfers between random accounts. Every other teller is
    optimistic (its reads come from shared memory, each transfer is one request;
    README "Optimistic transactions"), the rest lock as they read."""
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
            with db.transaction(program="transfer", input={"src": src, "dst": dst, "amount": amount},
                                optimistic=seed % 2 == 1) as tx:
                a = tx.get("accounts", src, for_update=True)
                b = tx.get("accounts", dst, for_update=True)
                if a["balance"] < amount:
                    tx.cancel()
                    continue
                tx.update("accounts", src, {"balance": a["balance"] - amount})
                tx.update("accounts", dst, {"balance": b["balance"] + amount})
            done += 1
        except errors.TransactionCancelledError:   # a deadlock, a lock timeout, a stale optimistic read
            retried += 1
    out.put(("teller", seed, done, retried))


def _auditor(config: str, seconds: float, out) -> None:
    import appliance
    db = appliance.connect(config, name="auditor")  # the secondary's config: reports off the primary
    totals = set()
    rounds = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with db.snapshot() as snap:
            totals.add(sum(r["balance"] for r in snap.table("accounts").range()))
        rounds += 1
    out.put(("auditor", rounds, sorted(totals)))


def _free_port() -> int:
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def run_demo(accounts: int = 1000, keep: bool = False, seconds: float = 5.0, tellers: int = 4) -> int:
    from ..config import load
    from ..store.segment import unlink_all

    work = Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    tag = uuid.uuid4().hex[:8]
    pname, sname, port = f"demo{tag}", f"demo{tag}dr", _free_port()
    secret = work / "secret"
    secret.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    secret.chmod(0o600)
    pcfg, scfg = work / "primary.toml", work / "secondary.toml"
    pcfg.write_text(CONFIG.format(name=pname, sock=work / "primary.sock", secret=secret,
                                  replication=PRIMARY.format(sname=sname, port=port)))
    scfg.write_text(CONFIG.format(name=sname, sock=work / "secondary.sock", secret=secret,
                                  replication=SECONDARY.format(pname=pname, port=port, history=work / "history")))
    cfgs = [load(pcfg), load(scfg)]
    console.rule(f"[bold]appliance demo[/bold]: primary {pname}, synchronous secondary {sname}")
    console.print(f"configs in {work}; segments /dev/shm/apl.{pname}.* and apl.{sname}.*")
    procs: list[subprocess.Popen] = []
    logs = []

    def start(kind: str, cfg: Path, label: str) -> subprocess.Popen:
        f = open(work / f"{label}.log", "wb")
        logs.append(f)
        p = subprocess.Popen([sys.executable, "-m", "appliance", kind, "--config", str(cfg)], stdout=f,
                             stderr=subprocess.STDOUT, env={**os.environ, "APPLIANCE_LOG_JSON": "1"})
        procs.append(p)
        return p

    try:
        pc = start("controller", pcfg, "primary-controller")
        sc = start("controller", scfg, "secondary-controller")
        db = _wait(pcfg, pc)
        _wait(scfg, sc).close()
        start("agent", scfg, "secondary-agent")
        start("agent", pcfg, "primary-agent")
        _wait_streaming(db, sname)
        console.print(f"controllers and agents up; secondary {sname} streaming (sync); loading {accounts} "
                      "accounts ...")
        rng = random.Random(1)
        t0 = time.perf_counter()
        n = db.load("accounts", ({"id": i, "branch": rng.choice(BRANCHES), "balance": START_BALANCE}
                                 for i in range(1, accounts + 1)))
        console.print(f"loaded {n} accounts in {time.perf_counter() - t0:.2f} s (each batch backed up "
                      "before it returned)")
        acc = db.table("accounts")
        total = accounts * START_BALANCE
        console.print(f"accounts[7] = {acc[7]}; {len(acc.find('branch', 'tokyo'))} accounts in tokyo")

        console.print(f"{tellers} teller processes transfer money on the primary for {seconds:.0f} s; an "
                      "auditor sums all balances in snapshots on the secondary meanwhile ...")
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        workers = [ctx.Process(target=_transfers, args=(str(pcfg), s, seconds, q)) for s in range(tellers)]
        workers.append(ctx.Process(target=_auditor, args=(str(scfg), seconds, q)))
        for p in workers:
            p.start()
        results = [q.get(timeout=seconds + 60) for _ in workers]
        for p in workers:
            p.join(10)
        done = sum(r[2] for r in results if r[0] == "teller")
        retried = sum(r[3] for r in results if r[0] == "teller")
        audit = next(r for r in results if r[0] == "auditor")
        final = sum(r["balance"] for r in acc.range())
        console.print(f"transfers committed: {done} ({done / seconds:,.0f}/s, each confirmed by the "
                      f"secondary; half the tellers optimistic), retried after a deadlock, a lock timeout "
                      f"or a stale optimistic read: {retried}")
        ok = audit[2] == [total] and final == total
        style = "green" if ok else "red"
        console.print(f"[{style}]auditor on the secondary: {audit[1]} snapshot sums, every one {audit[2]} "
                      f"(expected {total}); final total on the primary {final}[/{style}]")
        v = subprocess.run([sys.executable, "-m", "appliance", "verify", "--config", str(pcfg)],
                           capture_output=True, text=True)
        console.print(f"verify: {v.stdout.strip()}")
        ok = ok and v.returncode == 0
        _show_logs(db)
        st = db.status()
        tx = st["transactions"]
        rep = st["replication"]["secondaries"][sname]
        console.print(f"status: version {st['version']}, {tx['committed']} committed, {tx['cancelled']} "
                      f"cancelled, {tx['deadlocks']} deadlocks; secondary {rep['state']}, acked serial "
                      f"{rep['acked_serial']}, lag {rep['lag']}")
        db.close()
        if keep:
            console.print(f"left running: `appliance status --config {pcfg}`; Ctrl-C stops it")
            try:
                pc.wait()
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        for cfg in cfgs:
            unlink_all(cfg.name, cfg.storage.segments)
        console.print(f"stopped; segments removed (logs in {work})")


def _wait_streaming(db, secondary: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = db.status()["replication"]["secondaries"][secondary]
        if st["state"] == "streaming":
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"secondary {secondary} did not start streaming: {st}")
        time.sleep(0.05)


def _wait(cfg_path: Path, ctl: subprocess.Popen):
    import appliance
    deadline = time.monotonic() + 20
    while True:
        if ctl.poll() is not None:
            raise SystemExit(f"controller exited with status {ctl.returncode}")
        try:
            return appliance.connect(cfg_path, name="demo", wait=0)
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
    decode = db.schema.by_file[0].decode
    for c in entries:
        if c.kind_name in ("update", "insert", "delete"):
            a = decode(c.a) if c.a else None
            bimg = decode(c.b) if c.b else None
            console.print(f"  serial {c.serial} {c.kind_name} block {c.block} offset {c.offset}: "
                          f"B {bimg} -> A {a}")
