"""Running one measurement: worker processes, timing, percentiles.

Method (see README.md):

* Workers are started with ``multiprocessing``'s *spawn* method, so nothing
  (no environment, socket or mapping) is inherited from the parent; each
  builds its arguments and opens its own client before the clock starts.
* All workers wait at a barrier, warm up for ``warmup`` seconds, wait at the
  barrier again and then run for ``duration`` seconds, concurrently.
* Throughput: each worker's operations ÷ its own elapsed time, summed over
  workers.
* Latency: ``time.perf_counter_ns`` around single operations, stored in a
  preallocated array. Writes and range scans time every operation. Reads
  (get, find) time one operation in ``sample_every`` (10) and run the other
  nine untimed, so that the two clock reads (~50-100 ns) do not weigh on
  the throughput of sub-microsecond operations; the timed ones are still
  single operations, so p99 is a true per-operation tail.
* Bulk load runs in the parent: every batch of 10,000 records is timed and
  its time divided by its size (the latency columns are per record).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from array import array
from dataclasses import dataclass
from multiprocessing.connection import wait

from data import make_args

MAX_SAMPLES = 2_000_000       # per worker: 16 MB of int64 latencies
BARRIER_TIMEOUT = 300.0       # a worker never waits forever for a dead sibling


@dataclass(frozen=True)
class Timing:
    duration: float
    warmup: float


@dataclass
class Measurement:
    ops: int
    seconds: float
    ops_per_s: float
    p50_us: float
    p99_us: float
    samples: int


class WorkerError(RuntimeError):
    pass


def _run(fn, plan, step: int, seconds: float, lat: array) -> tuple[int, int, int]:
    """Call ``fn`` over ``plan`` for ``seconds``; returns (ops, elapsed ns, samples)."""
    ns = time.perf_counter_ns
    nplan, cap = len(plan), len(lat)
    i = n = 0
    start = ns()
    deadline = start + int(seconds * 1e9)
    t1 = start
    while t1 < deadline and n < cap:
        first, rest = plan[i]
        t0 = ns()
        fn(first)
        t1 = ns()
        lat[n] = t1 - t0
        n += 1
        for a in rest:
            fn(a)
        i += 1
        if i == nplan:
            i = 0
    return n * step, ns() - start, n


def _plan(args: list, step: int) -> list[tuple]:
    """Group arguments by ``step``: (timed argument, untimed arguments)."""
    while len(args) < step:
        args = args * 2
    usable = len(args) // step * step
    return [(args[i], tuple(args[i + 1:i + step])) for i in range(0, usable, step)]


def _worker(spec, op, kind, params, seed, step, timing, barrier, conn) -> None:
    try:
        plan = _plan(make_args(kind, params, seed), step)
        lat = array("q", bytes(8 * MAX_SAMPLES))
        client = spec()
        try:
            barrier.wait(BARRIER_TIMEOUT)
            with client.session(op) as fn:
                _run(fn, plan, step, timing.warmup, lat)
            barrier.wait(BARRIER_TIMEOUT)
            with client.session(op) as fn:
                ops, elapsed, n = _run(fn, plan, step, timing.duration, lat)
        finally:
            client.close()
        conn.send({"ops": ops, "elapsed_ns": elapsed, "lat": lat[:n].tobytes()})
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(counts: list[tuple[int, int]], latencies_ns: array) -> Measurement:
    """``counts``: (ops, elapsed ns) per worker; latencies merged over workers."""
    lat = sorted(latencies_ns)
    ops = sum(c for c, _ in counts)
    return Measurement(
        ops=ops,
        seconds=max(e for _, e in counts) / 1e9,
        ops_per_s=sum(c / (e / 1e9) for c, e in counts if e),
        p50_us=percentile(lat, 0.50) / 1000,
        p99_us=percentile(lat, 0.99) / 1000,
        samples=len(lat),
    )


def run_workers(spec, op: str, kind: str, params: dict, nprocs: int, step: int,
                timing: Timing, seed: int) -> Measurement:
    """Run ``op`` in ``nprocs`` fresh processes at once and merge their results."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(nprocs)
    procs, conns = [], []
    try:
        for w in range(nprocs):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, daemon=True, name=f"bench-{op}-{w}",
                            args=(spec, op, kind, params, seed * 1000 + w, step, timing, barrier, send))
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        deadline = time.monotonic() + 120 + 3 * (timing.warmup + timing.duration)
        counts, lat = [], array("q")
        pending = dict(zip(conns, enumerate(procs)))
        while pending:
            for recv in wait(list(pending), timeout=0.2):
                w, p = pending.pop(recv)
                try:
                    msg = recv.recv()
                except EOFError:
                    p.join(5)
                    raise WorkerError(f"worker {w} died (exit code {p.exitcode})") from None
                if "error" in msg:
                    raise WorkerError(f"worker {w} failed:\n{msg['error']}")
                counts.append((msg["ops"], msg["elapsed_ns"]))
                lat.frombytes(msg["lat"])
            if time.monotonic() > deadline:
                raise WorkerError(f"{len(pending)} worker(s) did not finish in time")
        for p in procs:
            p.join(10)
        return summarize(counts, lat)
    finally:
        barrier.abort()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for recv in conns:
            recv.close()


def measure_load(system, data, order: str) -> Measurement:
    """Bulk-load every record in ``order`` ("random" or "key"), batch by batch."""
    ns = time.perf_counter_ns
    per_record, total_ns = array("q"), 0
    for chunk in data.chunks(order):
        t0 = ns()
        system.load_chunk(chunk)
        dt = ns() - t0
        per_record.append(dt // len(chunk))
        total_ns += dt
    return summarize([(data.n, total_ns)], per_record)


# ------------------------------------------------------------ answers ----

def _normalize(kind: str, got):
    if kind == "key":
        return None if got is None else dict(got)
    records = [dict(r) for r in got]
    return sorted(records, key=lambda r: r["id"]) if kind == "branch" else records


def _verify(spec, ops: list[tuple[str, str]], probe: dict) -> dict[str, str]:
    """In a worker: call each ``(op, argument kind)`` on the probe arguments and
    compare with the expected answers; returns ``{op: problem}``."""
    problems = {}
    client = spec()
    try:
        for op, kind in ops:
            try:
                with client.session(op) as fn:
                    for arg, expected in probe[kind]:
                        got = _normalize(kind, fn(arg))
                        if got != expected:
                            problems[op] = f"{op}({arg!r}) returned {str(got)[:200]}, expected {str(expected)[:200]}"
                            break
            except Exception as e:  # noqa: BLE001 - reported, the op is skipped
                problems[op] = f"{op} raised {type(e).__name__}: {e}"
    finally:
        client.close()
    return problems


def verify(spec, ops: list[tuple[str, str]], probe: dict) -> dict[str, str]:
    """Check that every read operation hands back the expected records, in a
    fresh process (lmdb forbids opening one environment twice in a process)."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_verify, spec, ops, probe).result(timeout=300)
