"""``appliance checkpoint``: take a checkpoint now, following it with a
progress bar; callable from Python as :func:`checkpoint`."""
from __future__ import annotations

import os
import time

from .. import errors
from ..config import Config

__all__ = ["checkpoint"]


def checkpoint(cfg: Config, *, timeout: float = 3600.0, progress=None) -> dict:
    """Ask the controller of `cfg` for a checkpoint and wait until it is
    written; returns what status says of it (durability.last_checkpoint:
    file, serial, version, blocks, bytes, seconds, rate_mb_s).
    `progress(done_blocks, total_blocks, bytes)` is called as it goes.
    Raises UnavailableError (not running), ConfigError (no [durability]),
    BusyError (a block copy runs on this secondary), DiskError (it could not
    be written: the message says why)."""
    from ..client.session import Session
    from ..wire import messages as m
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-checkpoint", timeout=30)
    try:
        s.connect()
        started = s.call([m.OP_CHECKPOINT], "checkpoint")
        number = started["number"]
        deadline = time.monotonic() + timeout
        while True:
            d = s.call([m.OP_STATUS], "status")["durability"]
            last = d.get("last_checkpoint") or {}
            if last.get("number") == number:
                if progress is not None:
                    progress(last["blocks"], last["blocks"], last["bytes"])
                return last
            running = d.get("checkpoint")
            if running is None or running.get("number") != number:
                if (d.get("checkpoints") or {}).get("last_error"):
                    raise errors.DiskError(f"checkpoint {number} of {cfg.name!r} failed: "
                                           f"{d['checkpoints']['last_error']}", path=d.get("dir"))
            elif progress is not None:
                progress(running["blocks"], running["total"], running["bytes"])
            if time.monotonic() > deadline:
                raise errors.UnavailableError(f"checkpoint {number} of {cfg.name!r} not written within {timeout} s")
            time.sleep(0.1)
    finally:
        s.close()


def run(cfg: Config, timeout: float, as_json: bool) -> dict:
    """The command: a progress bar on a terminal (or with APPLIANCE_PROGRESS=1)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from .render import console
    show = not as_json and (console.is_terminal or os.environ.get("APPLIANCE_PROGRESS") == "1")
    with Progress(TextColumn("checkpoint"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, disable=not show) as bar:
        task = bar.add_task("checkpoint", total=None, info="")

        def tick(done: int, total: int, nbytes: int) -> None:
            bar.update(task, total=total, completed=done, info=f"{nbytes / 1e6:.1f} MB")
        return checkpoint(cfg, timeout=timeout, progress=tick)
