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
