"""A secondary that serves reads while its primary writes: snapshots on the
secondary, number reuse on the primary, several ENTRIES in one apply. Real
controllers, agents, TCP and client processes."""
from __future__ import annotations

import subprocess

import pytest

import appliance

#: the primary's client: transactions that alternately insert 1,500 consecutive keys at a random
#: start in 0..20,000 and delete 1,500 consecutive keys at another (records of 1-200 bytes)
WRITER = r"""
import random, sys, appliance
db = appliance.connect(sys.argv[1]); rng = random.Random(int(sys.argv[2])); n = int(sys.argv[3])
have = set()
for i in range(n):
    lo = rng.randrange(20_000)
    with db.transaction(program="r0", input={"i": i, "lo": lo}) as tx:
        for k in range(lo, lo + 1500):
            if i % 2 == 0:
                tx.put("accounts", k, {"branch": "b" * rng.randrange(1, 200), "balance": k})
                have.add(k)
            elif k in have:
                tx.delete("accounts", k)
                have.discard(k)
print("done", len(have))
"""

#: a client of the secondary: open a snapshot, read len(), hold it a while, until the stop file exists
SNAPSHOTS = r"""
import os, random, sys, time, appliance
db = appliance.connect(sys.argv[1]); stop = sys.argv[2]; lo, hi = float(sys.argv[3]), float(sys.argv[4])
rng = random.Random(5); n = 0
for _ in range(2000):
    if os.path.exists(stop):
        break
    with db.snapshot() as snap:
        len(snap.table("accounts"))
        time.sleep(rng.uniform(lo, hi))
    n += 1
print("snapshots", n)
"""


@pytest.mark.parametrize("mode, serve_reads, hold", [
    ("sync", True, (0.05, 0.5)),
    ("async", True, (0.05, 0.5)),
    ("sync", True, (1.0, 3.0)),      # longer snapshots
    ("sync", False, (0.05, 0.5)),    # an lz4 secondary: the snapshots are held on the primary
], ids=["sync", "async", "long-snapshots", "lz4"])
def test_writes_with_snapshots_held_on_the_secondary(make_cluster, tmp_path, mode, serve_reads, hold):
    """The issue's workload: the secondary's controller keeps applying (no apply_failed_exiting),
    the primary's transactions all commit, and afterwards verify finds the pair identical with
    the same record count."""
    c = make_cluster(secondaries=((mode, ""),), segment_size="32MiB",
                     secondary_replication=f"serve_reads = {'true' if serve_reads else 'false'}").start()
    p, s = c.primary.app, c.secondaries[0].app
    stop = tmp_path / "stop"
    reader_on = s if serve_reads else p
    readers = [reader_on.spawn(SNAPSHOTS, str(stop), str(hold[0]), str(hold[1]),
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    writer = p.spawn(WRITER, "7", "24", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = writer.communicate(timeout=300)
    stop.touch()
    for r in readers:
        rout, _ = r.communicate(timeout=60)
        assert r.returncode == 0 and int(rout.split()[-1]) > 0, rout
    failed = [e for e in s.controller.events() if e.get("event") == "apply_failed_exiting"]
    assert failed == [] and s.controller.proc.poll() is None, failed
    assert writer.returncode == 0 and out.startswith("done"), err[-2000:]
    c.wait_caught_up()
    rc, res = c.verify()
    assert rc == 0 and res["identical"], res
    with appliance.connect(p.config) as db:
        count = len(db.table("accounts"))
    assert count == int(out.split()[1]) > 0
    if serve_reads:
        with appliance.connect(s.config) as sdb:
            assert len(sdb.table("accounts")) == count
