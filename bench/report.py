"""Rows, ratios against the peers, the printed tables and the JSON file."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

APPLIANCE = "appliance"

# Which peers' rows an appliance row is compared with: benchmark ids.
COMPARE_WITH = {
    "get": ("get", "snapshot-get"),       # get vs both lmdb variants (and Redis)
    "tx-write": ("tx-write", "write"),    # explicit transaction vs the peers' one-record writes
    "sync-tx-write": ("sync-write",),     # synchronous explicit transaction vs Redis SET + WAIT
}

# Goals and floors of the issue: (benchmark, appliance label, peer label, processes or None, goal, floor).
GOALS = [
    ("get", "appliance", "lmdb (txn per get)", 1, 2.0, 1.0),
    ("get", "appliance", "lmdb (one long txn)", 1, 2.0, 1.0),
    ("snapshot-get", "appliance (snapshot)", "lmdb (one long txn)", 1, 2.0, 1.0),
    ("find", "appliance", "lmdb", 1, 1.5, 1.0),
    ("write", "appliance", "redis", 8, 1.5, 1.0),
    ("tx-write", "appliance", "redis", 8, 1.5, 1.0),
    ("sync-write", "appliance (sync)", "redis (SET, WAIT 1 0)", 8, 2.0, 1.0),
    ("transfer", "appliance (optimistic)", "redis", 8, 1.5, None),   # WATCH/EXEC is optimistic too
    ("durable-write", "appliance (log_sync commit)", "redis (appendfsync always)", 8, 1.5, None),
]
ORDER_GOAL = 1.5   # mean get latency after a random-order load ÷ after a key-order load
RECORD_BYTES_GOAL = 1.3    # shared memory in use ÷ the raw bytes of the records (and their index entries)
GROWTH_GOAL = 1.3          # mean get latency at growth x the records ÷ at the records
SYNC_P99_GOAL_MS = 2.0     # p99 of a synchronous commit on loopback
COPY_GOAL = 0.5            # first copy ÷ its bottleneck (loopback TCP, and lz4 for an lz4 secondary)
CATCH_UP_GOAL = 3.0        # catch-up rate ÷ the primary's sustained write rate
MEMORY_GOAL = 0.5          # lz4 secondary's memory ÷ the primary's
SYNC_CPU_GOAL_US = 140.0   # CPU of the four processes per synchronous commit, 8 clients
SYNC_2_GOAL = 0.8          # synchronous commit rate with 2 synchronous secondaries ÷ with 1
CHECKPOINT_GOAL = 0.5      # checkpoint write rate ÷ the disk's sequential write rate
COLD_START_GOAL = 2.0      # cold start time ÷ the time to read its files
CHECKPOINT_P99_GOAL = 1.2  # p99 of a durable commit during checkpoints ÷ without


def measurement_row(bench_id: str, name: str, system: str, processes: int, m, latency: str, **extra) -> dict:
    return {
        "kind": "measurement", "bench": bench_id, "name": name, "system": system,
        "processes": processes, "ops_per_s": round(m.ops_per_s, 1),
        "p50_us": round(m.p50_us, 3), "p99_us": round(m.p99_us, 3),
        "ops": m.ops, "seconds": round(m.seconds, 3), "samples": m.samples, "latency": latency, **extra,
    }


def rate_row(bench_id: str, name: str, system: str, value: float, unit: str, detail: str = "", **figures) -> dict:
    """A figure that is not an operation rate: MB/s, txn/s, MiB."""
    return {"kind": "rate", "bench": bench_id, "name": name, "system": system, "processes": 1,
            "value": round(value, 3), "unit": unit, "detail": detail,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}}


def _goal(bench, system, peer, processes):
    for b, s, p, procs, goal, floor in GOALS:
        if (b, s, p) == (bench, system, peer) and procs in (None, processes):
            return goal, floor
    return None, None


def _ratio_row(bench, name, system, processes, ratio, goal, floor, higher_is_better=True, **extra) -> dict:
    def met(limit):
        if limit is None:
            return None
        return ratio >= limit if higher_is_better else ratio <= limit
    return {"kind": "ratio", "bench": bench, "name": name, "system": system, "processes": processes,
            "ratio": round(ratio, 3), "goal": goal, "floor": floor,
            "met_goal": met(goal), "met_floor": met(floor),
            "better": "higher" if higher_is_better else "lower", **extra}


def ratio_rows(rows: list[dict]) -> list[dict]:
    meas = [r for r in rows if r["kind"] == "measurement"]
    out = []
    for a in meas:
        if not a["system"].startswith(APPLIANCE) or a["bench"].startswith("order-"):
            continue
        benches = COMPARE_WITH.get(a["bench"], (a["bench"],))
        for peer in meas:
            if (peer["bench"] in benches and not peer["system"].startswith(APPLIANCE)
                    and peer["processes"] == a["processes"] and peer["ops_per_s"]):
                goal, floor = _goal(a["bench"], a["system"], peer["system"], a["processes"])
                out.append(_ratio_row(a["bench"], a["name"], f"{a['system']}/{peer['system']}",
                                      a["processes"], a["ops_per_s"] / peer["ops_per_s"], goal, floor))
    by_bench = {r["bench"]: r for r in meas if r["system"] == APPLIANCE}
    rnd, key = by_bench.get("order-random"), by_bench.get("order-key")
    if rnd and key and rnd["ops_per_s"]:
        out.append(_ratio_row(
            "order", "get latency after random-order ÷ key-order load",
            "appliance (random order)/appliance (key order)", 1,
            key["ops_per_s"] / rnd["ops_per_s"], ORDER_GOAL, None, higher_is_better=False,
            p50_ratio=round(rnd["p50_us"] / key["p50_us"], 3) if key["p50_us"] else None))
    small, large = by_bench.get("growth-small"), by_bench.get("growth-large")
    if small and large and large["ops_per_s"]:
        out.append(_ratio_row(
            "growth", f"get latency at {large['records']:,} ÷ at {small['records']:,} records",
            "appliance (large)/appliance (small)", 1, small["ops_per_s"] / large["ops_per_s"], GROWTH_GOAL,
            None, higher_is_better=False,
            p50_ratio=round(large["p50_us"] / small["p50_us"], 3) if small["p50_us"] else None))
    for r in rows:
        if r["kind"] == "rate" and r["bench"] == "record-bytes":
            out.append(_ratio_row("record-bytes", f"shared memory ÷ raw record bytes ({r['order']} order)",
                                  f"{r['system']} in use/raw", 1, r["value"] / r["raw_bytes_per_record"],
                                  RECORD_BYTES_GOAL, None, higher_is_better=False))
    return out + replication_ratio_rows(rows) + durability_ratio_rows(rows)


def durability_ratio_rows(rows: list[dict]) -> list[dict]:
    """Checkpoint rate ÷ the disk's write rate; cold start ÷ reading its files."""
    rates = {r["bench"]: r for r in rows if r["kind"] == "rate"}
    out = []
    cp, disk = rates.get("checkpoint"), rates.get("disk-write")
    if cp and disk and disk["value"]:
        out.append(_ratio_row("checkpoint", "checkpoint write rate ÷ disk sequential write rate",
                              f"{cp['system']}/{disk['system']}", 1, cp["value"] / disk["value"],
                              CHECKPOINT_GOAL, None))
    meas = {(r["bench"], r["processes"]): r for r in rows if r["kind"] == "measurement"
            and r["system"].startswith(APPLIANCE)}
    during, plain = meas.get(("durable-write-ckpt", 8)), meas.get(("durable-write", 8))
    if during and plain and plain["p99_us"]:
        out.append(_ratio_row("durable-write-ckpt", "p99 of a durable commit during checkpoints ÷ without",
                              f"{during['system']}, 8 processes", 8, during["p99_us"] / plain["p99_us"],
                              CHECKPOINT_P99_GOAL, None, higher_is_better=False,
                              ops_ratio=round(during["ops_per_s"] / plain["ops_per_s"], 3)))
    cold, read = rates.get("cold-start"), rates.get("file-read")
    if cold and read and read["value"]:
        out.append(_ratio_row("cold-start", "cold start time ÷ time to read its files", "appliance/read", 1,
                              cold["value"] / read["value"], COLD_START_GOAL, None, higher_is_better=False,
                              loading_only=round(cold["loaded_s"] / read["value"], 3)))
    return out


def replication_ratio_rows(rows: list[dict]) -> list[dict]:
    """p99 of a synchronous commit, first copy ÷ bottleneck, catch-up ÷ write
    rate, secondary ÷ primary memory."""
    out = []
    for r in rows:
        if r["kind"] == "measurement" and r["bench"] == "sync-write" and r["system"] == "appliance (sync)":
            out.append(_ratio_row("sync-write", "p99 of a synchronous commit, in ms (not a ratio)",
                                  "appliance (sync) p99 ms", r["processes"], r["p99_us"] / 1000,
                                  SYNC_P99_GOAL_MS, None, higher_is_better=False))
    sync = {r["system"]: r for r in rows if r["kind"] == "measurement" and r["bench"] == "sync-write"
            and r["processes"] == 8}
    one, two = sync.get("appliance (sync)"), sync.get("appliance (sync, 2 secondaries)")
    if one and two and one["ops_per_s"]:
        out.append(_ratio_row("sync-2", "synchronous commit rate, 2 synchronous secondaries ÷ 1",
                              "appliance (sync, 2 secondaries)/appliance (sync)", 8,
                              two["ops_per_s"] / one["ops_per_s"], SYNC_2_GOAL, None))
    rates = [r for r in rows if r["kind"] == "rate"]
    limits = {r["bench"]: r for r in rates if r["bench"] in ("copy-tcp", "copy-lz4")}
    for r in rates:
        if r["bench"] == "copy":
            # the stages a copy goes through: TCP, and lz4 compression for an lz4 secondary
            stages = [limits.get("copy-tcp")] + ([limits.get("copy-lz4")] if "lz4" in r["system"] else [])
            if None in stages:
                continue
            neck = min(stages, key=lambda x: x["value"])
            out.append(_ratio_row("copy", "first copy ÷ its bottleneck (MB/s)", f"{r['system']}/{neck['system']}",
                                  1, r["value"] / neck["value"], COPY_GOAL, None,
                                  from_agent_start=round(r["bytes"] / r["wall_s"] / 1e6 / neck["value"], 3)))
        elif r["bench"] == "catch-up":
            for label, rate in (("from link up", r["rate"]), ("from agent restart", r["rate_from_restart"])):
                out.append(_ratio_row("catch-up", f"catch-up ÷ primary write rate, {label}",
                                      f"{r['system']}/primary", 1, rate / r["write_rate"], CATCH_UP_GOAL, None,
                                      copied=r["copied"]))
        elif r["bench"] == "sync-cpu":
            two = "2 secondaries" in r["system"]      # the growth row: what the second secondary adds
            out.append(_ratio_row("sync-cpu", f"CPU µs per synchronous commit, {6 if two else 4} processes "
                                  "(not a ratio)", f"{r['system']} µs", r["clients"], r["total_us"],
                                  SYNC_CPU_GOAL_US if r["clients"] == 8 and not two else None, None,
                                  higher_is_better=False))
        elif r["bench"] == "memory":
            lz4 = "lz4" in r["system"]
            out.append(_ratio_row("memory", "secondary ÷ primary memory (pages in use)", f"{r['system']}/primary",
                                  1, r["secondary_bytes_used"] / r["primary_bytes_used"],
                                  MEMORY_GOAL if lz4 else None, None, higher_is_better=False))
            if lz4:
                out.append(_ratio_row("memory", "secondary ÷ primary memory (live bytes)",
                                      f"{r['system']}/primary", 1,
                                      r["secondary_bytes_live"] / r["primary_bytes_used"], None, None,
                                      higher_is_better=False))
    return out


# ----------------------------------------------------------------- meta ----

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def meta_row(args, info: dict, notes: list[str], unavailable: dict, timer_ns: float) -> dict:
    import msgpack
    return {
        "kind": "meta", "name": "machine", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": _cpu_model(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "msgpack": ".".join(map(str, msgpack.version)), **info,
        "records": args.records, "quick": args.quick, "duration_s": args.duration,
        "warmup_s": args.warmup, "perf_counter_ns_overhead_ns": round(timer_ns, 1),
        "notes": notes, "not_available": unavailable,
    }


# --------------------------------------------------------------- output ----

class Printer:
    """Progress lines and the final tables, with rich when it is installed."""

    def __init__(self) -> None:
        try:   # imported here, not at the top: spawned workers re-import run.py's modules
            from rich.console import Console
        except ImportError:  # plain text without rich
            Console = None
        self.console = Console() if Console else None
        if self.console and not self.console.is_terminal:   # a log file: no wrapping at 80
            self.console = Console(width=150)

    def say(self, text: str, style: str = "") -> None:
        if self.console:
            self.console.print(text, style=style or None, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def _table(self, title: str, columns: list[str], rows: list[list[str]], left: tuple = (0, 1)) -> None:
        if self.console:
            from rich.table import Table
            t = Table(title=title, title_justify="left")
            for i, c in enumerate(columns):
                t.add_column(c, justify="left" if i in left else "right")
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
            return
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(f"\n{title}")
        for line in [columns, ["-" * w for w in widths], *rows]:
            print("  ".join(x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))

    def results(self, rows: list[dict]) -> None:
        meas = [r for r in rows if r["kind"] == "measurement"]
        if not meas:
            self.say("no measurements")
            return
        self._table("Results", ["benchmark", "system", "processes", "ops/s", "p50 µs", "p99 µs"], [
            [r["name"], r["system"], str(r["processes"]), f"{r['ops_per_s']:,.0f}",
             f"{r['p50_us']:,.2f}", f"{r['p99_us']:,.2f}"] for r in meas])
        rates = [r for r in rows if r["kind"] == "rate"]
        if rates:
            self._table("Rates, times and memory", ["benchmark", "system", "value", "unit", "details"], [
                [r["name"], r["system"], f"{r['value']:,.1f}", r["unit"], r["detail"]] for r in rates],
                left=(0, 1, 3, 4))
        ratios = [r for r in rows if r["kind"] == "ratio"]
        if ratios:
            self._table("Appliance vs peers (ops/s ratio unless noted)",
                        ["benchmark", "comparison", "processes", "ratio", "goal", "floor", "verdict"],
                        [[r["name"], r["system"], str(r["processes"]), f"{r['ratio']:.2f}",
                          _limit(r, "goal"), _limit(r, "floor"), _verdict(r)] for r in ratios])

    def meta(self, meta: dict) -> None:
        self.say(f"machine: {meta['cpu']}, {meta['cores']} cores ({meta['usable_cores']} usable), "
                 f"Python {meta['python']}; perf_counter_ns costs ~{meta['perf_counter_ns_overhead_ns']} ns; "
                 f"load average (1 min) at start/end: {meta.get('loadavg_1min_start_end')}")
        for note in meta["notes"]:
            self.say(f"  - {note}")
        for system, reason in meta["not_available"].items():
            self.say(f"{system}: not available: {reason}", style="yellow")


def _limit(r: dict, key: str) -> str:
    v = r[key]
    if v is None:
        return "-"
    return f"{'>=' if r['better'] == 'higher' else '<='} {v:g}"


def _verdict(r: dict) -> str:
    if r["met_goal"] is None:
        return "-"
    if r["met_goal"]:
        return "goal met"
    if r["met_floor"] is None:
        return "goal missed"
    return "floor met, goal missed" if r["met_floor"] else "BELOW FLOOR"


def write_json(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
