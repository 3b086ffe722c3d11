"""WalletMeter.exhausted compares accepted units with a bound kept with the lease's grant
(it runs per ingest batch); it must answer exactly as the cost formula it replaces."""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from server.billing.store import Price
from server.billing.wallet_meter import LeasePolicy, WalletMeter


def _meter(price: Price) -> WalletMeter:
    async def seed(_: str) -> None:
        return None

    return WalletMeter(cache=cast(Any, None), tenant_id="t", session_id="s", model="m",
                       price=price, policy=LeasePolicy(1, 1, 0, 1), seed=seed)


def _by_formula(meter: WalletMeter, price: Price, base_cost: int) -> bool:
    return meter.revoked or price.cost(meter.units) - base_cost >= meter.granted


@settings(max_examples=2000, deadline=None)
@given(micros=st.integers(-3, 10**7), block=st.integers(1, 10**6),
       granted=st.integers(-10**6, 10**10), base_cost=st.integers(0, 10**9),
       units=st.lists(st.integers(0, 10**9), min_size=1, max_size=4))
def test_exhausted_answers_as_the_cost_formula(micros: int, block: int, granted: int,
                                               base_cost: int, units: list[int]) -> None:
    price = Price("m", "audio_ms", micros, block)
    meter = _meter(price)
    meter._base_cost = base_cost
    meter.granted = granted
    for u in units:  # usage only grows
        meter.accept(u)
        assert meter.exhausted == _by_formula(meter, price, base_cost), meter.units
    meter.granted = granted + 1  # a top-up moves the bound
    assert meter.exhausted == _by_formula(meter, price, base_cost)
    meter.revoke()
    assert meter.exhausted


def test_exhausted_at_the_exact_unit() -> None:
    price = Price("m", "audio_ms", 1000, 60_000)  # 1000 micros a minute of audio
    meter = _meter(price)
    meter.granted = 1000  # one minute
    meter.accept(59_940)
    assert price.cost(59_940) == 999 and not meter.exhausted
    meter.accept(1)  # the first unit whose rounded-up cost reaches the grant
    assert price.cost(59_941) == 1000 and meter.exhausted
    free = _meter(Price("m", "audio_ms", 0, 60_000))
    free.granted = 5
    free.accept(10**12)
    assert not free.exhausted
    free.granted = 0
    assert free.exhausted
