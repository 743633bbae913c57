"""Readers see committed states only, under concurrent writers (real processes)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

ACCOUNTS = 1000
START = 1000

TRANSFERS = r"""
import random, sys, appliance
from appliance import errors
db = appliance.connect(sys.argv[1]); seed = int(sys.argv[2]); n = int(sys.argv[3])
rng = random.Random(seed); done = retried = 0
while done < n:
    a, b = rng.sample(range(1, %d + 1), 2); amt = rng.randrange(1, 50)
    try:
        with db.transaction(program="transfer", input={"src": a, "dst": b, "amount": amt}) as tx:
            x = tx.get("accounts", a, for_update=True); y = tx.get("accounts", b, for_update=True)
            tx.update("accounts", a, {"balance": x["balance"] - amt})
            tx.update("accounts", b, {"balance": y["balance"] + amt})
        done += 1
    except (errors.DeadlockError, errors.LockTimeoutError):
        retried += 1
print(done, retried)
""" % ACCOUNTS

CHECKER = r"""
import sys, json, appliance
db = appliance.connect(sys.argv[1]); rounds = int(sys.argv[2]); acc = db.table("accounts")
plain, snap_totals, counts = [], [], []
for i in range(rounds):
    plain.append(sum(r["balance"] for r in acc.range()))
    with db.snapshot() as snap:
        s = snap.table("accounts")
        t1 = sum(r["balance"] for r in s.range())
        t2 = sum(s[k]["balance"] for k in range(1, %d + 1))
        snap_totals.append((t1, t2)); counts.append(len(s))
print(json.dumps({"plain": plain, "snap": snap_totals, "counts": counts}))
""" % ACCOUNTS


def _load_accounts(db):
    db.load("accounts", ({"id": i, "branch": f"b{i % 7}", "balance": START} for i in range(1, ACCOUNTS + 1)))


class TestSnapshotConsistency:
    def test_total_never_changes_under_concurrent_transfers(self, bank):
        """4 processes transfer between 1000 accounts; range() sums and snapshot sums always equal the total."""
        db = bank.connect()
        _load_accounts(db)
        total = ACCOUNTS * START
        writers = [bank.spawn(TRANSFERS, str(seed), "400", stdout=subprocess.PIPE, text=True) for seed in range(4)]
        checker = bank.spawn(CHECKER, "200", stdout=subprocess.PIPE, text=True)
        out, _ = checker.communicate(timeout=300)
        assert checker.returncode == 0
        res = json.loads(out)
        for w in writers:
            w_out, _ = w.communicate(timeout=300)
            assert w.returncode == 0
            assert int(w_out.split()[0]) == 400
        assert len(res["plain"]) == 200
        assert set(res["plain"]) == {total}
        assert all(t1 == total and t2 == total for t1, t2 in res["snap"])
        assert set(res["counts"]) == {ACCOUNTS}
        # the writers really interleaved with the checker: the data changed
        balances = [r["balance"] for r in db.table("accounts").range()]
        assert sum(balances) == total and len(set(balances)) > 1
        st = db.status()
        assert st["transactions"]["committed"] >= 1600


SNAP_HOLDER = r"""
import sys, time, appliance
db = appliance.connect(sys.argv[1])
snap = db.snapshot()
before = snap.table("accounts")[1]["balance"]
print(before, snap.version, flush=True)
time.sleep(600)
"""


class TestReaderDeath:
    def test_killed_snapshot_holder_does_not_pin_memory(self, bank):
        """A reader SIGKILLed while holding a snapshot stops pinning old block versions."""
        db = bank.connect()
        _load_accounts(db)
        holder = bank.spawn(SNAP_HOLDER, stdout=subprocess.PIPE, text=True)
        line = holder.stdout.readline().split()
        assert int(line[0]) == START
        acc = db.table("accounts")
        for i in range(50):
            acc[1] = {"branch": "b1", "balance": i}
        st = db.status()
        assert st["readers"]["active"] >= 1
        assert st["blocks"]["old_versions_pending"] > 0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 20
        while True:
            acc[2] = {"branch": "b2", "balance": 7}  # each commit lets the controller reclaim
            st = db.status()
            if st["readers"]["active"] == 0 and st["blocks"]["old_versions_pending"] == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"old versions still pinned after the reader died: {st['readers']} {st['blocks']}")
            time.sleep(0.2)

    def test_snapshot_sees_its_version_while_writes_continue(self, make_appliance):
        """A snapshot keeps returning the state it pinned, across many later commits and splits."""
        db = make_appliance(segment_size="64MiB").start().connect()
        acc = db.table("accounts")
        for i in range(1, 201):
            acc[i] = {"branch": "x", "balance": i}
        with db.snapshot() as snap:
            s = snap.table("accounts")
            for i in range(1, 2001):
                acc[i] = {"branch": "y" * 40, "balance": -i}
            assert len(s) == 200
            assert [r["balance"] for r in s.range()] == list(range(1, 201))
            assert s.find("branch", "x") == [acc_rec for acc_rec in s.range()]
            assert s.find("branch", "y" * 40) == []
        assert len(acc) == 2000
        assert len(acc.find("branch", "y" * 40)) == 2000
