"""Failover between real appliances on loopback ([0123]–[0128]): promote,
fencing, rejoin and rewind, with real controllers, agents and TCP.

Each test runs a failover-ready pair (each config lists the other as the
secondary it serves when it is primary, as config/primary.toml and
config/secondary.toml do) through the operator flow of the README:
the primary dies (SIGKILL of its controller and agent), `appliance promote`
makes the secondary primary, the old primary's processes start as usual and
learn that they are deposed (fenced), `appliance rejoin` makes it a
secondary of the new one, and `appliance verify` compares the two. A failover
changes the pair for good, so each test has a pair of its own.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

import appliance
from appliance import errors
from appliance.store.segment import unlink_all

from conftest import Node, free_port
from fault_helpers import wait_for
from procs import APPLIANCE, RUN_DIR
from repl_proxy import ReplProxy
from store_helpers import unique_name

TABLES = """
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = { id = "int", branch = "str", balance = "int" }

[tables.transfers]
primary_key = "id"
fields = { id = "str", src = "int", dst = "int", amount = "int" }
"""

ACCOUNTS = 200
BALANCE = 1000

#: one transfer: money moves between two accounts, and the transfer records
#: itself in `transfers`, in one transaction (the tests and the clients below use it)
TRANSFER = """
def transfer(db, a, b, amount, tid):
    with db.transaction(program="transfer", input={"src": a, "dst": b, "amount": amount}) as tx:
        x = tx.get("accounts", a, for_update=True)
        y = tx.get("accounts", b, for_update=True)
        tx.update("accounts", a, {"balance": x["balance"] - amount})
        tx.update("accounts", b, {"balance": y["balance"] + amount})
        tx.insert("transfers", {"id": tid, "src": a, "dst": b, "amount": amount})
"""


def _defined(code: str, name: str):
    ns: dict = {}
    exec(code, ns)
    return ns[name]


transfer = _defined(TRANSFER, "transfer")

#: a bank-transfer client: once a transfer's commit() returns (acknowledged)
#: its id is written to the output file
TRANSFERS = TRANSFER + r"""
import random, sys, appliance
from appliance import errors
from appliance.store.segment import unlink_all
db = appliance.connect(sys.argv[1], timeout=5); out = open(sys.argv[2], "a", buffering=1)
seed = int(sys.argv[3]); n = int(sys.argv[4]); accounts = int(sys.argv[5])
rng = random.Random(seed)
print("ready", flush=True)
for i in range(n):
    a, b = rng.sample(range(accounts), 2)
    tid = "t%d-%d" % (seed, i)
    try:
        transfer(db, a, b, rng.randrange(1, 50), tid)
    except (errors.DeadlockError, errors.LockTimeoutError):
        continue
    except (errors.UnavailableError, errors.NotPrimaryError, errors.BackupTimeoutError, ConnectionError):
        break
    out.write(tid + "\n")
print("done", flush=True)
"""


class Pair:
    """Two appliances, each the other's secondary when it is primary.
    `mode`: how the first primary backs up to the first secondary; the
    promoted one serves the old primary synchronously with "degrade".
    `others`: more secondaries (asynchronous) of whichever of the two is
    primary, each with a log history or without (True / False)."""

    def __init__(self, make_appliance, tmp_path, mode: str = "sync", lz4: bool = False, proxy: bool = False,
                 others: tuple[bool, ...] = (), segment_size: str = "16MiB", log_size: str = "8MiB",
                 durable: bool = False) -> None:
        secret = tmp_path / "secret"
        secret.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        secret.chmod(0o600)
        count = 2 + len(others)
        self.names = [unique_name("fa"), unique_name("fb")] + [unique_name("fc") for _ in others]
        self.ports = [free_port() for _ in range(count)]
        # the first primary reaches its secondary through a fault-injecting proxy (tests/repl_proxy.py)
        self.proxy = ReplProxy(self.ports[1]) if proxy else None
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        to_b = self.proxy.address if proxy else addresses[1]
        nodes = []
        for me in range(count):
            other = 1 - me if me < 2 else None
            role = "primary" if me == 0 else "secondary"
            if me == 1 and lz4:
                keep = 'serve_reads = false\nhistory_dir = "hist"'
            else:
                keep = 'history_dir = "hist"' if me < 2 or others[me - 2] else ""
            primary = f'"{self.names[other]}"' if other is not None else json.dumps(self.names[:2])
            extra = (f'[replication]\nrole = "{role}"\nsecret_file = "{secret}"\nheartbeat = 0.2\n'
                     f'listen = "{addresses[me]}"\nprimary = {primary}\n{keep}\n')
            if me < 2:
                policy = 'on_unreachable = "block"' if me == 0 else 'on_unreachable = "degrade"\ndegrade_after = 2.0'
                extra += (f'[[replication.secondaries]]\nname = "{self.names[other]}"\n'
                          f'address = "{to_b if me == 0 else addresses[0]}"\n'
                          f'mode = "{mode if me == 0 else "sync"}"\n{policy}\n')
                for k in range(2, count):
                    extra += (f'[[replication.secondaries]]\nname = "{self.names[k]}"\naddress = "{addresses[k]}"\n'
                              'mode = "async"\n')
            if durable:    # log files and checkpoints on disk (see "Durability on disk")
                extra += (f'[durability]\ndir = "{tmp_path / ("dur-" + self.names[me])}"\ncheckpoint_every = "off"\n'
                          'log_file_size = "2MiB"\n')
            nodes.append(Node(make_appliance(name=self.names[me], extra=extra, tables=TABLES,
                                             segment_size=segment_size, log_size=log_size)))
        self.a, self.b = nodes[:2]
        self.others = nodes[2:]
        self.nodes = nodes

    def start(self) -> "Pair":
        for n in self.nodes:
            n.app.start()
        for n in self.nodes[1:]:
            n.agent.start()
        self.a.agent.start()
        for n in self.nodes[1:]:
            wait_for(lambda: self.secondary_state(self.a, n.name) == "streaming", 30, what="streaming")
        return self

    @staticmethod
    def status(node) -> dict:
        return cli_json("status", node)

    def secondary_state(self, primary, name: str) -> str | None:
        rep = self.status(primary).get("replication") or {}
        return (rep.get("secondaries") or {}).get(name, {}).get("state")

    def caught_up(self, primary, name: str) -> bool:
        st = self.status(primary)
        sec = st["replication"]["secondaries"][name]
        return sec["state"] == "streaming" and sec["acked_serial"] >= st["log"]["serial"]

    def kill(self, node) -> None:
        """The machine dies: controller and agent SIGKILLed (its shared memory stays)."""
        node.agent.kill()
        node.app.controller.kill()

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
        if self.proxy is not None:
            self.proxy.close()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_PROGRESS"}
    return subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, cwd=RUN_DIR, env=env,
                          timeout=timeout)


def cli_json(command: str, node, *args: str, ok: bool = True) -> dict:
    r = cli(command, "--json", "--config", str(node.app.config), *args)
    if ok:
        assert r.returncode == 0, f"appliance {command}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip() else {"exit": r.returncode, "stderr": r.stderr}


@pytest.fixture
def make_pair(make_appliance, tmp_path):
    made = []

    def make(**kw) -> Pair:
        p = Pair(make_appliance, tmp_path, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


def load_bank(node) -> None:
    with appliance.connect(node.app.config) as db:
        db.load("accounts", ({"id": i, "branch": f"b{i % 7}", "balance": BALANCE} for i in range(ACCOUNTS)))


def bank_state(node) -> tuple[int, set[str], int]:
    """(sum of balances, transfer ids, accounts) in one snapshot."""
    with appliance.connect(node.app.config) as db:
        with db.snapshot() as snap:
            acc = list(snap.table("accounts").range())
            ids = {r["id"] for r in snap.table("transfers").range()}
    return sum(r["balance"] for r in acc), ids, len(acc)


def start_transfers(node, tmp_path, clients: int = 3, n: int = 100000):
    procs = []
    for seed in range(clients):
        out = tmp_path / f"acked-{node.name}-{seed}.txt"
        p = node.app.spawn(TRANSFERS, str(out), str(seed), str(n), str(ACCOUNTS), stdout=subprocess.PIPE,
                           text=True)
        assert p.stdout.readline().strip() == "ready"
        procs.append((p, out))
    return procs


def acked_ids(procs) -> set[str]:
    ids = set()
    for _, out in procs:
        if out.exists():
            ids |= {ln.strip() for ln in out.read_text().splitlines() if ln.strip()}
    return ids


def stop_clients(procs) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


class TestSynchronousFailover:
    def test_operator_flow_under_transfers_loses_no_acknowledged_transfer(self, make_pair, tmp_path):
        """The README's flow with a synchronous secondary under a bank-transfer load: the primary dies, promote
        makes the secondary primary (it takes writes at once, every acknowledged transfer is there, the total is
        conserved); the old primary, started again, is fenced and refuses writes; rejoin makes it a secondary and
        verify on the new primary exits 0."""
        pair = make_pair(mode="sync").start()
        load_bank(pair.a)
        procs = start_transfers(pair.a, tmp_path)
        wait_for(lambda: len(acked_ids(procs)) >= 300, 60, what="300 acknowledged transfers")
        pair.kill(pair.a)                                        # the primary's machine dies, mid-load
        stop_clients(procs)
        acked = acked_ids(procs)

        rep = cli_json("promote", pair.b, "--yes")
        assert rep["epoch"] == 2 and rep["previous_primary"] == pair.a.name and rep["drained"]
        total, ids, n = bank_state(pair.b)
        assert n == ACCOUNTS and total == ACCOUNTS * BALANCE      # conserved
        assert acked <= ids, f"{len(acked - ids)} acknowledged transfers lost"
        with appliance.connect(pair.b.app.config, timeout=5) as db:   # writes at once (the old one is degraded)
            with db.transaction() as tx:
                x = tx.get("accounts", 1, for_update=True)
                tx.update("accounts", 1, {"balance": x["balance"] - 5})
                tx.update("accounts", 2, {"balance": tx.get("accounts", 2, for_update=True)["balance"] + 5})
        st = pair.status(pair.b)
        assert (st["role"], st["epoch"]) == ("primary", 2)
        assert st["failover"]["promoted"]["serial"] == rep["serial"]
        assert st["replication"]["secondaries"][pair.a.name]["degraded"]

        # the old primary's processes start as usual: its agent meets the new epoch and fences it
        pair.a.app.controller.start()
        pair.a.agent.start()
        wait_for(lambda: pair.status(pair.a)["failover"]["fenced"], 30, what="the old primary to be fenced")
        fenced = pair.status(pair.a)["failover"]["fenced"]
        assert fenced == {"epoch": 2, "by": pair.b.name}
        with appliance.connect(pair.a.app.config, timeout=5) as old:
            with pytest.raises(errors.NotPrimaryError, match="no longer the primary") as ei:
                old.table("accounts")[1] = {"branch": "x", "balance": 0}
            assert ei.value.details["epoch"] == 2 and ei.value.details["primary"] == pair.b.name
            assert old.table("accounts")[3]["balance"] >= 0        # reads still work
        crit = [e for e in pair.a.app.controller.events() if e.get("event") == "primary_fenced"]
        assert len(crit) == 1 and crit[0]["level"] == "critical"

        rj = cli_json("rejoin", pair.a, "--yes")
        assert rj["role"] == "secondary" and rj["follows"] == [pair.b.name]
        wait_for(lambda: pair.caught_up(pair.b, pair.a.name), 60, what="the rejoined secondary to catch up")
        r = cli("verify", "--config", str(pair.b.app.config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert bank_state(pair.a) == bank_state(pair.b)
        st = pair.status(pair.b)["replication"]["secondaries"][pair.a.name]
        assert st["healthy"] and not st["degraded"]               # back in the quorum once caught up


    def test_a_rejoin_whose_agent_cannot_listen_says_so_and_completes_once_it_runs(self, make_pair):
        """The old primary's listen address is taken by another process when it rejoins: its agent stops on
        the secondary side's bind (a typed, logged refusal naming the address), the rejoin's wait does not
        hang (it fails once no agent is attached for --agent-wait, naming the address); with the port
        free again and the agent started, it follows the new primary and verify ends clean."""
        import socket
        pair = make_pair(mode="sync").start()
        load_bank(pair.a)
        with appliance.connect(pair.a.app.config) as db:
            for i in range(20):
                transfer(db, i, i + 1, 3, f"t-{i}")
        pair.kill(pair.a)
        cli_json("promote", pair.b, "--yes")
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", pair.ports[0]))
            squatter.listen()
            pair.a.app.controller.start()
            pair.a.agent.start()
            wait_for(lambda: pair.status(pair.a)["failover"]["fenced"], 30, what="the old primary to be fenced")

            r = cli("rejoin", "--json", "--yes", "--agent-wait", "2", "--config", str(pair.a.app.config))
            assert r.returncode == 3, r.stdout + r.stderr
            assert "no replication agent has been attached" in r.stderr and f":{pair.ports[0]}" in r.stderr
            assert pair.a.agent.proc.wait(10) == errors.EXIT_BUSY
            failed = [e for e in pair.a.agent.events() if e.get("event") == "agent_failed"]
            assert failed and failed[-1]["key"] == "replication.listen" and "in use" in failed[-1]["error"]
            st = pair.status(pair.a)
            assert st["role"] == "secondary" and not st["replication"]["agent"]["attached"]
        finally:
            squatter.close()

        pair.a.agent.start()
        wait_for(lambda: pair.caught_up(pair.b, pair.a.name), 60, what="the rejoined secondary to catch up")
        r = cli("verify", "--config", str(pair.b.app.config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert bank_state(pair.a) == bank_state(pair.b)


class TestAsynchronousFailover:
    def test_loses_at_most_the_lag_shown_and_the_rejoining_primary_is_rewound(self, make_pair):
        """An asynchronous secondary whose link stalls: the primary commits on (status shows the lag), then dies.
        The promoted secondary lacks at most that many transactions, and takes new ones (new block numbers
        too). The old primary, started again, is fenced; rejoin undoes exactly the transactions the new
        primary never received (its status says how many and which serials), copies the blocks whose
        structure changed, and verify ends clean."""
        pair = make_pair(mode="async", proxy=True).start()
        load_bank(pair.a)
        with appliance.connect(pair.a.app.config) as db:
            for i in range(50):
                transfer(db, i, i + 1, 3, f"before-{i}")
        wait_for(lambda: pair.caught_up(pair.a, pair.b.name), 30, what="the secondary to catch up")
        pair.proxy.pause()                                         # the link stalls: nothing more reaches B
        with appliance.connect(pair.a.app.config) as db:
            for i in range(40):
                transfer(db, i, i + 7, 5, f"lost-{i}")
            acc = db.table("accounts")                             # new records past the last block: splits
            db.load("accounts", ({"id": 10_000 + i, "branch": "new", "balance": 0} for i in range(400)))
            del acc[10_005]
        lag = pair.status(pair.a)["replication"]["secondaries"][pair.b.name]["lag"]["transactions"]
        assert lag >= 42
        pair.kill(pair.a)
        pair.proxy.drop()                                          # what the proxy held is gone with the link
        pair.proxy.resume()

        rep = cli_json("promote", pair.b, "--yes")
        total, ids, n = bank_state(pair.b)
        lost = {f"lost-{i}" for i in range(40)} - ids
        assert total == ACCOUNTS * BALANCE and n == ACCOUNTS
        assert len(lost) + 2 <= lag                                # the 40 transfers, the load, the delete
        assert {f"before-{i}" for i in range(50)} <= ids
        with appliance.connect(pair.b.app.config, timeout=5) as db:   # new writes, new block numbers
            db.load("accounts", ({"id": 20_000 + i, "branch": "b2", "balance": 0} for i in range(300)))
            transfer(db, 3, 4, 9, "after-0")

        pair.a.app.controller.start()
        pair.a.agent.start()
        wait_for(lambda: pair.status(pair.a)["failover"]["fenced"], 30, what="the old primary to be fenced")
        with appliance.connect(pair.a.app.config, timeout=5) as old:
            with pytest.raises(errors.NotPrimaryError):
                transfer(old, 1, 2, 1, "split-brain")
            assert "lost-3" in {r["id"] for r in old.table("transfers").range()}   # still its own, until rejoin

        rj = cli_json("rejoin", pair.a, "--yes")
        rw = rj["rewound"]
        assert rw["transactions"] == 42 and rw["from_serial"] == rep["serial"] + 1
        assert rw["blocks_to_copy"] >= 1                         # the load split blocks: copied, not undone
        wait_for(lambda: pair.caught_up(pair.b, pair.a.name), 60, what="the rejoined secondary to catch up")
        r = cli("verify", "--config", str(pair.b.app.config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert bank_state(pair.a) == bank_state(pair.b)
        with appliance.connect(pair.a.app.config) as db:
            assert db.table("accounts").get(10_001) is None and db.table("accounts").get(20_001) is not None
            assert db.table("accounts").find("branch", "new") == []
        st = pair.status(pair.a)
        assert st["role"] == "secondary" and st["failover"]["rewound"]["transactions"] == 42
        copies = [e for e in pair.b.agent.events() if e.get("event") == "copy_started"]
        assert copies and all(e["partial"] for e in copies)     # its history reached the fork: no whole copy


class TestDurableFailover:
    def test_promote_and_rewind_reach_the_files_and_cold_starts_load_the_new_history(self, make_pair):
        """With [durability] on both: an asynchronous failover (the old primary had transfers the new one never
        received), then power cuts. The promoted primary's cold start holds what it took after the promote; the
        rejoined, rewound old primary's cold start holds the new primary's history, not its own lost one."""
        pair = make_pair(mode="async", proxy=True, durable=True).start()
        load_bank(pair.a)
        with appliance.connect(pair.a.app.config) as db:
            for i in range(20):
                transfer(db, i, i + 1, 3, f"before-{i}")
        wait_for(lambda: pair.caught_up(pair.a, pair.b.name), 30, what="the secondary to catch up")
        pair.proxy.pause()
        with appliance.connect(pair.a.app.config) as db:
            for i in range(10):
                transfer(db, i, i + 7, 5, f"lost-{i}")
        pair.kill(pair.a)
        pair.proxy.drop()
        pair.proxy.resume()
        cli_json("promote", pair.b, "--yes")
        with appliance.connect(pair.b.app.config, timeout=5) as db:
            transfer(db, 3, 4, 9, "after-0")
            wait_checkpoint(db)                                  # the promote asked for one at once
            transfer(db, 5, 6, 2, "after-1")
        expect = bank_state(pair.b)
        assert {"after-0", "after-1"} <= expect[1] and not any(i.startswith("lost-") for i in expect[1])
        power_cut(pair.b)
        pair.b.app.controller.start()
        pair.b.agent.start()
        st = pair.status(pair.b)
        assert st["recovery"]["cold_start"]["checkpoint"] and st["role"] == "primary" and st["epoch"] == 2
        assert bank_state(pair.b) == expect

        pair.a.app.controller.start()
        pair.a.agent.start()
        rj = cli_json("rejoin", pair.a, "--yes")
        assert rj["rewound"]["transactions"] == 10
        wait_for(lambda: pair.caught_up(pair.b, pair.a.name), 60, what="the rejoined secondary to catch up")
        with appliance.connect(pair.a.app.config) as db:
            wait_checkpoint(db)                                  # the rewind asked for one
        assert bank_state(pair.a) == expect
        power_cut(pair.a)
        pair.a.app.controller.start()
        st = pair.status(pair.a)
        assert st["recovery"]["cold_start"]["checkpoint"] and st["role"] == "secondary"
        assert bank_state(pair.a) == expect


    def test_a_fenced_primary_stays_fenced_across_power_cuts(self, make_pair):
        """A durable primary fenced by an operator: the fence is in its files (a log record, then the
        checkpoint's header), so after a power cut its cold start still refuses writes."""
        pair = make_pair(mode="sync", durable=True).start()
        load_bank(pair.a)
        assert cli("fence", "--yes", "--epoch", "5", "--primary", pair.b.name,
                   "--config", str(pair.a.app.config)).returncode == 0
        for checkpoint_first in (False, True):
            if checkpoint_first:
                assert cli("checkpoint", "--config", str(pair.a.app.config)).returncode == 0
            power_cut(pair.a)
            pair.a.app.controller.start()
            st = pair.status(pair.a)
            assert st["recovery"]["cold_start"] and st["role"] == "primary"
            assert st["failover"]["fenced"] == {"epoch": 5, "by": pair.b.name}
            with appliance.connect(pair.a.app.config) as db:
                with pytest.raises(errors.NotPrimaryError):
                    db.table("accounts")[0] = {"branch": "x", "balance": 1}
                assert db.table("accounts")[1]["balance"] >= 0        # reads go on


def wait_checkpoint(db, timeout: float = 30.0) -> None:
    """Until status says a checkpoint was written and none is needed."""
    deadline = time.monotonic() + timeout
    while (st := db.status()["durability"])["needs_checkpoint"] or not st["last_checkpoint"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def power_cut(node) -> None:
    """Every process of the appliance killed, every segment gone: only the files remain."""
    node.agent.kill()
    node.app.controller.kill()
    unlink_all(node.app.name, node.app.cfg.storage.segments)


class TestLz4Secondary:
    def test_promote_decompresses_backup_blocks_into_primary_blocks(self, make_pair):
        """An lz4 secondary that serves no reads is promoted: its backup blocks become primary blocks ([0128]),
        clients read and write it at once, a restarted controller takes the decompressed segments, and the old
        primary rejoins it to end identical."""
        pair = make_pair(mode="sync", lz4=True).start()
        load_bank(pair.a)
        with appliance.connect(pair.a.app.config) as db:
            db.load("accounts", ({"id": 1000 + i, "branch": f"x{i % 13}", "balance": 0} for i in range(3000)))
            for i in range(30):
                transfer(db, i, 1000 + i, 7, f"z-{i}")
        before = bank_state(pair.a)
        with pytest.raises(errors.NotServingReadsError):
            appliance.connect(pair.b.app.config)
        pair.kill(pair.a)

        rep = cli_json("promote", pair.b, "--yes")
        x = rep["expanded"]
        assert x["blocks"] > 20 and x["bytes"] > 0
        assert bank_state(pair.b) == before                       # clients read it now, the same data
        with appliance.connect(pair.b.app.config, timeout=5) as db:
            assert len(db.table("accounts").find("branch", "x3")) == len([i for i in range(3000) if i % 13 == 3])
            db.load("accounts", ({"id": 9000 + i, "branch": "n", "balance": 0} for i in range(500)))
        st = pair.status(pair.b)
        assert not st["memory"]["compressed"] and st["role"] == "primary"
        pair.b.app.restart()                                      # the decompressed segments are its own now
        assert pair.status(pair.b)["role"] == "primary"

        pair.a.app.controller.start()
        pair.a.agent.start()
        cli_json("rejoin", pair.a, "--yes")
        wait_for(lambda: pair.caught_up(pair.b, pair.a.name), 60, what="the rejoined secondary to catch up")
        r = cli("verify", "--config", str(pair.b.app.config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert bank_state(pair.a) == bank_state(pair.b)


class TestOtherSecondaries:
    def test_a_secondary_ahead_of_the_new_primary_is_rewound_or_copied(self, make_pair):
        """Two more asynchronous secondaries, ahead of the one promoted (its link stalled): when the new
        primary connects, the one with a log history is rewound to the fork from its history (no whole copy),
        the one without is copied; both end identical to the new primary and accept only its newer epoch."""
        pair = make_pair(mode="async", proxy=True, others=(True, False)).start()
        c_hist, c_none = pair.others
        load_bank(pair.a)
        wait_for(lambda: all(pair.caught_up(pair.a, n.name) for n in pair.nodes[1:]), 30, what="catch-up")
        pair.proxy.pause()                                     # B stops receiving; C and D go on
        with appliance.connect(pair.a.app.config) as db:
            for i in range(25):
                transfer(db, i, i + 3, 2, f"ahead-{i}")
            db.load("accounts", ({"id": 50_000 + i, "branch": "late", "balance": 0} for i in range(300)))
        wait_for(lambda: all(pair.caught_up(pair.a, n.name) for n in pair.others), 30, what="C and D to catch up")
        pair.kill(pair.a)
        pair.proxy.drop()
        rep = cli_json("promote", pair.b, "--yes")
        with appliance.connect(pair.b.app.config, timeout=5) as db:
            transfer(db, 5, 6, 1, "new-0")
        for n in pair.others:
            wait_for(lambda: pair.caught_up(pair.b, n.name), 60, what=f"{n.name} to follow the new primary")
        res = cli_json("verify", pair.b, ok=False)["secondaries"]   # (the old primary is down: not compared)
        assert res[c_hist.name]["ok"] and res[c_none.name]["ok"], res
        assert res[pair.a.name]["error"] == "not streaming"
        for n in pair.others:
            assert bank_state(n) == bank_state(pair.b)
            assert pair.status(n)["epoch"] == 2
        rw = pair.status(c_hist)["failover"]["rewound"]
        assert rw["transactions"] == 26 and rw["from_serial"] == rep["serial"] + 1
        # its log history past the fork is the new primary's: the undone transactions are gone from it
        with appliance.connect(c_hist.app.config) as db:
            after = db.history(program="transfer", since=rep["serial"] + 1)["transactions"]
        assert [t["input"] for t in after] == [{"src": 5, "dst": 6, "amount": 1}]
        copies = [e for e in pair.b.agent.events() if e.get("event") == "copy_started"]
        assert {e["secondary"] for e in copies if not e["partial"]} == {c_none.name}


@pytest.fixture(scope="module")
def idle_pair(make_module_appliance, tmp_path_factory):
    """One running pair for the refusals below (they change nothing), shared by the module."""
    base = tmp_path_factory.mktemp("pair")
    p = Pair(make_module_appliance, base, mode="sync")
    try:
        yield p.start()
    finally:
        p.cleanup()


class TestRefusals:
    """Operations that do not fit the role are refused with a typed error, and change nothing."""

    def test_promote_of_a_primary_and_rejoin_of_a_secondary_are_refused(self, idle_pair):
        p = idle_pair
        r = cli("promote", "--yes", "--config", str(p.a.app.config))
        assert r.returncode == 1 and "is primary; this is for a secondary" in r.stderr
        r = cli("rejoin", "--yes", "--no-wait", "--config", str(p.b.app.config))
        assert r.returncode == 1 and "is secondary; this is for a primary" in r.stderr
        assert (Pair.status(p.a)["role"], Pair.status(p.b)["role"]) == ("primary", "secondary")
        assert Pair.status(p.a)["epoch"] == Pair.status(p.b)["epoch"] == 1

    def test_fence_with_an_epoch_not_newer_is_refused_and_writes_go_on(self, idle_pair):
        p = idle_pair
        r = cli("fence", "--yes", "--epoch", "1", "--config", str(p.a.app.config))
        assert r.returncode == 1 and "not newer than this appliance's epoch 1" in r.stderr
        assert cli("fence", "--yes", "--epoch", "soon", "--config", str(p.a.app.config)).returncode == 2
        assert Pair.status(p.a)["failover"]["fenced"] is None
        with appliance.connect(p.a.app.config, timeout=5) as db:
            db.table("accounts")[1] = {"branch": "a", "balance": 1}
            assert db.table("accounts")[1]["balance"] == 1

    def test_the_agent_only_requests_are_refused_to_a_client(self, idle_pair):
        from appliance.client.session import Session
        from appliance.wire import messages as m
        cfg = idle_pair.b.app.cfg
        s = Session(str(cfg.socket_path), cfg.name, timeout=5)
        s.connect()
        try:
            for req in ([m.OP_REWIND, 0, None, 1], [m.OP_EPOCH, 9]):
                with pytest.raises(errors.AccessDeniedError, match="only the appliance's replication agent"):
                    s.call(req, "raw")
        finally:
            s.close()
        assert Pair.status(idle_pair.b)["epoch"] == 1
