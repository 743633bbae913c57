"""Limits of the controller: what one client, the machine or a second appliance
can do to it, and what an operator sees when a limit is reached.

Real controller processes, real sockets (raw frames where the client library
would hide the case), real shared memory.
"""
from __future__ import annotations

import os
import socket

import pytest

from appliance import errors
from appliance.wire import framing
from appliance.wire import messages as m
from fault_helpers import RawConn, events, rec, records, reply_error, wait_event, wait_for


def preload(db, keys=range(1, 21)) -> dict:
    db.load("accounts", [rec(k) for k in keys])
    return records(db.table("accounts"))


class TestPipelining:
    @pytest.mark.parametrize("count", [520, 20_000])
    def test_many_pipelined_requests_in_one_send_are_all_answered(self, bank, db, count):
        """Hundreds or thousands of requests in one send are answered in order; the controller keeps serving."""
        with RawConn(bank.cfg.socket_path, timeout=60) as conn:
            conn.send(framing.encode_many([[m.OP_STATUS]] * count))
            replies = [conn.reader.read() for _ in range(count)]
        assert all(r[0] == m.OK and r[1]["name"] == bank.name for r in replies)
        assert bank.controller.proc.poll() is None
        db.table("accounts")[1] = rec(1)
        assert db.table("accounts")[1] == rec(1)

    def test_pipelined_transaction_statements_in_one_send(self, bank, db):
        """A transaction's statements pipelined in one send (many, each a reply) commit as one."""
        n = 3000
        reqs = [[m.OP_BEGIN, "pipelined", None]]
        reqs += [[m.OP_PUT, "accounts", k, rec(k)] for k in range(1, n + 1)]
        reqs += [[m.OP_COMMIT]]
        with RawConn(bank.cfg.socket_path, timeout=60) as conn:
            conn.send(framing.encode_many(reqs))
            replies = [conn.reader.read() for _ in reqs]
        assert all(reply_error(r) is None for r in replies), [r for r in replies if r[0] != m.OK][:3]
        assert len(db.table("accounts")) == n

    def test_an_acknowledgement_past_the_log_releases_nothing_early(self, make_appliance, tmp_path):
        """A primary's agent storing, in the acknowledgement memory OP_WAKEUPS handed it, a serial
        past anything this primary logged (and signalling it) is not counted, and logged: a
        synchronous commit made after it stays waiting, its record locked; the controller and
        its other clients go on."""
        import mmap

        from appliance._native import ffi, lib
        secret = tmp_path / "secret"
        secret.write_text("s" * 32)
        secret.chmod(0o600)
        bank = make_appliance(extra=f'[replication]\nrole = "primary"\nsecret_file = "{secret}"\n'
                                    '[[replication.secondaries]]\nname = "nowhere"\naddress = "127.0.0.1:9"\n'
                                    'mode = "sync"\n').start()
        db = bank.connect()
        with RawConn(bank.cfg.socket_path) as conn:
            attached = conn.request([m.OP_AGENT, bank.cfg.role, os.getpid()])
            assert attached[0] == m.OK, attached
            conn.send(framing.encode([m.OP_WAKEUPS]))
            data, fds, _, _ = socket.recv_fds(conn.sock, 1 << 16, 3)
            published, acked, memfd = fds
            reply = framing.Decoder().feed(data)[0]
            assert reply[0] == m.OK and reply[1]["secondaries"] == ["nowhere"], reply
            region = mmap.mmap(memfd, ffi.sizeof("struct apl_acks"))
            acks = ffi.cast("struct apl_acks *", ffi.from_buffer(region))
            assert acks.ak_magic == lib.APL_MAGIC_ACKS and acks.ak_count == 1
            acks.ak_acked[0] = 1 << 62
            os.eventfd_write(acked, 1)
            st = conn.request([m.OP_STATUS])[1]
            assert st["replication"]["secondaries"]["nowhere"]["acked_serial"] == 0
            tx = db.transaction()
            tx.put("accounts", 1, rec(1))
            r = tx.commit(wait=False)                 # answered at once: its backup still to come
            assert r["backup"] == "pending"
            acks.ak_acked[0] = (1 << 62) + 1          # raised again, and signalled
            os.eventfd_write(acked, 1)
            st = conn.request([m.OP_STATUS])[1]
            [w] = st["replication"]["waiting"]
            assert (w["serial"], w["waiting_for"]) == (r["serial"], ["nowhere"]), w
            assert st["replication"]["secondaries"]["nowhere"]["acked_serial"] < r["serial"]
            assert st["transactions"]["locks_held"] == 1
            assert os.eventfd_read(published) >= 1    # the agent was told of the commit
            for fd in fds:
                os.close(fd)
        assert bank.controller.proc.poll() is None
        assert wait_event(bank, "agent_ack_beyond_log", secondary="nowhere")[0]["serial"] >= 1 << 62
        assert not [e for e in bank.controller.events() if e.get("event") in ("session_failed", "fd_handler_failed")]
        assert db.table("accounts")[1] == rec(1)


# ---------------------------------------------------------------------------------------------
# Bulk loads: bounded requests, other clients served meanwhile


class TestLoadLimits:
    def test_load_request_over_the_limit_is_refused(self, make_appliance):
        """An OP_LOAD with more records than controller.max_load_records is refused with LimitError naming the setting; nothing is loaded."""
        app = make_appliance(controller="max_load_records = 100").start()
        with RawConn(app.cfg.socket_path) as conn:
            reply = conn.request([m.OP_LOAD, "accounts", [rec(k) for k in range(1, 102)]])
            assert reply_error(reply) is errors.LimitError, reply
            assert "controller.max_load_records" in reply[2] and "101" in reply[2]
            assert conn.request([m.OP_LOAD, "accounts", [rec(k) for k in range(1, 101)]]) == [m.OK, 100]
        assert len(app.connect().table("accounts")) == 100

    def test_client_load_splits_under_the_limit(self, make_appliance):
        """Client.load sends at most controller.max_load_records records per request (one transaction each), whatever batch it is given."""
        app = make_appliance(controller="max_load_records = 100").start()
        db = app.connect()
        before = db.status()["transactions"]["committed"]
        assert db.load("accounts", (rec(k) for k in range(1, 251)), batch=1_000_000) == 250
        assert db.status()["transactions"]["committed"] - before == 3
        assert records(db.table("accounts")) == {k: rec(k) for k in range(1, 251)}

    def test_other_clients_are_served_while_a_load_runs(self, make_appliance):
        """While one client's big OP_LOAD is being applied, another client's requests are answered, and they see none of the load's records before its commit."""
        n = 50_000
        app = make_appliance(controller=f"max_load_records = {n}", segment_size="64MiB", log_size="64MiB").start()
        db = app.connect()
        loader = RawConn(app.cfg.socket_path, timeout=120)
        watcher = RawConn(app.cfg.socket_path, timeout=120)
        seen = []
        try:
            loader.send(framing.encode([m.OP_LOAD, "accounts", [rec(k) for k in range(1, n + 1)]]))
            while True:
                read = len(db.table("accounts"))     # from shared memory, just before the status request
                st = watcher.request([m.OP_STATUS])[1]
                if st["transactions"]["active"]:       # the load is still running (not committed) now
                    seen.append((st["transactions"]["active"], st["tables"][0]["records"], read))
                if select_readable(loader.sock):
                    break
            assert loader.reader.read() == [m.OK, n]
        finally:
            loader.close()
            watcher.close()
        assert seen, "no request of another client was answered while the load ran"
        assert all(active == 1 and recs == 0 and read == 0 for active, recs, read in seen), seen[:5]
        assert len(db.table("accounts")) == n


def select_readable(sock) -> bool:
    import select
    return bool(select.select([sock], [], [], 0)[0])


# ---------------------------------------------------------------------------------------------
# Open transactions that go idle


class TestIdleTransactions:
    def test_idle_transaction_is_cancelled_and_its_locks_released(self, make_appliance):
        """A transaction with no request for controller.idle_timeout is cancelled (txn_idle_cancelled logged): another client gets its lock, and its own next statement raises TransactionCancelledError saying why."""
        app = make_appliance(controller="idle_timeout = 0.3").start()
        db = app.connect()
        preload(db, [1, 2])
        tx = db.transaction(program="forgotten")
        tx.get("accounts", 1, for_update=True)
        tx.update("accounts", 1, {"balance": -1})
        ev = wait_event(app, "txn_idle_cancelled", txn=tx.number)[0]
        assert ev["idle_s"] >= 0.3
        other = app.connect()
        with other.transaction() as t2:         # would wait lock_timeout and fail while the lock is held
            t2.update("accounts", 1, {"balance": 7})
        with pytest.raises(errors.TransactionCancelledError, match="idle_timeout"):
            tx.update("accounts", 2, {"balance": 0})
        assert db.table("accounts")[1]["balance"] == 7
        st = db.status()["transactions"]
        assert st["idle_cancelled"] == 1 and st["locks_held"] == 0
        db.table("accounts")[3] = rec(3)         # the connection serves on

    def test_busy_transaction_is_not_idle(self, make_appliance):
        """A transaction whose statements keep coming is never cancelled for idleness, however long it lives."""
        app = make_appliance(controller="idle_timeout = 0.3").start()
        db = app.connect()
        preload(db, [1, 2])
        import time
        idle = []
        with db.transaction() as tx:
            tx.get("accounts", 1, for_update=True)
            # beside it, transactions that go idle one after the other: the idle check cancels
            # each, and looks at the busy one every time it runs
            for n in range(1, 4):
                other = app.connect().transaction(program=f"idle{n}")
                other.get("accounts", 2, for_update=True)
                idle.append(other)
                deadline = time.monotonic() + 30
                while db.status()["transactions"]["idle_cancelled"] < n:
                    assert time.monotonic() < deadline, f"idle transaction {n} not cancelled"
                    tx.get("accounts", 1, for_update=True)
                    time.sleep(0.05)
            tx.update("accounts", 1, {"balance": 5})
        assert tx.state == "committed" and db.table("accounts")[1]["balance"] == 5
        for other in idle:
            with pytest.raises(errors.TransactionCancelledError, match="idle_timeout"):
                other.update("accounts", 2, {"balance": 0})
        assert db.status()["transactions"]["idle_cancelled"] == 3
        assert tx.number not in [e["txn"] for e in events(app, "txn_idle_cancelled")]


# ---------------------------------------------------------------------------------------------
# Accepting connections: out of descriptors, refused users


@pytest.fixture
def shared_tmp():
    """A directory other users may traverse (pytest's is 0700), so a process
    running as `nobody` can reach the socket."""
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="apl-limits-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class TestAccept:
    def test_out_of_descriptors_backs_off_and_recovers(self, bank, db):
        """When accept() fails with EMFILE the controller logs accept_failed once (not once per loop turn), counts the failed tries in status, keeps serving its clients, and accepts again (accept_resumed) once descriptors are free."""
        import resource
        pid = bank.controller.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 2, hard))
        conns = []
        try:
            for _ in range(6):              # two are accepted; the rest wait in the backlog
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(bank.cfg.socket_path))
                conns.append(s)
            wait_event(bank, "accept_failed")
            # the controller retries (50 ms, doubling) and is still short: three failed tries
            wait_for(lambda: db.status()["clients"]["accept_failures"] >= 3, 30, what="three failed accepts")
            db.table("accounts")[1] = rec(1)     # connected clients are served meanwhile
        finally:
            for s in conns:
                s.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        resumed = wait_event(bank, "accept_resumed")
        # accept() failed again at each retry (failures counts them) and was logged once
        assert resumed[0]["failures"] >= 3, resumed
        assert len(events(bank, "accept_failed")) == 1, events(bank, "accept_failed")
        assert db.status()["clients"]["accept_failures"] == 0
        assert bank.connect().table("accounts")[1] == rec(1)

    def test_refused_connections_are_logged_at_a_bounded_rate(self, make_appliance, shared_tmp):
        """Hundreds of connections from a user not in [access] each get the AccessDeniedError reply and are counted, but client_refused is logged once (with the count later), not per connection."""
        from conftest import Appliance
        from fault_helpers import NOBODY, run_as
        app = Appliance(shared_tmp).start()
        try:
            kind, value = run_as(NOBODY.pw_uid, NOBODY.pw_gid, connect_refused, str(app.cfg.socket_path), 300)
            assert (kind, value) == ("ok", 300), value
            assert app.connect().status()["clients"]["refused"] == 300
            refused = events(app, "client_refused")
            assert len(refused) == 1 and refused[0]["user"] == "nobody", len(refused)
        finally:
            app.cleanup()


def connect_refused(path: str, n: int) -> int:
    """Connect n times; the number of AccessDeniedError replies received."""
    from appliance.client.session import result
    got = 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        try:
            result(framing.FrameReader(s).read(), "connect")
        except errors.AccessDeniedError:
            got += 1
        finally:
            s.close()
    return got


# ---------------------------------------------------------------------------------------------
# Two appliances, one socket path


def config_sharing_socket(make_appliance, first):
    """An appliance (not started) whose controller.socket is `first`'s."""
    other = make_appliance()
    text = other.config.read_text().replace(f'socket = "{other.cfg.socket_path}"',
                                             f'socket = "{first.cfg.socket_path}"')
    other.config.write_text(text)
    from appliance.config import load
    other.cfg = load(other.config)
    other.controller.cfg = other.cfg
    assert other.cfg.socket_path == first.cfg.socket_path
    return other


class TestSocketOwnership:
    def test_second_appliance_on_the_same_socket_is_refused(self, bank, db, make_appliance):
        """A controller of another appliance configured with the same socket exits 69 naming the appliance that owns it; the first keeps its socket and its clients."""
        from store_helpers import linked_segments
        other = config_sharing_socket(make_appliance, bank)
        other.controller.start(wait=False)
        assert other.controller.proc.wait(timeout=30) == errors.EXIT_BUSY
        refused = [e for e in other.controller.events() if e.get("event") == "controller_refused_to_start"]
        assert refused and bank.name in refused[0]["error"] and str(bank.cfg.socket_path) in refused[0]["error"]
        assert [n for n in linked_segments([other.name]) if not n.endswith(".lock")] == []  # none made
        with RawConn(bank.cfg.socket_path) as conn:
            assert conn.hello()[1]["name"] == bank.name
        db.table("accounts")[1] = rec(1)
        assert bank.connect().status()["name"] == bank.name

    def test_stale_socket_of_a_killed_controller_is_taken_over(self, bank, make_appliance):
        """A socket nobody listens on any more (its controller was killed) is replaced by the next controller configured with it."""
        bank.controller.kill()
        assert bank.cfg.socket_path.exists()
        other = config_sharing_socket(make_appliance, bank).start()
        assert other.connect().status()["name"] == other.name

    def test_path_that_is_not_a_socket_is_not_removed(self, make_appliance):
        """A controller.socket path holding a regular file is refused (exit 69), and the file stays."""
        app = make_appliance()
        app.cfg.socket_path.write_text("not a socket")
        app.controller.start(wait=False)
        assert app.controller.proc.wait(timeout=30) == errors.EXIT_BUSY
        assert app.cfg.socket_path.read_text() == "not a socket"
        assert "is not a socket" in app.controller.log()


# ---------------------------------------------------------------------------------------------
# Shared memory: reserved up front; segments that are not the controller's own


def shm_path(name: str) -> str:
    return "/dev/shm" + name


def allocated(name: str) -> tuple[int, int]:
    """(bytes of memory the segment has, its size)."""
    st = os.stat(shm_path(name))
    return st.st_blocks * 512, st.st_size


def punch_hole(name: str, offset: int, length: int) -> None:
    """Give back the memory of part of a segment (its pages read as zeros again)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(shm_path(name), os.O_RDWR)
    try:
        falloc_fl_keep_size, falloc_fl_punch_hole = 1, 2
        if libc.fallocate(fd, falloc_fl_keep_size | falloc_fl_punch_hole, offset, length) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def pmd_mapped_kib(pid: int) -> dict[str, int]:
    """ShmemPmdMapped (KiB: mapped in 2 MiB pages) of each shared-memory segment `pid` maps."""
    return mapped_kib(pid, "ShmemPmdMapped:")


def mapped_kib(pid: int, field: str = "Rss:") -> dict[str, int]:
    """Rss (KiB; or another smaps `field`) of each shared-memory segment mapped by process `pid`, by segment name."""
    out, name = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 6 and head[5].startswith("/dev/shm/"):
                name = head[5][len("/dev/shm"):]
            elif "-" in head[0]:
                name = None
            elif head[0] == field and name is not None:
                out[name] = out.get(name, 0) + int(head[1])
    return out


class TestSharedMemory:
    def test_every_segment_has_its_memory_from_the_start(self, bank):
        """Every segment of a running appliance has all its pages allocated (reserved at creation), not only the ones written so far."""
        from appliance.store.segment import SegmentNames
        for n in SegmentNames(bank.name, bank.cfg.storage.segments).all():
            have, size = allocated(n)
            assert have >= size, (n, have, size)

    def test_segments_larger_than_shared_memory_refuse_the_start(self, make_appliance):
        """A configuration whose segments /dev/shm cannot hold exits 73 with controller_refused_to_start saying so; no segment is left behind and nothing of /dev/shm is filled."""
        from store_helpers import linked_segments
        vfs = os.statvfs("/dev/shm")
        total = vfs.f_blocks * vfs.f_frsize
        size = (total // 4096 + 1024) * 4096        # more than all of /dev/shm: refused before a page is taken
        app = make_appliance(segments=1, segment_size=str(size), log_size="1MiB")
        app.controller.start(wait=False)
        status = app.controller.proc.wait(timeout=60)
        log = app.controller.log()
        assert status == errors.EXIT_NOSPACE, (status, log[-2000:])
        refused = [e for e in app.controller.events() if e.get("event") == "controller_refused_to_start"]
        assert refused and "shared memory cannot hold" in refused[0]["error"] and "/dev/shm" in refused[0]["error"]
        assert refused[0]["code"] == "APL_EFULL"
        assert linked_segments([app.name]) == []

    def test_restart_reserves_pages_given_back(self, bank, db):
        """A segment with unallocated pages (made before reservation existed, or pages given back) gets them again when the controller attaches, before it serves."""
        from appliance.store.segment import SegmentNames
        preload(db, [1, 2, 3])
        assert bank.controller.stop() == 0
        dev = SegmentNames(bank.name, 1).device(0)
        have, size = allocated(dev)
        punch_hole(dev, size // 2, size // 2)         # the tail: slots not in use by 3 records
        assert allocated(dev)[0] < size
        bank.controller.start()
        assert allocated(dev)[0] >= size
        assert records(bank.connect().table("accounts")) == {k: rec(k) for k in (1, 2, 3)}

    def test_every_device_page_is_mapped_into_the_controller_ahead_of_use(self, bank, db):
        """storage.prefault (the default): once the controller serves, a background thread maps every page of each device segment into it (Rss of each mapping reaches the segment's size, well beyond what the few records written touch), says so in status and the log, and changes no record."""
        from appliance.store.segment import SegmentNames
        preload(db, [1, 2, 3])
        st = wait_for(lambda: (lambda p: p if p["done"] else None)(db.status()["memory"]["prefault"]), 30,
                      what="every device page mapped")
        size = bank.cfg.storage.segment_size
        assert st["bytes"] == st["total"] == size * bank.cfg.storage.segments
        [done] = wait_event(bank, "prefault_done")
        assert done["bytes"] == st["total"] and done["method"] in ("populate", "read")
        rss = mapped_kib(bank.controller.pid)
        names = SegmentNames(bank.name, bank.cfg.storage.segments)
        for dev in (names.device(i) for i in range(bank.cfg.storage.segments)):
            assert rss[dev] * 1024 >= size, (dev, rss[dev], size)
        assert records(db.table("accounts")) == {k: rec(k) for k in (1, 2, 3)}

    def test_status_says_which_pages_the_segments_get(self, bank, db):
        """memory.huge_pages: /dev/shm's huge-page policy and how many bytes of
        the device segments it puts in 2 MiB pages — which is what the
        controller's own mappings show (smaps ShmemPmdMapped), and what the
        prefault measured once done (memory.prefault.huge_bytes): none on a
        /dev/shm without huge=, the segments' whole 2 MiB ranges with
        huge=within_size or always."""
        from appliance.store.segment import SegmentNames, shm_huge_pages
        preload(db, [1, 2, 3])
        wait_for(lambda: db.status()["memory"]["prefault"]["done"] or None, 30, what="every device page mapped")
        mem = db.status()["memory"]
        hp, measured = mem["huge_pages"], mem["prefault"]["huge_bytes"]
        size, n = bank.cfg.storage.segment_size, bank.cfg.storage.segments
        assert hp["dev_shm"] == shm_huge_pages() and hp["of"] == size * n
        pmd = pmd_mapped_kib(bank.controller.pid)
        devs = [SegmentNames(bank.name, n).device(i) for i in range(n)]
        if hp["dev_shm"] in ("always", "within_size"):
            assert hp["bytes"] == n * (size - size % (2 << 20)) > 0
            assert all(pmd.get(d, 0) * 1024 == size - size % (2 << 20) for d in devs), pmd
            assert measured >= hp["bytes"]      # the prefault's own count (meta may be in huge pages too)
        else:
            assert hp["bytes"] == 0 and not any(pmd.get(d) for d in devs), pmd
            assert measured == 0

    def test_the_huge_page_policy_is_the_mounts_unless_the_kernel_overrides_it(self, tmp_path):
        from appliance.store.segment import shm_huge_pages
        mounts, knob = tmp_path / "mounts", tmp_path / "shmem_enabled"
        knob.write_text("always within_size advise [never] deny force\n")

        def policy(*lines, forced=None):
            mounts.write_text("".join(f"{line}\n" for line in lines))
            if forced:
                knob.write_text(f"always within_size advise never {forced}\n")
            return shm_huge_pages(str(mounts), str(knob))

        assert policy("tmpfs /dev/shm tmpfs rw,relatime,size=1024k 0 0") == "never"
        assert policy("tmpfs /dev/shm tmpfs rw,size=1024k,huge=within_size 0 0") == "within_size"
        assert policy("tmpfs /dev/shm tmpfs rw,huge=always 0 0", "tmpfs /dev/shm tmpfs rw 0 0") == "never"   # the last
        assert policy("tmpfs /run tmpfs rw,huge=always 0 0") == "never"          # another mount's
        assert policy("tmpfs /dev/shm tmpfs rw,huge=within_size 0 0", forced="[deny]") == "never"
        assert policy("tmpfs /dev/shm tmpfs rw 0 0", forced="[force]") == "always"
        assert shm_huge_pages(str(tmp_path / "none"), str(knob)) == "never"

    def test_without_prefault_the_pages_are_mapped_as_written(self, make_appliance):
        """storage.prefault = false: no background mapping; a device segment's pages come into the controller only as it writes them (Rss well below the segment's size), and status says prefault is off (null)."""
        from appliance.store.segment import SegmentNames
        app = make_appliance(storage="prefault = false").start()
        db = app.connect()
        preload(db, [1, 2, 3])
        assert db.status()["memory"]["prefault"] is None
        size = app.cfg.storage.segment_size
        rss = mapped_kib(app.controller.pid)
        names = SegmentNames(app.name, app.cfg.storage.segments)
        for dev in (names.device(i) for i in range(app.cfg.storage.segments)):
            assert rss[dev] * 1024 < size // 2, (dev, rss[dev], size)
        assert not [e for e in app.controller.events() if e.get("event") == "prefault_done"]

    @pytest.mark.parametrize("which", ["meta", "readers", "dev1"])
    def test_segment_of_another_user_is_not_adopted(self, bank, db, which):
        """A segment of the appliance owned by another user (one it could have prepared) makes the controller refuse to start (exit 78) naming it; nothing is changed."""
        from fault_helpers import NOBODY
        from appliance.store.segment import SegmentNames
        preload(db, [1])
        assert bank.controller.stop() == 0
        names = SegmentNames(bank.name, bank.cfg.storage.segments)
        seg = {"meta": names.meta, "readers": names.readers, "dev1": names.device(1)}[which]
        os.chown(shm_path(seg), NOBODY.pw_uid, -1)
        bank.controller.start(wait=False)
        assert bank.controller.proc.wait(timeout=30) == errors.EXIT_CONFIG
        refused = [e for e in bank.controller.events() if e.get("event") == "controller_refused_to_start"]
        assert refused and seg in refused[-1]["error"] and f"uid {NOBODY.pw_uid}" in refused[-1]["error"]
        assert os.stat(shm_path(seg)).st_uid == NOBODY.pw_uid
        os.chown(shm_path(seg), os.geteuid(), -1)
        bank.controller.start()
        assert records(bank.connect().table("accounts")) == {1: rec(1)}

    @pytest.mark.parametrize("which, mode", [("meta", 0o660), ("readers", 0o670), ("dev0", 0o644)])
    def test_segment_with_a_wider_mode_is_not_adopted(self, bank, which, mode):
        """A segment whose mode is wider than storage.mode (readers: plus group write) is refused at start (exit 78), naming it and both modes."""
        from appliance.store.segment import SegmentNames
        assert bank.controller.stop() == 0
        names = SegmentNames(bank.name, bank.cfg.storage.segments)
        seg = {"meta": names.meta, "readers": names.readers, "dev0": names.device(0)}[which]
        os.chmod(shm_path(seg), mode)
        bank.controller.start(wait=False)
        assert bank.controller.proc.wait(timeout=30) == errors.EXIT_CONFIG
        log = bank.controller.log()
        assert seg in log and f"{mode:04o}" in log and "wider than the configured" in log

    def test_leftover_segment_of_another_user_is_neither_used_nor_removed(self, make_appliance):
        """A device segment of the appliance's name without its meta, owned by another user, is refused (exit 78) and left in place."""
        import posix_ipc
        from fault_helpers import NOBODY
        from appliance.store.segment import SegmentNames
        app = make_appliance()
        dev = SegmentNames(app.name, 1).device(0)
        shm = posix_ipc.SharedMemory(dev, posix_ipc.O_CREX, mode=0o600, size=1 << 20)
        shm.close_fd()
        os.chown(shm_path(dev), NOBODY.pw_uid, -1)
        app.controller.start(wait=False)
        assert app.controller.proc.wait(timeout=30) == errors.EXIT_CONFIG
        assert os.path.exists(shm_path(dev)) and f"uid {NOBODY.pw_uid}" in app.controller.log()
