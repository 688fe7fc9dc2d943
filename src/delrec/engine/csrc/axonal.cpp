// The time loops of the axonal engine (delrec/engine/axonal.py), fused. The algorithm:
// docs/design.md#running-sums.
//
// Layouts: the tap recursions run neuron-major, on the spike history (T+1, N, B), the future
// adjoints (T+1, N, B) and the float64 recursion states (N, B), so the B values one tap reads
// are one contiguous row; everything else is batch-major (T, B, N) like the layer's input and
// output: the GEMMs, the neuron update and its adjoint. Each step transposes two (N, B)
// slices, in 16-neuron blocks (a cache line of float32 per batch row).
//
// Per step the forward reads three (four) past spikes per neuron and sample, advances the
// trace recursion, multiplies the trace by the weights (ATen GEMM, u = z Wᵀ) and updates the
// LIF neurons; the backward runs the same recursion on the future adjoints, the LIF adjoint,
// the transposed GEMM and the sums behind the delay and spread gradients. What the recursion
// means: lif.py, triangle_taps, and axonal.py, _AxonalPlan. The LIF update: lif.h.
//
// Input and output dropout: the forward may drop the input current itself, each step drawing
// the rows of the mask it needs (csrc/philox.h) and computing c ⊙ m as csrc/fused.cpp's dropout
// does (the drive is then the current itself), and may write its spikes dropped, s ⊙ m (the
// recurrence reads the spikes themselves); the backward writes the current's gradient ∂L/∂h ⊙ m
// step by step, and takes ∂L/∂s = ∂L/∂out ⊙ m, drawing the rows again, while they are in cache.
// Each saves a separate pass of the product through memory, both ways.
//
// The weight gradient: the backward keeps the transposed GEMM's input of the last few steps
// (∂L/∂h, times the recurrent dropout mask with one) in a buffer that stays in cache, and adds
// Σ_t (∂L/∂h ⊙ m)[t]ᵀ z[t] over them to the gradient (one GEMM per few steps) before the buffer
// is reused; no (T, B, N) tensor is written for it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "lif.h"
#include "philox.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using delrec::charge_and_fire;
using delrec::LIFConstants;
using delrec::LIFUpdate;
using delrec::SurrogateDerivative;
using delrec::Mask;
using delrec::MaskArgs;

constexpr int64_t kGrain = 8192;  // elements per parallel chunk
constexpr int64_t kBlock = 16;    // neurons per block of a transposition
constexpr int64_t kPendingBytes = 1 << 20;  // the weight gradient's buffer of GEMM inputs

// fn(j0, j1) on blocks of neurons [j0, j1), in parallel (ATen's intra-op threads).
template <typename Fn>
void for_each_block(int64_t n, int64_t batch, const Fn& fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kGrain / (batch * kBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      fn(block * kBlock, std::min(n, (block + 1) * kBlock));
    }
  });
}

// Ask the cache for the B-element rows that the three taps of neuron j read at this step
// (rows[q·N + j], element offsets into base). The taps of successive neurons lie up to the
// delay range apart in the (T+1, N, B) history or adjoint, where the hardware prefetcher does
// not follow. Asking kPrefetchAhead neurons early measured 2–5 % faster loops at the SSC and
// PS-MNIST layer shapes (half-normal delays, σ = 12 steps), and no slower with delays 0.
constexpr int64_t kPrefetchAhead = 2;

template <typename T>
inline void prefetch_taps(const T* base, const std::vector<int64_t>& rows, int64_t n, int64_t j,
                          int64_t batch) {
  const int64_t bytes = batch * static_cast<int64_t>(sizeof(T));
  for (int64_t q = 0; q < 3; ++q) {
    const char* row = reinterpret_cast<const char*>(base + rows[q * n + j]);
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(row + at);
  }
}

// fn(b0, b1) on ranges of the batch rows of a (B, N) slice, in parallel
template <typename Fn>
void for_each_row(int64_t batch, int64_t n, const Fn& fn) {
  at::parallel_for(0, batch, std::max<int64_t>(1, kGrain / n), fn);
}

// The dropout masks a layer applies in its own loops: on the input current and on the spikes.
struct Dropouts {
  Mask input, output;
  bool any() const { return input.active || output.active; }
};

// Element offset of row (slot, j) for each tap q of each neuron j at step t: slot t - lag + 1
// of a (T+1, N, B) spike history whose slot 0 is all zero (forward), or slot min(t + lag, T)
// of a (T+1, N, B) adjoint whose slot T is all zero (backward).
void tap_rows(const int64_t* lags, int64_t taps, int64_t n, int64_t batch, int64_t t,
              int64_t steps, bool forward, std::vector<int64_t>& out) {
  out.resize(taps * n);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t q = 0; q < taps; ++q) {
      const int64_t lag = lags[j * 4 + q];
      const int64_t slot = forward ? std::max<int64_t>(t - lag + 1, 0)
                                   : std::min<int64_t>(t + lag, steps);
      out[q * n + j] = (slot * n + j) * batch;
    }
  }
}

// One step of the trace recursion for neuron j over the batch, on neuron-major rows:
// y += d; y += Σ_q c_q x_q; d += Σ_q e_q x_q, with x_q the three tapped rows.
template <typename tap_t>
inline void recursion_step(double* __restrict__ y, double* __restrict__ d,
                           const tap_t* __restrict__ x0, const tap_t* __restrict__ x1,
                           const tap_t* __restrict__ x2, const double* c, const double* e,
                           int64_t batch) {
  const double c0 = c[0], c1 = c[1], c2 = c[2], e0 = e[0], e1 = e[1], e2 = e[2];
  for (int64_t b = 0; b < batch; ++b) {
    const double a0 = x0[b], a1 = x1[b], a2 = x2[b];
    y[b] += d[b];
    y[b] += a0 * c0 + a1 * c1 + a2 * c2;
    d[b] += a0 * e0 + a1 * e1 + a2 * e2;
  }
}

// The loops below take their constants by value and their rows through __restrict__ pointers:
// captured by reference, a store through a byte or float pointer could alias them (the neuron's
// constants, the lambda's captures), which makes GCC reload them each iteration and keeps the
// loops scalar.

// Box sums of one neuron's batch row (exact small integers): E += -s0 + s1 - s2 + s3 (slope of
// the trace in the delay, times w²) and K += s0 - s2 (spikes in the closed support).
template <typename count_t>
inline void slope_step(count_t* __restrict__ after, const count_t* __restrict__ before,
                       const uint8_t* __restrict__ s0, const uint8_t* __restrict__ s1,
                       const uint8_t* __restrict__ s2, const uint8_t* __restrict__ s3,
                       int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    after[b] = static_cast<count_t>(before[b] - s0[b] + s1[b] - s2[b] + s3[b]);
  }
}

template <typename count_t>
inline void support_step(count_t* __restrict__ after, const count_t* __restrict__ before,
                         const uint8_t* __restrict__ s0, const uint8_t* __restrict__ s2,
                         int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) after[b] = static_cast<count_t>(before[b] + s0[b] - s2[b]);
}

// z of neurons [j0, j1), neuron-major float64 (N, B), into a batch-major (B, N) slice
template <typename scalar_t>
inline void transpose_block(const double* __restrict__ y, scalar_t* __restrict__ out, int64_t n,
                            int64_t batch, int64_t j0, int64_t j1) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = j0; j < j1; ++j) out[b * n + j] = static_cast<scalar_t>(y[j * batch + b]);
  }
}

// The spikes of neurons [j0, j1), bytes (B, N), into their neuron-major rows of the history
inline void spikes_into_history(const uint8_t* __restrict__ fired, uint8_t* __restrict__ history,
                                int64_t n, int64_t batch, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    uint8_t* __restrict__ row = history + j * batch;
    for (int64_t b = 0; b < batch; ++b) row[b] = fired[b * n + j];
  }
}

template <typename scalar_t, typename count_t>
void forward_loop(const at::Tensor& drive, const at::Tensor& weight_in, const at::Tensor& mask,
                  const at::Tensor& lags, const at::Tensor& coef, const LIFConstants& lif,
                  const Dropouts& dropout, at::Tensor& spikes_out, at::Tensor& history,
                  at::Tensor& membrane, at::Tensor& trace, at::Tensor& slope,
                  at::Tensor& support) {
  const int64_t steps = drive.size(0), batch = drive.size(1), n = drive.size(2);
  const int64_t nb = n * batch;
  const bool need_slope = slope.numel() > 0, need_support = support.numel() > 0;
  const bool has_mask = mask.defined();

  const scalar_t* drive_p = drive.data_ptr<scalar_t>();                      // (T, B, N)
  const scalar_t* mask_p = has_mask ? mask.data_ptr<scalar_t>() : nullptr;   // (B, N)
  const int64_t* lags_p = lags.data_ptr<int64_t>();
  const double* coef_p = coef.data_ptr<double>();  // (2, N, 3): increments of z and D/w²
  scalar_t* spikes_p = spikes_out.data_ptr<scalar_t>();                      // (T, B, N)
  // (T+1, N, B), read as bytes: GCC vectorises uint8_t loads, not bool loads
  uint8_t* hist = reinterpret_cast<uint8_t*>(history.data_ptr<bool>());
  scalar_t* membrane_p = membrane.data_ptr<scalar_t>();                      // (T, B, N)
  scalar_t* trace_p = trace.data_ptr<scalar_t>();                            // (T, B, N)
  count_t* slope_p = need_slope ? slope.data_ptr<count_t>() : nullptr;       // (T+1, N, B)
  count_t* support_p = need_support ? support.data_ptr<count_t>() : nullptr; // (T+1, N, B)

  std::vector<double> y_store(nb, 0.0), d_store(nb, 0.0);  // z and D/w², (N, B)
  std::vector<scalar_t> v_store(nb, static_cast<scalar_t>(lif.v0));  // (B, N)
  std::vector<uint8_t> fired_store(nb);  // the spikes of step t as bytes, (B, N)
  double* y = y_store.data();
  double* d = d_store.data();
  scalar_t* v = v_store.data();
  uint8_t* fired = fired_store.data();
  at::Tensor recurrent = at::empty({batch, n}, drive.options());
  const scalar_t* rec_p = recurrent.data_ptr<scalar_t>();
  const at::Tensor weight_in_t = weight_in.t();
  std::vector<int64_t> rows;
  const LIFUpdate<scalar_t> neuron(lif);

  std::fill(hist, hist + nb, uint8_t(0));
  if (need_slope) std::fill(slope_p, slope_p + nb, count_t(0));
  if (need_support) std::fill(support_p, support_p + nb, count_t(0));

  for (int64_t t = 0; t < steps; ++t) {
    tap_rows(lags_p, need_slope ? 4 : 3, n, batch, t, steps, true, rows);
    const int64_t now = t * nb, next = (t + 1) * nb;
    for_each_block(n, batch, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        if (j + kPrefetchAhead < j1) prefetch_taps(hist, rows, n, j + kPrefetchAhead, batch);
        const int64_t row = j * batch;
        const uint8_t* s0 = hist + rows[j];
        const uint8_t* s1 = hist + rows[n + j];
        const uint8_t* s2 = hist + rows[2 * n + j];
        recursion_step(y + row, d + row, s0, s1, s2, coef_p + 3 * j, coef_p + 3 * (n + j), batch);
        if (need_slope) {
          slope_step(slope_p + next + row, slope_p + now + row, s0, s1, s2,
                     hist + rows[3 * n + j], batch);
        }
        if (need_support) {
          support_step(support_p + next + row, support_p + now + row, s0, s2, batch);
        }
      }
      transpose_block(y, trace_p + now, n, batch, j0, j1);  // z, into the batch-major trace
    });
    at::mm_out(recurrent, trace.select(0, t), weight_in_t);  // (B, N) = z (B, N) Wᵀ
    // the neurons, batch row by batch row: with dropout, the row's masks drawn, then c ⊙ m and
    // s ⊙ m as csrc/fused.cpp's dropout computes them, while the row is in cache
    const auto update = [&](const scalar_t* row_drive, int64_t first, int64_t count) {
      const int64_t at = now + first;
      if (has_mask) {
        charge_and_fire<scalar_t, true, true>(neuron, row_drive, mask_p + first, rec_p + first,
                                              v + first, membrane_p + at, spikes_p + at,
                                              fired + first, count);
      } else {
        charge_and_fire<scalar_t, false, true>(neuron, row_drive, nullptr, rec_p + first,
                                               v + first, membrane_p + at, spikes_p + at,
                                               fired + first, count);
      }
    };
    for_each_row(batch, n, [&](int64_t b0, int64_t b1) {
      std::vector<uint32_t> words(dropout.any() ? n + delrec::kChunk : 0);
      std::vector<scalar_t> dropped(dropout.input.active ? n : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* row_drive = drive_p + now + b * n;
        if (dropout.input.active) {
          dropout.input.apply_to_row(dropped.data(), row_drive, words, n, b, t);
          row_drive = dropped.data();
        }
        update(row_drive, b * n, n);
        scalar_t* row_spikes = spikes_p + now + b * n;
        if (dropout.output.active) {
          dropout.output.apply_to_row(row_spikes, row_spikes, words, n, b, t);
        }
      }
    });
    for_each_block(n, batch, [&](int64_t j0, int64_t j1) {
      spikes_into_history(fired, hist + next, n, batch, j0, j1);
    });
  }
}

// One step of the LIF adjoint (lif.h) on elements [begin, end) of the (B, N) slices, the
// surrogate derivative fixed at compile time (0: read from psi); gh holds ∂L/∂h[t+1] on entry
// and ∂L/∂h[t] on return; masked (unless null): ∂L/∂h[t] ⊙ the recurrent dropout mask (without
// one, ∂L/∂h[t]), the input of the GEMM and of the weight gradient.
template <typename scalar_t, int surrogate, bool has_mask>
void adjoint_step(const LIFUpdate<scalar_t> neuron, const SurrogateDerivative<scalar_t> derivative,
                  const scalar_t* __restrict__ membrane, const scalar_t* __restrict__ psi,
                  const scalar_t* __restrict__ grad_s, const scalar_t* __restrict__ zeta,
                  const scalar_t* __restrict__ mask, scalar_t* __restrict__ gh,
                  scalar_t* __restrict__ grad_h, scalar_t* __restrict__ masked, int64_t begin,
                  int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t h = membrane[i];
    scalar_t slope;
    if constexpr (surrogate == 0) {
      slope = psi[i];
    } else {
      slope = derivative.template of<surrogate>(h - neuron.threshold);
    }
    const scalar_t g = neuron.adjoint(grad_s[i] + zeta[i], gh[i], h, neuron.fires(h), slope);
    if (grad_h) grad_h[i] = g;  // (the loop is unswitched on it)
    gh[i] = g;
    if constexpr (has_mask) {
      masked[i] = g * mask[i];
    } else {
      if (masked) masked[i] = g;
    }
  }
}

// Eight float64 lanes (GCC/Clang vectors: one AVX-512 register, two AVX2 ones, …); the sums
// below keep one partial sum per lane and add the lanes in a fixed order, so that they
// vectorise and give the same result on every CPU.
typedef double Lanes __attribute__((vector_size(64)));
constexpr int64_t kSumLanes = 8;  // doubles of a Lanes vector

inline double lane_total(const Lanes& lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Σ_b g[b]·x[b] over one neuron's batch row in float64, element b in lane b mod 8 (the last
// batch % 64 elements added after the lanes)
template <typename scalar_t, typename x_t>
inline double row_dot(const scalar_t* __restrict__ g, const x_t* __restrict__ x, int64_t batch) {
  constexpr int64_t kSumChunk = 8 * kSumLanes;
  Lanes lane = {};
  double product[kSumChunk];
  int64_t b = 0;
  for (; b + kSumChunk <= batch; b += kSumChunk) {
    for (int64_t i = 0; i < kSumChunk; ++i) {
      product[i] = static_cast<double>(g[b + i]) * static_cast<double>(x[b + i]);
    }
    for (int64_t i = 0; i < kSumChunk; i += kSumLanes) {
      Lanes part;
      std::memcpy(&part, product + i, sizeof part);
      lane += part;
    }
  }
  double total = lane_total(lane);
  for (; b < batch; ++b) total += static_cast<double>(g[b]) * static_cast<double>(x[b]);
  return total;
}

// ζ of neurons [j0, j1), neuron-major float64 (N, B), into a batch-major (B, N) slice, and
// Σ_b s[b, j]·ζ[j, b] added to sum[j] (spiking: h ≥ θ, membrane batch-major), one partial sum
// per neuron over b in order. This is the sum Σ ∂L/∂z·z behind the spread gradient: with
// z[t] = Σ_k κ(k) s[t-k] and ζ[t] = Σ_k κ(k) ∂L/∂z[t+k], Σ_t ∂L/∂z[t]·z[t] = Σ_t s[t]·ζ[t]
// (both sums run over the same pairs (t, k)), which needs no transposed adjoint.
template <typename scalar_t, bool sum_spiking>
inline void adjoint_block(const double* __restrict__ y, scalar_t* __restrict__ zeta,
                          const scalar_t* __restrict__ membrane, scalar_t threshold,
                          double* __restrict__ sum, int64_t n, int64_t batch, int64_t j0,
                          int64_t j1) {
  double block[kBlock] = {};
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = j0; j < j1; ++j) {
      const double value = y[j * batch + b];
      zeta[b * n + j] = static_cast<scalar_t>(value);
      if (sum_spiking) block[j - j0] += membrane[b * n + j] >= threshold ? value : 0.0;
    }
  }
  if (sum_spiking) {
    for (int64_t j = j0; j < j1; ++j) sum[j] += block[j - j0];
  }
}

template <typename scalar_t, typename count_t>
void backward_loop(const at::Tensor& grad_spikes, const at::Tensor& membrane,
                   const at::Tensor& psi, const at::Tensor& weight_in, const at::Tensor& mask,
                   const at::Tensor& lags, const at::Tensor& coef, const LIFConstants& lif,
                   const at::Tensor& slope, const at::Tensor& support, const Dropouts& dropout,
                   const at::Tensor& trace, at::Tensor& grad_h, at::Tensor& grad_weight,
                   at::Tensor& grad_current, at::Tensor& sums) {
  const int64_t steps = membrane.size(0), batch = membrane.size(1), n = membrane.size(2);
  const int64_t nb = n * batch;
  const bool has_mask = mask.defined();
  const bool need_slope = slope.numel() > 0, need_support = support.numel() > 0;

  const scalar_t* grad_out = grad_spikes.data_ptr<scalar_t>();               // (T, B, N)
  const scalar_t* membrane_p = membrane.data_ptr<scalar_t>();                // (T, B, N)
  const scalar_t* psi_p = lif.surrogate == 0 ? psi.data_ptr<scalar_t>() : nullptr;
  const scalar_t* mask_p = has_mask ? mask.data_ptr<scalar_t>() : nullptr;   // (B, N)
  const int64_t* lags_p = lags.data_ptr<int64_t>();
  const double* coef_p = coef.data_ptr<double>();
  const count_t* slope_p = need_slope ? slope.data_ptr<count_t>() + nb : nullptr;
  const count_t* support_p = need_support ? support.data_ptr<count_t>() + nb : nullptr;
  // (T, B, N), each unless empty
  scalar_t* grad_h_p = grad_h.numel() ? grad_h.data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_c_p = grad_current.numel() ? grad_current.data_ptr<scalar_t>() : nullptr;
  double* by_slope = sums.data_ptr<double>();  // (3, N): Σ ∂L/∂z·E, Σ ∂L/∂z·K, Σ ∂L/∂z·z
  double* by_support = by_slope + n;
  double* by_trace = by_slope + 2 * n;

  // ∂L/∂z[t] (N, B) for the steps a tap still reads; slot T stays zero
  at::Tensor future = at::empty({steps + 1, n, batch}, membrane.options());
  future.select(0, steps).zero_();
  scalar_t* future_p = future.data_ptr<scalar_t>();
  std::vector<double> y_store(nb, 0.0), d_store(nb, 0.0);  // ζ and its slope, (N, B)
  double* y = y_store.data();
  double* d = d_store.data();
  std::vector<scalar_t> zeta_store(nb);                     // ζ[t], (B, N)
  scalar_t* zeta = zeta_store.data();
  at::Tensor gh = at::zeros({batch, n}, membrane.options());  // ∂L/∂h[t] (B, N)
  scalar_t* gh_p = gh.data_ptr<scalar_t>();
  // the GEMM inputs of steps [first, first + pending steps) (pending steps, B, N): the weight
  // gradient takes them once the step `first` is done
  const bool need_weight = grad_weight.numel() > 0;
  const int64_t per_step = static_cast<int64_t>(nb * sizeof(scalar_t));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(kPendingBytes / per_step, steps));
  at::Tensor pending =
      at::empty({has_mask || need_weight ? chunk : 0, batch, n}, membrane.options());
  if (need_weight) grad_weight.zero_();
  std::vector<int64_t> rows;
  const LIFUpdate<scalar_t> neuron(lif);
  const SurrogateDerivative<scalar_t> derivative(lif);
  std::vector<scalar_t> kept_store(dropout.output.active ? nb : 0);  // ∂L/∂s[t] = ∂L/∂out ⊙ m
  scalar_t* kept = kept_store.data();

  // the adjoint of step t on elements [begin, end), for each surrogate and masking
  const auto adjoint = [&](int64_t now, const scalar_t* grad_s, scalar_t* masked, int64_t begin,
                           int64_t end) {
    const scalar_t* psi_t = psi_p ? psi_p + now : nullptr;
    const auto run = [&](auto surrogate, auto with_mask) {
      adjoint_step<scalar_t, decltype(surrogate)::value, decltype(with_mask)::value>(
          neuron, derivative, membrane_p + now, psi_t, grad_s, zeta, mask_p, gh_p,
          grad_h_p ? grad_h_p + now : nullptr, masked, begin, end);
    };
    const auto with_surrogate = [&](auto with_mask) {
      switch (lif.surrogate) {
        case 1: run(std::integral_constant<int, 1>(), with_mask); break;
        case 2: run(std::integral_constant<int, 2>(), with_mask); break;
        default: run(std::integral_constant<int, 0>(), with_mask); break;
      }
    };
    if (has_mask) {
      with_surrogate(std::true_type());
    } else {
      with_surrogate(std::false_type());
    }
  };

  for (int64_t t = steps - 1; t >= 0; --t) {
    tap_rows(lags_p, 3, n, batch, t, steps, false, rows);
    const int64_t now = t * nb;
    const int64_t first = t / chunk * chunk;  // the steps [first, …] that share the buffer
    scalar_t* masked = pending.numel() ? pending.data_ptr<scalar_t>() + (t - first) * nb : nullptr;
    for_each_block(n, batch, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        if (j + kPrefetchAhead < j1) prefetch_taps(future_p, rows, n, j + kPrefetchAhead, batch);
        recursion_step(y + j * batch, d + j * batch, future_p + rows[j], future_p + rows[n + j],
                       future_p + rows[2 * n + j], coef_p + 3 * j, coef_p + 3 * (n + j), batch);
      }
      if (need_support) {  // ζ[t], batch-major, and Σ s·ζ
        adjoint_block<scalar_t, true>(y, zeta, membrane_p + now, neuron.threshold, by_trace, n,
                                      batch, j0, j1);
      } else {
        adjoint_block<scalar_t, false>(y, zeta, nullptr, neuron.threshold, nullptr, n, batch, j0,
                                       j1);
      }
    });
    // the LIF adjoint (gh still holds ∂L/∂h[t+1] when step t reads it), batch row by batch row:
    // with dropout, the row's masks drawn, then ∂L/∂s = ∂L/∂out ⊙ m and ∂L/∂c = ∂L/∂h ⊙ m,
    // while the row is in cache
    for_each_row(batch, n, [&](int64_t b0, int64_t b1) {
      std::vector<uint32_t> words(dropout.any() ? n + delrec::kChunk : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row = b * n;
        const scalar_t* grad_s = grad_out + now;  // ∂L/∂s[t], read at [row, row + n)
        if (dropout.output.active) {
          dropout.output.apply_to_row(kept + row, grad_s + row, words, n, b, t);
          grad_s = kept;
        }
        adjoint(now, grad_s, masked, row, row + n);
        if (grad_c_p) dropout.input.apply_to_row(grad_c_p + now + row, gh_p + row, words, n, b, t);
      }
    });
    at::Tensor future_t = future.select(0, t);  // (N, B) = Wᵀ (N, N) gᵀ (N, B)
    at::mm_out(future_t, weight_in.t(), (has_mask ? pending.select(0, t - first) : gh).t());
    if (need_weight && t == first) {  // Σ (∂L/∂h ⊙ m)ᵀ z over the buffered steps
      const int64_t count = std::min(chunk, steps - first);
      grad_weight.addmm_(pending.narrow(0, 0, count).view({count * batch, n}).t(),
                         trace.narrow(0, first, count).view({count * batch, n}));
    }
    if (need_slope || need_support) {  // the sums behind the delay and spread gradients
      for_each_block(n, batch, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t row = now + j * batch;
          if (need_slope) by_slope[j] += row_dot(future_p + row, slope_p + row, batch);
          if (need_support) by_support[j] += row_dot(future_p + row, support_p + row, batch);
        }
      });
    }
  }
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "delrec axonal kernel: ", what); }

void check_common(const at::Tensor& x, const at::Tensor& lags, const at::Tensor& coef,
                  const c10::optional<at::Tensor>& mask) {
  check(x.device().is_cpu() && x.is_contiguous() && x.dim() == 3,
        "sequences must be contiguous (T, B, N) CPU tensors");
  check(lags.scalar_type() == at::kLong && lags.is_contiguous() && lags.dim() == 2 &&
            lags.size(0) == x.size(2) && lags.size(1) == 4,
        "lags must be a contiguous (N, 4) int64 tensor");
  check(!mask.has_value() || (mask->dim() == 2 && mask->size(0) == x.size(1) &&
                              mask->size(1) == x.size(2) && mask->dtype() == x.dtype()),
        "the recurrent dropout mask must be (B, N), in the sequences' dtype");
  check(coef.scalar_type() == at::kDouble && coef.is_contiguous() && coef.dim() == 3,
        "coef must be a contiguous (2, N, 3) float64 tensor");
}

void forward(const at::Tensor& drive, const at::Tensor& weight_in,
             const c10::optional<at::Tensor>& mask, const at::Tensor& lags,
             const at::Tensor& coef, double leak, double v0, double threshold, double v_reset,
             bool soft_reset, MaskArgs input_dropout, MaskArgs output_dropout, at::Tensor spikes,
             at::Tensor history, at::Tensor membrane, at::Tensor trace, at::Tensor slope,
             at::Tensor support) {
  check_common(drive, lags, coef, mask);
  check(slope.scalar_type() == support.scalar_type(), "slope and support share a dtype");
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const LIFConstants lif{leak, v0, threshold, v_reset, soft_reset, false, 0, 0.0};
  const Dropouts dropout{delrec::mask_of(input_dropout), delrec::mask_of(output_dropout)};
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "delrec_axonal_forward", [&] {
    if (slope.scalar_type() == at::kChar) {
      forward_loop<scalar_t, int8_t>(drive, weight_in, mask_c, lags, coef, lif, dropout,
                                     spikes, history, membrane, trace, slope, support);
    } else {
      check(slope.scalar_type() == at::kShort, "box sums must be int8 or int16");
      forward_loop<scalar_t, int16_t>(drive, weight_in, mask_c, lags, coef, lif, dropout,
                                      spikes, history, membrane, trace, slope, support);
    }
  });
}

void backward(const at::Tensor& grad_spikes, const at::Tensor& membrane, const at::Tensor& psi,
              const at::Tensor& weight_in, const c10::optional<at::Tensor>& mask,
              const at::Tensor& lags, const at::Tensor& coef, double leak, double threshold,
              double v_reset, bool soft_reset, bool detach_reset, int64_t surrogate,
              double surrogate_param, const at::Tensor& slope, const at::Tensor& support,
              MaskArgs input_dropout, MaskArgs output_dropout, const at::Tensor& trace,
              at::Tensor grad_h,
              at::Tensor grad_weight, at::Tensor grad_current, at::Tensor sums) {
  check_common(grad_spikes, lags, coef, mask);
  check(membrane.is_contiguous() && (surrogate != 0 || psi.is_contiguous()),
        "membrane and ψ' must be contiguous (T, B, N)");
  check(sums.scalar_type() == at::kDouble && sums.numel() == 3 * membrane.size(2),
        "sums must be (3, N) float64");
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t n = membrane.size(2);
  check(trace.is_contiguous() && trace.sizes() == membrane.sizes() &&
            trace.scalar_type() == membrane.scalar_type(),
        "trace must be a contiguous (T, B, N) tensor like the membrane");
  check(grad_weight.numel() == 0 ||
            (grad_weight.is_contiguous() && grad_weight.sizes() == at::IntArrayRef({n, n}) &&
             grad_weight.scalar_type() == membrane.scalar_type()),
        "grad_weight must be empty, or a contiguous (N, N) tensor like the membrane");
  const LIFConstants lif{leak, 0.0, threshold, v_reset, soft_reset, detach_reset, surrogate,
                         surrogate_param};
  const Dropouts dropout{delrec::mask_of(input_dropout), delrec::mask_of(output_dropout)};
  check(grad_current.numel() == 0 || (dropout.input.active && grad_current.is_contiguous() &&
                                       grad_current.sizes() == membrane.sizes()),
        "grad_current must be empty, or a contiguous (T, B, N) tensor with an input dropout");
  check(grad_h.numel() == 0 || (grad_h.is_contiguous() && grad_h.sizes() == membrane.sizes()),
        "grad_h must be empty, or a contiguous (T, B, N) tensor");
  const at::ScalarType counts = slope.numel() ? slope.scalar_type() : support.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(membrane.scalar_type(), "delrec_axonal_backward", [&] {
    if (counts == at::kChar) {
      backward_loop<scalar_t, int8_t>(grad_spikes, membrane, psi, weight_in, mask_c, lags, coef,
                                      lif, slope, support, dropout, trace, grad_h, grad_weight,
                                      grad_current, sums);
    } else {
      check(counts == at::kShort, "box sums must be int8 or int16");
      backward_loop<scalar_t, int16_t>(grad_spikes, membrane, psi, weight_in, mask_c, lags,
                                       coef, lif, slope, support, dropout, trace, grad_h,
                                       grad_weight, grad_current, sums);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: fused time loops of the axonal fast engine";
  m.def("forward", &forward,
        "axonal forward loop: fills spikes (times the output dropout's mask, with one), history, "
        "membrane, trace, box sums");
  m.def("backward", &backward,
        "axonal backward loop: fills grad_h (unless empty), the weight gradient Σ (grad_h ⊙ the "
        "recurrent mask)ᵀ trace (unless empty), the current's gradient (with an input dropout: "
        "grad_h ⊙ its mask) and the delay/spread sums; with an output dropout, grad_spikes is "
        "the gradient of the dropped spikes");
}
