"""The protocol module (appliance/wire/messages.py) and the controller's handlers agree.

REQUESTS lists every request's arguments once; the docs are rendered from
it, the controller checks argument counts against it, and here: every
request has a handler taking exactly those arguments (the same names, the
optional ones with defaults), and a real controller refuses a request with
too few or too many arguments, naming what it expects.
"""
from __future__ import annotations

import inspect

import pytest

from appliance.controller import service  # noqa: F401  (fills the op table)
from appliance.controller.ops import HANDLERS
from appliance.wire import messages as m

from fault_helpers import RawConn


class TestTable:
    def test_every_request_has_a_handler_and_every_handler_a_request(self):
        assert set(HANDLERS) == set(m.REQUESTS)
        assert set(m.REQUESTS) == set(m.NAMES)

    @pytest.mark.parametrize("op", sorted(m.REQUESTS), ids=lambda op: m.NAMES[op])
    def test_handler_takes_exactly_the_documented_arguments(self, op):
        """The handler's parameters after (ctl, sess) are the request's arguments, in order, the
        optional ones (a trailing '?') with defaults and none else."""
        req, h = m.REQUESTS[op], HANDLERS[op]
        params = list(inspect.signature(h.fn).parameters.values())[2:]
        assert tuple(p.name for p in params) == req.params
        optional = tuple(p.default is not inspect.Parameter.empty for p in params)
        assert optional == tuple(a.endswith("?") for a in req.args)
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)

    def test_optional_arguments_come_last(self):
        for req in m.REQUESTS.values():
            flags = [a.endswith("?") for a in req.args]
            assert flags == sorted(flags), req.name

    def test_docs_list_every_request_with_its_arguments(self):
        for req in m.REQUESTS.values():
            row = next(line for line in m.__doc__.splitlines() if line.startswith(req.name + " "))
            assert row.split()[1].rstrip(",") == (req.args[0] if req.args else "-"), row


class TestCounts:
    @pytest.mark.parametrize("op", sorted(op for op in m.REQUESTS if not m.REQUESTS[op].agent
                                          and op not in (m.OP_HELLO, m.OP_AGENT)),
                             ids=lambda op: m.NAMES[op])
    def test_a_wrong_argument_count_is_refused_naming_the_expected_ones(self, bank, op):
        """One argument too many (and, where some are required, one too few): APL_EPROTO, the
        request named, the expected count and argument names in the message; the session goes on."""
        req = m.REQUESTS[op]
        least, most = req.arity
        with RawConn(bank.cfg.socket_path) as c:
            c.hello()
            counts = [most + 1] + ([least - 1] if least else [])
            for n in counts:
                reply = c.request([op, *([None] * n)])
                assert reply[0] == m.ERR and reply[1] == "APL_EPROTO", reply
                assert "expected" in reply[2] and f"got {n}" in reply[2], reply
                assert req.name.lower()[3:] in reply[2]
            assert c.request([m.OP_STATUS])[0] == m.OK   # the session still serves
