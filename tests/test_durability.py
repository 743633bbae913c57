"""Durability on disk ([durability]): log files, checkpoints, cold start.

Real controllers with real files in the test's temporary directory; a
"power cut" is every process SIGKILLed and every segment unlinked, which
leaves exactly what a machine that lost power keeps: the files (fsynced or
in the page cache, which these tests do not drop: the guarantee of each
log_sync mode against the page cache is the README's, not a test's).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from appliance import errors
from appliance.durability import records as rec
from appliance.store.reader import Reader
from appliance.store.records import Schema
from appliance.store.segment import Attachment, unlink_all

from procs import APPLIANCE, RUN_DIR
from store_helpers import native_reader

TABLES = """
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = { id = "int", branch = "str", balance = "int" }

[tables.transfers]
primary_key = "id"
fields = { id = "int", src = "int", dst = "int", amount = "int" }
"""


def durability(d, **kw) -> str:
    kw.setdefault("checkpoint_every", "off")
    kw.setdefault("log_file_size", "2MiB")      # small files made in advance: little disk for each test
    lines = [f'dir = "{d}"'] + [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    return "[durability]\n" + "\n".join(lines) + "\n"


def cli(*args, timeout=60):
    return subprocess.run([*APPLIANCE, *map(str, args)], capture_output=True, text=True, cwd=RUN_DIR,
                          timeout=timeout)


def block_sums(name: str) -> tuple[int, str]:
    """(serial, digest of every block's checksum) of a running appliance, read from its segments."""
    att = Attachment(name, writable=False)
    try:
        r = Reader(att)
        pin = r.pin()
        try:
            pb = att.sb.sb_pub[pin.version & 1]
            return pb.pb_serial, hashlib.sha1(r.block_sums(pin.version)).hexdigest()
        finally:
            pin.close()
    finally:
        att.close()


def power_cut(app) -> None:
    """Every process of the appliance killed, every segment gone: only the files remain."""
    for p in app.children:
        if p.poll() is None:
            p.kill()
            p.wait()
    app.controller.kill()
    unlink_all(app.name, app.cfg.storage.segments)


def fill(db, n: int, start: int = 0, batch: int | None = None) -> None:
    """Accounts start..start+n: one commit each, or `batch` records a commit (db.load)."""
    if batch:
        db.load("accounts", [{"id": i, "branch": f"br{i % 7}", "balance": 1000 + i}
                             for i in range(start, start + n)], batch=batch)
        return
    t = db.table("accounts")
    for i in range(start, start + n):
        t[i] = {"branch": f"br{i % 7}", "balance": 1000 + i}


def cold_start_from(app, db, cp: dict) -> dict:
    """A power cut, then a cold start: it must load checkpoint `cp` and give
    back every block as it was; returns status recovery.cold_start."""
    before = block_sums(app.name)
    db.close()
    power_cut(app)
    app.controller.start()
    assert block_sums(app.name) == before
    cold = app.connect().status()["recovery"]["cold_start"]
    assert cold["checkpoint"] == cp["file"] and cold["checkpoint_serial"] == cp["serial"]
    return cold


def wait_checkpoint(db, timeout: float = 20.0) -> dict:
    """Until status says a checkpoint was written and none is needed; its durability part."""
    deadline = time.monotonic() + timeout
    while (st := db.status()["durability"])["needs_checkpoint"] or not st["last_checkpoint"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    return st


def log_files(d) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("log-") and p.name.endswith(".apl"))


def cached_bytes(path) -> int:
    """Bytes of the file in the page cache (mincore(2) over a private mapping
    of it, which touches no page)."""
    import ctypes
    import mmap
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        anchor = ctypes.c_char.from_buffer(mm)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            assert libc.mincore(ctypes.addressof(anchor), size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            del anchor
        return sum(b & 1 for b in vec) * page
    finally:
        mm.close()


def page_cache_kept(path) -> bool:
    """Whether the file system under `path` has a page cache to drop pages
    from (tmpfs pages are the files themselves)."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()
    return fs not in ("tmpfs", "ramfs")


class TestLogFilesAndColdStart:
    def test_commits_reach_the_log_and_a_cold_start_rebuilds_every_block(self, make_appliance, tmp_path):
        """With log_sync = "commit" every acknowledged commit is on disk when it
        returns (status: durable serial = the serial); after a power cut the
        controller rebuilds the segments from the log alone: the same blocks
        (checksums), the same serial; status and the log line say what it
        loaded; new commits continue the serials, after the file's last record."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d)).start()
        db = app.connect()
        fill(db, 60)
        with db.transaction(program="transfer", input={"src": 1, "dst": 2}) as tx:
            tx.update("accounts", 1, {"balance": 0})
            tx.insert("transfers", {"id": 1, "src": 1, "dst": 2, "amount": 1001})
        del db.table("accounts")[5]
        st = db.status()
        dur = st["durability"]
        assert dur["log_sync"] == "commit" and dur["durable_serial"] == st["log"]["serial"] > 0
        assert dur["fsyncs"] > 0 and dur["error"] is None and dur["log_bytes_since_checkpoint"] > 0
        assert log_files(d)[0] == "log-00000000000000000001.apl"   # (then the file made in advance, once ready)
        human = cli("status", "--config", app.config)
        assert "durability:" in human.stdout and f"durable serial {st['log']['serial']}" in human.stdout
        before = block_sums(app.name)
        db.close()

        power_cut(app)
        app.controller.start()
        assert block_sums(app.name) == before
        db = app.connect()
        st = db.status()
        cold = st["recovery"]["cold_start"]
        assert cold["checkpoint"] is None and cold["serial"] == before[0]
        assert cold["records_replayed"] == 62 and cold["entries_replayed"] > 62 and cold["log_cut"] is None
        ev = [e for e in app.controller.events() if e.get("event") == "cold_start_loaded"]
        assert len(ev) == 1 and ev[0]["serial"] == before[0] and "seconds" in ev[0]
        phases = cold["phases"]       # where the time went, in the order they ran
        assert list(phases) == ["reserve", "checkpoint", "log", "recover"] and ev[0]["phases"] == phases
        assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= cold["seconds"] + 0.005
        human = cli("status", "--config", app.config).stdout
        assert f"(reserve {phases['reserve']:.2f} s, checkpoint" in human, human
        t = db.table("accounts")
        assert len(t) == 59 and t[1]["balance"] == 0 and db.table("transfers")[1]["amount"] == 1001
        assert sorted(r["id"] for r in t.find("branch", "br3"))[:3] == [3, 10, 17]
        t[7] = {"branch": "x", "balance": 7}
        st = db.status()
        assert st["log"]["serial"] > before[0] and st["durability"]["durable_serial"] == st["log"]["serial"]
        assert st["durability"]["log_seq"] == 63 and st["durability"]["log_cut"] is None
        db.close()

    def test_a_plain_restart_keeps_its_segments_and_continues_the_file(self, make_appliance, tmp_path):
        """A controller killed with its segments left recovers from them as
        before (no cold start) and appends to the same log file, after the
        record where it stopped; `appliance destroy` removes the segments and
        says the files stay, which the next start loads."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d)).start()
        db = app.connect()
        fill(db, 50)
        seq = db.status()["durability"]["log_seq"]
        db.close()
        app.controller.kill()
        app.controller.start()
        db = app.connect()
        st = db.status()
        assert "cold_start" not in st["recovery"] and st["durability"]["log_seq"] == seq
        fill(db, 10, 50)
        st = db.status()
        assert st["durability"]["log_seq"] == seq + 10 and st["durability"]["current_file"] in log_files(d)
        before = block_sums(app.name)
        db.close()
        assert app.controller.stop() == 0
        r = cli("destroy", "--yes", "--config", app.config)
        assert r.returncode == 0 and "still holds its log files and checkpoints" in r.stdout, r.stdout
        app.controller.start()
        assert block_sums(app.name) == before

    def test_interval_and_off_answer_at_once_and_a_clean_stop_loses_nothing(self, make_appliance, tmp_path):
        """log_sync = "interval" answers before the log is on disk and forces
        the file every sync_interval (fsyncs far fewer than commits; the
        durable serial catches up by itself); "off" never forces it while
        running; a SIGTERM stop writes and forces everything either way."""
        for mode, extra in (("interval", {"sync_interval": "50ms"}), ("off", {})):
            d = tmp_path / mode
            app = make_appliance(tables=TABLES, extra=durability(d, log_sync=mode, **extra)).start()
            db = app.connect()
            fill(db, 200)
            serial = db.status()["log"]["serial"]
            deadline = time.monotonic() + 10
            while (st := db.status()["durability"])["written_serial" if mode == "off" else "durable_serial"] < serial:
                assert time.monotonic() < deadline, st
                time.sleep(0.02)
            assert st["log_sync"] == mode
            if mode == "off":
                assert st["fsyncs"] == 0
            else:
                assert 0 < st["fsyncs"] < 200
            db.close()
            before = block_sums(app.name)
            assert app.controller.stop() == 0
            unlink_all(app.name, app.cfg.storage.segments)
            app.controller.start()
            assert block_sums(app.name) == before


class TestCheckpoints:
    def test_checkpoint_command_retires_files_and_a_cold_start_uses_it(self, make_appliance, tmp_path):
        """`appliance checkpoint` writes one (human and --json output, status
        last_checkpoint); with keep_checkpoints = 2 the third removes the
        first and the log files only it needed; a cold start loads the newest
        checkpoint and replays only the log after it."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d, keep_checkpoints=2, log_file_size="1MiB")).start()
        db = app.connect()
        fill(db, 400, batch=50)
        r = cli("checkpoint", "--config", app.config)
        assert r.returncode == 0 and r.stdout.startswith("checkpoint checkpoint-"), r.stderr
        fill(db, 400, 400, batch=50)
        r = cli("checkpoint", "--config", app.config, "--json")
        assert r.returncode == 0, r.stderr
        second = json.loads(r.stdout)
        st = db.status()["durability"]
        assert st["last_checkpoint"]["file"] == second["file"] and second["serial"] <= st["durable_serial"]
        assert st["checkpoints"]["taken"] == 2 and second["blocks"] > 0 and second["bytes"] > 0
        fill(db, 400, 800, batch=50)
        cps = sorted(p.name for p in d.glob("checkpoint-*.apl"))
        assert len(cps) == 2
        from appliance.cli.durability import checkpoint     # the command's Python face
        third = checkpoint(app.cfg)
        t = db.table("accounts")
        t[5] = {"branch": "after", "balance": 5}
        deadline = time.monotonic() + 10
        while len(list(d.glob("checkpoint-*.apl"))) != 2 or cps[0] in {p.name for p in d.glob("*.apl")}:
            assert time.monotonic() < deadline, sorted(p.name for p in d.iterdir())
            time.sleep(0.05)
        first_seq = int(cps[0][len("checkpoint-"):-4])
        assert all(int(n[4:-4]) > first_seq for n in log_files(d)[1:])   # files only the first needed are gone
        assert cold_start_from(app, db, third)["records_replayed"] == 1

    def test_a_checkpoint_written_keeps_little_of_itself_in_the_page_cache(self, make_appliance, tmp_path):
        """What the checkpoint writer has on disk leaves the page cache as it
        goes: of a 40 MiB checkpoint, the last records' pages at most stay
        cached, and a cold start loads it whole."""
        from appliance.cli.durability import checkpoint
        from appliance.durability.checkpoint import CHUNK
        d = tmp_path / "files"
        if not page_cache_kept(tmp_path):
            pytest.skip("the temporary directory is on tmpfs: no page cache to drop")
        tables = '[tables.notes]\nprimary_key = "id"\nfields = { id = "int", text = "str" }\n'
        app = make_appliance(tables=tables, segment_size="32MiB", segments=2, extra=durability(d)).start()
        db = app.connect()
        text = "x" * 1900
        for start in range(0, 20_000, 2_000):
            db.load("notes", [{"id": i, "text": f"{i}{text}"} for i in range(start, start + 2_000)], batch=2_000)
        cp = checkpoint(app.cfg)
        path = d / cp["file"]
        assert path.stat().st_size > 8 * CHUNK
        assert cached_bytes(path) <= 3 * CHUNK, (cached_bytes(path), path.stat().st_size)
        assert cold_start_from(app, db, cp)["records_replayed"] == 0

    def test_checkpoint_every_volume_of_log(self, make_appliance, tmp_path):
        """checkpoint_every = "1MiB": a checkpoint is taken by itself once that much log was written."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d, checkpoint_every="1MiB", log_sync="off")).start()
        db = app.connect()
        db.load("accounts", [{"id": i, "branch": "b" * 60, "balance": i} for i in range(12000)], batch=2000)
        wait_checkpoint(db)
        ev = [e for e in app.controller.events() if e.get("event") == "checkpoint_started"]
        assert ev and ev[0]["reason"] == "checkpoint_every"

    def test_checkpoint_without_durability_is_refused(self, bank):
        """`appliance checkpoint` on a memory-only appliance: a ConfigError
        naming [durability], exit 78, nothing written."""
        r = cli("checkpoint", "--config", bank.config)
        assert r.returncode == errors.EXIT_CONFIG and "durability" in r.stderr


class TestCheckpointsGiveWay:
    """A checkpoint shares the disk with the commits that wait on the log."""

    def test_a_checkpoint_under_durable_commits_gives_way_and_a_cold_start_loads_it(self, make_appliance,
                                                                                 tmp_path):
        """Alone, a checkpoint writes at the disk's speed (yielded_bytes 0);
        while commits wait on the log's fsyncs it writes in small forced
        slices (yielded_bytes: all of its block images), and that checkpoint
        is whole: a power cut after it cold-starts from it, every block the same."""
        import threading
        from appliance.cli.durability import checkpoint
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d)).start()
        db = app.connect()
        fill(db, 3000, batch=500)
        time.sleep(0.3)                          # no commit within the last YIELD_WINDOW_S
        alone = checkpoint(app.cfg)
        assert alone["yielded_bytes"] == 0 and alone["bytes"] > 64 << 10
        stop, done = threading.Event(), []

        def commits():
            c = app.connect()
            t = c.table("accounts")
            while not stop.is_set():
                t[len(done) % 3000] = {"branch": "busy", "balance": len(done)}
                done.append(1)
            c.close()
        th = threading.Thread(target=commits)
        th.start()
        try:
            while len(done) < 50:
                time.sleep(0.01)
            busy = checkpoint(app.cfg)
        finally:
            stop.set()
            th.join(30)
        assert busy["yielded_bytes"] > 0 and busy["yielded_bytes"] >= busy["bytes"] - (64 << 10), busy
        r = cli("status", "--config", app.config, "--json")
        assert json.loads(r.stdout)["durability"]["last_checkpoint"]["yielded_bytes"] == busy["yielded_bytes"]
        cold_start_from(app, db, busy)

    def test_interval_commits_do_not_wait_on_the_disk_and_the_checkpoint_does_not_slow(self, make_appliance,
                                                                                     tmp_path):
        """With log_sync = "interval" no commit waits for an fsync: a checkpoint
        under the same load writes at full speed (yielded_bytes 0)."""
        import threading
        from appliance.cli.durability import checkpoint
        d = tmp_path / "files"
        # room for the versions the checkpoint's pin holds while the updates go on (a
        # slow checkpoint on a busy machine otherwise fills 32 MiB: MemoryFullError)
        app = make_appliance(tables=TABLES, extra=durability(d, log_sync="interval", sync_interval="1s"),
                             segment_size="64MiB").start()
        db = app.connect()
        fill(db, 3000, batch=500)
        stop = threading.Event()

        def commits():
            t = db.table("accounts")
            i = 0
            while not stop.is_set():
                t[i % 3000] = {"branch": "busy", "balance": i}
                i += 1
        th = threading.Thread(target=commits)
        th.start()
        try:
            time.sleep(0.2)
            cp = checkpoint(app.cfg)
        finally:
            stop.set()
            th.join(30)
        assert cp["yielded_bytes"] == 0 and cp["bytes"] > 64 << 10
        db.close()

    def test_a_checkpoint_keeps_a_young_log_file_and_moves_off_a_full_one(self, make_appliance, tmp_path):
        """A checkpoint starts a new log file only when the current one is past
        half of log_file_size (each new file is made in advance, all zeros):
        after a few commits the file goes on; after more than half, the next
        record starts a new one and the files before the checkpoint can go."""
        from appliance.cli.durability import checkpoint
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d, log_file_size="1MiB")).start()
        db = app.connect()
        fill(db, 20)
        deadline = time.monotonic() + 10
        while not (d / "log-spare.ready").exists():    # the first file was not made in advance: the
            assert time.monotonic() < deadline          # writer moves onto the spare once it is ready
            time.sleep(0.02)
        fill(db, 5, 40)
        first = db.status()["durability"]["current_file"]
        assert first != "log-00000000000000000001.apl"
        checkpoint(app.cfg)
        fill(db, 5, 20)
        assert db.status()["durability"]["current_file"] == first
        db.load("accounts", [{"id": i, "branch": "b" * 60, "balance": i} for i in range(100, 12100)], batch=2000)
        full = db.status()["durability"]["current_file"]
        checkpoint(app.cfg)
        fill(db, 5, 30)
        st = db.status()["durability"]
        assert st["current_file"] != full and int(st["current_file"][4:-4]) > st["last_checkpoint"]["log_seq"]
        db.close()


class TestFileFormat:
    """records.read: small records come out of a read window, large ones are
    read whole; either way every record is given back as written, and a
    file cut or damaged anywhere — inside the window, across its edge, in a
    large record — stops at the last whole, valid record."""

    SIZES = [0, 100, 5000, rec.WINDOW // 4, 3, rec.WINDOW - 200, 70_000, rec.WINDOW + 9, 1, 300_000, 7]

    def write(self, path) -> list[tuple[int, bytes]]:
        """A log file of records of SIZES, each after the window's edge
        somewhere; [(offset, payload)]."""
        import random
        rng = random.Random(11)
        out, off = [], rec.MAGIC_LEN
        with open(path, "wb") as f:
            f.write(rec.LOG_MAGIC)
            for seq, n in enumerate(self.SIZES * 3, 1):
                payload = rng.randbytes(n)
                pieces = rec.frame(seq, rec.KIND_ENTRIES, payload, first=seq, last=seq)
                f.write(b"".join(pieces))
                out.append((off, payload))
                off += sum(map(len, pieces))
        return out

    def test_the_record_checksum_is_zlibs_crc32(self):
        """Files written with zlib's crc32 (and read by any tool that knows
        it) check the same: every length around the folding's 16- and
        64-byte steps and the native threshold, any starting value, bytes,
        bytearray and memoryview alike."""
        import random
        import zlib
        rng = random.Random(3)
        lengths = [*range(0, 200), *range(4000, 4200), 1 << 20, (1 << 20) + 13, rng.randrange(5000, 300_000)]
        for n in lengths:
            data = rng.randbytes(n)
            for start in (0, 0xFFFFFFFF, rng.randrange(1 << 32)):
                want = zlib.crc32(data, start)
                assert rec.crc32(data, start) == want, (n, start)
            assert rec.crc32(bytearray(data)) == rec.crc32(memoryview(data)[:]) == zlib.crc32(data), n
        view = memoryview(rng.randbytes(100_000))[7:90_007]          # not at the buffer's start
        assert rec.crc32(view) == zlib.crc32(bytes(view))

    def test_every_record_is_read_back_as_written(self, tmp_path):
        path = tmp_path / "log-1.apl"
        written = self.write(path)
        s = rec.scan(path, rec.LOG_MAGIC)
        assert s.stop == "end" and s.stop_offset == path.stat().st_size
        assert [(r.offset, r.payload) for r in s.records] == written
        assert [r.seq for r in s.records] == list(range(1, len(written) + 1))

    def test_a_file_read_leaves_only_its_last_pages_in_the_page_cache(self, tmp_path):
        """A file is read once: behind the reader its pages leave the page
        cache (a cold start of a 1 GiB checkpoint keeps ~8 MiB of it cached,
        and reads into the pages it gave back), whole records all the same."""
        if not page_cache_kept(tmp_path):
            pytest.skip("the temporary directory is on tmpfs: no page cache to drop")
        import random
        rng = random.Random(2)
        path = tmp_path / "log-1.apl"
        payloads = [rng.randbytes(rng.choice((300, 70_000, 1 << 20))) for _ in range(90)]
        with open(path, "wb") as f:
            f.write(rec.LOG_MAGIC)
            for seq, payload in enumerate(payloads, 1):
                f.write(b"".join(rec.frame(seq, rec.KIND_ENTRIES, payload, first=seq, last=seq)))
            f.flush()
            os.fsync(f.fileno())
        size = path.stat().st_size
        assert size > 4 * rec.DROP_BEHIND and cached_bytes(path) > size // 2   # written: in the cache
        s = rec.scan(path, rec.LOG_MAGIC)
        assert s.stop == "end" and [r.payload for r in s.records] == payloads
        assert cached_bytes(path) <= rec.DROP_BEHIND + rec.WINDOW + (1 << 20)

    def test_a_read_ahead_that_reuses_its_buffers_gives_every_record_as_written(self, tmp_path):
        """ReadAhead(reuse=True), as a cold start reads: a large payload is a
        read-only view of one of a few buffers, read into again once the
        consumer asks for the next record; every payload is the one written
        while the consumer holds it, the buffers are few, a view kept past
        that (a bug) keeps its buffer out of the pool, and a consumer that
        stops early leaves no thread behind."""
        import random
        rng = random.Random(4)
        path = tmp_path / "log-1.apl"
        payloads = [rng.randbytes(rng.choice((50, 300_000, 1 << 20, 5 << 20))) for _ in range(60)]
        with open(path, "wb") as f:
            f.write(rec.LOG_MAGIC)
            for seq, payload in enumerate(payloads, 1):
                f.write(b"".join(rec.frame(seq, rec.KIND_ENTRIES, payload, first=seq, last=seq)))
        got, buffers, kept = [], [], None      # (the buffers themselves: ids of freed ones recur)
        ahead = rec.ReadAhead(path, rec.LOG_MAGIC, reuse=True)
        for r in ahead:
            got.append(bytes(r.payload))
            if type(r.payload) is memoryview:
                assert r.payload.readonly
                if not any(b is r.payload.obj for b in buffers):
                    buffers.append(r.payload.obj)
                if kept is None and len(r.payload) > (1 << 20):
                    kept = memoryview(r.payload)      # held on to: its buffer must not be read into again
                    held = bytes(kept)
        assert got == payloads and ahead.result.stop == "end"
        assert 0 < len(buffers) <= 4 + 2 + 1 and bytes(kept) == held
        early = rec.ReadAhead(path, rec.LOG_MAGIC, reuse=True)
        for i, r in enumerate(early):
            if i == 3:
                break
        early.close()
        assert not early._thread.is_alive()

    def test_a_cut_or_a_flipped_byte_anywhere_stops_at_the_last_good_record(self, tmp_path):
        import random
        path = tmp_path / "log-1.apl"
        written = self.write(path)
        whole = path.read_bytes()
        ends = [off for off, _ in written[1:]] + [len(whole)]
        rng = random.Random(5)
        edges = [k * rec.WINDOW + d for k in range(1, len(whole) // rec.WINDOW + 1) for d in (-57, -1, 0, 1, 56)]
        for at in edges + [rng.randrange(rec.MAGIC_LEN, len(whole)) for _ in range(40)]:
            good = sum(1 for e in ends if e <= at)       # records wholly before the damage
            path.write_bytes(whole[:at])
            s = rec.scan(path, rec.LOG_MAGIC)
            assert [(r.offset, r.payload) for r in s.records] == written[:good], at
            assert s.stop == ("end" if at in ends or at == rec.MAGIC_LEN else "torn")
            hit = next(i for i, e in enumerate(ends) if at < e)   # the record holding the byte
            if at >= written[hit][0] + rec.HDR.size + len(written[hit][1]):
                continue           # its padding: no part of the record, nothing to detect
            flipped = bytearray(whole)
            flipped[at] ^= 0x40
            path.write_bytes(bytes(flipped))
            s = rec.scan(path, rec.LOG_MAGIC)
            # a damaged length can reach past the end of the file: then it reads as torn
            assert len(s.records) == hit and s.stop in ("corrupt", "torn"), (at, hit, s.stop, s.problem)
            assert s.stop_offset == written[hit][0]


class TestDamagedFiles:
    """A torn or corrupt tail is cut at the last whole record; a corrupt
    checkpoint is passed over for the previous one with its logs."""

    def test_a_log_cut_at_any_offset_loads_whole_transactions_only(self, make_appliance, tmp_path):
        """The log cut at random byte offsets (a torn write): each cold start
        loads the transactions whose records are whole — every transfer in
        them moved its money exactly once, none in part — and says what it cut."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d, log_sync="off")).start()
        db = app.connect()
        acc = db.table("accounts")
        for i in range(20):
            acc[i] = {"branch": "b", "balance": 1000}
        for k in range(1, 120):
            with db.transaction(program="transfer") as tx:
                a, b = k % 20, (k * 7 + 3) % 20
                if a == b:
                    b = (b + 1) % 20
                ra = tx.get("accounts", a, for_update=True)
                rb = tx.get("accounts", b, for_update=True)
                tx.update("accounts", a, {"balance": ra["balance"] - k})
                tx.update("accounts", b, {"balance": rb["balance"] + k})
                tx.insert("transfers", {"id": k, "src": a, "dst": b, "amount": k})
        db.close()
        app.controller.stop()
        unlink_all(app.name, app.cfg.storage.segments)
        logf = d / log_files(d)[-1]         # log_sync "off": one file, no file made in advance
        whole = logf.read_bytes()
        import random
        rng = random.Random(13)
        offsets = sorted(rng.sample(range(200, len(whole) - 1), 7)) + [len(whole) - 3]
        for k, off in enumerate(offsets):
            logf.write_bytes(whole[:off] + (os.urandom(20) if off % 2 else b""))
            if k == 0:    # the controller's own cold start; the other offsets load in-process (the same code)
                app.controller.start()
                c = app.connect()
                cut = c.status()["recovery"]["cold_start"]["log_cut"]
                tr = {r["id"]: r for r in c.table("transfers").range()}
                bal = {r["id"]: r["balance"] for r in c.table("accounts").range()}
                c.close()
                app.controller.kill()
            else:
                cut, tr, bal = self._cold_start_in_process(app)
            unlink_all(app.name, app.cfg.storage.segments)
            assert cut is not None and cut["file"] == logf.name
            assert sorted(tr) == list(range(1, len(tr) + 1))        # a prefix of the transfers
            expect = {i: 1000 for i in range(20)}
            for r in tr.values():
                expect[r["src"]] -= r["amount"]
                expect[r["dst"]] += r["amount"]
            assert bal == expect and sum(bal.values()) == 20000
        assert logf.stat().st_size <= offsets[-1]                  # the last cut was truncated off

    @staticmethod
    def _cold_start_in_process(app):
        """durability.coldstart as the controller runs it, in this process:
        (what was cut, transfers, balances) read back from the segments it made."""
        import structlog
        from appliance.durability.coldstart import cold_start
        from appliance.durability.logfiles import LogDir
        files = LogDir(app.cfg.durability_dir, structlog.get_logger())
        wr, facts = cold_start(app.cfg, structlog.get_logger(), files)
        try:
            r = Reader(wr.att)      # read as Table.range reads
            schema = Schema(app.cfg)
            tr = {x["id"]: x for x in r.scan_values(native_reader(r, schema.table("transfers")), None, None)}
            bal = {x["id"]: x["balance"]
                   for x in r.scan_values(native_reader(r, schema.table("accounts")), None, None)}
        finally:
            wr.close()
        return facts["cold_start"]["log_cut"], tr, bal

    def test_a_corrupt_checkpoint_is_passed_over_for_the_previous_one(self, make_appliance, tmp_path):
        """Bytes flipped in the newest checkpoint: the cold start detects it by
        checksum (log checkpoint_unusable), loads the previous checkpoint and
        the log after it, and ends in the same state."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d, keep_checkpoints=2)).start()
        db = app.connect()
        from appliance.cli.durability import checkpoint
        fill(db, 300, batch=50)
        checkpoint(app.cfg)
        fill(db, 300, 300, batch=50)
        checkpoint(app.cfg)
        fill(db, 20, 600)
        before = block_sums(app.name)
        db.close()
        power_cut(app)
        old, new = sorted(d.glob("checkpoint-*.apl"))
        data = bytearray(new.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
        new.write_bytes(bytes(data))
        app.controller.start()
        assert block_sums(app.name) == before
        cold = app.connect().status()["recovery"]["cold_start"]
        assert cold["checkpoint"] == old.name
        assert [s["file"] for s in cold["checkpoints_skipped"]] == [new.name]
        assert "checksum" in cold["checkpoints_skipped"][0]["reason"]
        assert any(e.get("event") == "checkpoint_unusable" for e in app.controller.events())

    def test_a_batch_larger_than_the_ring_is_a_logged_gap_closed_by_a_checkpoint(self, make_appliance, tmp_path):
        """A batch whose entries overwrite the change-log ring before they are
        copied out (storage.log_size of 1 MiB, a 10,000-record load): the
        files get a GAP (log_gap), a checkpoint is taken at once, and a cold
        start after it has every record."""
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, log_size="1MiB", extra=durability(d)).start()
        db = app.connect()
        fill(db, 10_000, batch=10_000)
        wait_checkpoint(db)
        assert any(e.get("event") == "log_gap" for e in app.controller.events())
        fill(db, 5, 10_000)
        db.close()
        power_cut(app)
        app.controller.start()
        c = app.connect()
        assert len(c.table("accounts")) == 10_005 and c.table("accounts")[10_004]["balance"] == 11_004
        c.close()

    def test_durability_added_to_an_appliance_with_data(self, make_appliance, tmp_path):
        """[durability] added to an appliance that holds data: a checkpoint is
        taken at its start (checkpoint_needed), after which a cold start has
        everything. Without that checkpoint the log alone cannot rebuild the
        data from before it: the cold start refuses (exit 74) and loads nothing."""
        app = make_appliance(tables=TABLES).start()
        db = app.connect()
        fill(db, 100, batch=50)
        db.close()
        assert app.controller.stop() == 0
        d = tmp_path / "files"
        app.config.write_text(app.config.read_text().replace("[tables.accounts]",
                                                              durability(d) + "\n[tables.accounts]", 1))
        app.controller.start()
        db = app.connect()
        wait_checkpoint(db)
        assert any(e.get("event") == "checkpoint_needed" for e in app.controller.events())
        fill(db, 5, 100)
        before = block_sums(app.name)
        db.close()
        power_cut(app)
        app.controller.start()
        assert block_sums(app.name) == before
        power_cut(app)
        for p in d.glob("checkpoint-*.apl"):
            p.unlink()
        app.controller.start(wait=False)
        assert app.controller.proc.wait(30) == errors.EXIT_IOERR
        assert "no checkpoint holds the serials before it" in app.controller.log()

    def test_files_of_another_appliance_are_refused(self, make_appliance, tmp_path):
        """A durability dir made by another appliance: the controller refuses
        to start (exit 74) naming both, and loads nothing."""
        d = tmp_path / "files"
        a = make_appliance(tables=TABLES, extra=durability(d)).start()
        fill(a.connect(), 5)
        power_cut(a)
        b = make_appliance(tables=TABLES, extra=durability(d))
        b.controller.start(wait=False)
        assert b.controller.proc.wait(30) == errors.EXIT_IOERR
        assert "belongs to appliance" in b.controller.log()


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 512 KiB mounted for the test (unmounted after it): a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class TestFullDisk:
    def test_commits_fail_typed_while_the_disk_is_full_and_go_on_when_space_returns(self, make_appliance,
                                                                                     small_disk):
        """The log's disk fills up: commits fail with DiskFullError (the one in
        flight says it is applied in memory but not durable; later ones that
        they changed nothing), status says why; once space returns the log is
        written and commits go on; after a power cut every acknowledged commit
        is there."""
        app = make_appliance(tables=TABLES, extra=durability(small_disk / "files")).start()
        db = app.connect()
        t = db.table("accounts")
        acked, failures = [], []
        i = 0
        while len(failures) < 3:
            try:
                t[i] = {"branch": "x" * 200, "balance": i}
                acked.append(i)
            except errors.DiskFullError as e:
                failures.append((i, e))
            i += 1
            assert i < 20000, "the disk never filled up"
        first, refused = failures[0], failures[1:]
        assert first[1].details["committed"] is True and "applied in memory" in str(first[1])
        assert "No space left on device" in str(first[1]) and "do not retry it" in str(first[1])
        for k, e in refused:
            assert e.details["committed"] is False and "nothing was changed" in str(e)
            assert k not in t                                       # refused: nothing changed
        st = db.status()["durability"]
        assert st["error"] and "No space" in st["error"]
        assert any(e.get("event") == "durability_write_failed" for e in app.controller.events())
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                t[i] = {"branch": "y", "balance": i}
                acked.append(i)
                break
            except errors.DiskFullError:
                assert time.monotonic() < deadline, "commits did not resume once space returned"
                time.sleep(0.1)
        assert db.status()["durability"]["error"] is None
        db.close()
        power_cut(app)
        app.controller.start()
        c = app.connect()
        t = c.table("accounts")
        assert all(t.get(k) is not None and t[k]["balance"] == k for k in acked)
        assert t[first[0]]["balance"] == first[0]       # the one in flight was written once space returned
        c.close()


def test_a_write_refused_part_way_leaves_no_torn_record_behind_a_later_file(small_disk):
    """The disk takes part of a record and refuses the rest; space returns with a log file made in
    advance, and the writer moves onto it. The bytes the refused write left at the end of the old file
    are cut first: reading the log finds both records and cuts nothing (a torn record there used to end
    the log and set the later file aside, losing what was acknowledged after it)."""
    import structlog
    from appliance.durability import logfiles as lf
    log = structlog.get_logger()
    filler = small_disk / "filler"

    def leave_free(nbytes: int) -> None:
        """Grow or shrink the filler file until the disk has `nbytes` free."""
        st = os.statvfs(small_disk)
        free = st.f_bavail * st.f_frsize
        size = filler.stat().st_size if filler.exists() else 0
        with open(filler, "ab") as f:
            f.truncate(max(0, size + free - nbytes))   # a sparse file would take no space: write it
        fd = os.open(filler, os.O_WRONLY)
        try:
            for off in range(size, max(0, size + free - nbytes), 4096):
                os.pwrite(fd, b"\xff" * 4096, off)
        except OSError:
            pass
        finally:
            os.close(fd)

    def wait(what, cond):
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    d = lf.LogDir(small_disk / "files", log)
    leave_free(16 << 10)                               # room for a file with one record, not for a spare
    w = lf.LogWriter(d, mode="commit", sync_interval=0.01, file_size=64 << 10, header={"appliance": "t"},
                     end=lf.LogEnd(), log=log)
    try:
        s1 = w.submit(rec.KIND_ROLE, b"a" * 100)
        wait("the first record on disk", lambda: w.synced_seq >= s1)
        wait("the spare given up", lambda: w._spare_thread is not None and not w._spare_thread.is_alive())
        assert not (d.path / lf.SPARE).exists() and not w._preallocated
        leave_free(8 << 10)                            # part of the next record
        s2 = w.submit(rec.KIND_ROLE, b"b" * (32 << 10))
        wait("the disk refused", lambda: w.error is not None)
        assert w.synced_seq < s2
        filler.unlink()
        with open(d.path / lf.SPARE, "wb") as f:      # space again, and a file made in advance
            f.write(bytes(64 << 10))
            os.fsync(f.fileno())
        wait("the second record on disk", lambda: w.synced_seq >= s2)
        assert len(d.logs()) == 2
    finally:
        w.stop()
    got = []
    end, cut = d.read(0, got.append)
    assert cut is None and [r.seq for r in got] == [s1, s2] and end.seq == s2


def _log_writer(path):
    import structlog
    from appliance.durability import logfiles as lf
    d = lf.LogDir(path, structlog.get_logger())
    return d, lf.LogWriter(d, mode="commit", sync_interval=0.01, file_size=1 << 20, header={"appliance": "t"},
                           end=lf.LogEnd(), log=structlog.get_logger())


def test_an_idle_writer_lets_the_loop_thread_force_a_group_itself(tmp_path):
    """log_sync = "commit", a fast disk, nothing queued: submit() returns with its record written and
    forced (no hand-over to the writer thread), and the loop's eventfd says so."""
    d, w = _log_writer(tmp_path / "files")
    try:
        for i in range(3):
            w._fsync_ema = 0.0                   # a fast disk, whatever this machine's fsyncs take
            s = w.submit(rec.KIND_ROLE, b"x" * (100 + i))
            assert w.synced_seq == s and w.written_seq == s and w.queued_bytes == 0 and not w._queue
            assert w.drain() >= 1
        assert w.fsyncs >= 3
    finally:
        assert w.stop()
    got = []
    end, cut = d.read(0, got.append)
    assert cut is None and [len(r.payload) for r in got] == [100, 101, 102]


def test_records_queued_behind_a_busy_writer_keep_their_order(tmp_path):
    """While the file is another thread's (the writer's, here held by the test), submit() queues, and so
    does every record after it until the queue is empty again: the log reads back in seq order."""
    d, w = _log_writer(tmp_path / "files")
    try:
        first = w.submit(rec.KIND_ROLE, b"a")
        deadline = time.monotonic() + 10
        while w.synced_seq < first:              # inline, or by the thread on a slow disk
            assert time.monotonic() < deadline, "the first record was not written"
            time.sleep(0.01)
        with w._io:                              # the writer thread busy with the file
            queued = [w.submit(rec.KIND_ROLE, bytes([66 + i])) for i in range(3)]
            assert len(w._queue) == 3 and w.synced_seq == first
        deadline = time.monotonic() + 10
        while w.synced_seq < queued[-1]:
            assert time.monotonic() < deadline, "the queued records were not written"
            time.sleep(0.01)
        w._fsync_ema = 0.0
        last = w.submit(rec.KIND_ROLE, b"z")
        assert w.synced_seq == last
    finally:
        assert w.stop()
    got = []
    d.read(0, got.append)
    assert [r.seq for r in got] == [first, *queued, last] and [r.payload for r in got] == [b"a", b"B", b"C", b"D", b"z"]


TRANSFERS = r"""
import random, sys
import appliance
from appliance import errors
cfg, first_id, acks, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
db = appliance.connect(cfg)
rng = random.Random(first_id)
out = open(acks, "a", buffering=1)
k = first_id
while True:
    a, b = sorted(rng.sample(range(n), 2))
    amount = rng.randint(1, 50)
    try:
        with db.transaction(program="transfer", input={"src": a, "dst": b, "amount": amount}) as tx:
            ra = tx.get("accounts", a, for_update=True)
            rb = tx.get("accounts", b, for_update=True)
            tx.update("accounts", a, {"balance": ra["balance"] - amount})
            tx.update("accounts", b, {"balance": rb["balance"] + amount})
            tx.insert("transfers", {"id": k, "src": a, "dst": b, "amount": amount})
    except errors.TransactionCancelledError:
        continue
    out.write(f"{k}\n")     # acknowledged: the commit returned
    k += 1
"""


class TestPowerCut:
    def test_every_acknowledged_transfer_survives_power_cuts_at_random_moments(self, make_appliance, tmp_path):
        """Bank transfers from three processes with log_sync = "commit"; every
        process SIGKILLed and every segment removed at a random moment (also
        during a checkpoint), several rounds: after each cold start every
        acknowledged transfer is there, each transfer present moved its money
        exactly once (the one in flight wholly or not at all) and the total is
        conserved."""
        import random
        rng = random.Random(int(os.environ.get("APPLIANCE_TEST_SEED", "20261202")))
        n = 40
        d = tmp_path / "files"
        app = make_appliance(tables=TABLES, extra=durability(d, keep_checkpoints=2, log_file_size="1MiB")).start()
        db = app.connect()
        db.load("accounts", [{"id": i, "branch": "b", "balance": 1000} for i in range(n)])
        db.close()
        acked: set[int] = set()
        ack_files = []
        for rnd in range(3):
            procs = []
            for c in range(3):
                path = tmp_path / f"acks-{rnd}-{c}"
                ack_files.append(path)
                procs.append(app.spawn(TRANSFERS, str(rnd * 1_000_000 + c * 100_000 + 1), str(path), str(n)))
            deadline = time.monotonic() + 30
            while not all(p.exists() and len(p.read_bytes().split()) >= 5 for p in ack_files[-3:]):
                assert all(p.poll() is None for p in procs), "a transfer process died"
                assert time.monotonic() < deadline, "the transfer processes made no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.5))    # the moment of the cut
            if rnd in (1, 2):             # a checkpoint, and the cut may land inside it
                from appliance.client.session import Session
                from appliance.wire import messages as m
                s = Session(str(app.cfg.socket_path), app.name, timeout=5)
                s.connect()
                s.call([m.OP_CHECKPOINT], "checkpoint")
                s.close()
                time.sleep(rng.uniform(0.0, 0.3))
            power_cut(app)
            for path in ack_files:
                if path.exists():
                    acked |= {int(x) for x in path.read_text().split()}
            app.controller.start()
            c = app.connect()
            tr = {r["id"]: r for r in c.table("transfers").range()}
            bal = {r["id"]: r["balance"] for r in c.table("accounts").range()}
            cold = c.status()["recovery"]["cold_start"]
            c.close()
            assert acked <= set(tr), f"round {rnd}: acknowledged transfers lost: {sorted(acked - set(tr))[:10]}"
            expect = {i: 1000 for i in range(n)}
            for r in tr.values():
                expect[r["src"]] -= r["amount"]
                expect[r["dst"]] += r["amount"]
            assert bal == expect, f"round {rnd}: balances do not match the transfers present"
            assert sum(bal.values()) == 1000 * n
            assert cold["log_cut"] is None or cold["log_cut"]["set_aside"] == []
        assert len(acked) > 100


class TestDurableSecondary:
    def test_a_secondary_cold_starts_from_its_files_and_catches_up_without_a_copy(self, make_cluster):
        """A synchronous secondary with its own [durability] loses power alone:
        it cold-starts from its files (its first block copy and the stream it
        applied since), its agent asks the primary to resume after that
        durable serial, and the primary streams what it missed from its change
        log — no second block copy — until the two are identical."""
        files = '[durability]\ndir = "files"\ncheckpoint_every = "off"\n'
        c = make_cluster(secondaries=(("sync", ""),), tables=TABLES, secondary_replication=files,
                         primary_replication=files)
        c.start()
        (sec,) = c.secondaries
        db = c.primary.app.connect()
        fill(db, 200, batch=20)
        c.wait_caught_up()
        acked = c.status()["replication"]["secondaries"][sec.name]["acked_serial"]
        before = c.status()["replication"]["secondaries"][sec.name]["copies"]
        sec.agent.kill()
        power_cut(sec.app)
        local = c.primary.app.connect(durability="local")      # the synchronous secondary is down
        fill(local, 50, 200, batch=10)
        sec.app.controller.start()
        st = sec.app.connect().status()
        cold = st["recovery"]["cold_start"]
        assert cold["source_serial"] >= acked and cold["records_replayed"] > 0
        assert st["replication"]["applied_serial"] == cold["source_serial"]
        sec.agent.start()
        c.wait_state(sec.name, "streaming")
        c.wait_caught_up()
        assert c.status()["replication"]["secondaries"][sec.name]["copies"] == before
        rc, res = c.verify()
        assert rc == 0, res
        fill(db, 10, 250)                                      # synchronous again
        assert c.verify()[0] == 0

    def test_after_power_cuts_everywhere_the_primary_streams_what_its_ring_lost_from_its_files(
            self, make_cluster):
        """Both durable; the secondary loses power, the primary goes on alone,
        then the primary loses power too. After both cold start the primary's
        change-log ring begins empty, but its log files still hold what the
        secondary misses: the relay streams it from them (log
        stream_from_log_files) instead of copying the blocks."""
        files = '[durability]\ndir = "files"\ncheckpoint_every = "off"\n'
        c = make_cluster(secondaries=(("sync", ""),), tables=TABLES, secondary_replication=files,
                         primary_replication=files)
        c.start()
        (sec,) = c.secondaries
        prim = c.primary
        fill(prim.app.connect(), 100, batch=20)
        c.wait_caught_up()
        copies = c.status()["replication"]["secondaries"][sec.name]["copies"]
        sec.agent.kill()
        power_cut(sec.app)
        fill(prim.app.connect(durability="local"), 60, 100, batch=5)
        before = block_sums(prim.name)
        prim.agent.kill()
        power_cut(prim.app)
        prim.app.controller.start()
        assert block_sums(prim.name) == before
        sec.app.controller.start()
        sec.agent.start()
        prim.agent.start()
        c.wait_state(sec.name, "streaming")
        c.wait_caught_up()
        st = c.status()["replication"]["secondaries"][sec.name]
        assert copies == 1 and st["copies"] == 0     # the first copy; none by the restarted agent
        assert any(e.get("event") == "stream_from_log_files" for e in prim.agent.events())
        rc, res = c.verify()
        assert rc == 0, res


class TestFullDiskSecondary:
    def test_a_restarted_agent_acknowledges_only_what_is_on_the_secondary_disk(self, make_cluster, small_disk):
        """A synchronous secondary with log_sync = "commit" whose disk fills up
        applies the primary's changes in memory but cannot log them: the
        commit waiting for it is not acknowledged. Its agent restarted then
        tells the primary the serial on its disk, not the one in its memory,
        so the waiting commit stays unacknowledged; once space returns the pair
        catches up and is identical."""
        files = f'[durability]\ndir = "{small_disk / "files"}"\ncheckpoint_every = "off"\n'
        c = make_cluster(secondaries=(("sync", ""),), tables=TABLES, secondary_replication=files)
        c.start()
        (sec,) = c.secondaries
        db = c.primary.app.connect(commit_timeout=1.0)
        t = db.table("accounts")
        i = 0
        while True:
            try:
                t[i] = {"branch": "x" * 200, "balance": i}
            except errors.ApplianceError:
                break
            i += 1
            assert i < 20000, "the secondary's disk never filled up"
        st = sec.app.connect().status()
        durable, applied = st["durability"]["durable_serial"], st["replication"]["applied_serial"]
        assert st["durability"]["error"] and applied > durable, st["durability"]
        prim_events = len([e for e in c.primary.agent.events() if e.get("event") == "secondary_connected"])
        sec.agent.kill()
        sec.agent.start()
        deadline = time.monotonic() + 20
        while len([e for e in c.primary.agent.events() if e.get("event") == "secondary_connected"]) <= prim_events:
            assert time.monotonic() < deadline, "the restarted agent never reached the primary"
            time.sleep(0.05)
        connected = [e for e in c.primary.agent.events() if e.get("event") == "secondary_connected"][-1]
        assert connected["applied"] <= durable, (connected, durable, applied)
        assert c.status()["replication"]["secondaries"][sec.name]["acked_serial"] <= durable
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
        c.wait_caught_up()     # the applies that waited for the disk are answered (none hangs)
        assert sec.app.connect().status()["durability"]["error"] is None
        t[i + 1] = {"branch": "y", "balance": 1}                # synchronous again
        rc, res = c.verify()
        assert rc == 0, res


class TestMetrics:
    def test_the_metrics_endpoint_reports_the_log_files(self, make_appliance, tmp_path):
        """With [durability] and [metrics]: nothing published is missing from disk after a commit
        (log_sync = "commit"), fsyncs happened, the log since the checkpoint grows."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        from conftest import free_port
        port = free_port()
        app = make_appliance(tables=TABLES, extra=durability(tmp_path / "files")
                             + f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
        db = app.connect()
        fill(db, 40)

        def scrape() -> dict:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name.startswith("appliance_durability")}
        deadline = time.monotonic() + 20
        while (m := scrape()).get("appliance_durability_fsyncs_total", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert m["appliance_durability_lag_serials"] == 0 and m["appliance_durability_lag_bytes"] == 0
        assert m["appliance_durability_fsyncs_total"] > 0 and m["appliance_durability_log_bytes_since_checkpoint"] > 0
        db.close()
