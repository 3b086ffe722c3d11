"""Outbox: control messages are never dropped, order is kept, at most one coalescable message
per key waits, and `overflowing` says when more than `capacity` wait."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.flow_control.outbox import Outbox


@dataclass(eq=True)
class Msg:
    seq: int
    key: int | None  # None: control (never dropped); else coalescable under this key


pushes = st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=3)), max_size=80)
drain_points = st.sets(st.integers(min_value=0, max_value=80), max_size=10)


def expected_survivors(batch: list[Msg]) -> list[Msg]:
    """The model: every control message, and of each key only its last message, in push order."""
    last: dict[int, int] = {}
    for m in batch:
        if m.key is not None:
            last[m.key] = m.seq
    return [m for m in batch if m.key is None or last[m.key] == m.seq]


@given(pushes, drain_points, st.integers(min_value=1, max_value=20))
def test_control_kept_order_kept_one_per_key(keys: list[int | None], drains: set[int],
                                             capacity: int) -> None:
    box: Outbox[Msg] = Outbox(capacity)
    written: list[Msg] = []
    batch: list[Msg] = []
    for seq, key in enumerate(keys):
        if seq in drains:
            got = box.drain()
            assert got == expected_survivors(batch)
            written += got
            batch = []
        msg = Msg(seq, key)
        batch.append(msg)
        if key is None:
            box.push(msg)
        else:
            box.push_latest(key, msg)
        assert box.overflowing == (len(box) > capacity)
        held = expected_survivors(batch)
        assert len(box) == len(held)
    written += box.drain()
    assert not box and not box.overflowing
    # Nothing control is ever lost, and everything written is in push order.
    controls = [m.seq for m in map(Msg, range(len(keys)), keys) if m.key is None]
    assert [m.seq for m in written if m.key is None] == controls
    seqs = [m.seq for m in written]
    assert seqs == sorted(seqs)


@given(st.lists(st.integers(min_value=0, max_value=4), max_size=200))
def test_coalescable_messages_alone_never_overflow_past_their_keys(keys: list[int]) -> None:
    box: Outbox[Msg] = Outbox(5)
    for seq, key in enumerate(keys):
        box.push_latest(key, Msg(seq, key))
        assert len(box) <= 5 and not box.overflowing


def test_equal_control_message_is_not_mistaken_for_the_stale_one() -> None:
    box: Outbox[Msg] = Outbox(10)
    box.push_latest(1, Msg(0, 1))
    box.push(Msg(0, 1))  # equal to the interim, but control
    box.push_latest(1, Msg(2, 1))
    assert box.drain() == [Msg(0, 1), Msg(2, 1)]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Outbox(0)
