"""Faults: controller crashes, client deaths, bad input on the socket, access control.

Real controller processes, real sockets, real shared memory; children are real
processes killed with real signals.
"""
from __future__ import annotations

import os
import random
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import appliance
from appliance import errors
from appliance.client.session import Session, result
from appliance.store.segment import Segment, SegmentNames
from appliance.wire import framing
from appliance.wire import messages as m
from conftest import BANK_TABLES
from fault_helpers import (NOBODY, RawConn, check_indexes, events, kill_child, out_lines, rec, records,
                           reply_error, run_as, spawn_ready, start_controller, wait_event, wait_for)

CHILD_PRELUDE = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import appliance
from appliance import errors
from fault_helpers import rec
"""

#: writes keys first, first+1, ... until the stop file exists; one key per autocommit,
#: or two per explicit transaction; prints "try k.." before and "ok k.." once the
#: commit returned. Retries after UnavailableError (the client reconnects by itself).
WRITER = CHILD_PRELUDE + """
cfg, stop, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = appliance.connect(cfg)
acc = db.table("accounts")
print("ready", flush=True)
while not os.path.exists(stop):
    keys = [k, k + 1] if k % 3 == 0 else [k]
    print("try", *keys, flush=True)
    while True:
        try:
            if len(keys) == 1:
                acc[k] = rec(k)
            else:
                with db.transaction(program="pair", input=keys) as tx:
                    for key in keys:
                        tx.put("accounts", key, rec(key))
            break
        except (errors.UnavailableError, errors.TransactionCancelledError) as e:
            print("retry", type(e).__name__, flush=True)
            time.sleep(0.005)
    print("ok", *keys, flush=True)
    k += len(keys)
"""

#: opens a transaction that locks and updates the given keys and inserts key 999999,
#: prints "ready" and never commits
HOLDER = CHILD_PRELUDE + """
db = appliance.connect(sys.argv[1])
tx = db.transaction(program="holder")
for k in map(int, sys.argv[2].split(",")):
    r = tx.get("accounts", k, for_update=True)
    tx.update("accounts", k, {"balance": r["balance"] + 1000, "branch": "held"})
tx.insert("accounts", {"id": 999999, "branch": "held", "balance": 1})
print("ready", flush=True)
time.sleep(600)
"""

#: attaches, then writes one byte into a segment it mapped read-only
SEGMENT_WRITER = CHILD_PRELUDE + """
import resource
from appliance._native import ffi
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
db = appliance.connect(sys.argv[1])
seg = db._att.meta if sys.argv[2] == "meta" else db._att.devices[0]
print("mapped", flush=True)
ffi.cast("uint8_t *", seg.ptr)[0] = 1
print("wrote", flush=True)
"""

HELD = [1, 2, 3]
ACCESS_NOBODY = '[access]\nusers = ["nobody"]'


def preload(db, keys=range(1, 21)) -> dict:
    db.load("accounts", [rec(k) for k in keys])
    return records(db.table("accounts"))


def assert_untouched_by_holder(acc, before: dict) -> None:
    """The HOLDER's transaction left no trace: records as before, no key 999999."""
    assert records(acc) == before
    assert 999999 not in acc
    assert acc.find("branch", "held") == []
    check_indexes(acc)


def transfer_held_keys(db) -> None:
    """Lock, update and insert what HOLDER touched (raises LockTimeoutError if still locked)."""
    with db.transaction(program="after") as tx:
        for k in HELD:
            r = tx.get("accounts", k, for_update=True)
            tx.update("accounts", k, {"balance": r["balance"] - 1})
        tx.insert("accounts", {"id": 999999, "branch": "new", "balance": 0})


def session_connect(path: str, name: str) -> dict:
    s = Session(path, name, timeout=5.0)
    try:
        return s.connect()
    finally:
        s.close()


def raw_hello(path: str):
    """Connect, send HELLO (the controller may already have hung up) and return the reply frame."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    try:
        sock.connect(path)
        try:
            sock.sendall(framing.encode([m.OP_HELLO, m.PROTOCOL_VERSION, "raw"]))
        except BrokenPipeError:
            pass  # a refusal may be sent and the socket closed before we spoke: it is still readable
        return framing.FrameReader(sock).read()
    finally:
        sock.close()


def late_session_connect(path: str, name: str) -> dict:
    """session_connect by a client that is descheduled between connect() and sending its
    HELLO until the controller has hung up (simulated by a profile hook that only waits)."""
    def hook(frame, event, arg):
        sock = getattr(arg, "__self__", None)
        if event == "c_call" and isinstance(sock, socket.socket) and arg.__name__ in ("send", "sendall"):
            p = select.poll()
            p.register(sock, select.POLLRDHUP)
            p.poll(5000)
    sys.setprofile(hook)
    try:
        return session_connect(path, name)
    finally:
        sys.setprofile(None)


def attach_and_read(cfg, key):
    with appliance.connect(cfg, timeout=5.0) as c:
        return c.table("accounts").get(key)


def open_segments(names: list[str]) -> dict:
    """name -> "opened" or the exception class name (Segment.open, read-only; readers read-write)."""
    out = {}
    for n in names:
        try:
            Segment.open(n, writable=n.endswith(".readers")).close()
            out[n] = "opened"
        except errors.ApplianceError as e:
            out[n] = type(e).__name__
    return out


def assert_released_by_cancel(client) -> None:
    """No transaction open, no lock held, and none released by a lock timeout: the controller
    cancelled the transaction that held them."""
    st = client.status()["transactions"]
    assert (st["active"], st["locks_held"], st["lock_timeouts"]) == (0, 0, 0), st


def slots_in_use(client) -> int:
    blocks = client.status()["blocks"]
    return blocks["slots_total"] - blocks["slots_free"]


def exit_status(app, timeout: float = 10.0):
    """The controller's exit status once it has exited, or "still running"."""
    try:
        return app.controller.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return "still running"


def serving(cfg) -> bool:
    try:
        session_connect(str(cfg.socket_path), cfg.name)
        return True
    except errors.UnavailableError:
        return False


@pytest.fixture
def held(bank, db):
    """Records 1..20, and a child process holding an open transaction over HELD (plus an insert)."""
    before = preload(db)
    holder = spawn_ready(bank, HOLDER, ",".join(map(str, HELD)))
    yield SimpleNamespace(acc=db.table("accounts"), before=before, proc=holder)
    kill_child(holder)


# ---------------------------------------------------------------------------------------------


class TestControllerCrash:
    def test_sigkill_under_load_loses_no_committed_write(self, bank, tmp_path):
        """Repeated SIGKILLs of the controller under write load: every write whose commit returned is there, nothing unattempted is, indexes agree."""
        seed = random.randrange(1 << 32)
        rng = random.Random(seed)
        baseline = slots_in_use(bank.connect())
        stop = tmp_path / "stop"
        outs = [tmp_path / f"writer{i}.out" for i in range(2)]
        writers = []
        for i, out in enumerate(outs):
            with open(out, "w") as f:
                writers.append(bank.spawn(WRITER, str(stop), str(1 + i * 1_000_000), stdout=f))

        def committed():  # per writer: how many commits returned
            return [sum(1 for w in out_lines(out) if w[0] == "ok") for out in outs]

        def progress(n: int, what: str) -> None:
            target = [c + n for c in committed()]
            wait_for(lambda: all(c >= t for c, t in zip(committed(), target)), 30,
                     what=f"each writer to commit {n} more {what} (seed {seed})")

        for _ in range(5):
            progress(20, "before a kill")
            time.sleep(rng.uniform(0, 0.03))  # a random moment of the load
            bank.controller.kill()
            time.sleep(rng.uniform(0, 0.2))  # down for a while: writers meet no controller
            bank.controller.start()
        progress(20, "after the last restart")
        stop.touch()
        for w in writers:
            assert w.wait(timeout=60) == 0, f"writer failed (seed {seed})"

        tried, done, retries = set(), set(), 0
        for out in outs:
            for words in out_lines(out):
                keys = {int(k) for k in words[1:] if k.isdigit()}
                if words[0] == "try":
                    tried |= keys
                elif words[0] == "ok":
                    done |= keys
                elif words[0] == "retry":
                    retries += 1
        assert retries > 0, "the kills never interrupted a writer"
        db = bank.connect()
        acc = db.table("accounts")
        present = records(acc)
        assert done <= set(present), f"committed writes lost (seed {seed}): {sorted(done - set(present))[:20]}"
        assert set(present) <= tried, f"records never written (seed {seed}): {sorted(set(present) - tried)[:20]}"
        assert all(r == rec(k) for k, r in present.items())
        check_indexes(acc)
        # the recovered store still allocates and frees correctly: no block slot leaked
        db.load("accounts", [rec(k) for k in range(-200, 0)])
        assert len(check_indexes(acc)) == 200 + len(present)
        with db.transaction(program="delete all") as tx:
            for k in acc:
                tx.delete("accounts", k)
        assert len(acc) == 0 and check_indexes(acc) == []
        wait_for(lambda: slots_in_use(db) == baseline, 10,
                 what=f"block slots to return to {baseline} after deleting everything (seed {seed})")

    def test_controller_started_event_after_each_restart(self, bank):
        """Each restart logs controller_started with the recovery facts, and appliance.connect works again."""
        bank.connect().table("accounts")[1] = rec(1)
        for n in range(1, 3):
            bank.restart()
            started = wait_event(bank, "controller_started", count=n + 1)
            assert len(started) == n + 1
            last = started[-1]
            assert last["created"] is False
            for fact in ("rolled_back", "versions_kept", "blocks_live", "readers_cleared", "log_head"):
                assert f"recovery_{fact}" in last
            c = bank.connect()
            assert c.table("accounts")[1] == rec(1)
            c.table("accounts")[n + 1] = rec(n + 1)
        assert started[0]["created"] is True

    def test_uncommitted_transaction_leaves_no_trace(self, bank, db, held):
        """A transaction open (locks, updates, an insert) when the controller is SIGKILLed is gone after restart."""
        assert db.status()["transactions"]["active"] == 1
        bank.restart()
        assert_untouched_by_holder(held.acc, held.before)
        transfer_held_keys(bank.connect())  # no lock survived the restart either

    def test_connected_client_reads_while_down_and_writes_after_restart(self, bank, db):
        """While the controller is down a client's writes raise UnavailableError and its reads work; after restart its writes work again."""
        acc = db.table("accounts")
        before = preload(db)
        bank.controller.kill()
        for attempt in range(2):  # the first finds the dead connection, the second no controller
            with pytest.raises(errors.UnavailableError):
                acc[100] = rec(100)
        with pytest.raises(errors.UnavailableError):
            with db.transaction() as tx:
                tx.update("accounts", 1, {"balance": 0})
        assert records(acc) == before
        assert acc[5] == rec(5) and 100 not in acc and len(acc) == len(before)
        assert acc.find("branch", "b1") == [r for r in before.values() if r["branch"] == "b1"]
        with db.snapshot() as snap:
            assert snap.table("accounts")[7] == rec(7)
        bank.controller.start()
        acc[100] = rec(100)
        with db.transaction() as tx:
            tx.update("accounts", 1, {"balance": 0})
        assert acc[100] == rec(100) and acc[1]["balance"] == 0

    def test_client_idle_across_restart_writes(self, bank, db):
        """A client that made no call while the controller was down writes normally once it is back."""
        acc = db.table("accounts")
        acc[1] = rec(1)
        bank.restart()
        acc[2] = rec(2)
        assert acc[2] == rec(2)

    def test_open_transaction_across_restart_does_not_commit(self, bank, db):
        """A transaction opened before a controller SIGKILL cannot commit after the restart; its changes are absent."""
        acc = db.table("accounts")
        before = preload(db)
        tx = db.transaction(program="interrupted")
        tx.update("accounts", 1, {"balance": -1})
        tx.insert("accounts", rec(500))
        bank.restart()
        with pytest.raises(errors.ApplianceError) as ei:
            tx.commit()
        assert not isinstance(ei.value, errors.CommitUnknownError)
        assert tx.state == "cancelled"
        assert records(acc) == before
        with db.transaction() as tx2:  # the same records are free for a new transaction
            tx2.update("accounts", 1, {"balance": -1})
            tx2.insert("accounts", rec(500))
        assert acc[1]["balance"] == -1 and acc[500] == rec(500)

    @pytest.mark.parametrize("call", ["commit", "statement"])
    def test_transaction_call_after_restart_raises_unavailable(self, bank, db, call):
        """The next statement or commit() of a transaction whose controller was restarted raises UnavailableError and cancels it."""
        before = preload(db, [1, 2])
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": -1})
        bank.restart()
        with pytest.raises(errors.UnavailableError):
            if call == "commit":
                tx.commit()
            else:
                tx.update("accounts", 2, {"balance": -2})
        assert tx.state == "cancelled"
        assert records(db.table("accounts")) == before


class TestClientDeath:
    def test_sigkilled_client_changes_undone_and_locks_released(self, bank, db, held):
        """A client SIGKILLed mid-transaction: its changes are absent and its record locks free at once."""
        assert db.status()["transactions"]["locks_held"] == len(HELD) + 1
        kill_child(held.proc)
        assert_untouched_by_holder(held.acc, held.before)
        wait_event(bank, "txn_cancelled", reason="client_gone")
        assert_released_by_cancel(db)
        transfer_held_keys(db)  # would wait the 2 s lock timeout and raise LockTimeoutError
        assert db.status()["transactions"]["lock_timeouts"] == 0
        assert held.acc[999999]["branch"] == "new"
        assert [held.acc[k]["balance"] for k in HELD] == [held.before[k]["balance"] - 1 for k in HELD]
        wait_event(bank, "txn_cancelled", reason="client_gone")

    def test_client_closing_mid_transaction_changes_undone_and_locks_released(self, bank, db):
        """A client that closes its connection mid-transaction: changes absent, locks free for others."""
        acc = db.table("accounts")
        before = preload(db)
        other = bank.connect()
        tx = other.transaction(program="abandoned")
        for k in HELD:
            tx.update("accounts", k, {"branch": "held", "balance": tx.get("accounts", k, for_update=True)["balance"] + 1})
        tx.insert("accounts", {"id": 999999, "branch": "held", "balance": 1})
        assert db.status()["transactions"]["locks_held"] == len(HELD) + 1
        other.close()
        assert_untouched_by_holder(acc, before)
        wait_event(bank, "txn_cancelled", reason="client_gone")
        assert_released_by_cancel(db)
        transfer_held_keys(db)
        assert db.status()["transactions"]["lock_timeouts"] == 0
        assert acc[999999]["branch"] == "new"


GARBAGE = {
    "text": b"GET / HTTP/1.1\r\nHost: appliance\r\n\r\n",
    "random_bytes": random.Random(7).randbytes(512),
    "bad_version": struct.pack("<I", 16) + bytes([7]) + random.Random(8).randbytes(15),
    "bad_msgpack": struct.pack("<I", 2) + b"\x01\xc1",
    "trailing_data": struct.pack("<I", 3) + b"\x01\x01\x02",
    "empty_frame": b"\x00\x00\x00\x00",
}


def assert_others_carry_on(app, db, bystander: RawConn) -> None:
    """A client connected before, a raw connection opened before and a new client all still work."""
    assert bystander.hello()[0] == m.OK
    acc = db.table("accounts")
    acc[4242] = rec(4242)
    assert acc[4242] == rec(4242)
    assert app.connect().table("accounts")[4242] == rec(4242)
    assert app.controller.proc.poll() is None


class TestBadInput:
    @pytest.mark.parametrize("kind", sorted(GARBAGE))
    def test_garbage_bytes_drop_the_connection(self, bank, db, kind):
        """Bytes that are not a valid frame: the connection is dropped, client_dropped/bad_frame is logged, others carry on."""
        with RawConn(bank.cfg.socket_path) as bystander, RawConn(bank.cfg.socket_path) as bad:
            bad.send(GARBAGE[kind])
            assert bad.wait_closed(), "controller kept the connection after garbage"
            (ev,) = wait_event(bank, "client_dropped", reason="bad_frame")
            assert ev["pid"] == os.getpid() and ev["error"]
            assert_others_carry_on(bank, db, bystander)

    def test_huge_length_prefix_dropped_at_once(self, bank, db):
        """A length prefix of 4 GiB is refused as soon as its 4 bytes arrive: dropped and logged."""
        with RawConn(bank.cfg.socket_path) as bystander, RawConn(bank.cfg.socket_path) as bad:
            bad.send(b"\xff\xff\xff\xff")
            assert bad.wait_closed(), "controller waited for the 4 GiB body"
            (ev,) = wait_event(bank, "client_dropped", reason="bad_frame")
            assert "exceeds the limit" in ev["error"]
            assert_others_carry_on(bank, db, bystander)

    @pytest.mark.parametrize("sent", [b"\x10\x00", struct.pack("<I", 100) + b"\x01" + b"\x90" * 40],
                             ids=["half_prefix", "half_body"])
    def test_hang_up_mid_frame_is_logged(self, bank, db, sent):
        """A client that closes after part of a frame is dropped with reason hung_up_mid_frame."""
        with RawConn(bank.cfg.socket_path) as bystander:
            with RawConn(bank.cfg.socket_path) as bad:
                bad.send(sent)
            wait_event(bank, "client_dropped", reason="hung_up_mid_frame")
            assert_others_carry_on(bank, db, bystander)

    def test_invalid_requests_get_typed_errors(self, bank, db):
        """Well-framed invalid requests get typed error replies, change nothing, and the connection stays usable."""
        before = preload(db)
        put = lambda *a: [m.OP_ATOMIC, None, None, [[m.OP_PUT, *a]]]  # noqa: E731
        good = {"branch": "x", "balance": 1}
        cases = [
            ([25], errors.ProtocolError),
            ([-1, 1], errors.ProtocolError),
            ([m.OP_AGENT + 2, 0, 1], errors.AccessDeniedError),  # a replication-agent op from a client
            ([True], errors.ProtocolError),
            ("hello", errors.ProtocolError),
            ([], errors.ProtocolError),
            ([1.5, 2], errors.ProtocolError),
            ({"op": 1}, errors.ProtocolError),
            ([m.OP_HELLO], errors.ProtocolError),
            ([m.OP_HELLO, 99, "x"], errors.ProtocolError),
            (put(5, 1, good), errors.NoSuchTableError),
            (put(b"accounts", 1, good), errors.NoSuchTableError),
            (put(["accounts"], 1, good), errors.NoSuchTableError),
            (put("nosuch", 1, good), errors.NoSuchTableError),
            (put("accounts", 1, [1, 2]), errors.WrongTypeError),
            (put("accounts", "1", good), errors.WrongTypeError),
            (put("accounts", 2 ** 63, good), errors.WrongTypeError),
            (put("accounts", 1, {"branch": 5, "balance": 1}), errors.WrongTypeError),
            (put("accounts", 1, {"branch": "x"}), errors.WrongTypeError),
            (put("accounts", 1, {**good, "nosuch": 1}), errors.NoSuchFieldError),
            (put("accounts", 1), errors.ProtocolError),
            ([m.OP_ATOMIC, None, None, [[m.OP_INSERT, "accounts", [1, 2]]]], errors.WrongTypeError),
            ([m.OP_ATOMIC, None, None, [[m.OP_INSERT, "accounts", rec(1)]]], errors.DuplicateKeyError),
            ([m.OP_ATOMIC, None, None, [[m.OP_UPDATE, "accounts", 1, [1]]]], errors.WrongTypeError),
            ([m.OP_ATOMIC, None, None, [[m.OP_UPDATE, "accounts", 1, {"id": 2}]]], errors.WrongTypeError),
            ([m.OP_ATOMIC, None, None, [[m.OP_DELETE, "accounts", 12345]]], errors.NoSuchRecordError),
            ([m.OP_ATOMIC, None, None, [[m.OP_HELLO, 1, "x"]]], errors.ProtocolError),
            ([m.OP_ATOMIC, None, None, [[]]], errors.ProtocolError),
            ([m.OP_ATOMIC, None, None, "steps"], errors.ProtocolError),
            ([m.OP_ATOMIC, None, None], errors.ProtocolError),
            ([m.OP_ATOMIC, 7, None, [[m.OP_PUT, "accounts", 1, good]]], errors.WrongTypeError),
            ([m.OP_LOAD, "accounts", "records"], errors.ProtocolError),
            ([m.OP_LOAD, "accounts", [rec(900), {"id": 901}]], errors.WrongTypeError),
            ([m.OP_LOAD, 3, []], errors.NoSuchTableError),
            ([m.OP_TXN_STATUS, "x", 1], errors.WrongTypeError),
            ([m.OP_TXN_STATUS, 1], errors.ProtocolError),
            ([m.OP_COMMIT, True], errors.TransactionStateError),
            ([m.OP_GET_FOR_UPDATE, "accounts", 1], errors.TransactionStateError),
            ([m.OP_BEGIN, 5, None], errors.WrongTypeError),
            # inside an open transaction
            ([m.OP_BEGIN, None, None], None),
            ([m.OP_UPDATE, "accounts", 1, [1]], errors.WrongTypeError),
            ([m.OP_INSERT, 5, {}], errors.NoSuchTableError),
            ([m.OP_GET_FOR_UPDATE, "accounts"], errors.ProtocolError),
            ([m.OP_GET_FOR_UPDATE, "accounts", None], errors.WrongTypeError),
            ([m.OP_BEGIN, None, None], errors.TransactionStateError),
            ([m.OP_ATOMIC, None, None, []], errors.TransactionStateError),
            ([m.OP_LOAD, "accounts", []], errors.TransactionStateError),
            ([m.OP_CANCEL], None),
        ]
        wrong = []
        with RawConn(bank.cfg.socket_path) as conn:
            for req, expected in cases:
                got = reply_error(conn.request(req))
                if got is not expected and not (expected and got and issubclass(got, expected)):
                    wrong.append((req, expected and expected.__name__, got and got.__name__))
            assert not wrong, f"unexpected replies (request, expected, got): {wrong}"
            assert records(db.table("accounts")) == before
            assert conn.hello()[0] == m.OK
            assert conn.request(put("accounts", 1, good))[0] == m.OK  # no transaction was left open
        assert db.table("accounts")[1] == {"id": 1, **good}

    @pytest.mark.parametrize("req", [[m.OP_WAKEUPS], [m.OP_WAKEUPS, "extra"]], ids=["plain", "bad_args"])
    def test_wakeups_from_a_client_are_refused(self, bank, req):
        """OP_WAKEUPS (an agent's eventfds and acknowledgement memory) from a session that is not an agent's is refused with AccessDeniedError, with no descriptor, and the connection serves on."""
        with RawConn(bank.cfg.socket_path) as conn:
            conn.send(framing.encode(req))
            data, fds, _, _ = socket.recv_fds(conn.sock, 1 << 16, 3)
            assert fds == []
            reply = framing.Decoder().feed(data)[0]
            assert reply_error(reply) is errors.AccessDeniedError
            assert conn.hello()[0] == m.OK

    def test_wakeups_exist_on_a_primary_only(self, bank):
        """An agent of an appliance that is no primary asking for wake-ups gets a ProtocolError naming the role, and no descriptor."""
        with RawConn(bank.cfg.socket_path) as conn:
            attached = conn.request([m.OP_AGENT, bank.cfg.role, os.getpid()])
            assert attached[0] == m.OK, attached
            conn.send(framing.encode([m.OP_WAKEUPS]))
            data, fds, _, _ = socket.recv_fds(conn.sock, 1 << 16, 3)
            assert fds == []
            reply = framing.Decoder().feed(data)[0]
            assert reply_error(reply) is errors.ProtocolError and "primary" in reply[2], reply
            assert conn.hello()[0] == m.OK

    @pytest.mark.parametrize("op", [99, 1 << 40])
    def test_unknown_high_op_is_a_protocol_error(self, bank, op):
        """A request with an op number no one defines is a ProtocolError, whatever its number."""
        with RawConn(bank.cfg.socket_path) as conn:
            assert reply_error(conn.request([op])) is errors.ProtocolError
            assert conn.hello()[0] == m.OK

    @pytest.mark.parametrize("steps", [
        [[[1], "accounts", 1]],
        [[m.OP_PUT, "accounts", 1, rec(1)], [[1], "accounts", 2]],
    ], ids=["one_step", "second_step"])
    def test_unhashable_step_op_is_a_protocol_error(self, bank, db, steps):
        """An OP_ATOMIC step whose op is a list is a ProtocolError; nothing stays open or locked, the controller serves on."""
        preload(db, [1])
        with RawConn(bank.cfg.socket_path) as conn:
            try:
                reply = conn.request([m.OP_ATOMIC, None, None, steps])
            except EOFError:
                reply = None
            assert reply is not None, f"the controller hung up (exit status {exit_status(bank)})"
            assert reply_error(reply) is errors.ProtocolError, reply
            assert conn.request([m.OP_ATOMIC, None, None, [[m.OP_PUT, "accounts", 2, rec(2)]]])[0] == m.OK
        with db.transaction() as tx:  # record 1 is not locked
            tx.update("accounts", 1, {"balance": 0})

    def test_oversized_transaction_input_does_not_crash_controller(self, bank, db):
        """A transaction whose input exceeds the change log is refused with an error; the controller keeps serving."""
        before = preload(db, [1])
        big = b"x" * (bank.cfg.storage.log_size + 1)
        with RawConn(bank.cfg.socket_path) as conn:
            try:
                reply = conn.request([m.OP_ATOMIC, "big", big, [[m.OP_UPDATE, "accounts", 1, {"balance": 0}]]])
            except EOFError:
                reply = None
        assert reply is not None, f"the controller hung up (exit status {exit_status(bank)})"
        assert reply_error(reply) is not None
        with pytest.raises(errors.ApplianceError) as ei:  # the same through the client library
            with db.transaction(program="big", input=big) as tx:
                tx.update("accounts", 1, {"balance": 0})
        assert not isinstance(ei.value, errors.UnavailableError), ei.value
        assert bank.controller.proc.poll() is None
        assert records(db.table("accounts")) == before
        db.table("accounts")[2] = rec(2)

    def test_fuzzed_requests_never_crash_controller(self, bank, db):
        """Random well-framed msgpack requests never crash the controller; afterwards clients work and data is intact."""
        keep = [7_777_777_001 + 13 * i for i in range(30)]
        before = preload(db, keep)
        acc = db.table("accounts")
        wrote = []

        scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                            st.floats(), st.text(max_size=6), st.binary(max_size=6),
                            st.sampled_from(["accounts", "id", "branch", "balance"]))
        values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.sampled_from(["id", "branch", "balance", "x"]) | st.integers(-3, 3), inner, max_size=4),
            max_leaves=10)
        ops = st.sampled_from(sorted(m.NAMES)) | st.integers(-3, 40)
        calls = st.builds(lambda op, args: [op, *args], ops, st.lists(values, max_size=4))
        atomics = st.builds(lambda p, i, steps: [m.OP_ATOMIC, p, i, steps], values, values,
                            st.lists(calls | values, max_size=3))
        requests = st.lists(st.one_of(values, calls, atomics), min_size=1, max_size=4)

        @settings(max_examples=120, deadline=None, database=None)
        @given(reqs=requests)
        def fuzz(reqs):
            with RawConn(bank.cfg.socket_path) as conn:
                conn.send(framing.encode_many(reqs))
                for r in reqs:
                    try:
                        reply = conn.reader.read()
                    except (EOFError, OSError) as exc:
                        raise AssertionError(f"controller closed the connection on {reqs!r}: {exc!r} "
                                             f"(exit {bank.controller.proc.poll()})") from None
                    if reply_error(reply) is None and isinstance(r, list) and r and r[0] in (
                            m.OP_ATOMIC, m.OP_LOAD, m.OP_COMMIT):
                        wrote.append(r)

        fuzz()
        assert bank.controller.proc.poll() is None
        after = records(acc)
        assert {k: after.get(k) for k in keep} == before
        if not wrote:
            assert after == before
        check_indexes(acc)
        acc[1] = rec(1)
        assert bank.connect().table("accounts")[1] == rec(1)


class TestAccess:
    @pytest.fixture
    def tmp_path(self):
        """Overrides tmp_path (so make_appliance and bank use it): a directory other users may
        traverse (pytest's is 0700), so a process running as `nobody` can reach the socket."""
        d = Path(tempfile.mkdtemp(prefix="apl-faults-"))
        os.chmod(d, 0o755)
        yield d
        shutil.rmtree(d, ignore_errors=True)

    def test_user_not_in_access_list_is_refused(self, make_appliance):
        """A user not in [access] gets an APL_EACCESS reply (AccessDeniedError naming the user); client_refused is logged."""
        app = make_appliance().start()
        kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, raw_hello, str(app.cfg.socket_path))
        assert kind == "ok", value
        with pytest.raises(errors.AccessDeniedError, match="nobody"):
            result(value, "connect")
        assert value[3] == {"uid": NOBODY.pw_uid}
        wait_event(app, "client_refused", user="nobody", uid=NOBODY.pw_uid)
        app.connect().table("accounts")[1] = rec(1)

    def test_refused_session_connect_raises_access_denied(self, make_appliance):
        """Session.connect of a user not in [access] raises AccessDeniedError, however late its HELLO leaves."""
        app = make_appliance().start()
        kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, late_session_connect, str(app.cfg.socket_path), app.name)
        assert kind == "raised" and isinstance(value, errors.AccessDeniedError), (kind, value)

    def test_user_in_access_list_is_accepted(self, make_appliance):
        """A user listed in [access] users passes the controller's check (Session.connect succeeds)."""
        app = make_appliance(extra=ACCESS_NOBODY).start()
        kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, session_connect, str(app.cfg.socket_path), app.name)
        assert kind == "ok", value
        assert value["name"] == app.name
        assert events(app, "client_refused") == []

    def test_segment_modes(self, make_appliance):
        """meta and device segments are 0640, readers 0660, all owned by the configured group; others get nothing."""
        app = make_appliance(storage='group = "nogroup"').start()
        names = SegmentNames(app.name, app.cfg.storage.segments)
        nogroup = app.cfg.gid()
        for n in names.all():
            st_ = os.stat("/dev/shm" + n)
            want = 0o660 if n == names.readers else 0o640
            assert (stat.S_IMODE(st_.st_mode), st_.st_gid) == (want, nogroup), n

    def test_default_segment_modes_give_others_nothing(self, bank):
        """Without a configured group: meta and devices 0640, readers 0660 (group write), nothing for others."""
        names = SegmentNames(bank.name, bank.cfg.storage.segments)
        for n in names.all():
            mode = stat.S_IMODE(os.stat("/dev/shm" + n).st_mode)
            assert mode & 0o007 == 0, n
            assert mode == (0o660 if n == names.readers else 0o640), n

    def test_other_user_cannot_open_segments(self, make_appliance):
        """A user outside the segments' group cannot open them (AccessDeniedError), even when [access] lets it connect."""
        app = make_appliance(extra=ACCESS_NOBODY).start()
        app.connect().table("accounts")[1] = rec(1)
        names = SegmentNames(app.name, app.cfg.storage.segments).all()
        kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, open_segments, names)
        assert kind == "ok" and value == {n: "AccessDeniedError" for n in names}, value
        kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, attach_and_read, app.cfg, 1)
        assert kind == "raised" and isinstance(value, errors.AccessDeniedError), (kind, value)
        assert "permission denied" in str(value)

    def test_group_member_can_attach_and_read(self, make_appliance):
        """A member of the configured storage group who is in [access] attaches and reads."""
        app = make_appliance(storage='group = "nogroup"', extra=ACCESS_NOBODY).start()
        app.connect().table("accounts")[1] = rec(1)
        kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, attach_and_read, app.cfg, 1)
        assert (kind, value) == ("ok", rec(1))

    def test_owner_group_member_can_attach_without_configured_group(self, make_appliance):
        """A member of the owner's group (the default segment group) who is in [access] attaches and reads."""
        app = make_appliance(extra=ACCESS_NOBODY).start()
        app.connect().table("accounts")[1] = rec(1)
        kind, value = run_as(NOBODY.pw_uid, os.getgid(), attach_and_read, app.cfg, 1)
        assert (kind, value) == ("ok", rec(1))

    @pytest.mark.parametrize("segment", ["meta", "dev0"])
    def test_client_mapping_is_read_only(self, bank, db, segment):
        """A client writing into its mapping of a data segment dies with SIGSEGV; the data is unchanged."""
        before = preload(db)
        version = db.committed_version()
        p = bank.spawn(SEGMENT_WRITER, segment, stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGSEGV, (p.returncode, out)
        assert out.split() == ["mapped"]
        assert records(db.table("accounts")) == before and db.committed_version() == version
        fresh = bank.connect()
        assert records(fresh.table("accounts")) == before

    def test_second_controller_is_refused(self, bank, db, tmp_path):
        """A second controller for the same config exits 69 saying the appliance is already served; the first keeps serving."""
        preload(db, [1])
        log = tmp_path / "second.log"
        p = start_controller(bank.config, log)
        try:
            assert p.wait(timeout=30) == 69
        finally:
            kill_child(p)
        assert "already served" in log.read_text()
        assert bank.controller.proc.poll() is None
        db.table("accounts")[2] = rec(2)
        assert bank.connect().table("accounts")[2] == rec(2)

    def test_second_controller_with_other_socket_is_refused(self, bank, db, make_appliance):
        """A second controller for the same appliance (same name, other socket path) is refused too."""
        preload(db, [1])
        other = make_appliance(name=bank.name)
        other.controller.start(wait=False)
        outcome = wait_for(lambda: ("exited", other.controller.proc.poll()) if other.controller.proc.poll()
                           is not None else ("serving", None) if serving(other.cfg) else None,
                           30, what="the second controller to exit or serve")
        assert outcome == ("exited", 69)

    @pytest.mark.parametrize("change", [
        {"tables": "[tables.accounts]\nprimary_key = \"id\"\nfields = { id = \"int\", balance = \"int\" }\n"},
        {"segments": 3},
    ], ids=["tables", "segments"])
    def test_layout_mismatch_is_refused(self, bank, db, make_appliance, change):
        """A controller whose config's layout differs from the existing segments exits 78 suggesting `appliance destroy`; the data is untouched."""
        before = preload(db)
        version = db.committed_version()
        assert bank.controller.stop() == 0
        other = make_appliance(name=bank.name, **change)
        other.controller.start(wait=False)
        assert other.controller.proc.wait(timeout=30) == 78
        log = other.controller.log()
        assert "different layout" in log and "appliance destroy" in log
        bank.controller.start()
        c = bank.connect()
        assert records(c.table("accounts")) == before and c.committed_version() == version
        check_indexes(c.table("accounts"))

    @pytest.mark.parametrize("change, says", [
        ({"tables": BANK_TABLES.replace('balance = "int"', 'balance = "str"')},
         ["tables.accounts.fields.balance: int in shared memory, str in the config"]),
        ({"tables": BANK_TABLES.replace('alternate_keys = ["branch"]\n', '')},
         ["tables.accounts.alternate_keys: [branch] in shared memory, [] in the config"]),
        ({"tables": BANK_TABLES.replace('balance = "int" }', 'balance = "int", note = "str" }')},
         ["tables.accounts.fields.note: not in shared memory, str in the config"]),
        ({"tables": BANK_TABLES.replace('branch = "str", balance = "int"', 'balance = "int", branch = "str"')},
         ["tables.accounts.field_order: [id, branch, balance] in shared memory, [id, balance, branch] in the config"]),
        ({"segments": 3, "segment_size": "8MiB"},
         ["storage.segments: 2 in shared memory, 3 in the config",
          "storage.segment_size: 16777216 in shared memory, 8388608 in the config"]),
    ], ids=["field-type", "alternate-key", "new-field", "field-order", "storage"])
    def test_layout_mismatch_names_the_setting(self, bank, db, make_appliance, change, says):
        """A refused layout says which setting differs, with the value in shared memory and in the config; a client with that config is told the same."""
        import appliance
        assert bank.controller.stop() == 0
        other = make_appliance(name=bank.name, **change)
        other.controller.start(wait=False)
        assert other.controller.proc.wait(timeout=30) == 78
        refused = [e for e in other.controller.events() if e.get("event") == "controller_refused_to_start"]
        for line in says:
            assert line in refused[0]["error"], refused[0]["error"]
        bank.controller.start()
        cfg = other.cfg.model_copy(update={"controller": other.cfg.controller.model_copy(
            update={"socket": str(bank.cfg.socket_path)})})           # that config, at the running socket
        with pytest.raises(errors.FormatError) as ei:
            appliance.connect(cfg)
        assert says[0] in str(ei.value)
