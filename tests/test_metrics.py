"""The Prometheus endpoint (``[metrics] listen``), scraped on a real primary
with a synchronous and an asynchronous secondary (each a controller and an
agent), parsed with prometheus_client's own parser.

One cluster serves the whole module; every test reads figures as they are
when it starts and checks how they move, so the tests do not depend on each
other's order.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Cluster, free_port
from procs import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(make_module_appliance, tmp_path_factory):
    c = Cluster(make_module_appliance, tmp_path_factory.mktemp("metrics"),
                secondaries=(("sync", ""), ("async", "")), secondary_replication='history_dir = "history"')
    c.metrics = {}
    for node in c.nodes:
        port = free_port()
        node.app.config.write_text(node.app.config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        c.metrics[node.name] = port
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


def scrape(port: int) -> dict:
    """name -> {labels (sorted tuple of pairs) -> value}, as the parser reads the endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    want = set(labels.items())
    hits = [v for lv, v in m.get(name, {}).items() if want <= set(lv)]
    assert len(hits) == 1, f"{name} {labels}: {m.get(name)}"
    return hits[0]


def wait_for(port: int, pred, what: str, timeout: float = 30.0) -> dict:
    """Scrape until pred(metrics) holds (the figures are at most a second old).
    A gauge pred looks for that is not there yet (value() fails: a secondary
    shows its lag only once its agent has heard from the primary) counts as
    not yet."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        try:
            if pred(m):
                return m
            missing = None
        except AssertionError as exc:
            missing = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout}s" + (f" ({missing})" if missing else ""))
        time.sleep(0.1)


class TestEndpoint:
    def test_names_follow_the_conventions(self, pair):
        """Every family is appliance_* or process_*; counters end in _total; a primary reports per secondary."""
        port = pair.metrics[pair.primary.name]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        fams = list(text_string_to_metric_families(text))
        assert fams and all(f.name.startswith(("appliance_", "process_")) for f in fams)
        for f in fams:
            if f.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        m = wait_for(port, lambda m: value(m, "appliance_agent_attached") == 1, "the agent attached")
        assert value(m, "appliance_info", role="primary", appliance=pair.primary.name) == 1
        names = {s.name for s in pair.secondaries}
        lagging = {dict(lv)["secondary"] for lv in m["appliance_replication_lag_serials"]}
        assert lagging == names
        assert {dict(lv)["device"] for lv in m["appliance_device_free_blocks"]} == \
            {f"/apl.{pair.primary.name}.dev{i}" for i in range(2)}
        assert set(dict(lv)["blocks"] for lv in m["appliance_overflow_chains"]) == {"1", "2+"}

    def test_commits_move_the_counters_and_the_latency_histogram(self, pair):
        """20 commits: committed_total, the histogram's count and +Inf bucket, the table's records all move by 20."""
        port = pair.metrics[pair.primary.name]
        before = scrape(port)
        c0 = value(before, "appliance_transactions_committed_total")
        h0 = value(before, "appliance_commit_duration_seconds_count")
        r0 = value(before, "appliance_table_records", table="accounts")
        db = pair.primary.app.connect()
        acc = db.table("accounts")
        base = int(time.time() * 1000) % 1_000_000 * 100
        for i in range(20):
            acc[base + i] = {"branch": "m", "balance": i}
        m = wait_for(port, lambda m: value(m, "appliance_transactions_committed_total") >= c0 + 20, "20 commits")
        assert value(m, "appliance_transactions_committed_total") == c0 + 20
        assert value(m, "appliance_commit_duration_seconds_count") == h0 + 20
        assert value(m, "appliance_commit_duration_seconds_bucket", le="+Inf") == h0 + 20
        assert value(m, "appliance_commit_duration_seconds_sum") > 0
        assert value(m, "appliance_table_records", table="accounts") == r0 + 20
        assert sum(m["appliance_overflow_chains"].values()) >= 1

    def test_a_lock_wait_and_a_cancel_are_counted(self, pair):
        """A write waiting for a record lock counts in lock_waits_total; the holder's cancel in cancelled_total{reason=cancelled}."""
        port = pair.metrics[pair.primary.name]
        before = scrape(port)
        waits0 = value(before, "appliance_lock_waits_total")
        cancels0 = value(before, "appliance_transactions_cancelled_total", reason="cancelled")
        holder, writer = pair.primary.app.connect(), pair.primary.app.connect()
        key = 7_000_000 + int(time.time()) % 1000
        holder.table("accounts")[key] = {"branch": "l", "balance": 1}
        tx = holder.transaction()
        tx.__enter__()
        tx.get("accounts", key, for_update=True)

        def write() -> None:   # waits for the holder's lock
            writer.table("accounts")[key] = {"branch": "l", "balance": 2}

        t = threading.Thread(target=write)
        t.start()
        try:
            wait_for(port, lambda m: value(m, "appliance_lock_waits_total") >= waits0 + 1, "a lock wait")
        finally:
            tx.cancel()
            t.join(10)
        m = wait_for(port, lambda m: value(m, "appliance_transactions_cancelled_total", reason="cancelled")
                     >= cancels0 + 1, "the cancel counted")
        assert value(m, "appliance_transactions_cancelled_total", reason="cancelled") == cancels0 + 1
        assert holder.table("accounts")[key]["balance"] == 2

    def test_lag_grows_while_a_secondary_is_away_and_returns_to_zero(self, pair):
        """The async secondary's agent stopped: the primary shows it disconnected with serials, transactions and
        bytes behind; restarted: lag 0 again, and the secondary's own endpoint shows what it applied."""
        pport = pair.metrics[pair.primary.name]
        sync_sec, async_sec = pair.secondaries
        async_sec.agent.kill()
        pair.wait_state(async_sec.name, "disconnected")
        db = pair.primary.app.connect()
        acc = db.table("accounts")
        base = 8_000_000 + int(time.time()) % 1000 * 100
        for i in range(10):
            acc[base + i] = {"branch": "g", "balance": i}
        m = wait_for(pport, lambda m: value(m, "appliance_replication_lag_transactions",
                                            secondary=async_sec.name) >= 10, "the async secondary 10 behind")
        assert value(m, "appliance_replication_connected", secondary=async_sec.name) == 0
        assert value(m, "appliance_replication_healthy", secondary=async_sec.name) == 0
        assert value(m, "appliance_replication_lag_serials", secondary=async_sec.name) > 10
        assert value(m, "appliance_replication_lag_seconds", secondary=async_sec.name) > 0
        assert value(m, "appliance_replication_lag_serials", secondary=sync_sec.name) == 0
        assert value(m, "appliance_replication_connected", secondary=sync_sec.name) == 1
        async_sec.agent.start()
        m = wait_for(pport, lambda m: value(m, "appliance_replication_lag_serials", secondary=async_sec.name) == 0
                     and value(m, "appliance_replication_connected", secondary=async_sec.name) == 1, "caught up")
        assert value(m, "appliance_replication_lag_transactions", secondary=async_sec.name) == 0
        serial = value(m, "appliance_change_log_serial")
        sport = pair.metrics[async_sec.name]
        s = wait_for(sport, lambda s: value(s, "appliance_secondary_applied_serial") >= serial
                     and value(s, "appliance_secondary_lag_serials") == 0, "the secondary caught up")
        assert value(s, "appliance_info", role="secondary") == 1
        assert value(s, "appliance_secondary_primary_connected") == 1


class TestGoingBack:
    def test_history_rewind_window_and_batch_mode_of_a_secondary(self, pair):
        """A secondary with a log history serves its size and how far back it reaches; batch mode shows as 1
        while it lasts and 0 once it caught up."""
        db = pair.primary.app.connect()
        db.table("accounts")[int(time.time() * 1000) % 1_000_000 + 9_000_000] = {"branch": "m", "balance": 1}
        db.close()
        sec = pair.secondaries[1]
        port = pair.metrics[sec.name]
        m = wait_for(port, lambda m: "appliance_rewind_window_seconds" in m and "appliance_history_current_bytes" in m,
                     "the history's figures")
        assert value(m, "appliance_rewind_window_seconds") >= 0 and value(m, "appliance_history_last_serial") > 0
        assert value(m, "appliance_batch_mode") == 0
        sdb = sec.app.connect()
        try:
            sdb.batch("begin")
            wait_for(port, lambda m: value(m, "appliance_batch_mode") == 1, "batch mode")
        finally:
            sdb.batch("end")
            sdb.close()
        wait_for(port, lambda m: value(m, "appliance_batch_mode") == 0, "batch mode over")


class TestDashboard:
    def test_every_metric_it_charts_is_served(self, pair):
        """config/grafana-dashboard.json queries only metrics a primary or a secondary endpoint serves."""
        dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        charted = {n for e in exprs for n in re.findall(r"\b((?:appliance|process)_[a-z_]+)", e)}
        assert len(charted) >= 25
        served: set = set()
        for node in pair.nodes:
            served |= set(wait_for(pair.metrics[node.name], lambda m: "appliance_agent_attached" in m and
                                   (node is pair.primary or "appliance_history_disk_bytes" in m), "its figures"))
        # served only while a device replace or a restore runs, or with [durability] (tests/test_devices.py,
        # test_durability.py scrape those)
        now_and_then = {"appliance_device_rebuild_progress_ratio", "appliance_recovery_progress_ratio",
                        "appliance_durability_lag_bytes", "appliance_durability_log_bytes_since_checkpoint"}
        assert charted - served - now_and_then == set()


class TestDevices:
    def test_a_detached_device_shows_out_of_service_until_it_is_replaced(self, pair):
        from appliance.cli import recovery
        port = pair.metrics[pair.primary.name]
        cfg = pair.primary.app.config
        dev = f"/apl.{pair.primary.name}.dev1"
        assert value(scrape(port), "appliance_device_in_service", device=dev) == 1
        recovery.detach(cfg, 1)
        try:
            m = wait_for(port, lambda m: value(m, "appliance_device_in_service", device=dev) == 0, "detached")
            assert value(m, "appliance_device_in_service", device=f"/apl.{pair.primary.name}.dev0") == 1
        finally:
            pair.wait_caught_up()
            rep = recovery.replace(cfg, 1)
        assert rep["refilled"] == rep["blocks"]
        m = wait_for(port, lambda m: value(m, "appliance_device_in_service", device=dev) == 1, "in service")
        assert "appliance_device_rebuild_progress_ratio" not in m
