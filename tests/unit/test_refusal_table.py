"""One refusal table (server/protocol/errors.py) for every endpoint: billing names a catalogue
code, each edge (upgrade, HTTP route, a call refused after its in-band key) reads status, close
code and Retry-After from the same row (issue 12 part 4)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.billing.meter import BillingUnavailable, InsufficientBalance, KeyRevoked, RateLimited
from server.protocol.errors import (
    CATALOGUE,
    UNKNOWN_CLOSE_CODE,
    RefusedError,
    close_code,
    http_status_of_close,
    refuse,
    rejection,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.mark.parametrize(("exc", "status", "code", "message", "headers", "close"), [
    (InsufficientBalance(""), 402, "insufficient_balance", "wallet balance too low", {}, 4002),
    (InsufficientBalance("top up"), 402, "insufficient_balance", "top up", {}, 4002),
    (RateLimited("too many", 0.2), 429, "rate_limited", "too many", {"Retry-After": "1"}, 4029),
    (RateLimited("too many", 2.1), 429, "rate_limited", "too many", {"Retry-After": "3"}, 4029),
    (BillingUnavailable(""), 503, "billing_unavailable", "billing unavailable",
     {"Retry-After": "2"}, 1011),
])
def test_a_billing_refusal_through_the_table(exc: RefusedError, status: int, code: str,
                                             message: str, headers: dict[str, str],
                                             close: int) -> None:
    refused = rejection(exc)
    assert (refused.status, refused.code, refused.message, refused.headers) == (
        status, code, message, headers)
    # The same refusal once the socket is upgraded (a telephony key that came in `start`).
    assert refused.close_code == close


def test_billing_exceptions_carry_catalogue_codes() -> None:
    for cls in (InsufficientBalance, RateLimited, BillingUnavailable, KeyRevoked):
        assert issubclass(cls, RefusedError) and cls.code in CATALOGUE
    assert close_code(KeyRevoked.code) == 4001


def test_the_upgrade_refusals_keep_their_answers() -> None:
    assert refuse("draining", "x").headers == {"Retry-After": "1"}
    assert refuse("overloaded", "x").status == 503
    assert refuse("auth_unavailable", "x").headers == {"Retry-After": "2"}
    assert (refuse("unauthorized", "x").status, refuse("unauthorized", "x").headers) == (401, {})
    assert refuse("not_found", "x").status == 404
    assert refuse("bad_request", "x").status == 400


def test_a_code_outside_the_table_closes_as_a_policy_violation() -> None:
    assert close_code("something_new") == UNKNOWN_CLOSE_CODE == 1008
    with pytest.raises(KeyError):
        refuse("something_new", "x")  # a refusal must name a catalogue code


def test_every_close_code_the_table_uses_is_documented() -> None:
    """docs/protocol.md "Close codes" lists every code a session may end with."""
    text = PROTOCOL_MD.read_text()
    section = text[text.index("## Close codes"):]
    section = section[: section.index("\n---")]
    documented = {int(n) for n in re.findall(r"\b(1\d{3}|4\d{3})\b", section)}
    assert {row.close_code for row in CATALOGUE.values()} <= documented


@pytest.mark.parametrize(("close", "default", "status"), [
    (4002, 502, 402), (4029, 502, 429), (4400, 502, 400),  # the caller's wallet, rate, input
    (1011, 502, 502), (4008, 502, 502), (None, 502, 502),  # the engine's or ours
    (1011, 400, 400),  # synthesize: an engine refusing the input for good is the request's
])
def test_an_http_request_whose_session_ended_early(close: int | None, default: int,
                                                   status: int) -> None:
    assert http_status_of_close(close, default) == status
