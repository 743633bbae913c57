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
import os
import socket
import time

from appliance_system import AppliancePair, event_time
from data import make_args
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

def block_images(appliance_name: str) -> list[bytes]:
    """Every block image of an appliance, read at one pinned version."""
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
    return images


def lz4_rate(appliance_name: str, min_seconds: float = LZ4_MIN_SECONDS) -> dict:
    """One core's ``lz4.block.compress`` rate over every block image of an
    appliance (read at one pinned version first, untimed), in this process."""
    try:
        import lz4.block
    except ImportError as e:
        raise Unavailable(f"python lz4 is not installed ({e})") from None
    images = block_images(appliance_name)
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


# ------------------------------------------------ CPU per synchronous commit ----

CPU_WARMUP_COMMITS = 200     # per client, before the counters are read


def proc_cpu_us(pid: int) -> tuple[float, float, float, int]:
    """(user, system, on-CPU) microseconds a process has used, and the times
    it was put on a CPU: ``utime`` and ``stime`` of ``/proc/<pid>/stat`` (all
    its threads), and the scheduler's own run time and count of time slices,
    the first and third fields of ``/proc/<pid>/task/*/schedstat`` (every
    thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    ran = slices = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                st = f.read().split()
        except FileNotFoundError:   # a thread that ended meanwhile
            continue
        ran, slices = ran + int(st[0]), slices + int(st[2])
    return int(fields[11]) * 1e6 / tick, int(fields[12]) * 1e6 / tick, ran / 1e3, slices   # stat(5) fields 14, 15


def _cpu_worker(spec, params, seed, commits, barrier, conn) -> None:
    try:
        args = make_args("record", params, seed)
        client = spec()
        try:
            for i in range(CPU_WARMUP_COMMITS):
                client.write(args[i % len(args)])
            barrier.wait(300)            # the parent reads the counters
            barrier.wait(300)
            c0 = time.process_time()
            for i in range(commits):
                client.write(args[(CPU_WARMUP_COMMITS + i) % len(args)])
            cpu = time.process_time() - c0
            barrier.wait(300)            # every client is done: the parent reads them again
        finally:
            client.close()
        conn.send({"cpu_s": cpu})
    except BaseException:  # noqa: BLE001 - the parent reports it
        import traceback
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def sync_cpu(pair: AppliancePair, params: dict, clients: int, commits: int, seed: int) -> dict:
    """CPU per synchronous one-record commit, per process of the pair.

    ``clients`` worker processes each run ``commits // clients`` autocommits
    (``t[k] = rec``, durability "quorum": each returns once the secondary
    applied it) after a warm-up; the four processes' utime+stime
    (/proc/<pid>/stat) are read when every client is ready and again when all
    are done, and divided by the commits. What one commit costs does not
    depend on how fast the machine is at the time, only on how many commits
    share a batch and a message (1 client: none)."""
    ctx = mp.get_context("spawn")
    procs = pair.cpu_processes()
    per_client = commits // clients
    barrier = ctx.Barrier(clients + 1)
    workers, conns = [], []
    try:
        for w in range(clients):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_cpu_worker, daemon=True, name=f"bench-sync-cpu-{w}",
                            args=(pair.client_spec(), params, seed * 1000 + w, per_client, barrier, send))
            p.start()
            send.close()
            workers.append(p)
            conns.append(recv)
        barrier.wait(300)
        before_status = pair.node.status()
        before = {name: proc_cpu_us(pid) for name, pid in procs.items()}
        t0 = time.monotonic()
        barrier.wait(300)
        barrier.wait(300)
        elapsed = time.monotonic() - t0
        after = {name: proc_cpu_us(pid) for name, pid in procs.items()}
        after_status = pair.node.status()
        results = []
        for recv in conns:
            msg = recv.recv()
            if "error" in msg:
                raise RuntimeError(f"sync-cpu worker failed:\n{msg['error']}")
            results.append(msg)
    finally:
        barrier.abort()
        for p in workers:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        for recv in conns:
            recv.close()
    tx0, tx1 = before_status["transactions"], after_status["transactions"]
    done = tx1["committed"] - tx0["committed"]
    if done < per_client * clients:
        raise RuntimeError(f"only {done} of {per_client * clients} commits were effective")
    n = per_client * clients
    out = {"commits": n, "clients": clients, "seconds": elapsed, "commits_per_s": n / elapsed,
           "commits_per_batch": n / max(1, tx1["batches"] - tx0["batches"])}
    total = total_stat = 0.0
    for name in procs:
        user, system, ran, slices = (a - b for a, b in zip(after[name], before[name]))
        out[f"{name}_user_us"], out[f"{name}_system_us"] = user / n, system / n
        out[f"{name}_runs"] = slices / n
        out[f"{name}_stat_us"] = (user + system) / n
        out[f"{name}_us"] = ran / n
        total += ran
        total_stat += user + system
    out["total_us"] = total / n
    out["total_stat_us"] = total_stat / n
    out["clients_us"] = sum(r["cpu_s"] for r in results) * 1e6 / n
    return out
