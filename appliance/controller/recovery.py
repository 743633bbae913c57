"""Failover on the controller ([0123]–[0128]): promote, fence, rejoin, rewind.

**Promote** (OP_PROMOTE, a secondary): the secondary finishes what it
received and becomes the primary. If its agent is attached it is asked to
*drain* first (an ask in its WATCH long poll, answered with OP_REPL_STATE):
it takes no new link from a primary, applies every whole transaction the
current link still brings until the link is quiet, and drops a transaction
it received only in part (never applied: a secondary applies whole
transactions only, so nothing of it needs undoing). Then, on this thread:
the allocator is rebuilt from shared memory (a secondary's free-number list
may hold numbers its primary re-created, harmless while only the primary
chose numbers), the change log restarts at the last applied primary serial F
— the new primary's serials continue the old primary's — and the fork (old
primary's instance, F) is kept in the superblock, so a secondary of the old
lineage that is at F resumes from the log instead of being copied, and one
that is past F is rewound. The role becomes primary at epoch max(own, seen) + 1;
the agent's sessions are dropped so it comes back as the primary's agent.
An lz4 secondary first has its backup blocks decompressed into primary
blocks in new segments, which take the appliance's segment names ([0128]:
see :meth:`Failover._expand`); one that serves reads keeps its memory as is.

**Fence** (OP_FENCE, a primary): it learnt of a newer epoch — a secondary
refused its stream with it (its agent says so) or an operator said so. From
then on it takes no writes (NotPrimaryError, see :meth:`.role.Role.fence`):
open transactions are cancelled, commits not applied yet are refused, and
commits waiting for a synchronous backup are answered NotPrimaryError (no
secondary confirmed them; the rewind undoes them at rejoin). Logged once,
loudly (``primary_fenced``, critical).

**Rejoin** (OP_REJOIN, a primary): fenced first if it was not; its applied
serial and source become its own (last serial, own instance): it "follows"
its own history up to there. It becomes a secondary (same epoch: the new
primary's higher one is learnt from its stream), its agent comes back as a
secondary agent, listens at ``replication.listen`` and accepts the primaries
``replication.primary`` names.

**Rewind** (OP_REWIND, from the agent, a secondary): the new primary's relay
found this secondary at or past the fork serial F of its lineage. From F on
it follows the new primary's instance (its serials continue the old one's).
If it is past F — it committed, or received, transactions the new primary
never got — what it holds past F is
undone from the B logs, newest first (apl_undo_entries: its own change log
on a former primary, the log history on a former secondary); the block
numbers whose structure changed past F are copied from the new primary
(a copy limited to them, apply.py), and until that copy ends
``sb_repair_pending`` is set, so a controller that restarts meanwhile asks
for a whole copy instead.

Shared: the superblock fields named above (meta segment; this thread
writes them, the agent and status read them). Everything else here is this
loop thread's.
"""
from __future__ import annotations

import time

from .. import errors
from .._native import ffi, lib
from ..store import changelog
from ..wire import messages as m
from .loop import WAIT_AGENT
from .ops import handler

__all__ = ["Failover"]

#: seconds promote waits for the agent's drain by default
DRAIN_TIMEOUT = 5.0


class Failover:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.promoted: dict | None = None       # the last promote's report (this controller's life)
        self.rejoined: dict | None = None
        self.rewound: dict | None = None
        self.repair: list[int] = []             # numbers waiting for a copy from the primary
        self._ask_seq = 0
        self._asked: dict[int, object] = {}     # ask id -> the operator's session waiting for the answer
        sb = ctl.att.sb
        if sb.sb_repair_pending and ctl.role.is_secondary and ctl.applier.needs_copy is None:
            ctl.applier.needs_copy = ("a block copy from the primary (after a rewind or a repair) did not "
                                      "finish before the controller stopped")
            ctl.log.warning("repair_interrupted_needs_copy")

    # ------------------------------------------------------------------ facts

    @property
    def fork(self) -> dict | None:
        sb = self.ctl.att.sb
        if not sb.sb_fork_instance:
            return None
        return {"instance": sb.sb_fork_instance, "serial": sb.sb_fork_serial}

    def agent_info(self) -> dict:
        """What OP_AGENT tells the agent about failover."""
        return {"fork": self.fork, "repair": self.repair}

    def status(self) -> dict:
        return {"fenced": self.ctl.role.fenced, "fork": self.fork, "promoted": self.promoted,
                "rejoined": self.rejoined, "rewound": self.rewound,
                "repair_pending": len(self.repair) if self.repair else bool(self.ctl.att.sb.sb_repair_pending)}

    # ------------------------------------------------------------------ the agent's answers

    def ask_agent(self, sess, ask: dict, timeout: float):
        """Put `ask` in the agent's WATCH long poll and wait for its answer
        (a generator; None when no answer came within `timeout`)."""
        ctl = self.ctl
        self._ask_seq += 1
        aid = self._ask_seq
        ctl.agents.asks.append(dict(ask, id=aid))
        self._asked[aid] = sess
        ctl.agents.wake_all()
        timer = ctl.add_timer(timeout, lambda: self._asked.pop(aid, None) and ctl.resume(sess, None))
        try:
            return (yield WAIT_AGENT)
        finally:
            ctl.cancel_timer(timer)
            self._asked.pop(aid, None)

    def answered(self, answer) -> None:
        if not isinstance(answer, dict):
            raise errors.WrongTypeError("repl_state: an answer must be a map")
        sess = self._asked.pop(answer.get("id"), None)
        if sess is not None:
            self.ctl.resume(sess, answer)

    def restart_agent(self) -> None:
        """Drop the agent's sessions: it asks the role again and runs that side."""
        ctl = self.ctl
        for x in list(ctl.sessions.values()):
            if x.agent:
                ctl.drop(x, "role_changed", log=False)

    # ------------------------------------------------------------------ promote

    def promote(self, sess, options):
        ctl = self.ctl
        opts = _options(options, "promote", {"drain_timeout"})
        drain_timeout = opts.get("drain_timeout", DRAIN_TIMEOUT)
        if type(drain_timeout) not in (int, float) or not 0 <= drain_timeout <= 600:
            raise errors.WrongTypeError("promote: drain_timeout must be seconds (0..600)")
        t0 = time.monotonic()
        self._check_promotable()
        drained = None
        if ctl.agents.attached():
            drained = yield from self.ask_agent(sess, {"kind": "drain", "timeout": float(drain_timeout)},
                                                drain_timeout + 5.0)
            if drained is None:
                self.log.error("promote_drain_unanswered", timeout=drain_timeout)
        if not ctl.role.is_secondary:     # another promote finished while this one waited
            raise errors.RoleError(f"promote: appliance {ctl.cfg.name!r} is {ctl.role.name} now", role=ctl.role.name)
        self._check_promotable()
        if isinstance(drained, dict) and drained.get("backlog_bytes"):
            raise errors.RoleError(f"promote: appliance {ctl.cfg.name!r} is still catching up after a batch "
                                   f"({drained['backlog_bytes']:,} bytes received not applied yet; batch status "
                                   "shows the time left); promote again once it is done", reason="batch")
        t_drained = time.monotonic()
        applied, source = ctl.agents.applied_serial()
        expanded = None
        if ctl.att.compressed:
            expanded = self._expand()    # (new segments: ctl.att is another attachment after it)
        sb = ctl.att.sb
        wr = ctl.writer
        # the allocator from shared memory alone (see the module docstring); an expanded store's is new
        rebuilt = {"blocks_live": expanded["blocks"]} if expanded else wr.recover()
        wr.begin()
        wr.log_restart(applied)
        wr.publish(time.time_ns(), 0)
        sb.sb_fork_instance = source
        sb.sb_fork_serial = applied
        seen = drained.get("epoch_seen", 0) if isinstance(drained, dict) else 0
        epoch = max(ctl.role.epoch, seen if type(seen) is int else 0) + 1
        previous = drained.get("primary") if isinstance(drained, dict) else None
        ctl.role.change("primary", epoch)
        if ctl.durable is not None:
            ctl.durable.history_changed(f"promoted at serial {applied}: the change log continues the old "
                                        "primary's serials")
        degraded = self._degrade_absent()
        heard = drained.get("heard", 0) if isinstance(drained, dict) else 0
        report = {
            "epoch": epoch, "serial": applied, "previous_primary": previous or "",
            "previous_instance": source,
            "drained": drained is not None, "agent_attached": drained is not None or ctl.agents.attached(),
            # serials the old primary had (as last heard) that this one did not apply: what it may have lost
            "behind_serials": max(0, heard - applied) if type(heard) is int else None,
            "heard_serial": heard, "heard_s_ago": (drained or {}).get("heard_s_ago"),
            "dropped": (drained or {}).get("partial"), "cut": bool((drained or {}).get("cut")),
            "expanded": expanded, "blocks_live": rebuilt["blocks_live"],
            "secondaries": [s.name for s in (ctl.cfg.replication.secondaries if ctl.cfg.replication else ())],
            "degraded": degraded,
            "drain_s": round(t_drained - t0, 3), "seconds": round(time.monotonic() - t0, 3),
        }
        self.promoted = dict(report, at=time.time())
        self.log.warning("promoted", **report)
        self.restart_agent()
        return report

    def _degrade_absent(self) -> list[str]:
        """Right after a promote no secondary is connected yet (the one it will
        serve is often the old primary, down): a synchronous one whose policy
        is "degrade" starts out of the quorum, so writes go on at once; it is
        back in once it has caught up (sync.py)."""
        sync = self.ctl.sync
        out = [n for n in sync.sync_names if sync.secondaries[n].on_unreachable == "degrade"]
        for name in out:
            sync.degraded.add(name)
            self.log.warning("secondary_degraded", secondary=name, reason="promoted: not connected yet")
        return out

    def _check_promotable(self) -> None:
        ctl = self.ctl
        app = ctl.applier
        name = ctl.cfg.name
        if app.copied is not None:
            raise errors.RoleError(f"promote: appliance {name!r} is receiving a block copy from its primary: its "
                                   "memory is not a consistent copy until the copy ends (appliance status shows "
                                   "its progress); wait for it or promote another secondary", reason="copying")
        if app.needs_copy is not None or ctl.att.sb.sb_repair_pending:
            why = app.needs_copy or "blocks wait for a copy from its primary"
            raise errors.RoleError(f"promote: appliance {name!r} does not hold a consistent copy ({why}); "
                                   "promote another secondary", reason="needs_copy")
        if not ctl.agents.applied_serial()[1]:
            raise errors.RoleError(f"promote: appliance {name!r} never received anything from a primary: "
                                   "there is nothing to take over", reason="empty")
        if ctl.batch.active:
            raise errors.RoleError(f"promote: appliance {name!r} is in batch mode: it has not applied what it "
                                   "received (and acknowledged) since the batch began; run `appliance batch end`, "
                                   "which applies it, then promote", reason="batch")

    def _expand(self) -> dict:
        """An lz4 secondary's promote ([0128]): its backup blocks are
        decompressed into primary blocks in new segments (made beside the old
        ones under a temporary name: /dev/shm must hold both meanwhile), which
        then take the appliance's segment names (rename: no client maps an lz4
        store) and are attached in place of the old ones. Applied serial,
        source, epoch and role carry over; the old segments are gone after."""
        import json
        import os

        from ..store.reader import Reader
        from ..store.segment import SHM_DIR, SegmentNames, unlink_all
        from ..store.writer import Writer
        from .storage import file_specs, geometry
        from .txn import Committer

        ctl = self.ctl
        cfg = ctl.cfg
        s = cfg.storage
        t0 = time.monotonic()
        tmp, aside = f"{cfg.name}~promote", f"{cfg.name}~expanded"
        unlink_all(tmp, s.segments)
        unlink_all(aside, s.segments)
        layout = json.dumps(cfg.layout(compressed=False), sort_keys=True).encode()
        old = ctl.writer
        applied, source = ctl.agents.applied_serial()
        try:
            new = Writer.create(tmp, geometry(cfg, len(layout), compressed=False), mode=s.mode_bits, gid=cfg.gid(),
                                schema_hash=cfg.schema_hash(compressed=False), files=file_specs(cfg),
                                reserve_slots=cfg.controller.reserve_blocks, layout=layout)
        except errors.MemoryFullError as e:
            raise errors.MemoryFullError(f"promote: decompressing the lz4 backup blocks needs new segments beside "
                                         f"the old ones, and shared memory cannot hold them: {e}") from None
        t_made = time.monotonic()
        try:
            new.begin()
            blocks, nbytes = old.expand_into(new)
            new.set_source(applied, source)
            new.publish(time.time_ns(), 0)
        except errors.ApplianceError as e:
            new.close()
            unlink_all(tmp, s.segments)
            if isinstance(e, errors.MemoryFullError):
                raise errors.MemoryFullError(
                    f"promote: appliance {cfg.name!r} cannot hold its database as primary blocks: its segments "
                    f"({s.segments} x {s.segment_size} bytes) are too small uncompressed; nothing was changed") from None
            raise
        t_laid = time.monotonic()
        sb = new.att.sb
        sb.sb_txn_next = max(sb.sb_txn_next, old.att.sb.sb_txn_next)
        ctl.role.rebind(new)
        # the new segments take the appliance's names; their mappings (and the writer over them)
        # stay. The old ones go aside and are unmapped and freed once the promote has answered
        # (freeing their pages takes time the first write should not wait for)
        att = new.att
        att.name, att.names = cfg.name, SegmentNames(cfg.name, s.segments)
        for seg, y, z in zip([att.meta, att.readers, *att.devices], att.names.all(),
                             SegmentNames(aside, s.segments).all()):
            os.replace(SHM_DIR + y, SHM_DIR + z)
            os.replace(SHM_DIR + seg.name, SHM_DIR + y)
            seg.name = y

        def drop_old() -> None:
            old.close()
            unlink_all(aside, s.segments)
        ctl.add_timer(0.2, drop_old)
        wr = new
        ctl.writer, ctl.att = wr, wr.att
        ctl.reader = Reader(wr.att)
        ctl.readers.writer, ctl.readers.compressed = wr, False
        ctl.commits.committer = Committer(wr)
        ctl.start_prefault()
        el = time.monotonic() - t0
        out = {"blocks": blocks, "bytes": nbytes, "seconds": round(el, 3),
               "rate_mb_s": round(nbytes / max(el, 1e-9) / 1e6, 1),
               # where the time went: new segments made (reserved, formatted), blocks laid in, swapped
               "make_s": round(t_made - t0, 3), "lay_s": round(t_laid - t_made, 3),
               "swap_s": round(time.monotonic() - t_laid, 3)}
        self.log.warning("lz4_blocks_expanded", **out)
        return out

    # ------------------------------------------------------------------ fence

    def fence(self, epoch, primary, reason: str) -> dict:
        ctl = self.ctl
        if primary is not None and not isinstance(primary, str):
            raise errors.WrongTypeError("fence: the primary must be a name or nil")
        if ctl.role.fence(epoch, primary):
            if ctl.durable is not None:
                ctl.durable.fenced()
            released = self.refuse_writes()
            self.log.critical("primary_fenced", epoch=epoch, primary=primary, own_epoch=ctl.role.epoch,
                              reason=reason, **released,
                              note="another appliance is primary at a newer epoch: this one takes no writes")
        return {"fenced": True, **ctl.role.fenced}

    def refuse_writes(self) -> dict:
        """What a fenced primary answers: every write in flight gets NotPrimaryError."""
        ctl = self.ctl
        txns, commits, sync = ctl.txns, ctl.commits, ctl.sync
        name = ctl.cfg.name
        queued = commits.queue
        commits.queue = []
        for sess, txn in queued:
            txns.finished(txn, "cancelled")
            txns.release(txn)
            commits.reply(sess, txn, None, ctl.role.not_primary(name, f"commit of transaction {txn.number}: "))
        waiting = sync.waiting
        sync.waiting = []
        unconfirmed = 0
        for w in waiting:
            if w.timer is not None:
                ctl.cancel_timer(w.timer)
            txns.release(w.txn)
            if not w.replied:
                w.replied = True
                unconfirmed += 1
                commits.reply(w.session, w.txn, None, ctl.role.not_primary(
                    name, f"commit of transaction {w.txn.number} (committed here at serial {w.serial}, never "
                          "confirmed by a secondary, undone when this appliance rejoins): "))
        cancelled = 0
        for txn in list(txns.active.values()):
            if txn.state == "open":
                txns.cancel(txn, "fenced")
                cancelled += 1
        return {"refused_commits": len(queued), "unconfirmed_commits": len(waiting),
                "answered_unconfirmed": unconfirmed, "cancelled_open": cancelled}

    # ------------------------------------------------------------------ rejoin

    def rejoin(self, options) -> dict:
        ctl = self.ctl
        _options(options, "rejoin", set())
        cfg = ctl.cfg
        rc = cfg.replication
        if rc is None or rc.listen is None or not rc.primaries:
            raise errors.ConfigError(
                f"{cfg.path}: replication.listen and replication.primary: rejoin makes {cfg.name!r} a secondary "
                "of the new primary; its config must say where it listens and which primary it accepts",
                file=str(cfg.path), key="replication.listen", problem="missing")
        if ctl.role.fenced is None:
            self.fence(ctl.role.epoch + 1, None, "rejoin")
        else:
            self.refuse_writes()
        sb = ctl.att.sb
        b = changelog.bounds(ctl.reader)
        serial = b["serial"]
        first = next((e.serial for e in _entries_from(ctl.reader, b["tail"], 1)), None)
        wr = ctl.writer
        wr.begin()
        wr.set_source(serial, sb.sb_instance)   # it follows its own history up to its last serial
        wr.publish(time.time_ns(), 0)
        sb.sb_fork_instance = 0
        sb.sb_fork_serial = 0
        ctl.role.change("secondary", ctl.role.epoch)
        ctl.applier.needs_copy = None
        ctl.applier.copied = None
        report = {"role": "secondary", "serial": serial, "follows": list(rc.primaries), "listen": rc.listen,
                  "history_from": first}
        self.rejoined = dict(report, at=time.time())
        self.log.warning("rejoining", **report)
        self.restart_agent()
        return report

    # ------------------------------------------------------------------ rewind

    def rewind(self, serial, entries, new_source) -> dict:
        ctl = self.ctl
        if (type(serial) is not int or serial < 0 or not (entries is None or isinstance(entries, bytes))
                or type(new_source) is not int or not new_source):
            raise errors.WrongTypeError("rewind: expects (serial, entries or nil, the new primary's instance)")
        applied, source = ctl.agents.applied_serial()
        if serial > applied:
            raise errors.RoleError(f"rewind: this secondary applied serial {applied}, short of {serial}: it "
                                   "needs a block copy", need_copy=True)
        wr = ctl.writer
        if serial == applied:    # at the fork: it follows the new primary from here, nothing to undo
            wr.begin()
            wr.set_source(serial, new_source)
            wr.publish(time.time_ns(), 0)
            self.log.info("follows_new_primary", serial=serial, instance=new_source)
            return {"applied": serial, "transactions": 0, "blocks": []}
        if entries is None:
            blob = self._own_history(serial, applied, source)
        else:
            blob = _range(entries, serial, applied, "the log history")
        t0 = time.monotonic()
        sb = ctl.att.sb
        wr.begin()
        try:
            txns, blocks = wr.undo_entries(blob)
            wr.set_source(serial, new_source)
        except errors.ApplianceError as e:
            ctl.writer.abort()
            self.log.error("rewind_failed", error=str(e), serial=serial, applied=applied)
            raise errors.error_for(e.code, f"rewind to serial {serial} failed ({e.message}); nothing was "
                                           "changed: this secondary needs a block copy", need_copy=True)
        if blocks:
            sb.sb_repair_pending = 1
        wr.publish(time.time_ns(), 0)
        ctl.published()
        wr.reclaim()
        if ctl.durable is not None:
            ctl.durable.history_changed(f"rewound to serial {serial}: {txns} transaction(s) undone")
        self.repair = blocks
        self.rewound = {"transactions": txns, "from_serial": serial + 1, "to_serial": applied,
                        "blocks_to_copy": len(blocks), "seconds": round(time.monotonic() - t0, 3),
                        "at": time.time()}
        self.log.warning("rewound", **self.rewound)
        return {"applied": serial, "transactions": txns, "blocks": blocks}

    def _own_history(self, serial: int, applied: int, source: int) -> bytes:
        """Entries (serial, applied] from this appliance's own change log (a
        former primary: what it committed itself)."""
        ctl = self.ctl
        if source != ctl.att.sb.sb_instance:
            raise errors.RoleError("rewind: this secondary keeps no history of its own; it needs a block copy",
                                   need_copy=True)
        pos = ffi.new("uint64_t *")
        rc = lib.apl_log_seek(ctl.reader.view, serial + 1, pos)
        if rc < 0:
            raise errors.RoleError(f"rewind: the change log no longer holds serial {serial + 1} (the fork): "
                                   "this secondary needs a block copy", need_copy=True)
        out = bytearray()
        for e in _entries_from(ctl.reader, pos[0]):
            if e.serial > applied:
                break
            out += e.raw
        return _range(bytes(out), serial, applied, "the change log")

    # ------------------------------------------------------------------ a partial copy ends

    def repair_done(self) -> None:
        """A block copy ended: nothing waits for a copy any more."""
        if self.repair or self.ctl.att.sb.sb_repair_pending:
            self.log.info("repair_copy_finished", blocks=len(self.repair))
        self.repair = []
        self.ctl.att.sb.sb_repair_pending = 0


def _options(options, what: str, allowed: set) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict) or not set(options) <= allowed:
        raise errors.WrongTypeError(f"{what}: options must be a map of {', '.join(sorted(allowed)) or 'nothing'}")
    return options


def _entries_from(reader, pos: int, limit: int | None = None):
    try:
        yield from changelog.read_entries(reader, pos, limit)
    except errors.InternalError as e:
        raise errors.RoleError(f"the change log was overwritten while it was read ({e}); retry",
                               need_copy=True) from None


def _range(blob: bytes, serial: int, applied: int, where: str) -> bytes:
    """The entries of `blob` after `serial` up to `applied`, checked to be
    exactly that range without a gap (else the secondary needs a copy)."""
    out = bytearray()
    expect = serial + 1
    for pos, f in changelog.walk(blob):
        s = f[changelog.E_SERIAL]
        if s <= serial or s > applied:
            continue
        if s != expect:
            break
        out += blob[pos:pos + f[changelog.E_LEN]]
        expect += 1
    if expect != applied + 1:
        raise errors.RoleError(f"rewind: {where} holds serials {serial + 1}..{applied} only up to {expect - 1}: "
                               "this secondary needs a block copy", need_copy=True)
    return bytes(out)


# ---------------------------------------------------------------------- requests

@handler(m.OP_PROMOTE, roles=("secondary",))
def promote(ctl, sess, options):
    return (yield from ctl.failover.promote(sess, options))


@handler(m.OP_FENCE, roles=("primary",))
def fence(ctl, sess, epoch, primary):
    return ctl.failover.fence(epoch, primary, "agent" if sess.agent else "operator")


@handler(m.OP_REJOIN, roles=("primary",))
def rejoin(ctl, sess, options):
    return ctl.failover.rejoin(options)


@handler(m.OP_REWIND, roles=("secondary",))
def rewind(ctl, sess, serial, entries, source):
    return ctl.failover.rewind(serial, entries, source)


@handler(m.OP_EPOCH, roles=("secondary",))
def epoch(ctl, sess, epoch):
    if type(epoch) is not int:
        raise errors.WrongTypeError("epoch: expects an int")
    ctl.role.raise_epoch(epoch)
    return None
