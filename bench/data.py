"""The benchmark's data set and the arguments each operation is called with.

Everything here is deterministic (seeded), so every system is loaded with the
same records and every worker of every system issues the same sequence of
keys for the same benchmark: the only thing that differs between two rows of
one benchmark is the system.
"""
from __future__ import annotations

import random
from array import array
from collections.abc import Iterator

SEED = 20240611
NOTE_LEN = 60
NOTE_POOL = 4096          # distinct notes; record i gets NOTES[i % NOTE_POOL]
BALANCE_MAX = 10**9       # balances fit msgpack's uint32 (5 bytes)
LOAD_CHUNK = 10_000       # records per bulk-load batch / write transaction
RANGE_LEN = 10_000        # records per range scan (clamped for tiny N)
HOT_ACCOUNTS = 10         # the accounts every transfer of the hot-account row is between


def branch_of(i: int, nbranches: int) -> str:
    return "br%05d" % (i % nbranches)


class Dataset:
    """N records ``{"id", "branch", "balance", "note"}`` generated from a seed.

    Records are built on demand from two compact arrays rather than kept as
    a million dicts, so loading can stream them in any order.
    """

    def __init__(self, n: int, seed: int = SEED) -> None:
        if n < 100:
            raise ValueError("need at least 100 records")
        self.n = n
        self.seed = seed
        self.nbranches = max(1, n // 10)
        rng = random.Random(seed)
        self.balances = array("q", (rng.randrange(BALANCE_MAX) for _ in range(n)))
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
        self.notes = ["".join(rng.choices(alphabet, k=NOTE_LEN)) for _ in range(NOTE_POOL)]
        self.range_len = min(RANGE_LEN, n // 2)
        self._random_order: array | None = None

    def record(self, i: int, balance: int | None = None) -> dict:
        return {
            "id": i,
            "branch": branch_of(i, self.nbranches),
            "balance": self.balances[i] if balance is None else balance,
            "note": self.notes[i % NOTE_POOL],
        }

    def order(self, kind: str) -> array:
        """Primary keys in load order: ``"random"`` (a seeded shuffle) or ``"key"``."""
        if kind == "key":
            return array("q", range(self.n))
        if kind != "random":
            raise ValueError(f"unknown load order {kind!r}")
        if self._random_order is None:
            ids = list(range(self.n))
            random.Random(self.seed + 1).shuffle(ids)
            self._random_order = array("q", ids)
        return self._random_order

    def chunks(self, kind: str, size: int = LOAD_CHUNK) -> Iterator[list[dict]]:
        order = self.order(kind)
        for start in range(0, self.n, size):
            yield [self.record(i) for i in order[start:start + size]]

    def probe(self) -> dict:
        """Arguments with their expected answers, to check each system's reads."""
        rng = random.Random(self.seed + 2)
        nb, rl = self.nbranches, self.range_len
        branches = rng.sample(range(nb), min(nb, 3))
        lo = rng.randrange(self.n - rl + 1)
        return {
            "key": [(k, self.record(k)) for k in rng.sample(range(self.n), 20)],
            "branch": [("br%05d" % b, [self.record(i) for i in range(b, self.n, nb)]) for b in branches],
            "range": [(lo, [self.record(i) for i in range(lo, lo + rl)])],
        }

    def params(self) -> dict:
        """What a worker process needs to rebuild the arguments (picklable, small)."""
        return {"n": self.n, "nbranches": self.nbranches, "range_len": self.range_len,
                "notes": self.notes, "seed": self.seed}


# --- arguments of the measured operations ---------------------------------
# Each generator returns a list of arguments that a worker cycles through.
# The seed mixes the benchmark, the row's process count and the worker index,
# never the system.

READ_ARGS = 1_000_000     # cap on pre-generated random keys per read worker
WRITE_ARGS = 50_000       # (key, record) pairs pre-generated per write worker


def next_write(arg: tuple) -> tuple:
    """The ``(key, record)`` a write operation writes for a "record" argument:
    the record's balance goes up by one on every call, so no write repeats an
    earlier one when a worker comes back to an argument (after its warm-up,
    or after going through all of them). The appliance commits, logs and
    replicates nothing for a write that changes nothing, so a repeated write
    would be a no-op there and real work for the peers. Every system's
    clients call it, so all do the same work."""
    k, rec = arg
    rec["balance"] = (rec["balance"] + 1) % BALANCE_MAX
    return k, rec


def make_args(kind: str, params: dict, seed: int) -> list:
    rng = random.Random(seed)
    n = params["n"]
    if kind == "key":
        return rng.choices(range(n), k=min(n, READ_ARGS))
    if kind == "branch":
        nb = params["nbranches"]
        return ["br%05d" % b for b in rng.choices(range(nb), k=min(nb, 100_000))]
    if kind == "range":
        return rng.choices(range(n - params["range_len"] + 1), k=1000)
    if kind == "record":
        notes, nb = params["notes"], params["nbranches"]
        args = []
        for k in rng.choices(range(n), k=min(n, WRITE_ARGS)):
            rec = {"id": k, "branch": branch_of(k, nb),
                   "balance": rng.randrange(BALANCE_MAX), "note": notes[k % NOTE_POOL]}
            args.append((k, rec))
        return args
    if kind in ("transfer", "transfer-hot"):
        # (source, destination, amount): two distinct accounts (of the first HOT_ACCOUNTS for the
        # hot-account row), an amount that changes both
        accounts = range(min(n, HOT_ACCOUNTS) if kind == "transfer-hot" else n)
        args = []
        for _ in range(min(n, WRITE_ARGS)):
            src, dst = rng.sample(accounts, 2)
            args.append((src, dst, rng.randrange(1, 100)))
        return args
    raise ValueError(f"unknown argument kind {kind!r}")
