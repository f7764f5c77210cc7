"""Fault specs: validation, guardrails, and what each intensity of each kind means.

A spec is checked whole before anything is injected; a spec that fails a check
is refused (state REFUSED, nothing injected) with a status that says why.

What each intensity does, by kind ("the browser" is the targeted browser: the
one named, the one holding the targeted shard, or an agent's first ready
browser when an agent is targeted):

+-------------------+-------------------------+-------------------------+-------------------------+
| kind              | mild                    | moderate                | severe                  |
+===================+=========================+=========================+=========================+
| browser_crash     | crash the browser's     | kill the browser's      | kill the process trees  |
|                   | page (renderer, CDP     | process tree            | of every browser of the |
|                   | Page.crash)             |                         | agent                   |
+-------------------+-------------------------+-------------------------+-------------------------+
| memory_pressure   | allocate 25 % of        | 50 %                    | 90 %                    |
|                   | min(agent memory        |                         |                         |
|                   | budget,                 |                         |                         |
|                   | memory_pressure_cap_mb) |                         |                         |
|                   | in the page             |                         |                         |
+-------------------+-------------------------+-------------------------+-------------------------+
| connection_lost   | cut the agent's         | put the browser's page  | both                    |
|                   | coordinator session (it | offline for the         |                         |
|                   | reconnects by itself)   | duration                |                         |
+-------------------+-------------------------+-------------------------+-------------------------+
| component_failure | fail one shard session  | lose the page's WebGPU  | fail one session and    |
|                   | (the targeted shard, or | device; fail every      | lose the device (every  |
|                   | the browser's first)    | session of the browser  | session without webgpu) |
|                   |                         | when none of its shards |                         |
|                   |                         | runs on webgpu          |                         |
+-------------------+-------------------------+-------------------------+-------------------------+
| latency           | delay each RunShard     | 500 ms                  | 2 s                     |
|                   | activation and session  |                         |                         |
|                   | message of the agent by |                         |                         |
|                   | 100 ms                  |                         |                         |
+-------------------+-------------------------+-------------------------+-------------------------+
| partition         | drop the agent's        | drop them, and cut and  | as moderate, and every  |
|                   | RunShard activations,   | refuse the agent's      | page of the agent       |
|                   | keep its session (a     | session                 | offline                 |
|                   | grey failure)           |                         |                         |
+-------------------+-------------------------+-------------------------+-------------------------+
| leader_loss       | SIGSTOP the coordinator | SIGKILL the leader; the | SIGKILL the leader and  |
|                   | leader for the          | injector starts it      | leave it dead           |
|                   | duration, SIGCONT at    | again when the duration |                         |
|                   | its end                 | ends                    |                         |
+-------------------+-------------------------+-------------------------+-------------------------+

multiple_failures applies its children at once, each at its own intensity;
cascade applies them one after another, ``interval`` apart.

Latency and partition act on the path between the coordinator and the agent,
inside the agent (hooks DELAY and DROP), so they need no network privileges.

Guardrails: a top-level spec must name its duration, positive and at most the
service's maximum (a child without one takes its parent's); a composite has at
most ``MAX_CHILDREN`` children and a whole spec at most ``MAX_LEAF_FAULTS`` leaf
faults; a cascade's interval must be positive and shorter than its duration;
selectors, labels and names are bounded too (``MAX_IDS``, ``MAX_LABELS``,
``MAX_TEXT``), so a spec that makes no sense is refused at once instead of
tying up the injector; an unscoped selector (no ids and no model, with mode
all or percent >= 50) needs ``force``; unknown kinds, intensities, modes and
target kinds are refused. Breakers adapt what is allowed: closed allows every
intensity, half-open mild and moderate, open none (see :func:`breaker_allows`).
"""

from __future__ import annotations

import dataclasses

from webshard.common.v1 import common_pb2
from webshard.fault_injector.v1 import fault_injector_pb2 as pb

Kind = common_pb2.FaultKind
Intensity = common_pb2.Intensity
TargetKind = pb.TargetKind
Mode = pb.SelectorMode

COMPOSITE_KINDS = frozenset({Kind.FAULT_KIND_MULTIPLE_FAILURES, Kind.FAULT_KIND_CASCADE})
"""Kinds made of child faults."""

_BROWSER_SIDE = frozenset(
    {TargetKind.TARGET_KIND_AGENT, TargetKind.TARGET_KIND_BROWSER, TargetKind.TARGET_KIND_SHARD}
)
TARGET_KINDS: dict[int, frozenset[int]] = {
    Kind.FAULT_KIND_CONNECTION_LOST: _BROWSER_SIDE,
    Kind.FAULT_KIND_COMPONENT_FAILURE: _BROWSER_SIDE,
    Kind.FAULT_KIND_BROWSER_CRASH: _BROWSER_SIDE,
    Kind.FAULT_KIND_MEMORY_PRESSURE: _BROWSER_SIDE,
    Kind.FAULT_KIND_LATENCY: _BROWSER_SIDE | {TargetKind.TARGET_KIND_SERVICE},
    Kind.FAULT_KIND_PARTITION: _BROWSER_SIDE | {TargetKind.TARGET_KIND_SERVICE},
    Kind.FAULT_KIND_LEADER_LOSS: frozenset({TargetKind.TARGET_KIND_REPLICA}),
}
"""The target kinds each leaf kind can act on."""

AGENT_SERVICE_NAMES = frozenset({"browser-agent", "browser_agent"})
"""Service ids a latency or partition selector may name: the agents' side of the path."""
COORDINATOR_SERVICE_NAMES = frozenset({"", "coordinator"})
"""Peer services a latency or partition selector may name: the coordinator's side."""

MAX_DEPTH = 3
"""How deep multiple_failures and cascade may nest."""

UNSCOPED_PERCENT = 50
"""A percent selector with no ids and no model hitting at least this many needs force."""

MAX_CHILDREN = 16
"""Children one multiple_failures or cascade may have: enough for any scenario, and
each child is resolved and applied at once (thousands froze the injector)."""

MAX_LEAF_FAULTS = 16
"""Leaf faults one spec may hold, counted through every level of nesting."""

MAX_IDS = 64
"""Ids one selector may name."""

MAX_FIXED = 1000
"""The largest count a SELECTOR_MODE_FIXED selector may ask for."""

MAX_LABELS = 32
"""Labels one spec may carry."""

MAX_TEXT = 256
"""The longest id, model, peer service, label key or label value, in characters."""

_QUOTED = 32
"""How much of a rejected text a refusal quotes."""


class FaultError(Exception):
    """A fault that cannot be injected: a status code (by name), the reason, and its state."""

    state: int = pb.FAULT_STATE_FAILED

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.fault_id = ""
        """The fault it was recorded as, once recorded."""


class Refusal(FaultError):
    """A guardrail or a breaker refused the fault; nothing was injected."""

    state = pb.FAULT_STATE_REFUSED


@dataclasses.dataclass(frozen=True)
class Limits:
    """The guardrails' settings."""

    max_duration_s: float


@dataclasses.dataclass
class Plan:
    """A validated spec with its inherited and default values filled in."""

    spec: pb.FaultSpec
    """The effective spec: duration, intensity, target and labels as they apply."""
    duration_s: float
    interval_s: float = 0.0
    children: list[Plan] = dataclasses.field(default_factory=list)

    @property
    def composite(self) -> bool:
        """True for multiple_failures and cascade."""
        return self.spec.kind in COMPOSITE_KINDS


def kind_name(kind: int) -> str:
    """``browser_crash`` for FAULT_KIND_BROWSER_CRASH; the number when unknown."""
    try:
        return Kind.Name(kind).removeprefix("FAULT_KIND_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(kind)


def intensity_name(intensity: int) -> str:
    """``mild``, ``moderate`` or ``severe``; the number when unknown."""
    try:
        return Intensity.Name(intensity).removeprefix("INTENSITY_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(intensity)


def _names(wrapper_names: list[str], prefix: str) -> str:
    return ", ".join(
        name.removeprefix(prefix).lower()
        for name in wrapper_names
        if not name.endswith("_UNSPECIFIED")
    )


def _seconds(duration: object) -> float:
    nanos: int = duration.ToNanoseconds()  # type: ignore[attr-defined]
    return nanos / 1e9


def is_unscoped(selector: pb.TargetSelector) -> bool:
    """True when a selector names no ids and no model and hits all or half or more.

    A service selector's ids name the service, not its instances, so they scope nothing.
    """
    named = selector.kind != TargetKind.TARGET_KIND_SERVICE and any(i.strip() for i in selector.ids)
    if named or selector.model.strip():
        return False
    if selector.mode == Mode.SELECTOR_MODE_ALL:
        return True
    return selector.mode == Mode.SELECTOR_MODE_PERCENT and selector.value >= UNSCOPED_PERCENT


def breaker_allows(state: int, intensity: int) -> bool:
    """Closed (or unknown) allows every intensity, half-open mild and moderate, open none."""
    if state == common_pb2.BREAKER_STATE_OPEN:
        return False
    if state == common_pb2.BREAKER_STATE_HALF_OPEN:
        return intensity in (Intensity.INTENSITY_MILD, Intensity.INTENSITY_MODERATE)
    return True


def _quote(text: str) -> str:
    """A short prefix of ``text``, quoted, for a refusal's message."""
    return repr(text[:_QUOTED] + ("..." if len(text) > _QUOTED else ""))


def _count_leaves(spec: pb.FaultSpec) -> int:
    """Leaf faults in ``spec``; stops counting once past the limit (it is refused anyway),
    so a huge spec costs no more to count than a small one."""
    if not spec.children:
        return 1
    total = 0
    for child in spec.children:
        total += _count_leaves(child)
        if total > MAX_LEAF_FAULTS:
            break
    return total


def bounded(spec: pb.FaultSpec, depth: int = 0) -> pb.FaultSpec:
    """A copy of ``spec`` cut to the limits, to be recorded in the fault book.

    A refused spec is recorded as well; cut, one with thousands of children cannot
    swell the book or make every ListFaults answer too big to receive. A spec within
    the limits comes back unchanged.
    """
    cut = pb.FaultSpec()
    cut.CopyFrom(spec)
    if len(cut.children) > MAX_CHILDREN:
        del cut.children[MAX_CHILDREN:]
    if depth >= MAX_DEPTH:
        del cut.children[:]
    for index, child in enumerate(spec.children[: len(cut.children)]):
        cut.children[index].CopyFrom(bounded(child, depth + 1))
    if len(cut.target.ids) > MAX_IDS:
        del cut.target.ids[MAX_IDS:]
    for index, text in enumerate(cut.target.ids):
        cut.target.ids[index] = text[:MAX_TEXT]
    cut.target.model = cut.target.model[:MAX_TEXT]
    cut.target.peer_service = cut.target.peer_service[:MAX_TEXT]
    labels = sorted(cut.labels.items())
    cut.labels.clear()
    for key, value in labels[:MAX_LABELS]:
        cut.labels[key[:MAX_TEXT]] = value[:MAX_TEXT]
    if not spec.HasField("target"):
        cut.ClearField("target")
    return cut


def _check_bounds(spec: pb.FaultSpec, where: str) -> None:
    """Refuse lists and texts past their limits, before anything walks them."""
    if len(spec.children) > MAX_CHILDREN:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{where}{kind_name(spec.kind)} has {len(spec.children)} children; "
            f"a fault takes at most {MAX_CHILDREN}",
        )
    if len(spec.labels) > MAX_LABELS:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{where}{len(spec.labels)} labels; a fault carries at most {MAX_LABELS}",
        )
    for key, value in spec.labels.items():
        if not key or len(key) > MAX_TEXT or len(value) > MAX_TEXT:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"{where}label {_quote(key)}: keys must be 1 to {MAX_TEXT} characters "
                f"and values at most {MAX_TEXT}",
            )
    if not spec.HasField("target"):
        return
    selector = spec.target
    if len(selector.ids) > MAX_IDS:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{where}the selector names {len(selector.ids)} ids; it may name at most {MAX_IDS}",
        )
    texts = [("id", i) for i in selector.ids]
    texts += [("model", selector.model), ("peer service", selector.peer_service)]
    for what, text in texts:
        if len(text) > MAX_TEXT:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"{where}{what} {_quote(text)} is {len(text)} characters; "
                f"at most {MAX_TEXT} are allowed",
            )


def _check_selector(spec: pb.FaultSpec, force: bool) -> None:
    kind = spec.kind
    if not spec.HasField("target"):
        if kind == Kind.FAULT_KIND_LEADER_LOSS:
            return  # the leader is the target
        raise Refusal("INVALID_ARGUMENT", f"{kind_name(kind)} needs a target selector")
    selector = spec.target
    allowed = TARGET_KINDS[kind]
    if selector.kind not in allowed:
        choices = ", ".join(
            TargetKind.Name(k).removeprefix("TARGET_KIND_").lower()  # type: ignore[arg-type]
            for k in sorted(allowed)
        )
        try:
            given = TargetKind.Name(selector.kind).removeprefix("TARGET_KIND_").lower()
        except ValueError:
            given = str(selector.kind)
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{kind_name(kind)} cannot target {given}; it targets: {choices}",
        )
    if selector.mode not in (
        Mode.SELECTOR_MODE_ONE,
        Mode.SELECTOR_MODE_ALL,
        Mode.SELECTOR_MODE_FIXED,
        Mode.SELECTOR_MODE_PERCENT,
    ):
        raise Refusal(
            "INVALID_ARGUMENT",
            f"unknown selector mode {selector.mode}; "
            f"modes: {_names(list(Mode.keys()), 'SELECTOR_MODE_')}",
        )
    if selector.mode == Mode.SELECTOR_MODE_FIXED and not 1 <= selector.value <= MAX_FIXED:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"mode fixed needs a value in 1..{MAX_FIXED}, not {selector.value}",
        )
    if selector.mode == Mode.SELECTOR_MODE_PERCENT and not 1 <= selector.value <= 100:
        raise Refusal(
            "INVALID_ARGUMENT", f"mode percent needs a value in 1..100, not {selector.value}"
        )
    if selector.kind == TargetKind.TARGET_KIND_SERVICE:
        named = {i.strip() for i in selector.ids if i.strip()}
        if not named or not named <= AGENT_SERVICE_NAMES:
            raise Refusal(
                "INVALID_ARGUMENT",
                "latency and partition act on the path between the coordinator and browser "
                "agents: name the service browser-agent (ids) and the peer coordinator",
            )
        if selector.peer_service.strip() not in COORDINATOR_SERVICE_NAMES:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"peer service {selector.peer_service!r} is not supported; "
                "only the path to the coordinator is",
            )
    elif selector.peer_service.strip() not in COORDINATOR_SERVICE_NAMES:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"peer service {selector.peer_service!r} is not supported; "
            "only the path to the coordinator is",
        )
    # leader_loss hits the one leader whatever the selector says, so it needs no force.
    if is_unscoped(selector) and not force and kind != Kind.FAULT_KIND_LEADER_LOSS:
        raise Refusal(
            "INVALID_ARGUMENT",
            "the selector is unscoped (no ids, no model, and it hits all or at least half "
            "of the candidates); name ids or a model, or pass force to inject it anyway",
        )


def validate(
    spec: pb.FaultSpec,
    *,
    force: bool,
    limits: Limits,
    parent: Plan | None = None,
    depth: int = 0,
) -> Plan:
    """Check a spec against the guardrails and fill in what it inherits; raise Refusal."""
    where = f"child {depth}: " if parent is not None else ""
    # Checked on the spec as given, before it is copied or its children walked: a
    # spec with thousands of children is refused in microseconds.
    _check_bounds(spec, where)
    if parent is None:
        leaves = _count_leaves(spec)
        if leaves > MAX_LEAF_FAULTS:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"the spec holds more than {MAX_LEAF_FAULTS} leaf faults (nested ones "
                f"counted, at most {MAX_DEPTH} deep); split it into several faults",
            )
    effective = pb.FaultSpec()
    effective.CopyFrom(spec)
    kind = effective.kind
    if kind not in TARGET_KINDS and kind not in COMPOSITE_KINDS:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{where}unknown fault kind {kind}; kinds: {_names(list(Kind.keys()), 'FAULT_KIND_')}",
        )
    if parent is None and not effective.HasField("duration"):
        # Unset once meant the maximum: ten minutes of a fault nobody asked for.
        raise Refusal(
            "INVALID_ARGUMENT",
            f"duration is required, at most {limits.max_duration_s:g} s (this injector's maximum)",
        )
    if parent is not None:
        # A child takes what it leaves unset from its parent.
        if effective.intensity == Intensity.INTENSITY_UNSPECIFIED:
            effective.intensity = parent.spec.intensity
        if not effective.HasField("target") and parent.spec.HasField("target"):
            effective.target.CopyFrom(parent.spec.target)
        if not effective.HasField("duration"):
            effective.duration.CopyFrom(parent.spec.duration)
        effective.dry_run = parent.spec.dry_run
        for key, value in parent.spec.labels.items():
            effective.labels.setdefault(key, value)
    # A composite needs no intensity of its own; when it has one, its children inherit it.
    optional = kind in COMPOSITE_KINDS and effective.intensity == Intensity.INTENSITY_UNSPECIFIED
    if not optional and effective.intensity not in (
        Intensity.INTENSITY_MILD,
        Intensity.INTENSITY_MODERATE,
        Intensity.INTENSITY_SEVERE,
    ):
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{where}unknown intensity {effective.intensity} for {kind_name(kind)}; "
            f"intensities: {_names(list(Intensity.keys()), 'INTENSITY_')}",
        )
    # Set here: a top-level spec must have one, a child takes its parent's.
    duration_s = _seconds(effective.duration)
    if duration_s <= 0:
        raise Refusal("INVALID_ARGUMENT", f"{where}duration must be positive, not {duration_s:g} s")
    if duration_s > limits.max_duration_s:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{where}duration {duration_s:g} s exceeds this injector's maximum of "
            f"{limits.max_duration_s:g} s",
        )
    plan = Plan(spec=effective, duration_s=duration_s)
    if kind in COMPOSITE_KINDS:
        if depth >= MAX_DEPTH:
            raise Refusal("INVALID_ARGUMENT", f"faults nest at most {MAX_DEPTH} deep")
        if not effective.children:
            raise Refusal("INVALID_ARGUMENT", f"{where}{kind_name(kind)} needs children")
        if kind == Kind.FAULT_KIND_CASCADE:
            plan.interval_s = _seconds(effective.interval) if effective.HasField("interval") else 0
            if not 0 < plan.interval_s < duration_s:
                raise Refusal(
                    "INVALID_ARGUMENT",
                    f"{where}cascade needs an interval that is positive and shorter than "
                    f"its duration ({duration_s:g} s), not {plan.interval_s:g} s",
                )
            last_start = plan.interval_s * (len(effective.children) - 1)
            if last_start >= duration_s:
                raise Refusal(
                    "INVALID_ARGUMENT",
                    f"{where}the cascade's last child would start after {last_start:g} s, "
                    f"when the cascade ({duration_s:g} s) has already ended",
                )
        # A target here is inherited by the children that set none, and checked there.
        plan.children = [
            validate(child, force=force, limits=limits, parent=plan, depth=depth + 1)
            for child in effective.children
        ]
        del effective.children[:]
        effective.children.extend(child.spec for child in plan.children)
        return plan
    if effective.children:
        raise Refusal("INVALID_ARGUMENT", f"{where}{kind_name(kind)} takes no children")
    if effective.HasField("interval"):
        raise Refusal("INVALID_ARGUMENT", f"{where}only a cascade takes an interval")
    try:
        _check_selector(effective, force)
    except Refusal as exc:
        raise Refusal(exc.code, f"{where}{exc.reason}") from None
    return plan
