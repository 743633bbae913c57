"""The client <-> controller protocol: every request and reply, in one place.

Transport: a Unix stream socket; every message is one frame
(:mod:`appliance.wire.framing`) whose payload is a msgpack array.

Request:  ``[op, arg, ...]``   (op: one of the ``OP_*`` integers below)
Reply:    ``[OK, result]``  or  ``[ERR, code_name, message, details]``

where ``code_name`` is an APL_* name from cext/apl_errors.h (the one error
table) and ``details`` a map; the client raises
``appliance.errors.error_for(code_name, message, **details)``.
Replies come in request order. A client may pipeline requests (send several
before reading replies); the controller processes one session's requests in
order, one at a time (a request that waits for a lock holds back the ones
behind it).

Keys and records travel as msgpack values: a record is a map field -> value;
a key is the primary-key value itself (int, str or bytes).

=====================  ==============================================  =============================
op                     arguments                                       result
=====================  ==============================================  =============================
OP_HELLO               protocol version, client name, its pid          map: name, instance, epoch,
                       (optional: refused with APL_EACCESS when it     schema_hash, pid, version
                       is not the pid SO_PEERCRED gives, i.e. another
                       pid namespace)
OP_STATUS              -                                               map (see controller.status)
OP_BEGIN               program name or nil, input (any)                transaction number
OP_GET_FOR_UPDATE      table, key                                      record or nil (locks the key)
OP_INSERT              table, record                                   nil
OP_UPDATE              table, key, changes (map)                       nil
OP_DELETE              table, key                                      nil
OP_PUT                 table, key, record                              "insert" or "update"
OP_COMMIT              wait (bool), durability, commit_timeout         map: txn, serial, version
OP_CANCEL              -                                               nil
OP_ATOMIC              program or nil, input, [[op, arg...], ...]      map: txn, serial, version,
                                                                       results (one per step)
OP_LOAD                table, [record, ...], durability, commit_timeout  number loaded
                       (the last two optional)
OP_TXN_STATUS          transaction number, its start time (ns)         "committed", "not_committed",
                                                                       "unknown", "open", "committing"
OP_WAIT_APPLIED        primary serial, timeout (s)                     serial applied (secondary: read-your-writes)
OP_VERIFY              timeout (s)                                     {secondary: {ok, differ, checked, serial}}
                                                                       (primary; its agent compares every block)
OP_RESYNC              secondary name                                  nil (primary: its agent copies every
                                                                       block to that secondary again)
=====================  ==============================================  =============================

OP_COMMIT takes a second, optional argument: the durability wanted, one of
"local" (do not wait for secondaries), "quorum" (the configured synchronous
quorum: the default), "all" (every secondary), or an int k (any k
secondaries). With wait false the reply comes after the local commit while
the records stay locked until the durability is reached (Figure 6).
Its third, optional argument, commit_timeout (seconds, or nil: no bound;
see check_commit_timeout), bounds the wait for that durability: past it the
reply is APL_EBACKUP (BackupTimeoutError, details txn, serial, version,
waiting_for, after_s): committed here, the backup pending, the records
still locked until it is confirmed.
OP_ATOMIC takes an optional fifth argument: {"durability": ..., "wait": ...,
"commit_timeout": ...}.

The replication agent of the same appliance uses these, on the same socket
(only after OP_AGENT, and only from the controller's own user or root):

=====================  ==============================================  =============================
OP_AGENT               role ("primary" / "secondary"), agent pid       map: name, instance, epoch, role
OP_WATCH               serial, timeout (s)                             log bounds once the published
                                                                       serial exceeds `serial` (or at the
                                                                       timeout): head, tail, serial, version,
                                                                       "verify": ids operators asked for,
                                                                       "resync": secondaries to copy again
OP_REPL_STATE          {secondary: {connected, acked, state, ...}}     nil (primary: drives synchronous
                                                                       commits; shown by status)
OP_ACKED               secondary name, serial it confirmed applied     none: one-way (primary: releases the
                                                                       synchronous commits it satisfies)
OP_APPLY               source instance, after serial, entries blob     map: applied, consumed (secondary)
OP_COPY                phase ("begin"/"blocks"/"end"), payload         map: copied, applied (secondary)
OP_BLOCK_SUMS          version (0 = latest)                            map: version, serial, sums (bytes:
                                                                       u32 number + u64 checksum each)
=====================  ==============================================  =============================

OP_ACKED is the one request without a reply: it is on the path of every
synchronous commit, and a reply would cost the controller a send and the
agent a wake-up per acknowledgement for nothing. A malformed one from an
agent is logged and ignored (the agent's full OP_REPL_STATE carries the same
serial). From any session that is not an agent's it is an ordinary request:
refused with AccessDeniedError, like every agent op.

OP_ATOMIC runs BEGIN, the steps (each one of OP_GET_FOR_UPDATE, OP_INSERT,
OP_UPDATE, OP_DELETE, OP_PUT with its arguments) and COMMIT as one
transaction in a single round trip: an autocommitted write such as
``table[key] = record`` is one OP_ATOMIC. If a step fails the transaction is
cancelled and the reply is that step's error.
OP_LOAD inserts the records as one transaction (program ``"load"``).
"""
from __future__ import annotations

from .. import errors

PROTOCOL_VERSION = 1

OK = 0
ERR = 1

OP_HELLO = 1
OP_STATUS = 2
OP_BEGIN = 10
OP_GET_FOR_UPDATE = 11
OP_INSERT = 12
OP_UPDATE = 13
OP_DELETE = 14
OP_PUT = 15
OP_COMMIT = 16
OP_CANCEL = 17
OP_ATOMIC = 18
OP_LOAD = 19
OP_TXN_STATUS = 20
OP_WAIT_APPLIED = 21
OP_VERIFY = 22
OP_RESYNC = 23
OP_AGENT = 30
OP_WATCH = 31
OP_REPL_STATE = 32
OP_APPLY = 33
OP_COPY = 34
OP_BLOCK_SUMS = 35
OP_ACKED = 36

#: requests the controller answers with no reply
ONE_WAY = frozenset({OP_ACKED})

#: ops allowed as steps of a transaction (and of OP_ATOMIC)
STEP_OPS = frozenset({OP_GET_FOR_UPDATE, OP_INSERT, OP_UPDATE, OP_DELETE, OP_PUT})

NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("OP_")}


#: the longest commit_timeout accepted (seconds)
MAX_COMMIT_TIMEOUT = 86400.0


def check_commit_timeout(t) -> float | None:
    """A commit's wait bound in seconds, or None (wait as long as it takes);
    WrongTypeError for anything else."""
    if t is None:
        return None
    if type(t) in (int, float) and 0 < t <= MAX_COMMIT_TIMEOUT:   # (NaN fails both comparisons)
        return float(t)
    raise errors.WrongTypeError(f"commit_timeout must be a number of seconds in (0, {MAX_COMMIT_TIMEOUT:g}] or None, "
                         f"not {t!r}")


def ok(result=None) -> list:
    return [OK, result]


def err(code_name: str, message: str, details: dict | None = None) -> list:
    return [ERR, code_name, message, details or {}]
