"""Programs of the rerun benchmark (bench/recovery.py): a faulty deposit
that adds the amount twice, and its correction. Both read and write only
through the transaction and take everything from their input, so they can
be re-run (README, "Going back in time")."""


def deposit(tx, input):
    acc = tx.get("accounts", input["id"], for_update=True)
    tx.update("accounts", input["id"], {"balance": acc["balance"] + 2 * input["amount"]})   # the bug


def deposit_fixed(tx, input):
    acc = tx.get("accounts", input["id"], for_update=True)
    tx.update("accounts", input["id"], {"balance": acc["balance"] + input["amount"]})


deposit_fixed.__version__ = "2"
