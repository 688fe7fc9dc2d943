// The LIF neuron as every C++ kernel computes it: the same arithmetic, in the same order, as
// delrec/engine/lif.py (LIFMap), so that a kernel's spikes equal the PyTorch paths' bit for bit.
// Kernels are built with -ffp-contract=off: no multiply-add below is fused.
//
//   charge:  h[t] = (gain·c[t] + offset + m ⊙ r[t]) + leak·v[t-1]   (drive = gain·c + offset)
//   fire:    s[t] = Θ(h[t] - θ)                                       (Θ(0) = 1)
//   reset:   v[t] = h - θ·s (soft) or s ? v_reset : h (hard)
//   adjoint: with gv = leak·∂L/∂h[t+1] (the adjoint of v[t]),
//            ∂L/∂h[t] = ψ'(h - θ)·(∂L/∂s + gv·∂v/∂s) + gv·∂v/∂h, the ∂v/∂s term cut by
//            detach_reset.
#pragma once

#include <cmath>
#include <cstdint>

namespace delrec {

// The LIF constants (lif.py, LIFMap) and the surrogate derivative ψ'(h - θ): surrogate 0 = read
// from a precomputed tensor, 1 = Triangle(γ), 2 = ATan(α), with γ or α in surrogate_param
// (lif.py, LIFMap.native_surrogate).
struct LIFConstants {
  double leak, v0, threshold, v_reset;
  bool soft_reset, detach_reset;
  int64_t surrogate = 0;
  double surrogate_param = 0.0;
};

// The update and its adjoint in the kernel's scalar type, one element at a time.
template <typename scalar_t>
struct LIFUpdate {
  scalar_t leak, threshold, reset;
  bool soft_reset, detach_reset;

  explicit LIFUpdate(const LIFConstants& c)
      : leak(c.leak), threshold(c.threshold), reset(c.v_reset), soft_reset(c.soft_reset),
        detach_reset(c.detach_reset) {}

  // h[t] from the drive, the (masked) recurrent input and v[t-1]
  scalar_t charge(scalar_t drive, scalar_t recurrent, scalar_t v) const {
    return (drive + recurrent) + leak * v;
  }
  bool fires(scalar_t h) const { return h >= threshold; }
  // v[t] after the spike (or not) of h
  scalar_t reset_after(scalar_t h, bool spike) const {
    return soft_reset ? h - threshold * (spike ? scalar_t(1) : scalar_t(0)) : (spike ? reset : h);
  }
  // ∂L/∂h[t] from ∂L/∂s[t] (all paths but the reset), ∂L/∂h[t+1], h[t], s[t] and ψ'(h - θ)
  scalar_t adjoint(scalar_t grad_s, scalar_t grad_h_next, scalar_t h, bool spiked,
                   scalar_t psi) const {
    scalar_t gv = grad_h_next * leak;
    if (!detach_reset) grad_s += soft_reset ? -threshold * gv : gv * (reset - h);
    if (!soft_reset && spiked) gv = scalar_t(0);
    return gv + psi * grad_s;
  }
};

// One step of the LIF neurons on `count` elements of one row (pointers at the first): the
// membrane h, the spikes (0/1) and v after the reset, from the drive, the recurrent input
// (times the mask when `masked`) and v before; with `record_fired` also the spikes as bytes.
// Out of line with restrict pointers, specialised on mask and bytes: the compiler vectorises it.
template <typename scalar_t, bool masked, bool record_fired>
__attribute__((noinline)) void charge_and_fire(
    const LIFUpdate<scalar_t> neuron, const scalar_t* __restrict__ drive,
    const scalar_t* __restrict__ mask, const scalar_t* __restrict__ recurrent,
    scalar_t* __restrict__ v, scalar_t* __restrict__ membrane, scalar_t* __restrict__ spikes,
    uint8_t* __restrict__ fired, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t r = masked ? mask[i] * recurrent[i] : recurrent[i];
    const scalar_t h = neuron.charge(drive[i], r, v[i]);
    const bool spike = neuron.fires(h);
    membrane[i] = h;
    spikes[i] = spike ? scalar_t(1) : scalar_t(0);
    if (record_fired) fired[i] = spike;
    v[i] = neuron.reset_after(h, spike);
  }
}

// ψ'(x) of the surrogates the kernels compute themselves (surrogate 1 or 2); surrogate 0 means
// that the caller reads ψ' from a tensor instead.
template <typename scalar_t>
struct SurrogateDerivative {
  int64_t kind;
  scalar_t param, scale;  // Triangle: γ and γ²; ATan: α/2 and π α / 2

  explicit SurrogateDerivative(const LIFConstants& c)
      : kind(c.surrogate),
        param(c.surrogate == 1 ? c.surrogate_param : c.surrogate_param / 2),
        scale(c.surrogate == 1 ? c.surrogate_param * c.surrogate_param
                               : M_PI / 2 * c.surrogate_param) {}

  // ψ'(x) for a surrogate fixed at compile time (1 or 2): a loop calling this vectorises, one
  // calling operator() (a branch on the runtime kind) may not
  template <int fixed>
  scalar_t of(scalar_t x) const {
    if constexpr (fixed == 1) {  // Triangle(γ): max(0, γ - |x|) / γ²
      const scalar_t top = param - std::abs(x);
      return (top > scalar_t(0) ? top : scalar_t(0)) / scale;
    } else {  // ATan(α): (α/2) / (1 + (π α x / 2)²)
      const scalar_t scaled = scale * x;
      return param / (scalar_t(1) + scaled * scaled);
    }
  }

  scalar_t operator()(scalar_t x) const { return kind == 1 ? of<1>(x) : of<2>(x); }
};

}  // namespace delrec
