"""structlog setup, done once per process from its ``__main__``.

Who calls what
==============
Each process entry point (controller, replication agent, CLI) calls
:func:`configure` exactly once, before it logs anything. Importing this module
has no side effects; library code (``store/``, ``wire/``, ``client/``) never
calls :func:`configure`, so an application embedding the client keeps its own
structlog setup.

The shape follows structlog's docs/performance.md and
docs/logging-best-practices.md:

- a filtering bound logger (``make_filtering_bound_logger``): calls below the
  level are a bare ``return None``, and the level is fixed at configure time;
- ``cache_logger_on_first_use=True``;
- processors: ``merge_contextvars``, ``add_log_level``,
  ``TimeStamper(fmt="iso", utc=True)``, ``StackInfoRenderer``, then either
  ``format_exc_info`` + ``JSONRenderer`` or ``ConsoleRenderer``;
- one line per event on stdout, flushed per event (``PrintLogger`` prints with
  ``flush=True``), and nothing else: systemd's journal stores, rotates and
  timestamps it.

Renderer choice: the ``json`` argument (``--log-format json|console``); when
it is None, ``APPLIANCE_LOG_JSON=1``/``0``; without either, JSON when stdout
is not a TTY or when running under systemd (``$JOURNAL_STREAM`` or
``$INVOCATION_ID`` set), the console renderer on a TTY. The level likewise:
the ``level`` argument (``--log-level``), else ``APPLIANCE_LOG_LEVEL``, else
info.

Event names are snake_case facts (``controller_started``, ``peer_connected``);
context is bound, not formatted: ``log.bind(instance=..., peer=...)``.

Loggers and caching (read this before writing ``log = ...`` at module level)
==========================================================================
With ``cache_logger_on_first_use`` a logger builds its processor chain on its
first call and keeps it. So:

- obtain loggers through :func:`get_logger` (a lazy ``structlog.get_logger()``
  proxy). A module-level ``log = get_logger()`` is fine, because the proxy
  binds nothing until it is first used, which is after ``configure()``. Never
  store the result of ``structlog.wrap_logger(...)``/``.bind()`` at import
  time: that would freeze the unconfigured defaults.
- ``structlog.testing.capture_logs()`` still works after :func:`configure`: it
  swaps the entries of the configured processor list *in place*, and cached
  loggers hold that same list object. What it cannot undo is a *second*
  :func:`configure`, which installs a new list: loggers cached before it keep
  the old one. Tests that call :func:`configure` therefore call
  ``structlog.reset_defaults()`` afterwards (see tests/test_os.py).
- Because the level is baked into the logger class, ``capture_logs()`` after
  ``configure(level="info")`` does not see ``debug`` events.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog

__all__ = ["configure", "get_logger", "LogOnce", "LogEvery"]

_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty(), or a closed stream
        return False


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def _env_json(given: bool | None) -> bool | None:
    raw = os.environ.get("APPLIANCE_LOG_JSON")
    if given is not None or raw is None or raw == "":
        return given
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise ValueError(f"APPLIANCE_LOG_JSON={raw!r}: expected 1 or 0")


def _level_number(level: str | None) -> int:
    name = level or os.environ.get("APPLIANCE_LOG_LEVEL") or "info"
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"log level {name!r}: expected one of {', '.join(_LEVELS)}") from None


def configure(*, json: bool | None = None, level: str | None = None) -> None:
    """Configure structlog for this process; call once, from ``__main__``.

    *json*: ``True`` JSON lines, ``False`` console renderer, ``None`` decide
    from the environment (see the module docstring). *level*: the lowest level
    logged (``debug``, ``info``, ``warning``, ``error``, ``critical``); None:
    ``$APPLIANCE_LOG_LEVEL``, else info. Given arguments win over the environment.
    Raises ``ValueError`` for an unknown level or ``APPLIANCE_LOG_JSON`` value.
    """
    stream = sys.stdout
    min_level = _level_number(level)
    json = _env_json(json)
    if json is None:
        json = _under_systemd() or not _isatty(stream)

    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # Colors only on a terminal: APPLIANCE_LOG_JSON=0 into a pipe stays plain.
        processors.append(structlog.dev.ConsoleRenderer(colors=_isatty(stream)))

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        context_class=dict,
        # PrintLogger prints with flush=True: one flushed line per event, even
        # when stdout is a block-buffered pipe or the journal's stream socket.
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    """A lazy logger with *bound* context; safe to call at import time."""
    return structlog.get_logger(**bound)


class LogOnce:
    """Log a repeated failure once, until its code changes (Tarantool's
    ``applier_log_error``/``last_logged_errcode``).

    A retry loop calls :meth:`error` on every failure and :meth:`clear` on
    success::

        once = LogOnce(log.bind(peer=peer))
        while True:
            try:
                link.connect()
            except OSError as e:
                once.error("peer_connect_failed", e.errno, retry_in=1.0)
                continue
            once.clear()

    The first failure with a given code is logged at error level with
    ``code=<code>``; identical repeats are counted, not logged. When the code
    changes, the new event carries ``suppressed=<n>``, the number of repeats
    of the previous code that were not logged (omitted when zero).
    """

    __slots__ = ("_log", "_code", "_suppressed")

    _NOTHING = object()

    def __init__(self, logger: Any) -> None:
        self._log = logger
        self._code: object = self._NOTHING
        self._suppressed = 0

    def error(self, event: str, code: object, **kw: Any) -> bool:
        """Log *event* unless *code* is the last code logged; True if logged."""
        if code == self._code:
            self._suppressed += 1
            return False
        if self._suppressed:
            kw["suppressed"] = self._suppressed
        self._code = code
        self._suppressed = 0
        self._log.error(event, code=code, **kw)
        return True

    def clear(self) -> None:
        """Forget the last code: the next failure is logged whatever its code."""
        self._code = self._NOTHING
        self._suppressed = 0


class LogEvery:
    """Log an event that may repeat at any rate (a refused connection, an
    idle transaction cancelled) at most once per ``interval`` seconds per key.

    The first occurrence for a key is logged at once; later ones within the
    interval are counted, and the next line logged for that key carries
    ``suppressed=<n>``, the occurrences not logged since the previous line.
    """

    __slots__ = ("_log", "_interval", "_last")

    def __init__(self, logger: Any, interval: float) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict = {}   # (event, key) -> [monotonic time logged, suppressed since]

    def warning(self, event: str, key: object, **kw: Any) -> bool:
        """Log *event* (warning level) unless it was logged for *key* less than
        the interval ago; True if logged."""
        now = time.monotonic()
        slot = self._last.get((event, key))
        if slot is not None and now - slot[0] < self._interval:
            slot[1] += 1
            return False
        if slot is not None and slot[1]:
            kw["suppressed"] = slot[1]
        if len(self._last) > 4096:   # keys are uids and the like: forget old ones, stay bounded
            self._last.clear()
        self._last[(event, key)] = [now, 0]
        self._log.warning(event, **kw)
        return True
