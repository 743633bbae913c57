"""The peers: py-lmdb and Redis, set up as in-memory like-for-like systems.

Both store each record as msgpack and every read decodes it with
``msgpack.unpackb``, so they hand back the same dicts the appliance does
(which stores its own record format and decodes it in C).
"""
from __future__ import annotations

import shutil
import struct
import time
from contextlib import contextmanager
from functools import partial
from itertools import islice

import msgpack

from data import next_write
from systems import (Client, System, Unavailable, free_port, log_tail, ram_tempdir,
                     remove_tree, spawn_server, stop_process)

packb, unpackb = msgpack.packb, msgpack.unpackb
PK = struct.Struct(">Q").pack      # lmdb keys: 8-byte big-endian, so key order = id order

# ---------------------------------------------------------------- lmdb ----

LMDB_FLAGS = dict(max_dbs=2, sync=False, metasync=False, max_readers=256)


def _open_lmdb(path: str, map_size: int):
    import lmdb
    env = lmdb.open(path, map_size=map_size, **LMDB_FLAGS)
    main = env.open_db(b"accounts")
    branch = env.open_db(b"branch", dupsort=True)
    return env, main, branch


class LmdbClient(Client):
    def __init__(self, path: str, map_size: int, range_len: int) -> None:
        self.env, self.main, self.branch = _open_lmdb(path, map_size)
        self.range_len = range_len

    def get(self, k):
        """One read transaction per get: each call sees the latest commit."""
        with self.env.begin(db=self.main, buffers=True) as txn:
            return unpackb(txn.get(PK(k)))

    @contextmanager
    def _long_txn(self):
        with self.env.begin(db=self.main, buffers=True) as txn:
            get = txn.get
            yield lambda k: unpackb(get(PK(k)))

    def session(self, op: str):
        if op == "get_long":   # every get of the run in one read transaction
            return self._long_txn()
        return super().session(op)

    def find(self, branch):
        with self.env.begin(db=self.main, buffers=True) as txn:
            cur = txn.cursor(db=self.branch)
            if not cur.set_key(branch.encode()):
                return []
            get = txn.get
            return [unpackb(get(pk)) for pk in cur.iternext_dup(keys=False)]

    def range(self, lo):
        with self.env.begin(db=self.main, buffers=True) as txn:
            cur = txn.cursor()
            cur.set_range(PK(lo))
            return [unpackb(v) for v in islice(cur.iternext(keys=False), self.range_len)]

    def write(self, arg):
        k, rec = next_write(arg)
        with self.env.begin(write=True, db=self.main) as txn:
            txn.put(PK(k), packb(rec))

    def transfer(self, arg):
        """One write transaction: two gets, two puts (lmdb serializes writers: no conflict to retry)."""
        src, dst, amount = arg
        ks, kd = PK(src), PK(dst)
        with self.env.begin(write=True, db=self.main) as txn:
            a, b = unpackb(txn.get(ks)), unpackb(txn.get(kd))
            a["balance"] -= amount
            b["balance"] += amount
            txn.put(ks, packb(a))
            txn.put(kd, packb(b))

    def close(self) -> None:
        self.env.close()


class LmdbSystem(System):
    name = "lmdb"
    SPECIAL = {"get": ("lmdb (txn per get)", "get"), "snapshot-get": ("lmdb (one long txn)", "get_long")}

    def start(self) -> None:
        import lmdb
        self.path = ram_tempdir("bench-lmdb-")
        self.map_size = max(1 << 30, self.data.n * 2048)
        self.env, self.main, self.branch = _open_lmdb(str(self.path), self.map_size)
        self.info = {"py-lmdb": lmdb.__version__, "lmdb": ".".join(map(str, lmdb.version()))}
        self.notes = [
            f"lmdb: environment in {self.path.parent} (tmpfs, RAM-backed), sync=False, "
            f"metasync=False, map_size={self.map_size >> 20} MiB: an in-memory like-for-like",
            "lmdb: reads use buffers=True (zero-copy values decoded inside the transaction); "
            "writers are serialized by lmdb's own lock",
        ]

    def load_chunk(self, records: list[dict]) -> None:
        main, branch = self.main, self.branch
        with self.env.begin(write=True) as txn:
            for r in records:
                k = PK(r["id"])
                txn.put(k, packb(r), db=main)
                txn.put(r["branch"].encode(), k, db=branch)

    def client_spec(self):
        return partial(LmdbClient, str(self.path), self.map_size, self.data.range_len)

    def stop(self) -> None:
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None
        remove_tree(getattr(self, "path", None))


# --------------------------------------------------------------- Redis ----

REDIS_MISSING = "redis-server not found: apt-get install redis-server to include the Redis rows"


def _connect_redis(port: int):
    import redis
    return redis.Redis(host="127.0.0.1", port=port)


class RedisClient(Client):
    def __init__(self, port: int, range_len: int) -> None:
        self.r = _connect_redis(port)
        self.range_len = range_len

    def get(self, k):
        return unpackb(self.r.get(b"r:%d" % k))

    def _records(self, ids):
        if not ids:
            return []
        return [unpackb(v) for v in self.r.mget([b"r:" + i for i in ids])]

    def find(self, branch):
        return self._records(self.r.smembers("b:" + branch))

    def range(self, lo):
        return self._records(self.r.zrangebyscore("ids", lo, "(%d" % (lo + self.range_len)))

    def write(self, arg):
        k, rec = next_write(arg)
        self.r.set(b"r:%d" % k, packb(rec))

    def transfer(self, arg):
        """WATCH both, GET, GET, then MULTI/SET/SET/EXEC in one send (four round trips);
        redis-py's transaction() runs it again when EXEC aborts (a watched key changed),
        so each call is one transfer done."""
        src, dst, amount = arg
        ks, kd = b"r:%d" % src, b"r:%d" % dst

        def move(pipe) -> None:
            a, b = unpackb(pipe.get(ks)), unpackb(pipe.get(kd))
            a["balance"] -= amount
            b["balance"] += amount
            pipe.multi()
            pipe.set(ks, packb(a))
            pipe.set(kd, packb(b))

        self.r.transaction(move, ks, kd)

    def close(self) -> None:
        self.r.close()


class RedisSystem(System):
    name = "redis"
    ARGS = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--daemonize", "no"]

    def start(self) -> None:
        import redis
        self.dir = ram_tempdir("bench-redis-")
        self.proc, self.port = self._server("redis")
        self.r = _connect_redis(self.port)
        server = self.r.info("server")
        self.info = {"redis-server": server.get("redis_version"), "redis-py": redis.__version__,
                     "redis-py hiredis parser": bool(getattr(redis.utils, "HIREDIS_AVAILABLE", False))}
        self.notes = [
            f"redis: redis-server {server.get('redis_version')} started by the benchmark on "
            f"127.0.0.1:{self.port} with --save \"\" --appendonly no (no persistence: an in-memory "
            "like-for-like); one connection per client process over loopback TCP",
            "redis: record = msgpack under r:<id>; alternate key = SET b:<branch> of ids; "
            "range = ZRANGEBYSCORE on sorted set 'ids' then MGET",
        ]

    def _server(self, what: str, *args: str):
        """A redis-server on a free loopback port, in its own directory: (process, port)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise Unavailable(REDIS_MISSING)
        directory = self.dir / what
        directory.mkdir()
        log = directory / "redis.log"
        for _attempt in range(3):      # a free port can be taken between probe and bind
            port = free_port()
            proc = spawn_server([exe, "--port", str(port), "--dir", str(directory), *self.ARGS, *args], log)
            if self._wait_ready(proc, port):
                return proc, port
            stop_process(proc)
        raise Unavailable(f"redis-server ({what}) did not start:\n" + log_tail(log))

    @staticmethod
    def _wait_ready(proc, port: int, timeout: float = 10.0) -> bool:
        import redis
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                with _connect_redis(port) as r:
                    if r.ping():
                        return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        return False

    def load_chunk(self, records: list[dict]) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.mset({b"r:%d" % r["id"]: packb(r) for r in records})
        for r in records:
            pipe.sadd("b:" + r["branch"], r["id"])
        pipe.zadd("ids", {r["id"]: r["id"] for r in records})
        pipe.execute()

    def client_spec(self):
        return partial(RedisClient, self.port, self.data.range_len)

    def stop(self) -> None:
        r = getattr(self, "r", None)
        if r is not None:
            r.close()
        stop_process(getattr(self, "proc", None))
        remove_tree(getattr(self, "dir", None))


# ------------------------------------------------- Redis with a replica ----

class RedisReplicaClient(RedisClient):
    def __init__(self, port: int, range_len: int) -> None:
        super().__init__(port, range_len)
        self.pipe = self.r.pipeline(transaction=False)

    def write_wait(self, arg):
        """SET, then WAIT 1 0: two round trips, as a plain client does."""
        self.write(arg)
        if self.r.wait(1, 0) < 1:
            raise RuntimeError("WAIT 1 0 returned before a replica acknowledged")

    def write_wait_pipelined(self, arg):
        """SET and WAIT 1 0 sent together: one round trip."""
        k, rec = next_write(arg)
        self.pipe.set(b"r:%d" % k, packb(rec))
        self.pipe.wait(1, 0)
        if self.pipe.execute()[1] < 1:
            raise RuntimeError("WAIT 1 0 returned before a replica acknowledged")


class RedisReplicaSystem(RedisSystem):
    """A Redis primary with one replica (``--replicaof``) on loopback, neither persistent."""

    name = "redis+replica"
    BENCHES = ()
    SPECIAL = {
        "sync-write": [("redis (SET, WAIT 1 0)", "write_wait"),
                       ("redis (SET+WAIT 1 0 pipelined)", "write_wait_pipelined")],
        "async-write": ("redis (SET, replica attached)", "write"),
    }

    def start(self) -> None:
        super().start()
        self.replica_proc, self.replica_port = self._server("replica", "--replicaof", "127.0.0.1", str(self.port))
        self.wait_synced()
        self.notes = [
            f"redis+replica: a second redis-server on 127.0.0.1:{self.replica_port} with --replicaof the "
            "first, same no-persistence settings (diskless sync); the rows start once the replica's "
            "master_link_status is up and its offset equals the primary's",
        ]

    def wait_synced(self, timeout: float = 120.0) -> None:
        """Until the replica's link is up and it has processed every byte of the stream."""
        with _connect_redis(self.replica_port) as replica:
            deadline = time.monotonic() + timeout
            while True:
                mine, theirs = self.r.info("replication"), replica.info("replication")
                if (theirs.get("master_link_status") == "up"
                        and theirs.get("master_repl_offset") == mine.get("master_repl_offset")):
                    return
                if time.monotonic() > deadline:
                    raise Unavailable(f"the Redis replica is not in sync after {timeout:.0f} s: "
                                      f"{theirs.get('master_link_status')}\n"
                                      + log_tail(self.dir / "replica" / "redis.log"))
                time.sleep(0.05)

    def client_spec(self):
        return partial(RedisReplicaClient, self.port, self.data.range_len)

    def stop(self) -> None:
        try:
            stop_process(getattr(self, "replica_proc", None))
        finally:
            super().stop()
