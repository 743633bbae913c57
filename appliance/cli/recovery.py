"""Failover for operators and automation: promote, rejoin, fence.

Each function talks to the appliance's running controller (the work is
done there: appliance/controller/recovery.py) and returns what it reports,
so tests and scripts call them as the ``appliance`` subcommands do; they
raise the typed errors of :mod:`appliance.errors`. The subcommands
(appliance/cli/__main__.py) add the confirmation, the progress bar and the
human or ``--json`` output.
"""
from __future__ import annotations

import time
from typing import Callable

from .. import errors
from ..client.session import Session
from ..config import Config, load
from ..wire import messages as m

__all__ = ["promote", "rejoin", "fence", "rejoin_progress", "check", "repair", "devices", "detach", "replace"]


def _config(config) -> Config:
    return config if isinstance(config, Config) else load(config)


def _call(cfg: Config, req: list, what: str, timeout: float):
    s = Session(str(cfg.socket_path), cfg.name, name=f"appliance-{what}", timeout=timeout)
    try:
        s.connect()
        return s.call(req, what)
    finally:
        s.close()


def promote(config, *, drain_timeout: float = 5.0) -> dict:
    """Make the secondary of `config` the primary (see OP_PROMOTE): it applies
    every whole transaction it received, drops one received in part, and
    takes writes at a new epoch as soon as this returns."""
    cfg = _config(config)
    return _call(cfg, [m.OP_PROMOTE, {"drain_timeout": drain_timeout}], "promote", drain_timeout + 30)


def fence(config, epoch: int, primary: str | None = None) -> dict:
    """Tell the primary of `config` that `primary` is primary at `epoch`
    (newer than its own): it takes no writes from then on."""
    cfg = _config(config)
    return _call(cfg, [m.OP_FENCE, epoch, primary], "fence", 30)


def check(config) -> dict:
    """Every block of `config`'s appliance against its checksum (no peer):
    checked, damaged ([{block, file, devices}]), version."""
    cfg = _config(config)
    return _call(cfg, [m.OP_CHECK], "check", 600)


def repair(config, *, blocks: list[int] | None = None, table: str | None = None, device: int | None = None,
           dry_run: bool = False, timeout: float = 30.0) -> dict:
    """Copy blocks again from a peer (see OP_REPAIR): the damaged ones, or
    those numbers, that table's, or that device's; blocks, repaired, failed."""
    cfg = _config(config)
    opts: dict = {"dry_run": dry_run, "timeout": timeout}
    for k, v in (("blocks", blocks), ("table", table), ("device", device)):
        if v is not None:
            opts[k] = v
    return _call(cfg, [m.OP_REPAIR, opts], "repair", timeout + 600)


def devices(config) -> list[dict]:
    """Every device segment of `config`'s appliance (see OP_DEVICES): index,
    name, state, slots, used, free, blocks, damaged, unavailable, bytes."""
    return _call(_config(config), [m.OP_DEVICES], "device list", 600)


def detach(config, device: int) -> dict:
    """Take device segment `device` out of service (see OP_DEVICE_DETACH):
    the blocks on it are unavailable (DeviceUnavailableError) until
    :func:`replace` refills them; device, blocks, state."""
    return _call(_config(config), [m.OP_DEVICE_DETACH, device], "device detach", 60)


def replace(config, device: int, *, online: bool = False, timeout: float = 120.0,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Replace device segment `device` with a new one refilled with exactly
    its blocks from a peer (see OP_DEVICE_REPLACE): with processing
    suspended, or `online`. `progress` is called with status
    ``devices.replace`` (phase, blocks, done, bytes, rate_blocks_s, eta_s)
    as it goes, and last with phase "done". Returns device, mode, blocks, refilled, failed, moved,
    bytes, seconds, rate_bytes_s, source."""
    cfg = _config(config)
    req = [m.OP_DEVICE_REPLACE, device, {"online": online, "timeout": timeout}]
    if progress is None:
        return _call(cfg, req, "device replace", 3 * timeout + 600)
    import threading
    out: dict = {}

    def run() -> None:
        try:
            out["rep"] = _call(cfg, req, "device replace", 3 * timeout + 600)
        except BaseException as e:     # re-raised in the caller's thread
            out["err"] = e
    t = threading.Thread(target=run, name="appliance-device-replace", daemon=True)
    t.start()
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-device-progress", timeout=30)
    try:
        s.connect()
        while t.is_alive():
            job = s.call([m.OP_STATUS], "status")["devices"]["replace"]
            if job is not None:
                progress(job)
            t.join(0.1)
    finally:
        s.close()
    t.join()
    if "err" in out:
        raise out["err"]
    rep = out["rep"]
    progress({"device": rep["device"], "mode": rep["mode"], "phase": "done", "blocks": rep["blocks"],
              "done": rep["blocks"], "bytes": rep["bytes"], "bytes_s": rep.get("rate_bytes_s") or 0.0})
    return rep


#: seconds a rejoin's wait goes on with no agent attached before it says so
AGENT_WAIT = 30.0


def rejoin(config, *, wait: bool = True, timeout: float = 600.0, agent_wait: float = AGENT_WAIT,
           progress: Callable[[dict], None] | None = None) -> dict:
    """Make the (former) primary of `config` a secondary of the new primary
    (see OP_REJOIN). With `wait`, return once it follows the new primary:
    rewound, the blocks that needed it copied, streaming; `progress` is
    called with each status seen meanwhile. The result: OP_REJOIN's report,
    and with `wait` the rewind's (``rewound``) and the replication state.
    A wait in which no agent is attached for `agent_wait` seconds ends with
    UnavailableError (the agent is not running, or stopped on its way to
    the secondary side: its log says why)."""
    cfg = _config(config)
    rep = _call(cfg, [m.OP_REJOIN, {}], "rejoin", 60)
    if not wait:
        return rep
    st = _wait_following(cfg, timeout, progress, agent_wait)
    rep["rewound"] = st["failover"]["rewound"]
    rep["replication"] = st["replication"]
    return rep


def rejoin_progress(st: dict) -> tuple[str, int | None, int | None]:
    """(phase, done, total) of a rejoin, from the rejoining appliance's status."""
    rep = st.get("replication") or {}
    ag = rep.get("agent") or {}
    if not ag.get("attached") or not ag.get("connected"):
        return "waiting for the new primary", None, None
    cp = (ag.get("copy_progress") or {})
    if rep.get("copying") or ag.get("copying"):
        return "copying blocks from the new primary", cp.get("blocks"), cp.get("total")
    return "streaming", None, None


def _following(st: dict) -> bool:
    rep = st.get("replication") or {}
    ag = rep.get("agent") or {}
    return (st.get("role") == "secondary" and rep.get("source_instance") not in (None, 0, st.get("instance"))
            and ag.get("attached") and ag.get("connected") and ag.get("state") == "streaming"
            and not rep.get("copying") and not ag.get("copying") and not st["failover"]["repair_pending"])


def _wait_following(cfg: Config, timeout: float, progress, agent_wait: float) -> dict:
    now = time.monotonic()
    deadline = now + timeout
    attached_at = now        # when an agent was last seen attached (the wait's start counts as one)
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-rejoin", timeout=30)
    try:
        s.connect()
        while True:
            st = s.call([m.OP_STATUS], "status")
            if progress is not None:
                progress(st)
            if _following(st):
                return st
            now = time.monotonic()
            if ((st.get("replication") or {}).get("agent") or {}).get("attached"):
                attached_at = now
            elif now - attached_at > agent_wait:
                raise errors.UnavailableError(
                    f"rejoin: {cfg.name!r} is a secondary now, but no replication agent has been attached to it "
                    f"for {agent_wait:g} s: start its agent (its log says why it stopped, e.g. "
                    f"replication.listen {cfg.replication.listen} in use); `appliance status` then shows it "
                    "follow the new primary", phase="no agent", listen=cfg.replication.listen)
            if now > deadline:
                raise errors.UnavailableError(
                    f"rejoin: {cfg.name!r} became a secondary but does not follow the new primary within "
                    f"{timeout:g} s ({rejoin_progress(st)[0]}); check that its agent runs and that the new "
                    "primary's config lists it as a secondary", phase=rejoin_progress(st)[0])
            time.sleep(0.1)
    finally:
        s.close()
