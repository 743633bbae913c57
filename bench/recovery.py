"""Going back in time: restore rate, rerun rate, the primary during a batch, catch-up after it.

Run from :class:`run.Run` (``--only recovery`` = restore, rerun, batch; see bench/README.md, "Going back in time"):

* **Restore** (``restore``): an asynchronous pair with a log history on both,
  filled with the data set; 4 clients write one-record transactions (random
  records) for the catch-up load's seconds; then ``db.restore`` back to the
  serial before them (the whole database). Rate = B-log records undone ÷ the
  restore's own seconds (the controller's figure: reading the history and
  the ring, working out each record's image, committing them); also ÷ the
  reading part alone (``read_s``). Goal: ≥ 1,000,000 B-log records/s.
* **Rerun** (``rerun``): on the same pair, one client runs a faulty program
  (bench/bench_programs.py ``deposit``) ``db.run`` after ``db.run`` for the
  row's seconds (the original run's rate); then ``db.rerun`` with the
  corrected one re-runs every one of them (dry run first, untimed). Ratio:
  re-run transactions/s ÷ the original run's transactions/s.
* **Batch** (``batch``): a synchronous pair with a log history on both.
  8 clients write one-record transactions (``t[k] = rec``) for the row's
  seconds without a batch, then again with the secondary in batch mode
  (``appliance batch begin``): p99 commit latency with ÷ without (goal:
  within 10%). Then ``batch end``: catch-up rate = the transactions that
  accumulated ÷ seconds from ``batch end`` until the secondary applied them,
  against the primary's write rate during the batch (goal ≥ 3x).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from harness import Timing, run_workers

HERE = Path(__file__).resolve().parent
RESTORE_CLIENTS = 4
BATCH_CLIENTS = 8
MB = 1e6


def _serial(pair) -> int:
    return pair.node.status()["log"]["serial"]


def restore_rate(pair, params: dict, seconds: float, seed: int) -> tuple:
    """(write Measurement, restore result, figures)."""
    pair.wait_caught_up()
    before = _serial(pair)
    committed = pair.node.status()["transactions"]["committed"]
    m = run_workers(pair.client_spec(), "write", "record", params, RESTORE_CLIENTS, 1, Timing(seconds, 0.0), seed)
    txns = pair.node.status()["transactions"]["committed"] - committed
    pair.wait_caught_up(600)
    t0 = time.monotonic()
    res = pair.db.restore(before, timeout=120)
    wall = time.monotonic() - t0
    figures = {"b_logs": res["entries"], "records": res["records"], "transactions": res["transactions"],
               "scanned": res["scanned"], "restore_s": res["seconds"], "read_s": res["read_s"], "wall_s": wall,
               "rate": res["entries"] / max(res["seconds"], 1e-9),
               "read_rate": res["entries"] / max(res["read_s"], 1e-9), "parts": res["parts"],
               "stage_s": res.get("stage_s"), "commit_s": res.get("commit_s"),
               "write_transactions": txns}
    return m, res, figures


def rerun_rate(pair, seconds: float) -> dict:
    """Run the faulty program for `seconds` (one client), then rerun it with the fix."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import random
    db = pair.db
    pair.wait_caught_up()
    since = _serial(pair)
    rng = random.Random(11)
    n = pair.data.n
    t0 = time.perf_counter()
    count = 0
    while time.perf_counter() - t0 < seconds:
        db.run("bench_programs:deposit", {"id": rng.randrange(n), "amount": rng.randrange(1, 1000)})
        count += 1
    original_s = time.perf_counter() - t0
    dry = db.rerun("bench_programs:deposit", "bench_programs:deposit_fixed", since=since, path=(str(HERE),))
    t1 = time.perf_counter()
    rep = db.rerun("bench_programs:deposit", "bench_programs:deposit_fixed", since=since, dry_run=False,
                   path=(str(HERE),), timeout=300)
    rerun_s = time.perf_counter() - t1
    return {"transactions": count, "original_s": original_s, "original_rate": count / original_s,
            "rerun_s": rerun_s, "rerun_rate": len(rep.transactions) / rerun_s, "rerun_transactions":
            len(rep.transactions), "differences": len(dry.differences), "phases": rep.seconds,
            "ratio": (len(rep.transactions) / rerun_s) / (count / original_s)}


def batch_rows(pair, params: dict, seconds: float, seed: int) -> dict:
    """(without, during) write Measurements, and the catch-up figures."""
    pair.wait_caught_up()
    sdb = pair.secondary.connect()
    try:
        timing = Timing(seconds, min(1.0, seconds / 3))
        without = run_workers(pair.client_spec(), "write", "record", params, BATCH_CLIENTS, 1, timing, seed)
        pair.wait_caught_up()
        st = sdb.batch("begin")
        frozen = st["frozen_serial"]
        c0 = pair.node.status()["transactions"]["committed"]
        s0 = _serial(pair)
        t_begin = time.monotonic()
        during = run_workers(pair.client_spec(), "write", "record", params, BATCH_CLIENTS, 1, timing, seed + 1)
        write_s = time.monotonic() - t_begin
        txns = pair.node.status()["transactions"]["committed"] - c0
        target = _serial(pair)
        backlog = sdb.batch("status").get("backlog_bytes")
        t_end = time.monotonic()
        sdb.batch("end")
        deadline = t_end + 600
        while sdb.applied_serial() < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the secondary did not catch up: applied {sdb.applied_serial()} of {target}")
            time.sleep(0.005)
        catch_s = time.monotonic() - t_end
        write_rate = txns / during.seconds
        return {"without": without, "during": during, "transactions": txns, "serials": target - s0,
                "frozen_serial": frozen, "backlog_bytes": backlog, "catch_up_s": catch_s,
                "catch_up_rate": txns / max(catch_s, 1e-9), "write_rate": write_rate, "batch_s": write_s,
                "ratio": (txns / max(catch_s, 1e-9)) / write_rate,
                "p99_ratio": during.p99_us / without.p99_us if without.p99_us else None}
    finally:
        sdb.close()
