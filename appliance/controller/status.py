"""What the controller says about itself: HELLO (who it is, to a client that
connects) and STATUS (everything `appliance status` shows), put together
from each part's own report.
"""
from __future__ import annotations

import os
import time

from .. import errors
from .._native import lib
from ..wire import messages as m
from .devices import device_status
from .ops import handler

__all__ = ["status", "serials_behind", "secondary_lag"]


def status(ctl) -> dict:
    st = ctl.writer.stats()
    sb = ctl.att.sb
    tables = [{"name": name, "records": ctl.reader.count(t.file, sb.sb_version), "primary_key": t.pk,
               "alternate_keys": list(t.alt)} for name, t in ctl.schema.tables.items()]
    pub = sb.sb_pub[sb.sb_version & 1]
    txc = ctl.txns.counters
    return {
        "name": ctl.cfg.name,
        "pid": os.getpid(),
        "instance": sb.sb_instance,
        "role": ctl.role.name,
        "epoch": ctl.role.epoch,
        "version": sb.sb_version,
        "started_ns": ctl.started_ns,
        "uptime_s": (time.time_ns() - ctl.started_ns) / 1e9,
        "block_size": sb.sb_block_size,
        "memory": {"bytes_used": st["bytes_used"], "compressed": ctl.att.compressed,
                   "bytes_live": st["bytes_live"] if ctl.att.compressed else st["bytes_used"],
                   "prefault": ctl.prefault.status() if ctl.prefault is not None else None,
                   "huge_pages": ctl.huge_pages},
        "segments": device_status(ctl, st),
        "blocks": {"used": st["blocks_used"], "max": st["max_blocks"],
                   "slots_total": st["slots_total"], "slots_free": st["slots_free"],
                   "old_versions_pending": st["retire_pending"]},
        "tables": tables,
        "transactions": {"active": len(ctl.txns.active), "committed": txc["committed"],
                         "cancelled": txc["cancelled"], "deadlocks": txc["deadlocks"],
                         "lock_timeouts": txc["lock_timeouts"], "last_txn": pub.pb_txn,
                         "next_txn": sb.sb_txn_next, "locks_held": len(ctl.locks),
                         "idle_cancelled": txc["idle_cancelled"], "batches": ctl.commits.batches,
                         "lock_waits": txc["lock_waits"], "cancelled_by_reason": dict(ctl.txns.cancelled_by),
                         "commit_latency": ctl.commits.latency.snapshot()},
        "readers": ctl.readers.status(st, sb.sb_nreaders),
        "log": {"head": st["log_head"], "tail": st["log_tail"], "size": st["log_size"], "serial": st["serial"]},
        "clients": {"connected": len(ctl.sessions), "refused": ctl.counters["clients_refused"],
                    "dropped": ctl.counters["clients_dropped"], "queued_peak": ctl.queued_peak, "requests": ctl.requests,
                    # accept() failures (out of descriptors or memory) since the last connection accepted
                    "accept_failures": ctl.accept_failures},
        "recovery": ctl.recovery,
        "failover": ctl.failover.status(),
        "repair": ctl.repairs.status(),
        "devices": ctl.devices.status(),
        "replication": _replication(ctl),
        "durability": ctl.durable.status() if ctl.durable is not None else None,
        "history": ctl.history.status(),
    }


def _replication(ctl) -> dict | None:
    role = ctl.role
    if role.is_primary:
        # the acknowledgements the agent stored, and the commits they release (never a
        # commit shown waiting for no one)
        ctl.commits.release_backed_up()
        st = ctl.sync.status()
        st["agent"] = {k: v for k, v in ctl.agents.status().items() if k != "secondaries"}
        behind = serials_behind(ctl)
        for name, x in st["secondaries"].items():
            x["lag"]["serials"] = behind[name]
        return st
    if role.is_secondary:
        return {"role": "secondary", "primary": " or ".join(ctl.cfg.replication.primaries) if ctl.cfg.replication else None,
                **ctl.applier.status(), "agent": ctl.agents.status(), "lag": secondary_lag(ctl)}
    return None


def serials_behind(ctl) -> dict[str, int]:
    """On a primary: per secondary, the log serials published here that it has
    not acknowledged."""
    published = ctl.agents.published_serial()
    return {name: max(0, published - acked) for name, acked in ctl.sync.acked.items()}


def secondary_lag(ctl) -> dict:
    """On a secondary: how far behind its primary it is, as its agent last
    reported — serials (the primary's latest serial its agent heard of, less
    the serial applied here; None before the agent heard from the primary),
    seconds (the age of the newest message's primary timestamp when it came)
    and whether the primary is connected."""
    st = ctl.agents.state
    applied = ctl.agents.applied_serial()[0]
    head = st.get("primary_serial")
    return {"serials": max(0, head - applied) if type(head) is int and head else None,
            "seconds": st.get("primary_time_lag_s"), "connected": bool(st.get("connected")),
            "primary_serial": head}


@handler(m.OP_HELLO)
def hello(ctl, sess, version, name, pid=None):
    if version != m.PROTOCOL_VERSION:
        raise errors.ProtocolError(f"hello: protocol version {version!r} is not supported "
                                   f"(controller speaks {m.PROTOCOL_VERSION})")
    if pid is not None and pid != sess.pid:
        # its reader slots carry the pid it sees; the controller knows readers by SO_PEERCRED
        ctl.log.warning("client_refused", pid=sess.pid, uid=sess.uid, claimed_pid=pid, reason="pid_namespace")
        raise errors.AccessDeniedError(
            f"connect to appliance {ctl.cfg.name!r}: this process is pid {pid!r} in its pid "
            f"namespace but pid {sess.pid} in the controller's: clients must share the controller's "
            "pid namespace (reader slots are tied to pids)", pid=sess.pid, claimed_pid=str(pid))
    sess.name = str(name)[:64]
    sess.start = lib.apl_pid_start(sess.pid)
    sb = ctl.att.sb
    return {"name": ctl.cfg.name, "instance": sb.sb_instance, "epoch": sb.sb_epoch, "role": ctl.role.name,
            "schema_hash": sb.sb_schema_hash, "pid": os.getpid(), "version": sb.sb_version}


@handler(m.OP_STATUS)
def status_op(ctl, sess):
    return status(ctl)
