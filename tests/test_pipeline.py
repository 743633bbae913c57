"""Pipelined transactions: writes sent without waiting for their replies.

What the README's "Pipelined statements" promises, against a real controller:
a failed write is raised later (the next get that asks the controller, a
later statement once its reply is in, or commit) naming the statement; it
rolls the transaction back, so the statements behind it are not carried out
and the commit is refused; cancel ends it; a pipelined transaction leaves
the same data and the same change log as the same one not pipelined; and no
more replies are left unread than the pipeline depth, on either side.

One controller serves the whole module (lock_timeout 2 s); each test resets
the accounts it uses.
"""
from __future__ import annotations

import gc
import random
import threading

import msgpack
import pytest

import appliance
from appliance import errors
from appliance.store.changelog import bounds, read_entries
from appliance.wire import framing
from appliance.wire import messages as m

from conftest import Appliance
from fault_helpers import RawConn
from test_client import acct

KEYS = range(1, 11)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = Appliance(tmp_path_factory.mktemp("pipeline")).start()
    yield a
    a.cleanup()


@pytest.fixture
def db(app):
    c = appliance.connect(app.config, pipeline=True)
    yield c
    c.close()


@pytest.fixture
def accounts(db):
    """accounts 1..10, branch "main", balance 100 each; nothing else."""
    return reset(db.table("accounts"))


def reset(t):
    """accounts 1..10 as the fixture makes them, anything else removed."""
    for k in list(t):
        if k not in KEYS:
            del t[k]
    for k in KEYS:
        t[k] = acct(k, "main", 100)
    return t


def balances(t) -> dict:
    return {k: t[k]["balance"] for k in KEYS}


def locks_held(db) -> int:
    return db.status()["transactions"]["locks_held"]


class TestFailureSurfaces:
    def test_at_the_next_get_for_update_naming_the_statement(self, db, accounts):
        """A failed pipelined update is raised by the next get(for_update) as its own class, naming
        its position, op, table and key; the transaction is then "failed" and rolled back."""
        tx = db.transaction(program="t")
        tx.update("accounts", 1, {"balance": 1})          # statement 1
        tx.get("accounts", 2)                              # statement 2: plain, reads shared memory
        tx.update("accounts", 99, {"balance": 1})          # statement 3: no such record
        with pytest.raises(errors.NoSuchRecordError) as ei:
            tx.get("accounts", 4, for_update=True)
        e = ei.value
        assert e.details["statement"] == 3 and e.details["op"] == "update"
        assert e.details["table"] == "accounts" and e.details["key"] == 99 and e.details["txn"] == tx.number
        assert f"accounts.update(99) (statement 3 of transaction {tx.number}, pipelined)" in str(e)
        assert "rolled back" in str(e) and "no such record" in str(e)
        assert tx.state == "failed"
        assert locks_held(db) == 0                         # record 1's lock went with the rollback
        tx.cancel()
        assert balances(accounts) == dict.fromkeys(KEYS, 100)

    def test_at_commit_sent_right_behind(self, db, accounts):
        """update, failing update, update, commit: the commit raises the failure and nothing commits."""
        before = bounds(db._reader)
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": 1})
        tx.insert("accounts", acct(2))                      # duplicate primary key
        tx.update("accounts", 3, {"balance": 3})
        with pytest.raises(errors.DuplicateKeyError) as ei:
            tx.commit()
        assert (ei.value.details["statement"], ei.value.details["op"], ei.value.details["key"]) == (2, "insert", 2)
        assert tx.state == "failed" and tx.result is None
        assert balances(accounts) == dict.fromkeys(KEYS, 100)
        assert bounds(db._reader) == before                 # nothing reached the change log

    def test_at_a_later_statement_once_its_reply_is_in(self, db, accounts):
        """Once the failure's reply has been read (here by a status request of the same thread),
        the next statement raises it at once, pipelined or not, and is not sent."""
        tx = db.transaction()
        tx.delete("accounts", 77)
        assert tx.number is not None                        # sends the held BEGIN and delete, reads BEGIN's reply
        db.status()                                         # reads the delete's reply on the way
        with pytest.raises(errors.NoSuchRecordError, match=r"accounts\.delete\(77\) \(statement 1 "):
            tx.update("accounts", 1, {"balance": 5})
        assert tx.state == "failed" and accounts[1]["balance"] == 100

    @pytest.mark.parametrize("stmt, exc, op", [
        (lambda tx: tx.update("accounts", 1, {"balance": "x"}), errors.WrongTypeError, "update"),
        (lambda tx: tx.update("accounts", 1, {"colour": "red"}), errors.NoSuchFieldError, "update"),
        (lambda tx: tx.insert("accounts", {"id": 70}), errors.WrongTypeError, "insert"),
        (lambda tx: tx.put("accounts", 5, acct(6)), errors.WrongTypeError, "put"),
        (lambda tx: tx.delete("accounts", 50), errors.NoSuchRecordError, "delete"),
    ], ids=["wrong-type", "unknown-field", "missing-field", "put-pk-mismatch", "delete-missing"])
    def test_each_kind_of_write_error(self, db, accounts, stmt, exc, op):
        """Every kind of statement error comes back as its own class from the commit, naming the statement."""
        with pytest.raises(exc) as ei:
            with db.transaction() as tx:
                tx.update("accounts", 2, {"balance": 2})
                stmt(tx)
        assert ei.value.details["statement"] == 2 and ei.value.details["op"] == op
        assert tx.state == "cancelled"                      # the with block cancelled the failed transaction
        assert balances(accounts) == dict.fromkeys(KEYS, 100)

    def test_a_failed_begin(self, db, accounts):
        """A BEGIN refused (its T log too large for the change log) sent with a pipelined write: the
        commit raises the BEGIN's own error, and the write, which had no transaction, changed nothing."""
        tx = db.transaction(program="big", input="x" * (2 << 20))
        tx.update("accounts", 1, {"balance": 1})
        with pytest.raises(errors.RecordTooLargeError, match="begin of a pipelined transaction: .*none of its "
                                                             "statements was carried out") as ei:
            tx.commit()
        assert ei.value.details["statement"] == 0 and tx.number is None and tx.state == "failed"
        tx.cancel()
        assert accounts[1]["balance"] == 100
        with db.transaction() as t2:                         # the connection serves on
            t2.update("accounts", 1, {"balance": 2})
        assert accounts[1]["balance"] == 2

    def test_errors_the_client_sees_itself_are_raised_at_once(self, db, accounts):
        """An unknown table and a value the wire cannot carry are raised by the statement itself,
        before anything is sent: the transaction stays open and commits the rest."""
        with db.transaction() as tx:
            tx.update("accounts", 1, {"balance": 1})
            with pytest.raises(errors.NoSuchTableError):
                tx.update("nosuch", 1, {"balance": 1})
            with pytest.raises(errors.WrongTypeError, match="field 'balance'"):
                tx.update("accounts", 2, {"balance": 1 << 70})
            assert tx.state == "open"
            tx.update("accounts", 3, {"balance": 3})
        assert tx.state == "committed"
        assert (accounts[1]["balance"], accounts[2]["balance"], accounts[3]["balance"]) == (1, 100, 3)

    def test_failed_get_for_update_leaves_it_open(self, db, accounts):
        """A get waits for its reply, so its own error leaves a pipelined transaction open, as in any transaction."""
        with db.transaction() as tx:
            tx.update("accounts", 1, {"balance": 1})
            with pytest.raises(errors.WrongTypeError):
                tx.get("accounts", "one", for_update=True)
            assert tx.state == "open"
            tx.update("accounts", 2, {"balance": 2})
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (1, 2)

    def test_lock_timeout_of_a_pipelined_update(self, app, db, accounts):
        """A pipelined update that waits past lock_timeout: LockTimeoutError at commit, naming the
        statement; the transaction is cancelled (retry it), the holder keeps its lock."""
        holder = appliance.connect(app.config)
        try:
            th = holder.transaction(pipeline=False)
            th.get("accounts", 5, for_update=True)
            tx = db.transaction()
            tx.update("accounts", 4, {"balance": 4})
            tx.update("accounts", 5, {"balance": 5})        # waits for the holder's lock
            tx.update("accounts", 6, {"balance": 6})
            with pytest.raises(errors.LockTimeoutError) as ei:
                tx.commit()
            assert isinstance(ei.value, errors.TransactionCancelledError)
            assert ei.value.details["statement"] == 2 and ei.value.details["key"] == 5
            assert tx.state == "cancelled" and locks_held(db) == 1
            th.cancel()
        finally:
            holder.close()
        assert balances(accounts) == dict.fromkeys(KEYS, 100)


class TestAfterAFailure:
    def test_later_statements_are_not_carried_out(self, db, accounts):
        """Statements sent behind a failed one take no lock and change nothing: seen by a status
        request the controller runs after all of them, before the failure is raised."""
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": 1})
        tx.update("accounts", 99, {"balance": 1})           # fails: rolls the transaction back
        tx.update("accounts", 2, {"balance": 2})
        tx.insert("accounts", acct(50))
        tx.delete("accounts", 3)
        tx.put("accounts", 4, acct(4, "x", 4))
        st = db.status()["transactions"]                    # the same connection: after those six
        assert (st["locks_held"], st["active"]) == (0, 0), st
        assert tx.state == "open"                           # not raised yet: that is for the next statement
        other = appliance.connect(db.config)
        try:
            with other.transaction(pipeline=False) as t2:    # every record it touched is free at once
                for k in (1, 2, 3, 4):
                    t2.get("accounts", k, for_update=True)
                assert t2.get("accounts", 50, for_update=True) is None
        finally:
            other.close()
        with pytest.raises(errors.NoSuchRecordError):
            tx.commit()
        assert balances(accounts) == dict.fromkeys(KEYS, 100) and 50 not in accounts

    def test_statements_and_commit_of_a_failed_transaction_are_refused(self, db, accounts):
        """After the failure was raised: every statement and commit raise TransactionStateError
        naming the failed statement; leaving the block normally raises it too."""
        with pytest.raises(errors.TransactionStateError, match=r"failed: accounts\.update\(99\) \(statement 1"):
            with db.transaction() as tx:
                tx.update("accounts", 99, {"balance": 1})
                with pytest.raises(errors.NoSuchRecordError):
                    tx.get("accounts", 1, for_update=True)
                for stmt in (lambda: tx.update("accounts", 1, {"balance": 1}), lambda: tx.get("accounts", 1),
                             lambda: tx.insert("accounts", acct(60)), lambda: tx.commit()):
                    with pytest.raises(errors.TransactionStateError, match="cancel it") as ei:
                        stmt()
                    assert ei.value.details["statement"] == 1 and ei.value.details["key"] == 99
                    assert tx.state == "failed"
        assert balances(accounts) == dict.fromkeys(KEYS, 100) and 60 not in accounts

    def test_cancel_ends_it_and_the_connection_goes_on(self, db, accounts):
        """cancel() of a failed transaction, and of one whose failure was never read: both end
        "cancelled" without raising; the next transaction on the same connection commits."""
        tx = db.transaction()
        tx.update("accounts", 99, {"balance": 1})
        with pytest.raises(errors.NoSuchRecordError):
            tx.commit()
        tx.cancel()
        assert tx.state == "cancelled"
        unread = db.transaction()
        unread.update("accounts", 1, {"balance": 1})
        unread.update("accounts", 98, {"balance": 1})
        unread.cancel()                                      # the failure is discarded with the rest
        assert unread.state == "cancelled"
        with db.transaction() as t3:
            a = t3.get("accounts", 1, for_update=True)
            t3.update("accounts", 1, {"balance": a["balance"] + 1})
        assert t3.state == "committed" and accounts[1]["balance"] == 101
        st = db.status()["transactions"]
        assert st["locks_held"] == 0 and st["active"] == 0

    def test_the_controller_answers_each_request_in_order(self, app):
        """On the wire: BEGIN {"pipeline": true}, a failing UPDATE, an UPDATE, a PUT and COMMIT in one
        send get five replies in order: the number, the update's own error, then APL_ETXN for the
        three not carried out, each saying why; then CANCEL, and a new BEGIN works."""
        reqs = [[m.OP_BEGIN, "raw", None, {"pipeline": True}], [m.OP_UPDATE, "accounts", 404, {"balance": 1}],
                [m.OP_UPDATE, "accounts", 1, {"balance": 1}], [m.OP_PUT, "accounts", 2, acct(2)],
                [m.OP_COMMIT]]
        with RawConn(app.cfg.socket_path) as c:
            c.hello()
            c.send(framing.encode_many(reqs))
            replies = [c.reader.read() for _ in reqs]
            assert replies[0][0] == m.OK and isinstance(replies[0][1], int)
            assert replies[1][:2] == [m.ERR, "APL_NOTFOUND"]
            for r in replies[2:]:
                assert r[:2] == [m.ERR, "APL_ETXN"], r
                assert f"transaction {replies[0][1]} was rolled back when a pipelined statement failed " \
                       "(accounts.update(404): no such record)" in r[2]
            assert c.request([m.OP_CANCEL]) == [m.OK, None]
            assert c.request([m.OP_UPDATE, "accounts", 1, {"balance": 1}])[1] == "APL_ETXN"   # none open
            assert c.request([m.OP_BEGIN, "raw", None, {"pipeline": True}])[0] == m.OK
            assert c.request([m.OP_CANCEL]) == [m.OK, None]

    @pytest.mark.parametrize("options", [[], {"pipeline": 1}, {"pipeline": True, "x": 1}])
    def test_bad_begin_options_are_refused(self, app, options):
        """BEGIN options other than nil or {"pipeline": bool}: APL_EPROTO naming them; no transaction begins."""
        with RawConn(app.cfg.socket_path) as c:
            c.hello()
            r = c.request([m.OP_BEGIN, None, None, options])
            assert r[:2] == [m.ERR, "APL_EPROTO"] and "options" in r[2], r
            assert c.request([m.OP_COMMIT])[1] == "APL_ETXN"


    @pytest.mark.parametrize("options", [{"pipeline": 1}, {"pipeline": "yes", "durability": "local"}])
    def test_bad_atomic_pipeline_option_is_refused(self, app, accounts, options):
        """OP_ATOMIC whose pipeline option is not a bool: one APL_EPROTO answer naming it; nothing
        begins, nothing changes, the connection serves on."""
        with RawConn(app.cfg.socket_path) as c:
            c.hello()
            r = c.request([m.OP_ATOMIC, None, None, [[m.OP_UPDATE, "accounts", 1, {"balance": 5}]], options])
            assert r[:2] == [m.ERR, "APL_EPROTO"] and "pipeline" in r[2], r
            assert c.request([m.OP_COMMIT])[1] == "APL_ETXN"
        assert accounts[1]["balance"] == 100


class TestSameOutcome:
    def _transfers(self, db, pipeline: bool, plan) -> list:
        done = []
        for src, dst, amount in plan:
            with db.transaction(program="transfer", input={"src": src, "dst": dst, "amount": amount},
                                pipeline=pipeline) as tx:
                a = tx.get("accounts", src, for_update=True)
                b = tx.get("accounts", dst, for_update=True)
                tx.update("accounts", src, {"balance": a["balance"] - amount})
                tx.update("accounts", dst, {"balance": b["balance"] + amount})
                tx.put("accounts", 20 + src, acct(20 + src, "log", amount))
                if amount % 3 == 0:
                    tx.delete("accounts", 20 + src)
            done.append(tx.result)
        return done

    def _log(self, db, start: int) -> list:
        """The change-log entries since `start`, without what differs between two runs of the same work."""
        return [(e.kind_name, e.file, e.key, e.a, e.b) for e in read_entries(db._reader, start)]

    def test_transfers_leave_the_same_data_and_change_log(self, db, accounts):
        """The same transfers, pipelined and not, from the same state: the same records and the same
        change-log entries (T log, kinds, files, keys, A and B images)."""
        rng = random.Random(11)
        plan = [(*rng.sample(list(KEYS), 2), rng.randrange(1, 30)) for _ in range(12)]
        outcome = {}
        for pipeline in (False, True):
            reset(accounts)
            start = bounds(db._reader)["head"]
            results = self._transfers(db, pipeline, plan)
            assert all(isinstance(r["serial"], int) for r in results)
            outcome[pipeline] = (dict(accounts.items()), self._log(db, start))
        assert outcome[True] == outcome[False]
        data, log = outcome[True]
        assert sum(data[k]["balance"] for k in KEYS) == 100 * len(KEYS)
        begins = [msgpack.unpackb(a) for kind, _, _, a, _ in log if kind == "begin"]
        assert begins == [["transfer", {"src": s, "dst": d, "amount": x}] for s, d, x in plan]

    def test_concurrent_pipelined_transfers_keep_the_total(self, app, accounts):
        """Four threads of pipelined transfers (retrying deadlock victims) keep the sum of the balances."""
        retried = concurrent_transfers(app, accounts, {"pipeline": True}, errors.DeadlockError)
        assert set(retried) <= {"DeadlockError"}


def concurrent_transfers(app, accounts, options: dict, retry_on) -> list[str]:
    """Four threads (a connection each) of 40 transfers of 1 over accounts 1..10, each
    transfer a transaction opened with `options` and run again on `retry_on`: every
    transfer commits once and the sum of the balances is kept. Returns the names of
    the errors retried."""
    failures, committed, retried = [], [], []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        c = appliance.connect(app.config)
        try:
            for _ in range(40):
                src, dst = rng.sample(list(KEYS), 2)
                while True:
                    try:
                        with c.transaction(program="transfer", **options) as tx:
                            a = tx.get("accounts", src, for_update=True)
                            b = tx.get("accounts", dst, for_update=True)
                            tx.update("accounts", src, {"balance": a["balance"] - 1})
                            tx.update("accounts", dst, {"balance": b["balance"] + 1})
                        committed.append(tx.number)
                        break
                    except retry_on as e:
                        retried.append(type(e).__name__)
        except BaseException as e:  # reported by the main thread
            failures.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert len(committed) == 160 and len(set(committed)) == 160
    assert sum(balances(accounts).values()) == 100 * len(KEYS)
    return retried


class TestApi:
    def test_put_returns_none_and_number_is_known(self, db, accounts):
        """A pipelined put returns None (it does not wait to know); tx.number reads the BEGIN's reply."""
        with db.transaction() as tx:
            assert tx.put("accounts", 30, acct(30, "p", 30)) is None
            assert isinstance(tx.number, int)
            assert tx.put("accounts", 1, acct(1, "p", 1)) is None
        assert tx.result["txn"] == tx.number and accounts[30] == acct(30, "p", 30)

    def test_pipeline_false_waits_for_every_statement(self, db, accounts):
        """transaction(pipeline=False) on a pipelining client: errors at the statement, the transaction
        stays open, put says "insert" or "update"."""
        with db.transaction(pipeline=False) as tx:
            with pytest.raises(errors.NoSuchRecordError):
                tx.update("accounts", 99, {"balance": 1})
            assert tx.state == "open"
            assert tx.put("accounts", 31, acct(31)) == "insert"
        assert 31 in accounts

    def test_one_open_transaction_per_thread_connection(self, app, accounts):
        """A second transaction begun on a thread whose connection has one open is refused before
        anything is sent, pipelined or not: its statement never lands in the first one."""
        for pipeline in (False, True):
            c = appliance.connect(app.config, pipeline=pipeline)
            try:
                first = c.transaction()
                first.update("accounts", 1, {"balance": 11})
                second = c.transaction()
                with pytest.raises(errors.TransactionStateError, match="still open on this thread's connection"):
                    second.update("accounts", 2, {"balance": 22})
                assert second.state == "new"
                first.commit()
                second.update("accounts", 2, {"balance": 22})
                second.commit()
                assert (accounts[1]["balance"], accounts[2]["balance"]) == (11, 22)
                assert accounts.get(2) == acct(2, "main", 22)
            finally:
                c.close()
            accounts[1], accounts[2] = acct(1, "main", 100), acct(2, "main", 100)

    @pytest.mark.parametrize("bad", [0, m.MAX_PIPELINED + 1, "8", 2.0])
    def test_bad_pipeline_depth_is_refused_at_connect(self, app, bad):
        with pytest.raises(errors.WrongTypeError, match="pipeline_depth"):
            appliance.connect(app.config, pipeline_depth=bad)

    def test_bad_pipeline_flag_is_refused(self, app, db):
        with pytest.raises(errors.WrongTypeError, match="pipeline must be True or False"):
            appliance.connect(app.config, pipeline="yes")
        with pytest.raises(errors.WrongTypeError, match="pipeline must be True or False"):
            db.transaction(pipeline=1)

    def test_dropped_with_replies_unread_is_cancelled(self, db, accounts):
        """A pipelined transaction dropped with replies still unread is cancelled at collection:
        its locks are released and its connection serves on."""
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": -1})
        tx.update("accounts", 2, {"balance": -1})
        del tx
        gc.collect()
        st = db.status()["transactions"]
        assert (st["active"], st["locks_held"]) == (0, 0), st
        with db.transaction() as t2:
            t2.update("accounts", 1, {"balance": 7})
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (7, 100)


class TestHeldUntilCommit:
    """A transaction whose statements are all pipelined writes keeps them in the
    client until its commit, then sends BEGIN, statements and COMMIT as one
    request (OP_ATOMIC answered with the number, then the outcome)."""

    def _requests(self, db) -> int:
        return db.status()["clients"]["requests"]

    def test_a_write_only_transaction_is_one_request(self, db, accounts):
        """Three pipelined writes and the commit reach the controller as one request; the number,
        the T log and the data are those of the transaction."""
        start = bounds(db._reader)["head"]
        before = self._requests(db)
        with db.transaction(program="pay", input={"n": 3}) as tx:
            tx.update("accounts", 1, {"balance": 1})
            tx.update("accounts", 2, {"balance": 2})
            tx.put("accounts", 40, acct(40, "p", 40))
        assert self._requests(db) - before == 2          # the transaction, and this status request
        assert isinstance(tx.result["txn"], int) and tx.result["txn"] == tx.number
        assert "results" not in tx.result and isinstance(tx.result["serial"], int)
        assert (accounts[1]["balance"], accounts[2]["balance"], accounts[40]) == (1, 2, acct(40, "p", 40))
        log = [e for e in read_entries(db._reader, start) if e.kind_name == "begin"]
        assert [msgpack.unpackb(e.a) for e in log] == [["pay", {"n": 3}]]

    def test_the_same_change_log_as_not_pipelined(self, db, accounts):
        """Write-only transactions held and sent at commit leave the same records and change-log
        entries as the same transactions not pipelined."""
        outcome = {}
        for pipeline in (False, True):
            reset(accounts)
            start = bounds(db._reader)["head"]
            for i in range(5):
                with db.transaction(program="w", input=i, pipeline=pipeline) as tx:
                    tx.update("accounts", 1 + i, {"balance": i})
                    tx.insert("accounts", acct(50 + i, "new", i))
                    tx.delete("accounts", 10 - i)
            outcome[pipeline] = (dict(accounts.items()),
                                 [(e.kind_name, e.file, e.key, e.a, e.b) for e in read_entries(db._reader, start)])
        assert outcome[True] == outcome[False]

    def test_a_failed_statement_is_named_with_the_number(self, db, accounts):
        """A held statement that fails is raised by the commit naming its position and the
        transaction's number; nothing of the transaction is applied."""
        with pytest.raises(errors.NoSuchRecordError) as ei:
            with db.transaction() as tx:
                tx.update("accounts", 1, {"balance": 1})
                tx.update("accounts", 99, {"balance": 1})
                tx.update("accounts", 2, {"balance": 2})
        d = ei.value.details
        assert (d["statement"], d["op"], d["key"]) == (2, "update", 99) and isinstance(d["txn"], int)
        assert f"(statement 2 of transaction {d['txn']}, pipelined)" in str(ei.value)
        assert tx.state == "cancelled" and balances(accounts) == dict.fromkeys(KEYS, 100)
        assert locks_held(db) == 0

    @pytest.mark.parametrize("changes, key, exc", [
        ({"balance": 1}, 99, errors.NoSuchRecordError),       # found missing when applied
        ({"balance": "x"}, 1, errors.WrongTypeError),         # refused when validated
    ], ids=["missing", "wrong-type"])
    def test_a_lone_failed_statement(self, db, accounts, changes, key, exc):
        """A transaction of one held statement that fails raises it at commit as statement 1 of its
        numbered transaction, whichever check refused it."""
        with pytest.raises(exc) as ei:
            with db.transaction() as tx:
                tx.update("accounts", key, changes)
        d = ei.value.details
        assert (d["statement"], d["op"], d["key"]) == (1, "update", key) and isinstance(d["txn"], int)
        assert balances(accounts) == dict.fromkeys(KEYS, 100) and locks_held(db) == 0

    def test_commit_without_waiting(self, db, accounts):
        """commit(wait=False) of a held transaction commits it."""
        tx = db.transaction()
        tx.update("accounts", 3, {"balance": 33})
        res = tx.commit(wait=False)
        assert tx.state == "committed" and isinstance(res["txn"], int) and accounts[3]["balance"] == 33

    def test_statements_held_survive_a_controller_restart(self, make_appliance):
        """Nothing of a held transaction has reached the controller, so one restarted meanwhile
        takes the whole of it on the new connection at commit."""
        a = make_appliance().start()
        db = a.connect(pipeline=True)
        db.table("accounts")[1] = acct(1, "main", 100)
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": 1})
        a.restart()
        tx.update("accounts", 1, {"balance": 2})
        tx.commit()
        assert tx.state == "committed" and db.table("accounts")[1]["balance"] == 2


class TestFlowControl:
    def test_replies_outstanding_stay_within_the_depth(self, app, accounts):
        """20,000 pipelined updates in one transaction with pipeline_depth 64: the client never had
        more than 64 replies unread and the controller never more than 64 requests of a session
        queued; the commit applies the last update."""
        c = appliance.connect(app.config, pipeline=True, pipeline_depth=64)
        try:
            with c.transaction(program="many") as tx:
                for i in range(20_000):
                    tx.update("accounts", 1 + i % 2, {"balance": i})
            s = c._session()
            assert 32 < s.peak <= 64
            assert not s.outstanding
            assert c.status()["clients"]["queued_peak"] <= 64
        finally:
            c.close()
        assert (accounts[1]["balance"], accounts[2]["balance"]) == (19_998, 19_999)


class TestConnectionLost:
    def test_controller_restart_with_statements_outstanding(self, make_appliance):
        """The controller restarts while pipelined updates are unread: the commit raises (the
        transaction was cancelled with its connection) and nothing of it was applied."""
        a = make_appliance().start()
        db = a.connect(pipeline=True)
        db.table("accounts")[1] = acct(1, "main", 100)
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": 1})
        assert isinstance(tx.number, int)
        tx.update("accounts", 1, {"balance": 2})
        a.restart()
        with pytest.raises((errors.UnavailableError, errors.TransactionCancelledError)):
            tx.commit()
        assert tx.state == "cancelled"
        assert db.table("accounts")[1]["balance"] == 100
        with db.transaction() as t2:
            t2.update("accounts", 1, {"balance": 3})
        assert db.table("accounts")[1]["balance"] == 3
