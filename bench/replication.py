"""Replication: the appliance's primary/secondary pairs against Redis with a replica.

Run from :class:`run.Run` (see README.md, "Replication"):

* **Synchronous / asynchronous one-record writes.** A fresh pair per mode
  (primary + one secondary that serves reads, on loopback), loaded with the
  data set; ``t[k] = rec`` from 1 and 8 client processes (and the explicit
  transaction with 8 in sync mode). Redis: a primary and a ``--replicaof``
  replica; SET then WAIT 1 0 (two round trips; the pipelined form is a
  separate row), or SET alone with the replica attached.
* **First copy.** The data set is loaded into a primary whose agent is not
  running; then the secondary's agent and the primary's are started; the copy
  lasts from the primary's ``copy_started`` to the secondary's
  ``copy_complete`` (bytes: block images, from the primary's
  ``copy_finished``): once into an uncompressed secondary, once into an lz4 one. In the same run:
  loopback TCP bandwidth (two processes, 1 MiB sends) and one core's
  ``lz4.block.compress`` rate over the primary's block images.
* **Memory.** Both controllers' status "memory" once the copy is acknowledged.
* **Catch-up.** On the asynchronous pair: the secondary's agent is stopped,
  4 clients write for a while, the load stops, the agent is restarted and
  the primary's status is polled until the secondary acknowledged the last
  change: transactions ÷ seconds, against the primary's write rate.
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import time

from appliance_system import AppliancePair, event_time
from harness import Timing, run_workers
from systems import Unavailable

TCP_SECONDS = 2.0
TCP_BUFFER = 1 << 20
LZ4_MIN_SECONDS = 1.0        # compress the images again until this much time is measured
COPY_TIMEOUT = 600.0
CATCH_UP_TIMEOUT = 600.0
CATCH_UP_CLIENTS = 4
CATCH_UP_POLL = 0.05         # s between two status calls of the primary while it catches up
MB = 1e6


# ------------------------------------------------------- loopback TCP ----

def _tcp_sender(port: int, seconds: float) -> None:
    buf = bytes(TCP_BUFFER)
    with socket.create_connection(("127.0.0.1", port)) as s:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            s.sendall(buf)


def tcp_rate(seconds: float = TCP_SECONDS) -> dict:
    """Loopback TCP bandwidth: a sender process writes 1 MiB buffers for
    ``seconds``, this process receives them; bytes ÷ time from the first byte
    to EOF."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.settimeout(60)
        sender = mp.get_context("spawn").Process(target=_tcp_sender, args=(ls.getsockname()[1], seconds),
                                                 daemon=True, name="bench-tcp-sender")
        sender.start()
        try:
            conn, _ = ls.accept()
            with conn:
                buf = bytearray(TCP_BUFFER)
                n = conn.recv_into(buf)
                total, t0 = n, time.perf_counter()
                while n:
                    n = conn.recv_into(buf)
                    total += n
                elapsed = time.perf_counter() - t0
            sender.join(30)
        finally:
            if sender.is_alive():
                sender.kill()
                sender.join(5)
    return {"bytes": total, "seconds": elapsed, "mb_s": total / elapsed / MB}


# ------------------------------------------------------------------ lz4 ----

def lz4_rate(appliance_name: str, min_seconds: float = LZ4_MIN_SECONDS) -> dict:
    """One core's ``lz4.block.compress`` rate over every block image of an
    appliance (read at one pinned version first, untimed), in this process."""
    try:
        import lz4.block
    except ImportError as e:
        raise Unavailable(f"python lz4 is not installed ({e})") from None
    from appliance.store.reader import Reader
    from appliance.store.segment import Attachment
    att = Attachment(appliance_name, writable=False)
    try:
        reader = Reader(att)
        pin = reader.pin()
        try:
            images = [img for n in range(reader.block_limit()) if (img := reader.block_image(n, pin.version))]
        finally:
            pin.close()
    finally:
        att.close()
    compress, ns = lz4.block.compress, time.perf_counter_ns
    size, out, passes, t0 = sum(map(len, images)), 0, 0, ns()
    while True:
        for img in images:
            out += len(compress(img))
        passes += 1
        elapsed = (ns() - t0) / 1e9
        if elapsed >= min_seconds:
            break
    return {"blocks": len(images), "bytes": size, "passes": passes, "seconds": elapsed,
            "mb_s": size * passes / elapsed / MB, "compressed_fraction": out / (size * passes)}


# ---------------------------------------------------------- the pairs ----

def first_copy(pair: AppliancePair) -> dict:
    """Start both agents of a pair whose secondary is empty. The copy lasts from
    the primary's agent logging ``copy_started`` to the secondary's agent
    logging ``copy_complete`` (every block applied, COPY_END acknowledged);
    the primary's ``copy_finished`` comes when the last block was handed to
    the socket, with megabytes still in flight, so its own seconds are kept
    as ``relay_seconds`` only. ``wall_s``: from the primary's agent start.
    ``attempts``: copies the primary's agent started until then (the link can
    fail during a copy, which then starts over: the time counts them all)."""
    started = pair.start_agents()
    fin = pair.primary_agent.wait_event("copy_finished", COPY_TIMEOUT)
    done = pair.secondary_agent.wait_event("copy_complete", COPY_TIMEOUT)
    pair.wait_caught_up(COPY_TIMEOUT)
    end = event_time(done)
    begins = [event_time(e) for e in pair.primary_agent.events() if e.get("event") == "copy_started"]
    attempts = sum(1 for t in begins if t <= end)   # > 1: the link failed and the copy started over
    seconds = end - begins[0]
    return {"bytes": fin["bytes"], "blocks": fin["blocks"], "seconds": seconds, "mb_s": fin["bytes"] / seconds / MB,
            "relay_seconds": fin["seconds"], "wall_s": end - started, "attempts": attempts}


def memory(pair: AppliancePair) -> tuple[dict, dict]:
    """``status()["memory"]`` of the primary and of the secondary."""
    return pair.node.status()["memory"], pair.secondary.status()["memory"]


def catch_up(pair: AppliancePair, params: dict, seconds: float, seed: int):
    """Stop the secondary's agent, write from CATCH_UP_CLIENTS processes for
    ``seconds``, stop the load, restart the agent and wait until the secondary
    acknowledged the last change. Returns (write Measurement, figures)."""
    pair.wait_caught_up()
    pair.secondary_agent.stop()
    before = pair.node.status()
    m = run_workers(pair.client_spec(), "write", "record", params, CATCH_UP_CLIENTS, 1, Timing(seconds, 0.0), seed)
    after = pair.node.status()
    txns = after["transactions"]["committed"] - before["transactions"]["committed"]
    log_bytes = (after["log"]["head"] - before["log"]["head"])
    pair.primary_agent.skip_events()
    restarted = pair.secondary_agent.start()
    done = pair.wait_caught_up(CATCH_UP_TIMEOUT, CATCH_UP_POLL)
    events = pair.primary_agent.events()
    linked = [event_time(e) for e in events if e.get("event") == "secondary_connected"]
    copied = any(e.get("event") in ("copy_started", "secondary_fell_behind_log") for e in events)
    link_up = linked[0] if linked else restarted
    return m, {
        "transactions": txns, "write_seconds": m.seconds, "write_rate": txns / m.seconds,
        "log_bytes": log_bytes, "log_size": after["log"]["size"], "copied": copied,
        "restart_to_link_s": link_up - restarted, "link_to_caught_up_s": done - link_up,
        "rate": txns / max(done - link_up, 1e-9), "rate_from_restart": txns / max(done - restarted, 1e-9),
    }
