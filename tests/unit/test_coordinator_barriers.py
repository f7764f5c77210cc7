"""Model barriers: the bounds on a barrier's max pause."""

from __future__ import annotations

import math

import pytest

from services.coordinator.barriers import MAX_PAUSE_S, BarrierError, ModelBarriers


@pytest.mark.parametrize("max_pause_s", [1e15, MAX_PAUSE_S + 1, -1.0, 0.0, math.nan, math.inf])
async def test_a_max_pause_out_of_bounds_is_refused_naming_the_bound(max_pause_s: float) -> None:
    barriers = ModelBarriers()
    with pytest.raises(BarrierError, match=f"at most {MAX_PAUSE_S:g} s"):
        barriers.pause("m", max_pause_s)
    assert not barriers.held("m")


async def test_a_max_pause_within_bounds_holds_the_model_until_resumed() -> None:
    barriers = ModelBarriers()
    barrier_id = barriers.pause("m", MAX_PAUSE_S)
    assert barriers.held("m")
    assert barriers.pause("m", 0.5) == barrier_id  # a second pause keeps the barrier
    lifted = barriers.resume("m", barrier_id)
    assert lifted is not None and not barriers.held("m")
