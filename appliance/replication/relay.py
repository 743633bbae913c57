"""The primary's side of replication: one relay per secondary.

A relay connects to its secondary (reconnecting with backoff), authenticates
both ways, learns where the secondary stands (START: last serial applied and
the primary instance it followed) and streams the change log from there. If
the log no longer holds what the secondary needs — it is new, followed
another primary, or was disconnected longer than the log ring retains — the
relay copies the blocks instead ([0079], [0127]) — unless the primary is
durable and its log files still hold what the ring lost (after a cold
start the ring begins empty): then it sends those entries from the files
first (durability.logfiles.entries_after) and goes on from the ring. A copy
pins a version, sends
the log entries up to that version, then block images read at that version,
and repeats, so the stream stays consistent while the primary keeps
processing; the secondary drops changes to blocks not yet copied, since the
copy will carry them ([0130]).

Reading ACKs and writing the stream are separate tasks (the writer never
waits on the reader). While an ENTRIES message that ended at a transaction
boundary waits for its ACK, the writer holds what commits meanwhile (up to
HOLD_BYTES of log) and sends it in one message when the ACK comes: under
load, commits share messages, applies and ACKs instead of each paying for
its own, and an idle link sends a commit at once. Each ACK moves the secondary's acknowledged serial,
which the agent reports to the controller, which releases synchronous
commits waiting for it. An acknowledgement never counts beyond the last
serial sent on that link (`sent`: both tasks run on the agent's one loop),
and a START that claims more than this primary ever wrote gets a copy: a
broken secondary cannot release synchronous commits early.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from .. import errors
from .._native import ffi, lib
from .._os.lifecycle import cancel_and_wait
from .._os.logs import LogOnce
from ..wire import replication as rp
from . import link
from .states import RelayState, set_state

__all__ = ["Relay"]

CHUNK = 1 << 20            # bytes of entries per ENTRIES message
COPY_BATCH = 1 << 20       # bytes of block images per COPY_BLOCKS message
HOLD_BYTES = 64 << 10      # log bytes the writer holds while a message waits for its ACK
_ELOGFULL = lib.APL_ELOGFULL
_EBUFSIZE = lib.APL_EBUFSIZE


class NeedCopy(Exception):
    """The log no longer holds the next entry this secondary needs."""


class Relay:
    def __init__(self, agent, sec) -> None:
        self.agent = agent
        self.sec = sec
        self.name = sec.name
        self.log = agent.log.bind(secondary=sec.name)
        self.errs = LogOnce(self.log)
        self.ack_errs = LogOnce(self.log)   # acknowledgements past the stream, once per link
        self.state = RelayState.CONNECTING
        self.connected = False
        self.acked = 0                # last serial the secondary confirmed applied
        self.sent = 0                 # last serial sent
        self.pos = 0                  # next log position to send
        self.sent_pos: deque = deque()  # (last serial, end position) of messages not yet acked
        self.awaiting = False         # a message that ended at a transaction boundary waits for its ACK
        self.quiet = True             # nothing sent since the last tick (a heartbeat is due)
        self.ticked = False           # the heartbeat timer fired (_tick)
        self.acked_pos = 0
        self.copy: dict | None = None  # progress while copying
        self.last_error: str | None = None
        self.attempts = 0             # connection attempts failed since the link was last up
        self.warning: str | None = None
        self.last_heard = 0.0
        self.wake = asyncio.Event()
        self.reconfigure(sec)
        self._buf = ffi.new("uint8_t[]", CHUNK)
        self._pos = ffi.new("uint64_t *")
        self._first, self._last, self._count = (ffi.new("uint64_t *") for _ in range(3))
        self.verify_waiters: dict[int, asyncio.Future] = {}
        self.verify_queue: deque = deque()
        self.force_copy = False       # an operator asked for a full copy (appliance copy)
        self.copies = 0               # copies completed
        self.repair: set[int] = set()  # block numbers to copy to it (a rewind's, a repair's)
        self.fs = None                # the link while it is up
        self.fetches: dict[int, asyncio.Future] = {}   # FETCH id -> its BLOCKS
        self._fetch_seq = 0
        self.rewinds = 0              # rewinds after a failover (status)
        self.backlog: list[bytes] = []   # entries from the log files, sent before the ring's (see _seek)
        self.batch = False            # the secondary is in batch mode: it acknowledges on receipt

    def reconfigure(self, sec) -> None:
        """This secondary's settings (a reload: the address serves the next
        connection, the export options the next message)."""
        self.sec = sec
        self.opts = (lib.APL_EXPORT_DELTA if sec.delta_updates else 0) | (0 if sec.send_b_logs else lib.APL_EXPORT_NO_B)

    # -- state ------------------------------------------------------------------------

    def set_state(self, state: RelayState, **kw) -> None:
        if set_state(self, state, self.log, "relay_state_changed", **kw):
            self.agent.report_soon()

    def report(self) -> dict:
        head = self.agent.head
        lag_bytes = max(0, head - self.acked_pos) if self.connected or self.acked_pos else max(0, head - self.pos)
        return {"connected": self.connected, "acked": self.acked, "sent": self.sent, "state": self.state.value,
                "lag_bytes": lag_bytes, "copy": self.copy, "copies": self.copies, "error": self.last_error,
                "warning": self.warning, "attempts": self.attempts, "rewinds": self.rewinds,
                "repair_pending": len(self.repair), "batch": self.batch}

    # -- the connection loop ------------------------------------------------------------

    async def run(self) -> None:
        """Connect, stream, and reconnect with backoff (up to 2 s). A
        secondary that stays down is logged once (secondary_link_failed, and
        the state's change to "disconnected"), not per attempt: status counts
        the attempts."""
        backoff = 0.05
        while True:
            try:
                await self._session()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (OSError, EOFError, asyncio.TimeoutError, errors.ApplianceError, NeedCopy) as exc:
                if isinstance(exc, errors.StaleEpochError):
                    self.agent.learnt_epoch(exc.details.get("epoch"), exc.details.get("primary"), self.name)
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not self.connected:
                    self.attempts += 1
                self.errs.error("secondary_link_failed", f"{type(exc).__name__}:{getattr(exc, 'code', '')}",
                                error=str(exc) or type(exc).__name__, attempts=self.attempts)
            finally:
                if self.connected:
                    self.connected = False
                    self.log.warning("secondary_disconnected")
                self.set_state(RelayState.DISCONNECTED)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        if self.state is not RelayState.DISCONNECTED:   # retries stay "disconnected" until the link is up
            self.set_state(RelayState.CONNECTING)
        fs = await link.connect_peer(self.sec.address, self.agent.tls)
        try:
            a = self.agent
            start = await link.primary_handshake(fs, a.cfg, self.sec, instance=a.instance, epoch=a.epoch,
                                                 serial=a.serial, files=a.files, secret=a.secret)
            applied, source = start.get("applied"), start.get("source")
            if type(applied) is not int or type(source) is not int:
                raise errors.ProtocolError(f"{fs.peer}: malformed START")
            self.connected = True
            self.fs = fs
            self.last_error = None
            self.attempts = 0
            self.errs.clear()
            self.ack_errs.clear()
            self.last_heard = time.monotonic()
            self.log.info("secondary_connected", peer=fs.peer, applied=applied, follows=source)
            repair = start.get("repair")
            self.repair = {n for n in repair if type(n) is int} if type(repair) is list else set()
            need_copy = bool(start.get("copy"))
            if not need_copy and source != a.instance:
                applied, need_copy = await self._lineage(fs, applied, source)
            if not need_copy:
                try:
                    self._seek(applied)
                    self.acked = max(self.acked, applied)
                except NeedCopy as exc:
                    self.log.warning("secondary_needs_copy", reason=str(exc))
                    need_copy = True
            tasks = (asyncio.get_running_loop().create_task(self._read(fs)),
                     asyncio.get_running_loop().create_task(self._write(fs, need_copy)))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(tasks)   # also when the agent stops: no task is left to fail alone
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        finally:
            fs.close()
            self.fs = None
            for fut in self.fetches.values():
                if not fut.done():
                    fut.set_exception(errors.UnavailableError(f"secondary {self.name!r} disconnected"))
            for fut in self.verify_waiters.values():
                if not fut.done():
                    fut.set_exception(errors.UnavailableError(f"secondary {self.name!r} disconnected"))

    async def _lineage(self, fs, applied: int, source: int) -> tuple[int, bool]:
        """A secondary that follows another primary than this one: if that is
        the primary this one was promoted from (the fork: its instance and
        the last serial of it held here) and the secondary is at or past
        the fork serial, it rewinds to the fork and follows this primary from
        there (what it holds past the fork is undone, the blocks that cannot
        be undone are copied: self.repair). Else it needs a copy.
        Returns (the serial to stream from, need_copy)."""
        fork = self.agent.fork
        if not fork or source != fork["instance"] or applied < fork["serial"]:
            return applied, True
        serial = fork["serial"]
        if applied > serial:
            self.log.warning("secondary_past_fork_rewinding", applied=applied, fork_serial=serial)
        body = await link.rewind(fs, self.agent.epoch, serial)
        blocks = body.get("blocks")
        if not body.get("ok") or type(blocks) is not list:
            self.log.warning("secondary_rewind_refused", reason=str(body.get("reason")), fork_serial=serial)
            return applied, True
        self.repair |= {n for n in blocks if type(n) is int}
        self.rewinds += 1
        self.log.info("secondary_rewound", fork_serial=serial, transactions=body.get("transactions"),
                      blocks=len(blocks))
        return serial, False

    async def fetch(self, blocks: list[int], timeout: float = 30.0) -> dict:
        """The images of `blocks` from this secondary (FETCH, then its BLOCKS:
        serial, images), to repair the primary's own blocks."""
        if self.fs is None or self.state is not RelayState.STREAMING:
            raise errors.UnavailableError(f"secondary {self.name!r} is not streaming")
        self._fetch_seq += 1
        fid = self._fetch_seq
        fut = asyncio.get_running_loop().create_future()
        self.fetches[fid] = fut
        try:
            self.fs.send(rp.message(rp.FETCH, self.agent.epoch, self.sent, {"id": fid, "blocks": blocks}))
            await self.fs.drain()
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.fetches.pop(fid, None)

    def _seek(self, applied: int) -> None:
        """Position the stream right after serial `applied`."""
        self.sent_pos.clear()
        self.awaiting = False
        b = self.agent.bounds()
        if applied > b["serial"]:
            raise NeedCopy(f"the secondary says it applied serial {applied}, past this primary's "
                           f"last serial {b['serial']}")
        if applied == b["serial"]:
            self.pos, self.sent, self.acked_pos = b["head"], applied, b["head"]
            return
        rc = lib.apl_log_seek(self.agent.reader.view, applied + 1, self._pos)
        if rc == _ELOGFULL:
            tail, first = self.agent.ring_start()
            self.backlog = self.agent.log_files_after(applied, first - 1) or []
            if not self.backlog:
                raise NeedCopy(f"the log no longer holds serial {applied + 1}")
            self.log.info("stream_from_log_files", after=applied, upto=first - 1,
                          bytes=sum(map(len, self.backlog)))
            self.pos, self.sent, self.acked_pos = tail, applied, tail
            return
        if rc < 0:
            raise errors.error_for("APL_ECORRUPT", f"log seek: {rc}")
        self.pos, self.sent, self.acked_pos = self._pos[0], applied, self._pos[0]

    # -- writing the stream ------------------------------------------------------------

    def _export(self, max_serial: int = 0) -> bytes | None:
        """The next chunk of entries from self.pos; None when nothing is new."""
        self._pos[0] = self.pos
        n = lib.apl_log_export(self.agent.reader.view, self._pos, self._buf, CHUNK, self.opts, max_serial,
                               self._first, self._last, self._count)
        if n == _ELOGFULL:
            raise NeedCopy(f"the log was overwritten past serial {self.sent}")
        if n == _EBUFSIZE:
            need = int.from_bytes(bytes(ffi.buffer(self._buf, 8)), "little")
            raise errors.RecordTooLargeError(f"a log entry of {need} bytes exceeds the stream chunk")
        if n < 0:
            raise errors.error_for("APL_ECORRUPT", f"log export failed ({n})")
        self.pos = self._pos[0]
        if n == 0:
            return None
        return bytes(ffi.buffer(self._buf, n))

    def _export_now(self) -> bytes | None:
        """_export() right after reading the bounds, so that a message that
        reaches the published serial is known to (_send_entries)."""
        self.agent.refresh()
        return self._export()

    def _send_entries(self, fs, blob: bytes) -> None:
        first, last = self._first[0], self._last[0]
        fs.send(rp.message(rp.ENTRIES, self.agent.epoch, first, [first, last, blob]))
        self.sent = last
        self.sent_pos.append((last, self.pos))
        self.quiet = False
        # up to a published serial: a transaction boundary (a batch publishes
        # whole transactions), so the secondary applies all of it and ACKs it
        self.awaiting = last == self.agent.serial

    def holding(self) -> bool:
        """Hold new entries for the next message: one that ended at a
        transaction boundary waits for its ACK, and little is new."""
        return self.awaiting and self.agent.head - self.pos < HOLD_BYTES

    def _tick(self) -> None:
        """Every heartbeat: the writer sends a HEARTBEAT if it sent nothing
        since the last tick, and drops a secondary silent too long (one timer
        per relay, not one per message)."""
        self.ticked = True
        self.wake.set()
        self._ticker = asyncio.get_running_loop().call_later(self.agent.cfg.replication.heartbeat, self._tick)

    async def _write(self, fs, need_copy: bool) -> None:
        if need_copy:
            self.repair.clear()    # a whole copy carries every block
            await self._copy(fs)
        self.set_state(RelayState.STREAMING)
        self.quiet, self.ticked = True, False
        self._ticker = asyncio.get_running_loop().call_later(self.agent.cfg.replication.heartbeat, self._tick)
        try:
            await self._stream(fs)
        finally:
            self._ticker.cancel()

    async def _stream(self, fs) -> None:
        await self._send_backlog(fs)
        while True:
            self.wake.clear()
            if self.ticked:
                self.ticked = False
                fs.expire_if_silent(max(3.0, 6 * self.agent.cfg.replication.heartbeat))   # ends _read
                if self.quiet:
                    self.agent.refresh()   # (the lag and HOLD_BYTES, when no publish woke this relay)
                    fs.send(rp.message(rp.HEARTBEAT, self.agent.epoch, self.sent,
                                       {"head": self.agent.serial, "sent": self.sent}))
                    await fs.drain()
                self.quiet = True
            if self.verify_queue:
                await self._send_verify(fs)
            if self.force_copy:
                self.force_copy = False
                self.repair.clear()
                await self._copy(fs)
                self.set_state(RelayState.STREAMING)
            if self.repair:
                blocks, self.repair = sorted(self.repair), set()
                await self._copy(fs, blocks)
                self.set_state(RelayState.STREAMING)
            try:
                blob = None if self.holding() else self._export_now()
            except NeedCopy as exc:
                self.log.warning("secondary_fell_behind_log", reason=str(exc))
                await self._copy(fs)
                self.set_state(RelayState.STREAMING)
                continue
            if blob is not None:
                self._send_entries(fs, blob)
                await fs.drain()
                continue
            self._check_retention()
            await self.wake.wait()   # a publish (PrimaryAgent._published), an ACK, a tick, an operator

    async def _send_backlog(self, fs) -> None:
        """The entries _seek found in the log files, in ENTRIES of about CHUNK bytes."""
        from ..store.changelog import E_LEN, E_SERIAL, walk
        backlog, self.backlog = self.backlog, []
        for blob in backlog:
            start = 0
            first = last = None
            for pos, f in walk(blob):
                if pos + f[E_LEN] - start > CHUNK and first is not None:
                    self._send_file_entries(fs, first, last, blob[start:pos])
                    await fs.drain()
                    start, first = pos, None
                first = f[E_SERIAL] if first is None else first
                last = f[E_SERIAL]
            if first is not None:
                self._send_file_entries(fs, first, last, blob[start:])
                await fs.drain()

    def _send_file_entries(self, fs, first: int, last: int, blob: bytes) -> None:
        fs.send(rp.message(rp.ENTRIES, self.agent.epoch, first, [first, last, blob]))
        self.sent = last
        self.sent_pos.append((last, self.pos))

    def _check_retention(self) -> None:
        """Warn well before the log ring overwrites what this secondary still needs."""
        size = self.agent.log_size
        behind = max(0, self.agent.head - self.acked_pos)
        frac = behind / size if size else 0
        w = f"retained log for this secondary at {frac:.0%} of log_size" if frac >= 0.5 else None
        if w != self.warning:
            self.warning = w
            if w:
                self.log.warning("secondary_retention_high", fraction=round(frac, 2))
            self.agent.report_soon()

    async def _send_verify(self, fs) -> None:
        """VERIFY right after the entries up to a pinned version, with the
        checksums of every block at that version: the secondary compares."""
        a = self.agent
        vid = self.verify_queue.popleft()
        pin, version, serial = a.pin_with_serial()
        try:
            while self.sent < serial:
                blob = self._export(serial)
                if blob is None:
                    break
                self._send_entries(fs, blob)
            sums = a.reader.block_sums(version)
        finally:
            pin.close()
        fs.send(rp.message(rp.VERIFY, a.epoch, self.sent, {"id": vid, "sums": sums, "serial": self.sent}))
        await fs.drain()

    async def _copy(self, fs, blocks: list[int] | None = None) -> None:
        """Copy every block while the primary keeps processing; with `blocks`,
        those numbers only (a rewind's or a repair's), from where the stream
        is (the secondary's other blocks are right and take the stream)."""
        a = self.agent
        self.set_state(RelayState.COPYING)
        t0 = time.monotonic()
        pin, version, serial = a.pin_with_serial()
        try:
            limit = a.reader.block_limit()
            if blocks is None:
                self._seek(serial)  # the copy starts at this stream position
            else:
                # a copy of some blocks starts where the stream is: after a rewind, before any
                # entry (the blocks it names are not consistent until their images come)
                serial = self.sent
        finally:
            pin.close()
        begin = {"limit": limit, "serial": serial}
        if blocks is not None:
            begin["blocks"] = blocks
        total = limit if blocks is None else len(blocks)
        fs.send(rp.message(rp.COPY_BEGIN, a.epoch, serial, begin))
        self.copy = {"blocks": 0, "total": total, "bytes": 0, "rate_mb_s": 0.0, "eta_s": None,
                     "partial": blocks is not None}
        self.log.info("copy_started", blocks=total, serial=serial, partial=blocks is not None)
        n = 0
        sent_bytes = 0
        while True:
            pin, version, serial = a.pin_with_serial()
            try:
                while self.sent < serial:   # the stream up to the version the images are read at
                    blob = self._export(serial)
                    if blob is None:
                        break
                    self._send_entries(fs, blob)
                if blocks is None:
                    if n >= limit:   # (block_limit scans the location table: asked again only here)
                        limit = max(limit, a.reader.block_limit())
                        if n >= limit:
                            break
                    batch, n = a.reader.block_images(n, version, COPY_BATCH, limit)
                else:
                    if n >= total:
                        break
                    batch, n = a.reader.images_of(blocks, n, version, COPY_BATCH)
                    limit = total
                size = len(batch)
            finally:
                pin.close()
            fs.send(rp.message(rp.COPY_BLOCKS, a.epoch, self.sent, batch))
            await fs.drain()
            sent_bytes += size
            el = max(time.monotonic() - t0, 1e-6)
            rate = sent_bytes / el
            self.copy = {"blocks": n, "total": limit, "bytes": sent_bytes, "rate_mb_s": round(rate / 1e6, 2),
                         "eta_s": round((limit - n) * (sent_bytes / max(n, 1)) / rate, 1) if n else None}
            a.report_soon()
        fs.send(rp.message(rp.COPY_END, a.epoch, self.sent, {"serial": self.sent}))
        self.awaiting = False   # (its ACK is the copy's: the stream goes on unheld)
        await fs.drain()
        el = time.monotonic() - t0
        self.log.info("copy_finished", blocks=n, bytes=sent_bytes, seconds=round(el, 3),
                      rate_mb_s=round(sent_bytes / max(el, 1e-6) / 1e6, 2))
        self.copy = None
        self.copies += 1

    # -- reading ACKs --------------------------------------------------------------------

    def _acked(self, applied: int) -> None:
        if applied > self.sent:
            # nothing past `sent` went out on this link: the secondary cannot have applied it
            self.ack_errs.error("secondary_ack_beyond_sent", "beyond_sent", applied=applied, sent=self.sent)
            if self.sent <= self.acked:
                return
            applied = self.sent
        self.acked = applied
        while self.sent_pos and self.sent_pos[0][0] <= applied:
            self.acked_pos = self.sent_pos.popleft()[1]
        self.agent.acked(self.name, applied)
        if self.awaiting:
            self.awaiting = False
            self.wake.set()   # what was held goes now

    async def _read(self, fs) -> None:
        while True:
            msg = await fs.recv()   # (a silent secondary: _stream's tick ends the stream)
            kind, epoch, serial, ts, body = rp.parse(msg)
            self.last_heard = time.monotonic()
            if kind == rp.ACK:
                applied = body.get("applied") if isinstance(body, dict) else None
                if type(applied) is int and applied > self.acked:
                    self._acked(applied)
            elif kind == rp.NAK:
                expected = body.get("expected") if isinstance(body, dict) else None
                if type(expected) is not int:
                    raise errors.ProtocolError(f"{fs.peer}: malformed NAK")
                self.log.warning("secondary_gap", expected=expected, sent=self.sent)
                raise errors.ProtocolError(f"{fs.peer}: gap reported at serial {expected}; resuming from it")
            elif kind == rp.HEARTBEAT:
                applied = body.get("applied") if isinstance(body, dict) else None
                if type(applied) is int and applied > self.acked and self.state is RelayState.STREAMING:
                    self._acked(applied)   # a heartbeat carries the applied serial too
            elif kind == rp.BLOCKS:
                fut = self.fetches.get(body.get("id")) if isinstance(body, dict) else None
                if fut is not None and not fut.done():
                    fut.set_result(body)
            elif kind == rp.REPAIR:
                blocks = body.get("blocks") if isinstance(body, dict) else None
                if type(blocks) is not list:
                    raise errors.ProtocolError(f"{fs.peer}: malformed REPAIR")
                self.repair |= {n for n in blocks if type(n) is int and n >= 0}
                self.log.warning("secondary_asked_repair", blocks=len(blocks))
                self.wake.set()
            elif kind == rp.VERIFY_RESULT:
                fut = self.verify_waiters.pop(body.get("id"), None) if isinstance(body, dict) else None
                if fut is not None and not fut.done():
                    fut.set_result(body)
            elif kind == rp.SUSPEND:
                if not self.batch:
                    self.batch = True
                    self.log.warning("secondary_batch_mode", applied=body.get("applied") if isinstance(body, dict)
                                     else None, acknowledges="on receipt",
                                     note="its acknowledgements mean received and kept in its log, not applied, "
                                          "until it reports it is back (RESUME)")
                    self.agent.report_soon()
            elif kind == rp.RESUME:
                if self.batch:
                    self.batch = False
                    self.log.warning("secondary_batch_mode_ended", applied=body.get("applied")
                                     if isinstance(body, dict) else None)
                    self.agent.report_soon()
            elif kind == rp.ERROR:
                raise link.refusal(body if isinstance(body, dict) else {}, fs.peer, "ended the link")
            else:
                raise errors.ProtocolError(f"{fs.peer}: unexpected message type {kind}")

