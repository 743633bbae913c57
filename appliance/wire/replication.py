"""The replication protocol between a primary's agent and a secondary's agent.

Transport: one TCP connection per secondary (optionally TLS), the primary's
agent connecting; frames as in :mod:`appliance.wire.framing`. Every message
is a msgpack array whose first four elements are the same header::

    [type, epoch, serial, time_ns, ...payload]

``epoch`` is the sender's appliance epoch (a failover increments it; a
secondary refuses a stream from an epoch older than one it has seen),
``serial`` the change-log serial the message is about (0 when none), and
``time_ns`` the sender's wall clock, so order is strict and lag measurable.

Handshake (mutual authentication; both sides log and close on failure)::

    primary   -> HELLO      {version, name, instance, schema, files, nonce, mode}
    secondary -> CHALLENGE  {name, nonce, mac}      mac = HMAC(secret, "secondary" | both nonces | names)
    primary   -> AUTH       {mac}                   mac = HMAC(secret, "primary"   | both nonces | names)
    secondary -> START      {applied, source, copy, repair} where to resume: the last serial
                                                    it applied (0: nothing), the primary instance it
                                                    followed, whether it needs a full copy, and block
                                                    numbers it waits to have copied
    (with TLS, mutual certificate checks happen before HELLO; the HMAC then
    also binds the peers' names)

Stream (primary -> secondary), in serial order:

    ENTRIES     [first, last, blob]   change-log entries back to back, as the
                primary's log stores them (cext/apl_layout.h, struct apl_centry):
                BEGIN (T log), INSERT/UPDATE/DELETE (file, block number,
                record offset, key, A image — or only the changed part, flag
                APL_CEF_DELTA — and B image unless not sent), BLOCK (a block's
                image after a structural change), COMMIT, CANCEL (with the
                undo's entries before it: the B logs that undo it, [0122])
    COPY_BEGIN  {limit, serial[, blocks]}  start of a block copy (first copy, or a
                                        secondary the retained log no longer covers);
                                        with `blocks`, a copy of those numbers only, from
                                        where the stream is (a rewind's or a repair's)
    COPY_BLOCKS images                  block images at this stream position: (u32 number,
                                        u32 length, image) back to back (apl_block_images);
                                        length 0: the number is not in use there
    COPY_END    {serial}
    VERIFY      {id, sums}              checksums of every block at this stream position
    REWIND      {serial}                after a failover: the secondary (of this primary's
                                        lineage: START source = the primary it was promoted
                                        from) undoes what it holds past `serial`, the fork,
                                        and follows this primary from there
    FETCH       {id, blocks}            send the images of these block numbers (a primary
                                        repairs damaged blocks of its own from them)
    HEARTBEAT   {head, committed}       keeps an idle link measurable

Replies (secondary -> primary):

    ACK         {applied}               backup complete: every transaction up to
                                        `applied` (a COMMIT/CANCEL serial) is applied;
                                        never past what this link carried (the primary
                                        counts no acknowledgement past what it sent)
    NAK         {expected}              a gap: resend from serial `expected`
    VERIFY_RESULT {id, differ, checked}
    REWOUND     {ok, applied, transactions, blocks}  the rewind is done (`blocks`: numbers the
                                        primary copies next); ok false: it could not
                                        (its history does not reach the fork): copy all
    REPAIR      {blocks}                copy these block numbers again (damaged here)
    BLOCKS      {id, serial, images}    FETCH's answer: the images at `serial`, its applied one
    SUSPEND     {applied}               referential batch mode ([0156]): this secondary stopped
                                        applying; it keeps what arrives and, until RESUME, its
                                        ACKs mean received and kept ({applied, received: true}),
                                        so a synchronous primary does not stall on it
    RESUME      {applied}               it caught up after the batch: ACKs mean applied again
    HEARTBEAT   {applied}
    ERROR       {code, message[, epoch, primary]}  then the connection is closed (a secondary
                                        whose controller refused a batch says why, and its
                                        next START asks for a copy; one that refuses a
                                        deposed primary, APL_ESTALE, says which epoch it
                                        follows and, when known, its primary: the deposed
                                        primary fences itself)

Until the peer has authenticated (AUTH checked), a frame holds at most 64 KiB
(link.HANDSHAKE_MAX_FRAME); a larger one ends the connection.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time

from .. import errors

PROTOCOL_VERSION = 1

HELLO = 1
CHALLENGE = 2
AUTH = 3
START = 4
ENTRIES = 10
COPY_BEGIN = 11
COPY_BLOCKS = 12
COPY_END = 13
VERIFY = 14
SUSPEND = 15
RESUME = 16
REWIND = 17
FETCH = 18
HEARTBEAT = 20
ACK = 30
NAK = 31
VERIFY_RESULT = 32
REWOUND = 33
REPAIR = 34
BLOCKS = 35
ERROR = 40

NAMES = {v: k for k, v in dict(globals()).items() if isinstance(v, int) and k.isupper() and k != "PROTOCOL_VERSION"}


def message(kind: int, epoch: int, serial: int, body) -> list:
    return [kind, epoch, serial, time.time_ns(), body]


def parse(msg) -> tuple[int, int, int, int, object]:
    """(type, epoch, serial, time_ns, body); ProtocolError if malformed."""
    if (type(msg) is not list or len(msg) != 5 or type(msg[0]) is not int or type(msg[1]) is not int
            or type(msg[2]) is not int or type(msg[3]) is not int or msg[0] not in NAMES):
        raise errors.ProtocolError("replication message must be [type, epoch, serial, time_ns, body]")
    return msg[0], msg[1], msg[2], msg[3], msg[4]


def nonce() -> bytes:
    return os.urandom(32)


def mac(secret: bytes, role: str, nonce_a: bytes, nonce_b: bytes, primary: str, secondary: str) -> bytes:
    """HMAC-SHA256 binding the role, both nonces and both names."""
    msg = b"|".join([role.encode(), nonce_a, nonce_b, primary.encode(), secondary.encode()])
    return hmac.new(secret, msg, hashlib.sha256).digest()


def mac_ok(expected: bytes, got) -> bool:
    return isinstance(got, bytes) and hmac.compare_digest(expected, got)
