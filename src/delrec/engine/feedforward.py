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

The two-tap paths save only the input (and the parameters) for backward: memory independent of
``K``. Sequences are time-major ``(T, B, ·)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from delrec.engine import native


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
    """Both taps of every synapse ``(O, I)`` (module docstring).

    ``base`` (int64, in ``[0, K-1]``) is the first delay read; ``near`` and ``far`` are the
    coefficients of ``x[t - base]`` and ``x[t - base - 1]``: ``w·λ``, rounded as the reference
    rounds it (``λ(k) = 1 - |k - P|``, ``λ(k+1) = 1 - |k + 1 - P|``), 0 for a tap outside the
    window. ``k`` is ``⌊P⌋``.
    """

    def __init__(self, weight: Tensor, position: Tensor, kernel_size: int):
        self.p = position.detach()
        self.weight = weight.detach()
        self.kernel_size = kernel_size
        self.k = self.p.floor()
        self.base = self.k.clamp(0, kernel_size - 1).long()
        at_base = self.k == self.base  # k inside the window
        lam_k = 1 - (self.p - self.k)  # = 1 - |k - P| (P ≥ k), no clamp needed
        lam_next = 1 - (self.k + 1 - self.p)  # = 1 - |k + 1 - P| (P < k + 1)
        next_inside = self.k + 1 <= kernel_size - 1
        self.near = self.weight * torch.where(at_base, lam_k, lam_next * (self.k == -1))
        self.far = self.weight * (lam_next * (at_base & next_inside))

    def _around(self) -> tuple[dict, dict]:
        """``λ`` and ``σ`` at delays ``k + j``, ``j = -1 … 2``, zero outside the window: the
        reference's expressions, so that they round as they round there."""
        lam, slope = {}, {}
        for j in (-1, 0, 1, 2):
            tap = self.k + j
            value = 1 - (tap - self.p).abs()
            inside = (tap >= 0) & (tap <= self.kernel_size - 1)
            lam[j] = value.clamp(min=0) * inside
            slope[j] = torch.sign(tap - self.p) * ((value >= 0) & inside)
        return lam, slope

    def extra_taps(self) -> list[tuple[int, Tensor]]:
        """``(j, mask)`` for the delays ``k + j`` other than ``base`` and ``base + 1`` whose
        slope ``σ`` is not zero: ``j = -1`` at an integer position, ``j = 2`` where
        ``|k + 2 - P|`` rounds to 1 (``P`` less than half an ulp of 1 below ``k + 1``)."""
        _, slope = self._around()
        base = self.base.to(self.k.dtype)
        return [
            (j, (slope[j] != 0) & (self.k + j != base) & (self.k + j != base + 1)) for j in (-1, 2)
        ]

    def extra_requests(self, extra_taps) -> tuple[Tensor, Tensor, Tensor]:
        """``(row o, column i, delay)`` of the extra dots, int64, in ``gradients``'s order."""
        none = self.base.new_empty(0)
        rows, columns, delays = [none], [none], [none]
        for j, mask in extra_taps:
            o, i = mask.nonzero(as_tuple=True)
            rows.append(o)
            columns.append(i)
            delays.append(self.k[o, i].long() + j)
        return torch.cat(rows), torch.cat(columns), torch.cat(delays)

    def gradients(
        self, at_base: Tensor, after_base: Tensor, extra: Tensor, extra_taps
    ) -> tuple[Tensor, Tensor]:
        """``(∂L/∂w, ∂L/∂P)`` (float64) from ``C(base)``, ``C(base + 1)`` (``(O, I)``) and the
        ``C(k + j)`` of ``extra_taps`` (``(n,)``: mask after mask, row-major)."""
        lam, slope = self._around()
        base = self.base.to(self.k.dtype)
        c, start = {}, 0
        for j in lam:
            tap = self.k + j
            c[j] = torch.where(tap == base, at_base, torch.where(tap == base + 1, after_base, 0.0))
        for j, mask in extra_taps:
            n = int(mask.sum())
            c[j] = c[j].masked_scatter(mask, extra[start : start + n])
            start += n
        grad_w = sum(lam[j].double() * c[j] for j in c)
        grad_p = self.weight.double() * sum(slope[j].double() * c[j] for j in c)
        return grad_w, grad_p


@dataclass(frozen=True)
class _Backward:
    """What a two-tap path computes in backward: ``∂L/∂x`` ``(T, B, I)`` (or None), and
    ``C(base)``, ``C(base + 1)`` ``(O, I)`` and the requested extra dots ``(n,)`` (float64,
    or None)."""

    grad_x: Tensor | None
    at_base: Tensor | None
    after_base: Tensor | None
    extra: Tensor | None


class _TwoTaps(torch.autograd.Function):
    """``y = Σ`` of the two taps per synapse ``+ b`` by a two-tap path; saves only the input."""

    @staticmethod
    def forward(ctx, x, weight, position, bias, kernel_size, path):
        taps = _Taps(weight, position, kernel_size)
        y = path.forward(x, taps)
        if bias is not None:
            y += bias
        ctx.kernel_size, ctx.path = kernel_size, path
        ctx.save_for_backward(x, weight, position)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, position = ctx.saved_tensors
        need_x, need_w, need_p, need_b = ctx.needs_input_grad[:4]
        taps = _Taps(weight, position, ctx.kernel_size)
        extra_taps = taps.extra_taps() if need_p else []
        requests = taps.extra_requests(extra_taps)
        out = ctx.path.backward(grad_y, x, taps, need_x, need_w or need_p, *requests)
        grad_w = grad_p = None
        if need_w or need_p:
            gw, gp = taps.gradients(out.at_base, out.after_base, out.extra, extra_taps)
            grad_w = gw.to(weight.dtype) if need_w else None
            grad_p = gp.to(position.dtype) if need_p else None
        grad_b = grad_y.sum((0, 1)) if need_b else None
        return out.grad_x, grad_w, grad_p, grad_b, None, None


# --------------------------------------------------------------------------- C++ path
class _NativeTaps:
    """The two-tap sums and dots in C++ (``csrc/feedforward.cpp``): sequences channel-major
    ``(C, rows, W)``, ``W`` the batch padded to whole 64-byte vectors, the steps to a multiple
    of 8 (the kernels' row tile), zeros around."""

    def __init__(self, kernels):
        self.kernels = kernels

    @staticmethod
    def _sizes(seq: Tensor) -> tuple[int, int]:
        lanes = 64 // seq.element_size()
        return -(-seq.shape[0] // 8) * 8, -(-seq.shape[1] // lanes) * lanes

    def forward(self, x: Tensor, taps: _Taps) -> Tensor:
        steps, batch, _ = x.shape
        k = taps.kernel_size
        padded, width = self._sizes(x)
        source = self.kernels.channel_major(x, k, k + padded, width)  # x[t - j]: row k + t - j
        shift = (k - 1 - taps.base).int()  # row t + shift: x[t - base - 1]
        out = x.new_zeros(taps.base.shape[0], padded, width)
        self.kernels.shifted_sum(source, shift, taps.far, taps.near, k, k + steps, out)
        return self.kernels.time_major(out, steps, batch)

    def backward(self, grad_y, x, taps, need_x, need_dots, rows, columns, delays) -> _Backward:
        """``rows``, ``columns``, ``delays``: the extra dots ``C(delay)`` wanted."""
        steps, batch, _ = x.shape
        k = taps.kernel_size
        padded, width = self._sizes(x)
        grad = self.kernels.channel_major(grad_y, 0, padded + k, width)  # ∂L/∂y[t]: row t
        grad_x = at_base = after_base = extra = None
        if need_x:  # ∂L/∂x[s] = Σ near·g[s + base] + far·g[s + base + 1]
            out = x.new_zeros(x.shape[2], padded, width)
            self.kernels.shifted_sum(
                grad,
                taps.base.t().int().contiguous(),
                taps.near.t().contiguous(),
                taps.far.t().contiguous(),
                0,
                steps,
                out,
            )
            grad_x = self.kernels.time_major(out, steps, batch)
        if need_dots:
            source = self.kernels.channel_major(x, k, k + padded, width)
            after_base = torch.zeros(taps.base.shape, dtype=torch.float64)
            at_base = torch.zeros_like(after_base)
            shift = (k - 1 - taps.base).int()
            self.kernels.pair_dots(grad, source, shift, steps, k, k + steps, after_base, at_base)
            extra = torch.empty(rows.numel(), dtype=torch.float64)
            offset = k - delays  # C(j) reads x[t - j], row t + k - j
            self.kernels.span_dots(grad, source, rows, columns, offset, steps, k, k + steps, extra)
        return _Backward(grad_x, at_base, after_base, extra)


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
    def _entries(taps: _Taps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(row o, column i, delay, coefficient)`` of every non-zero tap."""
        rows, columns = torch.meshgrid(
            torch.arange(taps.base.shape[0], device=taps.base.device),
            torch.arange(taps.base.shape[1], device=taps.base.device),
            indexing="ij",
        )
        delay = torch.cat([taps.base.flatten(), taps.base.flatten() + 1])
        coef = torch.cat([taps.near.flatten(), taps.far.flatten()])
        keep = coef != 0
        rows, columns = rows.flatten().repeat(2), columns.flatten().repeat(2)
        return rows[keep], columns[keep], delay[keep], coef[keep]

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

    def forward(self, x: Tensor, taps: _Taps) -> Tensor:
        steps, batch, _ = x.shape
        rows, columns, delay, coef = self._entries(taps)
        out = self._shifted(
            self._rows(x), rows, columns, delay, coef, taps.base.shape[0], steps, batch, False
        )
        return out.view(-1, steps, batch).permute(1, 2, 0).contiguous()

    def backward(self, grad_y, x, taps, need_x, need_dots, rows, columns, delays) -> _Backward:
        """``rows``, ``columns``, ``delays``: the extra dots ``C(delay)`` wanted."""
        steps, batch, inputs = x.shape
        grad = self._rows(grad_y)
        grad_x = at_base = after_base = extra = None
        if need_x:
            o, i, delay, coef = self._entries(taps)
            out = self._shifted(grad, i, o, delay, coef, inputs, steps, batch, True)
            grad_x = out.view(-1, steps, batch).permute(1, 2, 0).contiguous()
        if need_dots:
            source = self._rows(x)
            o, i = torch.meshgrid(
                torch.arange(taps.base.shape[0], device=x.device),
                torch.arange(inputs, device=x.device),
                indexing="ij",
            )
            o, i, base = o.flatten(), i.flatten(), taps.base.flatten()
            at_base = self._dots(grad, source, o, i, base, steps, batch).view(taps.base.shape)
            after_base = self._dots(grad, source, o, i, base + 1, steps, batch)
            after_base = after_base.view(taps.base.shape)
            extra = self._dots(grad, source, rows, columns, delays, steps, batch)
        return _Backward(grad_x, at_base, after_base, extra)


# --------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class FeedforwardPath:
    """One way to run the layer: ``run(x (T, B, I), weight (O, I), position (O, I),
    bias (O,) or None, kernel_size) -> (T, B, O)``, differentiable in all four tensors;
    ``available(device)`` says whether it can run there (decided before running)."""

    name: str
    run: Callable[[Tensor, Tensor, Tensor, Tensor | None, int], Tensor]
    available: Callable[[torch.device], bool]


def _two_taps(implementation: Callable[[], object | None]):
    def run(x, weight, position, bias, kernel_size):
        if not x.dtype == weight.dtype == position.dtype:
            raise ValueError(
                f"feedforward delays: input {x.dtype}, weight {weight.dtype} and position "
                f"{position.dtype} must share one dtype (convert the layer with .to(dtype))"
            )
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
        return fast if fast.available(device) else PATHS["torch-feedforward"]
    if engine not in PATHS:
        raise ValueError(f"unknown feedforward-delay engine {engine!r}; choose one of {ENGINES}")
    path = PATHS[engine]
    if not path.available(device):
        raise RuntimeError(
            f"the feedforward-delay engine {engine!r} can't run on {device} here (its C++ "
            "kernels run on the CPU and need a compiler); use engine='auto'"
        )
    return path


__all__ = ["ENGINES", "PATHS", "FeedforwardPath", "convolution", "select", "temporal_kernel"]
