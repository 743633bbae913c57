"""Storage devices out of service and replaced ([0125], [0127], [0129]–[0132]):
`appliance device detach` makes exactly the blocks on a device segment
unavailable (DeviceUnavailableError naming it; everything else works), and
`appliance device replace` gives it a new segment refilled with exactly its
blocks from a peer — with commits waiting, or online under load — on a
primary (from its secondary) and on a secondary (from its primary).

One pair is shared by the module: a primary and a synchronous secondary
that serves reads, real processes on loopback. Each test leaves every
device in service, the pair identical.
"""
from __future__ import annotations

import random
import threading

import pytest

import appliance
from appliance import errors
from appliance._native import ffi, lib
from appliance.cli import recovery
from appliance.store.segment import Attachment

from conftest import Cluster
from procs import cli, cli_json

ACCOUNTS = 6000
START = 1000


@pytest.fixture(scope="module")
def pair(make_module_appliance, tmp_path_factory):
    base = tmp_path_factory.mktemp("devices")
    c = Cluster(make_module_appliance, base, secondaries=(("sync", ""),), segment_size="8MiB",
                segments=8)
    try:
        c.start()
        with appliance.connect(c.primary.app.config) as db:
            db.load("accounts", ({"id": i, "branch": f"b{i % 9}", "balance": START} for i in range(ACCOUNTS)))
        c.wait_caught_up()
        yield c
    finally:
        c.cleanup()


def leaf_only_devices(name: str) -> list[int]:
    """Devices holding leaves of accounts but no inner or meta block of any
    file (a detach of one holding a root makes its whole table unavailable)."""
    att = Attachment(name, writable=False)
    try:
        bsize, leaves, inner = att.sb.sb_block_size, set(), set()
        for n in range(att.sb.sb_max_blocks):
            a = att.view.v_loc[n]
            if a == 2 ** 64 - 1:
                continue
            seg, slot = a >> 48, a & 0xFFFFFFFFFFFF
            h = ffi.cast("struct apl_bhdr *", att.devices[seg].ptr + (slot + 1) * bsize)
            if h.bh_magic == lib.APL_BLK_LEAF and h.bh_level == 0:
                if h.bh_file == 0:
                    leaves.add(seg)
            else:
                inner.add(seg)
        return sorted(leaves - inner)
    finally:
        att.close()


def devices_of(name: str) -> list[int]:
    """The device segment of each block number in use (its location entry, raw)."""
    att = Attachment(name, writable=False)
    try:
        return [att.view.v_loc[n] >> 48 for n in range(att.sb.sb_max_blocks) if att.view.v_loc[n] != 2 ** 64 - 1]
    finally:
        att.close()


def read_all(cfg) -> tuple[dict, dict]:
    """(balances readable, {id: the error}) of every account, read one by one."""
    got, failed = {}, {}
    with appliance.connect(cfg) as db:
        t = db.table("accounts")
        for i in range(ACCOUNTS):
            try:
                got[i] = t.get(i)["balance"]
            except errors.ApplianceError as e:
                failed[i] = e
    return got, failed


def transfers(cfg, stop: threading.Event, seed: int) -> dict:
    """Move money between random accounts until `stop`; what was acknowledged and refused."""
    rng = random.Random(seed)
    out = {"ok": 0, "unavailable": 0, "other": []}
    with appliance.connect(cfg) as db:
        while not stop.is_set():
            a, b = rng.sample(range(ACCOUNTS), 2)
            try:
                with db.transaction(program="transfer", input={"a": a, "b": b}) as tx:
                    ra = tx.get("accounts", a, for_update=True)
                    rb = tx.get("accounts", b, for_update=True)
                    tx.update("accounts", a, {"balance": ra["balance"] - 7})
                    tx.update("accounts", b, {"balance": rb["balance"] + 7})
                out["ok"] += 1
            except errors.DeviceUnavailableError:
                out["unavailable"] += 1
            except errors.ApplianceError as e:
                out["other"].append(repr(e))
    return out


def run_load(cfg, clients: int = 3):
    stop = threading.Event()
    results: list[dict] = []
    threads = [threading.Thread(target=lambda s=s: results.append(transfers(cfg, stop, s))) for s in range(clients)]
    for t in threads:
        t.start()

    def finish() -> list[dict]:
        stop.set()
        for t in threads:
            t.join(60)
        return results
    return finish


def total(cfg) -> int:
    with appliance.connect(cfg) as db:
        with db.snapshot() as snap:
            return sum(r["balance"] for r in snap.table("accounts").range())


class TestDetach:
    def test_a_detached_device_makes_exactly_its_blocks_unavailable_until_replaced(self, pair):
        cfg = pair.primary.app.config
        before, none = read_all(cfg)
        assert not none
        dev = leaf_only_devices(pair.primary.name)[0]
        rc, rep = cli_json("device", "detach", "--yes", "--config", str(cfg), str(dev))
        assert rc == 0 and rep["device"] == dev and rep["state"] == "detached" and rep["blocks"] > 0
        got, failed = read_all(cfg)
        assert failed and got, f"some accounts live on device {dev}, others elsewhere"
        assert all(isinstance(e, errors.DeviceUnavailableError) and e.details["devices"] == str(dev)
                   for e in failed.values())
        assert f"device {dev}" in str(next(iter(failed.values())))
        assert {i: before[i] for i in got} == got                  # the rest reads as before
        k_off, k_on = next(iter(failed)), max(got)
        with appliance.connect(cfg) as db:
            with pytest.raises(errors.DeviceUnavailableError) as ei:
                with db.transaction() as tx:
                    tx.update("accounts", k_off, {"balance": 1})
            assert ei.value.details["devices"] == str(dev)
            with db.transaction() as tx:                              # a block in service takes changes
                tx.update("accounts", k_on, {"balance": before[k_on] + 5})
        devs = {d["index"]: d for d in recovery.devices(cfg)}
        assert devs[dev]["state"] == "detached" and devs[dev]["unavailable"] == rep["blocks"]
        assert all(d["state"] == "in service" for i, d in devs.items() if i != dev)
        assert pair.status()["devices"]["detached"] == [dev]
        shown = cli("status", "--config", str(cfg)).stdout
        assert f"DETACHED device(s) {dev}" in shown and "detached" in shown
        rc, frame = cli_json("top", "--config", str(cfg), "--interval", "0.2")
        assert rc == 0 and f"device {dev} detached" in frame["problems"]
        assert frame["devices"][dev]["state"] == "detached"
        # nothing new lands on it meanwhile
        with appliance.connect(cfg) as db:
            for i in range(200):
                if i in got:
                    with db.transaction() as tx:
                        tx.update("accounts", i, {"balance": before[i]})
        rc, res = cli_json("device", "replace", "--yes", "--config", str(cfg), str(dev))
        assert rc == 0, res
        assert res["refilled"] == res["blocks"] == rep["blocks"] and res["failed"] == [] and res["mode"] == "offline"
        assert res["source"] == pair.secondaries[0].name and res["moved"] > 0
        got2, failed2 = read_all(cfg)
        assert not failed2 and got2 == {**before, k_on: before[k_on] + 5}
        devs = {d["index"]: d for d in recovery.devices(cfg)}
        assert all(d["state"] == "in service" for d in devs.values()) and devs[dev]["blocks"] > 0
        assert pair.status()["devices"]["detached"] == []
        assert devices_of(pair.primary.name).count(dev) == rep["blocks"]                   # its blocks are back on the new segment
        pair.wait_caught_up()
        assert pair.verify()[0] == 0

    def test_bad_device_numbers_and_options_are_refused_with_nothing_changed(self, pair):
        cfg = pair.primary.app.config
        r = cli("device", "detach", "--yes", "--config", str(cfg), "99")
        assert r.returncode == 1 and "device must be a device segment number 0..7" in r.stderr
        with pytest.raises(errors.WrongTypeError):
            recovery.replace(cfg, 0, timeout=-1)
        assert pair.status()["devices"]["detached"] == []


class TestRestart:
    def test_a_device_stays_detached_across_a_controller_restart_and_is_replaced_after_it(self, pair):
        cfg = pair.primary.app.config
        before, _ = read_all(cfg)
        dev = leaf_only_devices(pair.primary.name)[0]
        n = recovery.detach(cfg, dev)["blocks"]
        pair.primary.app.restart()         # crash recovery rebuilds the location table from the chains
        assert pair.status()["devices"]["detached"] == [dev]
        got, failed = read_all(cfg)
        assert failed and all(isinstance(e, errors.DeviceUnavailableError) for e in failed.values())
        assert {i: before[i] for i in got} == got
        pair.wait_state(pair.secondaries[0].name, "streaming")
        rep = recovery.replace(cfg, dev)
        assert rep["refilled"] == rep["blocks"] == n
        assert read_all(cfg) == (before, {})
        pair.wait_caught_up()
        assert pair.verify()[0] == 0


class TestReplaceUnderLoad:
    @pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
    def test_replace_of_a_primary_device_under_transfers_conserves_the_total(self, pair, online):
        cfg = pair.primary.app.config
        want = total(cfg)
        finish = run_load(cfg)
        try:
            dev = leaf_only_devices(pair.primary.name)[-1]
            recovery.detach(cfg, dev)
            seen: list[dict] = []
            rep = recovery.replace(cfg, dev, online=online, progress=seen.append)
        finally:
            results = finish()
        assert rep["failed"] == [] and rep["refilled"] == rep["blocks"] > 0
        assert rep["mode"] == ("online" if online else "offline")
        assert {s["phase"] for s in seen} <= {"refill", "renew", "fill", "done"} and seen[-1]["phase"] == "done"
        assert seen[-1]["done"] == rep["blocks"]
        assert all(not r["other"] for r in results), results
        assert sum(r["ok"] for r in results) > 0
        assert total(cfg) == want                                  # nothing half-applied, nothing lost
        assert not read_all(cfg)[1]
        pair.wait_caught_up()
        assert pair.verify()[0] == 0
        assert total(pair.secondaries[0].app.config) == want


class TestSecondaryDevice:
    def test_a_secondary_device_is_refilled_from_the_primary_while_it_keeps_running(self, pair):
        sec = pair.secondaries[0].app.config
        cfg = pair.primary.app.config
        want = total(cfg)
        dev = leaf_only_devices(pair.secondaries[0].name)[0]
        rc, rep = cli_json("device", "detach", "--yes", "--config", str(sec), str(dev))
        assert rc == 0 and rep["blocks"] > 0
        _, failed = read_all(sec)
        assert failed and all(isinstance(e, errors.DeviceUnavailableError) for e in failed.values())
        finish = run_load(cfg, clients=2)                           # the primary keeps committing
        try:
            rc, res = cli_json("device", "replace", "--yes", "--config", str(sec), str(dev))
        finally:
            results = finish()
        assert rc == 0, res
        assert res["role"] == "secondary" and res["refilled"] == res["blocks"] and res["moved"] > 0
        assert all(not r["other"] and r["unavailable"] == 0 for r in results), results
        pair.wait_caught_up()
        assert pair.verify()[0] == 0
        assert not read_all(sec)[1] and total(sec) == want == total(cfg)


class TestStore:
    """The C helpers in-process (cext/apl_devices.c): what a detach marks,
    that nothing is placed on a detached device, that it is renewed only
    once no pin can read a version there, and the slot accounting after."""

    def test_detach_refill_renew_fill_keeps_every_record_and_every_slot(self, stores):
        from store_helpers import audit_slots, check_state
        s = stores(nsegments=8, block_size=4096, segment_size=1 << 20)
        wr, r = s.writer, s.reader
        model = {}
        s.begin()
        for i in range(3000):
            k, v = i.to_bytes(4, "big"), bytes([i % 251]) * (20 + i % 40)
            wr.put(0, k, v, lib.APL_PUT_INSERT)
            model[k] = v
        s.publish()
        limit = r.block_limit()
        images = {n: r.block_image(n) for n in range(limit)}
        images = {n: im for n, im in images.items() if im}
        def on(dev: int) -> list[int]:          # numbers with a block of their chain on `dev`
            infos, _ = wr.check_blocks(0, r.block_limit(), False, 1 << 16)
            return [b["number"] for b in infos if b["devices"] >> dev & 1]
        inner = {n for n, im in images.items() if int.from_bytes(im[4:8], "little") != lib.APL_BLK_LEAF}
        dev = next(d for d in range(8) if on(d) and not set(on(d)) & inner)
        numbers = on(dev)
        old = s.pin()                                          # a reader that still sees the old version
        assert wr.detach_device(dev) == len(numbers) == wr.device_marked(dev)
        missing = [k for k in model if _fails(r, k)]
        assert missing and len(missing) < len(model)
        # changes go on elsewhere; nothing new is placed on the device
        s.begin()
        for i in range(3000, 3400):
            k = i.to_bytes(4, "big")
            wr.put(0, k, b"x" * 30, lib.APL_PUT_INSERT)
            model[k] = b"x" * 30
        s.publish()
        assert set(on(dev)) == set(numbers)
        # refill from the images taken before (a peer's, at the same version)
        s.begin()
        for n in numbers:
            wr.apply_image(n, images[n])
        s.publish()
        assert wr.device_marked(dev) == 0
        check_state(s, model)
        assert not wr.renew_device(dev)                          # the old pin may read versions there
        old.close()
        s.pins.remove(old)
        wr.reclaim()
        assert wr.renew_device(dev)
        assert wr.stats()["segment_free"][dev] == wr.att.sb.sb_segment_slots
        s.begin()
        assert wr.fill_device(dev, numbers) == len(numbers)
        s.publish()
        assert sorted(on(dev)) == sorted(numbers)                 # exactly its blocks are back on it
        check_state(s, model)
        audit_slots(s)


def _fails(reader, key: bytes) -> bool:
    try:
        reader.get_raw(0, key)
        return False
    except errors.DeviceUnavailableError:
        return True
