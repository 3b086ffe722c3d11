"""CreditWindow, both directions.

Receiving side (ASR: the client streams audio against the credit we grant). For a client that
sends only what it was granted: its credit never goes negative and never grows past the window,
no credit is lost (every consumed byte comes back, at most a quarter window held back, never so
much that the client is stuck), grants come a quarter window at a time, and the ingest queue
sized to the window never sheds its audio. For any client: `received` says exactly when it went
past its grant.

Sending side (TTS: the client's `credit` messages). The sender never sends more than it was
granted (credit never negative), a grant must be positive and is never lost, and a `clear` that
emptied the peer's buffer gives back exactly the window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.flow_control.credit import CreditWindow
from server.flow_control.ingest_queue import IngestQueue


class WellBehavedClient(RuleBasedStateMachine):
    """A client that sends within its credit, the server's ingest queue (capacity = window, as
    the ASR machine sizes it, drop policy) and the stage that drains it and grants credit."""

    def __init__(self) -> None:
        super().__init__()
        self.credit = CreditWindow(1)
        self.queue: IngestQueue[None] = IngestQueue(1, "drop", 1)
        self.client_credit = 0  # what the client believes it may send: only grants it was sent
        self.sent = self.consumed_total = self.granted = 0

    @initialize(window=st.integers(1, 4000))
    def open(self, window: int) -> None:
        self.credit = CreditWindow(window)
        self.queue = IngestQueue(window, "drop", 1)
        self.client_credit = window

    @precondition(lambda self: self.client_credit > 0)
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, self.client_credit))
        assert self.credit.received(n) is False  # within its grant: never flagged
        self.client_credit -= n
        self.sent += n
        assert self.queue.put_audio(b"\x00" * n) == 0  # the window fits the queue: no shedding

    @rule()
    def drain_and_grant(self) -> None:
        n = sum(len(chunk) for chunk in self.queue.drain_audio())
        grant = self.credit.consumed(n) if n else 0
        if grant:
            assert grant >= self.credit.threshold  # one credit message per quarter window
            self.client_credit += grant
            self.granted += grant
        self.consumed_total += n

    @invariant()
    def credit_stays_within_zero_and_the_window(self) -> None:
        assert 0 <= self.credit.outstanding <= self.credit.window
        # The server's count and the client's agree: credit the client was never told of
        # does not exist.
        assert self.credit.outstanding == self.client_credit

    @invariant()
    def no_credit_is_lost(self) -> None:
        assert self.credit.granted_total == self.credit.window + self.granted
        held_back = self.consumed_total - self.granted
        assert 0 <= held_back < self.credit.threshold

    @invariant()
    def a_client_that_sent_everything_it_may_is_never_stuck(self) -> None:
        if self.queue.audio_bytes == 0:  # all it sent was consumed
            assert self.client_credit > self.credit.window - self.credit.threshold
            assert self.client_credit >= 1

    @invariant()
    def the_queue_bound_holds(self) -> None:
        assert self.queue.audio_bytes <= self.queue.capacity


TestWellBehavedClient = WellBehavedClient.TestCase
TestWellBehavedClient.settings = settings(max_examples=300, stateful_step_count=50,
                                          deadline=None)


@given(st.integers(1, 4000), st.lists(st.tuples(st.integers(1, 3000), st.booleans()),
                                      max_size=60))
def test_received_flags_exactly_the_bytes_past_the_grant(
    window: int, script: list[tuple[int, bool]],
) -> None:
    """Any client, in or out of its credit: `received` is True exactly when the client has now
    sent more than it was ever granted, and `outstanding` goes negative by that much."""
    credit = CreditWindow(window)
    sent = consumed = granted = 0
    for n, drain in script:
        over = credit.received(n)
        sent += n
        assert over == (sent > window + granted)
        assert credit.outstanding == window + granted - sent
        if drain:
            granted += credit.consumed(sent - consumed)
            consumed = sent


@given(st.integers(1, 10_000), st.integers(1, 10_000))
def test_resize_before_audio_gives_the_new_window(old: int, new: int) -> None:
    """A config message changes the format (so the window) before any audio."""
    credit = CreditWindow(old)
    credit.resize(new)
    assert credit.outstanding == new == credit.window
    assert credit.threshold == max(1, new // 4)
    assert credit.received(new) is False
    assert credit.received(1) is True


def test_grants_come_a_quarter_window_at_a_time() -> None:
    """A 640-byte window (80 ms of 8 kHz mu-law): one grant per 160 bytes drained, not per
    20-byte read."""
    credit = CreditWindow(640)
    assert credit.received(320) is False
    grants = [credit.consumed(20) for _ in range(16)]
    assert grants == [0] * 7 + [160] + [0] * 7 + [160]
    assert credit.outstanding == 640


class Sender(RuleBasedStateMachine):
    """A sender that sends only what `covers` allows, a peer granting credit and clearing its
    buffer, against a plain count of what the peer allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.credit = CreditWindow(1)
        self.allowed = 1  # what the peer allowed since it last emptied its buffer
        self.sent = 0  # sent since then

    @initialize(window=st.integers(1, 4000))
    def open(self, window: int) -> None:
        self.credit = CreditWindow(window)
        self.allowed = window

    @rule(n=st.integers(1, 5000))
    def peer_grants(self, n: int) -> None:
        self.credit.grant(n)
        self.allowed += n

    @rule(n=st.integers(-5, 0))
    def a_grant_that_is_not_positive_is_refused_and_changes_nothing(self, n: int) -> None:
        before = self.credit.outstanding
        with pytest.raises(ValueError):
            self.credit.grant(n)
        assert self.credit.outstanding == before

    @rule(n=st.integers(1, 3000))
    def send_if_covered(self, n: int) -> None:
        covered = self.credit.covers(n)
        assert covered == (self.sent + n <= self.allowed)
        if covered:
            self.credit.spend(n)
            self.sent += n

    @rule()
    def peer_cleared_its_buffer(self) -> None:
        self.credit.refill()
        self.allowed, self.sent = self.credit.window, 0
        assert self.credit.outstanding == self.credit.window

    @invariant()
    def never_more_than_granted(self) -> None:
        assert self.credit.outstanding == self.allowed - self.sent >= 0


TestSender = Sender.TestCase
TestSender.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
