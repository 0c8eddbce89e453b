"""Property: for any model shape and budget, a plan fits the budget and gives every MoE layer room for
at least its top-k experts, or it is refused naming the minimum."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from cache.budget import format_size
from cache.planner import Footprint, make_plan, minimum_budget
from fate_cli.errors import ResourceError


@st.composite
def footprints(draw):
    layers = draw(st.integers(1, 64))
    experts = draw(st.integers(1, 160))
    top_k = draw(st.integers(1, experts))
    hot = draw(st.integers(1, 400_000_000))
    return Footprint(
        moe_layers=tuple(range(layers)),
        num_experts=experts,
        top_k=top_k,
        non_expert=draw(st.integers(0, 20 * 10**9)),
        expert_hot=hot,
        expert_full=draw(st.integers(hot, 4 * hot)),
        kv_cache=draw(st.integers(0, 10**10)),
        workspace=draw(st.integers(0, 10**9)),
    )


@settings(max_examples=400, deadline=None, derandomize=True)
@given(fp=footprints(), budget=st.integers(1, 2 * 10**12), split=st.sampled_from(["shallow", "uniform"]),
       shallow=st.one_of(st.none(), st.integers(0, 70)), whole_first=st.booleans())
def test_a_plan_fits_or_is_refused_with_the_minimum(fp, budget, split, shallow, whole_first):
    try:
        plan = make_plan(fp, budget, split, shallow, whole_first)
    except ResourceError as err:
        assert budget < minimum_budget(fp)
        assert re.search(r"minimum of " + re.escape(format_size(minimum_budget(fp))), str(err))
        return
    assert plan.device_bytes <= budget
    for layer in fp.moe_layers:
        slots = plan.slots_for(layer)
        assert fp.top_k <= slots <= fp.num_experts
    if not whole_first:
        assert plan.full_layers == ()
    richer = make_plan(fp, budget * 3 // 2, split, shallow, whole_first)  # more budget never means fewer slots
    assert all(richer.slots_for(layer) >= plan.slots_for(layer) for layer in fp.moe_layers)
