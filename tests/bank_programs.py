"""Programs of the tests' bank (run with db.run; re-run by appliance rerun).

withdraw is the patent's faulty program ([0014]): it adds the amount
instead of taking it (100,000 - 10,000 is recorded as 110,000).
"""


def withdraw(tx, input):
    acc = tx.get("accounts", input["account"], for_update=True)
    if acc is None or acc["balance"] < input["amount"]:
        raise ValueError(f"account {input['account']}: balance too low for {input['amount']}")
    tx.update("accounts", input["account"], {"balance": acc["balance"] + input["amount"]})   # the bug
    return acc["balance"] + input["amount"]


def copy_balance(tx, input):
    """A later transaction that reads the balance the faulty one left: a
    statement account records it."""
    src = tx.get("accounts", input["src"], for_update=True)
    tx.put("accounts", input["dst"], {"id": input["dst"], "branch": "statements", "balance": src["balance"]})


def deposit(tx, input):
    acc = tx.get("accounts", input["account"], for_update=True)
    tx.update("accounts", input["account"], {"balance": acc["balance"] + input["amount"]})


#: interfere's side channel (tests only: a real program reads and writes through tx alone):
#: a callable run between its read and its write, at most `left` times
INTERFERE = {"fn": None, "left": 0, "calls": 0}


def interfere(tx, input):
    """deposit, with another transaction's change slipped in between its read
    and its write (INTERFERE) the first times it is called: a stale read."""
    INTERFERE["calls"] += 1
    acc = tx.get("accounts", input["account"], for_update=True)
    if INTERFERE["left"] > 0:
        INTERFERE["left"] -= 1
        INTERFERE["fn"]()
    tx.update("accounts", input["account"], {"balance": acc["balance"] + input["amount"]})
    return acc["balance"] + input["amount"]
