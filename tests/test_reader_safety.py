"""Readers against hostile or racing neighbours: the change log read while the
writer overwrites it, reader slots forged or taken over through the
group-writable readers segment, a client closed under its own reads, and
snapshots across fork(). In-process through the C helpers where the race can
be driven from here; real controllers, clients and raw sockets for the rest."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from appliance import errors
from appliance._native import ffi, lib
from appliance.store.keys import encode_int
from appliance.store.reader import Reader
from appliance.store.segment import Attachment
from appliance.wire import messages as m

from fault_helpers import RawConn, events, kill_child, reply_error, spawn_ready, wait_event

from procs import RUN_DIR
from store_helpers import INSERT, UPSERT, check_state, log_bounds, mp_value, native_reader, table_schema


#: the log entry's klen flips between its true value and one that overruns the
#: exporter's buffer while another process exports the entry in a loop
LOG_RACE = r"""
import mmap, multiprocessing as mp, struct, sys, time
import posix_ipc
from appliance._native import ffi, lib
from appliance.store.reader import Reader
from appliance.store.segment import Attachment

def flip(name, off, good, bad, seconds):
    shm = posix_ipc.SharedMemory(name)
    mm = mmap.mmap(shm.fd, shm.size)
    a, b = struct.pack("<I", good), struct.pack("<I", bad)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            mm[off:off + 4] = b
            mm[off:off + 4] = a

name, tail, off = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reader = Reader(Attachment(name, writable=False))
cap, guard = 1024, 8192
raw = bytearray(cap + guard)
out = ffi.from_buffer("uint8_t[]", raw)
pos = ffi.new("uint64_t *")
fs, ls, cnt = (ffi.new("uint64_t *") for _ in range(3))
p = mp.get_context("fork").Process(target=flip, args=(reader.att.meta.name, off, 40, 40 + 4096, 3.0))
p.start()
calls = 0
try:
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        for _ in range(2000):
            pos[0] = tail
            lib.apl_log_export(reader.view, pos, out, cap, 0, 0, fs, ls, cnt)
            calls += 1
            if raw[cap:cap + 16] != bytes(16):
                print("overflow after", calls, "calls")
                sys.exit(1)
finally:
    p.join()
print("ok", calls)
"""


class TestLogRead:
    @pytest.mark.parametrize("seed", range(3))
    def test_find_entry_is_the_first_of_its_kind_from_any_position(self, stores, seed):
        """apl_log_find (headers only, in C) gives what reading every entry in Python gives: the first entry of a kind at or after a position, within a count of entries, over a ring that wrapped (PAD space skipped); a position the writer overwrote raises APL_ELOGFULL."""
        from appliance.store.changelog import find_entry, read_entries
        rng = random.Random(seed)
        s = stores(log_size=1 << 20)
        kinds = [lib.APL_CE_BEGIN, lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_COMMIT, lib.APL_CE_BLOCK]
        old_tail = log_bounds(s.reader)["tail"]
        for txn in range(1, 1200):
            s.begin()
            for _ in range(rng.randrange(1, 12)):
                s.writer.log(rng.choice(kinds), txn=txn, time_ns=txn, file=0, key=b"k" * rng.randrange(1, 60),
                             a=b"a" * rng.randrange(0, 900), b=b"b" * rng.randrange(0, 300))
            s.publish()
        tail = log_bounds(s.reader)["tail"]
        assert tail > old_tail     # the ring wrapped: the oldest entries are gone
        entries = list(read_entries(s.reader, tail))
        assert len(entries) > 200
        for _ in range(300):
            i = rng.randrange(len(entries))
            kind, limit = rng.choice(kinds), rng.choice([1, 3, 50, 10_000])
            want = next(((e.pos, e.serial, e.time_ns) for e in entries[i:i + limit] if e.kind == kind), None)
            assert find_entry(s.reader, entries[i].pos, kind, limit) == want
        with pytest.raises(errors.InternalError) as ei:
            find_entry(s.reader, old_tail, lib.APL_CE_BEGIN, 10)
        assert ei.value.code == "APL_ELOGFULL"

    def test_export_copies_what_it_validated(self, stores):
        """R4: an entry overwritten while apl_log_export copies it (another process flips its key
        length between the true one and one that overruns the output) never makes the export write
        past its buffer: the header is copied once, checked, and only the copy is used."""
        s = stores(log_size=1 << 20)
        s.begin()
        s.writer.log(lib.APL_CE_INSERT, txn=1, time_ns=1, file=0, key=b"k" * 40, a=b"a" * 200, b=b"b" * 200)
        s.publish()
        sb = s.writer.att.sb
        tail = log_bounds(s.reader)["tail"]
        off = sb.sb_log_off + tail % sb.sb_log_size + ffi.offsetof("struct apl_centry", "ce_klen")
        r = subprocess.run([sys.executable, "-c", LOG_RACE, s.name, str(tail), str(off)],
                           capture_output=True, text=True, cwd=RUN_DIR, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stdout, r.stderr[-2000:])


def slots_of(reader):
    """The reader slots of an attachment, as C structs in the (group-writable) readers segment."""
    return ffi.cast("struct apl_reader *", reader.att.readers.ptr + ffi.sizeof("struct apl_rhdr"))


def rhdr_of(reader):
    return ffi.cast("struct apl_rhdr *", reader.att.readers.ptr)


def load(s, n: int = 400, size: int = 60) -> dict:
    s.begin()
    model = {}
    for k in range(n):
        key, val = encode_int(k), mp_value(size, k)
        s.writer.put(0, key, val, INSERT)
        model[key] = val
    s.publish()
    return model


def churn(s, model: dict, rounds: int, seed: int = 1) -> None:
    """Batches that rewrite every chain (old versions retired and, unless pinned, freed and reused)."""
    rnd = random.Random(seed)
    for _ in range(rounds):
        s.begin()
        for key in list(model):
            model[key] = mp_value(rnd.randrange(20, 90), rnd.randrange(1 << 30))
            s.writer.put(0, key, model[key], UPSERT)
        s.publish()


class TestForgedSlots:
    """A2 / R8: the readers segment is group-writable; nothing a client writes there may make the
    writer free what a live snapshot reads, or stop recovery."""

    def test_a_forged_old_pin_does_not_stop_recovery(self, stores):
        """A slot forged with pid 1 and an old version (its versions long freed and reused): the
        restarted writer recovers (clamping the pin to the horizon) instead of failing with
        'block structure is inconsistent', and a read at the forged version fails typed."""
        s = stores(nreaders=8, segment_size=4 << 20)
        model = load(s)
        old = s.reader.committed()
        churn(s, model, 20)
        forged = slots_of(s.reader)[6]
        forged.rs_pid, forged.rs_pin, forged.rs_kind = 1, old, 2
        rhdr_of(s.reader).rh_high = 8
        info = s.crash_and_recover()
        assert info["blocks_live"] > 0
        check_state(s, model)
        with pytest.raises(errors.SnapshotTooOldError):
            s.reader.get_raw(0, encode_int(1), version=old)
        audit_slots_after(s, forged)

    def test_lowering_rh_high_hides_no_pin(self, stores):
        """A client sets the readers header's rh_high to 0 under a live snapshot: the writer keeps
        scanning up to its own high-water mark and keeps the snapshot's versions."""
        s = stores(nreaders=8, segment_size=4 << 20)
        model = load(s)
        s.reader.get_raw(0, encode_int(1))          # this thread's per-call slot: slot 0
        pin = s.pin()                               # the snapshot: slot 1
        pinned = dict(model)
        s.publish()                                 # the writer scans: rh_high is 2
        rhdr_of(s.reader).rh_high = 0
        churn(s, model, 15)
        check_state(s, pinned, version=pin.version)
        pin.close()

    def test_a_wiped_pin_fails_reads_instead_of_reading_freed_versions(self, stores):
        """A neighbour wipes a live snapshot's pin; the writer frees and reuses its versions. Every
        read through the snapshot (the cffi reads and the native get, scan and find) then fails
        with SnapshotTooOldError: none returns data."""
        s = stores(nreaders=8, segment_size=4 << 20, nfiles=2)
        model = load(s)
        pin = s.pin()
        assert s.reader.count(0, pin.version) == len(model)
        slots_of(s.reader)[pin._slot].rs_pin = 0
        churn(s, model, 15)
        v = pin.version
        native = native_reader(s.reader, table_schema({"id": "int", "x": "str"}, alt=("x",))).at(v)
        reads = [lambda: s.reader.get_raw(0, encode_int(5), version=v),
                 lambda: native.get(5),
                 lambda: native.scan(None, True, None, 0, 1 << 16),
                 lambda: native.find(1, b"x", 0, "x"),
                 lambda: s.reader.count(0, v),
                 lambda: list(s.reader.scan_raw(0, None, None, version=v)),
                 lambda: list(s.reader.scan_keys(0, None, None, version=v)),
                 lambda: list(s.reader.find_raw(1, 0, b"x", version=v)),
                 lambda: s.reader.block_image(0, v),
                 lambda: s.reader.block_images(0, v, 1 << 16, 64)]
        for read in reads:
            with pytest.raises(errors.SnapshotTooOldError):
                read()
        check_state(s, model)                       # reads at the latest version are untouched
        pin.close()


def audit_slots_after(s, forged) -> None:
    """Once the forged slot is gone, every old version is reclaimed."""
    forged.rs_pin, forged.rs_pid = 0, 0
    s.writer.reclaim()
    assert s.writer.stats()["retire_pending"] == 0


class TestSlotTakeover:
    def test_a_dead_slot_taken_over_keeps_the_new_owner_pin(self, stores):
        """R2 (stress, 3 s): a forked process runs the writer's sweep of dead readers in a loop while
        this one keeps handing a slot to a dead pid and taking it over with a pin. Whichever of the
        two loses the race for the slot must not touch it: the pin taken is never wiped."""
        s = stores(nreaders=1)
        dead = subprocess.Popen(["true"])
        dead.wait()
        slot = slots_of(s.reader)[0]
        stop_r, stop_w = os.pipe()
        child = os.fork()
        if child == 0:                                # the sweeper: only ever writes the readers segment
            os.close(stop_w)
            os.set_blocking(stop_r, False)
            try:
                while True:
                    for _ in range(2000):
                        s.writer.sweep_readers()
                    try:
                        if os.read(stop_r, 1) == b"":
                            break
                    except BlockingIOError:
                        pass
            finally:
                os._exit(0)
        os.close(stop_r)
        rounds = wiped = taken = 0
        try:
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                rounds += 1
                while slot.rs_pid == lib.APL_PID_BUSY:   # the sweeper is clearing it: let it finish
                    pass                                 # (a plain store now would undo its CAS)
                slot.rs_pin, slot.rs_pid = 1, dead.pid   # a dead reader's slot, pinning version 1
                try:
                    pin = s.reader.pin()                 # the table is full: take the dead one over
                except errors.ReadersFullError:
                    continue                             # the sweeper held it (being cleared)
                taken += 1
                for _ in range(3):                       # the loser of the race acts now or never
                    wiped += slot.rs_pin != pin.version
                pin.close()
        finally:
            os.close(stop_w)
            os.waitpid(child, 0)
        assert taken > 1000 and wiped == 0, (rounds, taken, wiped)

    def test_a_reused_pid_is_not_the_dead_reader(self, stores):
        """R9: a slot whose pid now names another process (its start time differs) is a dead
        reader's: the sweep clears it and a claimer takes it; with the right start time it stays."""
        s = stores(nreaders=2)
        other = subprocess.Popen(["sleep", "60"])
        try:
            start = lib.apl_pid_start(other.pid)
            assert start > 0
            s.reader.get_raw(0, encode_int(1))       # slot 0: ours
            slot = slots_of(s.reader)[1]
            slot.rs_pid, slot.rs_start, slot.rs_pin = other.pid, start, 1
            assert s.writer.sweep_readers() == 0 and slot.rs_pid == other.pid
            slot.rs_start = start + 1                # as if `other` had reused a dead reader's pid
            pin = s.pin()                            # the table is full: the claimer takes that slot
            assert pin._slot == 1 and slot.rs_pid == os.getpid()
            pin.close()
            slot.rs_pid, slot.rs_start, slot.rs_pin = other.pid, start + 1, 1
            assert s.writer.sweep_readers() == 1 and slot.rs_pid == 0
        finally:
            other.kill()
            other.wait()


# ---------------------------------------------------------------------------
# Real controllers and clients
# ---------------------------------------------------------------------------

#: a client closed by one thread while others are inside native reads (gets, a snapshot's gets,
#: len(), a snapshot's range): every reader ends with ClosedError, nothing faults
CLOSE_UNDER_READS = r"""
import sys, threading, time, appliance
from appliance import errors
cfg = sys.argv[1]
for rnd in range(25):
    db = appliance.connect(cfg)
    acc = db.table("accounts")
    snap = db.snapshot()
    st = snap.table("accounts")
    bad, ended = [], []
    def reads(fn):
        try:
            while True:
                fn()
        except errors.ClosedError:
            ended.append(1)
        except BaseException as e:
            bad.append(repr(e))
    fns = [lambda: acc.get(1), lambda: st.get(2), lambda: len(acc), lambda: list(st.range(0, 300)),
           lambda: acc.find("branch", "b1")]
    ts = [threading.Thread(target=reads, args=(f,)) for f in fns]
    for t in ts:
        t.start()
    time.sleep(0.002 * (rnd % 5))
    db.close()
    for t in ts:
        t.join()
    if bad or len(ended) != len(fns):
        print("bad", bad); sys.exit(1)
    try:
        db._reader.pin()
        print("pinned after close"); sys.exit(1)
    except errors.ClosedError:
        pass
    snap.close()
print("ok")
"""

#: a snapshot opened before fork(): the child gets ClosedError and leaves the parent's pin alone
FORK = r"""
import os, sys, appliance
from appliance import errors
db = appliance.connect(sys.argv[1]); acc = db.table("accounts")
acc[1] = {"branch": "a", "balance": 1}
snap = db.snapshot(); st = snap.table("accounts")
acc[1] = {"branch": "a", "balance": 2}
pid = os.fork()
if pid == 0:
    try:
        st.get(1)
        os._exit(3)
    except errors.ClosedError as e:
        os._exit(0 if "before fork" in str(e) else 4)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), st.get(1)["balance"], db.status()["readers"]["active"])
"""


def fill(db, n: int = 300) -> None:
    db.load("accounts", ({"id": i, "branch": f"b{i % 7}", "balance": i} for i in range(n)))


class TestClose:
    def test_close_waits_for_reads_other_threads_are_inside(self, bank):
        """R3: Client.close() in one thread while four others read (plain and snapshot reads):
        every reader ends with ClosedError, none touches unmapped memory, and a pin taken after
        close is refused with ClosedError."""
        with bank.connect() as db:
            fill(db)
        r = bank.spawn(CLOSE_UNDER_READS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = r.communicate(timeout=180)
        assert r.returncode == 0 and out.strip() == "ok", (r.returncode, out, err[-2000:])

    def test_a_snapshot_inherited_across_fork_is_not_the_child_s(self, bank):
        """R3: a forked child using its parent's snapshot gets ClosedError (it holds no pin); its
        exit releases nothing: the parent's snapshot still reads its version, still pinned."""
        r = bank.spawn(FORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = r.communicate(timeout=60)
        assert r.returncode == 0, err[-2000:]
        child, balance, active = out.split()
        assert (child, balance) == ("0", "1") and int(active) >= 1


def free_slots_forged(att, pid: int = 1, pin: int = 1) -> int:
    """Claim every free reader slot as `pid` pinning `pin`, as a hostile client could; returns how many."""
    slots = slots_of(Reader(att))
    n = 0
    for i in range(att.sb.sb_nreaders):
        if slots[i].rs_pid == 0:
            slots[i].rs_pin, slots[i].rs_kind, slots[i].rs_pid = pin, 2, pid
            n += 1
    return n


READ_IN_A_NEW_THREAD = r"""
import sys, threading, appliance
from appliance import errors
db = appliance.connect(sys.argv[1]); out = []
def read():
    try:
        out.append(db.table("accounts").get(5)["balance"])
    except errors.ReadersFullError as e:
        out.append("full")
t = threading.Thread(target=read); t.start(); t.join()
print(out[0])
"""


class TestSessionsOwnSlots:
    def test_forged_slots_are_swept_and_readers_get_in_across_restarts(self, make_appliance):
        """A2: every free reader slot claimed as pid 1 with an old pin. The controller clears the
        slots no session owns (reader_slots_swept) and readers get slots again; the old pin holds
        no memory; after a restart (data churned, forged pins back) the controller starts, clears
        them again, and reads work."""
        app = make_appliance().start()
        with app.connect() as db:
            fill(db)
            for rnd in range(2):
                att = Attachment(app.name, writable=False)
                try:
                    assert free_slots_forged(att) > 0
                    wait_event(app, "reader_slots_swept", count=rnd + 1, timeout=15)
                finally:
                    att.close()
                out = app.spawn(READ_IN_A_NEW_THREAD, stdout=subprocess.PIPE, text=True).communicate(timeout=60)[0]
                assert out.strip() == "5"
                st = db.status()["readers"]
                assert st["swept"] > 0 and st["oldest_pin"] != 1
                for i in range(300):
                    db.table("accounts")[i] = {"branch": "c", "balance": i + rnd}
                att = Attachment(app.name, writable=False)
                try:
                    free_slots_forged(att)
                finally:
                    att.close()
                app.restart()                         # recovery with forged old pins: it starts
            assert db.table("accounts")[7]["balance"] == 8

    def test_hello_with_another_pid_is_refused(self, bank):
        """R9: a HELLO that names a pid other than the one SO_PEERCRED gives (another pid namespace)
        is refused with AccessDeniedError naming both, and logged; the right pid is accepted."""
        with RawConn(bank.cfg.socket_path) as c:
            reply = c.request([m.OP_HELLO, m.PROTOCOL_VERSION, "raw", os.getpid() + 1])
        assert reply_error(reply) is errors.AccessDeniedError and "pid namespace" in reply[2], reply
        assert events(bank, "client_refused", reason="pid_namespace", pid=os.getpid())
        with RawConn(bank.cfg.socket_path) as c:
            assert reply_error(c.request([m.OP_HELLO, m.PROTOCOL_VERSION, "raw", os.getpid()])) is None

    def test_a_client_in_another_pid_namespace_is_refused(self, bank):
        """R9: a real client started in a new pid namespace (pid 1 there) cannot attach."""
        code = ("import sys, appliance\nfrom appliance import errors\ntry:\n    appliance.connect(sys.argv[1])\n"
                "    print('attached')\nexcept errors.AccessDeniedError as e:\n    print('refused:', e)\n")
        r = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code, str(bank.config)],
                           capture_output=True, text=True, cwd=RUN_DIR, timeout=60)
        if "Operation not permitted" in r.stderr:
            pytest.skip("this machine does not allow new pid namespaces")
        assert r.stdout.startswith("refused:") and "pid namespace" in r.stdout, (r.stdout, r.stderr[-2000:])


HOLD_SNAPSHOT_STOPPED = r"""
import os, signal, sys, appliance
db = appliance.connect(sys.argv[1])
snap = db.snapshot(); len(snap.table("accounts"))
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


class TestPinnedMemory:
    def test_a_stopped_snapshot_is_named_before_memory_runs_out(self, make_appliance):
        """A5: a SIGSTOPped process holds a snapshot while updates go on. Long before memory is
        full the controller logs readers_hold_old_versions naming its pid, and status shows the
        oldest pin's pid, age and the bytes old versions take; once it is killed the warning clears."""
        app = make_appliance(segment_size="4MiB").start()
        with app.connect() as db:
            fill(db)
            child = spawn_ready(app, HOLD_SNAPSHOT_STOPPED)
            try:
                acc = db.table("accounts")
                warned = []
                for rnd in range(1000):                # paced: housekeeping looks once a second
                    for i in range(0, 300, 30):
                        acc[i] = {"branch": "u", "balance": rnd}
                    warned = events(app, "readers_hold_old_versions", pid=child.pid)
                    if warned:
                        break
                    # paced so that a housekeeping round (once a second) comes well before
                    # the kept versions fill memory: about 200 updates a second
                    time.sleep(0.04)
                assert warned, db.status()["readers"]
                st = db.status()
                r = st["readers"]
                assert r["oldest_pin_pid"] == child.pid and r["oldest_pin_age_s"] >= 0
                assert str(child.pid) in r["warning"] and r["old_versions_bytes"] > 0
                assert st["blocks"]["slots_free"] > st["blocks"]["slots_total"] // 3
            finally:
                kill_child(child)
            wait_event(app, "readers_hold_old_versions_cleared", timeout=15)
            assert db.status()["readers"]["oldest_pin_pid"] != child.pid


READ_ONLY_ACROSS_RESTART = r"""
import sys, time, appliance
db = appliance.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()                      # the controller was restarted meanwhile
with db.snapshot() as snap:
    t = snap.table("accounts")
    before = t.get(3)
    print("pinned", flush=True)
    sys.stdin.readline()                  # others wrote for several housekeeping rounds
    print(t.get(3) == before, len(t))
"""


class TestRestart:
    def test_a_reading_client_keeps_its_slots_across_a_controller_restart(self, bank):
        """A client that only reads, across a controller restart: the snapshot it opens afterwards
        belongs to a session again (it says HELLO first), so the controller never clears it while
        writes go on for several housekeeping rounds."""
        with bank.connect() as db:
            fill(db)
        reader = bank.spawn(READ_ONLY_ACROSS_RESTART, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "ready"
            bank.restart()
            reader.stdin.write("go\n")
            reader.stdin.flush()
            assert reader.stdout.readline().strip() == "pinned"
            rounds = set()                    # the pin's age, as each housekeeping round saw it
            deadline = time.monotonic() + 60
            with bank.connect() as db:
                for rnd in range(10_000):
                    for i in range(0, 300, 10):
                        db.table("accounts")[i] = {"branch": "r", "balance": rnd}
                    r = db.status()["readers"]
                    assert r["swept"] == 0, r
                    if rounds or r["oldest_pin_pid"] is not None:   # from the first round after the pin on:
                        assert r["oldest_pin_pid"] == reader.pid, r   # still pinned, never cleared
                        rounds.add(r["oldest_pin_age_s"])
                    if len(rounds) >= 4:      # four rounds found the slot (an unowned one goes at the second)
                        break
                    assert time.monotonic() < deadline, f"housekeeping rounds seen: {sorted(rounds)}"
                    time.sleep(0.1)
            reader.stdin.write("go\n")
            reader.stdin.flush()
            assert reader.stdout.readline().split() == ["True", "300"]
        finally:
            kill_child(reader)
        assert not events(bank, "reader_slots_swept")
