"""Durability on disk: the appliance with [durability] against peers that write to disk.

Run from :class:`run.Run` (``--only durability``; see README.md, "Durability"):

* **Durable one-record writes** (``durable-write``): ``t[k] = rec`` from 1
  and 8 processes with ``log_sync = "commit"`` (a commit returns once its log
  is on disk), against Redis with ``appendonly yes``, ``appendfsync always``
  and py-lmdb with ``sync=True`` (both on the same disk).
* **Interval** (``interval-write``): ``log_sync = "interval"`` with
  ``sync_interval = "1s"`` against Redis ``appendfsync everysec``.
* **Checkpoint write rate** (``checkpoint``): ``appliance checkpoint`` of the
  loaded data set (MB/s of checkpoint file, from status), against the disk's
  sequential write rate measured in the same run (4 MiB writes of the same
  number of bytes, then fdatasync).
* **Cold start** (``cold-start``): an appliance of about ``--cold-start-mib``
  of records checkpointed, a tenth of that written again as log after the
  checkpoint, every process killed and the segments removed; the time from
  ``appliance controller`` to its first answer against the time to read the
  same files (both with their pages dropped from the page cache first:
  posix_fadvise DONTNEED on those files only), three rounds, each cold
  start against the read just before it; the round with the median ratio
  is reported.

Every durable file lives in one temporary directory on the disk under /tmp
(:func:`disk_dir`); its file system and device are reported with the rows.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from appliance_system import ApplianceSystem, Node, segment_mib
from peers import LmdbSystem, RedisSystem, _open_lmdb
from systems import Unavailable, remove_tree

DURABILITY = """
[durability]
dir = "{dir}"
log_sync = "{log_sync}"
sync_interval = "{interval}"
checkpoint_every = "off"
keep_checkpoints = 2
"""
CHUNK = 4 << 20
MB = 1e6


def disk_dir(prefix: str) -> Path:
    """A temporary directory on the disk of /tmp (never tmpfs: that would not be a disk)."""
    base = Path(tempfile.gettempdir())
    if filesystem(base)[0] in ("tmpfs", "ramfs"):
        base = Path(os.environ.get("APPLIANCE_BENCH_DISK", "/var/tmp"))
    if filesystem(base)[0] in ("tmpfs", "ramfs"):
        raise Unavailable(f"{base} is {filesystem(base)[0]}: set APPLIANCE_BENCH_DISK to a directory on a disk")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def filesystem(path: Path) -> tuple[str, str, str]:
    """(file system type, device, mount point) of the mount holding `path`."""
    path = Path(path).resolve()
    best = ("?", "?", "/")
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[2]):
                best = (fstype, dev, mnt)
    return best


def disk_note(path: Path) -> str:
    fstype, dev, mnt = filesystem(path)
    return f"durable files on {path.parent} ({fstype} on {dev}, mounted at {mnt})"


def drop_cache(paths) -> None:
    """Drop these files' pages from the page cache (theirs only: other users' stay)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths) -> tuple[int, float]:
    """(bytes, seconds) to read these files sequentially, 4 MiB at a time."""
    buf = bytearray(CHUNK)
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - t0


def disk_write_rate(directory: Path, nbytes: int) -> dict:
    """The disk's sequential write rate: `nbytes` in 4 MiB writes, then fdatasync."""
    path = directory / "sequential-write.tmp"
    block = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        written = 0
        while written < nbytes:
            written += os.write(fd, block)
        os.fdatasync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return {"bytes": written, "seconds": seconds, "mb_s": written / seconds / MB}


# ------------------------------------------------------------------ the systems ----

class DurableAppliance(ApplianceSystem):
    """The appliance with [durability] on disk (log_sync "commit" or "interval")."""

    BENCHES = ()

    def __init__(self, data, log_sync: str = "commit", interval: str = "1s") -> None:
        super().__init__(data)
        self.log_sync, self.interval = log_sync, interval
        self.name = f"appliance (log_sync {log_sync}" + (f" {interval})" if log_sync == "interval" else ")")
        self.SPECIAL = {"durable-write" if log_sync == "commit" else "interval-write": (self.name, "write")}

    def _node(self, suffix: str, **kw) -> Node:
        self.disk = disk_dir("bench-durable-")
        kw["replication"] = DURABILITY.format(dir=self.disk / "files", log_sync=self.log_sync, interval=self.interval)
        return super()._node(suffix, **kw)

    def start(self) -> None:
        self.disk = None
        super().start()
        self.notes = [*self.notes, f"appliance [durability]: log_sync = \"{self.log_sync}\""
                      + (f", sync_interval = \"{self.interval}\"" if self.log_sync == "interval" else "")
                      + "; " + disk_note(self.disk)]

    @property
    def files_dir(self) -> Path:
        return self.disk / "files"

    def checkpoint(self) -> dict:
        """`appliance checkpoint` through its Python face; what status says of it."""
        from appliance.cli.durability import checkpoint
        from appliance.config import load
        return checkpoint(load(self.node.config))

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            remove_tree(getattr(self, "disk", None))


class DurableRedis(RedisSystem):
    """redis-server with the AOF on disk: appendfsync always (or everysec)."""

    BENCHES = ()

    def __init__(self, data, fsync: str = "always") -> None:
        super().__init__(data)
        self.fsync = fsync
        self.name = f"redis (appendfsync {fsync})"
        self.ARGS = ["--save", "", "--appendonly", "yes", "--appendfsync", fsync, "--bind", "127.0.0.1",
                     "--daemonize", "no"]
        self.SPECIAL = {"durable-write" if fsync == "always" else "interval-write": (self.name, "write")}

    def start(self) -> None:
        import redis
        self.dir = disk_dir("bench-redis-aof-")
        self.proc, self.port = self._server("redis")
        self.r = _connect_redis(self.port)
        server = self.r.info("server")
        self.info = {"redis-server": server.get("redis_version"), "redis-py": redis.__version__}
        self.notes = [f"redis (appendfsync {self.fsync}): --appendonly yes --appendfsync {self.fsync} --save \"\", "
                      f"its AOF in {self.dir}; " + disk_note(self.dir)]


def _connect_redis(port: int):
    from peers import _connect_redis as connect
    return connect(port)


class DurableLmdb(LmdbSystem):
    """py-lmdb on disk with sync=True, metasync=True: every write transaction is fsynced."""

    name = "lmdb (sync=True)"
    BENCHES = ()
    SPECIAL = {"durable-write": ("lmdb (sync=True)", "write")}

    def start(self) -> None:
        import lmdb
        import peers
        self.path = disk_dir("bench-lmdb-sync-")
        self.map_size = max(1 << 30, self.data.n * 2048)
        peers.LMDB_FLAGS.update(sync=True, metasync=True)   # the workers open it the same way (spawn re-imports)
        self.env, self.main, self.branch = _open_lmdb(str(self.path), self.map_size)
        self.info = {"py-lmdb": lmdb.__version__}
        self.notes = [f"lmdb (sync=True): sync=True, metasync=True, map_size {self.map_size >> 20} MiB; "
                      + disk_note(self.path)]

    def client_spec(self):
        from functools import partial
        return partial(SyncLmdbClient, str(self.path), self.map_size, self.data.range_len)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            import peers
            peers.LMDB_FLAGS.update(sync=False, metasync=False)


class SyncLmdbClient:
    """An lmdb client whose environment syncs every commit (in the worker process)."""

    def __new__(cls, path, map_size, range_len):
        import peers
        peers.LMDB_FLAGS.update(sync=True, metasync=True)
        return peers.LmdbClient(path, map_size, range_len)


# ------------------------------------------------------------------ cold start ----

def big_records(total_bytes: int, note_len: int = 900):
    """Records of about 1 KiB until `total_bytes` of them (chunks of 10,000)."""
    rng = random.Random(7)
    n = max(1, total_bytes // (note_len + 60))
    chunk = []
    for i in range(n):
        chunk.append({"id": i, "branch": "br%05d" % (i % 10_000), "balance": rng.randrange(10**9),
                      "note": ("%09d" % i) * (note_len // 9)})
        if len(chunk) == 10_000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def used_files(directory: Path) -> list[Path]:
    """What a cold start reads: the newest checkpoint and the log files that
    hold records after it (older log files stay for the older checkpoints)."""
    import structlog
    from appliance.durability.logfiles import LogDir
    d = LogDir(directory, structlog.get_logger(), readonly=True)
    (seq, newest), = d.checkpoints()[-1:]
    logs = d.logs()
    later = [p for i, (first, p) in enumerate(logs) if i + 1 == len(logs) or logs[i + 1][0] > seq + 1]
    return [newest, *later]


def cold_start(data, target_bytes: int, rounds: int = 3) -> dict:
    """Load ~target_bytes of records, checkpoint, write a tenth of that again as
    log; then `rounds` times: kill everything, remove the segments, time
    reading the files (cold cache), then the time from `appliance controller`
    to its first answer (cold cache again). The disk's speed moves between
    reads on a VM, so each cold start is set against the read just before
    it, and the round with the median ratio is the one reported (every
    round's figures are in "rounds")."""
    import appliance
    from appliance.store.segment import unlink_all
    from systems import stop_process
    class Sized:          # segments sized for ~1 KiB records (segment_mib counts ~512 B a record)
        n = max(data.n, target_bytes // 1300)   # 4 segments of at least 1.5 x the records
    system = DurableAppliance(Sized, "interval", "1s")
    try:
        system.start()
        db = system.db
        loaded = 0
        for chunk in big_records(target_bytes):
            db.load("accounts", chunk, batch=len(chunk))
            loaded += len(chunk)
        cp = system.checkpoint()
        again = 0
        for chunk in big_records(target_bytes // 10):
            db.load("accounts", [dict(r, id=r["id"] + loaded) for r in chunk], batch=len(chunk))
            again += len(chunk)
        st = system.node.status()
        block_bytes = st["memory"]["bytes_used"]
        node = system.node
        system.db.close()
        system.db = None
        out = []
        for _ in range(rounds):
            node._session.close()
            node._session = None
            node.proc.kill()
            node.proc.wait()
            unlink_all(node.name)
            files = used_files(system.files_dir)
            drop_cache(files)
            nbytes, read_s = read_files(files)
            drop_cache(files)
            t0 = time.perf_counter()
            node.start()                       # returns once the controller answers
            start_s = time.perf_counter() - t0
            cold = node.status()["recovery"]["cold_start"]
            out.append({"file_bytes": nbytes, "read_s": read_s, "cold_start_s": start_s, "loaded_s": cold["seconds"],
                        "records_replayed": cold["records_replayed"], "ratio": start_s / read_s,
                        "phases": cold["phases"]})
        mid = sorted(out, key=lambda r: r["ratio"])[len(out) // 2]
        return {"records": loaded + again, "block_bytes": block_bytes, "checkpoint_bytes": cp["bytes"],
                **{k: v for k, v in mid.items() if k != "ratio"}, "read_mb_s": mid["file_bytes"] / mid["read_s"] / MB,
                "rounds": [{k: v if k == "phases" else round(v, 3) for k, v in r.items()} for r in out],
                "disk": disk_note(system.disk)}
    finally:
        system.stop()
