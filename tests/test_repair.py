"""Damaged blocks ([0123], partial recovery): every block's checksum, the
local check (`appliance verify`), and `appliance repair`, which copies only
the damaged blocks (or a table's, or a device's) again from a peer.

One pair is shared by the module: a primary and a synchronous secondary
that serves reads, real processes on loopback. A test damages bytes of a
block on purpose — by writing into the segment file in /dev/shm, as failing
memory would, without the controller — and shows detection and repair with
nothing else touched.
"""
from __future__ import annotations

import threading

import pytest

import appliance
from appliance import errors
from appliance._native import ffi, lib
from appliance.store.reader import Reader
from appliance.store.segment import Attachment

from conftest import Cluster
from fault_helpers import wait_for
from procs import cli, cli_json
from store_helpers import damage, slot_key


@pytest.fixture(scope="module")
def pair(make_module_appliance, tmp_path_factory):
    base = tmp_path_factory.mktemp("repair")
    c = Cluster(make_module_appliance, base, secondaries=(("sync", ""),), segment_size="16MiB")
    try:
        c.start()
        with appliance.connect(c.primary.app.config) as db:
            db.load("accounts", ({"id": i, "branch": f"b{i % 9}", "balance": 100 * i} for i in range(6000)))
        c.wait_caught_up()
        yield c
    finally:
        c.cleanup()


def leaves(name: str) -> list[tuple[int, int, int]]:
    """(number, device, slot) of the accounts leaf blocks of an appliance, from its location table."""
    att = Attachment(name, writable=False)
    try:
        out = []
        bsize = att.sb.sb_block_size
        limit = Reader(att).block_limit()
        for n in range(limit):
            a = att.view.v_loc[n]
            if a == 2 ** 64 - 1:
                continue
            seg, slot = a >> 48, a & 0xFFFFFFFFFFFF
            h = ffi.cast("struct apl_bhdr *", att.devices[seg].ptr + (slot + 1) * bsize)
            if h.bh_magic == lib.APL_BLK_LEAF and h.bh_file == 0 and h.bh_nslots > 5 and not h.bh_retired:
                out.append((n, seg, slot))
        return out
    finally:
        att.close()


def records(cfg) -> list[dict]:
    with appliance.connect(cfg) as db:
        return list(db.table("accounts").range())


class TestCheck:
    def test_an_undamaged_appliance_verifies_clean_locally_and_against_its_secondary(self, pair):
        """verify checks every block of the primary against its checksum, then compares the secondary."""
        rc, res = cli_json("verify", "--config", str(pair.primary.app.config))
        assert rc == 0 and res["identical"] and not res["local"]["damaged"] and res["local"]["checked"] > 20
        rc, res = cli_json("verify", "--config", str(pair.secondaries[0].app.config))   # a secondary: locally
        assert rc == 0 and res["secondaries"] == {} and res["local"]["checked"] > 20


class TestRepair:
    def test_a_damaged_block_on_the_secondary_is_found_and_copied_again_from_the_primary(self, pair):
        sec = pair.secondaries[0]
        (num, dev, slot), other = leaves(sec.name)[3], leaves(sec.name)[4]
        before = records(sec.app.config)
        damage(sec.name, dev, slot)
        rc, res = cli_json("verify", "--local", "--config", str(sec.app.config))
        assert rc == 1 and [d["block"] for d in res["local"]["damaged"]] == [num]
        assert res["local"]["damaged"][0]["file"] == "accounts" and res["local"]["damaged"][0]["devices"] == 1 << dev
        assert _reads_differ(sec.app.config, before)                     # the damage is real: a record changed
        rc, dry = cli_json("repair", "--dry-run", "--config", str(sec.app.config))
        assert rc == 0 and dry["blocks"] == [num] and dry["repaired"] == []
        assert cli_json("verify", "--local", "--config", str(sec.app.config))[0] == 1   # a dry run changes nothing
        rc, rep = cli_json("repair", "--yes", "--config", str(sec.app.config))
        assert rc == 0 and rep["repaired"] == [num] and rep["failed"] == []
        rc, res = cli_json("verify", "--config", str(pair.primary.app.config))
        assert rc == 0 and res["identical"], res
        assert records(sec.app.config) == before == records(pair.primary.app.config)
        assert other in leaves(sec.name)                                 # the other blocks stayed where they were

    def test_a_damaged_block_on_the_primary_is_refused_to_writes_then_repaired_from_the_secondary(self, pair):
        """A change to the damaged block fails with DamagedBlockError and changes nothing (the damage is not
        carried into a new version); repair copies it from the secondary while other writes go on."""
        p = pair.primary
        num, dev, slot = leaves(p.name)[5]
        db = p.app.connect()
        acc = db.table("accounts")
        victim = max(_keys_of(p.name, num))    # the damage hits the heap's end: the block's smallest key
        expected = acc[victim]
        damage(p.name, dev, slot)
        with pytest.raises(errors.DamagedBlockError):
            acc[victim] = {"branch": "x", "balance": 0}
        stop = threading.Event()
        written = []

        def writer():
            with appliance.connect(p.app.config) as w:
                i = 0
                while not stop.is_set():
                    w.table("accounts")[100_000 + i] = {"branch": "w", "balance": i}
                    written.append(i)
                    i += 1
        t = threading.Thread(target=writer)
        t.start()
        try:
            wait_for(lambda: len(written) > 20, 20, what="writes")
            rc, rep = cli_json("repair", "--yes", "--config", str(p.app.config))
            assert rc == 0 and rep["repaired"] == [num] and rep["source"] == pair.secondaries[0].name
            n = len(written)
            wait_for(lambda: len(written) > n + 20, 20, what="writes after the repair")
        finally:
            stop.set()
            t.join()
        acc[victim] = dict(expected, balance=expected["balance"] + 1)   # the block takes changes again
        assert acc[victim]["balance"] == expected["balance"] + 1
        db.close()
        pair.wait_caught_up()
        rc, res = cli_json("verify", "--config", str(p.app.config))
        assert rc == 0 and res["identical"], res
        assert records(p.app.config) == records(pair.secondaries[0].app.config)

    def test_a_table_or_a_device_is_repaired_as_a_whole(self, pair):
        sec = pair.secondaries[0]
        rc, by_table = cli_json("repair", "--dry-run", "--table", "accounts", "--config", str(sec.app.config))
        assert rc == 0 and set(n for n, _, _ in leaves(sec.name)) <= set(by_table["blocks"])
        rc, by_dev = cli_json("repair", "--dry-run", "--device", "1", "--config", str(sec.app.config))
        on_dev = {n for n, d, _ in leaves(sec.name) if d == 1}
        assert rc == 0 and on_dev and on_dev <= set(by_dev["blocks"])
        rc, rep = cli_json("repair", "--yes", "--device", "1", "--config", str(sec.app.config))
        assert rc == 0 and rep["repaired"] == by_dev["blocks"]
        rc, res = cli_json("verify", "--config", str(pair.primary.app.config))
        assert rc == 0 and res["identical"], res

    def test_device_list_shows_each_segments_blocks_and_checksum_health(self, pair):
        sec = pair.secondaries[0]
        num, dev, slot = leaves(sec.name)[7]
        rc, devs = cli_json("device", "list", "--config", str(sec.app.config))
        assert rc == 0 and [d["index"] for d in devs] == [0, 1] and all(d["state"] == "in service" for d in devs)
        assert sum(d["blocks"] for d in devs) >= len(leaves(sec.name)) and all(d["damaged"] == 0 for d in devs)
        damage(sec.name, dev, slot)
        rc, devs = cli_json("device", "list", "--config", str(sec.app.config))
        assert rc == 1 and [d["damaged"] for d in devs] == [int(i == dev) for i in range(2)]
        r = cli("device", "list", "--config", str(sec.app.config))
        assert "DAMAGED" in r.stdout and f"repair --device {dev}" in r.stdout
        rc, rep = cli_json("repair", "--yes", "--device", str(dev), "--config", str(sec.app.config))
        assert rc == 0 and num in rep["repaired"]
        rc, devs = cli_json("device", "list", "--config", str(sec.app.config))
        assert rc == 0 and all(d["damaged"] == 0 for d in devs)

    @pytest.mark.parametrize("args, code, says", [
        (("--blocks", "4,x"), 2, "expected block numbers"),
        (("--blocks", "99999999"), 1, "block numbers below"),
        (("--table", "nosuch"), 1, "no table 'nosuch'"),
        (("--device", "7"), 1, "device must be 0..1"),
        (("--table", "accounts", "--device", "0"), 1, "at most one of"),
    ])
    def test_bad_arguments_are_refused_and_change_nothing(self, pair, args, code, says):
        r = cli("repair", "--yes", "--config", str(pair.secondaries[0].app.config), *args)
        assert r.returncode == code and says in r.stderr
        assert cli("verify", "--config", str(pair.primary.app.config)).returncode == 0


def _reads_differ(cfg, before: list[dict]) -> bool:
    """Reading the damaged table gives other records, or fails to decode one."""
    try:
        return records(cfg) != before
    except errors.CorruptionError:   # the damaged bytes are no valid record image any more
        return True


def _keys_of(name: str, number: int) -> list[int]:
    """The primary keys of the records in leaf block `number` (read from its slots)."""
    from appliance.store.keys import decode_int
    att = Attachment(name, writable=False)
    try:
        bsize = att.sb.sb_block_size
        a = att.view.v_loc[number]
        base = att.devices[a >> 48].ptr + ((a & 0xFFFFFFFFFFFF) + 1) * bsize
        h = ffi.cast("struct apl_bhdr *", base)
        slots = ffi.cast("struct apl_slot *", base + ffi.sizeof("struct apl_bhdr"))
        return [decode_int(slot_key(base, slots[i])) for i in range(h.bh_nslots)]
    finally:
        att.close()
