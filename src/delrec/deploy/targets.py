"""Chips' delay limits: a small table of neuromorphic targets, every number with its source,
and the checks of a trained network against a target (``delrec report --target NAME``) and
against its own limit ``network.max_delay`` (``delrec report``, ``delrec export``).

Convention (docs/deployment.md#chips-delay-limits). delrec counts a delay ``d`` in steps
beyond the minimal latency: a recurrent spike arrives ``1 + d`` steps after it was emitted (the
loop's own step plus ``d``), a feedforward-delay synapse at position ``P`` delivers ``P`` steps
later. The chips below need at least one step for every synapse, so each feedforward layer runs
one step later there, a constant shift of the whole output and not a limit; what a chip bounds
is the delay on top of that one step, which is ``d`` (or ``P``). A target's ``max_delay`` is its
published limit mapped into this convention; ``published`` says how.

The checks read a hardware report (:func:`delrec.deploy.report.hardware_report`), whose delay
entries hold the integer delays a chip runs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass

PER_NEURON_KINDS = ("axonal", "shared")  # one delay per presynaptic neuron (or one per layer)


@dataclass(frozen=True)
class Target:
    """A chip and toolchain, with its delay limits in delrec's convention.

    ``max_delay``: the longest delay ``d`` (integer steps beyond the minimal one-step latency);
    ``per_synapse``: True if every synapse has its own delay (any delrec delay type runs),
    False if a delay belongs to the presynaptic neuron (axonal and shared delays run, and a
    synaptic or feedforward projection whose synapses from each neuron share one delay);
    ``delay_bits``: the bits a delay value is stored in, or ``None`` where no source states it;
    ``recurrent_delays``: False where the toolchain delays a neuron's output to the next layer
    only, so a recurrent loop runs with no delay beyond its one step (``d = 0``). Each
    ``*_source`` holds the citation (address, file or page, and the statement).
    """

    name: str
    chip: str
    max_delay: int
    published: str
    max_delay_source: str
    per_synapse: bool
    granularity_source: str
    delay_bits: int | None = None
    delay_bits_source: str | None = None
    recurrent_delays: bool = True
    recurrent_source: str | None = None

    @property
    def granularity(self) -> str:
        return "per synapse" if self.per_synapse else "per neuron (axonal)"


_LAVA_DL = "https://github.com/lava-nc/lava-dl/blob"
_SPYNNAKER = "https://github.com/SpiNNakerManchester/sPyNNaker/blob"
_SPYNNAKER_CONSTANTS = (
    f"{_SPYNNAKER}/00cc9647e8ee195f56d6658e61240c60333935cc/"
    "spynnaker/pyNN/utilities/constants.py: 'natively supported delays for all abstract_models' "
    "MAX_SUPPORTED_DELAY_TICS = 16, MAX_DELAY_BLOCKS = 8, MAX_TIMER_TICS_SUPPORTED_PER_BLOCK = 16, "
    "'the minimum supported delay slot between two neurons' MIN_SUPPORTED_DELAY = 1 (later "
    "releases changed these constants, e.g. MAX_SUPPORTED_DELAY_TICS = 64 at commit 2bf8a116)"
)
_SPYNNAKER_ROWS = (
    f"{_SPYNNAKER}/609df835bb2411563437e754cac44418e348b232/"
    "neural_modelling/src/neuron/synapse_row.h: every synaptic word is "
    "'| Weight | Delay | Synapse Type | Neuron Index |', one delay per synapse"
)

TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            name="loihi2-lava-dl",
            chip="Intel Loihi 2 through lava-dl: SLAYER blocks with axonal delays, exported to "
            "the network file lava.lib.dl.netx loads",
            max_delay=62,
            published="a block's axonal delay is clamped into [0, 62] steps and applied after the "
            "block's one-step delay_shift, exported as floor(delay): arrival 1 + d with "
            "d <= 62, so max_delay = 62",
            max_delay_source=(
                f"{_LAVA_DL}/4c0c0c405600d856807a2a35ab897acec72f942a/"
                "src/lava/lib/dl/slayer/block/cuba.py: "
                "'self.delay = Delay(max_delay=62) if delay is True else None'; "
                f"{_LAVA_DL}/dfa245c2f29f3cc37caf2273e4b784d26a55edf8/"
                "src/lava/lib/dl/slayer/axon/delay.py: Delay.clamp does "
                "'self.delay.data.clamp_(0, self.max_delay)'; "
                f"{_LAVA_DL}/098249029a39c1f99ca06a299adef7acb7ea3f82/"
                "src/lava/lib/dl/slayer/block/base.py: forward applies 'delay(x, 1)' "
                "(delay_shift: 'flag to simulate spike propagation delay from one layer to next') "
                "before 'self.delay(x)', and export_hdf5 writes 'torch.floor(d.delay)' as the "
                "layer's 'delay' dataset"
            ),
            per_synapse=False,
            granularity_source=(
                f"{_LAVA_DL}/dfa245c2f29f3cc37caf2273e4b784d26a55edf8/"
                "src/lava/lib/dl/slayer/axon/delay.py: 'Learnable axonal delay module. The delays "
                "operate on channel dimension' (one delay per neuron of the block)"
            ),
            recurrent_delays=False,
            recurrent_source=(
                f"{_LAVA_DL}/098249029a39c1f99ca06a299adef7acb7ea3f82/"
                "src/lava/lib/dl/slayer/block/base.py: AbstractRecurrent ('s_out[t] = "
                "f_s(W s_in[t] + R s_out[t-1])') runs its recurrence through "
                "'recurrent.custom_recurrent(z, self.neuron, self.recurrent_synapse)' and only "
                "then applies 'delay(x, 1)' and 'self.delay(x)' to the block's output; its "
                "export_hdf5 is 'pass'"
            ),
        ),
        Target(
            name="spinnaker",
            chip="SpiNNaker 1 with sPyNNaker, delays held in the synaptic rows of the "
            "postsynaptic core",
            max_delay=15,
            published="synaptic delays of 1 to 16 time steps (MIN_SUPPORTED_DELAY = 1, "
            "MAX_SUPPORTED_DELAY_TICS = 16); a PyNN delay is the whole time from spike to "
            "effect, 1 + d <= 16, so max_delay = 15",
            max_delay_source=_SPYNNAKER_CONSTANTS,
            per_synapse=True,
            granularity_source=_SPYNNAKER_ROWS,
        ),
        Target(
            name="spinnaker-delay-ext",
            chip="SpiNNaker 1 with sPyNNaker and delay-extension cores for longer delays",
            max_delay=143,
            published="16 native steps plus MAX_DELAY_BLOCKS x MAX_TIMER_TICS_SUPPORTED_PER_BLOCK "
            "= 8 x 16 = 128 steps of delay extension: 1 + d <= 144, so max_delay = 143",
            max_delay_source=(
                f"{_SPYNNAKER_CONSTANTS}; {_SPYNNAKER}/bcef866da7f8c505600f1c2787e87a4c3be783fd/"
                "spynnaker/pyNN/models/pynn_projection_common.py: "
                "'_delay_extension_max_supported_delay = (constants.MAX_DELAY_BLOCKS * "
                "constants.MAX_TIMER_TICS_SUPPORTED_PER_BLOCK)  # The maximum delay supported by "
                "the Delay extension, in ticks', and a projection whose maximum delay exceeds the "
                "native one plus that is refused ('The maximum delay {} for projection is not "
                "supported')"
            ),
            per_synapse=True,
            granularity_source=_SPYNNAKER_ROWS,
        ),
    )
}


class UnknownTargetError(ValueError):
    """A target name not in :data:`TARGETS`; the message lists the known ones."""


def get_target(name: str) -> Target:
    """The target ``name`` of :data:`TARGETS`; :class:`UnknownTargetError` names the known ones."""
    if name in TARGETS:
        return TARGETS[name]
    close = [known for known in TARGETS if known.startswith(name)] or difflib.get_close_matches(
        name, list(TARGETS), n=1
    )
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownTargetError(
        f"unknown target {name!r}{hint}; known targets: {', '.join(TARGETS)} "
        "(`delrec report --list-targets` shows their limits and sources)"
    )


def bits_for(max_delay: int) -> int:
    """Bits a delay value in ``0 … max_delay`` needs (at least 1)."""
    return max(1, math.ceil(math.log2(max_delay + 1)))


# --------------------------------------------------------------------------- checks
def _projections(report: dict):
    """``(layer name, delay entry)`` for every delay projection of a hardware report."""
    return [(layer["name"], d) for layer in report["layers"] for d in layer["delays"]]


def _what(name: str, entry: dict) -> str:
    place = "feedforward" if entry["kind"] == "feedforward" else f"recurrent {entry['kind']}"
    return f"{name} {place} delays"


def max_delay_check(report: dict, max_delay: int | None) -> dict:
    """Every integer delay of ``report`` against the network's own limit ``max_delay``.

    Returns ``{"max_delay", "largest", "pass", "exceeding"}``: ``largest`` is the longest
    integer delay of any projection (``None`` without delays), ``exceeding`` names each
    projection above the limit with its maximum; ``pass`` is True without a limit.
    """
    largest = max((d["max"] for _, d in _projections(report)), default=None)
    exceeding = [
        {"projection": _what(name, d), "max": d["max"]}
        for name, d in _projections(report)
        if max_delay is not None and d["max"] > max_delay
    ]
    return {
        "max_delay": max_delay,
        "largest": largest,
        "pass": not exceeding,
        "exceeding": exceeding,
    }


def target_check(report: dict, target: Target) -> dict:
    """The network of ``report`` against ``target``: per delay projection its longest delay
    against ``target.max_delay``, its delay type against the target's granularity, and the bits
    its delay values need against ``target.delay_bits`` (``"n/a"`` where none is published).

    Returns ``{"target": the target's fields, "checks": [{"check", "projection", "status",
    "detail"}], "pass": no check failed}``; ``status`` is ``"PASS"``, ``"FAIL"`` or ``"n/a"``.
    """
    checks = []
    for name, entry in _projections(report):
        what = _what(name, entry)
        within = entry["max"] <= target.max_delay
        checks.append(
            {
                "check": "max delay",
                "projection": what,
                "status": "PASS" if within else "FAIL",
                "detail": f"longest delay d = {entry['max']} {'<=' if within else '>'} "
                f"{target.max_delay} steps"
                + (
                    ""
                    if within or (entry["kind"] != "feedforward" and not target.recurrent_delays)
                    else f" (train for it: --set network.max_delay={target.max_delay})"
                ),
            }
        )
        checks.append(_granularity_check(what, entry, target))
        if entry["kind"] != "feedforward" and not target.recurrent_delays:
            checks.append(_recurrent_check(what, entry))
        needed = bits_for(entry["max"])
        if target.delay_bits is None:
            status, detail = "n/a", f"needs {needed} bits; the target's delay bits are unpublished"
        else:
            status = "PASS" if needed <= target.delay_bits else "FAIL"
            detail = f"needs {needed} bits, the target stores {target.delay_bits}"
        checks.append(
            {"check": "delay bits", "projection": what, "status": status, "detail": detail}
        )
    return {
        "target": asdict(target),
        "checks": checks,
        "pass": all(c["status"] != "FAIL" for c in checks),
    }


def _granularity_check(what: str, entry: dict, target: Target) -> dict:
    """Whether the target runs this projection's delays: per-synapse targets run every type; a
    per-neuron target runs axonal and shared delays, and synaptic or feedforward ones only if
    the synapses (non-zero weights) from each presynaptic neuron share one delay."""
    kind, mixed = entry["kind"], entry["neurons_with_mixed_delays"]
    if target.per_synapse:
        status, detail = "PASS", f"{kind} delays; the target has one delay per synapse"
    elif kind in PER_NEURON_KINDS:
        status, detail = "PASS", f"{kind} delays are per neuron, as the target's"
    elif mixed == 0:
        status = "PASS"
        detail = (
            f"{kind} delays, but the synapses from each neuron share one delay: they run as "
            "per-neuron delays"
        )
    else:
        status = "FAIL"
        fix = (
            "train with --set network.delay_type=axonal (or shared)"
            if kind == "synaptic"
            else "choose a model without feedforward delays"
        )
        detail = (
            f"{kind} delays differ across the synapses of {mixed} presynaptic neurons; the "
            f"target has one delay per neuron ({fix})"
        )
    return {"check": "delay type", "projection": what, "status": status, "detail": detail}


def _recurrent_check(what: str, entry: dict) -> dict:
    """A recurrent projection on a target whose delays act on a neuron's output to the next
    layer only: its loop runs one step (``d = 0``), so any longer recurrent delay fails."""
    if entry["max"] == 0:
        status, detail = "PASS", "every recurrent delay is 0: the loop's own step, as the target's"
    else:
        status = "FAIL"
        detail = (
            f"recurrent delays up to d = {entry['max']}, but the target delays a neuron's output "
            "to the next layer, not its recurrent synapses (its recurrence reads s[t-1]); "
            "choose a target with delays per synapse (delrec report --list-targets), or a model "
            "without recurrent delays (--model rsnn)"
        )
    return {"check": "recurrent delays", "projection": what, "status": status, "detail": detail}


# --------------------------------------------------------------------------- text
def format_max_delay_check(check: dict) -> str:
    """One line about the network's own limit."""
    largest = check["largest"]
    if check["max_delay"] is None:
        return "network.max_delay: not set (delays up to MAX_DELAY = 65535 steps)" + (
            "" if largest is None else f"; longest integer delay {largest} steps"
        )
    if check["pass"]:
        return (
            f"network.max_delay: {check['max_delay']} steps; every integer delay is within it"
            + ("" if largest is None else f" (longest {largest})")
        )
    over = ", ".join(f"{e['projection']} (max {e['max']})" for e in check["exceeding"])
    return f"network.max_delay: {check['max_delay']} steps; EXCEEDED by {over}"


def format_target_check(check: dict) -> str:
    """The PASS/FAIL lines of :func:`target_check`."""
    target = check["target"]
    lines = [
        f"target {target['name']}: {target['chip']}",
        f"  limits: delays d <= {target['max_delay']} steps beyond the one-step minimum, "
        f"{'per synapse' if target['per_synapse'] else 'per neuron (axonal)'}, delay bits "
        + ("unpublished" if target["delay_bits"] is None else str(target["delay_bits"]))
        + ("" if target["recurrent_delays"] else ", no delays on recurrent synapses"),
    ]
    if not check["checks"]:
        lines.append("  PASS  the network has no delays")
    for c in check["checks"]:
        lines.append(f"  {c['status']:<4}  {c['check']}: {c['projection']}: {c['detail']}")
    failed = sum(c["status"] == "FAIL" for c in check["checks"])
    lines.append(
        f"  verdict: {'PASS' if check['pass'] else 'FAIL'}"
        + (f" ({failed} check{'s' if failed != 1 else ''} failed)" if failed else "")
    )
    return "\n".join(lines)


def format_targets() -> str:
    """The table of targets with their sources (``delrec report --list-targets``)."""
    blocks = []
    for t in TARGETS.values():
        blocks.append(
            "\n".join(
                [
                    f"{t.name}: {t.chip}",
                    f"  max_delay = {t.max_delay} steps: {t.published}",
                    f"    source: {t.max_delay_source}",
                    f"  delays {t.granularity}",
                    f"    source: {t.granularity_source}",
                    *(
                        []
                        if t.recurrent_delays
                        else [
                            "  no delays on recurrent synapses (a recurrent loop runs with d = 0)",
                            f"    source: {t.recurrent_source}",
                        ]
                    ),
                    "  delay bits: "
                    + (
                        "no source states them"
                        if t.delay_bits is None
                        else f"{t.delay_bits}\n    source: {t.delay_bits_source}"
                    ),
                ]
            )
        )
    return "\n\n".join(blocks)
