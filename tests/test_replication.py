"""Replication between real appliances on loopback: controllers, agents, TCP."""
from __future__ import annotations

import signal
import subprocess
import threading

import pytest

import appliance
from appliance import errors

from procs import APPLIANCE, RUN_DIR

TWO_TABLES = """
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = { id = "int", branch = "str", balance = "int" }

[tables.events]
primary_key = "key"
alternate_keys = ["kind"]
fields = { key = "str", kind = "str", amount = { type = "int", default = 0 }, note = { type = "str", nullable = true } }
"""

WORKLOAD = r"""
import random, sys, appliance
from appliance import errors
db = appliance.connect(sys.argv[1]); seed = int(sys.argv[2]); n = int(sys.argv[3])
rng = random.Random(seed); acc = db.table("accounts"); ev = db.table("events")
for i in range(n):
    r = rng.random()
    try:
        if r < 0.3:
            k = rng.randrange(3000)
            acc[k] = {"branch": "b%d" % rng.randrange(30), "balance": rng.randrange(10**6)}
        elif r < 0.45:
            k = rng.randrange(3000)
            if k in acc:
                del acc[k]
        elif r < 0.75:
            with db.transaction(program="mixed", input={"i": i, "seed": seed}) as tx:
                for _ in range(rng.randrange(1, 5)):
                    k = rng.randrange(3000)
                    cur = tx.get("accounts", k, for_update=True)
                    if cur is None:
                        tx.insert("accounts", {"id": k, "branch": "b%d" % rng.randrange(30), "balance": 1})
                    else:
                        tx.update("accounts", k, {"balance": cur["balance"] + 1, "branch": "b%d" % rng.randrange(30)})
                tx.put("events", "e%d-%d" % (seed, i), {"kind": "k%d" % rng.randrange(5), "note": "x" * rng.randrange(200)})
        elif r < 0.9:
            ev["s%d-%d" % (seed, rng.randrange(500))] = {"kind": "k%d" % rng.randrange(5), "amount": i, "note": None}
        else:
            with db.transaction() as tx:
                tx.put("accounts", rng.randrange(3000), {"branch": "big", "balance": 0})
                raise RuntimeError("cancel me")
    except RuntimeError:
        pass
    except (errors.DeadlockError, errors.LockTimeoutError):
        pass
print("done")
"""


def snapshot_of(cfg_path) -> dict:
    with appliance.connect(cfg_path) as db:
        with db.snapshot() as snap:
            return {t: list(snap.table(t).range()) for t in db.tables}


def finds(cfg_path) -> dict:
    with appliance.connect(cfg_path) as db:
        acc = db.table("accounts")
        return {b: acc.find("branch", b) for b in ("b0", "b7", "big")}


class TestReplicatedWorkload:
    def test_sync_and_async_secondaries_end_identical(self, make_cluster):
        """A random multi-table workload from 3 processes reaches a sync and an async secondary block for block."""
        c = make_cluster(tables=TWO_TABLES, segment_size="32MiB").start()
        p = c.primary.app
        workers = [p.spawn(WORKLOAD, str(seed), "400", stdout=subprocess.PIPE, text=True) for seed in range(3)]
        for w in workers:
            out, _ = w.communicate(timeout=300)
            assert w.returncode == 0 and "done" in out
        c.wait_caught_up()
        rc, res = c.verify()
        assert rc == 0, res
        assert res["identical"] and len(res["secondaries"]) == 2
        assert all(r["checked"] > 10 for r in res["secondaries"].values())
        primary = snapshot_of(p.config)
        assert len(primary["accounts"]) > 100 and len(primary["events"]) > 100
        for s in c.secondaries:
            assert snapshot_of(s.app.config) == primary
            assert finds(s.app.config) == finds(p.config)
        st = c.status()["replication"]["secondaries"]
        assert {v["mode"] for v in st.values()} == {"sync", "async"}
        assert all(v["healthy"] and v["lag"]["transactions"] == 0 for v in st.values())

    def test_secondary_refuses_writes_and_serves_reads(self, make_cluster):
        """A secondary answers reads from its copy and refuses writes with ReadOnlyError."""
        c = make_cluster(secondaries=(("async", ""),)).start()
        with appliance.connect(c.primary.app.config) as db:
            db.table("accounts")[1] = {"branch": "x", "balance": 5}
            with db.transaction() as tx:
                tx.put("accounts", 2, {"branch": "y", "balance": 6})
            serial = tx.result["serial"]
        s = c.secondaries[0].app
        with appliance.connect(s.config) as sdb:
            assert sdb.wait_applied(serial) >= serial    # read-your-writes
            assert sdb.table("accounts")[2] == {"id": 2, "branch": "y", "balance": 6}
            with pytest.raises(errors.ReadOnlyError):
                sdb.table("accounts")[3] = {"branch": "z", "balance": 1}
            with pytest.raises(errors.ReadOnlyError):
                with sdb.transaction() as tx:
                    tx.put("accounts", 4, {"branch": "z", "balance": 1})


class TestSynchronous:
    @pytest.mark.parametrize("pipeline", [False, True], ids=["waiting", "pipelined"])
    def test_commit_does_not_return_before_the_ack(self, make_cluster, pipeline):
        """With the sync secondary's agent stopped, commit blocks; it returns only once the secondary holds the change
        (pipelined: the put held and sent with the commit as one request)."""
        c = make_cluster(secondaries=(("sync", ""),)).start()
        sec = c.secondaries[0]
        db = appliance.connect(c.primary.app.config)
        sdb = appliance.connect(sec.app.config)
        try:
            db.table("accounts")[1] = {"branch": "a", "balance": 1}
            sec.agent.signal(signal.SIGSTOP)
            out = {}

            def commit():
                with db.transaction(pipeline=pipeline) as tx:
                    tx.put("accounts", 1, {"branch": "a", "balance": 2})
                out["result"] = tx.result
                out["applied_at_return"] = sdb.applied_serial()

            t = threading.Thread(target=commit)
            t.start()
            # the commit is done on the primary and waits, unanswered, for the secondary's ack
            [w] = c.wait_waiting()["waiting"]
            assert (w["answered"], w["waiting_for"]) == (False, [sec.name]), w
            assert c.status()["replication"]["secondaries"][sec.name]["acked_serial"] < w["serial"]
            assert "result" not in out, "a synchronous commit returned while its secondary was stopped"
            # the change is committed locally and visible there, but not yet backed up
            assert db.table("accounts")[1]["balance"] == 2
            assert sdb.applied_serial() < w["serial"] and sdb.table("accounts")[1]["balance"] == 1
            sec.agent.signal(signal.SIGCONT)
            t.join(30)
            assert not t.is_alive()
            assert out["result"]["serial"] == w["serial"]
            assert out["applied_at_return"] >= out["result"]["serial"]
            assert sdb.table("accounts")[1]["balance"] == 2
        finally:
            sec.agent.signal(signal.SIGCONT)
            db.close()
            sdb.close()

    def test_commit_waits_for_the_secondary_controller_to_apply(self, make_cluster):
        """With the sync secondary's controller stopped (its agent receives the entries, nothing applies
        them), two commits from two clients stay pending by state; after SIGCONT each returns only once
        the secondary has applied it."""
        c = make_cluster(secondaries=(("sync", ""),)).start()
        sec = c.secondaries[0]
        dbs = [appliance.connect(c.primary.app.config) for _ in range(2)]
        sdb = appliance.connect(sec.app.config)
        try:
            dbs[0].table("accounts")[1] = {"branch": "a", "balance": 1}
            sec.app.controller.signal(signal.SIGSTOP)
            out: dict = {}

            def commit(i):
                with dbs[i].transaction() as tx:
                    tx.put("accounts", 10 + i, {"branch": "b", "balance": i})
                out[i] = (tx.result["serial"], sdb.applied_serial())   # applied there, read at return

            threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            waiting = c.wait_waiting(count=2)["waiting"]
            assert all(not w["answered"] and w["waiting_for"] == [sec.name] for w in waiting), waiting
            serials = sorted(w["serial"] for w in waiting)
            rep = c.status()["replication"]
            assert rep["secondaries"][sec.name]["acked_serial"] < serials[0]
            assert out == {}, "a synchronous commit returned while its secondary's controller was stopped"
            assert sdb.applied_serial() < serials[0]
            sec.app.controller.signal(signal.SIGCONT)
            for t in threads:
                t.join(30)
                assert not t.is_alive()
            assert sorted(serial for serial, _ in out.values()) == serials
            assert all(applied >= serial for serial, applied in out.values()), out
            assert sdb.table("accounts")[10] == {"id": 10, "branch": "b", "balance": 0}
            assert sdb.table("accounts")[11] == {"id": 11, "branch": "b", "balance": 1}
            c.wait_waiting(count=0)
        finally:
            sec.app.controller.signal(signal.SIGCONT)
            for db in dbs:
                db.close()
            sdb.close()

    def test_wait_false_returns_but_keeps_the_locks(self, make_cluster):
        """commit(wait=False) returns after the local commit; the records stay locked until the ack (Figure 6)."""
        c = make_cluster(secondaries=(("sync", ""),)).start()
        sec = c.secondaries[0]
        db = appliance.connect(c.primary.app.config)
        other = appliance.connect(c.primary.app.config)
        try:
            db.table("accounts")[1] = {"branch": "a", "balance": 1}
            sec.agent.signal(signal.SIGSTOP)
            tx = db.transaction()
            tx.put("accounts", 1, {"branch": "a", "balance": 2})
            r = tx.commit(wait=False)
            assert r["backup"] == "pending"
            st = c.status()
            [w] = st["replication"]["waiting"]           # answered, its backup still to come
            assert (w["txn"], w["serial"], w["answered"]) == (r["txn"], r["serial"], True), w
            assert st["replication"]["secondaries"][sec.name]["acked_serial"] < r["serial"]
            assert st["transactions"]["locks_held"] == 1
            with pytest.raises(errors.LockTimeoutError):   # lock_timeout is 2 s in these configs
                with other.transaction() as t2:
                    t2.get("accounts", 1, for_update=True)
            sec.agent.signal(signal.SIGCONT)
            c.wait_caught_up()
            c.wait_waiting(count=0)
            assert c.status()["transactions"]["locks_held"] == 0
            with other.transaction() as t2:
                assert t2.get("accounts", 1, for_update=True)["balance"] == 2
        finally:
            sec.agent.signal(signal.SIGCONT)
            db.close()
            other.close()

    def test_local_durability_does_not_wait(self, make_cluster):
        """durability='local' commits without waiting for a stopped sync secondary; 'quorum' waits."""
        c = make_cluster(secondaries=(("sync", ""),)).start()
        sec = c.secondaries[0]
        db = appliance.connect(c.primary.app.config)
        try:
            sec.agent.signal(signal.SIGSTOP)
            with db.transaction(durability="local") as tx:
                tx.put("accounts", 5, {"branch": "a", "balance": 1})
            local = tx.result["serial"]
            assert local
            rep = c.status()["replication"]          # returned without the ack, and nothing waits for it
            assert rep["waiting"] == [] and rep["secondaries"][sec.name]["acked_serial"] < local
            out = {}

            def quorum():
                with db.transaction(durability="quorum") as tx:
                    tx.put("accounts", 6, {"branch": "a", "balance": 1})
                out["result"] = tx.result

            t = threading.Thread(target=quorum)
            t.start()
            [w] = c.wait_waiting()["waiting"]
            assert (w["durability"], w["answered"], w["waiting_for"]) == ("quorum", False, [sec.name]), w
            assert "result" not in out, "a quorum commit returned while its sync secondary was stopped"
            sec.agent.signal(signal.SIGCONT)
            t.join(30)
            assert not t.is_alive() and out["result"]["serial"] == w["serial"] > local
            c.wait_caught_up()
        finally:
            sec.agent.signal(signal.SIGCONT)
            db.close()

    def test_k_of_n_quorum(self, make_cluster):
        """With quorum 2 of 3 sync secondaries, commits go on with one stopped and block with two stopped."""
        c = make_cluster(secondaries=(("sync", ""), ("sync", ""), ("sync", "")), quorum=2).start()
        db = appliance.connect(c.primary.app.config)
        s1, s2, s3 = c.secondaries
        try:
            s1.agent.signal(signal.SIGSTOP)
            with db.transaction() as tx:                   # 2 of 3 still answer
                tx.put("accounts", 1, {"branch": "a", "balance": 1})
            first = tx.result["serial"]
            assert c.status()["replication"]["secondaries"][s1.name]["acked_serial"] < first
            s2.agent.signal(signal.SIGSTOP)
            done = threading.Event()
            t = threading.Thread(target=lambda: (db.table("accounts").__setitem__(
                2, {"branch": "a", "balance": 2}), done.set()))
            t.start()
            # s3 has acknowledged the commit, and it still waits: 1 of the 2 required acks
            rep = c.wait_replication(lambda rep: len(rep["waiting"]) == 1 and rep["secondaries"][s3.name][
                "acked_serial"] >= rep["waiting"][0]["serial"], "a commit acknowledged by s3 alone")
            [w] = rep["waiting"]
            assert (w["answered"], w["waiting_for"]) == (False, sorted([s1.name, s2.name])), w
            assert not done.is_set(), "a commit returned with only 1 of the 2 required acks"
            s1.agent.signal(signal.SIGCONT)
            t.join(30)
            assert done.is_set()
        finally:
            for s in c.secondaries:
                s.agent.signal(signal.SIGCONT)
            db.close()
        c.wait_caught_up()
        rc, res = c.verify()
        assert rc == 0, res


    @pytest.mark.parametrize("durability", ["all", 2])
    def test_stronger_durability_waits_for_an_async_secondary(self, make_cluster, durability):
        """durability 'all' (or 2) waits for the asynchronous secondary too; 'quorum' does not."""
        c = make_cluster(secondaries=(("sync", ""), ("async", ""))).start()
        db = appliance.connect(c.primary.app.config)
        eager, lazy = c.secondaries
        try:
            lazy.agent.signal(signal.SIGSTOP)
            with db.transaction() as tx:                   # quorum: the sync one is enough
                tx.put("accounts", 1, {"branch": "a", "balance": 1})
            assert c.status()["replication"]["secondaries"][lazy.name]["acked_serial"] < tx.result["serial"]
            done = threading.Event()

            def strong():
                with db.transaction(durability=durability) as tx:
                    tx.put("accounts", 2, {"branch": "a", "balance": 2})
                done.set()
            t = threading.Thread(target=strong)
            t.start()
            # the sync secondary has acknowledged it; the commit still waits for the async one
            rep = c.wait_replication(lambda rep: len(rep["waiting"]) == 1 and rep["secondaries"][eager.name][
                "acked_serial"] >= rep["waiting"][0]["serial"], "a commit acknowledged by the sync secondary")
            [w] = rep["waiting"]
            assert (w["durability"], w["answered"], w["waiting_for"]) == (durability, False, [lazy.name]), w
            assert not done.is_set(), f"durability={durability!r} returned without the async secondary's ack"
            lazy.agent.signal(signal.SIGCONT)
            t.join(30)
            assert done.is_set()
        finally:
            lazy.agent.signal(signal.SIGCONT)
            db.close()
        c.wait_caught_up()

class TestCompressedSecondary:
    def test_lz4_secondary_is_identical_and_serves_no_reads(self, make_cluster):
        """A secondary with serve_reads = false keeps lz4 blocks, verifies identical, and refuses clients."""
        c = make_cluster(secondaries=(("sync", ""),), secondary_replication="serve_reads = false",
                         tables=TWO_TABLES, segment_size="32MiB").start()
        p = c.primary.app
        w = p.spawn(WORKLOAD, "5", "300", stdout=subprocess.PIPE, text=True)
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0
        c.wait_caught_up()
        rc, res = c.verify()
        assert rc == 0, res
        with pytest.raises(errors.NotServingReadsError):
            appliance.connect(c.secondaries[0].app.config)
        from appliance.client.session import Session
        from appliance.wire import messages as msg
        s = Session(str(c.secondaries[0].app.cfg.socket_path), c.secondaries[0].name, timeout=10)
        s.connect()
        st = s.call([msg.OP_STATUS], "status")
        s.close()
        assert st["memory"]["compressed"] and st["memory"]["bytes_live"] > 0
        assert st["tables"][0]["records"] == len(snapshot_of(p.config)["accounts"])


class TestOperatorCopy:
    def test_appliance_copy_recopies_a_secondary_while_writes_continue(self, make_cluster):
        """`appliance copy` copies every block again while a writer runs; the secondary ends identical."""
        c = make_cluster(secondaries=(("async", ""),), tables=TWO_TABLES, segment_size="32MiB").start()
        p = c.primary.app
        with appliance.connect(p.config) as db:
            db.load("accounts", ({"id": i, "branch": f"b{i % 30}", "balance": i} for i in range(5000)))
        w = p.spawn(WORKLOAD, "8", "300", stdout=subprocess.PIPE, text=True)
        name = c.secondaries[0].name
        r = subprocess.run([*APPLIANCE, "copy", "--config", str(p.config), name],
                           capture_output=True, text=True, timeout=120, cwd=RUN_DIR)
        assert r.returncode == 0, r.stderr
        assert f"{name}: copy complete" in r.stdout
        w.communicate(timeout=300)
        assert w.returncode == 0
        c.wait_caught_up()
        assert c.status()["replication"]["secondaries"][name]["copies"] >= 2  # the first copy, then ours
        rc, res = c.verify()
        assert rc == 0, res
        events = [e["event"] for e in c.primary.agent.events()]
        assert events.count("copy_finished") >= 2
