"""Feedforward learnable delays at the cost of a dense layer: two taps per synapse.

The layer (:class:`delrec.layers.FeedforwardDelay`) defines its output as a causal convolution
with a ``K``-tap kernel per synapse, ``κ_oi(j) = w_oi·λ_oi(j)``, ``λ(j) = max(0, 1 - |j - P|)``
for ``j = 0 … K-1`` (``P``: the position, in steps; x = 0 before t = 0). That kernel has at most
two non-zero taps, ``j = k`` and ``k + 1`` with ``k = ⌊P⌋``, weighted ``1 - f`` and ``f``
(``f = P - k``), so

    y_o[t] = b_o + Σ_i Σ_{j ∈ {k, k+1} ∩ [0, K-1]} w_oi λ_oi(j) x_i[t - j]

costs two multiply-adds per synapse and step, whatever ``K``; a tap outside the window counts
nothing (no renormalisation: docs/feedforward-delays.md). With ``C(j) = Σ_{t,b} ∂L/∂y_o[t]·
x_i[t - j]`` (0 outside the window) the gradients are those of autograd through the
convolution, kinks included:

    ∂L/∂w = Σ_j λ(j) C(j)      ∂L/∂P = w Σ_j σ(j) C(j)      ∂L/∂x_i[s] = Σ_o Σ_j κ(j) ∂L/∂y_o[s+j]

with ``σ(j) = sign(j - P)`` where ``1 - |j - P| ≥ 0`` (``|·|'(0) = 0``; the clamp passes the
gradient at its bound), over ``j ∈ {k-1, k, k+1}``: ``∂L/∂P = w (C(k+1) - C(k))`` off the
integers and ``w (C(k+1) - C(k-1))`` at an integer ``P``, one-sided at the window's ends.

Paths (chosen once per forward by :func:`select`, never switched while running):

* ``"reference"``: the convolution (``K`` taps per synapse, autograd).
* ``"cpp-feedforward"``: C++ kernels (``csrc/feedforward.cpp``, built by
  :mod:`delrec.engine.native`), register-tiled shifted sums over channel-major sequences and the
  two dots ``C(k)``, ``C(k+1)`` per synapse in one sweep; CPU.
* ``"torch-feedforward"``: PyTorch ops, any device: the synapses grouped by tap delay, one sparse
  matrix product per delay for the output and the input gradient, sampled dense products
  (``torch.sparse.sampled_addmm``) for the dots.

The two-tap paths save only the input (the C++ path its channel-major copy where that is at most
1.5 times as large) and the parameters for backward: memory independent of ``K``. Sequences are
time-major ``(T, B, ·)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from delrec.engine import native
from delrec.engine.autograd import first_order


# --------------------------------------------------------------------------- the reference
def temporal_kernel(weight: Tensor, position: Tensor, kernel_size: int) -> Tensor:
    """Weights per delay tap, ``(O, I, K)``: index ``j`` is a delay of ``j`` steps."""
    taps = torch.arange(kernel_size, dtype=weight.dtype, device=weight.device)
    interpolation = (1 - (taps - position.unsqueeze(-1)).abs()).clamp(min=0)
    return weight.unsqueeze(-1) * interpolation


def convolution(
    x: Tensor, weight: Tensor, position: Tensor, bias: Tensor | None, kernel_size: int
) -> Tensor:
    """The reference: a causal convolution (left padding ``K-1``), ``(T, B, I)`` → ``(T, B, O)``."""
    signal = F.pad(x.permute(1, 2, 0), (kernel_size - 1, 0))  # (B, I, K-1+T)
    kernel = temporal_kernel(weight, position, kernel_size).flip(-1)
    return F.conv1d(signal, kernel, bias).permute(2, 0, 1)


# --------------------------------------------------------------------------- the two taps
class _Taps:
    """The interpolation of every synapse ``(O, I)`` around its base delay, in PyTorch ops.

    ``base = clamp(⌊P⌋, 0, K-1)`` (float); :meth:`around` gives ``λ`` and ``σ`` at delay
    ``base + q``: the reference's ``1 - |d - P|`` clamped at 0, and its slope ``sign(d - P)``
    where that is ``≥ 0``, zero outside the window. The taps with a non-zero ``λ`` are ``base``
    and ``base + 1``; a non-zero ``σ`` can also sit at ``base - 1`` (``P`` on an integer) or
    ``base + 2`` (``|base + 2 - P|`` rounding to 1). ``csrc/feedforward.cpp`` (``around``)
    computes the same per synapse in C++.
    """

    def __init__(self, weight: Tensor, position: Tensor, kernel_size: int):
        self.p, self.weight = position.detach(), weight.detach()
        self.kernel_size = kernel_size
        self.base = self.p.floor().clamp(0, kernel_size - 1)

    def around(self, q: int) -> tuple[Tensor, Tensor]:
        delay = self.base + q
        value = 1 - (delay - self.p).abs()
        inside = (delay >= 0) & (delay <= self.kernel_size - 1)
        return value.clamp(min=0) * inside, torch.sign(delay - self.p) * ((value >= 0) & inside)

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """``near = w·λ(base)``, ``far = w·λ(base + 1)``: the reference's kernel values."""
        return self.weight * self.around(0)[0], self.weight * self.around(1)[0]


class _TwoTaps(torch.autograd.Function):
    """``y = Σ`` of the two taps per synapse ``+ b`` by a two-tap path; saves only the input
    (as the path keeps it: :meth:`forward` returns it with the output) and the parameters."""

    @staticmethod
    def forward(ctx, x, weight, position, bias, kernel_size, path):
        y, kept = path.forward(x, weight, position, kernel_size)
        if bias is not None:
            y += bias
        ctx.kernel_size, ctx.path, ctx.input_shape = kernel_size, path, x.shape
        ctx.save_for_backward(kept, weight, position)
        return y

    @staticmethod
    @first_order(
        "the two-tap FeedforwardDelay engine",
        "build the layer with engine='reference' (the convolution, by autograd)",
    )
    def backward(ctx, grad_y):
        kept, weight, position = ctx.saved_tensors
        need_x, need_w, need_p, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_p = ctx.path.backward(
            grad_y.contiguous(),
            kept,
            ctx.input_shape,
            weight,
            position,
            ctx.kernel_size,
            need_x,
            need_w,
            need_p,
        )
        grad_b = grad_y.sum((0, 1)) if need_b else None
        return grad_x, grad_w, grad_p, grad_b, None, None


def _gradients(weight, position, lam_slope, dots, need_w, need_p):
    """``∂L/∂w = Σ_q λ_q C_q`` and ``∂L/∂P = w Σ_q σ_q C_q`` over the delays ``base + q``
    (float64 sums, returned in the parameters' dtypes)."""
    grad_w = grad_p = None
    if need_w:
        grad_w = sum(lam.double() * c for (lam, _), c in zip(lam_slope, dots)).to(weight.dtype)
    if need_p:
        slope = sum(s.double() * c for (_, s), c in zip(lam_slope, dots))
        grad_p = (weight.detach().double() * slope).to(position.dtype)
    return grad_w, grad_p


# --------------------------------------------------------------------------- C++ path
class _NativeTaps:
    """The two-tap sums and dots in C++ (``csrc/feedforward.cpp``): sequences channel-major
    ``(C, rows, W)``, ``W`` the batch padded to whole 64-byte vectors, step ``t`` at row
    ``R + t`` (``R``: the kernels' tile of steps) with zero rows around, whatever the window; the
    taps and the gradients' assembly per synapse in C++ too."""

    def __init__(self, kernels):
        self.kernels = kernels

    def _channel_major(self, seq: Tensor) -> Tensor:
        """The channel-major copy of ``seq``: ``rows`` = the steps padded to whole tiles and a
        tile of zero rows either side."""
        tile, lanes = self.kernels.tile_rows, 64 // seq.element_size()
        rows = -(-seq.shape[0] // tile) * tile + 2 * tile
        width = -(-seq.shape[1] // lanes) * lanes
        return self.kernels.channel_major(seq, tile, rows, width)

    def forward(self, x, weight, position, kernel_size) -> tuple[Tensor, Tensor]:
        """The output, and what backward needs of ``x``: its channel-major copy where that is
        at most half as large again (a batch of about whole vectors, more steps than tiles),
        else ``x`` (copied again in backward)."""
        steps, batch, _ = x.shape
        lead = self.kernels.tile_rows
        base, near, far = self.kernels.taps(weight.detach(), position.detach(), kernel_size)
        # y[t] = Σ far·x[t - base - 1] + near·x[t - base]
        source = self._channel_major(x)
        y = self.kernels.shifted_sum(source, base, far, near, False, -1, -1, lead, steps, batch)
        return y, source if 2 * source.numel() <= 3 * x.numel() else x.detach()

    def backward(self, grad_y, kept, shape, weight, position, kernel_size, need_x, need_w, need_p):
        steps, batch, _ = shape
        lead = self.kernels.tile_rows
        weight, position = weight.detach(), position.detach()
        base, near, far = self.kernels.taps(weight, position, kernel_size)
        grad = self._channel_major(grad_y)
        grad_x = grad_w = grad_p = None
        if need_x:  # ∂L/∂x[s] = Σ_o near·g[s + base] + far·g[s + base + 1]
            grad_x = self.kernels.shifted_sum(grad, base, near, far, True, 1, 0, lead, steps, batch)
        if need_w or need_p:
            # kept is x itself where it has x's shape (the copy has more rows than steps)
            source = self._channel_major(kept) if kept.shape == shape else kept
            grad_w, grad_p = self.kernels.parameter_gradients(
                grad, source, base, weight, position, kernel_size, lead, steps
            )
            grad_w = grad_w if need_w else None
            grad_p = grad_p if need_p else None
        return grad_x, grad_w, grad_p


# --------------------------------------------------------------------------- PyTorch-op path
def _by_delay(delay: Tensor, *keys: Tensor) -> list[tuple[int, Tensor]]:
    """Indices of the entries grouped by ``delay``, sorted by ``keys`` inside a group."""
    key = delay
    for k in keys:
        key = key * (int(k.max()) + 1 if k.numel() else 1) + k
    order = torch.argsort(key)
    values, counts = torch.unique_consecutive(delay[order], return_counts=True)
    return list(zip(values.tolist(), order.split(counts.tolist())))


def _csr(rows: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from entries sorted by row then column."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, shape)


class _SparseTaps:
    """The two-tap sums and dots in PyTorch ops: sequences ``(C, T·B)``; one sparse product per
    tap delay ``d`` (the synapses with a tap there), so the work is two multiply-adds per
    synapse and step whatever the window; the number of products is at most ``K + 1``."""

    @staticmethod
    def _rows(seq: Tensor) -> Tensor:
        return seq.permute(2, 0, 1).reshape(seq.shape[2], -1)

    @staticmethod
    def _synapses(taps: _Taps) -> tuple[Tensor, Tensor]:
        """Row ``o`` and column ``i`` of every synapse, row-major, flat."""
        outputs, inputs = taps.base.shape
        device = taps.base.device
        o, i = torch.meshgrid(
            torch.arange(outputs, device=device), torch.arange(inputs, device=device), indexing="ij"
        )
        return o.flatten(), i.flatten()

    @classmethod
    def _entries(cls, taps: _Taps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(row o, column i, delay, coefficient)`` of every non-zero tap."""
        o, i = cls._synapses(taps)
        base = taps.base.flatten().long()
        near, far = taps.coefficients()
        delay = torch.cat([base, base + 1])
        coef = torch.cat([near.flatten(), far.flatten()])
        keep = coef != 0
        return o.repeat(2)[keep], i.repeat(2)[keep], delay[keep], coef[keep]

    @staticmethod
    def _shifted(source, rows, columns, delay, coef, size, steps, batch, later: bool) -> Tensor:
        """``out[r, t] = Σ coef·source[c, t ∓ d]`` (``-`` forward in time, ``+`` if ``later``),
        ``(size, T·B)``."""
        out = source.new_zeros(size, steps * batch)
        inside = delay < steps
        rows, columns, delay, coef = rows[inside], columns[inside], delay[inside], coef[inside]
        for d, index in _by_delay(delay, rows, columns):
            matrix = _csr(rows[index], columns[index], coef[index], (size, source.shape[0]))
            span = (steps - d) * batch
            if later:
                out[:, :span] += matrix @ source[:, d * batch :]
            else:
                out[:, d * batch :] += matrix @ source[:, :span]
        return out

    @staticmethod
    def _dots(grad, source, rows, columns, delay, steps, batch) -> Tensor:
        """``Σ_{t,b} grad[r, t]·source[c, t - d]`` per entry, float64."""
        out = torch.zeros(rows.numel(), dtype=torch.float64, device=grad.device)
        inside = (delay >= 0) & (delay < steps)
        where = inside.nonzero().flatten()
        for d, index in _by_delay(delay[where], rows[where], columns[where]):
            entries = where[index]
            pattern = _csr(
                rows[entries],
                columns[entries],
                grad.new_ones(entries.numel()),
                (grad.shape[0], source.shape[0]),
            )
            span = (steps - d) * batch
            sampled = torch.sparse.sampled_addmm(
                pattern, grad[:, d * batch :], source[:, :span].t(), beta=0.0
            )
            out[entries] = sampled.values().double()
        return out

    def forward(self, x, weight, position, kernel_size) -> tuple[Tensor, Tensor]:
        """The output, and ``x`` for backward."""
        steps, batch, _ = x.shape
        taps = _Taps(weight, position, kernel_size)
        o, i, delay, coef = self._entries(taps)
        out = self._shifted(self._rows(x), o, i, delay, coef, weight.shape[0], steps, batch, False)
        return out.view(-1, steps, batch).permute(1, 2, 0).contiguous(), x.detach()

    def backward(self, grad_y, x, shape, weight, position, kernel_size, need_x, need_w, need_p):
        steps, batch, inputs = shape
        taps = _Taps(weight, position, kernel_size)
        grad = self._rows(grad_y)
        grad_x = grad_w = grad_p = None
        if need_x:
            o, i, delay, coef = self._entries(taps)
            out = self._shifted(grad, i, o, delay, coef, inputs, steps, batch, True)
            grad_x = out.view(-1, steps, batch).permute(1, 2, 0).contiguous()
        if need_w or need_p:
            source = self._rows(x)
            o, i = self._synapses(taps)
            base = taps.base.flatten().long()
            lam_slope = [taps.around(q) for q in (-1, 0, 1, 2)]
            dots = []
            for q, (_, slope) in zip((-1, 0, 1, 2), lam_slope):
                # base and base + 1 for every synapse; base - 1, base + 2 where σ is not zero
                wanted = torch.ones_like(base, dtype=torch.bool) if q in (0, 1) else slope != 0
                wanted = wanted.flatten().nonzero().flatten()
                c = torch.zeros(base.numel(), dtype=torch.float64, device=x.device)
                c[wanted] = self._dots(
                    grad, source, o[wanted], i[wanted], base[wanted] + q, steps, batch
                )
                dots.append(c.view(taps.base.shape))
            grad_w, grad_p = _gradients(weight, position, lam_slope, dots, need_w, need_p)
        return grad_x, grad_w, grad_p


# --------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class FeedforwardPath:
    """One way to run the layer: ``run(x (T, B, I), weight (O, I), position (O, I),
    bias (O,) or None, kernel_size) -> (T, B, O)``, differentiable in all four tensors;
    ``runs_on(device)`` says whether it can run there here (decided before running), as for
    the recurrent paths (:class:`delrec.engine.EnginePath`)."""

    name: str
    run: Callable[[Tensor, Tensor, Tensor, Tensor | None, int], Tensor]
    runs_on: Callable[[torch.device], bool]


def _two_taps(implementation: Callable[[], object | None]):
    def run(x, weight, position, bias, kernel_size):
        if not x.dtype == weight.dtype == position.dtype:
            raise ValueError(
                f"feedforward delays: input {x.dtype}, weight {weight.dtype} and position "
                f"{position.dtype} must share one dtype (convert the layer with .to(dtype))"
            )
        if x.shape[1] == 0:  # an empty batch: nothing to compute, and the kernels divide by B
            return convolution(x, weight, position, bias, kernel_size)
        # the kernels read (O, I) rows; a transposed parameter is copied (autograd sees through)
        weight, position = weight.contiguous(), position.contiguous()
        return _TwoTaps.apply(x, weight, position, bias, kernel_size, implementation())

    return run


def _native() -> _NativeTaps | None:
    kernels = native.load("feedforward")
    return None if kernels is None else _NativeTaps(kernels)


PATHS = {
    "reference": FeedforwardPath("reference", convolution, lambda device: True),
    "cpp-feedforward": FeedforwardPath(
        "cpp-feedforward",
        _two_taps(_native),
        lambda device: device.type == "cpu" and _native() is not None,
    ),
    "torch-feedforward": FeedforwardPath(
        "torch-feedforward", _two_taps(_SparseTaps), lambda device: True
    ),
}
ENGINES = ("auto", *PATHS)


def select(device: torch.device, engine: str = "auto") -> FeedforwardPath:
    """The path that runs a feedforward-delay layer on ``device``: ``"auto"`` takes the C++
    kernels on the CPU where they build, PyTorch ops elsewhere; a path name forces that path."""
    if engine == "auto":
        fast = PATHS["cpp-feedforward"]
        return fast if fast.runs_on(device) else PATHS["torch-feedforward"]
    if engine not in PATHS:
        raise ValueError(f"unknown feedforward-delay engine {engine!r}; choose one of {ENGINES}")
    path = PATHS[engine]
    if not path.runs_on(device):
        raise RuntimeError(
            f"the feedforward-delay engine {engine!r} can't run on {device} here (its C++ "
            "kernels run on the CPU and need a compiler); use engine='auto'"
        )
    return path


__all__ = ["ENGINES", "PATHS", "FeedforwardPath", "convolution", "select", "temporal_kernel"]
