"""The op table: which function carries out each request, and the checks
every request goes through before it.

A module that implements requests registers each with :func:`handler`::

    @handler(m.OP_BEGIN, writes=True)
    def begin(ctl, sess, program, input): ...

The function's parameters after ``(ctl, sess)`` are the request's arguments
as :data:`appliance.wire.messages.REQUESTS` lists them (tests/test_protocol.py
holds the two together); it returns the reply's result, or is a generator
that yields the loop's WAIT_* tokens and returns it. :func:`dispatch` checks,
in this order: the op is known; an agent-only op comes from the agent's
session; the argument count; the appliance's role allows it (``writes``:
refused on a secondary, see :meth:`.role.Role.check_write`; ``roles``: the
roles it exists for); a request that starts a transaction (``new_txn``) waits
while another session holds new writes (:mod:`.hold`). Nothing else in the
controller decides these.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from .. import errors
from ..wire import messages as m

__all__ = ["Op", "handler", "dispatch", "check", "HANDLERS"]


@dataclass(frozen=True)
class Op:
    request: m.Request
    fn: Callable
    writes: bool                     # changes data: refused where the role takes no writes
    roles: frozenset | None          # the roles it exists for (None: every role)
    generator: bool
    new_txn: bool = False            # starts a transaction: waits while another session holds writes


#: op code -> Op, filled by the modules that implement the requests
HANDLERS: dict[int, Op] = {}


def handler(op: int, *, writes: bool = False, roles: tuple[str, ...] | None = None, new_txn: bool = False):
    """Register the decorated function as the handler of `op`."""
    req = m.REQUESTS[op]

    def register(fn):
        if op in HANDLERS:
            raise RuntimeError(f"{req.name} has two handlers: {HANDLERS[op].fn.__qualname__} and {fn.__qualname__}")
        HANDLERS[op] = Op(req, fn, writes, frozenset(roles) if roles else None, inspect.isgeneratorfunction(fn),
                          new_txn)
        return fn
    return register


def dispatch(ctl, sess, req: list):
    """The coroutine of one request (see the module docstring)."""
    h = check(ctl, sess, req)
    if h.new_txn and ctl.hold.holder is not None and ctl.hold.holder is not sess:
        yield from ctl.hold.admit(sess)      # a restore, cancel or rerun holds new writes
    if h.generator:
        return (yield from h.fn(ctl, sess, *req[1:]))
    return h.fn(ctl, sess, *req[1:])


def check(ctl, sess, req: list) -> Op:
    """The checks of the module docstring, in that order; the request's Op.
    The controller's fast path (service.Controller.fast_request) runs the
    same checks through here before it carries out a request itself."""
    op = req[0]
    h = HANDLERS.get(op)
    if h is None:
        raise errors.ProtocolError(f"unknown request op {op}")
    r = h.request
    if r.agent and sess.agent is None:
        raise errors.AccessDeniedError(f"op {op}: only the appliance's replication agent may use it")
    n = len(req) - 1
    least, most = r.arity
    if not least <= n <= most:
        want = str(least) if least == most else f"{least} to {most}"
        raise errors.ProtocolError(f"{r.name.lower()[3:]}: expected {want} arguments "
                                   f"({', '.join(r.args) or 'none'}), got {n}")
    if h.writes:
        ctl.role.check_write(ctl.cfg)
    if h.roles is not None and ctl.role.name not in h.roles:
        raise errors.ProtocolError(f"{r.name.lower()[3:]}: appliance {ctl.cfg.name!r} is {ctl.role.name}; "
                                   f"this is for a {' or '.join(sorted(h.roles))}")
    return h
