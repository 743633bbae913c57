"""The ``appliance`` command: starts the processes and serves operators.

Exit status (appliance.errors.EXIT_*): 0 success; 1 a refused operation
(typed error, message on stderr); 2 usage; 3 the appliance is not running;
69 the appliance is busy (another controller serves it); 78 bad
configuration (EX_CONFIG).
"""
from __future__ import annotations

import json
import shlex
import sys

import click

from .. import errors

from ..errors import EXIT_BUSY, EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_REFUSED

CONFIG = click.option("--config", "-c", "config_path", required=True, metavar="FILE",
                      type=click.Path(dir_okay=False), help="the appliance's TOML configuration")


def _fail(e: errors.ApplianceError) -> "click.exceptions.Exit":
    click.echo(f"appliance: {e}", err=True)
    if isinstance(e, errors.ConfigError):
        return click.exceptions.Exit(EXIT_CONFIG)
    if isinstance(e, errors.BusyError):
        return click.exceptions.Exit(EXIT_BUSY)
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
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def verify(config_path: str, timeout: float, as_json: bool) -> None:
    """Compare every secondary with the primary block by block; exit 0 when identical."""
    from ..client.session import Session
    from ..wire import messages as m
    cfg = _load(config_path)
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-verify", timeout=timeout + 10)
    try:
        s.connect()
        res = s.call([m.OP_VERIFY, timeout], "verify")
    except errors.ApplianceError as e:
        raise _fail(e) from None
    finally:
        s.close()
    ok = bool(res) and all(r.get("ok") for r in res.values())
    if as_json:
        click.echo(json.dumps({"identical": ok, "secondaries": res}))
    else:
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
    """Delete the appliance's shared-memory segments (all its data)."""
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


from .recovery import COMMANDS as _RECOVERY   # noqa: E402  (history, restore, cancel, rerun, batch)

for _cmd in _RECOVERY:
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
