"""The secondary's side of replication: the applier.

It listens for its primary (one link at a time; a newer authenticated link
replaces an older one), checks each message's epoch and serial, hands whole
transactions to its own controller to apply to the backup database
(OP_APPLY; the controller stays the only writer of the segments), appends
them to the log history, and reports "backup complete" (ACK) with the serial
of the last transaction fully applied ([0084], [0117]). A gap is answered
with NAK; duplicates are ignored. While a block copy runs, ACKs wait until
it ends: until then "backup complete" would not be true.

When the controller refuses a batch of the stream (it failed to apply part
way, so the controller rolled it back: see Controller._refuse_batch), the
applier sends the primary an ERROR saying so and drops the link; its next
START asks for a block copy ("copy": true), which the relay then runs.
"""
from __future__ import annotations

import asyncio
import socket
import time
from functools import partial

from .. import errors
from .._os.logs import LogOnce
from .._os.net import bind_error
from ..wire import messages as m
from ..wire import replication as rp
from ..store.changelog import E_SERIAL, walk
from . import link
from .backlog import Backlog
from .history import History
from .states import ApplierState, set_state

__all__ = ["Applier"]

#: promote's drain: the link is quiet (drained) after this many seconds without a message
DRAIN_IDLE = 0.25


class Applier:
    def __init__(self, cfg, ctl: link.ControlLink, log, history: History, files: list) -> None:
        self.cfg = cfg
        self.ctl = ctl
        self.log = log
        self.errs = LogOnce(log)
        self.history = history
        self.files = files
        self.secret = cfg.secret()
        self.tls = link.tls_context(cfg, server=True)
        # what is on the secondary's disk when its log lags its memory (log_sync = "commit"): START
        # resumes there, so a restarted agent never acknowledges what is not durable yet
        self.applied = ctl.info.get("durable", ctl.info["applied"])
        self.source = ctl.info["source"]
        self.epoch_seen = ctl.info["epoch"]
        self.copying = bool(ctl.info.get("copying"))
        self.need_copy = bool(ctl.info.get("needs_copy"))   # the next START asks for a block copy
        self.current: link.FrameStream | None = None
        self.carried = 0    # the last serial the current link carried: no ACK names more (the relay caps too)
        self.state = ApplierState.WAITING
        self.connected_since: float | None = None
        self.last_message = 0.0
        self.primary_time_lag = None
        self.pending = b""           # entries after `applied` held back: a transaction cut at a message's end
        self.backlog: Backlog | None = None   # batch mode: what arrives is kept here, not applied
        self.suspend_told = False    # the primary was sent SUSPEND for this batch
        self.catching_up = False
        self.catch_up: dict = {}     # progress of the catch-up after a batch
        self._catch_up_task: asyncio.Task | None = None
        self.primary_serial = 0   # the primary's latest serial this side heard of (heartbeats, entries: its lag)
        self.server: Listener | None = None
        self.primary_name: str | None = None   # the primary it follows now (named when refusing a deposed one)
        self.heard_at = 0.0
        self.repair = list(ctl.info.get("repair") or ())   # block numbers waiting for a copy (a rewind's)
        self.draining = False        # promote: no new link; the current one until it is quiet
        self.partial: dict | None = None   # a transaction received in part when the link ended
        self.link_done = asyncio.Event()
        self.link_done.set()

    def reconfigure(self, cfg) -> None:
        """A reloaded config: the secret and TLS files are read again (for
        the links accepted from then on; the current one goes on)."""
        secret, tls = cfg.secret(), link.tls_context(cfg, server=True)
        self.cfg, self.secret, self.tls = cfg, secret, tls

    async def start(self) -> None:
        host, port = _addr(self.cfg.replication.listen)
        # TLS is started per connection (_upgrade), so a refused certificate is logged here too
        try:
            self.server = Listener(host, port, self._upgrade)
        except OSError as exc:
            raise bind_error(self.cfg.path, "replication.listen", self.cfg.replication.listen, exc) from None
        self.log.info("listening_for_primary", address=self.cfg.replication.listen,
                      tls=self.tls is not None, applied=self.applied)

    def _set_state(self, state: ApplierState) -> None:
        set_state(self, state, self.log, "applier_state_changed")

    def report(self) -> dict:
        out = {"state": self.state.value, "connected": self.current is not None, "applied": self.applied,
               "copying": self.copying, "epoch_seen": self.epoch_seen, "history": self.history.status(),
               "primary_time_lag_s": self.primary_time_lag,
               "connected_since": self.connected_since, "primary": self.primary_name,
               # serials the primary said it had that are not applied here (what a promote may lose)
               "primary_serial": self.primary_serial, "behind_serials": max(0, self.primary_serial - self.applied),
               "heard_s_ago": round(time.monotonic() - self.heard_at, 3) if self.heard_at else None}
        if self.backlog is not None:
            b = self.backlog
            rate = self.catch_up.get("rate_bytes_s")
            out["batch"] = {"suspended": not self.catching_up, "catching_up": self.catching_up,
                            "received": b.last, "backlog_bytes": b.pending_bytes,
                            "backlog_serials": max(0, b.last - self.applied),
                            "catch_up_rate_bytes_s": rate, "suspended_told": self.suspend_told,
                            "eta_s": round(b.pending_bytes / rate, 1) if rate else None}
        return out

    # -- batch mode ([0156]; appliance/controller/batch.py) -----------------------------

    def on_batch(self, active: bool) -> None:
        """The controller says whether batch mode is on (its OP_APPLY or
        OP_REPL_STATE reply): suspend applying, or catch up once it is off."""
        if active and self.backlog is None:
            self._suspend()
        elif not active and self.backlog is not None and not self.catching_up:
            self.catching_up = True
            self._catch_up_task = asyncio.get_running_loop().create_task(self._catch_up())

    def _suspend(self) -> None:
        """Batch mode began: keep what arrives in the backlog (the held-back
        part first), acknowledge on receipt, tell the primary."""
        dirpath = self.history.dir
        self.backlog = Backlog(dirpath)
        if self.pending:
            from ..store.changelog import first_serial
            self.backlog.append(self.pending, first_serial(self.pending) or 0, _serial_after(self.pending))
        self.pending = b""
        self.suspend_told = False
        self.catch_up = {}
        self.log.warning("batch_mode_suspended", applied=self.applied,
                         note="acknowledging on receipt until the batch ends and this secondary catches up")
        self._tell(rp.SUSPEND)

    def _drop_backlog(self, reason: str) -> None:
        """A copy or a rewind replaces the stream: the batch's backlog is moot
        (the controller ends the batch too); what it lacks comes again."""
        if self.backlog is not None:
            self.log.warning("batch_backlog_dropped", reason=reason)
            if self._catch_up_task is not None:
                self._catch_up_task.cancel()
            self.backlog.close()
            self.backlog, self.catching_up = None, False

    def _tell(self, kind: int) -> None:
        fs = self.current
        if fs is None:
            return          # said on the next link (_accept)
        try:
            fs.send(rp.message(kind, self.epoch_seen, self.applied, {"applied": self.applied, "batch": True}))
            if kind == rp.SUSPEND:
                self.suspend_told = True
        except ConnectionError:
            pass

    async def _catch_up(self) -> None:
        """Apply the backlog in chunks of whole transactions while new
        entries keep arriving behind; when nothing whole is left, hand the
        rest to the stream and tell the primary this secondary is back."""
        b = self.backlog
        chunk = 4 << 20
        t0 = time.monotonic()
        start_pos, start_serial = b.read_pos, self.applied
        self.log.info("batch_catch_up_started", backlog_bytes=b.pending_bytes, applied=self.applied, received=b.last)
        small_rounds = 0
        try:
            while True:
                tail = b.pending_bytes
                data = b.read(b.read_pos, min(tail, chunk))
                if len(data) == tail and not _has_boundary(data):
                    break                               # only an unfinished transaction is left
                if tail < 64 << 10:
                    small_rounds += 1
                    if small_rounds > 1000:
                        break       # chasing a steady trickle: the stream applies the rest with what comes next
                r = await self.ctl.call([m.OP_APPLY, self.source, self.applied, data])
                if r.get("batch"):
                    self.catching_up = False
                    self.log.warning("batch_catch_up_interrupted", reason="batch mode began again")
                    return
                if r["consumed"] == 0:
                    chunk *= 2                          # a transaction bigger than the chunk
                    continue
                b.read_pos += r["consumed"]
                if r["applied"] > self.applied:
                    self.applied = r["applied"]
                el = max(time.monotonic() - t0, 1e-6)
                self.catch_up = {"rate_bytes_s": round((b.read_pos - start_pos) / el),
                                 "serials_s": round((self.applied - start_serial) / el)}
        except errors.ApplianceError as exc:
            self.catching_up = False
            self.log.error("batch_catch_up_failed", error=str(exc), applied=self.applied)
            if exc.details.get("need_copy"):
                self.need_copy = True
                if self.current is not None:
                    self.current.close()
            return
        # hand over: nothing awaited since the last read, so the backlog holds all that arrived
        self.pending = b.read(b.read_pos, b.pending_bytes)
        el = time.monotonic() - t0
        b.close()
        self.backlog = None
        self.catching_up = False
        self.log.warning("batch_mode_caught_up", applied=self.applied, seconds=round(el, 3),
                         bytes=b.size - start_pos, serials_s=self.catch_up.get("serials_s"))
        self._tell(rp.RESUME)

    def _heard(self, serial) -> None:
        if type(serial) is int and serial > self.primary_serial:
            self.primary_serial = serial
        self.heard_at = time.monotonic()

    async def answer(self, ask: dict) -> dict:
        """An operator's request from the controller (recovery.py)."""
        kind = ask.get("kind") if isinstance(ask, dict) else None
        if kind == "drain":
            t = ask.get("timeout")
            return await self.drain(float(t) if type(t) in (int, float) else 5.0)
        if kind == "repair" and type(ask.get("blocks")) is list:
            return self.ask_repair(ask["blocks"])
        return {"error": f"unknown request {ask!r:.100}"}

    def ask_repair(self, blocks: list[int]) -> dict:
        """`appliance repair` on this secondary: the primary copies these
        blocks again (REPAIR now if the link is up; the next START says so too)."""
        self.repair = sorted(set(self.repair) | set(blocks))
        fs = self.current
        if fs is None:
            return {"sent": False}
        try:
            fs.send(rp.message(rp.REPAIR, self.epoch_seen, self.applied, {"blocks": self.repair}))
        except ConnectionError:
            return {"sent": False}
        self.log.warning("repair_asked", blocks=len(self.repair))
        return {"sent": True}

    async def drain(self, timeout: float) -> dict:
        """Promote: take no new link from a primary; let the current one bring
        what it still has (every whole transaction is applied as it comes)
        until it is quiet for DRAIN_IDLE s or ends, at most `timeout` s;
        then report where this secondary stands."""
        t0 = time.monotonic()
        self.draining = True
        if self.server is not None:
            self.server.close()
            self.server = None
        cut = False
        if self.current is not None:
            try:
                await asyncio.wait_for(self.link_done.wait(), timeout)
            except asyncio.TimeoutError:
                cut = True      # the old primary is still streaming: cut it here
                self.current.close()
                await self.link_done.wait()
        task = self._catch_up_task
        if task is not None and not task.done():   # after a batch: what it received is applied first
            await asyncio.wait({task}, timeout=max(0.0, timeout - (time.monotonic() - t0)))
        backlog = self.backlog.pending_bytes if self.backlog is not None else 0
        self.log.warning("drained_for_promote", applied=self.applied, heard=self.primary_serial, cut=cut,
                         partial=self.partial, backlog_bytes=backlog, seconds=round(time.monotonic() - t0, 3))
        return {"applied": self.applied, "epoch_seen": self.epoch_seen, "primary": self.primary_name,
                "backlog_bytes": backlog,
                "heard": self.primary_serial, "partial": self.partial, "cut": cut,
                "heard_s_ago": round(time.monotonic() - self.heard_at, 3) if self.heard_at else None}

    def close(self) -> None:
        if self._catch_up_task is not None:
            self._catch_up_task.cancel()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.current is not None:
            self.current.close()

    async def _upgrade(self, sock: socket.socket, peer) -> None:
        """A new connection: streams on it, after the TLS handshake when
        configured. The transport is made on the accepted socket itself, so
        no byte (a ClientHello, a HELLO) is read before its protocol exists."""
        loop = asyncio.get_running_loop()
        try:
            fs = await link.open_stream(partial(
                loop.connect_accepted_socket, sock=sock, ssl=self.tls,
                ssl_handshake_timeout=link.HANDSHAKE_TIMEOUT if self.tls is not None else None),
                link.HANDSHAKE_MAX_FRAME)
        except (OSError, asyncio.TimeoutError) as exc:     # a refused certificate is an ssl.SSLError (OSError)
            self.errs.error("primary_refused", "tls" if self.tls is not None else "accept", peer=str(peer),
                            error=f"TLS handshake failed: {exc}" if self.tls is not None else str(exc))
            sock.close()
            return
        await self._accept(fs)

    async def _accept(self, fs: link.FrameStream) -> None:
        try:
            epoch, hello = await link.secondary_handshake(fs, self.cfg, files=self.files, secret=self.secret,
                                                          epoch_seen=self.epoch_seen, current=self.primary_name)
            if self.draining:
                raise errors.UnavailableError(f"{fs.peer}: this secondary is being promoted")
        except (OSError, EOFError, asyncio.TimeoutError, errors.ApplianceError) as exc:
            self.errs.error("primary_refused", type(exc).__name__, peer=fs.peer, error=str(exc))
            fs.close()
            return
        if self.current is not None:
            self.log.warning("primary_link_replaced", old=self.current.peer, new=fs.peer)
            self.current.close()
        self.current = fs
        self.link_done.clear()
        if epoch > self.epoch_seen:
            self.log.warning("newer_primary_epoch", epoch=epoch, previous=self.epoch_seen, primary=hello.get("name"))
            try:   # kept in shared memory: a restarted agent refuses the older epoch too
                await self.ctl.call([m.OP_EPOCH, epoch])
            except errors.ApplianceError as exc:
                self.log.warning("epoch_not_kept", epoch=epoch, error=str(exc))
        self.epoch_seen = epoch
        self.primary_name = hello.get("name")
        instance = hello["instance"]
        resume = self.applied
        if self.history.enabled and self.history.last_serial < resume and instance == self.source:
            resume = self.history.last_serial  # fill the history's gap: applying skips duplicates
        fs.send(rp.message(rp.START, self.epoch_seen, resume,
                           {"applied": resume, "source": self.source, "copy": self.copying or self.need_copy,
                            "repair": self.repair}))
        await fs.drain()
        self.errs.clear()
        self.carried = resume
        self.connected_since = time.time()
        self._set_state(ApplierState.STREAMING)
        self.log.info("primary_connected", peer=fs.peer, primary_instance=instance, applied=self.applied)
        self.pending = b""
        if self.backlog is not None and not self.catching_up:
            self._tell(rp.SUSPEND)
        beat = asyncio.get_running_loop().create_task(self._heartbeats(fs))
        try:
            await self._serve(fs, instance)
        except errors.ApplianceError as exc:
            if exc.details.get("need_copy") and self.current is fs:
                self._ask_for_copy(fs, exc)
            else:
                self.errs.error("primary_link_failed", type(exc).__name__, peer=fs.peer, error=str(exc))
        except (OSError, EOFError, asyncio.TimeoutError) as exc:
            if self.draining:
                self.log.info("primary_link_drained", peer=fs.peer, how=type(exc).__name__)
            else:
                self.errs.error("primary_link_failed", type(exc).__name__, peer=fs.peer, error=str(exc))
        finally:
            beat.cancel()
            fs.close()
            if self.current is fs:
                self.current = None
                self.connected_since = None
                self._set_state(ApplierState.WAITING)
                self.link_done.set()
            self.history.spill()

    def _ask_for_copy(self, fs: link.FrameStream, exc: errors.ApplianceError) -> None:
        """The controller refused the stream and rolled the batch back: tell
        the primary why (ERROR; the link closes after it). It reconnects, and
        this START asks for a block copy."""
        self.need_copy = True
        self.log.error("copy_requested", peer=fs.peer, reason=str(exc), applied=self.applied)
        try:
            fs.send(rp.message(rp.ERROR, self.epoch_seen, self.applied, {
                "code": exc.code, "message": f"secondary {self.cfg.name!r} refused the stream: {exc}"}))
        except ConnectionError:
            pass   # the primary is gone already: it asks START again, which asks for the copy

    async def _serve(self, fs: link.FrameStream, instance: int) -> None:
        self.partial = None
        self.pending = b""
        try:
            await self._stream(fs, instance)
        finally:
            if self.pending:   # a transaction received in part: never applied, dropped
                serials = [f[E_SERIAL] for _, f in walk(self.pending)]
                self.partial = {"bytes": len(self.pending), "first_serial": serials[0] if serials else None,
                                "last_serial": serials[-1] if serials else None}

    async def _stream(self, fs: link.FrameStream, instance: int) -> None:
        acked = -1   # last ACK on this link: the first applied serial is always acknowledged
        copy_calls: list = []
        while self.current is fs:
            kind, epoch, serial, ts, body = rp.parse(await fs.recv(DRAIN_IDLE if self.draining else None))   # (silence: _heartbeats)
            if epoch < self.epoch_seen:
                fs.send(rp.message(rp.ERROR, self.epoch_seen, 0,
                                   {"code": "APL_ESTALE", "message": f"epoch {epoch} < {self.epoch_seen}",
                                    "epoch": self.epoch_seen,
                                    **({"primary": self.primary_name} if self.primary_name else {})}))
                raise errors.StaleEpochError(f"{fs.peer}: message from epoch {epoch} < {self.epoch_seen}")
            self.last_message = time.monotonic()
            self.primary_time_lag = round(max(0.0, time.time() - ts / 1e9), 3)
            if kind == rp.ENTRIES:
                _check_entries(fs, body)
                self._heard(body[1])
                for fut in copy_calls:   # entries apply after the blocks sent before them
                    await fut
                copy_calls.clear()
                first, last, blob = body
                self.carried = max(self.carried, last)
                if self.backlog is not None:
                    expect = max(self.applied, self.backlog.last) + 1
                else:
                    expect = self.applied + 1 + (0 if not self.pending else _serial_after(self.pending) - self.applied)
                if first > expect:
                    self.log.warning("gap_detected", expected=expect, got=first)
                    fs.send(rp.message(rp.NAK, self.epoch_seen, expect, {"expected": expect}))
                    await fs.drain()
                    self.pending = b""
                    continue
                self.history.append(blob)
                if self.backlog is not None:
                    # batch mode: keep it, apply nothing; "backup complete" means received and kept
                    self.backlog.append(blob, first, last)
                    while (nxt := fs.peek()) is not None:
                        k2, e2, _, _, b2 = rp.parse(nxt)
                        if k2 != rp.ENTRIES or e2 != epoch:
                            break
                        _check_entries(fs, b2)
                        if b2[0] > self.backlog.last + 1:
                            break
                        fs.pop()
                        self.history.append(b2[2])
                        self.backlog.append(b2[2], b2[0], b2[1])
                        self.carried = max(self.carried, b2[1])
                    if self._ack_serial() > acked:
                        acked = self._ack_serial()
                        fs.send(rp.message(rp.ACK, self.epoch_seen, acked, {"applied": acked, "received": True}))
                        await fs.drain()
                    continue
                self.pending += blob
                # the ENTRIES that queued up while the last apply ran go in the
                # same apply (one controller round trip and one ACK for all);
                # a gap or any other message stops the batch and is handled
                # on its own at the next turn
                while (nxt := fs.peek()) is not None:
                    k2, e2, _, _, b2 = rp.parse(nxt)
                    if k2 != rp.ENTRIES or e2 != epoch:
                        break
                    _check_entries(fs, b2)
                    if b2[0] > last + 1:
                        break
                    fs.pop()
                    self.history.append(b2[2])
                    self.pending += b2[2]
                    last = max(last, b2[1])
                    self.carried = max(self.carried, last)
                r = await self.ctl.call([m.OP_APPLY, instance, self.applied, self.pending])
                if r.get("batch"):          # batch mode began: what is held back goes to the backlog
                    self.on_batch(True)
                    if self._ack_serial() > acked:
                        acked = self._ack_serial()
                        fs.send(rp.message(rp.ACK, self.epoch_seen, acked, {"applied": acked, "received": True}))
                        await fs.drain()
                    continue
                self.pending = self.pending[r["consumed"]:]
                if r["applied"] > self.applied:
                    self.applied = r["applied"]
                    self.source = instance
                # acknowledge whatever is applied and not yet acknowledged on this link
                # (after a reconnect everything resent may be a duplicate: ACK anyway)
                if not self.copying and self._ack_serial() > acked:
                    acked = self._ack_serial()
                    fs.send(rp.message(rp.ACK, self.epoch_seen, acked, {"applied": acked}))
                    await fs.drain()
            elif kind == rp.COPY_BEGIN:
                self._drop_backlog("a block copy from the primary began")
                await self.ctl.call([m.OP_COPY, "begin", instance, body])
                self.copying = True
                self._set_state(ApplierState.COPYING)
                if isinstance(body, dict) and body.get("blocks") is not None:
                    # some blocks only: the stream goes on where it is (a transaction kept back included)
                    self.log.info("copy_receiving", blocks=len(body["blocks"]), serial=body.get("serial"),
                                  partial=True)
                    continue
                self.need_copy = False
                self.applied = self.carried = body["serial"]
                self.pending = b""
                self.log.info("copy_receiving", blocks=body.get("limit"), serial=body.get("serial"))
            elif kind == rp.COPY_BLOCKS:
                # pipelined: the controller applies in order on one connection; the
                # replies are collected before COPY_END (the copy's "backup complete")
                copy_calls.append(asyncio.ensure_future(self.ctl.call([m.OP_COPY, "blocks", instance, body])))
                if len(copy_calls) >= 8:
                    await copy_calls.pop(0)
            elif kind == rp.COPY_END:
                for fut in copy_calls:
                    await fut
                copy_calls.clear()
                r = await self.ctl.call([m.OP_COPY, "end", instance, body])
                self.copying = False
                self.repair = []
                self._set_state(ApplierState.STREAMING)
                self.applied, self.source = r["applied"], instance
                self.carried = max(self.carried, self.applied)
                fs.send(rp.message(rp.ACK, self.epoch_seen, self.applied, {"applied": self.applied}))
                await fs.drain()
                acked = self.applied
                self.log.info("copy_complete", applied=self.applied)
            elif kind == rp.REWIND:
                self._drop_backlog("a new primary rewinds this secondary")
                await self._rewind(fs, body, instance)
                acked = -1
            elif kind == rp.FETCH:
                blocks = body.get("blocks") if isinstance(body, dict) else None
                if type(blocks) is not list:
                    raise errors.ProtocolError(f"{fs.peer}: malformed FETCH")
                r = await self.ctl.call([m.OP_IMAGES, blocks])
                fs.send(rp.message(rp.BLOCKS, self.epoch_seen, r["serial"],
                                   {"id": body.get("id"), "serial": r["serial"], "images": r["images"]}))
                await fs.drain()
            elif kind == rp.HEARTBEAT:
                if isinstance(body, dict):
                    self._heard(body.get("head"))
                applied = self._ack_serial() if not self.copying else 0   # no "backup complete" mid-copy
                fs.send(rp.message(rp.HEARTBEAT, self.epoch_seen, applied, {"applied": applied}))
                await fs.drain()
            elif kind == rp.VERIFY:
                await self._verify(fs, body)
            else:
                raise errors.ProtocolError(f"{fs.peer}: unexpected message type {kind}")

    async def _rewind(self, fs, body, instance: int) -> None:
        """The new primary after a failover: undo what this secondary holds
        past the fork serial, and follow the new primary from there
        (recovery.py). From its own change log when it was a primary itself,
        else from the log history; REWOUND says which blocks to copy next."""
        serial = body.get("serial") if isinstance(body, dict) else None
        if type(serial) is not int:
            raise errors.ProtocolError(f"{fs.peer}: malformed REWIND")
        entries = None
        if self.source != self.ctl.info["instance"] and serial < self.applied:
            entries = b"".join(self.history.read(serial + 1)) if self.history.enabled else b""
        try:
            r = await self.ctl.call([m.OP_REWIND, serial, entries, instance])
        except errors.ApplianceError as exc:
            if not exc.details.get("need_copy"):
                raise
            self.log.warning("rewind_not_possible", serial=serial, applied=self.applied, reason=str(exc))
            self.need_copy = True
            fs.send(rp.message(rp.REWOUND, self.epoch_seen, self.applied, {"ok": False, "reason": str(exc)}))
            await fs.drain()
            return
        self.log.warning("rewound_to_fork", serial=serial, undone=r["transactions"], blocks=len(r["blocks"]),
                         was=self.applied)
        # what the history holds past the fork was undone: the new primary's entries take those serials
        self.history.truncate_after(serial)
        self.applied = self.carried = r["applied"]
        self.source = instance
        self.repair = r["blocks"]
        fs.send(rp.message(rp.REWOUND, self.epoch_seen, self.applied,
                           {"ok": True, "applied": self.applied, "transactions": r["transactions"],
                            "blocks": r["blocks"]}))
        await fs.drain()

    def _ack_serial(self) -> int:
        """What an acknowledgement on the current link says is applied: the
        last serial applied, but never past what this link carried (after a
        resume from the log history's end the link resends serials applied
        before: what was applied past them is acknowledged as they arrive).
        In batch mode: what is received and kept (the backlog), told to the
        primary by SUSPEND first."""
        if self.backlog is not None:
            return min(max(self.applied, self.backlog.last), self.carried)
        return min(self.applied, self.carried)

    async def _heartbeats(self, fs) -> None:
        """Keep the link measurable even while a long apply or copy step runs
        (the primary drops a link it has not heard from), and drop a primary
        silent while _serve waits for it (a timer here, not one per message)."""
        while True:
            await asyncio.sleep(self.cfg.replication.heartbeat)
            fs.expire_if_silent(max(3.0, 6 * self.cfg.replication.heartbeat))
            applied = self._ack_serial() if not self.copying else 0
            try:
                fs.send(rp.message(rp.HEARTBEAT, self.epoch_seen, applied, {"applied": applied}))
            except ConnectionError:
                return   # the link is closing: _serve sees it and ends the session

    async def _verify(self, fs, body) -> None:
        """Compare this secondary's block checksums with the primary's, at the
        same serial (the message arrives right after the entries up to it)."""
        if not isinstance(body, dict) or type(body.get("id")) is not int or not isinstance(body.get("sums"), bytes):
            raise errors.ProtocolError(f"{fs.peer}: malformed VERIFY")
        mine = await self.ctl.call([m.OP_BLOCK_SUMS])
        differ = compare_sums(body["sums"], mine["sums"])
        fs.send(rp.message(rp.VERIFY_RESULT, self.epoch_seen, self.applied,
                           {"id": body["id"], "differ": differ, "serial": mine["serial"],
                            "checked": len(body["sums"]) // 12}))
        await fs.drain()


def _check_entries(fs, body) -> None:
    if (type(body) is not list or len(body) != 3 or type(body[0]) is not int or type(body[1]) is not int
            or not isinstance(body[2], bytes)):
        raise errors.ProtocolError(f"{fs.peer}: malformed ENTRIES")


def compare_sums(a: bytes, b: bytes) -> list[int]:
    """Block numbers whose checksums differ between two OP_BLOCK_SUMS payloads."""
    import struct
    s = struct.Struct("<IQ")
    da = dict(s.iter_unpack(a))
    db = dict(s.iter_unpack(b))
    return sorted(n for n in da.keys() | db.keys() if da.get(n) != db.get(n))


def _has_boundary(data: bytes) -> bool:
    """Does `data` hold the end (COMMIT or CANCEL) of a transaction?"""
    from .._native import lib
    from ..store.changelog import E_KIND
    return any(f[E_KIND] in (lib.APL_CE_COMMIT, lib.APL_CE_CANCEL) for _, f in walk(data))


def _serial_after(pending: bytes) -> int:
    """The last serial in a partial transaction kept back (its entries are contiguous)."""
    from ..store.changelog import E_SERIAL
    last = 0
    for _, f in walk(pending):
        last = f[E_SERIAL]
    return last


def _addr(v: str) -> tuple[str, int]:
    from ..config import parse_address
    return parse_address(v)


class Listener:
    """The secondary's listening socket and its accept loop; each connection
    is handed to `handle(sock, peer)` in a task of its own."""

    def __init__(self, host: str, port: int, handle) -> None:
        family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        self.sock = socket.create_server(addr[:2], family=family)   # SO_REUSEADDR, as asyncio sets
        self.sock.setblocking(False)
        self.handle = handle
        self.tasks: set = set()       # the loop keeps only weak references to tasks
        self.accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self.sock)
            except OSError:           # EMFILE and the like: the loop goes on
                await asyncio.sleep(0.1)
                continue
            t = loop.create_task(self.handle(sock, peer))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        self.accepting.cancel()
        self.sock.close()
