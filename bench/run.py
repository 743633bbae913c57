#!/usr/bin/env python3
"""Benchmark the appliance against py-lmdb and Redis on the same data, in one run.

    python bench/run.py [--quick] [--json PATH] [--only NAME,...] [--records N]

NAME is a system (lmdb, redis, appliance) or a benchmark (load, get,
snapshot-get, find, range, write, tx-write, transfer, transfer-hot, order, growth,
sync-write, sync-cpu, sync-2, async-write, copy, catch-up, durable-write,
interval-write, checkpoint, cold-start; "replication" = sync-write..catch-up,
"durability" = the last four; promote: promote-to-first-write on --promote-mib of
blocks, both kinds of secondary; device: a device's rebuild rate and commits during
an online replace, on --device-mib of blocks); see README.md.
"growth" (10x the records in a fresh appliance) runs in the full benchmark,
or with --quick only when named.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:       # the appliance package, if not installed
    sys.path.append(str(HERE.parent))

from data import HOT_ACCOUNTS, LOAD_CHUNK, Dataset                # noqa: E402
from harness import Timing, measure_load, run_workers, verify    # noqa: E402
from report import Printer, measurement_row, meta_row, rate_row, ratio_rows, write_json  # noqa: E402
from systems import Unavailable                                   # noqa: E402

TCP_SYSTEM = "python sockets, 2 processes"
WRITERS_NOTE = "4 processes"
LZ4_SYSTEM = "lz4.block.compress, 1 core"
READ_LATENCY = "1 in 10 ops timed individually"
EVERY_LATENCY = "every op timed"
LOAD_LATENCY = "per record: each 10,000-record batch timed, ÷ 10,000"


@dataclass(frozen=True)
class Bench:
    id: str
    title: str
    kind: str                 # argument kind, see data.make_args
    procs: tuple[int, ...]
    step: int                 # time 1 op in `step`
    runs: str = ""            # the benchmark whose forms (systems' variants) it runs: its own id by default

    @property
    def latency(self) -> str:
        return READ_LATENCY if self.step > 1 else EVERY_LATENCY

    def seed(self, procs: int) -> int:
        """The same arguments for every system; other ones for each row (process
        count) of a benchmark, so that no row rewrites what an earlier one wrote."""
        return zlib.crc32(self.id.encode()) % 100_000 * 100 + procs


def benches(range_len: int) -> list[Bench]:
    # Reads before writes: the answers are checked against the loaded data.
    return [
        Bench("get", "get by primary key", "key", (1, 2), 10),
        Bench("snapshot-get", "get in a snapshot / one read txn", "key", (1, 2), 10),
        Bench("find", "find by alternate key (~10 records)", "branch", (1,), 10),
        Bench("range", f"range of {range_len:,} records", "range", (1,), 1),
        Bench("write", "one-record write transaction", "record", (1, 8), 1),
        Bench("tx-write", "explicit transaction (1 update)", "record", (1, 8), 1),
        Bench("transfer", "bank transfer (2 reads for update, 2 updates)", "transfer", (1, 8), 1),
        Bench("transfer-hot", f"bank transfer between {HOT_ACCOUNTS} hot accounts", "transfer-hot", (8,), 1,
              runs="transfer"),
    ]


GET = Bench("get", "get by primary key", "key", (1,), 10)
SYNC = [Bench("sync-write", "synchronous one-record write", "record", (1, 8), 1),
        Bench("sync-tx-write", "synchronous explicit transaction (1 update)", "record", (8,), 1)]
ASYNC = [Bench("async-write", "asynchronous one-record write", "record", (1, 8), 1)]
CATCH_UP = Bench("catch-up-write", "writes while the secondary is stopped", "record", (4,), 1)
DURABLE = [Bench("durable-write", "durable one-record write (on disk at commit)", "record", (1, 8), 1)]
DURING_CHECKPOINT = Bench("durable-write-ckpt", "durable one-record write, checkpoints running", "record", (8,), 1)
INTERVAL = [Bench("interval-write", "one-record write, disk forced every second", "record", (1, 8), 1)]
SINGLE_IDS = ["load", "get", "snapshot-get", "find", "range", "write", "tx-write", "transfer", "transfer-hot"]
REPLICATION_IDS = ["sync-write", "sync-cpu", "sync-2", "async-write", "copy", "catch-up"]
#: clients of the CPU-per-commit rows, and the commits they run (full run, --quick)
SYNC_CPU = ((1, 5_000, 2_000), (8, 20_000, 8_000))
FAILOVER_IDS = ["promote", "device"]
DURABILITY_IDS = ["durable-write", "interval-write", "checkpoint", "cold-start"]
RECOVERY_IDS = ["restore", "rerun", "batch"]
BENCH_IDS = [*SINGLE_IDS, "order", "growth", *REPLICATION_IDS, *DURABILITY_IDS, *FAILOVER_IDS, *RECOVERY_IDS]
GROWTH = 10               # the growth rows: get at GROWTH x the records against the records


def system_classes() -> dict:
    from appliance_system import ApplianceSystem
    from peers import LmdbSystem, RedisSystem
    return {"lmdb": LmdbSystem, "redis": RedisSystem, "appliance": ApplianceSystem}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="200,000 records, 1 s per measurement")
    p.add_argument("--json", metavar="PATH", help="write the rows (meta, measurements, ratios) as JSON")
    p.add_argument("--only", metavar="NAME,...", default="",
                   help="systems and/or benchmarks to run: " + ", ".join(["lmdb", "redis", "appliance", *BENCH_IDS,
                                                                             "replication", "durability",
                                                                             "recovery"]))
    p.add_argument("--records", type=int, help="number of records (default 1,000,000; --quick 200,000)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 3; --quick 1)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per measurement (default 1; --quick 0.3)")
    p.add_argument("--catch-up", type=float, dest="catch_up", metavar="SECONDS",
                   help="seconds of load while the secondary is stopped (default 30; --quick 5)")
    p.add_argument("--promote-mib", type=int, dest="promote_mib", metavar="MIB",
                   help="database size (MiB of blocks) of the promote rows (default 1024; --quick 256)")
    p.add_argument("--device-mib", type=int, dest="device_mib", metavar="MIB",
                   help="database size (MiB of blocks) of the device rows (default 1024; --quick 256)")
    p.add_argument("--cold-start-mib", type=int, dest="cold_start_mib", metavar="MIB",
                   help="MiB of records the cold-start row loads (default 1024; --quick 128)")
    args = p.parse_args(argv)
    args.records = args.records or (200_000 if args.quick else 1_000_000)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    args.catch_up = args.catch_up or (5.0 if args.quick else 30.0)
    args.promote_mib = args.promote_mib or (256 if args.quick else 1024)
    args.cold_start_mib = args.cold_start_mib or (128 if args.quick else 1024)
    args.device_mib = args.device_mib or (256 if args.quick else 1024)
    if args.records < 1000:
        p.error("--records must be at least 1000")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if "replication" in names:
        names = [n for n in names if n != "replication"] + REPLICATION_IDS
    if "durability" in names:
        names = [n for n in names if n != "durability"] + DURABILITY_IDS
    if "recovery" in names:
        names = [n for n in names if n != "recovery"] + RECOVERY_IDS
    unknown = [n for n in names if n not in {"lmdb", "redis", "appliance", *BENCH_IDS}]
    if unknown:
        p.error(f"unknown --only name(s): {', '.join(unknown)}")
    args.systems = [s for s in ("lmdb", "redis", "appliance") if not names or s in names
                    or not any(n in ("lmdb", "redis", "appliance") for n in names)]
    chosen = [n for n in names if n in BENCH_IDS]
    args.benches = set(chosen or BENCH_IDS)
    if "sync-2" in args.benches:     # compared with the one-secondary sync-write row of the same run
        args.benches.add("sync-write")
    if args.quick and "growth" not in chosen:
        args.benches.discard("growth")     # more memory and time than --quick allows
    return args


def timer_overhead_ns(n: int = 200_000) -> float:
    ns = time.perf_counter_ns
    t0 = ns()
    for _ in range(n):
        ns()
    return (ns() - t0) / n


class Run:
    def __init__(self, args, printer: Printer) -> None:
        self.args, self.out = args, printer
        self.timing = Timing(args.duration, args.warmup)
        self.rows: list[dict] = []
        cores = os.cpu_count()
        self.notes: list[str] = [
            f"this machine has {cores} cores: rows with more processes than cores time-share them "
            "(the 8-process write rows measure contention, not parallelism); servers (redis-server, "
            "the appliance controller) share the same cores",
            "each worker process (multiprocessing spawn) opens its own connection/environment, "
            f"warms up {args.warmup:g} s, then all run concurrently for {args.duration:g} s between barriers",
            "latency: get/find time 1 op in 10 individually (the other 9 run untimed); ranges and "
            "writes time every op; bulk load = each 10,000-record batch timed ÷ 10,000",
            "the peers store msgpack-encoded records, the appliance its fixed-layout record format; "
            "every read returns decoded dicts; the "
            "answers of each read op are checked against the generated data before it is timed",
        ]
        self.info: dict = {}
        self.unavailable: dict[str, str] = {}
        self.failures: list[str] = []
        t0 = time.monotonic()
        self.data = Dataset(args.records)
        self.params = self.data.params()
        printer.say(f"{args.records:,} records generated in {time.monotonic() - t0:.1f} s "
                    f"({self.data.nbranches:,} branches)")

    def add(self, bench_id, title, system, procs, m, latency, **extra) -> None:
        self.rows.append(measurement_row(bench_id, title, system, procs, m, latency, **extra))
        self.out.say(f"  {title:<40} {system:<22} x{procs}  {m.ops_per_s:>12,.0f} ops/s"
                     f"  p50 {m.p50_us:>9,.2f} µs  p99 {m.p99_us:>9,.2f} µs")

    def rate(self, bench_id, name, system, value, unit, detail="", **figures) -> None:
        self.rows.append(rate_row(bench_id, name, system, value, unit, detail, **figures))
        self.out.say(f"  {name:<40} {system:<26} {value:>12,.1f} {unit:<6} {detail}")

    def fail(self, what: str, err: BaseException | str) -> None:
        text = f"{what}: {err}"
        self.failures.append(text)
        self.out.say(text, style="red")

    def start(self, cls, data=None, **kw):
        """A started system, or None (reported) when it cannot run here."""
        system = cls(data or self.data, **kw)
        try:
            system.start()
            return system
        except Unavailable as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - any start failure skips the system
            reason = f"failed to start: {type(e).__name__}: {e}"
        self.stop(system)
        self.unavailable[system.name] = reason
        self.out.say(f"{system.name}: not available: {reason}", style="yellow")
        return None

    def stop(self, system) -> None:
        try:
            system.stop()
        except Exception as e:  # noqa: BLE001 - reported; the other systems still run
            self.fail(f"{system.name}: stop failed", f"{type(e).__name__}: {e}")

    def load(self, system, order: str, bench_id: str, title: str) -> bool:
        try:
            m = measure_load(system, system.data, order)
        except Exception as e:  # noqa: BLE001
            self.fail(f"{system.name}: bulk load failed", f"{type(e).__name__}: {e}")
            return False
        self.add(bench_id, title, system.name, 1, m, LOAD_LATENCY)
        return True

    def measure(self, system, bench: Bench, label: str, op: str, procs: int, bench_id=None, title=None,
                params=None, **extra):
        try:
            m = run_workers(system.client_spec(), op, bench.kind, params or self.params, procs, bench.step,
                            self.timing, bench.seed(procs))
        except Exception as e:  # noqa: BLE001 - one failed row does not stop the run
            self.fail(f"{label}: {bench.title} x{procs} failed", e)
            return
        self.add(bench_id or bench.id, title or bench.title, label, procs, m, bench.latency, **extra)

    def system(self, cls) -> None:
        self.out.say(f"[{cls.name}]", style="bold")
        system = self.start(cls)
        if system is None:
            return
        try:
            self.notes += system.notes
            self.info.update(system.info)
            if not self.load(system, "random", "load", f"bulk load {self.data.n:,} (random order)"):
                return
            todo = self.variants(system, [b for b in benches(self.data.range_len) if b.id in self.args.benches])
            reads = [(op, b.kind) for b, _, op in todo if b.kind in ("key", "branch", "range")]
            wrong = verify(system.client_spec(), reads, self.data.probe()) if reads else {}
            for op, problem in wrong.items():
                self.fail(f"{cls.name}: wrong answer, {op} skipped", problem)
            self.benches(system, [(b, label, op) for b, label, op in todo if op not in wrong])
        finally:
            self.stop(system)

    def benches(self, system, todo) -> None:
        """Measure ``(bench, label, op)`` for each of the bench's process counts."""
        for b, label, op in todo:
            for procs in b.procs:
                self.measure(system, b, label, op, procs)

    def variants(self, system, benches: list[Bench]):
        return [(b, label, op) for b in benches for label, op in system.variants(b.runs or b.id)]

    def order_test(self, cls) -> None:
        """Random get on two fresh systems, loaded in random and in key order,
        and the shared memory each load takes per record."""
        self.out.say(f"[{cls.name}: random-order vs key-order load]", style="bold")
        for order, bench_id in (("random", "order-random"), ("key", "order-key")):
            system = self.start(cls)
            if system is None:
                return
            try:
                if self.load(system, order, f"load-{order}", f"bulk load {self.data.n:,} ({order} order, fresh)"):
                    self.measure(system, GET, cls.name, "get", 1, bench_id, f"get after {order}-order load")
                    self.guard(f"{cls.name}: record bytes", self.record_bytes, system, order)
            finally:
                self.stop(system)

    def record_bytes(self, system, order: str) -> None:
        b = system.record_bytes()
        per = b["bytes_used"] / b["records"]
        self.rate("record-bytes", f"shared memory per record ({order}-order load)", system.name, per, "B",
                  f"{b['bytes_used'] / 2**20:,.1f} MiB in use for {b['records']:,} records; raw "
                  f"{b['raw_bytes_per_record']:.1f} B a record (key + image {b['table_bytes_per_record']:.1f}, "
                  f"index entries {b['index_bytes_per_record']:.1f})", order=order, **b)
        self.rate("log-bytes", f"change log per record loaded ({order} order)", system.name,
                  b["log_bytes"] / b["records"], "B",
                  "what replication and the durability log carry: records, index entries, BLOCK images "
                  "of the blocks a load restructured", order=order)

    def growth(self, cls) -> None:
        """Random get on a fresh system with the records, then on one with
        GROWTH times as many (both loaded in random order, one at a time)."""
        self.out.say(f"[{cls.name}: get at {GROWTH}x the records]", style="bold")
        for data, bench_id in ((self.data, "growth-small"), (None, "growth-large")):
            if data is None:
                t0 = time.monotonic()
                data = Dataset(self.data.n * GROWTH)
                self.out.say(f"  {data.n:,} records generated in {time.monotonic() - t0:.1f} s")
            # the large one gets 320 B a record over its 4 segments and 64 MiB each for the old
            # versions a load batch retires (the others are sized generously)
            system = self.start(cls, data=data, **({} if data is self.data else
                                                   {"segment_mib": 64 - (-data.n * 80 // 2**20)}))
            if system is None:
                return
            try:
                if self.load(system, "random", f"load-{bench_id}", f"bulk load {data.n:,} (random order, fresh)"):
                    self.measure(system, GET, cls.name, "get", 1, bench_id, f"get with {data.n:,} records",
                                 params=data.params(), records=data.n)
            finally:
                self.stop(system)

    # ---------------------------------------------------------- replication ----

    def replication(self) -> None:
        """Pairs on loopback: Redis + replica, then the appliance pairs (see replication.py)."""
        a = self.args
        if "copy" in a.benches:
            self.out.say("[loopback TCP bandwidth]", style="bold")
            self.guard("loopback TCP bandwidth", self.tcp)
        if "redis" in a.systems and a.benches & {"sync-write", "async-write"}:
            from peers import RedisReplicaSystem
            self.pair("redis with a replica", RedisReplicaSystem, self.redis_rows)
        if "appliance" not in a.systems:
            return
        from appliance_system import AppliancePair
        if a.benches & {"sync-write", "sync-cpu"}:
            self.pair("appliance: primary + synchronous secondary", AppliancePair, self.sync_rows, mode="sync")
        if "sync-2" in a.benches:
            self.pair("appliance: primary + 2 synchronous secondaries", AppliancePair, self.sync2_rows,
                      mode="sync", secondaries=2)
        if a.benches & {"async-write", "catch-up", "copy"}:
            log_mib = max(64, 32 * int(a.catch_up)) if "catch-up" in a.benches else 64   # retains the catch-up load
            self.pair("appliance: primary + asynchronous secondary", AppliancePair, self.async_rows,
                      mode="async", log_size=f"{log_mib}MiB")
        if "copy" in a.benches:
            self.pair("appliance: primary + lz4 secondary (serve_reads = false)", AppliancePair, self.lz4_rows,
                      mode="async", serve_reads=False)

    def guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - one failed part does not stop the run
            self.fail(f"{what} failed", f"{type(e).__name__}: {e}")

    def pair(self, title: str, cls, rows, **kw) -> None:
        """Start a system, fill it with the data set (no row), then ``rows(system)``."""
        self.out.say(f"[{title}]", style="bold")
        t0 = time.monotonic()
        system = self.start(cls, **kw)
        if system is None:
            return
        try:
            self.notes += [n for n in system.notes if n not in self.notes]
            self.info.update(system.info)
            self.guard(title, rows, system)
        finally:
            self.stop(system)
            self.out.say(f"  ({time.monotonic() - t0:.1f} s with start and stop)")

    def fill(self, system, batch: int = LOAD_CHUNK) -> None:
        t0 = time.monotonic()
        for chunk in self.data.chunks("random", batch):
            system.load_chunk(chunk)
        self.out.say(f"  (filled in {time.monotonic() - t0:.1f} s)")

    def tcp(self) -> None:
        from replication import tcp_rate
        t = tcp_rate()
        self.rate("copy-tcp", "loopback TCP bandwidth", TCP_SYSTEM, t["mb_s"], "MB/s",
                  f"{t['bytes'] / 1e6:,.0f} MB in {t['seconds']:.2f} s, 1 MiB sends", **t)

    def redis_rows(self, redis) -> None:
        self.fill(redis)
        redis.wait_synced()
        self.benches(redis, self.variants(redis, [b for b in SYNC + ASYNC if b.id in self.args.benches]))

    def sync_rows(self, pair) -> None:
        pair.start_agents()
        pair.wait_caught_up()          # streaming: the first copy of an empty appliance
        self.fill(pair)                # each 10,000-record transaction waits for the secondary
        pair.wait_caught_up()
        if "sync-write" in self.args.benches:
            self.benches(pair, self.variants(pair, SYNC))
        if "sync-cpu" in self.args.benches:
            self.sync_cpu(pair)

    def sync2_rows(self, pair) -> None:
        pair.start_agents()
        pair.wait_caught_up()
        self.fill(pair)
        pair.wait_caught_up()
        self.measure(pair, SYNC[0], pair.name, "write", 8)
        if "sync-cpu" in self.args.benches:
            self.sync_cpu(pair)

    def sync_cpu(self, pair) -> None:
        """CPU per synchronous commit, per process (replication.sync_cpu)."""
        from replication import sync_cpu
        for clients, full, quick in SYNC_CPU:
            c = sync_cpu(pair, self.params, clients, quick if self.args.quick else full,
                         SYNC[0].seed(100 + clients))
            per = ", ".join(f"{name.replace('_', ' ')} {c[name + '_us']:.0f}"
                            for name in pair.cpu_processes())
            self.rate("sync-cpu", f"CPU per synchronous commit, {clients} client{'s' * (clients > 1)}",
                      pair.name, c["total_us"], "µs", f"{per} (clients {c['clients_us']:.0f}); "
                      f"{c['commits']:,} commits at {c['commits_per_s']:,.0f}/s, "
                      f"{c['commits_per_batch']:.1f} per batch", **c)

    def async_rows(self, pair) -> None:
        self.fill(pair)                # no agent runs yet: the secondary gets a first copy
        if "copy" in self.args.benches:
            self.copy_rows(pair)
        else:
            pair.start_agents()
            pair.wait_caught_up()
        if "async-write" in self.args.benches:
            self.benches(pair, self.variants(pair, ASYNC))
        if "catch-up" in self.args.benches:
            self.catch_up(pair)

    def lz4_rows(self, pair) -> None:
        from replication import lz4_rate
        self.fill(pair)
        self.copy_rows(pair)
        z = lz4_rate(pair.node.name)
        self.rate("copy-lz4", "lz4 compression of the same blocks", LZ4_SYSTEM, z["mb_s"], "MB/s",
                  f"{z['blocks']:,} block images, {z['bytes'] / 1e6:,.1f} MB x {z['passes']} passes, "
                  f"compressed to {z['compressed_fraction']:.0%}", **z)

    def copy_rows(self, pair) -> None:
        from replication import first_copy, memory
        c = first_copy(pair)
        again = f"; {c['attempts']} ATTEMPTS: the link failed, the copy started over" if c["attempts"] > 1 else ""
        self.rate("copy", f"first copy of {self.data.n:,} records", f"appliance ({pair.kind})", c["mb_s"], "MB/s",
                  f"{c['bytes'] / 1e6:,.1f} MB of block images in {c['seconds']:.2f} s to the secondary's "
                  f"copy_complete (relay done in {c['relay_seconds']:.2f} s; {c['wall_s']:.2f} s from the "
                  f"primary's agent start){again}", **c)
        primary, secondary = memory(pair)
        figures = {"primary_bytes_used": primary["bytes_used"], "secondary_bytes_used": secondary["bytes_used"],
                   "secondary_bytes_live": secondary["bytes_live"]}
        live = f", {secondary['bytes_live'] / 2**20:,.1f} MiB live" if secondary["compressed"] else ""
        self.rate("memory", f"secondary memory, {self.data.n:,} records", f"secondary ({pair.kind})",
                  secondary["bytes_used"] / 2**20, "MiB",
                  f"pages in use{live}; primary {primary['bytes_used'] / 2**20:,.1f} MiB", **figures)

    def catch_up(self, pair) -> None:
        from replication import CATCH_UP_CLIENTS, catch_up
        secs = self.args.catch_up
        m, c = catch_up(pair, self.params, secs, CATCH_UP.seed(CATCH_UP_CLIENTS))
        self.add(CATCH_UP.id, CATCH_UP.title, pair.name, CATCH_UP_CLIENTS, m, CATCH_UP.latency)
        copy = "; a FULL COPY happened (the log did not retain the load)" if c["copied"] else ""
        self.rate("catch-up", f"catch-up after {secs:g} s of load", f"{pair.name} secondary", c["rate"], "txn/s",
                  f"{c['transactions']:,} txns ({c['log_bytes'] / 2**20:,.0f} MiB of log) in "
                  f"{c['link_to_caught_up_s']:.2f} s from link up, {c['restart_to_link_s']:.2f} s agent "
                  f"restart to link up; primary wrote {c['write_rate']:,.0f} txn/s{copy}", **c)


    # ---------------------------------------------------------- failover ----

    def failover(self) -> None:
        """promote-to-first-write on a database of --promote-mib, both kinds of secondary (failover.py)."""
        from failover import promote_to_first_write
        size = self.args.promote_mib << 20
        for serve_reads, kind in ((True, "uncompressed"), (False, "lz4")):
            self.out.say(f"[appliance: promote an {kind} secondary, {self.args.promote_mib} MiB]", style="bold")
            self.guard(f"promote ({kind})", self.promote_rows, promote_to_first_write, serve_reads, kind, size)

    def promote_rows(self, fn, serve_reads: bool, kind: str, size: int) -> None:
        r = fn(serve_reads, size, self.out.say)
        gib = r["bytes"] / 2**30
        lz = r.pop("lz4")
        ex = r.pop("expanded") or {}
        figures = {**r, **{f"expanded_{k}": v for k, v in ex.items()}}
        self.rate("promote", f"promote to first write, {gib:.2f} GiB", f"appliance ({kind} secondary)",
                  r["first_write_s"], "s", f"promote answered in {r['promote_s']:.3f} s (controller "
                  f"{r['controller_s']:.3f} s), first write at {r['first_write_s']:.3f} s; {r['records']:,} "
                  "records of ~1 KB" + ("; goal <= 1 s" if serve_reads else ""), **figures)
        if lz is not None:
            self.rate("promote-lz4", "lz4 decompression of the same blocks", "lz4.block.decompress, 1 core",
                      lz["mb_s"], "MB/s", f"{lz['blocks']:,} block images, {lz['bytes'] / 1e6:,.1f} MB x "
                      f"{lz['passes']} passes", **lz)
            rate = ex.get("bytes", 0) / r["promote_s"] / 1e6
            self.rate("promote-lz4-ratio", "promote rate / one core's lz4 decompression",
                      "appliance (lz4 secondary)", rate / lz["mb_s"], "x",
                      f"{rate:,.0f} MB/s of primary blocks over the whole promote (decompressing alone: "
                      f"{ex.get('rate_mb_s', 0):,.0f} MB/s) vs {lz['mb_s']:,.0f} MB/s; goal >= 0.5",
                      promote_mb_s=rate, lz4_mb_s=lz["mb_s"])

    def devices(self) -> None:
        """A device's rebuild rate against loopback TCP, and the primary's
        commits during an online replace against without (devices.py)."""
        from devices import device_rows
        self.out.say(f"[appliance: replace a device, {self.args.device_mib} MiB]", style="bold")
        self.guard("device replace", self.device_rows, device_rows, self.args.device_mib << 20)

    def device_rows(self, fn, size: int) -> None:
        r = fn(size, self.out.say)
        tcp, rb, base, on = r["tcp"], r["rebuild"], r["baseline"], r["online"]
        self.rate("device-rebuild", "device rebuild (refill) rate", "appliance (sync secondary)", rb["rate_mb_s"],
                  "MB/s", f"{rb['blocks']:,} blocks, {rb['bytes'] / 1e6:,.1f} MB refilled in "
                  f"{rb['refill_seconds']:.2f} s, {rb['moved']:,} moved back; {rb['seconds']:.2f} s in all",
                  **{k: v for k, v in rb.items() if not isinstance(v, (list, dict))})
        self.rate("device-tcp", "loopback TCP", TCP_SYSTEM, tcp["mb_s"], "MB/s", "1 MiB sends", **tcp)
        self.rate("device-rebuild-ratio", "device rebuild rate / loopback TCP", "appliance (sync secondary)",
                  rb["rate_mb_s"] / tcp["mb_s"], "x", "goal >= 0.5")
        for name, w in (("without", base), ("online replace", on)):
            self.rate(f"device-commits-{'base' if w is base else 'online'}",
                      f"1-record commits, {name}", f"appliance (sync), {WRITERS_NOTE}", w["commits_s"], "txn/s",
                      f"p50 {w['p50_ms'] or 0:.2f} ms, p99 {w['p99_ms'] or 0:.2f} ms over {w['seconds']:.2f} s; "
                      f"{w['unavailable']:,} refused (block not refilled yet), {w['other_errors']} other errors",
                      **{k: v for k, v in w.items() if k != "result"})
        self.rate("device-commits-ratio", "commits during an online replace / without", "appliance (sync)",
                  on["commits_s"] / base["commits_s"] if base["commits_s"] else 0.0, "x",
                  f"p99 {on['p99_ms'] or 0:.2f} vs {base['p99_ms'] or 0:.2f} ms; goal >= 0.7")

    # ---------------------------------------------------------- durability ----

    def durability(self) -> None:
        """The appliance with [durability] on disk against Redis's AOF and
        lmdb's sync=True, the checkpoint write rate and the cold start (durability.py)."""
        from durability import DurableAppliance, DurableLmdb, DurableRedis
        a = self.args
        want = lambda *ids: a.benches & set(ids)        # noqa: E731
        if want("durable-write", "checkpoint") and "appliance" in a.systems:
            self.pair("appliance, log_sync = \"commit\"", DurableAppliance, self.durable_rows, log_sync="commit")
        if want("durable-write") and "redis" in a.systems:
            self.pair("redis, appendfsync always", DurableRedis, self.durable_rows, fsync="always")
        if want("durable-write") and "lmdb" in a.systems:
            self.pair("lmdb, sync=True", DurableLmdb, self.durable_rows)
        if want("interval-write") and "appliance" in a.systems:
            self.pair("appliance, log_sync = \"interval\" (1 s)", DurableAppliance, self.interval_rows,
                      log_sync="interval", interval="1s")
        if want("interval-write") and "redis" in a.systems:
            self.pair("redis, appendfsync everysec", DurableRedis, self.interval_rows, fsync="everysec")
        if want("cold-start") and "appliance" in a.systems:
            self.out.say(f"[appliance: cold start of {a.cold_start_mib} MiB]", style="bold")
            self.guard("cold start", self.cold_start_rows)

    def durable_rows(self, system) -> None:
        self.fill(system)
        if "durable-write" in self.args.benches:
            self.benches(system, self.variants(system, DURABLE))
        if "checkpoint" in self.args.benches and hasattr(system, "checkpoint"):
            self.checkpoint_rows(system)
            if "durable-write" in self.args.benches:
                self.during_checkpoints(system)

    def during_checkpoints(self, system) -> None:
        """The 8-process durable write again while checkpoints follow one another."""
        import threading
        stop, taken = threading.Event(), []

        def checkpoints():
            while not stop.is_set():
                taken.append(system.checkpoint())
        t = threading.Thread(target=checkpoints, daemon=True)
        t.start()
        try:
            self.measure(system, DURING_CHECKPOINT, system.name, "write", 8)
        finally:
            stop.set()
            t.join(120)
        secs = sum(c["seconds"] for c in taken)
        share = sum(c.get("yielded_bytes", 0) for c in taken) / max(1, sum(c["bytes"] for c in taken))
        self.out.say(f"  ({len(taken)} checkpoints written during the row and its warm-up, "
                     f"{secs / max(1, len(taken)):.2f} s each, {share:.0%} of their bytes giving way to commits)")

    def interval_rows(self, system) -> None:
        self.fill(system)
        self.benches(system, self.variants(system, INTERVAL))

    def checkpoint_rows(self, system) -> None:
        from durability import disk_write_rate
        cp = system.checkpoint()
        self.rate("checkpoint", f"checkpoint of {self.data.n:,} records", system.name, cp["rate_mb_s"], "MB/s",
                  f"{cp['bytes'] / 1e6:,.1f} MB ({cp['blocks']:,} blocks) in {cp['seconds']:.2f} s, "
                  "written and fdatasync'ed", **{k: cp[k] for k in ("bytes", "blocks", "seconds")})
        d = disk_write_rate(system.disk, max(cp["bytes"], 64 << 20))
        self.rate("disk-write", "disk sequential write, same disk", "4 MiB writes + fdatasync", d["mb_s"], "MB/s",
                  f"{d['bytes'] / 1e6:,.0f} MB in {d['seconds']:.2f} s", **d)

    def cold_start_rows(self) -> None:
        from durability import cold_start
        c = cold_start(self.data, self.args.cold_start_mib << 20)
        self.notes.append(f"cold start: {c['disk']}")
        self.rate("file-read", f"read the files of {c['file_bytes'] / 2**30:.2f} GiB", "sequential read, cold cache",
                  c["read_s"], "s", f"{c['read_mb_s']:,.0f} MB/s", **{k: c[k] for k in ("file_bytes", "read_s")})
        self.rate("cold-start", f"cold start of {c['file_bytes'] / 2**30:.2f} GiB", "appliance", c["cold_start_s"], "s",
                  f"{c['records']:,} records, {c['block_bytes'] / 2**30:.2f} GiB of blocks; checkpoint "
                  f"{c['checkpoint_bytes'] / 2**30:.2f} GiB + {c['records_replayed']} log records; loading "
                  f"{c['loaded_s']:.2f} s of it ("
                  + ", ".join(f"{k} {v:.2f}" for k, v in c["phases"].items())
                  + "), the rest is process start; the median of "
                  f"{len(c['rounds'])} rounds by cold start ÷ read (each round's: "
                  + ", ".join(f"{r['cold_start_s']:.2f}/{r['read_s']:.2f} s" for r in c["rounds"]) + ")", **c)

    # ------------------------------------------------------------- recovery ----

    def recovery(self) -> None:
        """Restore and rerun on an asynchronous pair, batch mode on a synchronous one (see recovery.py)."""
        from appliance_system import AppliancePair
        a = self.args
        if a.benches & {"restore", "rerun"}:
            log_mib = max(64, 32 * int(a.catch_up))
            self.pair("appliance: asynchronous pair with log histories", AppliancePair, self.restore_rows,
                      mode="async", log_size=f"{log_mib}MiB", history=True)
        if "batch" in a.benches:
            self.pair("appliance: synchronous pair with log histories, batch mode", AppliancePair,
                      self.batch_rows, mode="sync", history=True)

    def restore_rows(self, pair) -> None:
        from recovery import RESTORE_CLIENTS, rerun_rate, restore_rate
        from report import _ratio_row
        self.fill(pair)
        pair.start_agents()
        pair.wait_caught_up(600)
        if "restore" in self.args.benches:
            secs = self.args.catch_up
            m, res, f = restore_rate(pair, self.params, secs, CATCH_UP.seed(RESTORE_CLIENTS) + 7)
            self.add("restore-write", f"writes to restore away ({secs:g} s)", pair.name, RESTORE_CLIENTS, m,
                     CATCH_UP.latency)
            self.rate("restore", "restore (B-log records undone)", "appliance (primary)", f["rate"], "rec/s",
                      f"{f['b_logs']:,} B-log records of {f['transactions']:,} txns, {f['records']:,} records put "
                      f"back in {f['restore_s']:.2f} s ({f['parts']} parts: read {f['read_s']:.2f} s, staged "
                      f"{f['stage_s'] or 0:.2f} s, committed {f['commit_s'] or 0:.2f} s); reading alone "
                      f"{f['read_rate']:,.0f}/s", **f)
            self.rows.append(_ratio_row("restore", "restore rate ÷ 1,000,000 B-log records/s",
                                        "appliance (primary)", 1, f["rate"] / 1e6, 1.0, None))
        if "rerun" in self.args.benches:
            r = rerun_rate(pair, self.args.duration * 2)
            self.rate("rerun-original", "original run of a program (db.run)", "appliance", r["original_rate"],
                      "txn/s", f"{r['transactions']:,} transactions, 1 client")
            self.rate("rerun", "rerun with the corrected program", "appliance", r["rerun_rate"], "txn/s",
                      f"{r['rerun_transactions']:,} transactions re-run in {r['rerun_s']:.2f} s "
                      f"(restore + simulate + commit: {r['phases']})", **{k: v for k, v in r.items()
                                                                           if k != "phases"})
            self.rows.append(_ratio_row("rerun", "rerun rate ÷ original run's rate", "appliance", 1, r["ratio"],
                                        None, None))

    def batch_rows(self, pair) -> None:
        from recovery import BATCH_CLIENTS, batch_rows
        from report import _ratio_row
        pair.start_agents()
        pair.wait_caught_up()
        self.fill(pair)
        pair.wait_caught_up(600)
        secs = max(self.args.duration * 3, 3.0)
        b = batch_rows(pair, self.params, secs, CATCH_UP.seed(BATCH_CLIENTS) + 13)
        self.add("batch-without", "sync write, no batch", pair.name, BATCH_CLIENTS, b["without"], CATCH_UP.latency)
        self.add("batch-during", "sync write, secondary in batch mode", pair.name, BATCH_CLIENTS, b["during"],
                 CATCH_UP.latency)
        self.rows.append(_ratio_row("batch", "primary p99 during a batch ÷ without", "appliance (sync)",
                                    BATCH_CLIENTS, b["p99_ratio"] or 0, 1.1, None, higher_is_better=False))
        self.rate("batch-catch-up", "catch-up after the batch", "appliance secondary", b["catch_up_rate"], "txn/s",
                  f"{b['transactions']:,} txns ({(b['backlog_bytes'] or 0) / 2**20:,.1f} MiB of backlog) in "
                  f"{b['catch_up_s']:.2f} s from batch end; primary wrote {b['write_rate']:,.0f} txn/s during "
                  f"the batch", **{k: v for k, v in b.items() if k not in ("without", "during")})
        self.rows.append(_ratio_row("batch", "catch-up ÷ the primary's write rate", "appliance secondary", 1,
                                    b["ratio"], 3.0, None))


def compile_package() -> None:
    """The appliance's modules compiled to bytecode, as a pip install of its
    wheel leaves them: every controller, agent and client the run starts
    loads them instead of compiling them again (~0.1 s a process start with
    PYTHONDONTWRITEBYTECODE set and an editable install, which writes none)."""
    import compileall
    import appliance
    compileall.compile_dir(os.path.dirname(appliance.__file__), quiet=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    compile_package()
    # SIGTERM unwinds like Ctrl-C, so every finally block stops its servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Printer()
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        out.say(f"warning: load average {load_start:.2f} before the run: other processes use the CPU, "
                "figures will be noisy", style="yellow")
    run = Run(args, out)
    classes = system_classes()
    for name in args.systems:
        if args.benches & set(SINGLE_IDS):
            run.system(classes[name])
    if "order" in args.benches and "appliance" in args.systems and "appliance" not in run.unavailable:
        run.order_test(classes["appliance"])
    if "growth" in args.benches and "appliance" in args.systems and "appliance" not in run.unavailable:
        run.growth(classes["appliance"])
    if args.benches & set(REPLICATION_IDS):
        run.replication()
    if "promote" in args.benches and "appliance" in args.systems:
        run.failover()
    if "device" in args.benches and "appliance" in args.systems:
        run.devices()
    if args.benches & set(DURABILITY_IDS):
        run.durability()
    if args.benches & set(RECOVERY_IDS) and "appliance" in args.systems:
        run.recovery()

    meta = meta_row(args, run.info, run.notes, run.unavailable, timer_overhead_ns())
    meta["failures"] = run.failures
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_1min_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    rows = [meta, *run.rows, *ratio_rows(run.rows)]
    out.say("")
    out.results(rows)
    out.meta(meta)
    out.say(f"total {meta['elapsed_s']} s")
    if args.json:
        write_json(args.json, rows)
        out.say(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
