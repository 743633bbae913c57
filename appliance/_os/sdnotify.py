"""systemd notifications over ``$NOTIFY_SOCKET``, without libsystemd.

Same protocol as systemd's man/notify-selfcontained-example.py: one
``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated ``KEY=value``
assignments, sent to the path in ``$NOTIFY_SOCKET`` (a leading ``@`` names an
abstract-namespace socket, spelled with a leading NUL byte on the wire).

Who calls what (units are ``Type=notify``, see systemd/):

- the controller sends :func:`ready` only once its segments exist and its
  socket listens; the agent once its relays/listener run (never waiting on a
  peer, so a dead peer cannot block boot);
- long phases (seeding, restore) report progress with :func:`status`;
- on SIGHUP: :func:`reloading`, reload, then :func:`ready` again;
- on SIGTERM: :func:`stopping`, then shut down;
- with ``WatchdogSec=`` set: :func:`watchdog` from the process's own loop
  turn (:class:`Notifier`, every third of ``watchdog_interval()``), so a loop
  that stops turning stops the pings.

Outside systemd ``$NOTIFY_SOCKET`` is unset and every call is a cheap no-op
returning False. Sending never raises and never logs: a lost notification
must not take a process down, and systemd reports a missing READY itself.
"""
from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "ready", "status", "stopping", "reloading", "watchdog", "watchdog_interval", "Notifier"]


def notify(state: str) -> bool:
    """Send *state* (``"KEY=value\\n..."``) to ``$NOTIFY_SOCKET``; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":  # unset, or vsock:/other: not supported
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except (OSError, UnicodeError):
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment.
    return text.replace("\n", " ")


def ready(status: str | None = None) -> bool:
    """``READY=1``, optionally with ``STATUS=``: startup or reload finished."""
    if status is None:
        return notify("READY=1")
    return notify(f"READY=1\nSTATUS={_one_line(status)}")


def status(text: str) -> bool:
    """``STATUS=<text>``: one line shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    """``STOPPING=1``: graceful shutdown began."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC now), as systemd
    requires; send :func:`ready` when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog() -> bool:
    """``WATCHDOG=1``: the keep-alive ping for ``WatchdogSec=``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None.

    None when the watchdog is off, the value is malformed, or
    ``$WATCHDOG_PID`` names another process (the variables were inherited).
    Ping at half this interval.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ["WATCHDOG_USEC"])
    except (KeyError, ValueError):
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    """What a serving process keeps telling systemd: ``STATUS=`` when its text
    changes, ``WATCHDOG=1`` when due.

    The pings are sent from the caller's own loop turn (:meth:`ping`, every
    turn; it sends at most every third of ``WatchdogSec=``), never from a
    thread or timer of their own: a loop that stops turning stops the pings,
    and systemd restarts the process. :meth:`wait_s` bounds the loop's poll
    so an idle loop still pings in time.
    """

    __slots__ = ("period", "_next", "_status")

    def __init__(self) -> None:
        interval = watchdog_interval()
        #: seconds between pings; None when the watchdog is off
        self.period = interval / 3 if interval else None
        self._next = 0.0
        self._status: str | None = None

    def ready(self, text: str) -> None:
        self._status = text
        ready(status=text)

    def status(self, text: str) -> None:
        """``STATUS=<text>`` unless that is what systemd shows already."""
        if text != self._status:
            self._status = text
            status(text)

    def ping(self, now: float) -> None:
        """``WATCHDOG=1`` if a third of the watchdog interval passed since the last one."""
        if self.period is not None and now >= self._next:
            self._next = now + self.period
            watchdog()

    def wait_s(self, now: float) -> float:
        """Seconds the loop may sleep before the next ping is due (inf: no watchdog)."""
        return float("inf") if self.period is None else max(0.0, self._next - now)
