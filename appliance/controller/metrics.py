"""The Prometheus endpoint of a controller (``[metrics] listen = "host:port"``).

One endpoint per appliance: the controller serves its own figures and those
its replication agent reports to it (the agent's relays or applier, every
heartbeat), so operators scrape one address per appliance and the agent
opens no port of its own. Names follow Prometheus conventions: the
``appliance_`` prefix, base units (``_seconds``, ``_bytes``), ``_total`` on
counters; a secondary is a label (``secondary="bank-dr"``), so is a device.
README "Metrics" lists them; ``config/grafana-dashboard.json`` charts them.

Concurrency: what is shared, who writes, who reads, why it is safe
================================================================
The scrapes are served by prometheus_client's HTTP server on a thread of
its own; the controller's loop never waits for it.

- ``MetricsServer.snapshot``: written by the loop thread only, once per
  housekeeping round (a second): it builds a new dict (``status()``, the
  same facts ``appliance status`` shows, plus the time it was taken) and
  rebinds the attribute to it. Nothing mutates a dict once published. The
  scrape thread reads the attribute once per scrape — a single reference
  load, atomic under the GIL — and then only reads that dict, so it sees one
  consistent second of the controller, never a half-updated one, and takes
  no lock the loop could wait for. A scrape's figures are at most a second
  old (``appliance_metrics_snapshot_age_seconds``).
- Overflow-chain lengths are read by the scrape thread itself from shared
  memory through the controller's :class:`~appliance.store.reader.Reader`
  (thread-safe: per-thread buffers; the walk pins its own reader slot, as any
  client does), never from the writer's process-local state, which only the
  loop thread touches. A pin held for one walk keeps old block versions for
  that long, like any reader's.
- The cost the loop pays: building the snapshot (``status()``, O(1) in the
  data: counters, per-table counts from the meta blocks) once a second, and
  the GIL while a scrape renders its text (a few hundred microseconds per
  scrape).
"""
from __future__ import annotations

import time

from .._os.net import bind_error
from .._version import __version__
from ..config import parse_address

__all__ = ["MetricsServer"]


class MetricsServer:
    """The HTTP endpoint and the snapshot it serves (see the module docstring)."""

    def __init__(self, cfg, log) -> None:
        self.cfg = cfg
        self.log = log
        self.ctl = None
        self.reader = None
        self.max_chain = cfg.storage.max_overflow + 1
        self.snapshot: dict | None = None   # None until attach(): a scrape then shows process_* only
        self.httpd = None
        self.thread = None

    def start(self) -> None:
        """Bind and serve, before the controller makes or opens anything: a
        listen address that cannot be bound refuses the start (net.bind_error)
        and leaves nothing behind."""
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        ProcessCollector(registry=registry)
        host, port = parse_address(self.cfg.metrics.listen)
        try:
            self.httpd, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise bind_error(self.cfg.path, "metrics.listen", self.cfg.metrics.listen, exc) from None
        self.log.info("metrics_listening", address=self.cfg.metrics.listen)

    def attach(self, ctl) -> None:
        """The controller serves: its figures from now on (its reader before
        the first snapshot, which is what the scrape thread looks at)."""
        self.ctl = ctl
        self.reader = ctl.reader
        self.publish()

    def publish(self) -> None:
        """The loop thread, once a second: a new snapshot for the scrapes."""
        self.snapshot = {"at": time.time(), "status": self.ctl.status()}

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


class _Collector:
    """Turns the published snapshot into metric families, on the scrape thread."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.server.snapshot   # one reference load: this scrape's consistent second
        if snap is None:
            return
        st = snap["status"]

        def gauge(name, doc, value=None, labels=(), samples=()):
            g = GaugeMetricFamily(name, doc, value=value if not labels else None, labels=list(labels) or None)
            for lv, v in samples:
                g.add_metric(list(lv), v)
            return g

        def counter(name, doc, value=None, labels=(), samples=()):
            c = CounterMetricFamily(name, doc, value=value if not labels else None, labels=list(labels) or None)
            for lv, v in samples:
                c.add_metric(list(lv), v)
            return c

        yield gauge("appliance_info", "The appliance this endpoint reports on (value 1)", labels=(
            "appliance", "role", "package_version"), samples=[((st["name"], st["role"], __version__), 1)])
        yield gauge("appliance_epoch", "The appliance's epoch (a failover increments it)", st["epoch"])
        yield gauge("appliance_published_version", "The latest published version of the database", st["version"])
        yield gauge("appliance_start_time_seconds", "When the controller started (Unix time)", st["started_ns"] / 1e9)
        yield gauge("appliance_metrics_snapshot_age_seconds", "Age of the figures of this scrape",
                    max(0.0, time.time() - snap["at"]))

        tx = st["transactions"]
        yield counter("appliance_transactions_committed", "Transactions committed", tx["committed"])
        yield counter("appliance_transactions_cancelled", "Transactions cancelled, by reason", labels=("reason",),
                      samples=[((r,), n) for r, n in sorted(tx["cancelled_by_reason"].items())])
        yield gauge("appliance_transactions_active", "Open transactions", tx["active"])
        yield counter("appliance_commit_batches", "Group-commit batches published", tx["batches"])
        lat = tx["commit_latency"]
        buckets = [(repr(le), c) for le, c in zip(lat["le"], lat["cumulative"])] + [("+Inf", lat["count"])]
        yield HistogramMetricFamily("appliance_commit_duration_seconds",
                                    "Commit latency: joining the group-commit queue to the batch being published",
                                    buckets=buckets, sum_value=lat["sum_s"])
        yield counter("appliance_lock_waits", "Statements that waited for a record lock", tx["lock_waits"])
        yield counter("appliance_lock_timeouts", "Transactions cancelled by controller.lock_timeout", tx["lock_timeouts"])
        yield counter("appliance_deadlocks", "Transactions cancelled as deadlock victims", tx["deadlocks"])
        yield gauge("appliance_locks_held", "Record locks held", tx["locks_held"])

        cl = st["clients"]
        yield gauge("appliance_clients_connected", "Client connections (the agent's included)", cl["connected"])
        yield counter("appliance_clients_refused", "Connections refused by [access]", cl["refused"])
        yield counter("appliance_clients_dropped", "Client connections dropped by the controller", cl["dropped"])
        yield gauge("appliance_table_records", "Records per table", labels=("table",),
                    samples=[((t["name"],), t["records"]) for t in st["tables"]])

        lg = st["log"]
        yield gauge("appliance_change_log_serial", "Serial of the latest change-log entry", lg["serial"])
        yield gauge("appliance_change_log_size_bytes", "Size of the change-log ring (storage.log_size)", lg["size"])
        yield gauge("appliance_change_log_retained_bytes", "Change log retained in the ring", lg["head"] - lg["tail"])

        segs = st["segments"]
        yield gauge("appliance_device_size_bytes", "Size of each storage device segment", labels=("device",),
                    samples=[((s["name"],), s["size"]) for s in segs])
        yield gauge("appliance_device_used_blocks", "Block slots in use per storage device", labels=("device",),
                    samples=[((s["name"],), s["used"]) for s in segs])
        yield gauge("appliance_device_free_blocks", "Free block slots per storage device", labels=("device",),
                    samples=[((s["name"],), s["free"]) for s in segs])
        yield gauge("appliance_device_in_service", "1: the storage device is in service; 0: detached or "
                    "being replaced", labels=("device",),
                    samples=[((s["name"],), int(s.get("state", "in service") == "in service")) for s in segs])
        job = (st.get("devices") or {}).get("replace")
        if job is not None:
            yield gauge("appliance_device_rebuild_progress_ratio", "A device replacement's refill: blocks "
                        "refilled / blocks to refill", labels=("device", "phase"),
                        samples=[((segs[job["device"]]["name"], job["phase"]),
                                  job["done"] / job["blocks"] if job["blocks"] else 1.0)])
        d = st.get("durability")
        if d is not None:
            yield gauge("appliance_durability_lag_bytes", "Change log queued for the log files and not written",
                        d["queued_bytes"])
            yield gauge("appliance_durability_lag_serials", "Serials published and not yet on disk",
                        max(0, lg["serial"] - d["durable_serial"]))
            yield gauge("appliance_durability_log_bytes_since_checkpoint", "Log bytes written since the last "
                        "checkpoint", d["log_bytes_since_checkpoint"])
            yield counter("appliance_durability_fsyncs", "fdatasync calls of the log files", d["fsyncs"])
        b = st["blocks"]
        yield gauge("appliance_block_numbers_used", "Block numbers in use (location table)", b["used"])
        yield gauge("appliance_block_numbers_max", "Block numbers the location table holds", b["max"])
        yield gauge("appliance_old_versions_pending", "Old block versions waiting to be freed", b["old_versions_pending"])
        yield gauge("appliance_memory_used_bytes", "Memory of blocks in use", st["memory"]["bytes_used"])
        hist = self.server.reader.chain_lengths(self.server.max_chain)
        last = len(hist)
        yield gauge("appliance_overflow_chains", "Primary blocks by the blocks in their chain (1: no overflow)",
                    labels=("blocks",),
                    samples=[((str(i + 1) if i + 1 < last else f"{last}+",), n) for i, n in enumerate(hist)])

        r = st["readers"]
        yield gauge("appliance_snapshot_pins", "Reader pins held (snapshots and reads in progress)", r["active"])
        yield gauge("appliance_oldest_pin_age_seconds", "Age of the oldest pin held (0: none)",
                    r.get("oldest_pin_age_s") or 0.0)
        yield gauge("appliance_old_versions_bytes", "Memory old versions kept for readers take", r["old_versions_bytes"])
        yield gauge("appliance_reader_slots_used", "Reader slots in use", r["slots_in_use"])
        yield gauge("appliance_reader_slots", "Reader slots (storage.max_readers)", r["slots"])

        rep = st.get("replication")
        if rep and rep.get("role") == "primary":
            yield from self._primary(rep, lg["size"], gauge, counter)
        elif rep and rep.get("role") == "secondary":
            yield from self._secondary(rep, gauge)
        yield from self._history(st, rep, gauge)

    @staticmethod
    def _history(st, rep, gauge):
        """The log history either role keeps (its agent's report), and how far back it reaches."""
        h = ((rep or {}).get("agent") or {}).get("history") or {}
        if h.get("enabled"):
            yield gauge("appliance_history_disk_bytes", "Log history on disk (closed parts, lz4)", h["disk_bytes"])
            yield gauge("appliance_history_current_bytes", "Log history's current part (appended to as it comes)",
                        h.get("current_bytes", 0))
            yield gauge("appliance_history_first_serial", "Oldest serial the log history keeps",
                        h["first_serial"] or 0)
            yield gauge("appliance_history_last_serial", "Newest serial the log history keeps", h["last_serial"] or 0)
        job = (st.get("history") or {}).get("progress")
        if job:
            done = job["part"] / job["parts"] if job.get("parts") else 0.0
            yield gauge("appliance_recovery_progress_ratio", "A restore, cancel or rerun running: parts committed / "
                        "parts (0 while its history is read)", labels=("op", "phase"),
                        samples=[((job.get("op", "?"), job.get("phase", "?")), done)])
        w = (st.get("history") or {}).get("rewind_window")
        if w and w.get("time_ns"):
            yield gauge("appliance_rewind_window_seconds", "How far back restore (or batch begin --at) can go",
                        max(0.0, time.time() - w["time_ns"] / 1e9))

    @staticmethod
    def _primary(rep, log_size, gauge, counter):
        secs = sorted(rep["secondaries"].items())
        lab = ("secondary", "mode")

        def per(name, doc, fn, kind=gauge):
            return kind(name, doc, labels=lab, samples=[((n, x["mode"]), fn(x)) for n, x in secs])

        agent = rep.get("agent") or {}
        yield gauge("appliance_agent_attached", "The replication agent is attached (1) or not (0)",
                    1 if agent.get("attached") else 0)
        if agent.get("reported_at"):
            yield gauge("appliance_agent_report_age_seconds", "Age of the agent's last report",
                        max(0.0, time.time() - agent["reported_at"]))
        yield gauge("appliance_commits_waiting_backup", "Committed transactions waiting for their secondaries",
                    rep["waiting_commits"])
        yield per("appliance_replication_lag_serials", "Log serials published and not acknowledged",
                  lambda x: x["lag"]["serials"])
        yield per("appliance_replication_lag_transactions", "Commits not acknowledged",
                  lambda x: x["lag"]["transactions"])
        yield per("appliance_replication_lag_bytes", "Change log not acknowledged (the backlog)",
                  lambda x: x["lag"].get("bytes", 0))
        yield per("appliance_replication_lag_seconds", "Age of the oldest commit not acknowledged",
                  lambda x: x["lag"]["seconds"])
        yield per("appliance_replication_backlog_ratio",
                  "Backlog against its cap, the change-log ring (a secondary past 1 is copied when it returns)",
                  lambda x: x["lag"].get("bytes", 0) / log_size if log_size else 0.0)
        yield per("appliance_replication_connected", "The secondary's link is up", lambda x: int(x["connected"]))
        yield per("appliance_replication_healthy", "Connected, streaming and in the quorum", lambda x: int(x["healthy"]))
        yield per("appliance_replication_degraded", "Taken out of the quorum by its policy", lambda x: int(x["degraded"]))
        yield per("appliance_replication_acked_serial", "The serial the secondary last acknowledged",
                  lambda x: x["acked_serial"])
        yield per("appliance_replication_connect_attempts", "Connection attempts failed since the link was last up",
                  lambda x: x.get("attempts", 0))
        yield per("appliance_replication_copies", "Block copies completed", lambda x: x.get("copies", 0), counter)
        yield per("appliance_replication_copying", "A block copy runs", lambda x: int(bool(x.get("copy"))))
        yield per("appliance_replication_copy_copied_blocks", "Blocks the running copy sent",
                  lambda x: (x.get("copy") or {}).get("blocks", 0))
        yield per("appliance_replication_copy_target_blocks", "Blocks the running copy sends in all",
                  lambda x: (x.get("copy") or {}).get("total", 0))

    @staticmethod
    def _secondary(rep, gauge):
        lag = rep.get("lag") or {}
        agent = rep.get("agent") or {}
        yield gauge("appliance_agent_attached", "The replication agent is attached (1) or not (0)",
                    1 if agent.get("attached") else 0)
        yield gauge("appliance_secondary_applied_serial", "The primary's serial applied here", rep["applied_serial"])
        if lag.get("serials") is not None:
            yield gauge("appliance_secondary_lag_serials", "Serials of the primary not applied here", lag["serials"])
        if lag.get("seconds") is not None:
            yield gauge("appliance_secondary_lag_seconds",
                        "Age of the primary's newest message when it arrived", lag["seconds"])
        yield gauge("appliance_secondary_primary_connected", "The primary's link is up", int(bool(lag.get("connected"))))
        yield gauge("appliance_secondary_copying", "A block copy from the primary runs", int(bool(rep.get("copying"))))
        yield gauge("appliance_secondary_needs_copy", "It refused the stream and waits for a block copy",
                    int(bool(rep.get("needs_copy"))))
        b = rep.get("batch") or {}
        yield gauge("appliance_batch_mode", "Referential batch mode: 0 off, 1 suspended (reads see one frozen "
                    "state), 2 catching up after it", {"suspended": 1, "catching_up": 2}.get(b.get("state"), 0))
        if b.get("backlog_bytes") is not None:
            yield gauge("appliance_batch_backlog_bytes", "Received in batch mode and not applied yet",
                        b["backlog_bytes"])
