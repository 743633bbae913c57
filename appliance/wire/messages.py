"""The client <-> controller protocol: every request and reply, in one place.

Transport: a Unix stream socket; every message is one frame
(:mod:`appliance.wire.framing`) whose payload is a msgpack array.

Request:  ``[op, arg, ...]``   (op: one of the ``OP_*`` integers below)
Reply:    ``[OK, result]``  or  ``[ERR, code_name, message, details]``

where ``code_name`` is an APL_* name from cext/apl_errors.h (the one error
table) and ``details`` a map; the client raises
``appliance.errors.error_for(code_name, message, **details)``.
Replies come in request order, one a request (OP_ATOMIC of a pipelined
transaction: two, see below). A client may pipeline requests (send several
before reading replies); the controller processes one session's requests in
order, one at a time (a request that waits for a lock holds back the ones
behind it).

Keys and records travel as msgpack values: a record is a map field -> value;
a key is the primary-key value itself (int, str or bytes).

Every request, its arguments (a trailing ``?``: optional) and its result are
listed once, in :data:`REQUESTS` below; the tables here are rendered from it,
the controller checks every request's argument count against it, and
tests/test_protocol.py checks that each handler takes exactly those arguments.

{client_requests}

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
"commit_timeout": ..., "version": ..., "pipeline": ...} (version: as
OP_BEGIN's; pipeline: see below).

The replication agent of the same appliance uses these, on the same socket
(only after OP_AGENT, and only from the controller's own user or root):

{agent_requests}

A synchronous commit crosses the primary's agent link twice, so neither
crossing is a message: OP_WAKEUPS hands the agent, with its reply, three
descriptors (SCM_RIGHTS ancillary data, in this order): an eventfd the
controller signals after every publish (the agent then reads the log bounds
from shared memory: no OP_WATCH round trip per commit), an eventfd the agent
signals when an acknowledgement may release a commit, and a memfd holding
the acknowledged serials (cext/apl_layout.h, struct apl_acks, which also says
why no wake-up is lost). OP_WATCH with serial nil then waits only for what an
operator asked of the agent (verify, resync) or its timeout.

OP_ATOMIC runs BEGIN, the steps (each one of OP_GET_FOR_UPDATE,
OP_LOCK_CHECKED, OP_INSERT, OP_UPDATE, OP_DELETE, OP_PUT with its arguments) and COMMIT as one
transaction in a single round trip: an autocommitted write such as
``table[key] = record`` is one OP_ATOMIC. If a step fails the transaction is
cancelled and the reply is that step's error. With the option
``{"pipeline": true}`` (a pipelined transaction whose statements the client
held until its commit, sent as one request) it answers twice: first the
transaction's number, as OP_BEGIN does, once it has begun, then its outcome;
a failed step's error then carries ``details["step"]`` (its index), and an
error before the transaction began is the only answer.
OP_LOAD inserts the records as one transaction (program ``"load"``).

Pipelined transactions. A client may send a transaction's statements
without waiting for their replies (the replies still come one per request,
in order). It says so at OP_BEGIN with ``{"pipeline": true}``: then a write
statement (OP_INSERT, OP_UPDATE, OP_DELETE, OP_PUT) that fails rolls the
whole transaction back at once — its changes dropped, its locks released —
because the statements behind it were sent on the assumption that it
succeeded. Its reply is its own error; every later statement and the
OP_COMMIT are not carried out and get APL_ETXN ("... was rolled back when a
pipelined statement failed (<that statement's error>) ..."); OP_COMMIT and
OP_CANCEL end it, a new OP_BEGIN replaces it. An OP_GET_FOR_UPDATE that
fails leaves the transaction open as in any transaction (its client waits
for that reply, so nothing was sent behind it on trust), and errors that
cancel a transaction anyway (APL_ELOCKTIMEOUT, APL_EDEADLOCK) do so as
always. A client keeps at most :data:`MAX_PIPELINED` replies outstanding.

Optimistic reads. A client reads a record for update in shared memory, as
any read, and sends OP_LOCK_CHECKED with the stored bytes it read, pipelined
like a write: the controller locks the key, then compares them with what
the transaction sees. The lock is held from then to the end, so a record
that compares equal is the one the transaction commits over; one that does
not (another transaction committed a change between the read and the lock)
cancels the transaction with APL_ESTALEREAD, in a pipelined transaction and
in OP_ATOMIC alike, and the client runs it again. A bank transfer (two reads
for update, two updates, COMMIT) is then one OP_ATOMIC.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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
OP_CHECKPOINT = 24
OP_PROMOTE = 25
OP_FENCE = 26
OP_REJOIN = 27
OP_CHECK = 28
OP_REPAIR = 29
OP_AGENT = 30
OP_WATCH = 31
OP_REPL_STATE = 32
OP_APPLY = 33
OP_COPY = 34
OP_BLOCK_SUMS = 35
OP_WAKEUPS = 37
OP_REWIND = 38
OP_EPOCH = 39
OP_IMAGES = 40
OP_DEVICES = 41
OP_HISTORY = 42
OP_RESTORE = 43
OP_CANCEL_TXN = 44
OP_HOLD = 45
OP_BATCH = 46
OP_DEVICE_DETACH = 48
OP_DEVICE_REPLACE = 49
OP_RELOAD = 50
OP_LOCK_CHECKED = 51

#: the most replies a client leaves unread on one connection (flow control of pipelined
#: statements); the controller stops reading only a session with more requests queued
#: (controller.loop.INBOX_PAUSE), so a client within it never waits for the controller to read
MAX_PIPELINED = 4096

#: ops allowed as steps of a transaction (and of OP_ATOMIC)
STEP_OPS = frozenset({OP_GET_FOR_UPDATE, OP_LOCK_CHECKED, OP_INSERT, OP_UPDATE, OP_DELETE, OP_PUT})

NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("OP_")}


@dataclass(frozen=True)
class Request:
    """One request of the protocol: its arguments (a name each; a trailing
    "?" marks an optional one, all of them last) and what it answers."""

    op: int
    args: tuple[str, ...]
    result: str
    agent: bool = False      # only on an agent's session (after OP_AGENT)

    @property
    def name(self) -> str:
        return NAMES[self.op]

    @cached_property
    def arity(self) -> tuple[int, int]:
        """(required, at most) arguments (every request checks it: computed once)."""
        return sum(1 for a in self.args if not a.endswith("?")), len(self.args)

    @property
    def params(self) -> tuple[str, ...]:
        """The argument names as a handler's parameters spell them."""
        return tuple(a.rstrip("?").replace(" ", "_") for a in self.args)


_R = Request
#: every request: what it takes, what it answers
REQUESTS: dict[int, Request] = {r.op: r for r in (
    _R(OP_HELLO, ("version", "name", "pid?"),
       "map: name, instance, epoch, role, schema_hash, pid, version. `pid`: the client's own; a pid other than "
       "the one SO_PEERCRED gives (another pid namespace) is refused with APL_EACCESS"),
    _R(OP_STATUS, (), "map (see controller.status)"),
    _R(OP_BEGIN, ("program", "input", "options?"),
       'transaction number (program: a name or nil; input: any; options: nil or {"pipeline": bool, "version": '
       'str}: "pipeline", see "Pipelined transactions"; "version", the program callable\'s version, db.run: '
       'see appliance/store/tlog.py)'),
    _R(OP_GET_FOR_UPDATE, ("table", "key"), "record or nil (locks the key)"),
    _R(OP_LOCK_CHECKED, ("table", "key", "expected"),
       "nil (locks the key; expected: the record's stored bytes as the client read them in shared memory, "
       "or nil for no record: if this transaction now sees other bytes, APL_ESTALEREAD and the transaction "
       'is cancelled; see "Optimistic reads")'),
    _R(OP_INSERT, ("table", "record"), "nil"),
    _R(OP_UPDATE, ("table", "key", "changes"), "nil (changes: a map)"),
    _R(OP_DELETE, ("table", "key"), "nil"),
    _R(OP_PUT, ("table", "key", "record"), '"insert" or "update"'),
    _R(OP_COMMIT, ("wait?", "durability?", "commit_timeout?"), "map: txn, serial, version"),
    _R(OP_CANCEL, (), "nil"),
    _R(OP_ATOMIC, ("program", "input", "steps", "options?"),
       "map: txn, serial, version, results (one per step); steps: [[op, arg...], ...]"),
    _R(OP_LOAD, ("table", "records", "durability?", "commit_timeout?"), "number loaded"),
    _R(OP_TXN_STATUS, ("txn", "since_ns"),
       '"committed", "not_committed", "unknown", "open" or "committing" (since_ns: its start time)'),
    _R(OP_WAIT_APPLIED, ("serial", "timeout"), "serial applied (a secondary: read-your-writes)"),
    _R(OP_VERIFY, ("timeout",), "{secondary: {ok, differ, checked, serial}} (a primary: its agent compares "
       "every block)"),
    _R(OP_RESYNC, ("secondary",), "nil (a primary: its agent copies every block to that secondary again)"),
    _R(OP_CHECKPOINT, (), "map: number, dir (a checkpoint begins, or the one running goes on; status "
       "durability.checkpoint shows its progress, durability.last_checkpoint the last one written)"),
    _R(OP_PROMOTE, ("options",), "map: epoch, serial, previous primary, what was drained and dropped (a "
       "secondary becomes the primary; options: {drain_timeout}; see controller/recovery.py)"),
    _R(OP_FENCE, ("epoch", "primary"), "map: fenced, epoch, by (a primary learns that `primary` (or nil) is "
       "primary at a newer `epoch`: it takes no writes from then on)"),
    _R(OP_REJOIN, ("options",), "map: role, serial, follows, history_from (a fenced or deposed primary becomes "
       "a secondary of the new primary; options: {} for now)"),
    _R(OP_CHECK, (), "map: checked, damaged ([{block, file, devices}]: blocks whose content no longer matches "
       "its checksum), version, seconds"),
    _R(OP_REPAIR, ("options",), "map: blocks, repaired, failed, source, seconds (options: {blocks | table | "
       "device, dry_run, timeout}: copy those blocks, or the damaged ones, again from a peer)"),
    _R(OP_DEVICES, (), "list: per device segment index, name, state, size, slots, used, free, blocks, damaged, "
       "bytes"),
    _R(OP_HISTORY, ("query",),
       "map: transactions (each: txn, serial, time_ns, program, version, input, changes: [{table, kind, key, "
       "b, a}]), next (serial to ask from for more, or nil), window; query: {since, until, program, table, "
       "key, limit, images}"),
    _R(OP_RESTORE, ("target", "options"),
       "map: to_serial, records, entries, transactions, parts, txn, serial (or, dry_run: changes); target: "
       "{serial} or {time_ns}; options: {table, blocks, dry_run, timeout}"),
    _R(OP_CANCEL_TXN, ("txn", "options"),
       "map: txn, serial, records (or, dry_run: changes); refused with APL_ECONFLICT when later "
       "transactions changed its records; options: {dry_run, timeout}"),
    _R(OP_HOLD, ("action", "timeout?"),
       'nil ("begin": new writes of other sessions wait until "end" or this session closes; waits up to '
       "timeout s for open transactions to end)"),
    _R(OP_BATCH, ("action", "at?"),
       'map: batch state (a secondary: "begin" stops applying, reads see one frozen state, `at` rewinds '
       'it to a serial or {time_ns} first; "end" resumes; "status")'),
    _R(OP_DEVICE_DETACH, ("device",), "map: device, blocks, state (device segment `device` is taken out of "
       "service: reads and changes of the blocks on it fail with APL_EDEVICE until it is replaced)"),
    _R(OP_DEVICE_REPLACE, ("device", "options"), "map: device, mode, blocks, refilled, failed, moved, bytes, "
       "seconds, source (a new segment refilled with exactly its blocks from a peer; options: {online, "
       "timeout}; status devices.replace shows its progress)"),
    _R(OP_RELOAD, (), "map: file, applied, needs_restart (the controller reads its config file again and "
       "takes the keys config.RELOADABLE allows now, as SIGHUP does, and answers once it has; a file it "
       "refuses is APL_ECONFIG with the key, and nothing changes)"),
    _R(OP_AGENT, ("role", "agent_pid"), "map: name, instance, epoch, role, serial, applied, durable (what of "
       "`applied` a secondary may acknowledge: on its disk with log_sync = \"commit\"), source, copying, "
       "needs_copy, fork, repair (role: the one the agent expects, or nil to be told)"),
    _R(OP_WATCH, ("serial", "timeout"), "log bounds once the published serial exceeds `serial` (nil: never), "
       'an operator asked something of the agent, or at the timeout: head, tail, serial, version, "verify": '
       'ids operators asked for, "resync": secondaries to copy again', agent=True),
    _R(OP_REPL_STATE, ("state",), "nil; a secondary: {batch: whether batch mode is on} ({secondary: "
       "{connected, acked, state, ...}}: drives synchronous commits on a primary, shown by status; or "
       '{"verify": {id: result}})', agent=True),
    _R(OP_WAKEUPS, (), "map: instance, secondaries (names, in the order of the acknowledgement slots); with "
       "it, the published and acked eventfds and the acknowledgements memfd (a primary)", agent=True),
    _R(OP_APPLY, ("source", "after", "entries"), "map: applied, consumed (a secondary)", agent=True),
    _R(OP_COPY, ("phase", "source", "payload"), 'map: copied or applied (a secondary; phase: "begin", '
       '"blocks" or "end")', agent=True),
    _R(OP_BLOCK_SUMS, (), "map: version, serial, limit, sums (bytes: u32 number + u64 checksum each)",
       agent=True),
    _R(OP_REWIND, ("serial", "entries", "source"), "map: applied, transactions, blocks (a secondary undoes "
       "what it holds past `serial` from its B logs: `entries` from its log history, or nil: its own change "
       "log; then follows primary instance `source` from `serial`; `blocks`: numbers to copy from it)",
       agent=True),
    _R(OP_IMAGES, ("blocks",), "map: serial, images (a secondary: the images of those blocks at its applied "
       "serial, apl_block_images format; its primary repairs from them)", agent=True),
    _R(OP_EPOCH, ("epoch",), "nil (a secondary accepted a stream at this newer epoch: it keeps it and "
       "refuses older ones from then on)", agent=True),
)}
del _R


def _table(requests) -> str:
    import textwrap
    w1, w2, w3 = 21, 46, 44
    rule = f"{'=' * w1}  {'=' * w2}  {'=' * w3}"
    lines = [rule, f"{'op':<{w1}}  {'arguments':<{w2}}  result", rule]
    for r in requests:
        left = textwrap.wrap(", ".join(r.args) or "-", w2) or ["-"]
        right = textwrap.wrap(r.result, w3)
        for i in range(max(len(left), len(right))):
            lines.append(f"{(r.name if i == 0 else ''):<{w1}}  {(left[i] if i < len(left) else ''):<{w2}}  "
                         f"{right[i] if i < len(right) else ''}".rstrip())
    lines.append(rule)
    return "\n".join(lines)


__doc__ = __doc__.replace("{client_requests}", _table(r for r in REQUESTS.values() if not r.agent and r.op != OP_AGENT)) \
                 .replace("{agent_requests}", _table(r for r in REQUESTS.values() if r.agent or r.op == OP_AGENT))


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
