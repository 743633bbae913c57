"""Storage devices: the rebuild rate of `appliance device replace` against
its bottleneck, and the primary's commits during an online replace against
without (see README.md, "Storage devices: detach and replace").

A fresh synchronous pair (primary + one secondary that serves reads), the
primary filled with records of ~1 KB until its blocks take the target size
(256 MiB by default), the secondary caught up. Then:

* ``rebuild``: device 1 detached and replaced with commits waiting (the
  default mode, nothing else running): refilled bytes ÷ refill seconds,
  against loopback TCP measured in the same run (two processes, 1 MiB
  sends: the images come from the secondary over one TCP link; they are not
  compressed on it, so lz4 is not on their path). Goal: at least half.
* ``online``: WRITERS processes update random records of the primary, one
  record per transaction, for a baseline window; then again while device 2
  is detached and replaced ``--online``. Commits per second and p99 of each
  window; writes that needed a block not refilled yet fail with
  DeviceUnavailableError and are counted apart. Goal: at least 0.7 x the
  baseline's commits per second.
"""
from __future__ import annotations

import multiprocessing as mp
import time

from appliance_system import AppliancePair
from failover import _Size, fill
from harness import percentile
from replication import MB, tcp_rate

WRITERS = 4
BASELINE_S = 3.0


def _writer(config: str, records: int, stop, out, seed: int) -> None:
    import random

    import appliance
    from appliance import errors
    rng = random.Random(seed)
    lat, failed, other = [], 0, 0
    ns = time.perf_counter_ns
    with appliance.connect(config) as db:
        while not stop.is_set():
            k = rng.randrange(records)
            t0 = ns()
            try:
                with db.transaction() as tx:
                    tx.update("accounts", k, {"balance": k + 1})
                lat.append(ns() - t0)
            except errors.DeviceUnavailableError:
                failed += 1
            except errors.ApplianceError:
                other += 1
    out.put((lat, failed, other))


def _window(config, records: int, during=None) -> dict:
    """WRITERS processes updating for BASELINE_S seconds, or for as long as
    `during()` runs (started once they write); commits/s and latency."""
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(config), records, stop, out, i), daemon=True)
             for i in range(WRITERS)]
    for p in procs:
        p.start()
    time.sleep(1.0)                       # connected and writing
    t0 = time.perf_counter()
    result = during() if during is not None else time.sleep(BASELINE_S)
    elapsed = time.perf_counter() - t0
    stop.set()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    lat = sorted(x for g in got for x in g[0])
    return {"seconds": elapsed, "commits": len(lat), "commits_s": len(lat) / elapsed if elapsed else 0.0,
            "p50_ms": percentile(lat, 0.50) / 1e6 if lat else None,
            "p99_ms": percentile(lat, 0.99) / 1e6 if lat else None,
            "unavailable": sum(g[1] for g in got), "other_errors": sum(g[2] for g in got), "result": result}


def device_rows(target_bytes: int, say) -> dict:
    from appliance.cli import recovery
    pair = AppliancePair(_Size(max(1 << 17, target_bytes // 1024)), mode="sync", serve_reads=True)
    pair.start()
    try:
        loaded, size = fill(pair, target_bytes, say)
        cfg = pair.node.config
        tcp = tcp_rate()
        recovery.detach(cfg, 1)
        rebuild = recovery.replace(cfg, 1, timeout=600)
        rebuild["rate_mb_s"] = rebuild["bytes"] / rebuild["refill_seconds"] / MB
        pair.wait_caught_up(600.0)
        base = _window(cfg, loaded)

        def replace_online():
            recovery.detach(cfg, 2)
            return recovery.replace(cfg, 2, online=True, timeout=600)
        online = _window(cfg, loaded, replace_online)
        return {"records": loaded, "bytes": size, "tcp": tcp, "rebuild": rebuild, "baseline": base,
                "online": online}
    finally:
        if pair.db is not None:
            pair.db.close()
            pair.db = None
        pair.stop()
