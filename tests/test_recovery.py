"""Going back in time ([0014], [0085], [0086], [0123], [0156]): programs and
their T logs, the log history on both appliances, point-in-time restore,
cancel, re-run with a corrected program, referential batch mode.

One cluster for the module — a primary and a synchronous secondary, each a
real controller and agent, both keeping a log history — and each test
works on records of its own (key ranges), so they do not disturb each
other's transactions. Programs live in tests/bank_programs.py and
tests/bank_fixed.py (the patent's faulty withdrawal and its correction).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance import errors
from appliance.client.session import Session
from appliance.wire import messages as m

from conftest import BANK_TABLES, Cluster
from fault_helpers import wait_for
from procs import APPLIANCE, RUN_DIR

HERE = Path(__file__).resolve().parent
TABLES = BANK_TABLES + """
[tables.ledger]
primary_key = "id"
alternate_keys = ["account"]
fields = { id = "int", account = "int", amount = "int", note = { type = "str", nullable = true } }
"""
HIST = 'history_dir = "hist"\nhistory_memory = "64KiB"'


@pytest.fixture(scope="module")
def cluster(make_module_appliance, tmp_path_factory):
    """The module's primary and synchronous secondary (both with a log history)."""
    base = tmp_path_factory.mktemp("recovery")
    c = Cluster(make_module_appliance, base, secondaries=(("sync", ""),), primary_replication=HIST,
                secondary_replication=HIST, tables=TABLES, log_size="16MiB", segment_size="32MiB")
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="module")
def db(cluster):
    c = cluster.primary.app.connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def sdb(cluster):
    c = cluster.secondaries[0].app.connect()
    yield c
    c.close()


def serial(db) -> int:
    return db.status()["log"]["serial"]


def dump(client, lo: int, hi: int, tables=("accounts", "ledger")) -> dict:
    """Every record with a key in [lo, hi) of each table, read in one snapshot."""
    with client.snapshot() as snap:
        return {t: list(snap.table(t).range(lo, hi)) for t in tables}


def caught_up(cluster, sdb) -> int:
    s = cluster.wait_caught_up(timeout=60)
    wait_for(lambda: sdb.applied_serial() >= s, 30, what="the secondary to apply everything")
    return s


def cli(cfg, *args, check=True, env=None):
    r = subprocess.run([*APPLIANCE, *args, "--config", str(cfg)], capture_output=True, text=True, cwd=RUN_DIR,
                       env=env, timeout=300)
    if check:
        assert r.returncode == 0, f"appliance {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def accounts(db, lo: int, n: int, balance: int = 100_000) -> None:
    db.load("accounts", [{"id": k, "branch": f"b{k % 3}", "balance": balance} for k in range(lo, lo + n)])


# -- 1. programs -------------------------------------------------------------------------------


class TestPrograms:
    def test_run_records_program_version_and_input(self, db):
        """db.run imports module:function, runs it in a transaction and commits; the T log (history) holds the
        program's name, its version (a hash of its code, or its declared __version__) and the input."""
        accounts(db, 100, 2)
        assert db.run("bank_programs:withdraw", {"account": 100, "amount": 10}) == 100_010
        first = db.last_run
        assert db.run("bank_fixed:withdraw", {"account": 101, "amount": 10}) == 99_990
        h = db.history(program="bank_programs:withdraw", since=first["serial"], until=first["serial"])
        [t] = h["transactions"]
        assert (t["txn"], t["serial"], t["input"]) == (first["txn"], first["serial"], {"account": 100, "amount": 10})
        assert t["version"] == first["program_version"] and t["version"].startswith("sha256:")
        [fixed] = db.history(program="bank_fixed:withdraw", table="accounts", key=101)["transactions"]
        assert fixed["version"] == "2"
        assert db.table("accounts")[100]["balance"] == 100_010 and db.table("accounts")[101]["balance"] == 99_990

    def test_an_exception_cancels_and_a_bad_name_is_refused(self, db):
        """A program that raises leaves nothing behind (no change, no T log); a name that is not
        module:function, or names nothing importable, is ProgramError before anything is sent."""
        accounts(db, 110, 1, balance=5)
        before = serial(db)
        with pytest.raises(ValueError, match="balance too low"):
            db.run("bank_programs:withdraw", {"account": 110, "amount": 10})
        assert db.table("accounts")[110]["balance"] == 5 and serial(db) == before
        for name in ("bank_programs", "bank_programs:", "no_such_module:f", "bank_programs:no_such"):
            with pytest.raises(errors.ProgramError, match="program"):
                db.run(name, {})
        assert serial(db) == before


# -- 2. history --------------------------------------------------------------------------------


class TestHistory:
    def test_history_of_a_key_in_order_with_b_and_a_images(self, cluster, db):
        """The transactions that changed one record, oldest first, each with its T log and the record's
        B and A images; A images the history does not keep are the next change's B image or the record now.
        Both appliances answer the same; the human output and --json say it too."""
        accounts(db, 120, 1, balance=1)
        start = serial(db) + 1
        for i in range(3):
            with db.transaction(program="teller", input={"i": i}) as tx:
                tx.update("accounts", 120, {"balance": 10 + i})
        db.run("bank_programs:deposit", {"account": 120, "amount": 5})
        h = db.history(table="accounts", key=120, since=start)
        got = [(t["program"], t["input"], c["kind"], c["b"]["balance"], c["a"]["balance"])
               for t in h["transactions"] for c in t["changes"]]
        assert got == [("teller", {"i": 0}, "update", 1, 10), ("teller", {"i": 1}, "update", 10, 11),
                       ("teller", {"i": 2}, "update", 11, 12),
                       ("bank_programs:deposit", {"account": 120, "amount": 5}, "update", 12, 17)]
        assert [t["serial"] for t in h["transactions"]] == sorted(t["serial"] for t in h["transactions"])
        sec = cluster.secondaries[0]
        caught_up(cluster, sec.app.connect())
        r = cli(sec.app.config, "history", "--table", "accounts", "--key", "120", "--since", str(start), "--json")
        assert [t["txn"] for t in json.loads(r.stdout)["transactions"]] == [t["txn"] for t in h["transactions"]]
        human = cli(cluster.primary.app.config, "history", "--table", "accounts", "--key", "120",
                    "--since", str(start)).stdout
        assert "teller" in human and "balance: 12 -> 17" in human and "bank_programs:deposit" in human

    def test_status_shows_each_appliances_rewind_window(self, cluster, db, sdb):
        """status (and its --json) names the earliest serial each appliance can restore to."""
        for node in cluster.nodes:
            st = json.loads(cli(node.app.config, "status", "--json").stdout)
            w = st["history"]["rewind_window"]
            assert w["source"] == "history" and w["serial"] == 0, w
            assert "rewind window: back to serial 0" in cli(node.app.config, "status").stdout


# -- 3. restore --------------------------------------------------------------------------------


def scramble(db, lo: int, hi: int, seed: int) -> None:
    """Updates, inserts and deletes across both tables, in transactions of several statements."""
    import random
    rng = random.Random(seed)
    for i in range(60):
        with db.transaction(program="scramble", input={"i": i}) as tx:
            for _ in range(rng.randrange(1, 4)):
                k = rng.randrange(lo, hi)
                cur = tx.get("accounts", k, for_update=True)
                if cur is None:
                    tx.insert("accounts", {"id": k, "branch": f"n{rng.randrange(5)}", "balance": i})
                elif rng.random() < 0.2:
                    tx.delete("accounts", k)
                else:
                    tx.update("accounts", k, {"balance": cur["balance"] + i, "branch": f"u{rng.randrange(5)}"})
            tx.put("ledger", rng.randrange(lo, hi), {"account": rng.randrange(lo, hi), "amount": i, "note": None})


class TestRestore:
    def test_restore_to_a_serial_equals_the_dump_taken_there(self, cluster, db, sdb):
        """Restore --to S after many changes gives exactly what a dump at S held, on the primary and on the
        secondary (which follows by ordinary replication: verify is identical); the restore is one
        logged transaction, program "restore", whose input names its target."""
        lo, hi = 1000, 1100
        accounts(db, lo, 50)
        scramble(db, lo, hi, 1)
        s = serial(db)
        before = dump(db, lo, hi)
        scramble(db, lo, hi, 2)
        assert dump(db, lo, hi) != before
        res = db.restore(s)
        assert res["to_serial"] == s and res["records"] > 0 and res["parts"] == 1
        assert dump(db, lo, hi) == before
        caught_up(cluster, sdb)
        assert dump(sdb, lo, hi) == before
        rc, out = cluster.verify()
        assert rc == 0 and out["identical"], out
        [t] = db.history(program="restore", since=res["serial"], until=res["serial"])["transactions"]
        assert t["input"] == {"to_serial": s, "target": {"serial": s}}

    def test_restore_to_a_time_equals_the_dump_taken_then(self, cluster, db):
        """--to a time (a Target by time_ns: the commit time of the transaction at serial S) restores what a
        dump at S held, as --to S does: the history before that moment is passed over, not misread."""
        from appliance.recovery.restore import Target
        lo, hi = 1600, 1700
        accounts(db, lo, 50)
        scramble(db, lo, hi, 6)
        s = serial(db)
        before = dump(db, lo, hi)
        [t] = db.history(since=s, until=s)["transactions"]
        time.sleep(0.01)                        # commits after it carry a later time
        scramble(db, lo, hi, 7)
        dry = db.restore(Target(time_ns=t["time_ns"]), dry_run=True)
        assert dry["to_serial"] == s and dry["records"] > 0
        res = db.restore(Target(time_ns=t["time_ns"]))
        assert res["to_serial"] == s and dump(db, lo, hi) == before

    def test_restore_one_table_leaves_the_others_alone(self, db):
        """--table ledger puts back only the ledger; accounts keep their later changes."""
        lo, hi = 1200, 1300
        accounts(db, lo, 50)
        scramble(db, lo, hi, 3)
        s = serial(db)
        then = dump(db, lo, hi)
        scramble(db, lo, hi, 4)
        now = dump(db, lo, hi)
        assert now["ledger"] != then["ledger"] and now["accounts"] != then["accounts"]
        res = db.restore(s, table="ledger")
        assert res["table"] == "ledger"
        after = dump(db, lo, hi)
        assert after["ledger"] == then["ledger"] and after["accounts"] == now["accounts"]

    def test_dry_run_lists_the_records_and_changes_nothing(self, cluster, db):
        """--dry-run (CLI, --json) lists each record that would change, now and then; nothing changes."""
        lo = 1400
        accounts(db, lo, 3, balance=7)
        s = serial(db)
        db.table("accounts")[lo] = {"branch": "x", "balance": 8}
        del db.table("accounts")[lo + 1]
        before, at = dump(db, lo, lo + 3), serial(db)
        r = cli(cluster.primary.app.config, "restore", "--to", str(s), "--table", "accounts", "--dry-run", "--json")
        res = json.loads(r.stdout)
        assert res["dry_run"] and res["records"] == 2
        assert {(c["key"], (c["now"] or {}).get("balance"), c["then"]["balance"]) for c in res["changes"]} == \
            {(lo, 8, 7), (lo + 1, None, 7)}
        assert dump(db, lo, lo + 3) == before and serial(db) == at
        human = cli(cluster.primary.app.config, "restore", "--to", str(s), "--table", "accounts", "--dry-run").stdout
        assert "would change 2 record(s)" in human and "balance: 8 -> 7" in human

    def test_restore_chosen_blocks_only(self, db):
        """--blocks restores the records whose changes after the target were in those blocks, no others."""
        lo = 1500
        accounts(db, lo, 2, balance=1)
        s = serial(db)
        db.table("accounts")[lo] = {"branch": "x", "balance": 2}
        db.table("accounts")[lo + 1] = {"branch": "x", "balance": 2}
        changes = db.history(table="accounts", since=s + 1)["transactions"]
        block = next(c["block"] for t in changes for c in t["changes"] if c["key"] == lo)
        others = {c["block"] for t in changes for c in t["changes"] if c["key"] != lo}
        res = db.restore(s, table="accounts", blocks=[block])
        if block in others:     # both records in one block: both come back
            assert res["records"] == 2
        else:
            assert res["records"] == 1 and db.table("accounts")[lo + 1]["balance"] == 2
        assert db.table("accounts")[lo]["balance"] == 1

    def test_refusals_change_nothing(self, cluster, db, sdb):
        """No --yes without a terminal, a restore on a secondary, a malformed --to, a table that does not
        exist: each refused with a clear message and exit code, nothing changed."""
        at = serial(db)
        r = cli(cluster.primary.app.config, "restore", "--to", "1", check=False)
        assert r.returncode == 2 and "--yes" in r.stderr
        r = cli(cluster.secondaries[0].app.config, "restore", "--to", "1", "--yes", check=False)
        assert r.returncode == 1 and "secondary" in r.stderr
        r = cli(cluster.primary.app.config, "restore", "--to", "yesterday", "--yes", check=False)
        assert r.returncode == 1 and "ISO 8601" in r.stderr
        r = cli(cluster.primary.app.config, "restore", "--to", "1", "--table", "nope", "--yes", check=False)
        assert r.returncode == 1 and "no such table 'nope'" in r.stderr
        assert serial(db) == at


# -- 5. cancel ---------------------------------------------------------------------------------


class TestCancel:
    def test_cancel_puts_its_b_images_back_everywhere(self, cluster, db, sdb):
        """A committed transaction no later one touched is undone from its B logs as a logged transaction
        (program "cancel"); the secondary follows."""
        lo = 2000
        accounts(db, lo, 3, balance=50)
        with db.transaction(program="mistake") as tx:
            tx.update("accounts", lo, {"balance": 0})
            tx.delete("accounts", lo + 1)
            tx.insert("accounts", {"id": lo + 5, "branch": "new", "balance": 1})
        bad = tx.result["txn"]
        db.table("accounts")[lo + 2] = {"branch": "other", "balance": 9}    # a later transaction, other record
        dry = db.cancel_txn(bad, dry_run=True)
        assert dry["records"] == 3 and db.table("accounts").get(lo + 5) is not None
        res = cli(cluster.primary.app.config, "cancel", str(bad), "--yes", "--json")
        out = json.loads(res.stdout)
        assert out["records"] == 3 and out["cancel_txn"]
        acc = db.table("accounts")
        assert acc[lo]["balance"] == 50 and acc[lo + 1]["balance"] == 50 and acc.get(lo + 5) is None
        assert acc[lo + 2]["balance"] == 9
        caught_up(cluster, sdb)
        assert dump(sdb, lo, lo + 6) == dump(db, lo, lo + 6)
        [t] = db.history(program="cancel", since=out["cancel_serial"])["transactions"]
        assert t["input"]["txn"] == bad

    def test_cancel_is_refused_listing_later_transactions(self, cluster, db):
        """When a later transaction changed one of its records, cancel refuses, names that transaction
        and the record, and changes nothing."""
        lo = 2100
        accounts(db, lo, 2, balance=50)
        with db.transaction(program="first") as tx:
            tx.update("accounts", lo, {"balance": 1})
        first = tx.result["txn"]
        with db.transaction(program="later") as tx:
            tx.update("accounts", lo, {"balance": 2})
        later = tx.result["txn"]
        at = serial(db)
        with pytest.raises(errors.ConflictError) as e:
            db.cancel_txn(first)
        assert str(later) in e.value.details["later"] and f"accounts[{lo}]" in str(e.value)
        r = cli(cluster.primary.app.config, "cancel", str(first), "--yes", check=False)
        assert r.returncode == 1 and f"transaction {later}" in r.stderr
        assert db.table("accounts")[lo]["balance"] == 2 and serial(db) == at


# -- 4. rerun ----------------------------------------------------------------------------------


def withdrawal_example(db, lo: int) -> int:
    """The patent's example ([0014]) on account lo: the faulty withdrawal of 10,000 from 100,000 records
    110,000; a second withdrawal of 100,000 goes through on that balance (the corrected program refuses
    it); a later transaction copies the balance to a statement account (lo+1); a teller's change without
    a callable touches lo+2. Returns the serial before it."""
    accounts(db, lo, 3)
    since = serial(db)
    assert db.run("bank_programs:withdraw", {"account": lo, "amount": 10_000}) == 110_000
    assert db.run("bank_programs:withdraw", {"account": lo, "amount": 100_000}) == 210_000
    db.run("bank_programs:copy_balance", {"src": lo, "dst": lo + 1})
    with db.transaction(program="teller", input={"note": "no callable"}) as tx:
        tx.update("accounts", lo + 2, {"balance": 5})
    assert db.table("accounts")[lo]["balance"] == 210_000 and db.table("accounts")[lo + 1]["balance"] == 210_000
    return since


class TestRerun:
    def test_withdrawal_example_in_python(self, cluster, db, sdb):
        """db.rerun: the dry run shows the differences record by record and changes nothing; the rerun
        leaves 90,000, the second withdrawal cancelled now (the corrected program refuses it), the later
        transaction recomputed on 90,000, the teller's change re-applied; it replicates."""
        lo = 3000
        since = withdrawal_example(db, lo)
        at = serial(db)
        rep = db.rerun("bank_programs:withdraw", "bank_fixed:withdraw", since=since)
        assert rep.dry_run and serial(db) == at
        diffs = {d["key"]: d["fields"] for d in rep.differences}
        assert diffs == {lo: {"balance": [210_000, 90_000]}, lo + 1: {"balance": [210_000, 90_000]}}
        rep = db.rerun("bank_programs:withdraw", "bank_fixed:withdraw", since=since, dry_run=False)
        acc = db.table("accounts")
        assert (acc[lo]["balance"], acc[lo + 1]["balance"], acc[lo + 2]["balance"]) == (90_000, 90_000, 5)
        how = [(t.how, t.cancelled is not None) for t in rep.transactions]
        assert how == [("fixed", False), ("fixed", True), ("program", False), ("a_images", False)]
        assert "balance too low" in rep.transactions[1].cancelled
        caught_up(cluster, sdb)
        assert dump(sdb, lo, lo + 3) == dump(db, lo, lo + 3)
        reruns = db.history(program="bank_fixed:withdraw", since=at + 1)["transactions"]
        assert [t["input"] for t in reruns] == [{"account": lo, "amount": 10_000}]
        assert reruns[0]["version"] == "2"

    def test_withdrawal_example_with_the_cli(self, cluster, db):
        """appliance rerun --dry-run prints the differences; with --yes it repairs the data."""
        lo = 3100
        since = withdrawal_example(db, lo)
        cfg = cluster.primary.app.config
        args = ["rerun", "--program", "bank_programs:withdraw", "--fixed", "bank_fixed:withdraw",
                "--since", str(since), "--path", str(HERE)]
        out = cli(cfg, *args, "--dry-run").stdout
        assert f"accounts[{lo}]  balance: 210000 -> 90000" in out and "cancelled now" in out
        assert db.table("accounts")[lo]["balance"] == 210_000
        res = json.loads(cli(cfg, *args, "--yes", "--json").stdout)
        assert not res["dry_run"] and res["committed"]
        assert db.table("accounts")[lo]["balance"] == 90_000 and db.table("accounts")[lo + 1]["balance"] == 90_000

    def test_rerun_refuses_conflicts_and_changed_versions(self, cluster, db, tmp_path):
        """A transaction without a callable whose B image no longer matches the state the rerun meets is a
        conflict; a program whose code changed since its transactions ran is refused with the reason;
        either way nothing changes."""
        lo = 3200
        accounts(db, lo, 1)
        since = serial(db)
        db.run("bank_programs:withdraw", {"account": lo, "amount": 10_000})
        with db.transaction(program="teller") as tx:          # reads 110,000: meets 90,000 on a re-run
            tx.update("accounts", lo, {"balance": 110_001})
        at = serial(db)
        with pytest.raises(errors.ConflictError, match=f"accounts\\[{lo}\\]"):
            db.rerun("bank_programs:withdraw", "bank_fixed:withdraw", since=since, dry_run=False)
        assert db.table("accounts")[lo]["balance"] == 110_001 and serial(db) == at
        # a program whose source changed after it ran
        (tmp_path / "drifting.py").write_text("def bump(tx, i):\n    tx.update('accounts', i, {'balance': 1})\n")
        code = ("import sys, appliance; sys.path.insert(0, sys.argv[2]); db = appliance.connect(sys.argv[1]); "
                f"db.run('bank_programs:withdraw', {{'account': {lo}, 'amount': 1}}); db.run('drifting:bump', {lo})")
        subprocess.run([sys.executable, "-c", code, str(cluster.primary.app.config), str(tmp_path)],
                       check=True, cwd=RUN_DIR, env={**__import__("os").environ, "PYTHONPATH": str(HERE)})
        (tmp_path / "drifting.py").write_text("def bump(tx, i):\n    tx.update('accounts', i, {'balance': 2})\n")
        at = serial(db)
        r = cli(cluster.primary.app.config, "rerun", "--program", "bank_programs:withdraw", "--fixed",
                "bank_fixed:withdraw", "--since", str(at - 10), "--path", str(HERE), "--path", str(tmp_path),
                "--yes", check=False)
        assert r.returncode == 1 and "drifting:bump" in r.stderr and "version" in r.stderr
        assert serial(db) == at


# -- hold --------------------------------------------------------------------------------------


class TestHold:
    def test_writes_wait_while_held_and_go_on_after(self, cluster, db):
        """OP_HOLD begin: another client's new write waits (status counts it) until end."""
        cfg = cluster.primary.app.cfg
        s = Session(str(cfg.socket_path), cfg.name, timeout=30)
        s.connect()
        try:
            assert s.call([m.OP_HOLD, "begin", 10], "hold") is None
            out = {}
            t = threading.Thread(target=lambda: out.setdefault("r", db.table("accounts").__setitem__(
                4000, {"branch": "held", "balance": 1})), daemon=True)
            t.start()
            held = wait_for(lambda: (db.status()["history"]["writes_held"] or {}).get("writes_waiting") == 1
                            and db.status()["history"]["writes_held"], 10, what="the write to wait")
            assert held["what"].startswith("operator hold") and db.table("accounts").get(4000) is None
            s.call([m.OP_HOLD, "end"], "hold")
            t.join(10)
            assert not t.is_alive() and db.table("accounts")[4000]["balance"] == 1
            assert db.status()["history"]["writes_held"] is None
        finally:
            s.close()


# -- 6. batch mode -----------------------------------------------------------------------------


class Transfers:
    """Clients moving money between accounts [lo, lo+n) on the primary: the total never changes."""

    def __init__(self, db, lo: int, n: int) -> None:
        self.db, self.lo, self.n = db, lo, n
        self.stop = threading.Event()
        self.done = 0
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        import random
        rng = random.Random(7)
        while not self.stop.is_set():
            a, b = rng.sample(range(self.lo, self.lo + self.n), 2)
            with self.db.transaction(program="transfer", input={"a": a, "b": b}) as tx:
                x = tx.get("accounts", a, for_update=True)
                y = tx.get("accounts", b, for_update=True)
                tx.update("accounts", a, {"balance": x["balance"] - 1})
                tx.update("accounts", b, {"balance": y["balance"] + 1})
            self.done += 1

    def wait(self, more: int) -> None:
        target = self.done + more
        wait_for(lambda: self.done >= target, 60, what=f"{more} more transfers")

    def finish(self) -> None:
        self.stop.set()
        self.t.join(30)


class TestBatchMode:
    def test_batch_under_load_reads_one_frozen_state_then_catches_up(self, cluster, db, sdb):
        """batch begin on the secondary while transfers run: its reports (two snapshots, seconds apart) see
        one state with the right total, its applied serial stays put, the primary goes on committing
        (its synchronous secondary acknowledges on receipt, shown in status); batch end catches up fully."""
        lo, n = 5000, 40
        accounts(db, lo, n, balance=1000)
        caught_up(cluster, sdb)
        sec = cluster.secondaries[0]
        w = Transfers(db, lo, n)
        try:
            w.wait(50)
            st = json.loads(cli(sec.app.config, "batch", "begin", "--json").stdout)
            assert st["state"] == "suspended"
            frozen = sdb.applied_serial()
            first = dump(sdb, lo, lo + n, ("accounts",))["accounts"]
            rep = cluster.wait_replication(lambda r: r["secondaries"][sec.name]["batch"], "the primary told")
            assert rep["secondaries"][sec.name]["mode"] == "sync"
            w.wait(200)                                   # commits go on: the sync secondary does not stall them
            again = dump(sdb, lo, lo + n, ("accounts",))["accounts"]
            assert again == first and sdb.applied_serial() == frozen
            assert sum(r["balance"] for r in first) == n * 1000
            backlog = wait_for(lambda: (sdb.batch("status").get("backlog_bytes") or 0) > 0 and sdb.batch("status"),
                               30, what="a backlog")
            assert backlog["received"] > frozen
            assert "BATCH MODE" in cli(sec.app.config, "status").stdout
        finally:
            w.finish()
        end = json.loads(cli(sec.app.config, "batch", "end", "--json").stdout)
        assert end["state"] is None
        s = caught_up(cluster, sdb)
        assert sdb.applied_serial() >= s
        assert dump(sdb, lo, lo + n) == dump(db, lo, lo + n)
        assert sum(r["balance"] for r in dump(sdb, lo, lo + n)["accounts"]) == n * 1000
        rc, out = cluster.verify()
        assert rc == 0 and out["identical"], out
        assert not cluster.status()["replication"]["secondaries"][sec.name]["batch"]

    def test_batch_begin_at_shows_the_state_of_that_moment(self, cluster, db, sdb):
        """batch begin --at S rewinds the secondary's copy to serial S with its B logs: it reads what a
        dump at S held (inserts gone, deletes back, updates undone, alternate keys too); batch end takes
        the rewind back and catches up to the primary."""
        lo = 6000
        accounts(db, lo, 10, balance=10)
        s = serial(db)
        then = dump(db, lo, lo + 20)
        scramble(db, lo, lo + 20, 5)
        caught_up(cluster, sdb)
        sec = cluster.secondaries[0]
        st = json.loads(cli(sec.app.config, "batch", "begin", "--at", str(s), "--json").stdout)
        try:
            assert st["at"]["to_serial"] == s and st["at"]["records"] > 0
            assert dump(sdb, lo, lo + 20) == then
            by_branch = {r["id"] for r in sdb.table("accounts").find("branch", "b1") if lo <= r["id"] < lo + 20}
            assert by_branch == {r["id"] for r in then["accounts"] if r["branch"] == "b1"}
        finally:
            cli(sec.app.config, "batch", "end")
        caught_up(cluster, sdb)
        assert dump(sdb, lo, lo + 20) == dump(db, lo, lo + 20)
        rc, out = cluster.verify()
        assert rc == 0 and out["identical"], out

    def test_batch_refusals(self, cluster, db, sdb):
        """batch on a primary, end without begin, begin twice, a promote during a batch (what the secondary
        acknowledged on receipt is not applied yet): refused with a clear message and exit code."""
        r = cli(cluster.primary.app.config, "batch", "begin", check=False)
        assert r.returncode == 1 and "secondary" in r.stderr
        sec = cluster.secondaries[0]
        r = cli(sec.app.config, "batch", "end", check=False)
        assert r.returncode == 1 and "not in batch mode" in r.stderr
        cli(sec.app.config, "batch", "begin")
        try:
            r = cli(sec.app.config, "batch", "begin", check=False)
            assert r.returncode == 69 and "batch mode since" in r.stderr
            r = cli(sec.app.config, "promote", "--yes", check=False)
            assert r.returncode == 1 and "batch mode" in r.stderr and "batch end" in r.stderr
            assert sdb.status()["role"] == "secondary"
        finally:
            cli(sec.app.config, "batch", "end")
        caught_up(cluster, sdb)

    def test_batch_begin_at_is_refused_on_a_durable_secondary(self, make_appliance, tmp_path):
        """A secondary that keeps [durability] files takes batch mode, but not --at (its rewind would be in
        no log record): refused with the reason, nothing rewound, applying goes on after end."""
        dur = f'\n[durability]\ndir = "{tmp_path / "dur"}"\ncheckpoint_every = "off"\nlog_file_size = "2MiB"\n'
        c = Cluster(make_appliance, tmp_path, secondaries=(("async", ""),), secondary_replication=HIST + dur)
        try:
            c.start()
            sec = c.secondaries[0]
            with c.primary.app.connect() as pdb, sec.app.connect() as s:
                accounts(pdb, 1, 5)
                at = serial(pdb)
                pdb.table("accounts")[1] = {"branch": "x", "balance": 1}
                caught_up(c, s)
                r = cli(sec.app.config, "batch", "begin", "--at", str(at), check=False)
                assert r.returncode == 1 and "[durability]" in r.stderr
                assert s.batch("status")["state"] is None and s.table("accounts")[1]["balance"] == 1
                cli(sec.app.config, "batch", "begin")
                pdb.table("accounts")[2] = {"branch": "y", "balance": 2}
                assert s.table("accounts")[2]["balance"] == 100_000
                cli(sec.app.config, "batch", "end")
                caught_up(c, s)
                assert s.table("accounts")[2]["balance"] == 2
        finally:
            c.cleanup()
