"""Tests for appliance._os: logging setup, systemd notification, signal lifecycle."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import structlog
from structlog.testing import capture_logs

from appliance._os import logs, sdnotify

from procs import RUN_DIR
_SCRUBBED = ("APPLIANCE_LOG_", "NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_")


def run_python(code: str, **env: str) -> str:
    """Run *code* in a fresh interpreter (stdout a pipe), return its stdout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        cwd=RUN_DIR,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def log_lines(configure_args: str = "", **env: str) -> list[str]:
    """Configure logging in a subprocess, emit debug/info events, return stdout lines."""
    out = run_python(
        f"""
        from appliance._os import logs
        logs.configure({configure_args})
        log = logs.get_logger(instance="main")
        log.debug("debug_seen")
        log.info("controller_started", pid=1)
        """,
        **env,
    )
    return out.splitlines()


@pytest.fixture
def configured():
    """configure(json=True) in this process, undone afterwards."""
    logs.configure(json=True)
    yield
    structlog.reset_defaults()


class TestLogs:
    def test_json_one_object_per_line(self):
        """configure(json=True) writes one JSON object per event with event, level and a UTC timestamp."""
        (line,) = log_lines("json=True")
        record = json.loads(line)
        assert record["event"] == "controller_started"
        assert record["level"] == "info"
        assert record["timestamp"].endswith("Z")
        assert record["instance"] == "main"
        assert record["pid"] == 1

    def test_json_when_not_a_tty(self):
        """json=None picks JSON when stdout is a pipe."""
        (line,) = log_lines()
        assert json.loads(line)["event"] == "controller_started"

    def test_env_sets_level_and_renderer_when_the_arguments_do_not(self):
        """APPLIANCE_LOG_LEVEL and APPLIANCE_LOG_JSON=0 apply when configure() is not given them."""
        lines = log_lines("", APPLIANCE_LOG_LEVEL="debug", APPLIANCE_LOG_JSON="0")
        assert len(lines) == 2
        assert "debug_seen" in lines[0] and "controller_started" in lines[1]
        assert not lines[1].startswith("{")
        assert "\x1b[" not in lines[1]  # no colors into a pipe

    def test_arguments_win_over_the_environment(self):
        """--log-format / --log-level (configure's arguments) win over APPLIANCE_LOG_*."""
        lines = log_lines("json=True, level='info'", APPLIANCE_LOG_LEVEL="debug", APPLIANCE_LOG_JSON="0")
        assert len(lines) == 1 and json.loads(lines[0])["event"] == "controller_started"

    def test_exception_rendered_in_json(self):
        """log.exception() in JSON mode carries the formatted traceback."""
        out = run_python(
            """
            from appliance._os import logs
            logs.configure(json=True)
            try:
                1 / 0
            except ZeroDivisionError:
                logs.get_logger().exception("apply_failed")
            """
        )
        record = json.loads(out)
        assert record["level"] == "error"
        assert "ZeroDivisionError" in record["exception"]

    def test_import_has_no_side_effects(self):
        """Importing appliance._os.logs leaves structlog unconfigured."""
        out = run_python(
            """
            import structlog
            import appliance._os.logs
            print(structlog.is_configured())
            """
        )
        assert out.strip() == "False"

    def test_unknown_level_rejected(self):
        """An unknown level raises ValueError before anything is configured."""
        before = structlog.get_config()
        with pytest.raises(ValueError, match="verbose"):
            logs.configure(level="verbose")
        assert structlog.get_config() == before

    def test_capture_logs_after_configure(self, configured):
        """capture_logs() sees events from a logger obtained before configure() via get_logger()."""
        early = logs.get_logger(peer="b")
        with capture_logs() as captured:
            early.info("peer_connected")
            early.info("peer_connected")  # second call goes through the cached logger
        assert captured == [{"event": "peer_connected", "peer": "b", "log_level": "info"}] * 2

    def test_log_once_suppresses_repeats(self):
        """LogOnce logs a code once, again when it changes (with the suppressed count) and after clear()."""
        once = logs.LogOnce(logs.get_logger(peer="b"))
        with capture_logs() as captured:
            assert once.error("peer_connect_failed", 111)
            assert not once.error("peer_connect_failed", 111)
            assert not once.error("peer_connect_failed", 111)
            assert once.error("peer_connect_failed", 113, retry_in=1.0)
            once.clear()
            assert once.error("peer_connect_failed", 113)
        assert [(e["code"], e.get("suppressed")) for e in captured] == [(111, None), (113, 2), (113, None)]
        assert all(e["log_level"] == "error" and e["peer"] == "b" for e in captured)
        assert captured[1]["retry_in"] == 1.0


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound AF_UNIX datagram socket named by $NOTIFY_SOCKET."""
    path = tmp_path / "n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


class TestSdNotify:
    def test_ready_with_status(self, notify_socket):
        """ready(status=...) sends READY=1 and STATUS= in one datagram."""
        assert sdnotify.ready(status="x")
        assert received(notify_socket) == "READY=1\nSTATUS=x"

    def test_messages(self, notify_socket):
        """status() flattens newlines; stopping() and watchdog() send their single assignment."""
        assert sdnotify.status("seeding\npeer b")
        assert sdnotify.stopping()
        assert sdnotify.watchdog()
        assert [received(notify_socket) for _ in range(3)] == ["STATUS=seeding peer b", "STOPPING=1", "WATCHDOG=1"]

    def test_reloading_sends_monotonic_usec(self, notify_socket):
        """reloading() sends RELOADING=1 with MONOTONIC_USEC of now."""
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert sdnotify.reloading()
        first, second = received(notify_socket).split("\n")
        assert first == "RELOADING=1"
        key, _, usec = second.partition("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    def test_abstract_socket(self, monkeypatch):
        """A NOTIFY_SOCKET starting with '@' names an abstract-namespace socket."""
        name = f"appliance-test-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(2)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            assert sdnotify.ready()
            assert received(sock) == "READY=1"

    def test_unset_returns_false(self, monkeypatch):
        """Without NOTIFY_SOCKET every call is a no-op returning False."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert sdnotify.ready() is False
        assert sdnotify.notify("READY=1") is False

    def test_send_failure_returns_false(self, tmp_path, monkeypatch):
        """A socket nobody listens on yields False, not an exception."""
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
        assert sdnotify.stopping() is False

    def test_watchdog_interval(self, monkeypatch):
        """watchdog_interval() reads WATCHDOG_USEC, only for the process WATCHDOG_PID names."""
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert sdnotify.watchdog_interval() is None
        monkeypatch.setenv("WATCHDOG_USEC", "2500000")
        assert sdnotify.watchdog_interval() == 2.5
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert sdnotify.watchdog_interval() == 2.5
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert sdnotify.watchdog_interval() is None


class TestNotifier:
    def test_status_only_when_it_changes_and_pings_when_due(self, notify_socket, monkeypatch):
        """Notifier: STATUS= once per new text; WATCHDOG=1 when a third of the interval passed, not before."""
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        n = sdnotify.Notifier()
        assert n.period == 1.0 and n.wait_s(100.0) == 0.0
        n.ready("a")
        n.status("a")
        n.status("b")
        n.ping(100.0)
        n.ping(100.5)     # not due yet
        assert n.wait_s(100.5) == 0.5
        n.ping(101.0)
        got = [received(notify_socket) for _ in range(4)]
        assert got == ["READY=1\nSTATUS=a", "STATUS=b", "WATCHDOG=1", "WATCHDOG=1"]
        notify_socket.settimeout(0.05)
        with pytest.raises(TimeoutError):
            received(notify_socket)

    def test_without_a_watchdog_nothing_is_pinged(self, notify_socket, monkeypatch):
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        n = sdnotify.Notifier()
        assert n.period is None and n.wait_s(0.0) == float("inf")
        n.ping(0.0)
        n.status("x")
        assert received(notify_socket) == "STATUS=x"

    def test_a_controller_pings_from_its_loop(self, notify_socket, make_appliance):
        """A real controller under $NOTIFY_SOCKET and WATCHDOG_USEC: READY=1 with its STATUS line, then
        WATCHDOG=1 again and again while its loop turns."""
        app = make_appliance()
        os.environ["WATCHDOG_USEC"] = "300000"
        try:
            app.start()
        finally:
            del os.environ["WATCHDOG_USEC"]
        notify_socket.settimeout(10)
        first = received(notify_socket)
        assert first.startswith(f"READY=1\nSTATUS=serving {app.name} as standalone at version ")
        pings = [received(notify_socket) for _ in range(5)]
        assert set(pings) == {"WATCHDOG=1"}


def run_shutdown(body: str) -> dict:
    """Install a Shutdown registered in epoll in a subprocess, run *body*, return its printed JSON."""
    prelude = """
        import json, os, select, signal, threading, time
        from appliance._os.lifecycle import Shutdown
        shutdown = Shutdown()
        shutdown.install()
        ep = select.epoll()
        ep.register(shutdown.fileno(), select.EPOLLIN)
        assert ep.poll(0) == []
    """
    return json.loads(run_python(textwrap.dedent(prelude) + textwrap.dedent(body)))


class TestShutdown:
    def test_sigterm_sets_flag_and_wakes_fd(self):
        """SIGTERM sets requested/signal and makes the wakeup fd readable until drained."""
        result = run_shutdown(
            """
            os.kill(os.getpid(), signal.SIGTERM)
            ready = ep.poll(5)
            drained = shutdown.drain()
            print(json.dumps({
                "ready": len(ready), "requested": shutdown.requested, "signal": shutdown.signal.name,
                "reload": shutdown.reload_requested, "drained": [s.name for s in drained],
                "after_drain": len(ep.poll(0)),
            }))
            """
        )
        assert result == {
            "ready": 1, "requested": True, "signal": "SIGTERM", "reload": False,
            "drained": ["SIGTERM"], "after_drain": 0,
        }

    def test_signal_wakes_blocked_poll(self):
        """A signal arriving while epoll.poll() blocks makes it return at once (no PEP 475 retry stall):
        with the signal, not at its timeout, the wakeup fd readable."""
        result = run_shutdown(
            """
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            ready = ep.poll(8)          # a stalled retry returns [] at the timeout instead
            print(json.dumps({"ready": [fd for fd, _ in ready], "fd": shutdown.fileno(),
                              "signal": shutdown.signal.name}))
            """
        )
        assert result["signal"] == "SIGINT"
        assert result["ready"] == [result["fd"]], result

    def test_sighup_requests_reload_and_uninstall_restores(self):
        """SIGHUP sets reload_requested (take_reload() resets it); uninstall() restores the old handlers."""
        result = run_shutdown(
            """
            os.kill(os.getpid(), signal.SIGHUP)
            ep.poll(5)
            drained = [s.name for s in shutdown.drain()]
            taken = [shutdown.take_reload(), shutdown.take_reload()]
            requested = shutdown.requested
            shutdown.uninstall()
            print(json.dumps({
                "drained": drained, "taken": taken, "requested": requested,
                "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "wakeup_fd": signal.set_wakeup_fd(-1),
            }))
            """
        )
        assert result == {
            "drained": ["SIGHUP"], "taken": [True, False], "requested": False,
            "sigterm_default": True, "wakeup_fd": -1,
        }


class TestLogOptions:
    """`appliance controller|agent --log-format/--log-level`: chosen by the operator, over the environment."""

    def _start(self, tmp_path, *flags: str, **env: str) -> str:
        from procs import APPLIANCE
        bad = tmp_path / "bad.toml"
        bad.write_text('name = "x"\n[storage]\nsegments = 0\n[tables.t]\nprimary_key = "id"\nfields = {id = "int"}\n')
        clean = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        r = subprocess.run([*APPLIANCE, "controller", "--config", str(bad), *flags], capture_output=True, text=True,
                           cwd=RUN_DIR, env={**clean, **env}, timeout=30)
        assert r.returncode == 78, r.stderr
        return r.stdout

    def test_console_format_into_a_pipe(self, tmp_path):
        """--log-format console: the readable format even where JSON is the default (a pipe)."""
        out = self._start(tmp_path, "--log-format", "console")
        line = next(ln for ln in out.splitlines() if "config_invalid" in ln)
        assert not line.startswith("{") and "storage.segments" in line

    def test_json_format_wins_over_the_environment(self, tmp_path):
        out = self._start(tmp_path, "--log-format", "json", APPLIANCE_LOG_JSON="0")
        ev = json.loads(next(ln for ln in out.splitlines() if "config_invalid" in ln))
        assert ev["event"] == "config_invalid" and ev["key"] == "storage.segments"

    def test_log_level_filters(self, tmp_path):
        """--log-level critical leaves out the error a refused config logs."""
        assert "config_invalid" not in self._start(tmp_path, "--log-level", "critical", "--log-format", "json")
