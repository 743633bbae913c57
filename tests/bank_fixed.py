"""The corrected withdrawal (appliance rerun --fixed bank_fixed:withdraw)."""


def withdraw(tx, input):
    acc = tx.get("accounts", input["account"], for_update=True)
    if acc is None or acc["balance"] < input["amount"]:
        raise ValueError(f"account {input['account']}: balance too low for {input['amount']}")
    tx.update("accounts", input["account"], {"balance": acc["balance"] - input["amount"]})
    return acc["balance"] - input["amount"]


withdraw.__version__ = "2"
