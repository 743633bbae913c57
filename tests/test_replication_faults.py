"""Replication under faults: crashed agents and controllers, a broken link
(through tests/repl_proxy.py), block copies, degraded sync secondaries,
authentication, garbage on the listen port, and the log history.

Everything is real: controllers and agents are processes on loopback, killed
and stopped with real signals; the link faults come from a TCP proxy between
the primary's agent and a secondary. A test whose secondaries replicate ends
by checking that they hold exactly the primary's records (``appliance
verify`` and a record-by-record comparison through the client library); a
test whose secondary is refused checks that nothing reached it.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import appliance
from appliance._native import lib
from appliance.controller import HOUSEKEEPING_S
from appliance.replication.history import History
from appliance.store import changelog
from appliance.store.changelog import LogEntry
from appliance.store.reader import Reader
from appliance.store.segment import Attachment
from appliance.wire import framing
from appliance.wire import replication as rp
from conftest import BANK_TABLES
from repl_proxy import ReplProxy

pytestmark = pytest.mark.slow

#: autocommits (puts, deletes) and transactions (with a program name and
#: input; some cancelled) on accounts 0..1999 until the stop file exists,
#: paced at about 1 ms an operation (unpaced it logs 2 MB/s and takes a core)
WRITER = r"""
import os, random, sys, time
import appliance
from appliance import errors
cfg, stop, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
pace = 0.001
rng = random.Random(seed)
db = appliance.connect(cfg, timeout=120)
acc = db.table("accounts")
print("ready", flush=True)
i = 0
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(pace)
    i += 1
    k = rng.randrange(2000)
    r = rng.random()
    try:
        if r < 0.4:
            acc[k] = {"branch": "b%d" % (i % 7), "balance": i}
        elif r < 0.5:
            if k in acc:
                del acc[k]
        else:
            with db.transaction(program="transfer", input={"i": i, "seed": seed}) as tx:
                for _ in range(rng.randrange(1, 4)):
                    kk = rng.randrange(2000)
                    cur = tx.get("accounts", kk, for_update=True)
                    if cur is None:
                        tx.insert("accounts", {"id": kk, "branch": "new", "balance": i})
                    else:
                        tx.update("accounts", kk, {"balance": cur["balance"] + 1, "branch": "b%d" % (i % 5)})
                if r > 0.95:
                    raise RuntimeError("cancel")
    except RuntimeError:
        pass
print("done", i, flush=True)
"""


# -- helpers ----------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value


def agent_events(node, name: str, **match) -> list[dict]:
    return [e for e in node.agent.events() if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]


def controller_events(node, name: str) -> list[dict]:
    return [e for e in node.app.controller.events() if e.get("event") == name]


def sec_status(c, node) -> dict:
    return c.status()["replication"]["secondaries"][node.name]


def log_serial(c) -> int:
    return c.status()["log"]["serial"]


def start_nodes(c, *agents) -> None:
    """Start every controller, then the agents of `agents` (secondaries first,
    so the primary finds them), without waiting for streaming."""
    for node in c.nodes:
        node.app.start()
    for node in agents:
        node.agent.start()


def route_through(c, index: int, proxy: ReplProxy) -> None:
    """Point the primary at `proxy` instead of secondary `index` (before start)."""
    path = c.primary.app.config
    direct = f'address = "127.0.0.1:{c.ports[index]}"'
    text = path.read_text()
    assert direct in text
    path.write_text(text.replace(direct, f'address = "{proxy.address}"'))


def edit_config(node, old: str, new: str) -> None:
    """Replace `old` (which must be there) by `new` in a node's config file (before start)."""
    text = node.app.config.read_text()
    assert old in text, f"{old!r} not in {node.app.config}"
    node.app.config.write_text(text.replace(old, new))


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Run fn(*args) in a daemon thread; the dict gets "result" or "error"."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


class Writer:
    """A child process running WRITER on the primary until stopped."""

    def __init__(self, c, seed: int = 1) -> None:
        self.c = c
        self.stop_file = c.primary.app.dir / f"stop-writer-{seed}"
        self.proc = c.primary.app.spawn(WRITER, str(self.stop_file), str(seed), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"writer not ready (exit {self.proc.poll()}, said {line!r})"

    def progress(self, serials: int = 1200, timeout: float = 60.0) -> int:
        """Wait until the primary's change log has moved on by `serials` entries."""
        start = log_serial(self.c)
        return wait_for(lambda: (s := log_serial(self.c)) >= start + serials and s, timeout,
                        f"{serials} more log entries from the writer")

    def stop(self, timeout: float = 60.0) -> int:
        """Stop it; the number of operations it ran."""
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0 and out.split()[0] == "done", out
        return int(out.split()[1])


def records_of(cfg_path) -> dict:
    with appliance.connect(cfg_path) as db:
        with db.snapshot() as snap:
            return {t: list(snap.table(t).range()) for t in db.tables}


def assert_identical(c, min_records: int = 1) -> dict:
    """Every secondary caught up and holds exactly the primary's records."""
    c.wait_caught_up(timeout=60)
    rc, res = c.verify()
    assert rc == 0 and res.get("identical"), res
    primary = records_of(c.primary.app.config)
    assert sum(len(v) for v in primary.values()) >= min_records
    for s in c.secondaries:
        assert records_of(s.app.config) == primary, f"{s.name} differs from the primary"
    return primary


#: the entry kinds a log history keeps (every kind but PAD; BLOCK entries without their
#: images, which are structure, not data)
HISTORY_KINDS = {lib.APL_CE_BEGIN, lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_DELETE,
                 lib.APL_CE_COMMIT, lib.APL_CE_CANCEL, lib.APL_CE_BLOCK}


def primary_log(c) -> list[tuple[int, int]]:
    """(serial, kind) of the data entries the primary's change log still holds."""
    att = Attachment(c.primary.name, writable=False)
    try:
        reader = Reader(att)
        b = changelog.bounds(reader)
        return [(e.serial, e.kind) for e in changelog.read_entries(reader, b["tail"]) if e.kind in HISTORY_KINDS]
    finally:
        att.close()


def history_entries(node, directory: str = "hist") -> list[LogEntry]:
    """Every entry in the history files of a secondary (what is on disk)."""
    h = History(node.app.dir / directory, period=86400, memory=1 << 30, disk=1 << 40, keep_a=False, log=None)
    return [LogEntry.parse(0, raw) for raw in h.read()]


def history_last_serial(node, directory: str = "hist") -> int:
    """The last serial the history on disk holds, closed parts and the current one (0: none yet)."""
    from appliance.recovery.history import HistoryDir, last_serial
    return max((last_serial(b) for b in HistoryDir(node.app.dir / directory).blobs()), default=0)


HIST = 'history_dir = "hist"\nhistory_memory = "16KiB"'


def with_history(node) -> None:
    """Give one secondary a log history (before start)."""
    edit_config(node, 'role = "secondary"\n', f'role = "secondary"\n{HIST}\n')


def assert_history_complete(c, node) -> None:
    """Stop the node's agent (it spills its history) and compare the history
    with the primary's change log: the same entries, each once, in order."""
    node.agent.signal(signal.SIGTERM)
    node.agent.proc.wait(20)
    mine = [(e.serial, e.kind) for e in history_entries(node)]
    theirs = primary_log(c)
    dups = len(mine) - len(set(mine))
    missing = sorted(set(theirs) - set(mine))
    assert len(theirs) > 100 and theirs[0][0] == 1, "the primary's log no longer holds everything"
    assert not dups and not missing and mine == theirs, \
        f"history: {dups} duplicate entries, {len(missing)} missing (first {missing[:5]}), " \
        f"{len(mine)} entries for the primary's {len(theirs)}"


# -- 1. agents and controllers killed -----------------------------------------------------------


@pytest.fixture
def crash_cluster(make_cluster):
    """A sync secondary, and an async one with a log history that shows every
    entry it received (so gaps and duplicates show)."""
    c = make_cluster(secondaries=(("sync", ""), ("async", "")), log_size="16MiB")
    with_history(c.secondaries[1])
    return c.start()


def crash_mid_stream(c, kill, restart, writes_while_down: bool) -> None:
    """Run the writer; kill something mid-stream, restart it, write on; then
    everything must be identical and the history complete."""
    w = Writer(c)
    try:
        w.progress()
        kill()
        if writes_while_down:
            w.progress()
        else:                      # the writer's commits wait for the sync secondary meanwhile
            sync = c.secondaries[0]
            rep = c.wait_waiting()
            assert sync.name in rep["waiting"][0]["waiting_for"], rep["waiting"]
            assert rep["secondaries"][sync.name]["acked_serial"] < rep["waiting"][0]["serial"]
        restart()
        for s in c.secondaries:
            c.wait_state(s.name, "streaming", connected=True)
        w.progress()
    finally:
        ops = w.stop()
    assert ops > 200
    assert_identical(c, min_records=200)
    assert_history_complete(c, c.secondaries[1])


class TestAgentCrashes:
    def test_primary_agent_sigkill_mid_stream(self, crash_cluster):
        """The primary's agent SIGKILLed during writes and restarted resumes every secondary: no gap, no duplicate."""
        c = crash_cluster
        crash_mid_stream(c, c.primary.agent.kill, c.primary.agent.start, writes_while_down=False)
        assert len(agent_events(c.primary, "agent_started")) == 2

    @pytest.mark.parametrize("index", [0, 1], ids=["sync", "async"])
    def test_secondary_agent_sigkill_mid_stream(self, crash_cluster, index):
        """A secondary's agent SIGKILLed during writes and restarted resumes where it stood: no gap, no duplicate."""
        c = crash_cluster
        sec = c.secondaries[index]
        crash_mid_stream(c, sec.agent.kill, sec.agent.start, writes_while_down=index == 1)
        assert agent_events(c.primary, "secondary_disconnected", secondary=sec.name)

    def test_secondary_controller_sigkill_mid_stream(self, crash_cluster):
        """A secondary's controller SIGKILLed during writes: restarting the controller alone resumes replication."""
        c = crash_cluster
        sec = c.secondaries[0]
        crash_mid_stream(c, sec.app.controller.kill, sec.app.controller.start, writes_while_down=False)
        assert sec.agent.proc.poll() is None, "the secondary's agent died with its controller"
        assert agent_events(sec, "controller_link_lost")
        assert len(controller_events(sec, "agent_attached")) >= 2   # the same agent attached again by itself

    def test_commit_applied_but_unacknowledged_before_restart_is_released(self, make_cluster):
        """A sync commit the secondary applied but could not acknowledge before its agent died returns once the agent is back."""
        c = make_cluster(secondaries=(("sync", ""),), secondary_replication='history_dir = "hist"')
        sec = c.secondaries[0]
        with ReplProxy(c.ports[0]) as proxy:
            route_through(c, 0, proxy)
            c.start()
            db = c.primary.app.connect()
            sdb = sec.app.connect()
            acc = db.table("accounts")
            acc[1] = {"branch": "a", "balance": 1}
            first = log_serial(c)
            # the history is on disk as it arrives: the crash below cannot lose the commit's history
            wait_for(lambda: history_last_serial(sec) >= first, 15, "the history to hold the first commit")
            proxy.pause("to_primary")                    # the secondary's ACK stalls in the proxy
            t, out = in_thread(acc.__setitem__, 2, {"branch": "b", "balance": 2})
            wait_for(lambda: log_serial(c) > first and sdb.applied_serial() == log_serial(c), 10,
                     "the secondary to apply the commit")
            [w] = c.wait_waiting()["waiting"]            # applied there, waiting here for the ACK
            assert w["serial"] == sdb.applied_serial() and not w["answered"] and "result" not in out, (w, out)
            assert sec_status(c, sec)["acked_serial"] < w["serial"]
            sec.agent.kill()                             # applied, never acknowledged
            proxy.drop()
            proxy.resume()
            sec.agent.start()
            c.wait_state(sec.name, "streaming", connected=True)
            t.join(30)
            assert not t.is_alive(), "the commit is still waiting for an acknowledgement"
            assert "error" not in out, out
            assert sec_status(c, sec)["acked_serial"] >= w["serial"] and c.status()["replication"]["waiting"] == []
            assert_identical(c)


# -- 2. the link broken on purpose (tests/repl_proxy.py) --------------------------------------


@pytest.fixture
def proxied(make_cluster):
    """An async secondary with a log history, reached through a fault-injecting proxy."""
    c = make_cluster(secondaries=(("async", ""),), secondary_replication=HIST, log_size="16MiB")
    proxy = ReplProxy(c.ports[0])
    try:
        route_through(c, 0, proxy)
        c.start()
        yield c, proxy, c.secondaries[0]
    finally:
        proxy.close()


def connections(c, sec) -> int:
    return len(agent_events(c.primary, "secondary_connected", secondary=sec.name))


def assert_agents_alive(c) -> None:
    for node in c.nodes:
        assert node.agent.proc.poll() is None, f"the agent of {node.name} exited"
        assert node.app.controller.proc.poll() is None, f"the controller of {node.name} exited"


class TestLinkFaults:
    def test_repeated_drops_during_writes(self, proxied):
        """The link dropped four times during writes: each time the primary reconnects and resumes; identical, no duplicate."""
        c, proxy, sec = proxied
        w = Writer(c)
        try:
            for _ in range(4):
                w.progress()
                n = connections(c, sec)
                assert proxy.drop() >= 1
                wait_for(lambda: connections(c, sec) > n, 20, "a reconnection after the drop")
            w.progress()
        finally:
            w.stop()
        assert proxy.stats["drops"] == 4 and proxy.stats["connections"] >= 5
        assert_identical(c, min_records=200)
        assert_history_complete(c, sec)

    def test_stall_shows_lag_then_catches_up(self, proxied):
        """While the link stalls for 2 s the primary's status shows the secondary lagging; after it resumes it catches up."""
        c, proxy, sec = proxied
        db = c.primary.app.connect()
        acc = db.table("accounts")
        acc[0] = {"branch": "a", "balance": 0}
        c.wait_caught_up()
        proxy.pause()
        try:
            for k in range(1, 101):
                acc[k] = {"branch": "a", "balance": k}          # async: no waiting for the secondary
            serial = log_serial(c)
            st = wait_for(lambda: (s := sec_status(c, sec))["lag"]["transactions"] >= 100 and s, 30,
                          "the lag to show in the status")
            assert st["acked_serial"] < serial and st["lag"]["seconds"] > 0
            # the status itself says the secondary has been behind for 2 s, and by all 100 commits
            st = wait_for(lambda: (s := sec_status(c, sec))["lag"]["seconds"] >= 2.0 and s, 30,
                          "the status to show 2 s of lag")
            assert st["lag"]["transactions"] >= 100 and st["acked_serial"] < serial, st
        finally:
            proxy.resume()
        c.wait_caught_up()
        st = wait_for(lambda: (s := sec_status(c, sec))["lag"]["transactions"] == 0 and s, 10, "lag 0")
        assert st["healthy"] and st["connected"]
        assert_identical(c, min_records=101)

    def test_reordered_frames_are_nakd_and_resent(self, proxied):
        """Three ENTRIES frames delivered in reverse: the secondary detects the gap, NAKs, and the stream resumes; identical, no duplicate."""
        c, proxy, sec = proxied
        w = Writer(c)
        try:
            w.progress()
            proxy.reorder_next(3)
            wait_for(lambda: proxy.stats["reordered"], 20, "three frames reordered")
            gap = sec.agent.wait_event("gap_detected")
            assert gap["got"] > gap["expected"]
            c.primary.agent.wait_event("secondary_gap", secondary=sec.name)
            w.progress()
        finally:
            w.stop()
        assert_identical(c, min_records=200)
        assert_history_complete(c, sec)

    def test_corrupted_frame_drops_the_connection_only(self, proxied):
        """A frame garbled in transit: the secondary drops that connection (both agents live on), the primary reconnects; identical."""
        c, proxy, sec = proxied
        w = Writer(c)
        try:
            w.progress()
            n = connections(c, sec)
            proxy.corrupt_next()
            wait_for(lambda: proxy.stats["corrupted"], 20, "a frame corrupted")
            failed = sec.agent.wait_event("primary_link_failed")
            assert "frame" in failed["error"] or "msgpack" in failed["error"], failed
            wait_for(lambda: connections(c, sec) > n, 20, "a reconnection")
            assert_agents_alive(c)
            w.progress()
        finally:
            w.stop()
        assert_identical(c, min_records=200)


class TestLargeTransactions:
    def test_transaction_larger_than_one_message_replicates(self, make_cluster):
        """A transaction whose log entries exceed one ENTRIES message (1 MiB) reaches the secondary intact."""
        c = make_cluster(secondaries=(("async", ""),), log_size="16MiB").start()
        sec = c.secondaries[0]
        db = c.primary.app.connect()
        head = c.status()["log"]["head"]
        with db.transaction() as tx:
            for k in range(1500):
                tx.put("accounts", k, {"branch": "x" * 200, "balance": k})
        st = c.status()["log"]
        assert st["head"] - head > 1 << 20
        outcome = wait_for(lambda: "exited" if sec.app.controller.proc.poll() is not None else
                           sec_status(c, sec)["acked_serial"] >= st["serial"] and "caught up", 20, "an outcome")
        assert outcome == "caught up", [e["error"] for e in controller_events(sec, "apply_failed_exiting")]
        assert len(assert_identical(c, min_records=1500)["accounts"]) == 1500


# -- 3. block copies -----------------------------------------------------------------------------

DOCS_TABLES = BANK_TABLES + """
[tables.docs]
primary_key = "id"
fields = { id = "int", body = "str" }
"""


def load_docs(cfg_path, n: int, size: int, batch: int = 500) -> None:
    with appliance.connect(cfg_path) as db:
        assert db.load("docs", ({"id": i, "body": f"{i:010d}" * (size // 10)} for i in range(n)), batch=batch) == n


class TestCopy:
    @pytest.fixture
    def docs_cluster(self, make_cluster):
        """One async secondary, through a proxy, not started yet; 20,000 records of 1 KB on the primary."""
        c = make_cluster(secondaries=(("async", ""),), tables=DOCS_TABLES, segment_size="64MiB", log_size="16MiB")
        proxy = ReplProxy(c.ports[0])
        try:
            route_through(c, 0, proxy)
            start_nodes(c, c.primary)                   # the secondary's agent is not started
            load_docs(c.primary.app.config, 20000, 1000)
            yield c, proxy, c.secondaries[0]
        finally:
            proxy.close()

    def test_copy_progress_shows_in_status(self, docs_cluster):
        """During a first copy the primary's status shows state "copying" with its progress; then streaming; identical."""
        c, proxy, sec = docs_cluster
        proxy.pause_after(rp.COPY_BLOCKS)       # hold the copy mid-way (20 MB do not fit the socket buffers)
        sec.agent.start()
        try:
            st = wait_for(lambda: (s := sec_status(c, sec))["state"] == "copying" and (s["copy"] or {}).get("blocks")
                          and s, 30, "copy progress in the status")
        finally:
            proxy.resume()
        p = st["copy"]
        assert 0 < p["blocks"] < p["total"] and p["bytes"] > 0 and p["rate_mb_s"] > 0, p
        assert not st["healthy"]
        c.wait_state(sec.name, "streaming", connected=True)
        c.primary.agent.wait_event("copy_finished", secondary=sec.name)
        sec.agent.wait_event("copy_complete")
        records = assert_identical(c, min_records=20000)
        assert len(records["docs"]) == 20000

    def test_first_copy_while_writes_continue(self, docs_cluster):
        """A first copy completes while a writer keeps changing the primary, then the secondary streams; identical."""
        c, proxy, sec = docs_cluster
        w = Writer(c)
        try:
            sec.agent.start()
            outcome = wait_for(lambda: ("complete" if agent_events(sec, "copy_complete") else
                                        len(agent_events(c.primary, "copy_started", secondary=sec.name)) >= 3
                                        and "restarted"), 60, "the copy to complete or restart")
            failures = [e["error"] for e in agent_events(sec, "primary_link_failed")]
            assert outcome == "complete", f"the copy restarted twice: {failures[:2]}"
            c.wait_state(sec.name, "streaming", connected=True)
            w.progress()
        finally:
            w.stop()
        assert_identical(c, min_records=20000)

    def test_lapped_log_triggers_a_copy(self, make_cluster):
        """An async secondary down while the primary's 1 MiB log wraps several times gets a block copy on its return; identical."""
        c = make_cluster(secondaries=(("async", ""),), log_size="1MiB").start()
        sec = c.secondaries[0]
        db = c.primary.app.connect()
        acc = db.table("accounts")
        acc[0] = {"branch": "start", "balance": 0}
        c.wait_caught_up()
        copies = len(agent_events(c.primary, "copy_finished", secondary=sec.name))   # the first copy, at start
        sec.agent.kill()
        head = c.status()["log"]["head"]
        for round_ in range(40):                # about 4 MiB of log: the ring wraps 4 times
            with db.transaction(program="fill", input=round_) as tx:
                for k in range(100):
                    tx.put("accounts", k, {"branch": f"r{round_}-" + "x" * 200, "balance": round_})
        assert c.status()["log"]["head"] - head > 4 << 20
        sec.agent.start()
        wait_for(lambda: len(agent_events(c.primary, "copy_finished", secondary=sec.name)) > copies, 30,
                 "a second copy")
        c.wait_state(sec.name, "streaming", connected=True)
        records = assert_identical(c, min_records=100)
        assert {r["branch"] for r in records["accounts"]} == {"r39-" + "x" * 200}


# -- 4. a sync secondary that stops answering ---------------------------------------------------


#: a sync secondary's degrade_after in these tests (s)
DEGRADE_AFTER = 1.0


def sync_cluster(make_cluster, policy: str):
    c = make_cluster(secondaries=(("sync", f'on_unreachable = "{policy}"\ndegrade_after = {DEGRADE_AFTER}'),)).start()
    db = c.primary.app.connect()
    db.table("accounts")[1] = {"branch": "a", "balance": 1}
    return c, c.secondaries[0], db


def put_in_transaction(db, key: int, record: dict) -> dict:
    """Commit one put; the transaction's result (txn, serial, version)."""
    with db.transaction() as tx:
        tx.put("accounts", key, record)
    return tx.result


@contextmanager
def commit_while_stopped(sec, db):
    """SIGSTOP the secondary's agent and commit in a thread (yields the thread
    and its outcome: "result", the transaction's result); SIGCONT on the way out."""
    sec.agent.signal(signal.SIGSTOP)
    try:
        yield in_thread(put_in_transaction, db, 2, {"branch": "b", "balance": 2})
    finally:
        sec.agent.signal(signal.SIGCONT)


class TestDegrade:
    def test_degrade_policy_lets_commits_go_on_then_rejoins(self, make_cluster):
        """"degrade": with the secondary stopped a commit waits degrade_after, then proceeds; status and log say degraded; it rejoins after catching up."""
        c, sec, db = sync_cluster(make_cluster, "degrade")
        with commit_while_stopped(sec, db) as (t, out):
            t.join(30)
            assert not t.is_alive() and "error" not in out, out
            serial = out["result"]["serial"]
            st = sec_status(c, sec)
            assert st["degraded"] and not st["healthy"] and st["acked_serial"] < serial
            # the commit was held until the secondary was degraded, degrade_after after it began to wait
            ev = wait_for(lambda: controller_events(c.primary, "secondary_degraded"), 5, "secondary_degraded")[0]
            assert ev["secondary"] == sec.name and ev["after_s"] == DEGRADE_AFTER and ev["waiting_serial"] == serial
            db.table("accounts")[3] = {"branch": "c", "balance": 3}     # degraded: no more waiting at all
            assert c.status()["replication"]["waiting"] == []
        ev = wait_for(lambda: controller_events(c.primary, "secondary_rejoined_quorum"), 30, "rejoined")[0]
        assert ev["secondary"] == sec.name
        st = wait_for(lambda: (s := sec_status(c, sec))["healthy"] and s, 10, "healthy again")
        assert not st["degraded"]
        assert_identical(c, min_records=3)

    def test_block_policy_keeps_commits_waiting(self, make_cluster):
        """"block" (the default): with the secondary stopped a commit keeps waiting past degrade_after, and returns once it resumes."""
        c, sec, db = sync_cluster(make_cluster, "block")
        with commit_while_stopped(sec, db) as (t, out):
            # the status says the commit has waited past degrade_after and two housekeeping
            # rounds (which degrade a secondary whose policy says so): it waits on, unanswered
            rep = c.wait_replication(lambda rep: rep["waiting"] and rep["waiting"][0]["waiting_s"]
                                     >= DEGRADE_AFTER + 2 * HOUSEKEEPING_S, "a commit waiting past degrade_after")
            [w] = rep["waiting"]
            assert not w["answered"] and w["waiting_for"] == [sec.name], w
            assert rep["secondaries"][sec.name]["acked_serial"] < w["serial"]
            assert not rep["secondaries"][sec.name]["degraded"] and rep["waiting_commits"] == 1
            assert "result" not in out, f"the commit returned while its sync secondary was stopped: {out}"
        t.join(30)
        assert not t.is_alive() and "error" not in out, out
        assert out["result"]["serial"] == w["serial"]
        assert not controller_events(c.primary, "secondary_degraded")
        assert_identical(c, min_records=2)


# -- 5. who may connect ---------------------------------------------------------------------------


class TestSecurity:
    @pytest.mark.parametrize("wrong", ["secret", "primary_name"])
    def test_misconfigured_secondary_is_refused(self, make_cluster, tmp_path, wrong):
        """A secondary with another secret, or following another primary, is refused on both sides; nothing reaches it; the rest goes on."""
        c = make_cluster(secondaries=(("sync", ""), ("async", "")))
        bad, good = c.secondaries
        if wrong == "secret":
            other = tmp_path / "other-secret"
            other.write_text("another secret, long enough for HMAC")
            other.chmod(0o600)
            edit_config(bad, f'secret_file = "{c.secret}"', f'secret_file = "{other}"')
        else:
            edit_config(bad, f'primary = "{c.primary.name}"', 'primary = "someone-else"')
        start_nodes(c, bad, good, c.primary)
        c.wait_state(good.name, "streaming", connected=True)
        failed = c.primary.agent.wait_event("secondary_link_failed", secondary=bad.name)
        refused = bad.agent.wait_event("primary_refused")
        assert failed["code"].startswith("AuthError" if wrong == "secret" else "AccessDeniedError"), failed
        if wrong == "secret":
            assert "authentication" in failed["error"] and "authentication failed" in refused["error"]
        else:
            assert "someone-else" in failed["error"] and "not the configured primary" in refused["error"]
        db = c.primary.app.connect()
        with db.transaction(durability="local") as tx:
            tx.put("accounts", 1, {"branch": "a", "balance": 1})
        with good.app.connect() as gdb:
            gdb.wait_applied(log_serial(c))
            assert records_of(good.app.config) == records_of(c.primary.app.config)
        with bad.app.connect() as bdb:
            assert bdb.applied_serial() == 0 and len(bdb.table("accounts")) == 0
        st = sec_status(c, bad)
        assert not st["connected"] and st["acked_serial"] == 0
        assert_agents_alive(c)

    # mutual TLS ---------------------------------------------------------------------------------

    @staticmethod
    def _tls_files(d: Path, role: str) -> str:
        """The [replication] TLS lines of one side (the files are made later)."""
        return f'tls_cert = "{d / role}.crt"\ntls_key = "{d / role}.key"\ntls_ca = "{d / "ca.crt"}"'

    @staticmethod
    def _issue(d: Path, role: str, name: str, ca) -> None:
        """Write <role>.crt/.key for commonName `name`, signed by `ca` (key, cert)."""
        x509, hashes, ec, ser, oid = tls_modules()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, name)]))
                .issuer_name(ca[1].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca[0], hashes.SHA256()))
        (d / f"{role}.crt").write_bytes(cert.public_bytes(ser.Encoding.PEM))
        (d / f"{role}.key").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                          ser.NoEncryption()))
        (d / f"{role}.key").chmod(0o600)

    def _tls_cluster(self, make_cluster, tmp_path, wrong: str | None = None, side: str = "secondary"):
        """A primary and one sync secondary with the shared secret and mutual TLS; `wrong`
        ("ca": signed by another CA, "name": another commonName) spoils one side's certificate."""
        d = tmp_path / "tls"
        d.mkdir()
        c = make_cluster(secondaries=(("sync", ""),), primary_replication=self._tls_files(d, "primary"),
                         secondary_replication=self._tls_files(d, "secondary"))
        ca, rogue = make_ca("test CA"), make_ca("rogue CA")
        (d / "ca.crt").write_bytes(ca[2])
        for role, node in (("primary", c.primary), ("secondary", c.secondaries[0])):
            bad = role == side
            self._issue(d, role, "impostor" if bad and wrong == "name" else node.name,
                        rogue if bad and wrong == "ca" else ca)
        return c

    def test_mutual_tls_replicates(self, make_cluster, tmp_path):
        """With the secret and mutual TLS (certificates named after the appliances, one CA) replication works; identical."""
        c = self._tls_cluster(make_cluster, tmp_path).start()
        sec = c.secondaries[0]
        assert sec.agent.wait_event("listening_for_primary")["tls"] is True
        with c.primary.app.connect() as db:
            for k in range(50):
                db.table("accounts")[k] = {"branch": "tls", "balance": k}
        assert_identical(c, min_records=50)

    @pytest.mark.parametrize("wrong, side, error", [
        ("ca", "secondary", "certificate verify failed"),        # the primary checks the secondary's certificate
        ("ca", "primary", ""),                                   # the secondary checks the primary's: a reset
        ("name", "secondary", "its certificate is for 'impostor'"),
    ], ids=["secondary-other-ca", "primary-other-ca", "secondary-other-name"])
    def test_bad_certificate_is_refused(self, make_cluster, tmp_path, wrong, side, error):
        """A certificate signed by another CA, or naming another appliance, is refused: no link, nothing applied."""
        c = self._tls_cluster(make_cluster, tmp_path, wrong, side)
        sec = c.secondaries[0]
        start_nodes(c, sec, c.primary)
        failed = c.primary.agent.wait_event("secondary_link_failed", secondary=sec.name)
        assert error in failed["error"], failed
        if wrong == "name":
            assert "certificate name does not match" in sec.agent.wait_event("primary_refused")["error"]
        with c.primary.app.connect() as db:
            with db.transaction(durability="local") as tx:
                tx.put("accounts", 1, {"branch": "a", "balance": 1})
        st = sec_status(c, sec)
        assert not st["connected"] and st["acked_serial"] == 0
        assert not agent_events(sec, "primary_connected")
        with sec.app.connect() as sdb:
            assert sdb.applied_serial() == 0 and len(sdb.table("accounts")) == 0
        assert_agents_alive(c)

    def test_secondary_logs_a_rejected_primary_certificate(self, make_cluster, tmp_path):
        """A primary presenting a certificate from another CA is refused with a log line on the secondary too."""
        c = self._tls_cluster(make_cluster, tmp_path, "ca", "primary")
        sec = c.secondaries[0]
        start_nodes(c, sec, c.primary)
        wait_for(lambda: sec_status(c, sec)["attempts"] >= 3, 20, "three refused attempts")
        assert agent_events(sec, "primary_refused") or agent_events(sec, "primary_link_failed"), \
            "the secondary refused three TLS handshakes without a word"
        with sec.app.connect() as sdb:
            assert sdb.applied_serial() == 0


def tls_modules():
    """cryptography's x509 pieces (the test is skipped without the package)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import oid
    return x509, hashes, ec, serialization, oid


def make_ca(name: str):
    """(key, certificate, certificate PEM) of a self-signed CA."""
    x509, hashes, ec, ser, oid = tls_modules()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert, cert.public_bytes(ser.Encoding.PEM)


# -- 6. garbage on the secondary's listen port ---------------------------------------------------


def poke(port: int, payload: bytes, timeout: float = 5.0) -> bool:
    """Connect to `port`, send `payload`, half-close; True once the peer has closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    return True
            except ConnectionResetError:
                return True
            except socket.timeout:
                break
    return False


def msgpack_values():
    scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats()
               | st.text(max_size=16) | st.binary(max_size=40))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                        | st.dictionaries(st.text(max_size=8) | st.integers(0, 100), inner, max_size=5),
                        max_leaves=12)


class TestGarbage:
    def test_garbage_on_the_listen_port_drops_only_that_connection(self, make_cluster):
        """Random bytes, huge length prefixes, random msgpack, forged HELLOs and truncated frames: each connection is dropped, the agent lives on, the real primary keeps replicating."""
        c = make_cluster(secondaries=(("async", ""),)).start()
        sec, port = c.secondaries[0], c.ports[0]
        links = connections(c, sec)
        db = c.primary.app.connect()
        acc = db.table("accounts")

        # a well-formed handshake that then fails authentication
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            framing.send_frames(s, [rp.message(rp.HELLO, 1, 0, {
                "version": rp.PROTOCOL_VERSION, "name": c.primary.name, "instance": 1, "fingerprint": 0,
                "files": [], "nonce": os.urandom(32), "mode": "async"})])
            kind, *_, body = framing.recv_frame(s)
            assert kind == rp.CHALLENGE and body["name"] == sec.name
            framing.send_frames(s, [rp.message(rp.AUTH, 1, 0, {"mac": os.urandom(32)})])
            kind, *_, body = framing.recv_frame(s)
            assert kind == rp.ERROR and body["code"] == "APL_EACCESS"
            assert s.recv(1) == b""
        assert "failed authentication" in sec.agent.wait_event("primary_refused")["error"]

        hello_bodies = st.fixed_dictionaries({
            "version": st.sampled_from([rp.PROTOCOL_VERSION, 0, 2, "1", None]) | msgpack_values(),
            "name": st.sampled_from([c.primary.name, sec.name, ""]) | msgpack_values(),
            "instance": msgpack_values(), "fingerprint": msgpack_values(), "files": msgpack_values(),
            "nonce": st.binary(min_size=32, max_size=32) | msgpack_values(), "mode": msgpack_values()},
            optional={"extra": msgpack_values()})
        hellos = st.builds(lambda e, s_, b: framing.encode([rp.HELLO, e, s_, time.time_ns(), b]),
                           st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), hello_bodies | msgpack_values())
        frames = msgpack_values().map(framing.encode) | hellos
        payloads = st.one_of(
            st.binary(max_size=300),                                                     # random bytes
            st.builds(lambda n, tail: struct.pack("<I", n) + tail,                       # huge length prefixes
                      st.integers(1 << 20, 2 ** 32 - 1), st.binary(max_size=64)),
            frames,                                                                      # well framed
            st.builds(lambda f, cut: f[:max(1, len(f) * cut // 100)], frames, st.integers(1, 99)),  # truncated
            st.lists(frames, min_size=2, max_size=4).map(b"".join),                      # several at once
        )

        @settings(max_examples=100, deadline=None, database=None)
        @given(payload=payloads)
        def fuzz(payload):
            assert poke(port, payload), f"the secondary kept a connection open after {payload[:40]!r}"
            assert sec.agent.proc.poll() is None, sec.agent.log()[-2000:]

        for k in range(20):
            acc[k] = {"branch": "before", "balance": k}
        fuzz()
        for k in range(20, 40):
            acc[k] = {"branch": "after", "balance": k}
        assert_agents_alive(c)
        assert connections(c, sec) == links, "the garbage disturbed the real primary's link"
        assert_identical(c, min_records=40)


# -- 7. the secondary's log history ----------------------------------------------------------------


class TestHistory:
    def test_history_files_hold_t_logs_and_b_logs(self, make_cluster):
        """history_dir spills lz4 files whose BEGIN entries carry [program, input] and whose changes carry B images; A images only with history_a_logs."""
        c = make_cluster(secondaries=(("async", ""), ("async", "")),
                         secondary_replication=HIST)
        plain, with_a = c.secondaries
        with_a_logs = HIST + "\nhistory_a_logs = true"
        edit_config(with_a, HIST, with_a_logs)
        c.start()
        db = c.primary.app.connect()
        db.load("accounts", ({"id": k, "branch": "b" * 100, "balance": k} for k in range(250)))
        for i in range(200):
            with db.transaction(program="interest", input={"i": i, "rate": 3}) as tx:
                tx.update("accounts", i, {"balance": 1000 + i})
                if i % 4 == 0:
                    tx.delete("accounts", 200 + i // 4)
        serial = assert_identical(c, min_records=150) and log_serial(c)
        for node in c.secondaries:
            node.agent.signal(signal.SIGTERM)           # a stopping agent closes its current part
            node.agent.proc.wait(20)
            assert history_last_serial(node) == serial
            assert len(list((node.app.dir / "hist").glob("history-*.lz4"))) >= 2      # spilled more than once
            entries = history_entries(node)
            t_logs = [msgpack.unpackb(e.a) for e in entries if e.kind == lib.APL_CE_BEGIN and e.a]
            assert [["interest", {"i": i, "rate": 3}] for i in range(200)] == \
                [t for t in t_logs if t and t[0] == "interest"]
            changes = [e for e in entries if e.kind in (lib.APL_CE_UPDATE, lib.APL_CE_DELETE) and e.file == 0]
            assert len(changes) == 250 and all(e.b for e in changes)    # file 0: the accounts records
            has_a = [bool(e.a) for e in changes if e.kind == lib.APL_CE_UPDATE]
            assert all(has_a) if node is with_a else not any(has_a)

    def test_history_has_no_duplicates_after_controller_restart(self, make_cluster):
        """A secondary's controller SIGKILLed during writes: its log history still holds each entry exactly once."""
        c = make_cluster(secondaries=(("async", ""),), secondary_replication=HIST, log_size="16MiB").start()
        sec = c.secondaries[0]
        w = Writer(c)
        try:
            w.progress()
            links = connections(c, sec)
            sec.app.controller.kill()
            wait_for(lambda: connections(c, sec) >= links + 3, 20, "the primary to resend while the controller is down")
            sec.app.controller.start()
            c.wait_state(sec.name, "streaming", connected=True)
            w.progress()
        finally:
            w.stop()
        assert_identical(c, min_records=200)
        assert_history_complete(c, sec)
