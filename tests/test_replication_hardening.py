"""Replication hardening: what a buggy peer, an unauthenticated one, a down
secondary or an operator's reload does to a pair of appliances.

Real controllers and agents on loopback. Where a misbehaving peer is needed
the test process plays it on a raw socket, authenticated with the cluster's
shared secret when the case needs an authenticated peer (FakePrimary,
FakeSecondary): the other side is the real product.
"""
from __future__ import annotations

import signal
import socket
import struct

import pytest

import appliance
import fault_helpers as fh
from appliance import errors
from appliance._native import lib
from appliance.replication import link
from appliance.store import changelog
from appliance.store.reader import Reader
from appliance.store.segment import Attachment
from appliance.wire import framing
from appliance.wire import replication as rp
from test_backup_store import corrupt_last_count_change
from test_replication_faults import (agent_events, assert_identical, controller_events,
                                     in_thread, log_serial, sec_status, wait_for)


def acked_serial(c, name: str) -> int:
    return c.status()["replication"]["secondaries"][name]["acked_serial"]

pytestmark = pytest.mark.slow


# -- peers played by the test ---------------------------------------------------------------------


def recv_message(sock: socket.socket, skip=(rp.HEARTBEAT,)) -> tuple:
    """The next replication message on a blocking socket, heartbeats skipped."""
    while True:
        msg = rp.parse(framing.recv_frame(sock))
        if msg[0] not in skip:
            return msg


class FakePrimary:
    """The test process as the cluster's primary (its name, instance, epoch,
    files and the shared secret), connected to one secondary."""

    def __init__(self, c, index: int = 0) -> None:
        pcfg = c.primary.app.cfg
        sec = c.secondaries[index]
        st = c.status()
        self.instance, self.epoch = st["instance"], st["epoch"]
        att = Attachment(pcfg.name, writable=False)
        try:
            files = link.files_of(att)
        finally:
            att.close()
        secret = pcfg.secret()
        self.sock = socket.create_connection(("127.0.0.1", c.ports[index]), timeout=10)
        n_p = rp.nonce()
        self.send(rp.HELLO, st["log"]["serial"], {
            "version": rp.PROTOCOL_VERSION, "name": pcfg.name, "instance": self.instance,
            "fingerprint": pcfg.replication_fingerprint(), "files": files, "nonce": n_p, "mode": "async"})
        kind, _, _, _, ch = recv_message(self.sock)
        assert kind == rp.CHALLENGE, (kind, ch)
        self.send(rp.AUTH, 0, {"mac": rp.mac(secret, "primary", ch["nonce"], n_p, pcfg.name, sec.name)})
        kind, _, _, _, self.start = recv_message(self.sock)
        assert kind == rp.START, (kind, self.start)

    def send(self, kind: int, serial: int, body) -> None:
        framing.send_frames(self.sock, [rp.message(kind, self.epoch, serial, body)])

    def close(self) -> None:
        self.sock.close()


def log_after(c, serial: int) -> bytes:
    """The primary's change-log entries after `serial`, as its log stores them."""
    att = Attachment(c.primary.name, writable=False)
    try:
        reader = Reader(att)
        b = changelog.bounds(reader)
        return b"".join(e.raw for e in changelog.read_entries(reader, b["tail"])
                        if e.serial > serial and e.kind != lib.APL_CE_PAD)
    finally:
        att.close()


# -- A4: a synchronous commit whose backup does not come ------------------------------------------


@pytest.fixture
def blocked(make_cluster):
    """A primary with one synchronous secondary ("block": the default policy) whose agent is
    stopped (SIGSTOP) for the test, resumed afterwards: (cluster, secondary)."""
    c = make_cluster(secondaries=(("sync", ""),)).start()
    with c.primary.app.connect() as db:
        db.table("accounts")[2] = {"branch": "a", "balance": 1}
    sec = c.secondaries[0]
    sec.agent.signal(signal.SIGSTOP)
    try:
        yield c, sec
    finally:
        sec.agent.signal(signal.SIGCONT)


def waiting(c) -> list[dict]:
    return c.status()["replication"]["waiting"]


class TestCommitTimeout:
    def test_backup_timeout_is_not_a_retryable_error(self):
        """BackupTimeoutError is neither UnavailableError nor TransactionCancelledError: retrying
        a transaction that committed would do it twice."""
        assert not issubclass(errors.BackupTimeoutError, (errors.UnavailableError, errors.TransactionCancelledError,
                                                          ConnectionError, TimeoutError))
        assert errors.class_for("APL_EBACKUP") is errors.BackupTimeoutError

    def test_the_socket_timeout_never_reports_a_local_commit_as_unreachable(self, blocked):
        """With the sync secondary down, an autocommit on a client with timeout=2 ends after 2 s with
        BackupTimeoutError carrying txn and serial (not UnavailableError "not reachable"); the record
        is committed and visible, stays locked until the backup is confirmed, and status lists the
        waiting commit; once the secondary resumes the lock goes."""
        c, sec = blocked
        db = c.primary.app.connect(timeout=2.0)
        acc = db.table("accounts")
        try:
            acc[2] = {"branch": "b", "balance": 2}
        except errors.ApplianceError as exc:
            e = exc
        else:
            pytest.fail("the commit returned although its synchronous secondary is stopped")
        assert type(e).__name__ == "BackupTimeoutError", f"{type(e).__name__}: {e}"
        assert "committed" in str(e) and "locked" in str(e) and e.details["serial"] > 0, str(e)
        assert e.details["after_s"] == 2.0 and e.details["waiting_for"] == sec.name, e.details   # the client's timeout
        assert acc[2] == {"id": 2, "branch": "b", "balance": 2}
        [w] = waiting(c)
        assert (w["txn"], w["serial"], w["answered"]) == (e.details["txn"], e.details["serial"], True)
        with pytest.raises(errors.LockTimeoutError):       # the records stay locked ([0104])
            with db.transaction(durability="local") as tx:
                tx.update("accounts", 2, {"balance": 3})
        sec.agent.signal(signal.SIGCONT)
        wait_for(lambda: not waiting(c), 30, "the backup to be confirmed")
        with db.transaction(durability="local") as tx:
            tx.update("accounts", 2, {"balance": 4})
        assert_identical(c, min_records=1)

    @pytest.mark.parametrize("pipeline", [False, True], ids=["waiting", "pipelined"])
    def test_commit_timeout_of_a_transaction(self, blocked, pipeline):
        """db.transaction(commit_timeout=S): leaving the block raises BackupTimeoutError after S;
        the transaction is committed (its result says the backup is pending), not cancelled —
        also when pipelined, its update held and sent with the commit as one request."""
        c, sec = blocked
        db = c.primary.app.connect()
        with pytest.raises(errors.BackupTimeoutError) as err:
            with db.transaction(program="p", commit_timeout=0.5, pipeline=pipeline) as tx:
                tx.update("accounts", 2, {"balance": 7})
        assert err.value.details["after_s"] == 0.5      # the transaction's bound, not the connection's 30 s
        [w] = waiting(c)                                # answered once its 0.5 s had passed, still waiting
        assert (w["txn"], w["answered"]) == (tx.result["txn"], True) and w["waiting_s"] >= 0.5, w
        assert tx.state == "committed" and tx.result["backup"] == "pending"
        assert (tx.result["txn"], tx.result["serial"]) == (err.value.details["txn"], err.value.details["serial"])
        assert db.table("accounts")[2]["balance"] == 7

    def test_commit_timeout_of_a_connection_covers_autocommits_and_loads(self, blocked):
        """appliance.connect(commit_timeout=S) bounds every write of that client; both writes wait
        for their backup (status), each answered once."""
        c, sec = blocked
        db = c.primary.app.connect(commit_timeout=0.3)
        with pytest.raises(errors.BackupTimeoutError) as put:
            db.table("accounts")[3] = {"branch": "c", "balance": 3}
        with pytest.raises(errors.BackupTimeoutError) as load:
            db.load("accounts", [{"id": 10 + i, "branch": "l", "balance": i} for i in range(5)])
        assert put.value.details["after_s"] == load.value.details["after_s"] == 0.3
        assert [(w["serial"], w["answered"]) for w in waiting(c)] == \
            [(put.value.details["serial"], True), (load.value.details["serial"], True)]
        assert len(db.table("accounts")) == 7

    @pytest.mark.parametrize("bad", [0, -1, "5", True, float("nan")])
    def test_a_bad_commit_timeout_is_refused(self, bank, db, bad):
        """commit_timeout must be a positive number of seconds (or None): anything else is a
        WrongTypeError at connect() or transaction(), before anything is sent."""
        with pytest.raises(errors.WrongTypeError, match="commit_timeout"):
            appliance.connect(bank.config, commit_timeout=bad)
        with pytest.raises(errors.WrongTypeError, match="commit_timeout"):
            db.transaction(commit_timeout=bad)


# -- R5: an apply error ---------------------------------------------------------------------------


class TestAcksStoredNotSignalled:
    def test_an_ack_stored_but_not_signalled_releases_its_commit_at_the_next_look(self, make_cluster):
        """The agent stores a secondary's acknowledgement in the primary's wake-up
        memory and has not signalled it yet (or never will: its link drops). What
        was stored counts: the next status (which reads the acknowledgements)
        shows the commit released, never one waiting for no one, and once the
        agent's session has dropped its record is no longer locked. Only the
        primary's controller runs; the agent's side is the agent's own ControlLink."""
        import asyncio
        c = make_cluster(secondaries=(("sync", ""),))
        c.primary.app.start()
        sec = c.secondaries[0].name
        db = c.primary.app.connect(commit_timeout=0.3)

        async def agent_then_gone() -> None:
            cl = link.ControlLink(str(c.primary.app.cfg.socket_path), "test-agent")
            await cl.connect("primary", wakeups=True)
            with pytest.raises(errors.BackupTimeoutError) as e:
                await asyncio.to_thread(db.table("accounts").__setitem__, 2, {"branch": "a", "balance": 1})
            [w] = waiting(c)
            assert w["serial"] == e.value.details["serial"] and w["waiting_for"] == [sec], w
            wk = cl.wakeups
            lib.apl_acks_post(wk.acks, wk.index[sec], w["serial"])   # stored, never signalled
            assert waiting(c) == []
            cl.close()
        asyncio.run(agent_then_gone())
        with db.transaction(durability="local") as tx:      # its record is no longer locked
            tx.update("accounts", 2, {"balance": 2})
        assert db.table("accounts")[2]["balance"] == 2
        db.close()


class TestApplyRefused:
    def test_bad_batch_is_rolled_back_and_the_secondary_is_copied(self, make_cluster):
        """An authenticated primary sends a transaction whose last change names no file: the
        secondary's controller rolls the batch back (the update before it never shows), keeps
        serving reads, shows it needs a copy, and its agent tells the primary and asks for a
        block copy; the real primary's agent then copies it back to identical."""
        c = make_cluster(secondaries=(("async", ""),)).start()
        sec = c.secondaries[0]
        db = c.primary.app.connect()
        acc = db.table("accounts")
        for k in range(1, 30):
            acc[k] = {"branch": "b%d" % (k % 3), "balance": k}
        c.wait_caught_up()
        sdb = sec.app.connect()
        c.primary.agent.signal(signal.SIGTERM)
        c.primary.agent.proc.wait(20)
        applied = sdb.applied_serial()
        with db.transaction(program="bad") as tx:
            tx.update("accounts", 1, {"balance": -1})
            tx.insert("accounts", {"id": 900, "branch": "new", "balance": 9})
        bad = corrupt_last_count_change(log_after(c, applied))
        fake = FakePrimary(c)
        try:
            assert fake.start["applied"] == applied and not fake.start["copy"]
            fake.send(rp.ENTRIES, applied + 1, [applied + 1, log_serial(c), bad])
            try:
                reply = recv_message(fake.sock)
            except (EOFError, OSError, errors.ProtocolError) as exc:
                reply = exc
        finally:
            fake.close()
        try:
            st = sdb.status()["replication"]
        except errors.UnavailableError as exc:
            pytest.fail(f"the secondary's controller is gone after one bad message: {exc}")
        assert reply[0] == rp.ERROR and reply[4]["code"] == "APL_ECORRUPT" and "copy" in reply[4]["message"], reply
        sacc = sdb.table("accounts")
        assert sacc[1] == {"id": 1, "branch": "b1", "balance": 1} and 900 not in sacc   # nothing published
        assert sdb.applied_serial() == applied
        assert st["needs_copy"] and "APL_ECORRUPT" in st["needs_copy"], st
        ev = wait_for(lambda: controller_events(sec, "apply_refused"), 10, "apply_refused")[0]
        assert ev["rolled_back"] > 0 and ev["applied"] == applied
        sec.agent.wait_event("copy_requested")
        c.primary.agent.start()
        c.primary.agent.wait_event("copy_finished", secondary=sec.name)
        assert_identical(c, min_records=30)
        assert sdb.status()["replication"]["needs_copy"] is None
        assert sacc[1]["balance"] == -1 and sacc[900]["branch"] == "new"


class FakeSecondary:
    """The test process as the cluster's secondary `index` (its name and the
    shared secret), listening where the primary's agent connects."""

    def __init__(self, c, index: int = 0) -> None:
        self.c = c
        self.name = c.secondaries[index].name
        self.secret = c.primary.app.cfg.secret()
        self.server = socket.create_server(("127.0.0.1", c.ports[index]))
        self.server.settimeout(20)
        self.sock: socket.socket | None = None

    def accept(self) -> dict:
        """Take the primary's connection; returns its HELLO body."""
        self.sock, _ = self.server.accept()
        self.sock.settimeout(20)
        kind, self.epoch, _, _, hello = recv_message(self.sock)
        assert kind == rp.HELLO, (kind, hello)
        self.hello = hello
        return hello

    def authenticate(self, applied: int, source: int) -> None:
        n_s = rp.nonce()
        pname = self.c.primary.name
        self.send(rp.CHALLENGE, 0, {"name": self.name, "nonce": n_s,
                                    "mac": rp.mac(self.secret, "secondary", self.hello["nonce"], n_s, pname, self.name)})
        kind, _, _, _, auth = recv_message(self.sock)
        assert kind == rp.AUTH and rp.mac_ok(rp.mac(self.secret, "primary", n_s, self.hello["nonce"], pname,
                                                    self.name), auth["mac"]), (kind, auth)
        self.send(rp.START, applied, {"applied": applied, "source": source, "copy": False})

    def send(self, kind: int, serial: int, body) -> None:
        framing.send_frames(self.sock, [rp.message(kind, self.epoch, serial, body)])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.server.close()


@pytest.fixture
def fake_secondary(make_cluster):
    """A primary (controller and agent) with one synchronous secondary that the test plays."""
    c = make_cluster(secondaries=(("sync", ""),))
    fake = FakeSecondary(c)
    try:
        c.primary.app.start()
        c.primary.agent.start()
        yield c, fake
    finally:
        fake.close()


# -- R6: acknowledgements beyond what was sent ----------------------------------------------------


class TestAckBeyondSent:
    def test_an_ack_past_the_stream_releases_no_commit(self, fake_secondary):
        """A secondary that acknowledges a serial its link never carried is credited no further
        than what was sent (logged); a synchronous commit after it waits for a real ACK."""
        c, fake = fake_secondary
        st = c.status()
        serial = st["log"]["serial"]
        fake.accept()
        fake.authenticate(applied=serial, source=st["instance"])
        c.wait_state(fake.name, "streaming", connected=True)
        fake.send(rp.ACK, serial + 10 ** 6, {"applied": serial + 10 ** 6})
        wait_for(lambda: acked_serial(c, fake.name) > serial
                 or agent_events(c.primary, "secondary_ack_beyond_sent"), 10, "the ACK to be read")
        assert acked_serial(c, fake.name) == serial, "an ACK beyond the stream was counted"
        ev = agent_events(c.primary, "secondary_ack_beyond_sent")[0]
        assert ev["applied"] == serial + 10 ** 6 and ev["sent"] == serial
        db = c.primary.app.connect()
        t, out = in_thread(db.table("accounts").__setitem__, 1, {"branch": "a", "balance": 1})
        kind, _, _, _, body = recv_message(fake.sock)
        assert kind == rp.ENTRIES
        last = body[1]
        wait_for(lambda: c.status()["replication"]["waiting_commits"] == 1, 10, "the commit to wait")
        assert "result" not in out and acked_serial(c, fake.name) == serial
        fake.send(rp.ACK, last, {"applied": last})
        t.join(30)
        assert not t.is_alive() and "error" not in out, out
        assert acked_serial(c, fake.name) == last

    def test_a_start_claiming_more_than_the_primary_wrote_is_copied(self, fake_secondary):
        """A secondary whose START claims a serial past the primary's last one is not credited
        with it: the primary copies it instead (COPY_BEGIN at the primary's own serial)."""
        c, fake = fake_secondary
        st = c.status()
        serial = st["log"]["serial"]
        fake.accept()
        fake.authenticate(applied=serial + 500, source=st["instance"])
        kind, _, _, _, body = recv_message(fake.sock)
        assert kind == rp.COPY_BEGIN and body["serial"] == serial, (kind, body)
        assert acked_serial(c, fake.name) == 0


# -- A5: what an unauthenticated peer can make an agent hold --------------------------------------


class TestHandshakeFrameLimit:
    def test_secondary_drops_a_large_frame_before_authentication(self, make_cluster):
        """A peer that has not authenticated announces a 200 MiB frame on the secondary's listen
        port: the agent drops the connection at the length prefix (it never buffers toward it),
        says why, and keeps replicating."""
        c = make_cluster(secondaries=(("async", ""),)).start()
        sec = c.secondaries[0]
        with socket.create_connection(("127.0.0.1", c.ports[0]), timeout=5) as s:
            s.sendall(struct.pack("<IB", 200 << 20, framing.VERSION) + b"\0" * 4096)
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                closed = False
        assert closed, "the secondary's agent kept reading a 200 MiB frame from an unauthenticated peer"
        ev = sec.agent.wait_event("primary_refused")
        assert "exceeds the limit of 65536" in ev["error"], ev
        c.primary.app.connect().table("accounts")[1] = {"branch": "a", "balance": 1}
        assert_identical(c)

    def test_primary_drops_a_large_frame_from_an_unauthenticated_secondary(self, fake_secondary):
        """Whatever listens at a secondary's address must authenticate before the primary's relay
        takes a frame over 64 KiB from it."""
        c, fake = fake_secondary
        fake.accept()
        fake.sock.sendall(struct.pack("<IB", 100 << 20, framing.VERSION) + b"\0" * 4096)
        ev = wait_for(lambda: agent_events(c.primary, "secondary_link_failed"), 20, "secondary_link_failed")[0]
        assert "exceeds the limit of 65536" in ev["error"], ev


# -- N1: what the agents log ----------------------------------------------------------------------


def non_json_lines(proc) -> list[str]:
    """Lines of a process's output that are not structured events (tracebacks and the like)."""
    import json
    out = []
    for line in proc.log().splitlines():
        try:
            json.loads(line)
        except ValueError:
            out.append(line)
    return out


class TestAgentLogs:
    def test_sigterm_stops_both_agents_with_events_only(self, make_cluster):
        """SIGTERM to a streaming primary agent and to its secondaries' agents: each exits 0 and
        writes nothing but structured events (no asyncio traceback)."""
        c = make_cluster(secondaries=(("sync", ""), ("async", ""))).start()
        c.primary.app.connect().table("accounts")[1] = {"branch": "a", "balance": 1}
        c.wait_caught_up()
        for node in c.nodes:
            node.agent.signal(signal.SIGTERM)
        for node in c.nodes:
            assert node.agent.proc.wait(20) == 0, node.agent.log()[-2000:]
            assert node.agent.wait_event("agent_stopping")
            assert non_json_lines(node.agent) == [], f"{node.name}'s agent wrote:\n" + "\n".join(
                non_json_lines(node.agent)[:40])

    def test_waiting_for_the_controller_names_its_socket(self, make_cluster):
        """An agent started before its controller logs once that it waits, naming the socket, then
        attaches when the controller comes up."""
        c = make_cluster(secondaries=(("async", ""),))
        sec = c.secondaries[0]
        sec.agent.start(wait=False)
        ev = sec.agent.wait_event("controller_unavailable_waiting")
        path = str(sec.app.cfg.socket_path)
        assert ev["socket"] == path and path in ev["error"], ev
        sec.app.start()
        sec.agent.wait_event("agent_started")
        assert len(agent_events(sec, "controller_unavailable_waiting")) == 1

    def test_a_down_secondary_is_logged_once(self, make_cluster):
        """While a secondary stays down the relay retries (status counts the attempts) but logs
        the failure and the state change once, not at every attempt."""
        c = make_cluster(secondaries=(("async", ""),)).start()
        sec = c.secondaries[0]
        sec.agent.kill()
        wait_for(lambda: c.status()["replication"]["secondaries"][sec.name]["attempts"] >= 5, 30, "five attempts")
        failed = agent_events(c.primary, "secondary_link_failed", secondary=sec.name)
        changes = agent_events(c.primary, "relay_state_changed", secondary=sec.name)
        after = [e for e in changes if e["timestamp"] >= failed[0]["timestamp"]]
        assert len(failed) <= 2, failed            # the link's end, then the refused connects
        assert [(e["from"], e["to"]) for e in after] == [("streaming", "disconnected")], after


# -- R7: systemctl reload (SIGHUP) ---------------------------------------------------------------


def edit_file(path, *changes: tuple[str, str]) -> None:
    text = path.read_text()
    for old, new in changes:
        assert old in text, f"{old!r} not in {path}"
        text = text.replace(old, new)
    path.write_text(text)


def assert_lock_wait_gives_up(db1, db2, seconds: str) -> None:
    """db2's update of a record db1 holds for update gives up after `seconds` (lock_timeout)."""
    db1.table("accounts")[1] = {"branch": "a", "balance": 1}
    with db1.transaction() as tx1:
        tx1.get("accounts", 1, for_update=True)
        with pytest.raises(errors.LockTimeoutError, match=f"waited {seconds} s"):
            with db2.transaction() as tx2:
                tx2.update("accounts", 1, {"balance": 2})


class TestReload:
    def test_controller_reloads_lock_timeout_and_names_what_needs_a_restart(self, make_appliance):
        """SIGHUP to a controller: a changed lock_timeout is applied to the next lock wait, a changed
        storage size is logged as needing a restart, and the controller serves on."""
        app = make_appliance().start()
        db1, db2 = app.connect(), app.connect()
        edit_file(app.config, ("lock_timeout = 2.0", "lock_timeout = 0.3"), ("max_readers = 128", "max_readers = 256"))
        app.controller.signal(signal.SIGHUP)
        ev = fh.wait_event(app, "config_reloaded")[0]
        assert ev["applied"] == ["controller.lock_timeout"]
        assert fh.events(app, "config_reload_needs_restart")[0]["keys"] == ["storage.max_readers"]
        assert_lock_wait_gives_up(db1, db2, "0.3")
        assert db1.status()["pid"] == app.controller.pid

    def test_a_bad_config_on_reload_changes_nothing(self, make_appliance):
        """SIGHUP with a config that no longer loads: config_reload_failed names the file and the
        key; the controller serves on with what it had."""
        app = make_appliance().start()
        db = app.connect()
        edit_file(app.config, ("lock_timeout = 2.0", 'lock_timeout = "soon"'))
        app.controller.signal(signal.SIGHUP)
        ev = fh.wait_event(app, "config_reload_failed")[0]
        assert ev["key"] == "controller.lock_timeout" and ev["file"] == str(app.config.resolve()), ev
        assert not fh.events(app, "config_reloaded")
        db.table("accounts")[1] = {"branch": "a", "balance": 1}
        assert db.table("accounts")[1]["balance"] == 1

    def test_appliance_reload_answers_once_the_new_settings_are_in_force(self, make_appliance):
        """`appliance reload` (systemd's ExecReload): the command returns only after the controller has
        taken the file, so the very next lock wait uses the new lock_timeout; --json names what was
        applied and what needs a restart."""
        from procs import cli_json
        app = make_appliance().start()
        db1, db2 = app.connect(), app.connect()
        edit_file(app.config, ("lock_timeout = 2.0", "lock_timeout = 0.3"), ("max_readers = 128", "max_readers = 256"))
        rc, rep = cli_json("reload", "--config", str(app.config))
        assert rc == 0, rep
        assert rep == {"file": str(app.config.resolve()), "applied": ["controller.lock_timeout"],
                       "needs_restart": ["storage.max_readers"]}
        assert_lock_wait_gives_up(db1, db2, "0.3")

    def test_appliance_reload_of_a_bad_file_exits_78_and_changes_nothing(self, make_appliance):
        """A bad file: the command refuses it (exit 78, the key on stderr); asked from Python with the
        config read before the edit, the controller refuses it (ConfigError naming the key, config_reload_failed)
        and keeps its lock_timeout (the one a good edit would have changed is still 2 s)."""
        from appliance.cli.reload import reload
        from procs import cli
        app = make_appliance().start()
        db1, db2 = app.connect(), app.connect()
        edit_file(app.config, ("lock_timeout = 2.0", 'lock_timeout = "soon"'))
        r = cli("reload", "--config", str(app.config))
        assert r.returncode == 78 and "controller.lock_timeout" in r.stderr, r
        with pytest.raises(errors.ConfigError, match="nothing changed") as exc:
            reload(app.cfg)
        assert exc.value.details["key"] == "controller.lock_timeout"
        assert fh.events(app, "config_reload_failed") and not fh.events(app, "config_reloaded")
        assert_lock_wait_gives_up(db1, db2, "2")
        assert db1.status()["pid"] == app.controller.pid

    def test_agents_and_controllers_of_a_pair_reload(self, make_cluster):
        """SIGHUP to all four processes of a synchronous pair (systemctl reload appliance): the
        agents apply the new heartbeat, nobody exits, synchronous commits go on."""
        c = make_cluster(secondaries=(("sync", ""),)).start()
        for node in c.nodes:
            edit_file(node.app.config, ("heartbeat = 0.2", "heartbeat = 0.3"))
        for node in c.nodes:
            node.agent.signal(signal.SIGHUP)
            node.app.controller.signal(signal.SIGHUP)
        for node in c.nodes:
            assert node.agent.wait_event("config_reloaded")["applied"] == ["replication.heartbeat"]
            assert fh.wait_event(node.app, "config_reloaded")[0]["applied"] == []
            assert not agent_events(node, "config_reload_needs_restart")
        db = c.primary.app.connect(commit_timeout=20)
        db.table("accounts")[1] = {"branch": "a", "balance": 1}
        for node in c.nodes:
            assert node.agent.proc.poll() is None and node.app.controller.proc.poll() is None
        assert_identical(c)

    def test_reloaded_degrade_policy_releases_a_blocked_commit(self, blocked):
        """A commit held by a stopped sync secondary ("block") goes on once the primary's controller
        reloads on_unreachable = "degrade": the secondary is degraded, logged and shown in status."""
        c, sec = blocked
        db = c.primary.app.connect(commit_timeout=60)
        t, out = in_thread(db.table("accounts").__setitem__, 5, {"branch": "x", "balance": 5})
        wait_for(lambda: waiting(c), 10, "the commit to wait for its backup")
        edit_file(c.primary.app.config, ('mode = "sync"\n', 'mode = "sync"\non_unreachable = "degrade"\n'
                                                           'degrade_after = 0.5\n'))
        c.primary.app.controller.signal(signal.SIGHUP)
        t.join(30)
        assert not t.is_alive() and "error" not in out, out
        ev = fh.wait_event(c.primary.app, "config_reloaded")[0]
        assert ev["applied"] == [f"replication.secondaries.{sec.name}.degrade_after",
                                 f"replication.secondaries.{sec.name}.on_unreachable"]
        assert controller_events(c.primary, "secondary_degraded")
        assert sec_status(c, sec)["degraded"]


class TestReloadAccess:
    @pytest.fixture
    def tmp_path(self):
        """make_appliance's directory, one that `nobody` may traverse to the socket (pytest's own
        is 0700)."""
        import shutil
        import tempfile
        from pathlib import Path
        path = Path(tempfile.mkdtemp(prefix="apl-reload-"))
        path.chmod(0o755)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def test_controller_reloads_the_access_list(self, make_appliance):
        """A user added to [access] may connect after SIGHUP (new connections are checked against
        the reloaded list)."""
        from test_faults import ACCESS_NOBODY, NOBODY, session_connect
        app = make_appliance().start()
        path = str(app.cfg.socket_path)
        kind, value = fh.run_as(NOBODY.pw_uid, NOBODY.pw_gid, session_connect, path, app.name)
        assert kind == "raised" and isinstance(value, errors.AccessDeniedError), (kind, value)
        app.config.write_text(app.config.read_text() + "\n" + ACCESS_NOBODY + "\n")
        app.controller.signal(signal.SIGHUP)
        assert fh.wait_event(app, "config_reloaded")[0]["applied"] == ["access.users"]
        kind, value = fh.run_as(NOBODY.pw_uid, NOBODY.pw_gid, session_connect, path, app.name)
        assert kind == "ok" and value["name"] == app.name, (kind, value)
