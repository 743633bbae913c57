"""The ``appliance`` command: starts the processes and serves operators.

Exit status (appliance.errors.EXIT_*): 0 success; 1 a refused operation
(typed error, message on stderr); 2 usage; 3 the appliance is not running;
69 the appliance is busy (another controller serves it, an address in use);
78 bad configuration (EX_CONFIG), 66 a file it names is missing (EX_NOINPUT),
77 one this user may not read (EX_NOPERM); the processes add 64 (a bad
environment variable) and 67 (a user logind would remove the segments of).
"""
from __future__ import annotations

import json
import shlex
import sys

import click

from .. import errors

from ..errors import EXIT_BUSY, EXIT_NOT_RUNNING, EXIT_REFUSED

CONFIG = click.option("--config", "-c", "config_path", required=True, metavar="FILE",
                      type=click.Path(dir_okay=False), help="the appliance's TOML configuration")


def _fail(e: errors.ApplianceError) -> "click.exceptions.Exit":
    click.echo(f"appliance: {e}", err=True)
    if isinstance(e, (errors.ConfigError, errors.BusyError)):
        return click.exceptions.Exit(errors.exit_status(e))   # 78, or a missing file's 66 ...
    if isinstance(e, errors.UnavailableError):
        return click.exceptions.Exit(EXIT_NOT_RUNNING)
    return click.exceptions.Exit(EXIT_REFUSED)


def _load(config_path: str):
    from ..config import load
    try:
        return load(config_path)
    except errors.ConfigError as e:
        raise _fail(e) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="appliance")
def main() -> None:
    """An in-memory database appliance with real-time block-level backup."""


LOG_FORMAT = click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto",
                          show_default=True, help="auto: $APPLIANCE_LOG_JSON if set, else JSON lines under "
                          "systemd or into a pipe and a readable console format on a terminal")
LOG_LEVEL = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error", "critical"]),
                         default=None, help="the lowest level logged (default: $APPLIANCE_LOG_LEVEL, else info)")


def _log_json(fmt: str) -> bool | None:
    return {"auto": None, "json": True, "console": False}[fmt]


@main.command()
@CONFIG
@LOG_FORMAT
@LOG_LEVEL
def controller(config_path: str, log_format: str, log_level: str | None) -> None:
    """Run the controller in the foreground (the sole writer; systemd runs it)."""
    from ..controller import run
    sys.exit(run(config_path, log_json=_log_json(log_format), log_level=log_level))


@main.command()
@CONFIG
@LOG_FORMAT
@LOG_LEVEL
def agent(config_path: str, log_format: str, log_level: str | None) -> None:
    """Run the replication agent in the foreground (systemd runs it)."""
    from ..replication import run
    sys.exit(run(config_path, log_json=_log_json(log_format), log_level=log_level))


@main.command()
@CONFIG
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for the comparison")
@click.option("--local", is_flag=True, help="only check every block against its checksum, without a peer")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def verify(config_path: str, timeout: float, local: bool, as_json: bool) -> None:
    """Check every block against its checksum, then (a primary) compare every secondary
    with it block by block; exit 0 when nothing is damaged and every secondary is identical."""
    from ..client.session import Session
    from ..wire import messages as m
    cfg = _load(config_path)
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-verify", timeout=timeout + 10)
    try:
        s.connect()
        checked = s.call([m.OP_CHECK], "verify")
        res = None
        if not local and s.hello.get("role", cfg.role) != "secondary":
            try:
                res = s.call([m.OP_VERIFY, timeout], "verify")
            except errors.ProtocolError:
                res = None      # not a primary (a standalone appliance): nothing to compare with
    except errors.ApplianceError as e:
        raise _fail(e) from None
    finally:
        s.close()
    clean = not checked["damaged"]
    ok = clean and (res is None or (bool(res) and all(r.get("ok") for r in res.values())))
    if as_json:
        click.echo(json.dumps({"identical": ok, "local": checked, "secondaries": res or {}}))
        raise click.exceptions.Exit(0 if ok else EXIT_REFUSED)
    if clean:
        click.echo(f"{cfg.name}: {checked['checked']} blocks match their checksums")
    else:
        bad = checked["damaged"]
        shown = ", ".join(f"{b['block']} ({b['file']}, device {_devices(b['devices'])})" for b in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        click.echo(f"{cfg.name}: {len(bad)} damaged block(s): {shown}{more}; `appliance repair` copies them "
                   "again from a peer")
    if res is not None:
        for name, r in sorted(res.items()):
            if r.get("ok"):
                click.echo(f"{name}: identical ({r['checked']} blocks at serial {r.get('serial')})")
            elif "differ" in r:
                shown = ", ".join(map(str, r["differ"][:50]))
                more = f" and {len(r['differ']) - 50} more" if len(r["differ"]) > 50 else ""
                click.echo(f"{name}: {len(r['differ'])} block(s) differ: {shown}{more}")
            else:
                click.echo(f"{name}: not compared: {r.get('error') or r.get('state')}")
    raise click.exceptions.Exit(0 if ok else EXIT_REFUSED)


@main.group()
def device() -> None:
    """The storage devices (segments) the data is spread over."""


@device.command("list")
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def device_list(config_path: str, as_json: bool) -> None:
    """Every device segment: state, blocks, bytes, checksum health."""
    from . import recovery, render
    cfg = _load(config_path)
    try:
        devs = recovery.devices(cfg)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(devs))
    else:
        render.devices(devs)
    raise click.exceptions.Exit(EXIT_REFUSED if any(d["damaged"] for d in devs) else 0)


@device.command("detach")
@CONFIG
@click.argument("device", type=int)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def device_detach(config_path: str, device: int, yes: bool, as_json: bool) -> None:
    """Take device segment DEVICE out of service (a failed device): its blocks are unavailable until replaced."""
    from . import recovery
    cfg = _load(config_path)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Take device {device} of {cfg.name!r} out of service? Reads and changes of the blocks on "
                      "it fail until `appliance device replace` refills them", abort=True)
    try:
        rep = recovery.detach(cfg, device)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
    else:
        click.echo(f"{cfg.name}: device {device} detached; {rep['blocks']} block(s) unavailable until "
                   f"`appliance device replace --config {config_path} {device}`")


@device.command("replace")
@CONFIG
@click.argument("device", type=int)
@click.option("--online", is_flag=True, help="keep processing while it refills (default: commits wait)")
@click.option("--timeout", default=120.0, show_default=True,
              help="seconds to wait for the peer, and for old snapshots to let go of the old device")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def device_replace(config_path: str, device: int, online: bool, timeout: float, yes: bool, as_json: bool) -> None:
    """A new segment for DEVICE, refilled with exactly its blocks from a peer (progress bar)."""
    from . import recovery, render
    cfg = _load(config_path)
    if not yes and sys.stdin.isatty():
        how = "while processing goes on" if online else "with commits waiting until it is refilled"
        click.confirm(f"Replace device {device} of {cfg.name!r} with a new segment refilled from a peer, {how}? "
                      "Its present content is discarded", abort=True)
    try:
        rep = render.replace_progress(lambda tick: recovery.replace(cfg, device, online=online, timeout=timeout,
                                                                    progress=tick), show=not as_json)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
    else:
        rate = f", {rep['rate_bytes_s'] / 1e6:.1f} MB/s" if rep.get("rate_bytes_s") else ""
        click.echo(f"{cfg.name}: device {device} replaced ({rep['mode']}): {rep['refilled']} of {rep['blocks']} "
                   f"block(s) refilled from {rep.get('source')} in {rep['refill_seconds']:.2f} s{rate}, "
                   f"{rep['moved']} moved onto the new segment; {rep['seconds']:.2f} s in all"
                   + (f"; NOT refilled: {rep['failed']}" if rep["failed"] else ""))
    raise click.exceptions.Exit(0 if not rep["failed"] and not rep.get("unrefilled") else EXIT_REFUSED)


def _devices(mask: int) -> str:
    return ",".join(str(i) for i in range(64) if mask >> i & 1) or "-"


@main.command()
@CONFIG
@click.option("--blocks", default=None, help="these block numbers (N,M,...)")
@click.option("--table", default=None, help="every block of this table and its alternate-key indexes")
@click.option("--device", type=int, default=None, help="every block with a part on this device segment")
@click.option("--dry-run", is_flag=True, help="say which blocks, change nothing")
@click.option("--timeout", default=30.0, show_default=True, help="seconds to wait for the peer")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def repair(config_path: str, blocks: str | None, table: str | None, device: int | None, dry_run: bool,
           timeout: float, yes: bool, as_json: bool) -> None:
    """Copy the damaged blocks (or those named) again from a peer, online."""
    from . import recovery
    cfg = _load(config_path)
    try:
        nums = [int(x) for x in blocks.split(",")] if blocks else None
    except ValueError:
        click.echo(f"appliance: --blocks {blocks!r}: expected block numbers separated by commas", err=True)
        raise click.exceptions.Exit(errors.EXIT_USAGE) from None
    if not dry_run and not yes and sys.stdin.isatty():
        click.confirm(f"Replace blocks of {cfg.name!r} with a peer's copy? Their content here is overwritten",
                      abort=True)
    try:
        rep = recovery.repair(cfg, blocks=nums, table=table, device=device, dry_run=dry_run, timeout=timeout)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
    elif rep["dry_run"]:
        click.echo(f"{cfg.name}: would copy {len(rep['blocks'])} block(s) again: "
                   f"{', '.join(map(str, rep['blocks'][:50])) or 'none'}")
    elif not rep["blocks"]:
        click.echo(f"{cfg.name}: nothing to repair (no damaged block)")
    else:
        click.echo(f"{cfg.name}: {len(rep['repaired'])} block(s) copied again from {rep.get('source')} in "
                   f"{rep['seconds']:.2f} s" + (f"; NOT repaired: {rep['failed']}" if rep["failed"] else ""))
    raise click.exceptions.Exit(0 if not rep.get("failed") else EXIT_REFUSED)


@main.command()
@CONFIG
@click.argument("secondary")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to wait for the copy")
def copy(config_path: str, secondary: str, timeout: float) -> None:
    """Copy every block to SECONDARY again while the primary keeps running (progress bar)."""
    from ..client.session import Session
    from ..wire import messages as m
    from . import render
    cfg = _load(config_path)
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-copy", timeout=30)
    try:
        s.connect()
        before = s.call([m.OP_STATUS], "status")["replication"]["secondaries"].get(secondary, {}).get("copies", 0)
        s.call([m.OP_RESYNC, secondary], "resync")
        st = render.copy_progress(lambda: s.call([m.OP_STATUS], "status")["replication"]["secondaries"][secondary],
                                  before, timeout)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    finally:
        s.close()
    click.echo(f"{secondary}: copy complete; {st['state']}, acked serial {st['acked_serial']}")


@main.command()
@CONFIG
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to wait for it to be written")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def checkpoint(config_path: str, timeout: float, as_json: bool) -> None:
    """Write a checkpoint of every block now (progress bar); older files it makes unnecessary go."""
    from . import durability
    cfg = _load(config_path)
    try:
        cp = durability.run(cfg, timeout, as_json)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(cp))
    else:
        click.echo(f"checkpoint {cp['file']}: version {cp['version']}, serial {cp['serial']}, {cp['blocks']} "
                   f"blocks, {cp['bytes'] / 1e6:.1f} MB in {cp['seconds']:.2f} s ({cp['rate_mb_s']} MB/s)"
                   + (f", {cp['yielded_bytes'] / 1e6:.1f} MB of it giving way to commits" if cp.get("yielded_bytes")
                      else ""))


@main.command()
@CONFIG
@click.option("--drain-timeout", default=5.0, show_default=True,
              help="seconds to let the link from the old primary bring what it still has")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def promote(config_path: str, drain_timeout: float, yes: bool, as_json: bool) -> None:
    """Failover: this secondary finishes what it received and becomes the primary (epoch + 1)."""
    from . import recovery
    cfg = _load(config_path)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Promote {cfg.name!r} to primary? Its old primary must be down or fenced: it is refused "
                      "from then on, and transactions it committed that did not reach this secondary are "
                      "undone when it rejoins", abort=True)
    try:
        rep = recovery.promote(cfg, drain_timeout=drain_timeout)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
        return
    was = f"the secondary of {rep['previous_primary']!r}" if rep["previous_primary"] else "a secondary"
    click.echo(f"{cfg.name} is now the primary at epoch {rep['epoch']} (it was {was}); it takes writes now")
    behind = rep.get("behind_serials")
    heard = f", {rep['heard_s_ago']:.1f} s before" if rep.get("heard_s_ago") is not None else ""
    click.echo(f"  applied every whole transaction it received, up to serial {rep['serial']}"
               + (f"; the old primary last reported serial {rep['heard_serial']}{heard}: up to {behind} "
                  "serials it had may be missing here" if behind else ""))
    if rep.get("dropped"):
        d = rep["dropped"]
        click.echo(f"  dropped a transaction received only in part: serials {d['first_serial']}..{d['last_serial']}"
                   f" ({d['bytes']} bytes)")
    if rep.get("cut"):
        click.echo("  WARNING: the old primary was still streaming when the drain ended: make sure it is "
                   "stopped or fenced")
    if not rep["agent_attached"]:
        click.echo("  its agent was not running: what it had received and not handed over is not here")
    if rep.get("expanded"):
        x = rep["expanded"]
        click.echo(f"  decompressed {x['blocks']} lz4 backup blocks into primary blocks "
                   f"({x['bytes'] / 1e6:.1f} MB in {x['seconds']:.2f} s)")
    secs = ", ".join(rep["secondaries"]) or "none configured"
    click.echo(f"  its agent streams to: {secs}; took {rep['seconds']:.2f} s")


@main.command()
@CONFIG
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="wait until it follows the new primary (rewound, copied, streaming)")
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for that")
@click.option("--agent-wait", default=30.0, show_default=True,
              help="seconds the wait goes on with no replication agent attached before it fails")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def rejoin(config_path: str, wait: bool, timeout: float, agent_wait: float, yes: bool, as_json: bool) -> None:
    """A former primary becomes a secondary of the new primary (what it committed past the fork is undone)."""
    from . import recovery, render
    cfg = _load(config_path)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Make {cfg.name!r} a secondary of {' or '.join(cfg.replication.primaries) if cfg.replication else '?'}? "
                      "It takes no writes from now on, and transactions it committed that the new primary "
                      "never received are undone", abort=True)
    try:
        with render.phase_progress("rejoining", not as_json) as show:
            rep = recovery.rejoin(cfg, wait=wait, timeout=timeout, agent_wait=agent_wait,
                                  progress=lambda st: show(*recovery.rejoin_progress(st)))
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep, default=str))
        return
    click.echo(f"{cfg.name} is a secondary now, following {' or '.join(rep['follows'])} "
               f"(it listens at {rep['listen']}); its last serial as a primary was {rep['serial']}")
    rw = rep.get("rewound")
    if rw:
        click.echo(f"  undid {rw['transactions']} transaction(s) the new primary never received (serials "
                   f"{rw['from_serial']}..{rw['to_serial']}) and copied {rw['blocks_to_copy']} block(s)")
    elif wait:
        click.echo("  nothing to undo: it held nothing the new primary lacks")
    if wait:
        click.echo(f"  streaming; applied serial {rep['replication']['applied_serial']}")


@main.command()
@CONFIG
@click.option("--epoch", type=int, required=True, help="the newer epoch another appliance is primary at")
@click.option("--primary", default=None, help="the name of that primary, when known")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def fence(config_path: str, epoch: int, primary: str | None, yes: bool, as_json: bool) -> None:
    """Tell a primary that another appliance is primary at a newer epoch: it takes no writes from then on."""
    from . import recovery
    cfg = _load(config_path)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Fence {cfg.name!r}? It refuses every write until it rejoins as a secondary", abort=True)
    try:
        rep = recovery.fence(cfg, epoch, primary)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
        return
    by = f" ({rep['by']} is primary)" if rep.get("by") else ""
    click.echo(f"{cfg.name} is fenced at epoch {rep['epoch']}{by}: it refuses writes, reads still work")


@main.command()
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def reload(config_path: str, as_json: bool) -> None:
    """The controller reads its config again and takes what it can change running; returns once it has
    (exit 78 and nothing changed when the file is refused)."""
    from .reload import reload as reload_config
    cfg = _load(config_path)
    try:
        rep = reload_config(cfg)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
        return
    taken = ", ".join(rep["applied"]) or "no change it can take running"
    click.echo(f"{cfg.name}: reloaded {rep['file']}: {taken}")
    if rep["needs_restart"]:
        click.echo(f"{cfg.name}: needs a restart to take: {', '.join(rep['needs_restart'])}")


@main.command()
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path: str, as_json: bool) -> None:
    """Segments, blocks, tables, transactions; exits 3 when not running."""
    from ..client.session import Session
    from ..wire import messages as m
    from . import render
    cfg = _load(config_path)
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-status", timeout=10.0)
    try:
        s.connect()
        st = s.call([m.OP_STATUS], "status")
    except errors.UnavailableError as e:
        if as_json:
            click.echo(json.dumps({"name": cfg.name, "running": False, "error": str(e)}))
            raise click.exceptions.Exit(EXIT_NOT_RUNNING)
        raise _fail(e) from None
    except errors.ApplianceError as e:
        raise _fail(e) from None
    finally:
        s.close()
    st["running"] = True
    if as_json:
        click.echo(json.dumps(st, default=str))
    else:
        render.status(st)


@main.command()
@CONFIG
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="seconds between samples")
@click.option("--once", is_flag=True, help="print one frame (rates over one interval) and exit")
@click.option("--json", "as_json", is_flag=True, help="print one frame's figures as JSON and exit")
def top(config_path: str, interval: float, once: bool, as_json: bool) -> None:
    """A live view: throughput and lag sparklines, health, devices, snapshots (q quits)."""
    from . import top as top_mod
    sys.exit(top_mod.run(_load(config_path), interval=interval, once=once, as_json=as_json))


@main.command()
@CONFIG
@click.argument("table")
@click.argument("source", type=click.File("rb"))
@click.option("--batch", default=5000, show_default=True,
              help="records per transaction (at most controller.max_load_records)")
@click.option("--skip-existing", is_flag=True,
              help="leave out records whose primary key is in the table already (resume a load)")
def load(config_path: str, table: str, source, batch: int, skip_existing: bool) -> None:
    """Bulk-load TABLE from SOURCE, a JSON-lines file ('-' for stdin)."""
    from . import render
    cfg = _load(config_path)
    try:
        import appliance
        db = appliance.connect(cfg, wait=0)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    try:
        n = render.load_with_progress(db, table, source, batch, skip_existing)
    except errors.UnavailableError as e:
        if "committed" in e.details:
            src = shlex.quote(source.name) if source.name != "<stdin>" else "- < (the same input)"
            again = f"appliance load --config {shlex.quote(config_path)} --skip-existing {table} {src}"
            e = errors.UnavailableError(f"{e.message}. Once the appliance is running again, resume with: "
                                        f"{again}", code=e.code, **e.details)
        raise _fail(e) from None
    except errors.ApplianceError as e:
        raise _fail(e) from None
    finally:
        db.close()
    click.echo(f"loaded {n} records into {table}")


@main.command()
@CONFIG
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def destroy(config_path: str, yes: bool) -> None:
    """Delete the appliance's shared-memory segments (all its data in memory; durability files stay)."""
    from ..controller import ControllerLock
    from ..store.segment import unlink_all
    cfg = _load(config_path)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Delete every segment (all data) of appliance {cfg.name!r}?", abort=True)
    try:
        lock = ControllerLock(cfg)
    except errors.BusyError as e:
        click.echo(f"appliance: {e}; stop it first", err=True)
        raise click.exceptions.Exit(EXIT_BUSY) from None
    try:
        removed = [n for n in unlink_all(cfg.name, cfg.storage.segments) if not n.endswith(".lock")]
    finally:
        lock.release()
    click.echo(f"removed {len(removed)} segment(s) of {cfg.name}")
    if cfg.durability_dir is not None and cfg.durability_dir.is_dir() and any(cfg.durability_dir.iterdir()):
        click.echo(f"note: {cfg.durability_dir} (durability.dir) still holds its log files and checkpoints: the "
                   "next start loads them (cold start); move or delete that directory to start empty")


@main.command()
@click.option("--instance", "-i", required=True, help="the instance name (its config: /etc/appliance/NAME.toml)")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="the instance's config to install (default: the bank example, named after the instance)")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="install under this directory instead of the running system (staging)")
@click.option("--force", is_flag=True, help="replace an existing config that differs")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def install(instance: str, config_path: str | None, root: str, force: bool, yes: bool, as_json: bool) -> None:
    """Put an instance in place for systemd: units, system user, config, directories."""
    from .install import install as do_install
    if force and not yes and sys.stdin.isatty():
        click.confirm(f"Replace the existing config of instance {instance!r} if it differs?", abort=True)
    try:
        rep = do_install(instance, config_path, root=root, force=force)
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(rep))
        return
    for p in rep["written"]:
        click.echo(f"wrote     {p}")
    for p in rep["unchanged"]:
        click.echo(f"unchanged {p}")
    for c in rep["ran"]:
        click.echo(f"ran       {c}")
    for n in rep["notes"]:
        click.echo(f"note: {n}")
    click.echo(f"start it: systemctl start appliance@{instance}.target")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def files(as_json: bool) -> None:
    """Where the shipped example configs and systemd units are."""
    from .._os.files import shipped_files
    try:
        found = shipped_files()
    except errors.ApplianceError as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps({k: [str(p) for p in v] for k, v in found.items()}))
        return
    for kind, paths in found.items():
        click.echo(f"{kind}: {paths[0].parent if paths else '-'}")
        for p in paths:
            click.echo(f"  {p.name}")


@main.command()
@click.option("--accounts", default=1000, show_default=True, help="sample accounts to load")
@click.option("--keep", is_flag=True, help="leave the demo appliance running (Ctrl-C stops it)")
def demo(accounts: int, keep: bool) -> None:
    """Run a demo appliance with sample data and on-line transfers."""
    from .demo import run_demo
    sys.exit(run_demo(accounts=accounts, keep=keep))


from .history import COMMANDS as _HISTORY   # noqa: E402  (history, restore, cancel, rerun, batch)

for _cmd in _HISTORY:
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
