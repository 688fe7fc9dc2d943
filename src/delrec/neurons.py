"""Spiking neuron models and surrogate gradients (docs/design.md#neuron-models).

Two layers of API, in the style of Norse:

* pure step functions (``lif_step``, ``adlif_step``, ``leaky_integrator_step``) that map
  ``(input current, state, parameters) -> (spikes, new state)`` for one time step;
* ``nn.Module`` wrappers (``LIF``, ``AdLIF``) that hold the parameters, implement the
  :class:`Neuron` protocol used by the recurrent-delay layer, and run a whole time-major
  sequence ``(T, B, N)`` when called; ``LeakyIntegrator``, the readout, runs a sequence the
  same way but never fires, so it is not a :class:`Neuron`.

Time is counted in steps: ``tau`` is a number of time steps, not seconds. All tensors are
time-major, ``x[t, b, n]``; a state is a tuple of ``(B, N)`` tensors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


# --------------------------------------------------------------------------- parameter checks
def check_number(model: str, name: str, value) -> None:
    """A TypeError unless ``value`` (a parameter ``name`` of ``model``) is a real number (not a
    bool, a string or a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{model} {name} must be a number, got {value!r} ({type(value).__name__}); "
            "convert it, e.g. float(value)"
        )


def check_flag(model: str, name: str, value) -> None:
    """A TypeError unless ``value`` (an option ``name`` of ``model``) is True or False: a
    string such as ``"False"`` would count as true."""
    if not isinstance(value, bool):
        raise TypeError(f"{model} {name} must be True or False, got {value!r}")


def check_positive(model: str, name: str, value, meaning: str) -> None:
    """A TypeError or ValueError unless ``value`` is a finite number > 0 (``meaning``: what a
    zero, negative or non-finite value would break)."""
    check_number(model, name, value)
    if not 0 < value < math.inf:
        raise ValueError(f"{model} {name} must be a finite number > 0, got {value}: {meaning}")


# --------------------------------------------------------------------------- surrogates
class Surrogate:
    """Heaviside step ``Θ(x)`` (with ``Θ(0) = 1``) whose backward uses ``derivative(x)``."""

    def derivative(self, x: Tensor) -> Tensor:
        """Surrogate derivative ``ψ'(x)``, same shape as ``x``."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return _SurrogateSpike.apply(x, self)


class _SurrogateSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, surrogate: Surrogate) -> Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate.derivative(x), None


@dataclass(frozen=True)
class Triangle(Surrogate):
    """``ψ'(x) = max(0, γ - |x|) / γ²`` (the paper's default for SSC and PS-MNIST)."""

    gamma: float = 1.0

    def __post_init__(self):
        check_positive(
            "Triangle", "gamma", self.gamma, "the half-width of ψ' (0 or NaN: NaN gradients)"
        )

    def derivative(self, x: Tensor) -> Tensor:
        return (self.gamma - x.abs()).clamp(min=0) / self.gamma**2


@dataclass(frozen=True)
class ATan(Surrogate):
    """``ψ'(x) = (α/2) / (1 + (π α x / 2)²)``, SpikingJelly's ``ATan`` (SHD uses α = 5)."""

    alpha: float = 2.0

    def __post_init__(self):
        check_positive(
            "ATan", "alpha", self.alpha, "the sharpness of ψ' (0: zero gradients, < 0: wrong sign)"
        )

    def derivative(self, x: Tensor) -> Tensor:
        return (self.alpha / 2) / (1 + (math.pi / 2 * self.alpha * x) ** 2)


SURROGATES = {"triangle": Triangle, "atan": ATan}


def make_surrogate(name: str, **kwargs) -> Surrogate:
    """Surrogate by name: ``"triangle"`` (kwarg ``gamma``) or ``"atan"`` (kwarg ``alpha``)."""
    try:
        return SURROGATES[name.lower()](**kwargs)
    except KeyError:
        raise ValueError(
            f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}"
        ) from None


def as_surrogate(surrogate: Surrogate | str) -> Surrogate:
    """``surrogate`` itself, or the surrogate of that name with its default parameters."""
    if isinstance(surrogate, str):
        return make_surrogate(surrogate)
    if not isinstance(surrogate, Surrogate):
        raise TypeError(
            f"surrogate must be a delrec.neurons.Surrogate (Triangle(gamma), ATan(alpha)) or one "
            f"of the names {sorted(SURROGATES)}, got {type(surrogate).__name__}"
        )
    return surrogate


# --------------------------------------------------------------------------- protocol
@runtime_checkable
class Neuron(Protocol):
    """What the recurrent-delay layer needs from a neuron model.

    ``initial_state(like)`` returns the state before the first step for inputs shaped like
    ``like`` (``(B, N)``); ``step(u, state)`` consumes the input current ``u`` (``(B, N)``) and
    returns ``(spikes, new_state)``. A user-written neuron only has to provide these two
    methods (and be an ``nn.Module`` if it has parameters); gradients then flow by autograd.
    """

    def initial_state(self, like: Tensor) -> State: ...

    def step(self, u: Tensor, state: State) -> tuple[Tensor, State]: ...


def check_step(neuron, u: Tensor, spikes) -> None:
    """A ValueError unless ``spikes``, what ``neuron.step(u, state)`` returned, is a tensor
    shaped like the input current ``u`` ``(B, N)`` (a user-written neuron's mistake would
    otherwise broadcast silently), a TypeError unless it has ``u``'s dtype."""
    if not torch.is_tensor(spikes) or spikes.shape != u.shape:
        got = tuple(spikes.shape) if torch.is_tensor(spikes) else type(spikes).__name__
        raise ValueError(
            f"{type(neuron).__name__}.step(u, state) returned spikes of shape {got} for an input "
            f"current of shape {tuple(u.shape)}; step must return (spikes shaped like u, state)"
        )
    if spikes.dtype != u.dtype:  # a bool or float64 result failed later, deep inside torch
        raise TypeError(
            f"{type(neuron).__name__}.step(u, state) returned spikes of dtype {spikes.dtype} for "
            f"an input current of dtype {u.dtype}; step must return spikes of u's dtype (e.g. "
            "(v >= threshold).to(u.dtype))"
        )


def check_initial_state(neuron, state) -> None:
    """A TypeError unless ``state``, what ``neuron.initial_state(like)`` returned, is a tuple
    of tensors (the layer detaches and carries each of them between chunks)."""
    if not isinstance(state, tuple) or not all(torch.is_tensor(x) for x in state):
        raise TypeError(
            f"{type(neuron).__name__}.initial_state(like) returned {type(state).__name__}; it "
            "must return the neuron's state as a tuple of tensors, e.g. (torch.zeros_like(like),)"
        )


def check_current(u: Tensor, model: str) -> None:
    """A TypeError or ValueError unless ``u`` is a time-major float sequence ``(T, B, N)`` (or
    ``(T, N)``) with ``T ≥ 1`` and finite values (one device sync)."""
    if not torch.is_tensor(u) or not u.is_floating_point():
        got = u.dtype if torch.is_tensor(u) else type(u).__name__
        raise TypeError(f"{model} takes a float tensor of input current, got {got}")
    if u.dim() not in (2, 3) or u.shape[0] == 0:
        raise ValueError(
            f"{model} expects a time-major input current (T, B, N) or (T, N) with T >= 1, got "
            f"shape {tuple(u.shape)}; transpose batch-first data with x.transpose(0, 1)"
        )
    refuse_nonfinite(u, model)


def first_nonfinite(x: Tensor) -> tuple[list[int], float] | None:
    """The index and value of the first NaN or Inf of ``x`` (row-major order), or None: one
    device sync, a sum, when ``x`` is finite (NaN and Inf propagate into it; a huge finite
    ``x`` may overflow it, then a search finds nothing)."""
    if math.isfinite(x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)).item()):
        return None  # (.item() then math: a third of the time of a tensor isfinite, per call)
    bad = (~torch.isfinite(x)).nonzero()
    if not len(bad):
        return None
    index = bad[0].tolist()
    return index, x[tuple(index)].item()


def refuse_nonfinite(u: Tensor, model: str) -> None:
    """A ValueError naming the first NaN or Inf of the input current ``u`` ``(T, B, N)`` or
    ``(T, N)`` of ``model``, if it holds one (:func:`first_nonfinite`)."""
    found = first_nonfinite(u)
    if found is not None:
        index, value = found
        names = ("step", "batch item", "neuron") if len(index) == 3 else ("step", "neuron")
        place = ", ".join(f"{name} {i}" for name, i in zip(names, index))
        raise ValueError(
            f"the input current of {model} is not finite: {value} at {place}; NaN or Inf in a "
            "layer's input silences its neurons and spoils every gradient: check the data and "
            "the layers before this one (torch.isfinite)"
        )


def run_steps(neuron, u: Tensor, state: State) -> tuple[Tensor, State]:
    """Spikes ``(T, B, N)`` of any :class:`Neuron` driven by ``u`` ``(T, B, N)`` from
    ``state``, and its state after the last step."""
    spikes = []
    for u_t in u:
        s_t, state = neuron.step(u_t, state)
        check_step(neuron, u_t, s_t)
        spikes.append(s_t)
    return torch.stack(spikes), state


def check_state(state, expected: State, model: str) -> None:
    """A ValueError (TypeError for a dtype) unless ``state`` has the tensors of ``expected``
    (the initial state of the same batch): their number, shapes and dtypes."""
    if not isinstance(state, tuple) or len(state) != len(expected):
        got = len(state) if isinstance(state, tuple) else type(state).__name__
        raise ValueError(
            f"the state of the {model} is a tuple of {len(expected)} tensor(s), got {got}; pass "
            "the state the same layer (and neuron model) returned"
        )
    for x, want in zip(state, expected):
        if tuple(x.shape) != tuple(want.shape):
            raise ValueError(
                f"the state of the {model} holds a tensor of shape {tuple(x.shape)}, expected "
                f"(B, N) = {tuple(want.shape)}; a state belongs to the batch it was computed for"
            )
        if x.dtype != want.dtype:
            raise TypeError(f"the state of the {model} holds {x.dtype}, the input is {want.dtype}")


def check_state_finite(state: State, model: str) -> None:
    """A ValueError if a tensor of ``state`` (a tuple of tensors) holds NaN or Inf (one device
    sync)."""
    sums = [x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)) for x in state]
    if sums and not bool(torch.stack(sums).isfinite().all()):
        raise ValueError(
            f"the state of the {model} holds NaN or Inf: it would spoil every later step; pass "
            "the state the same module returned, or find where it diverged (torch.isfinite)"
        )


class SequenceNeuron(nn.Module):
    """Base class: runs ``step`` over a time-major sequence when the module is called."""

    def __setattr__(self, name: str, value) -> None:
        """An AttributeError for a field of the frozen parameters ``p`` (``neuron.tau = 20``),
        which would otherwise be a new attribute that nothing reads."""
        p = self.__dict__.get("p")
        if dataclasses.is_dataclass(p) and name in {field.name for field in dataclasses.fields(p)}:
            kind = type(self).__name__
            raise AttributeError(
                f"{kind}.{name} cannot be set: a {kind} reads its parameters from .p "
                f"({type(p).__name__}, frozen); replace it, "
                f"neuron.p = dataclasses.replace(neuron.p, {name}={value!r}), or build a new {kind}"
            )
        super().__setattr__(name, value)

    def initial_state(self, like: Tensor) -> State:
        raise NotImplementedError

    def step(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def forward(
        self, u: Tensor, state: State | None = None, *, return_state: bool = False
    ) -> Tensor | tuple[Tensor, State]:
        """Input current ``(T, B, N)`` → spikes ``(T, B, N)``, from ``state`` (default: the
        initial state); ``return_state=True`` also returns the state after the last step, a
        tuple of ``(B, N)`` tensors without gradient (chunks of a sequence, docs/layer.md)."""
        check_current(u, type(self).__name__)
        initial = self.initial_state(u[0])
        if state is not None:
            check_state(state, initial, type(self).__name__)
            check_state_finite(state, type(self).__name__)
        spikes, state = run_steps(self, u, initial if state is None else state)
        if return_state:
            return spikes, tuple(x.detach() for x in state)
        return spikes


# --------------------------------------------------------------------------- LIF
def check_finite(model: str, **values: float | None) -> None:
    """Raise a ValueError naming the first of ``values`` (a neuron's parameters) that is a
    NaN or an infinity (``None`` passes: an unset option)."""
    for name, value in values.items():
        if value is not None:
            check_number(model, name, value)
        if value is not None and not math.isfinite(value):
            raise ValueError(
                f"{model} {name} must be a finite number, got {value}: a NaN or infinite "
                "parameter makes the neurons fire never or always"
            )


@dataclass(frozen=True)
class LIFParameters:
    """Leaky integrate-and-fire parameters (SpikingJelly ``LIFNode`` conventions).

    ``tau``: membrane time constant in steps, ≥ 1 (the leak 1 − 1/τ in [0, 1)).
    ``v_reset``: reset potential for a hard reset, or ``None`` for a soft reset
    (subtract the threshold). ``detach_reset``: no gradient through the reset.
    ``decay_input``: divide the input current by ``tau`` too. ``surrogate``: a
    :class:`Surrogate`, or its name (``"triangle"``, ``"atan"``) for its default parameters.
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    detach_reset: bool = False
    decay_input: bool = False
    surrogate: Surrogate = ATan()

    def __post_init__(self):
        check_number("LIF", "tau", self.tau)
        if not 1 <= self.tau < math.inf:
            raise ValueError(
                f"LIF tau must be a number of time steps >= 1 (leak 1 - 1/tau in [0, 1)), got "
                f"{self.tau}: below 1 step the leak turns negative and the membrane oscillates"
            )
        check_finite("LIF", v_threshold=self.v_threshold, v_reset=self.v_reset)
        check_flag("LIF", "detach_reset", self.detach_reset)
        check_flag("LIF", "decay_input", self.decay_input)
        if not self.v_threshold > self.v_rest:
            raise ValueError(
                f"LIF v_threshold must lie above the resting potential {self.v_rest} (v_reset "
                f"for a hard reset, 0 for a soft one), got {self.v_threshold}: a neuron at rest "
                "would fire at every step"
            )
        object.__setattr__(self, "surrogate", as_surrogate(self.surrogate))

    @property
    def soft_reset(self) -> bool:
        return self.v_reset is None

    @property
    def v_rest(self) -> float:
        """The potential the leak pulls toward, and the initial one: ``v_reset`` (hard reset)
        or 0 (soft reset)."""
        return 0.0 if self.v_reset is None else self.v_reset


def lif_charge(u: Tensor, v: Tensor, p: LIFParameters) -> Tensor:
    """Membrane potential ``h[t]`` after integrating ``u[t]`` from ``v[t-1]`` (no firing)."""
    if p.decay_input:
        return v + (u - (v - p.v_rest)) / p.tau
    return v - (v - p.v_rest) / p.tau + u


def lif_step(u: Tensor, v: Tensor, p: LIFParameters) -> tuple[Tensor, Tensor]:
    """One LIF step: ``(u[t], v[t-1]) -> (s[t], v[t])``, all ``(B, N)``."""
    h = lif_charge(u, v, p)
    s = p.surrogate(h - p.v_threshold)
    s_reset = s.detach() if p.detach_reset else s
    if p.soft_reset:
        v_next = h - p.v_threshold * s_reset
    else:
        v_next = h * (1 - s_reset) + p.v_reset * s_reset
    return s, v_next


class LIF(SequenceNeuron):
    """Leaky integrate-and-fire neuron; state ``(v,)`` with ``v[-1] = v_reset`` (0 if soft)."""

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        detach_reset: bool = False,
        decay_input: bool = False,
        surrogate: Surrogate = ATan(),
    ):
        super().__init__()
        self.p = LIFParameters(tau, v_threshold, v_reset, detach_reset, decay_input, surrogate)

    def initial_state(self, like: Tensor) -> State:
        return (torch.full_like(like, self.p.v_rest),)

    def step(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        s, v = lif_step(u, state[0], self.p)
        return s, (v,)

    def extra_repr(self) -> str:
        p = self.p
        reset = "soft" if p.soft_reset else f"hard(v_reset={p.v_reset})"
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, reset={reset}, "
            f"detach_reset={p.detach_reset}, decay_input={p.decay_input}, surrogate={p.surrogate}"
        )


# --------------------------------------------------------------------------- readout
def leaky_integrator_step(u: Tensor, v: Tensor, tau: float, decay_input: bool) -> Tensor:
    """LIF with infinite threshold: ``v[t] = v[t-1] - v[t-1]/τ + u[t]`` (``u/τ`` if decay_input)."""
    if decay_input:
        return v + (u - v) / tau
    return v - v / tau + u


def leaky_integrator_run(u: Tensor, v: Tensor, tau: float, decay_input: bool) -> Tensor:
    """The membranes ``(T, B, K)`` of :func:`leaky_integrator_step` over the input current
    ``u`` ``(T, B, K)`` from ``v`` ``(B, K)``, unchecked (``T ≥ 1``)."""
    out = []
    for u_t in u:
        v = leaky_integrator_step(u_t, v, tau, decay_input)
        out.append(v)
    return torch.stack(out)


class LeakyIntegrator(nn.Module):
    """Readout neuron that never fires; its membrane sequence is the output.

    With ``decay_input=True`` it is the exponential moving average
    ``v[t] = (1 - 1/τ) v[t-1] + u[t]/τ`` used by the Mackey-Glass forecaster.
    """

    def __init__(self, tau: float = 2.0, decay_input: bool = False):
        super().__init__()
        check_number("LeakyIntegrator", "tau", tau)
        if not 1 <= tau < math.inf:
            raise ValueError(f"LeakyIntegrator tau must be >= 1 time step, got {tau}")
        check_flag("LeakyIntegrator", "decay_input", decay_input)
        self.tau = float(tau)
        self.decay_input = decay_input

    def forward(
        self, u: Tensor, state: State | None = None, *, return_state: bool = False
    ) -> Tensor | tuple[Tensor, State]:
        """Input current ``(T, B, K)`` → membrane potentials ``(T, B, K)``, from ``state``
        ``(v,)`` (default: ``v = 0``); ``return_state=True`` also returns ``(v,)`` after the
        last step, ``(B, K)``, without gradient."""
        check_current(u, "LeakyIntegrator")
        v = torch.zeros_like(u[0])
        if state is not None:
            check_state(state, (v,), "LeakyIntegrator")
            check_state_finite(state, "LeakyIntegrator")
            v = state[0]
        out = leaky_integrator_run(u, v, self.tau, self.decay_input)
        if return_state:
            return out, (out[-1].detach(),)
        return out

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}"


# --------------------------------------------------------------------------- adaptive LIF
@dataclass(frozen=True)
class AdLIFParameters:
    """Adaptive LIF (SE-adLIF style, symplectic Euler order; Baronig et al. 2025).

    ``tau_u``/``tau_w``: membrane and adaptation time constants in steps;
    ``a``: sub-threshold coupling of the adaptation to the membrane; ``b``: spike-triggered
    adaptation; reset to 0 after a spike (``detach_reset`` as in LIF); ``surrogate`` as in
    :class:`LIFParameters`.
    """

    tau_u: float = 5.0
    tau_w: float = 30.0
    a: float = 0.5
    b: float = 1.0
    v_threshold: float = 1.0
    detach_reset: bool = False
    surrogate: Surrogate = Triangle()

    def __post_init__(self):
        for name in ("tau_u", "tau_w"):
            value = getattr(self, name)
            check_number("AdLIF", name, value)
            if not value > 0 or math.isinf(value):
                raise ValueError(
                    f"AdLIF {name} must be a positive number of time steps, got {value}"
                )
        check_finite("AdLIF", a=self.a, b=self.b, v_threshold=self.v_threshold)
        check_flag("AdLIF", "detach_reset", self.detach_reset)
        if not self.v_threshold > 0:
            raise ValueError(
                f"AdLIF v_threshold must lie above the resting potential 0, got "
                f"{self.v_threshold}: a neuron at rest would fire at every step"
            )
        object.__setattr__(self, "surrogate", as_surrogate(self.surrogate))


def adlif_step(
    u: Tensor, v: Tensor, w: Tensor, p: AdLIFParameters
) -> tuple[Tensor, Tensor, Tensor]:
    """One adLIF step: ``(u[t], v[t-1], w[t-1]) -> (s[t], v[t], w[t])``.

    ``v' = α v + (1-α)(u - w)``, ``s = Θ(v' - θ)``, ``v = v'(1 - s)``,
    ``w = β w + (1-β)(a v + b s)`` with ``α = exp(-1/τ_u)``, ``β = exp(-1/τ_w)``.
    """
    alpha = math.exp(-1.0 / p.tau_u)
    beta = math.exp(-1.0 / p.tau_w)
    h = alpha * v + (1 - alpha) * (u - w)
    s = p.surrogate(h - p.v_threshold)
    s_reset = s.detach() if p.detach_reset else s
    v_next = h * (1 - s_reset)
    w_next = beta * w + (1 - beta) * (p.a * v_next + p.b * s)
    return s, v_next, w_next


class AdLIF(SequenceNeuron):
    """Adaptive LIF neuron with two state variables ``(v, w)``, both starting at 0."""

    def __init__(
        self,
        tau_u: float = 5.0,
        tau_w: float = 30.0,
        a: float = 0.5,
        b: float = 1.0,
        v_threshold: float = 1.0,
        detach_reset: bool = False,
        surrogate: Surrogate = Triangle(),
    ):
        super().__init__()
        self.p = AdLIFParameters(tau_u, tau_w, a, b, v_threshold, detach_reset, surrogate)

    def initial_state(self, like: Tensor) -> State:
        return (torch.zeros_like(like), torch.zeros_like(like))

    def step(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        s, v, w = adlif_step(u, state[0], state[1], self.p)
        return s, (v, w)

    def extra_repr(self) -> str:
        p = self.p
        return (
            f"tau_u={p.tau_u}, tau_w={p.tau_w}, a={p.a}, b={p.b}, "
            f"v_threshold={p.v_threshold}, surrogate={p.surrogate}"
        )


# --------------------------------------------------------------------------- SpikingJelly
class SpikingJellyNeuron(nn.Module):
    """Adapter: a SpikingJelly single-step neuron node used through the :class:`Neuron` protocol.

    The node keeps its membrane in ``node.v``; the adapter sets it from the explicit state
    before each step, reads it back afterwards and sets it back to its initial value, so the
    node can be used functionally and holds no membrane (and its autograd graph) between
    steps. Other state of the node (an adaptive node's ``w``) stays in the node, as before.
    """

    def __init__(self, node: nn.Module):
        super().__init__()
        if getattr(node, "step_mode", "s") != "s":
            raise ValueError("SpikingJelly node must be in single-step mode (step_mode='s')")
        self.node = node

    def initial_state(self, like: Tensor) -> State:
        v0 = self.node.v_reset if self.node.v_reset is not None else 0.0
        return (torch.full_like(like, v0),)

    def step(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        self.node.v = state[0]
        s = self.node(u)
        v = self.node.v
        # back to its initial value (else the last membrane kept its graph alive, and a deepcopy
        # of the layer failed); only v: an adaptive node keeps its other state between steps
        self.node.v = self.node.v_reset if self.node.v_reset is not None else 0.0
        return s, (v,)


def as_neuron(neuron: nn.Module) -> nn.Module:
    """Return ``neuron`` as an object following the :class:`Neuron` protocol.

    Accepts our neurons, user-written ones (anything with ``initial_state`` and ``step``), and
    SpikingJelly single-step nodes (wrapped in :class:`SpikingJellyNeuron`).
    """
    if isinstance(neuron, type):
        raise TypeError(
            f"the neuron must be an instance, got the class {neuron.__name__}: write "
            f"{neuron.__name__}(…) with its parameters, e.g. DelRec(size, LIF(tau=2.0))"
        )
    if isinstance(neuron, Neuron):
        return neuron
    if type(neuron).__module__.startswith("spikingjelly"):
        return SpikingJellyNeuron(neuron)
    raise TypeError(
        f"{type(neuron).__name__} is not a neuron model: give it methods "
        "initial_state(like) -> state and step(u, state) -> (spikes, state) "
        "(see delrec.neurons.Neuron), or pass a SpikingJelly single-step node"
    )
