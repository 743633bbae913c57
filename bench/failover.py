"""Failover: promote-to-first-write on a database of a given size, both kinds
of secondary (see README.md, "Failover").

A fresh asynchronous pair (primary + one secondary that serves reads, or one
that keeps lz4 backup blocks), the primary filled with records of ~1 KB
until its blocks take the target size (1 GiB by default), the secondary
caught up; then the primary's controller and agent get SIGKILL (the machine
dies) and this process promotes the secondary through the Python API
(``appliance.cli.recovery.promote``, what ``appliance promote`` calls) and
writes one record:

* ``promote_s``: from sending OP_PROMOTE to its answer (the secondary takes
  writes from then on); ``first_write_s``: to the first write's answer (a
  client connected before the promote for the uncompressed kind; connected
  after it for lz4, whose secondary serves no client before).
* lz4 also: ``expanded`` (blocks, bytes, seconds of decompressing into primary
  blocks) and, in the same run, one core's ``lz4.block.decompress`` rate over
  the same block images (compressed first, untimed): the goal is a promote
  rate (image bytes ÷ promote seconds) of at least half of it.
"""
from __future__ import annotations

import time

from appliance_system import AppliancePair
from replication import MB, block_images
from systems import Unavailable

NOTE = 900                 # bytes of the note field: records of about 1 KB
BATCH = 2000               # records per load transaction
LZ4_MIN_SECONDS = 1.0


class _Size:
    """What AppliancePair reads of a data set: its record count (segment sizes)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.range_len = 1


def _records(start: int, count: int):
    note = ("x0123456789abcdef" * (NOTE // 16 + 1))[:NOTE]
    return [{"id": i, "branch": f"br{i % 5000:05d}", "balance": i, "note": note} for i in range(start, start + count)]


def lz4_decompress_rate(appliance_name: str, min_seconds: float = LZ4_MIN_SECONDS) -> dict:
    """One core's ``lz4.block.decompress`` rate over every block image of an
    appliance (read from its segments; compressed first, untimed)."""
    try:
        import lz4.block
    except ImportError as e:
        raise Unavailable(f"python lz4 is not installed ({e})") from None
    images = block_images(appliance_name)
    packed = [lz4.block.compress(img, store_size=False) for img in images]
    sizes = [len(img) for img in images]
    decompress, ns = lz4.block.decompress, time.perf_counter_ns
    total, passes, t0 = sum(sizes), 0, ns()
    while True:
        for p, size in zip(packed, sizes):
            decompress(p, uncompressed_size=size)
        passes += 1
        elapsed = (ns() - t0) / 1e9
        if elapsed >= min_seconds:
            break
    return {"blocks": len(images), "bytes": total, "passes": passes, "seconds": elapsed,
            "mb_s": total * passes / elapsed / MB}


def promote_to_first_write(serve_reads: bool, target_bytes: int, say) -> dict:
    """One pair, filled to `target_bytes` of blocks, failed over (see the module docstring)."""
    from appliance.cli import recovery
    # segments of 512 MiB x 4 hold 1 GiB of ~1 KB records with room (segment_mib: 512 B a record)
    pair = AppliancePair(_Size(max(1 << 17, target_bytes // 1024)), mode="async", serve_reads=serve_reads)
    pair.start()
    try:
        pair.start_agents()
        pair.wait_caught_up()
        t0, loaded = time.monotonic(), 0
        while pair.node.status()["memory"]["bytes_used"] < target_bytes:
            pair.db.load("accounts", _records(loaded, BATCH * 10), batch=BATCH)
            loaded += BATCH * 10
        say(f"  ({loaded:,} records, {pair.node.status()['memory']['bytes_used'] / 2**30:.2f} GiB of blocks "
            f"loaded in {time.monotonic() - t0:.1f} s)")
        pair.wait_caught_up(600.0)
        size = pair.node.status()["memory"]["bytes_used"]
        sdb = pair.secondary.connect() if serve_reads else None
        for proc in (pair.primary_agent.proc, pair.node.proc):   # the primary's machine dies
            proc.kill()
            proc.wait()
        rate = None if serve_reads else lz4_decompress_rate(pair.node.name)
        t0 = time.perf_counter()
        rep = recovery.promote(pair.secondary.config)
        t1 = time.perf_counter()
        db = sdb if sdb is not None else pair.secondary.connect()
        db.table("accounts")[10**9] = {"branch": "failover", "balance": 1, "note": "first write"}
        t2 = time.perf_counter()
        db.close()
        pair.db.close()
        pair.db = None
        return {"records": loaded, "bytes": size, "promote_s": t1 - t0, "first_write_s": t2 - t0,
                "controller_s": rep["seconds"], "expanded": rep.get("expanded"), "lz4": rate}
    finally:
        pair.stop()
