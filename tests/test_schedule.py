"""Hop schedule bookkeeping, checked against the call lists recorded in the token2wav fixtures."""

import json
from pathlib import Path

import pytest

from token2wav.streaming.schedule import (
    HopPlan,
    chunk_tokens,
    final_emission,
    nearby_multiples,
    plan_stream,
    prompt_pad,
    ready_emissions,
    validate_hop,
)

DATA = Path(__file__).parent / "data"


def _reference_plan(case: str) -> tuple[HopPlan, dict]:
    meta = json.loads((DATA / f"{case}_token2wav.json").read_text())
    chunk = chunk_tokens(meta["token_hop_len"] * meta["token_mel_ratio"], meta["token_mel_ratio"])
    plan = HopPlan(
        hop=chunk,
        pad=prompt_pad(meta["prompt_tokens"], chunk),
        lookahead=meta["pre_lookahead_len"],
        schedule="exponential",
        max_hop=meta["token_max_hop_len"],
    )
    return plan, meta


@pytest.mark.parametrize("case", ["cv2", "cv3"])
def test_reference_call_sequence(case):
    plan, meta = _reference_plan(case)
    assert plan.pad == meta["prompt_token_pad"]
    got = plan_stream(plan, [meta["tokens"]])
    want = [(c["prefix_len"], c["token_offset"], c["finalize"]) for c in meta["calls"]]
    assert [(e.prefix, e.start, e.finalize) for e in got] == want
    for e, c in zip(got, meta["calls"]):
        assert e.frames(meta["token_mel_ratio"])[1] - e.frames(meta["token_mel_ratio"])[0] == c["mel_frames"]


@pytest.mark.parametrize("case", ["cv2", "cv3"])
@pytest.mark.parametrize("sizes", [[1], [2], [7], [3, 50], [40]])
def test_push_sizes_do_not_change_the_plan(case, sizes):
    plan, meta = _reference_plan(case)
    n = meta["tokens"]
    pushes, i = [], 0
    while sum(pushes) < n:
        pushes.append(min(sizes[i % len(sizes)], n - sum(pushes)))
        i += 1
    assert plan_stream(plan, pushes) == plan_stream(plan, [n])


def test_fixed_and_exponential_hops():
    fixed = HopPlan(hop=10, pad=3, lookahead=2)
    assert [fixed.hop_at(i) for i in range(4)] == [13, 10, 10, 10]
    expo = HopPlan(hop=10, pad=0, lookahead=2, schedule="exponential", max_hop=40)
    assert [expo.hop_at(i) for i in range(6)] == [10, 20, 40, 40, 40, 40]
    assert expo.hop_at(10_000) == 40
    # No cap given: exponential never grows.
    assert HopPlan(hop=10, pad=0, lookahead=0, schedule="exponential").hop_at(5) == 10


def test_emissions_tile_the_tokens():
    plan = HopPlan(hop=8, pad=5, lookahead=3, schedule="exponential", max_hop=32)
    ems = plan_stream(plan, [1] * 157)
    assert ems[0].start == 0 and ems[-1].end == 157 and ems[-1].finalize
    for a, b in zip(ems, ems[1:]):
        assert a.end == b.start
        assert not a.finalize
        assert a.prefix == a.end + 3
    # Every non-final boundary sits on the chunk grid once the prompt (11 tokens, pad 5) is counted.
    assert all((11 + e.end) % 8 == 0 for e in ems[:-1])


def test_ready_emissions_needs_lookahead():
    plan = HopPlan(hop=4, pad=0, lookahead=3)
    assert ready_emissions(plan, 6, 0, 0) == []
    assert [e.end for e in ready_emissions(plan, 7, 0, 0)] == [4]
    assert [e.end for e in ready_emissions(plan, 15, 0, 0)] == [4, 8, 12]
    assert final_emission(15, 12, 3).prefix == 15


def test_zero_lookahead_can_leave_nothing_for_the_final_call():
    plan = HopPlan(hop=4, pad=0, lookahead=0)
    ems = plan_stream(plan, [8])
    assert [(e.start, e.end, e.finalize) for e in ems] == [(0, 4, False), (4, 8, False), (8, 8, True)]


def test_prompt_pad():
    assert prompt_pad(24, 25) == 1
    assert prompt_pad(13, 25) == 12
    assert prompt_pad(50, 25) == 0
    assert prompt_pad(0, 25) == 0


def test_chunk_tokens_errors_name_valid_values():
    assert chunk_tokens(50, 2) == 25
    assert chunk_tokens(24, 3) == 8
    with pytest.raises(ValueError, match=r"static_chunk_size=50.*token_mel_ratio=3.*\[45, 48, 51, 54\]"):
        chunk_tokens(50, 3)
    with pytest.raises(ValueError, match="token_mel_ratio"):
        chunk_tokens(50, 0)
    with pytest.raises(ValueError, match="static_chunk_size"):
        chunk_tokens(0, 2)


def test_validate_hop():
    assert validate_hop(50, 25) == 50
    with pytest.raises(ValueError, match=r"hop=30 tokens is not a multiple of the model's chunk \(25"):
        validate_hop(30, 25)
    assert validate_hop(30, 25, dynamic=True) == 30
    with pytest.raises(ValueError, match="max_hop"):
        validate_hop(0, 25, name="max_hop")
    with pytest.raises(TypeError, match="hop must be an int"):
        validate_hop(2.5, 25)


def test_plan_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule must be one of"):
        HopPlan(hop=4, pad=0, lookahead=0, schedule="linear")
    with pytest.raises(ValueError, match="max_hop=2 must be >= hop=4"):
        HopPlan(hop=4, pad=0, lookahead=0, max_hop=2)


def test_nearby_multiples():
    assert nearby_multiples(50, 3) == [45, 48, 51, 54]
    assert nearby_multiples(2, 3) == [3, 6]
