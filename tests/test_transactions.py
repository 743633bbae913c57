"""Transactions: commit and cancel, their own view, statement errors, locks,
deadlocks, isolation from other processes, and the change log they leave.

Real controller processes throughout (tests/conftest.py); lock_timeout is 2 s.
"""
from __future__ import annotations

import json
import subprocess
import threading

import msgpack
import pytest

from appliance import errors
from appliance._native import ffi
from appliance.store.changelog import bounds, read_entries
from appliance.store.keys import encode_int, encode_str

from test_client import acct

TXN_STATE_OPS = {
    "get_for_update": lambda tx: tx.get("accounts", 1, for_update=True),
    "insert": lambda tx: tx.insert("accounts", acct(60)),
    "update": lambda tx: tx.update("accounts", 1, {"balance": 0}),
    "delete": lambda tx: tx.delete("accounts", 1),
    "put": lambda tx: tx.put("accounts", 61, acct(61)),
    "commit": lambda tx: tx.commit(),
}


@pytest.fixture
def accounts(db):
    """accounts 1..4, branch "main", balance 100 each."""
    t = db.table("accounts")
    for i in range(1, 5):
        t[i] = acct(i, "main", 100)
    return t


class TestCommitAndCancel:
    def test_leaving_the_block_commits(self, db, accounts):
        """Leaving the with block normally commits; tx.result holds txn, serial and version; tx.number is set."""
        before = db.committed_version()
        with db.transaction(program="transfer", input={"src": 1, "dst": 2, "amount": 10}) as tx:
            a = tx.get("accounts", 1, for_update=True)
            b = tx.get("accounts", 2, for_update=True)
            tx.update("accounts", 1, {"balance": a["balance"] - 10})
            tx.update("accounts", 2, {"balance": b["balance"] + 10})
        assert tx.state == "committed"
        assert isinstance(tx.number, int) and tx.result["txn"] == tx.number
        assert isinstance(tx.result["serial"], int) and tx.result["version"] > before
        assert tx.result["version"] == db.committed_version()
        assert accounts[1]["balance"] == 90 and accounts[2]["balance"] == 110

    def test_commit_versions_and_txn_numbers_increase(self, db, accounts):
        """Each commit gets a larger transaction number, serial and version than the one before."""
        results = []
        for i in range(3):
            with db.transaction() as tx:
                tx.update("accounts", 1, {"balance": i})
            results.append(tx.result)
        for key in ("txn", "serial", "version"):
            assert results[0][key] < results[1][key] < results[2][key]

    def test_exception_cancels(self, db, accounts):
        """An exception leaving the block cancels: it propagates and nothing the transaction did remains."""
        with pytest.raises(ZeroDivisionError):
            with db.transaction() as tx:
                tx.update("accounts", 1, {"balance": 0})
                tx.insert("accounts", acct(9))
                tx.delete("accounts", 2)
                1 / 0
        assert tx.state == "cancelled"
        assert accounts[1]["balance"] == 100 and 9 not in accounts and 2 in accounts

    def test_cancel_discards_everything(self, db, accounts):
        """tx.cancel() discards every change and releases the locks; cancelling again is a no-op."""
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": 0})
        tx.insert("accounts", acct(9))
        tx.cancel()
        tx.cancel()
        assert tx.state == "cancelled"
        assert accounts[1]["balance"] == 100 and 9 not in accounts
        assert db.status()["transactions"]["locks_held"] == 0
        accounts[1] = acct(1, "main", 5)  # the record is not locked any more
        assert accounts[1]["balance"] == 5

    def test_leaving_block_after_cancel_is_a_no_op(self, db, accounts):
        """Leaving the with block normally after tx.cancel() neither commits nor raises."""
        with db.transaction() as tx:
            tx.update("accounts", 1, {"balance": 0})
            tx.cancel()
        assert tx.state == "cancelled" and accounts[1]["balance"] == 100

    def test_read_only_transaction_commits(self, db, accounts):
        """A transaction that only locks and reads commits with a txn number, no serial, and changes nothing."""
        version = db.committed_version()
        with db.transaction(program="audit") as tx:
            total = sum(tx.get("accounts", k, for_update=True)["balance"] for k in range(1, 5))
        assert total == 400
        assert tx.state == "committed" and tx.result["txn"] == tx.number and tx.result["serial"] is None
        assert db.committed_version() == version
        assert db.status()["transactions"]["locks_held"] == 0

    def test_empty_transaction_commits(self, db):
        """A transaction with no statement commits without a transaction number."""
        with db.transaction() as tx:
            pass
        assert tx.state == "committed" and tx.result["txn"] is None and tx.number is None

    @pytest.mark.parametrize("end", ["committed", "cancelled"])
    @pytest.mark.parametrize("op", sorted(TXN_STATE_OPS))
    def test_operations_after_the_end_raise(self, db, accounts, op, end):
        """Every statement and commit() on a committed or cancelled transaction raises TransactionStateError."""
        tx = db.transaction()
        tx.update("accounts", 2, {"balance": 1})
        tx.commit() if end == "committed" else tx.cancel()
        with pytest.raises(errors.TransactionStateError, match=end):
            TXN_STATE_OPS[op](tx)
        assert accounts[1]["balance"] == 100 and accounts[2]["balance"] == (1 if end == "committed" else 100)

    def test_plain_get_after_commit_raises(self, db, accounts):
        """A plain (not for_update) get on a committed transaction raises TransactionStateError too."""
        with db.transaction() as tx:
            tx.update("accounts", 2, {"balance": 1})
        with pytest.raises(errors.TransactionStateError):
            tx.get("accounts", 1)


class TestOwnView:
    def test_get_for_update_sees_own_changes(self, db, accounts):
        """get(for_update=True) returns the record as this transaction left it after update, insert and delete."""
        with db.transaction() as tx:
            tx.update("accounts", 1, {"balance": 1})
            assert tx.get("accounts", 1, for_update=True) == acct(1, "main", 1)
            tx.insert("accounts", acct(10, "new", 10))
            assert tx.get("accounts", 10, for_update=True) == acct(10, "new", 10)
            tx.delete("accounts", 2)
            assert tx.get("accounts", 2, for_update=True) is None
            tx.put("accounts", 2, acct(2, "again", 2))
            assert tx.get("accounts", 2, for_update=True) == acct(2, "again", 2)
            tx.update("accounts", 1, {"branch": "moved"})
            assert tx.get("accounts", 1, for_update=True) == acct(1, "moved", 1)
            assert accounts[1] == acct(1, "main", 100)  # nothing visible outside yet
        assert accounts[1] == acct(1, "moved", 1) and accounts[2] == acct(2, "again", 2) and accounts[10]["id"] == 10

    def test_plain_get_of_a_written_key_returns_own_write(self, db, accounts):
        """A plain get() of a key the transaction wrote returns the transaction's version of it."""
        with db.transaction() as tx:
            tx.update("accounts", 1, {"balance": 7})
            tx.insert("accounts", acct(11, "x", 11))
            tx.delete("accounts", 3)
            assert tx.get("accounts", 1) == acct(1, "main", 7)
            assert tx.get("accounts", 11) == acct(11, "x", 11)
            assert tx.get("accounts", 3) is None
            assert tx.get("accounts", 4) == acct(4, "main", 100)  # untouched: the committed record
        assert accounts[1]["balance"] == 7 and 3 not in accounts

    def test_get_for_update_of_missing_key_is_none(self, db, accounts):
        """get(for_update=True) of a missing key returns None; the transaction can then insert it."""
        with db.transaction() as tx:
            assert tx.get("accounts", 50, for_update=True) is None
            tx.insert("accounts", acct(50))
        assert accounts[50] == acct(50)


class TestStatementErrors:
    """A failing statement raises its error and leaves the transaction open and usable."""

    @pytest.mark.parametrize("stmt, exc", [
        (lambda tx: tx.insert("accounts", acct(1)), errors.DuplicateKeyError),
        (lambda tx: tx.update("accounts", 99, {"balance": 1}), errors.NoSuchRecordError),
        (lambda tx: tx.delete("accounts", 99), errors.NoSuchRecordError),
        (lambda tx: tx.update("accounts", 1, {"balance": "x"}), errors.WrongTypeError),
        (lambda tx: tx.update("accounts", 1, {"colour": "red"}), errors.NoSuchFieldError),
        (lambda tx: tx.insert("accounts", {"id": 70}), errors.WrongTypeError),
        (lambda tx: tx.put("accounts", 5, acct(6)), errors.WrongTypeError),
        (lambda tx: tx.get("accounts", "one", for_update=True), errors.WrongTypeError),
        (lambda tx: tx.insert("nosuch", {}), errors.NoSuchTableError),
    ], ids=["duplicate", "update-missing", "delete-missing", "wrong-type", "unknown-field",
            "missing-field", "put-pk-mismatch", "bad-key", "unknown-table"])
    def test_statement_error_leaves_transaction_open(self, db, accounts, stmt, exc):
        """After a statement error the transaction stays open, later statements work and the commit keeps them."""
        with db.transaction() as tx:
            tx.update("accounts", 2, {"balance": 2})
            with pytest.raises(exc):
                stmt(tx)
            assert tx.state == "open"
            tx.update("accounts", 3, {"balance": 3})
        assert tx.state == "committed"
        assert accounts[2]["balance"] == 2 and accounts[3]["balance"] == 3 and accounts[1]["balance"] == 100
        assert set(accounts) == {1, 2, 3, 4}

    def test_first_statement_error_leaves_transaction_open(self, db, accounts):
        """A failing first statement still begins the transaction, which stays open and usable."""
        with db.transaction() as tx:
            with pytest.raises(errors.DuplicateKeyError):
                tx.insert("accounts", acct(1))
            assert tx.state == "open" and isinstance(tx.number, int)
            tx.insert("accounts", acct(21))
        assert tx.state == "committed" and 21 in accounts

    def test_duplicate_against_own_insert(self, db, accounts):
        """Inserting a key the same transaction inserted raises DuplicateKeyError; the first insert stays."""
        with db.transaction() as tx:
            tx.insert("accounts", acct(20, "first"))
            with pytest.raises(errors.DuplicateKeyError):
                tx.insert("accounts", acct(20, "second"))
        assert accounts[20]["branch"] == "first"

    def test_update_after_own_delete_is_missing(self, db, accounts):
        """Updating a record the same transaction deleted raises NoSuchRecordError."""
        with db.transaction() as tx:
            tx.delete("accounts", 1)
            with pytest.raises(errors.NoSuchRecordError):
                tx.update("accounts", 1, {"balance": 1})
        assert 1 not in accounts

    def test_put_reports_insert_or_update(self, db, accounts):
        """put() returns "insert" for a new key and "update" for an existing one."""
        with db.transaction() as tx:
            assert tx.put("accounts", 1, acct(1, "p", 1)) == "update"
            assert tx.put("accounts", 30, acct(30, "p", 30)) == "insert"
            assert tx.put("accounts", 30, {"branch": "q", "balance": 31}) == "update"
        assert accounts[1] == acct(1, "p", 1) and accounts[30] == acct(30, "q", 31)

    def test_primary_key_cannot_change(self, db, accounts):
        """update() changing the primary key is refused (WrongTypeError); setting it to itself is allowed."""
        with db.transaction() as tx:
            with pytest.raises(errors.WrongTypeError, match="primary key 'id' cannot change"):
                tx.update("accounts", 1, {"id": 2})
            assert tx.state == "open"
            tx.update("accounts", 1, {"id": 1, "balance": 5})
        assert accounts[1] == acct(1, "main", 5) and accounts[2] == acct(2, "main", 100)


def _hold_lock(client, key: int):
    """An open transaction of `client` that has locked and changed `key`."""
    tx = client.transaction(program="holder")
    tx.get("accounts", key, for_update=True)
    tx.update("accounts", key, {"balance": -1})
    return tx


class TestLockTimeout:
    def test_lock_timeout_cancels_the_waiter(self, bank, db, accounts):
        """B waiting past lock_timeout on A's lock gets LockTimeoutError; B is cancelled, A keeps its lock."""
        a, b = bank.connect(), bank.connect()
        ta = _hold_lock(a, 1)
        tb = b.transaction(program="waiter")
        tb.update("accounts", 2, {"balance": 0})
        with pytest.raises(errors.LockTimeoutError) as ei:
            tb.get("accounts", 1, for_update=True)
        e = ei.value
        assert isinstance(e, errors.TransactionCancelledError)
        assert e.code == "APL_ELOCKTIMEOUT" and e.details["txn"] == tb.number
        assert "cancelled" in str(e) and f"transaction {tb.number}" in str(e)
        assert tb.state == "cancelled"
        with pytest.raises(errors.TransactionStateError):
            tb.update("accounts", 3, {"balance": 0})
        assert accounts[2]["balance"] == 100  # B's earlier change is gone
        st = db.status()["transactions"]
        assert st["lock_timeouts"] == 1 and st["locks_held"] == 1  # A's lock, and only it
        assert ta.get("accounts", 1, for_update=True)["balance"] == -1
        ta.commit()
        assert accounts[1]["balance"] == -1
        b.table("accounts")[1] = acct(1, "after", 0)  # released at A's commit
        assert accounts[1]["branch"] == "after"


def _deadlock_pair(bank):
    """Two transactions in two threads lock records 1 and 2 in opposite order; returns {name: (outcome, tx)}."""
    clients = {"A": bank.connect(), "B": bank.connect()}
    order = {"A": (1, 2), "B": (2, 1)}
    both_hold_one = threading.Barrier(2, timeout=30)
    out: dict = {}

    def run(name: str) -> None:
        first, second = order[name]
        tx = clients[name].transaction(program=name)
        try:
            with tx:
                tx.update("accounts", first, {"branch": name})
                both_hold_one.wait()
                tx.update("accounts", second, {"branch": name})
            out[name] = ("committed", tx)
        except errors.ApplianceError as e:
            out[name] = (e, tx)

    threads = [threading.Thread(target=run, args=(n,)) for n in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


class TestDeadlock:
    def test_exactly_one_victim(self, bank, db, accounts):
        """Opposite lock orders: exactly one transaction gets DeadlockError and is undone; the other commits."""
        out = _deadlock_pair(bank)
        victims = [n for n, (r, _) in out.items() if isinstance(r, errors.DeadlockError)]
        winners = [n for n, (r, _) in out.items() if r == "committed"]
        assert len(victims) == 1 and len(winners) == 1, out
        victim_tx = out[victims[0]][1]
        e = out[victims[0]][0]
        assert isinstance(e, errors.TransactionCancelledError) and e.code == "APL_EDEADLOCK"
        assert "cancelled" in str(e) and victim_tx.state == "cancelled"
        # nothing the victim did remains: both records carry the winner's branch
        assert accounts[1]["branch"] == winners[0] and accounts[2]["branch"] == winners[0]
        st = db.status()["transactions"]
        assert st["deadlocks"] == 1 and st["locks_held"] == 0 and st["active"] == 0


READ_STATE = r"""
import json, sys, appliance
t = appliance.connect(sys.argv[1]).table("accounts")
print(json.dumps({"one": t.get(1), "two": t.get(2), "new": t.get(40), "len": len(t)}))
"""


class TestIsolation:
    def _read_in_other_process(self, bank) -> dict:
        p = bank.spawn(READ_STATE, stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        return json.loads(out)

    def test_changes_invisible_until_commit(self, bank, db, accounts):
        """Another process sees none of an open transaction's changes, and all of them after the commit."""
        tx = db.transaction()
        tx.update("accounts", 1, {"balance": 1})
        tx.delete("accounts", 2)
        tx.insert("accounts", acct(40, "new", 40))
        seen = self._read_in_other_process(bank)
        assert seen == {"one": acct(1, "main", 100), "two": acct(2, "main", 100), "new": None, "len": 4}
        tx.commit()
        seen = self._read_in_other_process(bank)
        assert seen == {"one": acct(1, "main", 1), "two": None, "new": acct(40, "new", 40), "len": 4}


def _files(db) -> dict[int, object]:
    """file id -> its struct apl_file, from the mapped superblock."""
    att = db._att
    sb = att.sb
    fl = ffi.cast("struct apl_file *", att.meta.ptr + sb.sb_files_off)
    return {fl[i].fl_id: fl[i] for i in range(sb.sb_nfiles)}


class TestChangeLog:
    def test_transaction_reaches_the_change_log(self, db, accounts):
        """A commit logs BEGIN (T log = [program, input]), one entry per change (file, block, key, A/B images), COMMIT."""
        start = bounds(db._reader)["head"]
        tin = {"src": 1, "dst": 2, "amount": 10}
        with db.transaction(program="transfer", input=tin) as tx:
            tx.update("accounts", 1, {"balance": 90})
            tx.delete("accounts", 2)
            tx.insert("accounts", acct(7, "east", 7))
        entries = list(read_entries(db._reader, start))
        kinds = [e.kind_name for e in entries]
        assert kinds[0] == "begin" and kinds[-1] == "commit"
        assert msgpack.unpackb(entries[0].a) == ["transfer", tin]
        assert all(e.txn == tx.number for e in entries)
        assert entries[-1].serial == tx.result["serial"]
        assert all(e.version == tx.result["version"] for e in entries)

        files = _files(db)
        table_file = next(i for i, f in files.items() if ffi.string(f.fl_name) == b"accounts")
        index_file = next(i for i, f in files.items() if ffi.string(f.fl_name) == b"accounts.branch")
        changes = {(e.kind_name, e.file, e.key): e for e in entries[1:-1] if e.kind_name != "block"}
        decode = db.schema.by_file[table_file].decode   # A and B images are records (cext/apl_rec.h)
        upd = changes[("update", table_file, encode_int(1))]
        assert decode(upd.a) == acct(1, "main", 90) and decode(upd.b) == acct(1, "main", 100)
        dele = changes[("delete", table_file, encode_int(2))]
        assert dele.a == b"" and decode(dele.b) == acct(2, "main", 100)
        ins = changes[("insert", table_file, encode_int(7))]
        assert decode(ins.a) == acct(7, "east", 7) and ins.b == b""
        # alternate-key index entries: encode(branch) + encode(pk)
        assert ("delete", index_file, encode_str("main") + encode_int(2)) in changes
        assert ("insert", index_file, encode_str("east") + encode_int(7)) in changes
        assert len(changes) == 5
        # a small table is one leaf: every change names its file's root block
        for (_, fid, _), e in changes.items():
            assert e.block == files[fid].fl_root

    def test_serials_strictly_increase_and_epoch_is_one(self, db, accounts):
        """Over several commits, every log entry's serial is the previous one + 1 and carries epoch 1."""
        for i in range(3):
            with db.transaction(program=f"p{i}", input=i) as tx:
                tx.update("accounts", 1 + i, {"balance": i})
        entries = list(read_entries(db._reader, 0))
        serials = [e.serial for e in entries]
        assert serials == list(range(serials[0], serials[0] + len(serials))) and serials[0] == 1
        assert {e.epoch for e in entries} == {1}
        assert serials[-1] == bounds(db._reader)["serial"] == tx.result["serial"]
        begins = [msgpack.unpackb(e.a) for e in entries if e.kind_name == "begin"]
        assert begins[-3:] == [["p0", 0], ["p1", 1], ["p2", 2]]

    def test_cancelled_transaction_leaves_no_entry(self, db, accounts):
        """A cancelled transaction writes nothing to the change log."""
        before = bounds(db._reader)
        tx = db.transaction(program="nothing")
        tx.update("accounts", 1, {"balance": 0})
        tx.cancel()
        assert bounds(db._reader) == before


class TestDroppedTransaction:
    def test_dropped_open_transaction_is_cancelled(self, bank, db, accounts):
        """A transaction dropped while open (no commit, no cancel, no with-block) is cancelled: its connection takes new writes and transactions, and another client gets its locks at once."""
        import gc
        tx = db.transaction(program="dropped")
        tx.get("accounts", 1, for_update=True)
        tx.update("accounts", 1, {"balance": -1})
        del tx
        gc.collect()
        st = db.status()["transactions"]                     # cancelled by the client at collection
        assert (st["active"], st["locks_held"], st["cancelled"]) == (0, 0, 1), st
        db.table("accounts")[2] = acct(2, "main", 5)        # the same connection: not stuck
        with db.transaction() as t2:
            t2.update("accounts", 3, {"balance": 6})
        other = bank.connect()
        with other.transaction() as t3:                       # record 1 is not locked any more
            t3.update("accounts", 1, {"balance": 7})
        assert [db.table("accounts")[k]["balance"] for k in (1, 2, 3)] == [7, 5, 6]
        st = db.status()["transactions"]
        assert st["locks_held"] == 0 and st["lock_timeouts"] == 0, st

    def test_transaction_collected_in_another_thread_is_cancelled(self, bank, db, accounts):
        """A transaction opened in a thread that has ended, and collected in another, is cancelled: its locks are released."""
        import gc
        box = []

        def work():
            tx = db.transaction(program="thread")
            tx.update("accounts", 1, {"balance": -1})
            tx.ref = tx                      # a cycle: only the garbage collector frees it
            box.append(tx)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        box.clear()
        gc.collect()
        st = db.status()["transactions"]
        assert (st["active"], st["locks_held"], st["cancelled"]) == (0, 0, 1), st
        other = bank.connect()
        with other.transaction() as t3:
            t3.update("accounts", 1, {"balance": 7})
        assert db.table("accounts")[1]["balance"] == 7
        assert db.status()["transactions"]["lock_timeouts"] == 0

