"""Signal handling for a single-threaded event-loop process.

Who calls what
==============
A process ``__main__`` (controller, replication agent) owns one
:class:`Shutdown`:

1. ``shutdown = Shutdown(); shutdown.install()`` in the main thread, before
   the event loop starts and before ``sdnotify.ready()``.
2. ``epoll.register(shutdown.fileno(), select.EPOLLIN)``.
3. When that fd is ready: ``shutdown.drain()``, then look at the flags:
   ``shutdown.requested`` (SIGTERM/SIGINT; which one is in
   ``shutdown.signal``) → ``sdnotify.stopping()`` and the graceful shutdown;
   ``shutdown.take_reload()`` (SIGHUP) → ``sdnotify.reloading()``, reload the
   config, ``sdnotify.ready()``.
4. ``shutdown.uninstall()`` (or leave the ``with`` block) on the way out.

Nothing else touches signals. Signal handlers only set flags; all the work
happens in the loop, where it is safe.

The replication agent runs an asyncio loop instead: it registers the same
signals with ``loop.add_signal_handler`` (SIGTERM/SIGINT stop, SIGHUP
reload), and stops its tasks with :func:`cancel_and_wait`, so a task that
fails while it is being stopped (its link closed under it) is never left for
the loop's shutdown to report as an unhandled exception.

Why the wakeup fd
=================
A Python-level signal handler runs only between bytecodes in the main
thread. When a signal arrives during ``epoll.poll()``, the call fails with
EINTR, Python runs the handler and then (PEP 475) *retries* the poll with the
remaining timeout, so the loop would not look at the flags until some
unrelated event arrived. ``signal.set_wakeup_fd`` makes the C-level handler
also write the signal number (one byte) to a non-blocking socket whose read
end is registered in epoll, so the retried poll returns at once. The Python
handler has run by then, so the flags are set when the loop checks them after
:meth:`Shutdown.drain`.

A second SIGTERM just sets the flag again; systemd's ``TimeoutStopSec=`` then
``KillMode=mixed`` SIGKILL is the escalation path.
"""
from __future__ import annotations

import signal
import socket
from types import FrameType, TracebackType

__all__ = ["Shutdown", "cancel_and_wait"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RELOAD_SIGNAL = signal.SIGHUP


class Shutdown:
    """Stop/reload flags set by signals, plus a wakeup fd for epoll."""

    def __init__(self) -> None:
        #: True once SIGTERM or SIGINT arrived; never reset.
        self.requested = False
        #: The signal that set :attr:`requested` (the latest one).
        self.signal: signal.Signals | None = None
        #: True once SIGHUP arrived; reset by :meth:`take_reload`.
        self.reload_requested = False
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._old_handlers: dict[signal.Signals, object] = {}
        self._old_wakeup_fd = -1

    def install(self) -> None:
        """Set the SIGTERM/SIGINT/SIGHUP handlers and the wakeup fd.

        Main thread only (``signal.signal`` raises ValueError elsewhere);
        RuntimeError if already installed.
        """
        if self._reader is not None:
            raise RuntimeError("Shutdown.install() called twice")
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        try:
            # Raises ValueError outside the main thread, before anything changed.
            self._old_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except BaseException:
            reader.close()
            writer.close()
            raise
        self._reader, self._writer = reader, writer
        try:
            for sig in _STOP_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, self._on_stop)
            self._old_handlers[_RELOAD_SIGNAL] = signal.signal(_RELOAD_SIGNAL, self._on_reload)
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        """Restore the previous handlers and wakeup fd; close the socketpair."""
        if self._reader is None:
            return
        self._restore()
        self._reader.close()
        self._writer.close()  # type: ignore[union-attr]
        self._reader = self._writer = None

    def _restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        signal.set_wakeup_fd(self._old_wakeup_fd)
        self._old_wakeup_fd = -1

    def fileno(self) -> int:
        """The read end to register in epoll (EPOLLIN); readable after a signal."""
        if self._reader is None:
            raise RuntimeError("Shutdown is not installed")
        return self._reader.fileno()

    def drain(self) -> list[signal.Signals]:
        """Empty the wakeup fd; return the signals it recorded, oldest first."""
        if self._reader is None:
            return []
        received: list[signal.Signals] = []
        while True:
            try:
                data = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            for num in data:
                try:
                    received.append(signal.Signals(num))
                except ValueError:
                    pass
        return received

    def take_reload(self) -> bool:
        """Return :attr:`reload_requested` and reset it (one reload per SIGHUP burst)."""
        wanted, self.reload_requested = self.reload_requested, False
        return wanted

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal = signal.Signals(signum)

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def __enter__(self) -> Shutdown:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


async def cancel_and_wait(tasks) -> None:
    """Cancel asyncio tasks and wait until each has finished; their outcome
    (a result, an exception, the cancellation) is retrieved and dropped."""
    import asyncio   # here: the controller imports this module and runs no asyncio

    tasks = [t for t in tasks if t is not None]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
