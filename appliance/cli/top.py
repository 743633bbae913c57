"""``appliance top --config C``: a live terminal view of one appliance.

Once per ``--interval`` it asks the controller for its status (OP_STATUS, the
figures ``appliance status`` and the metrics endpoint show) and draws, in an
80x24 terminal (over SSH too: plain text and box characters, no mouse): who
it is and whether it is healthy, commits per second and replication lag over
the last minutes as sparklines, each secondary (or, on a secondary, its
primary), the storage devices, the group commit, and the oldest snapshot.
``q`` or Ctrl-C leaves it and gives the terminal back as it was. A controller
that stops is shown as not running and is attached to again when it returns.

``--once`` prints one frame (rates over one interval) and exits; ``--json``
prints that frame's figures as one JSON object instead. Both exit 3 when the
appliance is not running.

:class:`View` is the figures and their history, kept apart from drawing
(:func:`render`), so a frame is a pure function of what was sampled.
"""
from __future__ import annotations

import json
import os
import select
import sys
import time
from collections import deque

from rich.console import Console, Group
from rich.text import Text

from .. import errors

__all__ = ["run", "View", "render", "sparkline"]

HISTORY = 120                  # samples kept: 2 minutes at the default interval
_BARS = "▁▂▃▄▅▆▇█"
WIDTH = 80


def sparkline(values, width: int) -> str:
    """The last `width` values as block characters, scaled to their maximum."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return _BARS[0] * len(vals)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in vals)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _uptime(s: float) -> str:
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s < 86400 else f"{s // 86400}d{s % 86400 // 3600}h"


class View:
    """Samples of one appliance's status and what they say (rates, lag, health)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status: dict | None = None   # the latest status; None: not running
        self.error = ""
        self.at = 0.0
        self.commits = deque(maxlen=HISTORY)   # commits per second, per interval
        self.lag = deque(maxlen=HISTORY)       # serials behind (the worst secondary, or this secondary)
        self.rates: dict = {}

    def add(self, st: dict | None, now: float, error: str = "") -> None:
        prev, prev_at = self.status, self.at
        self.status, self.at, self.error = st, now, error
        if st is None:
            return
        lag = self.lag_serials()
        self.lag.append(lag if lag is not None else 0)
        if prev is None or now <= prev_at or prev.get("pid") != st.get("pid"):
            self.rates = {}
            return
        dt = now - prev_at
        tx, ptx = st["transactions"], prev["transactions"]
        self.rates = {
            "commits_s": max(0, tx["committed"] - ptx["committed"]) / dt,
            "batches_s": max(0, tx["batches"] - ptx["batches"]) / dt,
            "cancelled_s": max(0, tx["cancelled"] - ptx["cancelled"]) / dt,
            "lock_waits_s": max(0, tx.get("lock_waits", 0) - ptx.get("lock_waits", 0)) / dt,
        }
        rep, prep = st.get("replication") or {}, prev.get("replication") or {}
        if rep.get("role") == "secondary" and prep.get("role") == "secondary":
            # a secondary commits nothing itself: its throughput is the primary's serials it applies
            self.rates["applied_s"] = max(0, rep["applied_serial"] - prep["applied_serial"]) / dt
        self.commits.append(self.rates.get("applied_s", self.rates["commits_s"]))

    def lag_serials(self) -> int | None:
        rep = (self.status or {}).get("replication") or {}
        if rep.get("role") == "primary":
            return max((x["lag"].get("serials", 0) for x in rep["secondaries"].values()), default=0)
        if rep.get("role") == "secondary":
            return (rep.get("lag") or {}).get("serials")
        return None

    def problems(self) -> list[str]:
        """What is not healthy, most important first (empty: healthy)."""
        st = self.status
        if st is None:
            return [f"not running: {self.error}" if self.error else "not running"]
        out = []
        rep = st.get("replication") or {}
        agent = rep.get("agent") or {}
        if rep and not agent.get("attached"):
            out.append("replication agent not attached")
        if rep.get("role") == "primary":
            for name, x in sorted(rep["secondaries"].items()):
                if x.get("degraded"):
                    out.append(f"{name} degraded (out of the quorum)")
                elif not x["healthy"]:
                    out.append(f"{name} {x['state']}")
            if rep.get("waiting_commits"):
                out.append(f"{rep['waiting_commits']} commits wait for backup")
        elif rep.get("role") == "secondary":
            if rep.get("needs_copy"):
                out.append("needs a block copy")
            lag = rep.get("lag") or {}
            if not lag.get("connected"):
                out.append(f"primary {rep.get('primary')} not connected")
        if st["readers"].get("warning"):
            out.append("readers hold old versions")
        for seg in st["segments"]:
            if seg.get("state", "in service") != "in service":
                out.append(f"device {seg['index']} {seg['state']}")
        return out

    def as_dict(self) -> dict:
        """The frame's figures (``--json``)."""
        st = self.status
        out = {"name": self.name, "running": st is not None, "problems": self.problems(),
               "rates": {k: round(v, 3) for k, v in self.rates.items()}, "lag_serials": self.lag_serials()}
        if st is None:
            out["error"] = self.error
            return out
        r = st["readers"]
        out.update(role=st["role"], epoch=st["epoch"], version=st["version"], uptime_s=round(st["uptime_s"], 1),
                   devices=[{k: s.get(k) for k in ("name", "slots", "used", "free", "state")}
                            for s in st["segments"]],
                   oldest_snapshot={"pid": r.get("oldest_pin_pid"), "age_s": r.get("oldest_pin_age_s"),
                                    "pins": r["active"]},
                   replication=_replication_rows(st))
        return out


def _replication_rows(st: dict) -> list[dict]:
    rep = st.get("replication") or {}
    if rep.get("role") == "primary":
        return [{"secondary": n, "mode": x["mode"], "state": x["state"], "healthy": x["healthy"],
                 "lag_serials": x["lag"].get("serials", 0), "lag_s": x["lag"]["seconds"],
                 "copy": x.get("copy"), "batch": bool(x.get("batch"))} for n, x in sorted(rep["secondaries"].items())]
    if rep.get("role") == "secondary":
        lag = rep.get("lag") or {}
        return [{"primary": rep.get("primary"), "connected": lag.get("connected"),
                 "state": (rep.get("agent") or {}).get("state"), "applied_serial": rep["applied_serial"],
                 "lag_serials": lag.get("serials"), "lag_s": lag.get("seconds"),
                 "batch": (rep.get("batch") or {}).get("state")}]
    return []


def render(view: View, width: int = WIDTH, height: int = 24) -> Group:
    """One frame: at most `height` lines of at most `width` columns."""
    lines: list[Text] = []
    st = view.status
    probs = view.problems()
    head = Text(f"appliance {view.name}", style="bold")
    if st is not None:
        head.append(f"  {st['role']}, epoch {st['epoch']}, version {st['version']}, up {_uptime(st['uptime_s'])}")
    lines.append(head)
    health = Text("health: ")
    health.append("OK" if not probs else "; ".join(probs)[: width - 9], style="green" if not probs else "bold red")
    lines.append(health)
    spark_w = width - 24
    if st is not None and st["role"] == "secondary":
        label, rate = "applied/s", view.rates.get("applied_s", 0)
    else:
        label, rate = "commits/s", view.rates.get("commits_s", 0)
    lines.append(Text(f"{label} {rate:>10,.0f} ") + Text(sparkline(view.commits, spark_w), style="cyan"))
    lag = view.lag_serials()
    if st is not None and not st.get("replication"):
        lines.append(Text("lag serials        - (no replication)"))
    else:
        lines.append(Text(f"lag serials {'-' if lag is None else lag:>8} ") +
                     Text(sparkline(view.lag, spark_w), style="magenta"))
    if st is None:
        lines.append(Text(""))
        lines.append(Text("waiting for the controller...", style="dim"))
        return _fit(lines, height)
    rows = _replication_rows(st)
    if rows and "secondary" in rows[0]:
        lines.append(Text(f"{'secondary':<18} {'mode':<5} {'state':<13} {'lag serials':>11} {'lag s':>8}  healthy",
                          style="bold"))
        for r in rows[:4]:
            note = "yes" if r["healthy"] else "no"
            if r.get("copy"):
                cp = r["copy"]
                note = f"copy {cp['blocks']}/{cp['total']}"
            elif r.get("batch"):
                note = "batch mode"
            lines.append(Text(f"{r['secondary'][:18]:<18} {r['mode']:<5} {r['state'][:13]:<13} "
                              f"{r['lag_serials']:>11} {r['lag_s']:>8.3f}  {note}"))
        if len(rows) > 4:
            lines.append(Text(f"... and {len(rows) - 4} more (appliance status)", style="dim"))
    elif rows:
        r = rows[0]
        lines.append(Text(f"primary {r['primary']}: {'connected' if r['connected'] else 'not connected'}, "
                          f"{r['state'] or '?'}, lag {'-' if r['lag_serials'] is None else r['lag_serials']} "
                          "serials" + (f" ({r['lag_s']:g} s)" if r["lag_s"] is not None else "")))
        batch = {"suspended": "batch mode: applying suspended, reads see one frozen state",
                 "catching_up": "batch mode ended: catching up"}.get(r.get("batch") or "", "batch mode: off")
        lines.append(Text(f"  applied serial {r['applied_serial']:,}; {batch}"))
    bar_w = 40
    segs = st["segments"]
    lines.append(Text("devices", style="bold"))
    for s in segs[:4]:
        used = s["used"] / s["slots"] if s["slots"] else 0.0
        fill = int(used * bar_w + 0.5)
        lines.append(Text(f"  dev{s['index']:<3} ") + Text("█" * fill, style="yellow") +
                     Text("░" * (bar_w - fill), style="dim") +
                     Text(f" {used:>4.0%}  {s['used']}/{s['slots']} blocks") +
                     (Text(f" {s['state'].upper()}", style="bold red")
                      if s.get("state", "in service") != "in service" else Text("")))
    if len(segs) > 4:
        lines.append(Text(f"  ... and {len(segs) - 4} more devices", style="dim"))
    tx = st["transactions"]
    per_batch = view.rates.get("commits_s", 0) / view.rates["batches_s"] if view.rates.get("batches_s") else 0.0
    lines.append(Text(f"group commit: {view.rates.get('batches_s', 0):,.0f} batches/s, {per_batch:.1f} per batch; "
                      f"{tx['active']} open, {tx['locks_held']} locks, "
                      f"{view.rates.get('lock_waits_s', 0):.0f} lock waits/s"))
    lines.append(Text(f"transactions: {tx['committed']:,} committed, {tx['cancelled']:,} cancelled, "
                      f"{tx['deadlocks']} deadlocks, {tx['lock_timeouts']} lock timeouts"))
    r = st["readers"]
    if r.get("oldest_pin_pid"):
        oldest = f"oldest snapshot {r['oldest_pin_age_s']:.1f} s (pid {r['oldest_pin_pid']})"
    else:
        oldest = "no snapshot held"
    lines.append(Text(f"readers: {r['active']} pinned, {oldest}; old versions {_size(r['old_versions_bytes'])}"))
    lg = st["log"]
    lines.append(Text(f"change log: serial {lg['serial']:,}, {_size(lg['head'] - lg['tail'])} of {_size(lg['size'])}; "
                      f"clients {st['clients']['connected']}"))
    return _fit(lines, height)


def _fit(lines: list[Text], height: int) -> Group:
    body = lines[: height - 2]
    footer = Text(f"q quit  ·  {time.strftime('%H:%M:%S')}", style="dim")
    for t in body:
        t.no_wrap = True
        t.overflow = "ellipsis"
    return Group(*body, Text(""), footer)


def _sample(cfg, view: View) -> None:
    from ..client.session import Session
    from ..wire import messages as m
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-top", timeout=5.0)
    try:
        s.connect()
        view.add(s.call([m.OP_STATUS], "status"), time.monotonic())
    except errors.UnavailableError as e:
        view.add(None, time.monotonic(), str(e))
    finally:
        s.close()


class _Keys:
    """The terminal's keys one at a time, without echo (cbreak), restored on exit."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.fd = stream.fileno() if stream.isatty() else None
        self.saved = None

    def __enter__(self) -> "_Keys":
        if self.fd is not None:
            import termios
            import tty
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def wait(self, timeout: float) -> str:
        """A key pressed within `timeout` seconds, or ""."""
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 32).decode(errors="replace") if ready else ""


def run(cfg, *, interval: float = 1.0, once: bool = False, as_json: bool = False) -> int:
    """The command's body; returns the exit status."""
    view = View(cfg.name)
    if once or as_json:
        _sample(cfg, view)
        if view.status is not None:
            time.sleep(interval)   # a second sample: rates over one interval
            _sample(cfg, view)
        if as_json:
            print(json.dumps(view.as_dict(), default=str))
        else:
            Console(width=WIDTH).print(render(view))
        return 0 if view.status is not None else errors.EXIT_NOT_RUNNING
    from rich.live import Live
    console = Console()
    try:
        with _Keys(sys.stdin) as keys, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                _sample(cfg, view)
                size = console.size
                live.update(render(view, width=min(size.width, 120), height=size.height), refresh=True)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in keys.wait(left).lower():
                        return 0
    except KeyboardInterrupt:
        return 0
