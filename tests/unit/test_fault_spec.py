"""Fault specs: validation, guardrails, inheritance by children, breaker adaptation."""

from __future__ import annotations

import pytest
from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

from services.fault_injector.spec import (
    MAX_CHILDREN,
    MAX_FIXED,
    MAX_IDS,
    MAX_LABELS,
    MAX_LEAF_FAULTS,
    MAX_TEXT,
    Limits,
    Refusal,
    bounded,
    breaker_allows,
    is_unscoped,
    validate,
)

K = common_pb2.FaultKind
Level = common_pb2.Intensity
T = pb.TargetKind
M = pb.SelectorMode
LIMITS = Limits(max_duration_s=60.0)


def spec(
    kind: int = K.FAULT_KIND_BROWSER_CRASH,
    intensity: int = Level.INTENSITY_MODERATE,
    *,
    target: pb.TargetSelector | None = None,
    duration_s: float | None = 5.0,
    **fields: object,
) -> pb.FaultSpec:
    message = pb.FaultSpec(kind=kind, intensity=intensity, **fields)
    if target is None:
        target = pb.TargetSelector(
            kind=T.TARGET_KIND_AGENT, ids=["agent-0"], mode=M.SELECTOR_MODE_ALL
        )
    message.target.CopyFrom(target)
    if duration_s is not None:
        message.duration.FromNanoseconds(round(duration_s * 1e9))
    return message


def refused(message: pb.FaultSpec, *, force: bool = False) -> Refusal:
    with pytest.raises(Refusal) as caught:
        validate(message, force=force, limits=LIMITS)
    return caught.value


def test_a_scoped_spec_passes_and_keeps_its_duration() -> None:
    plan = validate(spec(), force=False, limits=LIMITS)
    assert plan.duration_s == 5.0
    assert not plan.composite


def test_a_spec_without_a_duration_is_refused_naming_the_maximum() -> None:
    # Taken as the maximum, an unset duration broke things for ten minutes by accident.
    refusal = refused(spec(duration_s=None))
    assert refusal.code == "INVALID_ARGUMENT"
    assert refusal.reason == "duration is required, at most 60 s (this injector's maximum)"
    composite = spec(
        K.FAULT_KIND_MULTIPLE_FAILURES,
        duration_s=None,
        children=[pb.FaultSpec(kind=K.FAULT_KIND_BROWSER_CRASH)],
    )
    assert "duration is required" in refused(composite).reason
    # A child without one takes its parent's.
    composite.duration.FromSeconds(7)
    assert validate(composite, force=False, limits=LIMITS).children[0].duration_s == 7


@pytest.mark.parametrize("seconds", [0.0, -3.0])
def test_a_duration_must_be_positive(seconds: float) -> None:
    refusal = refused(spec(duration_s=seconds))
    assert refusal.code == "INVALID_ARGUMENT"
    assert "positive" in refusal.reason


def test_a_duration_over_the_maximum_is_refused_naming_it() -> None:
    refusal = refused(spec(duration_s=61))
    assert refusal.code == "INVALID_ARGUMENT"
    assert "60 s" in refusal.reason


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (spec(kind=0), "unknown fault kind"),
        (spec(kind=42), "unknown fault kind"),
        (spec(intensity=0), "unknown intensity"),
        (spec(intensity=9), "unknown intensity"),
        (spec(target=pb.TargetSelector(kind=T.TARGET_KIND_AGENT, ids=["a"])), "selector mode"),
        (spec(target=pb.TargetSelector(kind=0, ids=["a"], mode=1)), "cannot target"),
        (
            spec(target=pb.TargetSelector(kind=T.TARGET_KIND_REPLICA, ids=["c"], mode=1)),
            "cannot target replica",
        ),
        (
            spec(target=pb.TargetSelector(kind=T.TARGET_KIND_AGENT, ids=["a"], mode=3)),
            "fixed needs a value",
        ),
        (
            spec(target=pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=4, value=101)),
            "1..100",
        ),
        (
            spec(target=pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=4, value=-5)),
            "1..100",
        ),
        (
            spec(target=pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=3, value=MAX_FIXED + 1)),
            f"fixed needs a value in 1..{MAX_FIXED}",
        ),
    ],
)
def test_unknown_or_malformed_parts_are_invalid_arguments(
    message: pb.FaultSpec, words: str
) -> None:
    refusal = refused(message)
    assert refusal.code == "INVALID_ARGUMENT"
    assert words in refusal.reason


def test_a_leaf_without_a_target_is_refused_but_leader_loss_needs_none() -> None:
    no_target = pb.FaultSpec(kind=K.FAULT_KIND_BROWSER_CRASH, intensity=Level.INTENSITY_MILD)
    no_target.duration.FromSeconds(5)
    assert "needs a target" in refused(no_target).reason
    leader = pb.FaultSpec(kind=K.FAULT_KIND_LEADER_LOSS, intensity=Level.INTENSITY_MILD)
    leader.duration.FromSeconds(5)
    assert validate(leader, force=False, limits=LIMITS).duration_s == 5.0
    # It hits the one leader whatever the selector's mode, so it needs no force.
    leader.target.CopyFrom(pb.TargetSelector(kind=T.TARGET_KIND_REPLICA, mode=M.SELECTOR_MODE_ALL))
    validate(leader, force=False, limits=LIMITS)


@pytest.mark.parametrize(
    "selector",
    [
        pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=M.SELECTOR_MODE_ALL),
        pb.TargetSelector(kind=T.TARGET_KIND_BROWSER, mode=M.SELECTOR_MODE_PERCENT, value=50),
        pb.TargetSelector(kind=T.TARGET_KIND_SHARD, mode=M.SELECTOR_MODE_PERCENT, value=100),
        # Naming the service names no instance of it: every agent would be hit.
        pb.TargetSelector(
            kind=T.TARGET_KIND_SERVICE, ids=["browser-agent"], mode=M.SELECTOR_MODE_ALL
        ),
    ],
)
def test_unscoped_selectors_need_force(selector: pb.TargetSelector) -> None:
    assert is_unscoped(selector)
    kind = K.FAULT_KIND_LATENCY if selector.kind == T.TARGET_KIND_SERVICE else None
    refusal = refused(spec(kind or K.FAULT_KIND_BROWSER_CRASH, target=selector))
    assert refusal.code == "INVALID_ARGUMENT"
    assert "force" in refusal.reason
    assert validate(
        spec(kind or K.FAULT_KIND_BROWSER_CRASH, target=selector), force=True, limits=LIMITS
    )


@pytest.mark.parametrize(
    "selector",
    [
        pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=M.SELECTOR_MODE_ONE),
        pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=M.SELECTOR_MODE_PERCENT, value=49),
        pb.TargetSelector(kind=T.TARGET_KIND_AGENT, mode=M.SELECTOR_MODE_FIXED, value=5),
        pb.TargetSelector(kind=T.TARGET_KIND_AGENT, ids=["agent-1"], mode=M.SELECTOR_MODE_ALL),
        pb.TargetSelector(kind=T.TARGET_KIND_SHARD, model="minilm-l6", mode=M.SELECTOR_MODE_ALL),
    ],
)
def test_scoped_or_small_selectors_need_no_force(selector: pb.TargetSelector) -> None:
    assert not is_unscoped(selector)
    validate(spec(target=selector), force=False, limits=LIMITS)


def test_latency_and_partition_act_only_between_agents_and_the_coordinator() -> None:
    good = pb.TargetSelector(
        kind=T.TARGET_KIND_SERVICE,
        ids=["browser-agent"],
        mode=M.SELECTOR_MODE_ONE,
        peer_service="coordinator",
    )
    validate(spec(K.FAULT_KIND_LATENCY, target=good), force=False, limits=LIMITS)
    other = pb.TargetSelector()
    other.CopyFrom(good)
    other.ids[:] = ["metrics"]
    assert "browser-agent" in refused(spec(K.FAULT_KIND_PARTITION, target=other)).reason
    peer = pb.TargetSelector()
    peer.CopyFrom(good)
    peer.peer_service = "recovery"
    assert "not supported" in refused(spec(K.FAULT_KIND_LATENCY, target=peer)).reason


def test_children_inherit_target_intensity_duration_labels_and_dry_run() -> None:
    parent = spec(
        K.FAULT_KIND_MULTIPLE_FAILURES,
        Level.INTENSITY_MILD,
        duration_s=9,
        dry_run=True,
        labels={"run": "r1"},
        children=[
            pb.FaultSpec(kind=K.FAULT_KIND_BROWSER_CRASH),
            pb.FaultSpec(kind=K.FAULT_KIND_LATENCY, intensity=Level.INTENSITY_SEVERE),
        ],
    )
    plan = validate(parent, force=False, limits=LIMITS)
    assert plan.composite
    first, second = plan.children
    assert first.spec.intensity == Level.INTENSITY_MILD
    assert second.spec.intensity == Level.INTENSITY_SEVERE
    assert first.spec.target.ids == ["agent-0"]
    assert first.duration_s == second.duration_s == 9
    assert first.spec.dry_run and second.spec.dry_run
    assert dict(second.spec.labels) == {"run": "r1"}
    assert [c.kind for c in plan.spec.children] == [
        K.FAULT_KIND_BROWSER_CRASH,
        K.FAULT_KIND_LATENCY,
    ]


def test_a_child_that_fails_a_guardrail_refuses_the_whole_fault() -> None:
    parent = spec(
        K.FAULT_KIND_MULTIPLE_FAILURES,
        children=[
            pb.FaultSpec(kind=K.FAULT_KIND_BROWSER_CRASH),
            pb.FaultSpec(
                kind=K.FAULT_KIND_BROWSER_CRASH,
                target=pb.TargetSelector(kind=T.TARGET_KIND_BROWSER, mode=M.SELECTOR_MODE_ALL),
            ),
        ],
    )
    refusal = refused(parent)
    assert refusal.reason.startswith("child 1: ")
    assert "force" in refusal.reason


def test_composites_need_children_and_a_cascade_a_fitting_interval() -> None:
    assert "needs children" in refused(spec(K.FAULT_KIND_MULTIPLE_FAILURES)).reason
    children = [pb.FaultSpec(kind=K.FAULT_KIND_BROWSER_CRASH)] * 3
    cascade = spec(K.FAULT_KIND_CASCADE, duration_s=10, children=children)
    assert "interval that is positive" in refused(cascade).reason
    cascade.interval.FromSeconds(10)  # as long as the cascade: it could never step
    assert "shorter than its duration (10 s), not 10 s" in refused(cascade).reason
    cascade.interval.FromSeconds(5)  # the third child would start at 10 s, as it ends
    assert "would start after 10 s" in refused(cascade).reason
    cascade.interval.FromSeconds(4)
    assert validate(cascade, force=False, limits=LIMITS).interval_s == 4
    leaf = spec(children=children)
    assert "takes no children" in refused(leaf).reason


def test_breakers_allow_by_state_and_intensity() -> None:
    closed, half, opened = (
        common_pb2.BREAKER_STATE_CLOSED,
        common_pb2.BREAKER_STATE_HALF_OPEN,
        common_pb2.BREAKER_STATE_OPEN,
    )
    for intensity in (Level.INTENSITY_MILD, Level.INTENSITY_MODERATE, Level.INTENSITY_SEVERE):
        assert breaker_allows(closed, intensity)
        assert breaker_allows(common_pb2.BREAKER_STATE_UNSPECIFIED, intensity)
        assert not breaker_allows(opened, intensity)
    assert breaker_allows(half, Level.INTENSITY_MILD)
    assert breaker_allows(half, Level.INTENSITY_MODERATE)
    assert not breaker_allows(half, Level.INTENSITY_SEVERE)


def leaves(count: int) -> list[pb.FaultSpec]:
    return [pb.FaultSpec(kind=K.FAULT_KIND_BROWSER_CRASH) for _ in range(count)]


def test_a_composite_with_too_many_children_is_refused_naming_the_cap() -> None:
    # 2,000 children once froze the injector while it applied them one by one.
    huge = spec(K.FAULT_KIND_MULTIPLE_FAILURES, children=leaves(2000))
    refusal = refused(huge)
    assert refusal.code == "INVALID_ARGUMENT"
    assert refusal.reason == (
        f"multiple_failures has 2000 children; a fault takes at most {MAX_CHILDREN}"
    )
    assert validate(
        spec(K.FAULT_KIND_MULTIPLE_FAILURES, children=leaves(MAX_CHILDREN)),
        force=False,
        limits=LIMITS,
    )
    # Nested composites count every leaf: 4 x 5 leaves is too many in one spec.
    nested = spec(
        K.FAULT_KIND_MULTIPLE_FAILURES,
        children=[
            pb.FaultSpec(kind=K.FAULT_KIND_MULTIPLE_FAILURES, children=leaves(5)) for _ in range(4)
        ],
    )
    assert f"more than {MAX_LEAF_FAULTS} leaf faults" in refused(nested).reason
    # A child composite is held to the cap too.
    inner = spec(
        K.FAULT_KIND_MULTIPLE_FAILURES,
        children=[pb.FaultSpec(kind=K.FAULT_KIND_MULTIPLE_FAILURES, children=leaves(17))],
    )
    assert refused(inner).code == "INVALID_ARGUMENT"


def test_selectors_labels_and_names_are_bounded() -> None:
    many = pb.TargetSelector(
        kind=T.TARGET_KIND_AGENT, ids=[f"a-{i}" for i in range(MAX_IDS + 1)], mode=1
    )
    assert (
        f"names {MAX_IDS + 1} ids; it may name at most {MAX_IDS}"
        in refused(spec(target=many)).reason
    )
    long_id = "x" * 100_000
    refusal = refused(spec(target=pb.TargetSelector(kind=1, ids=[long_id], mode=1)))
    assert f"at most {MAX_TEXT}" in refusal.reason
    assert len(refusal.reason) < 200  # quotes only a short prefix of what it rejects
    labels = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    assert f"at most {MAX_LABELS}" in refused(spec(labels=labels)).reason
    assert "values at most" in refused(spec(labels={"run": "v" * (MAX_TEXT + 1)})).reason


def test_bounded_cuts_a_spec_to_the_limits_and_keeps_a_fitting_one() -> None:
    fitting = spec(labels={"run": "r1"})
    assert bounded(fitting) == fitting
    huge = spec(K.FAULT_KIND_MULTIPLE_FAILURES, children=leaves(2000))
    huge.target.ids[:] = ["y" * 1000] * 1000
    cut = bounded(huge)
    assert len(cut.children) == MAX_CHILDREN and len(cut.target.ids) == MAX_IDS
    assert all(len(i) == MAX_TEXT for i in cut.target.ids)
    assert not bounded(pb.FaultSpec(kind=K.FAULT_KIND_LEADER_LOSS)).HasField("target")
