"""The named states of the two ends of a replication stream, and the one
function that changes them (Tarantool's applier_STATE / applier_set_state).

Each value is what status shows (`appliance status`, the agent's reports).
Nothing assigns a relay's or an applier's ``state`` but :func:`set_state`,
which logs every transition as ``<role>_state_changed`` with ``from`` and
``to``.
"""
from __future__ import annotations

import enum

__all__ = ["RelayState", "ApplierState", "set_state"]


class RelayState(str, enum.Enum):
    """The primary's side, one relay per secondary."""
    CONNECTING = "connecting"
    DISCONNECTED = "disconnected"
    COPYING = "copying"            # a block copy to the secondary runs
    STREAMING = "streaming"        # the change log flows; acknowledgements come back


class ApplierState(str, enum.Enum):
    """The secondary's side."""
    WAITING = "waiting for primary"
    COPYING = "copying"            # a block copy from the primary runs
    STREAMING = "streaming"


def set_state(obj, state: enum.Enum, log, event: str, **kw) -> bool:
    """Move `obj` (a relay or the applier: it has ``state``) to `state`; log
    `event` with from/to when it changes; True when it changed."""
    old = obj.state
    if state is old:
        return False
    obj.state = state
    log.info(event, **{"from": old.value, "to": state.value}, **kw)
    return True
