"""Optimistic transactions: a get for update reads in shared memory and sends
its lock pipelined with the bytes it read (OP_LOCK_CHECKED).

What the README's "Optimistic transactions" promises, against a real
controller: a transfer is one request and leaves the same records and change
log as the same transfer locking as it reads; a record another transaction
changed between the read and the lock cancels the transaction with
StaleReadError, at commit or at the next statement that waits, nothing of it
committed and its locks released; a lock that waits compares after the wait;
concurrent transfers that retry keep the total; bad input to the new request
is refused and changes nothing.

One controller serves the whole module; each test resets the accounts.
"""
from __future__ import annotations

import random
import threading
import time

import msgpack
import pytest

import appliance
from appliance import errors
from appliance.store.changelog import bounds, read_entries
from appliance.wire import messages as m

from conftest import Appliance
from fault_helpers import RawConn
from test_client import acct
from test_pipeline import KEYS, concurrent_transfers, reset


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = Appliance(tmp_path_factory.mktemp("optimistic")).start()
    yield a
    a.cleanup()


@pytest.fixture
def db(app):
    c = appliance.connect(app.config)
    yield c
    c.close()


@pytest.fixture
def other(app):
    """A second client: the other transaction."""
    c = appliance.connect(app.config)
    yield c
    c.close()


@pytest.fixture
def accounts(db):
    """accounts 1..10, balance 100 each; nothing else."""
    return reset(db.table("accounts"))


def status(db) -> dict:
    return db.status()["transactions"]


def transfer(tx, src: int, dst: int, amount: int) -> None:
    a = tx.get("accounts", src, for_update=True)
    b = tx.get("accounts", dst, for_update=True)
    tx.update("accounts", src, {"balance": a["balance"] - amount})
    tx.update("accounts", dst, {"balance": b["balance"] + amount})


class TestOneRoundTrip:
    def test_a_transfer_is_one_request(self, db, accounts):
        """Two gets for update, two updates and the commit reach the controller as one request; the
        gets return the records as committed."""
        before = db.status()["clients"]["requests"]
        with db.transaction(program="transfer", optimistic=True) as tx:
            a = tx.get("accounts", 1, for_update=True)
            b = tx.get("accounts", 2, for_update=True)
            assert (a, b) == (acct(1, "main", 100), acct(2, "main", 100))
            tx.update("accounts", 1, {"balance": a["balance"] - 30})
            tx.update("accounts", 2, {"balance": b["balance"] + 30})
        assert db.status()["clients"]["requests"] - before == 2    # the transaction, and this status
        assert tx.state == "committed" and tx.result["txn"] == tx.number
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (70, 130)
        assert status(db)["locks_held"] == 0

    def test_the_same_records_and_change_log_as_locking_reads(self, db, accounts):
        """The same transfers, optimistic and locking as they read, from the same state: the same
        records and the same change-log entries (T log, kinds, files, keys, A and B images)."""
        rng = random.Random(5)
        plan = [(*rng.sample(list(KEYS), 2), rng.randrange(1, 30)) for _ in range(10)]
        outcome = {}
        for optimistic in (False, True):
            for k in KEYS:
                accounts[k] = acct(k, "main", 100)
            start = bounds(db._reader)["head"]
            for src, dst, amount in plan:
                with db.transaction(program="transfer", input=[src, dst, amount], optimistic=optimistic) as tx:
                    transfer(tx, src, dst, amount)
            log = [(e.kind_name, e.file, e.key, e.a, e.b) for e in read_entries(db._reader, start)]
            outcome[optimistic] = (dict(accounts.items()), log)
        assert outcome[True] == outcome[False]
        data, log = outcome[True]
        assert sum(r["balance"] for r in data.values()) == 100 * len(KEYS)
        assert [msgpack.unpackb(a) for kind, _, _, a, _ in log if kind == "begin"] == \
            [["transfer", list(p)] for p in plan]

    def test_a_record_it_wrote_is_read_from_the_controller(self, db, accounts):
        """A get for update of a record the transaction wrote waits for the controller and returns
        the transaction's own version of it, not the committed one."""
        with db.transaction(optimistic=True) as tx:
            assert tx.get("accounts", 3, for_update=True)["balance"] == 100
            tx.update("accounts", 3, {"balance": 7})
            assert tx.get("accounts", 3, for_update=True)["balance"] == 7
            assert accounts[3]["balance"] == 100       # not committed yet
        assert accounts[3]["balance"] == 7

    def test_a_missing_record_reads_none_and_can_be_inserted(self, db, accounts):
        with db.transaction(optimistic=True) as tx:
            assert tx.get("accounts", 50, for_update=True) is None
            tx.insert("accounts", acct(50, "new", 1))
        assert accounts[50] == acct(50, "new", 1)

    def test_optimistic_must_be_a_bool(self, app, db):
        with pytest.raises(errors.WrongTypeError, match="optimistic"):
            db.transaction(optimistic="yes")
        with pytest.raises(errors.WrongTypeError, match="optimistic"):
            appliance.connect(app.config, optimistic=1)

    def test_the_clients_default(self, app, accounts):
        """connect(optimistic=True): its transactions are optimistic unless one says otherwise."""
        c = appliance.connect(app.config, optimistic=True)
        try:
            for optimistic, requests in ((None, 1), (False, 6)):   # locking, not pipelined: BEGIN .. COMMIT
                before = c.status()["clients"]["requests"]
                with c.transaction(optimistic=optimistic) as tx:
                    transfer(tx, 1, 2, 1)
                assert tx.optimistic is (optimistic is None)
                assert c.status()["clients"]["requests"] - before == requests + 1     # and this status
        finally:
            c.close()
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (98, 102)


class TestStaleRead:
    def test_changed_before_commit(self, db, other, accounts):
        """Another transaction changes a record after this one read it: commit raises StaleReadError
        naming the get, nothing of this transaction is committed, its locks are released, the
        status counts it, and the connection goes on."""
        stale0 = status(db)["cancelled_by_reason"]["stale_read"]
        tx = db.transaction(program="transfer", optimistic=True)
        a = tx.get("accounts", 1, for_update=True)
        b = tx.get("accounts", 2, for_update=True)
        other.table("accounts")[2] = acct(2, "main", 500)
        tx.update("accounts", 1, {"balance": a["balance"] - 10})
        tx.update("accounts", 2, {"balance": b["balance"] + 10})
        with pytest.raises(errors.StaleReadError) as ei:
            tx.commit()
        assert isinstance(ei.value, errors.TransactionCancelledError)
        assert ei.value.details["statement"] == 2 and ei.value.details["key"] == 2
        assert "accounts.get(2)" in ei.value.message and "changed by another transaction" in ei.value.message
        assert tx.state == "cancelled"
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (100, 500)
        st = status(db)
        assert st["locks_held"] == 0 and st["cancelled_by_reason"]["stale_read"] == stale0 + 1
        with db.transaction(optimistic=True) as tx2:           # run again: it sees the new balance
            transfer(tx2, 1, 2, 10)
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (90, 510)

    def test_a_record_inserted_after_it_read_none(self, db, other, accounts):
        """A get for update that found no record, and another transaction inserts it: the
        transaction is cancelled with StaleReadError (not a duplicate key from its own insert)."""
        tx = db.transaction(optimistic=True)
        assert tx.get("accounts", 60, for_update=True) is None
        other.table("accounts")[60] = acct(60, "theirs", 1)
        tx.insert("accounts", acct(60, "mine", 2))
        with pytest.raises(errors.StaleReadError):
            tx.commit()
        assert accounts[60] == acct(60, "theirs", 1)

    def test_raised_at_the_next_statement_that_waits(self, db, other, accounts):
        """The held statements go ahead of a statement that waits for its reply: the stale read is
        raised there, the rest is not carried out, and the transaction is over on both sides."""
        tx = db.transaction(optimistic=True)
        tx.get("accounts", 4, for_update=True)
        other.table("accounts")[4] = acct(4, "main", 1)
        tx.update("accounts", 5, {"balance": 0})
        with pytest.raises(errors.StaleReadError) as ei:
            tx.get("accounts", 5, for_update=True)          # one it wrote: asks the controller
        assert ei.value.details["statement"] == 1
        assert tx.state == "cancelled"
        with pytest.raises(errors.TransactionStateError):
            tx.commit()
        assert (accounts[4]["balance"], accounts[5]["balance"]) == (1, 100)
        assert status(db)["locks_held"] == 0
        with db.transaction(optimistic=True) as tx2:
            transfer(tx2, 4, 5, 1)
        assert (accounts[4]["balance"], accounts[5]["balance"]) == (0, 101)

    def test_compared_after_a_lock_wait(self, app, db, other, accounts):
        """The lock is another transaction's when the optimistic commit arrives: it waits for it, and
        compares what that transaction committed."""
        holder = other.transaction(pipeline=False)
        holder.get("accounts", 6, for_update=True)
        tx = db.transaction(optimistic=True)
        before = tx.get("accounts", 6, for_update=True)
        tx.update("accounts", 6, {"balance": before["balance"] + 1})

        def change() -> None:
            holder.update("accounts", 6, {"balance": 42})
            holder.commit()

        out = commit_while_waiting(db, tx, change)
        assert isinstance(out, errors.StaleReadError), out
        assert accounts[6]["balance"] == 42 and status(db)["locks_held"] == 0

    def test_unchanged_after_a_lock_wait_commits(self, db, other, accounts):
        """The holder ends without changing the record: the optimistic transaction commits over it."""
        holder = other.transaction(pipeline=False)
        holder.get("accounts", 7, for_update=True)
        tx = db.transaction(optimistic=True)
        before = tx.get("accounts", 7, for_update=True)
        tx.update("accounts", 7, {"balance": before["balance"] + 1})
        out = commit_while_waiting(db, tx, holder.cancel)
        assert isinstance(out, dict) and tx.state == "committed", out
        assert accounts[7]["balance"] == 101


def commit_while_waiting(db, tx, then):
    """Commit `tx` in a thread; once its commit waits for a record lock (status
    transactions.lock_waits grew), call then(). Returns what the commit returned or raised."""
    out: list = []
    start = status(db)["lock_waits"]

    def commit() -> None:
        try:
            out.append(tx.commit())
        except BaseException as e:    # returned to the test's thread
            out.append(e)

    t = threading.Thread(target=commit)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while status(db)["lock_waits"] == start:
            assert time.monotonic() < deadline, "the commit did not wait for the lock"
            time.sleep(0.01)
        then()
    finally:
        t.join(30)
    assert len(out) == 1, "the commit did not end"
    return out[0]


class TestConcurrent:
    def test_transfers_that_run_again_keep_the_total(self, app, accounts):
        """Four threads of optimistic transfers over ten accounts, each running a cancelled transfer
        again: every transfer commits once and the total is kept."""
        retried = concurrent_transfers(app, accounts, {"optimistic": True}, errors.TransactionCancelledError)
        assert set(retried) <= {"StaleReadError", "DeadlockError"}


class TestRun:
    """db.run(program, optimistic=True, retries=n): a program run again when it is cancelled."""

    @pytest.fixture
    def interfere(self, other, accounts):
        import bank_programs
        state = bank_programs.INTERFERE
        t = other.table("accounts")

        def bump() -> None:
            t[9] = acct(9, "main", t[9]["balance"] + 1000)
        state.update(fn=bump, left=0, calls=0)
        yield state
        state.update(fn=None, left=0, calls=0)

    def test_a_stale_read_runs_it_again(self, db, accounts, interfere):
        """The first call's read goes stale: the program runs again, sees the other change and
        commits once; last_run says two attempts."""
        interfere["left"] = 1
        assert db.run("bank_programs:interfere", {"account": 9, "amount": 5}, optimistic=True, retries=3) == 1105
        assert interfere["calls"] == 2 and db.last_run["attempts"] == 2
        assert accounts[9]["balance"] == 1105

    def test_retries_run_out(self, db, accounts, interfere):
        """Stale on every call and one retry: StaleReadError after two calls; only the other
        client's changes remain."""
        interfere["left"] = 5
        with pytest.raises(errors.StaleReadError):
            db.run("bank_programs:interfere", {"account": 9, "amount": 5}, optimistic=True, retries=1)
        assert interfere["calls"] == 2 and accounts[9]["balance"] == 2100

    def test_no_retries_by_default(self, db, accounts, interfere):
        interfere["left"] = 1
        with pytest.raises(errors.StaleReadError):
            db.run("bank_programs:interfere", {"account": 9, "amount": 5}, optimistic=True)
        assert interfere["calls"] == 1

    @pytest.mark.parametrize("bad", [-1, 1.5, "2", None])
    def test_bad_retries(self, db, bad):
        with pytest.raises(errors.WrongTypeError, match="retries"):
            db.run("bank_programs:deposit", {"account": 1, "amount": 1}, retries=bad)


class TestProtocol:
    @pytest.mark.parametrize("expected", [12, "text", [1], {"balance": 1}])
    def test_expected_must_be_bytes_or_nil(self, app, accounts, expected):
        """OP_LOCK_CHECKED whose expected bytes are another type: APL_ETYPE naming it, nothing locked,
        the transaction open and the connection serving."""
        with RawConn(app.cfg.socket_path) as c:
            c.hello()
            assert c.request([m.OP_BEGIN, None, None])[0] == m.OK
            r = c.request([m.OP_LOCK_CHECKED, "accounts", 1, expected])
            assert r[:2] == [m.ERR, "APL_ETYPE"] and "expected" in r[2], r
            st = c.request([m.OP_STATUS])[1]["transactions"]
            assert st["locks_held"] == 0
            assert c.request([m.OP_COMMIT])[0] == m.OK

    def test_atomic_with_a_stale_step(self, app, db, accounts):
        """An OP_ATOMIC whose checked lock does not match: APL_ESTALEREAD with the step's index
        (pipelined), no step carried out, no lock left."""
        with RawConn(app.cfg.socket_path) as c:
            c.hello()
            r = c.request([m.OP_ATOMIC, None, None,
                           [[m.OP_UPDATE, "accounts", 8, {"balance": 1}],
                            [m.OP_LOCK_CHECKED, "accounts", 9, b"not what it holds"],
                            [m.OP_UPDATE, "accounts", 9, {"balance": 2}]], {"pipeline": True}])
            assert r[0] == m.OK and isinstance(r[1], int)          # its number first
            r = c.reader.read()
            assert r[:2] == [m.ERR, "APL_ESTALEREAD"] and r[3]["step"] == 1, r
        assert (accounts[8]["balance"], accounts[9]["balance"]) == (100, 100)
        assert status(db)["locks_held"] == 0

    def test_atomic_with_matching_bytes_commits(self, app, db, accounts):
        """The bytes a client read (the stored image, as get_raw returns it) match: it commits."""
        t = db.schema.table("accounts")
        raw = db._reader.get_raw(t.file, t.key(9))
        with RawConn(app.cfg.socket_path) as c:
            c.hello()
            r = c.request([m.OP_ATOMIC, None, None,
                           [[m.OP_LOCK_CHECKED, "accounts", 9, raw], [m.OP_LOCK_CHECKED, "accounts", 70, None],
                            [m.OP_UPDATE, "accounts", 9, {"balance": 3}]]])
            assert r[0] == m.OK and r[1]["results"] == [None, None, None], r
        assert accounts[9]["balance"] == 3 and 70 not in accounts
