// The network around the delays, fused (delrec/engine/fused.py, docs/speed.md): the time
// loop of a feedforward LIF layer and of the leaky-integrator readout, forward and backward, one
// loop each; dropout masks drawn by a counter-based generator (Philox4x32-10), applied alone or
// inside the LIF loop; BatchNorm over the T·B frames of a sequence in two passes each way;
// linear maps of spikes over their non-zero inputs only (spike products).
//
// Layouts: every sequence is time-major (T, B, N), contiguous. The loops run in parallel over
// blocks of batch rows (ATen's intra-op threads), each block through the whole time loop, so
// one layer is one parallel region; the neuron state of a block stays in L1/L2.
//
// The LIF neuron is csrc/lif.h's (charge, fire, reset, adjoint, surrogate derivative).
//
// Dropout masks (csrc/philox.h) are a function of the key and the element's position only: the
// backward draws them again instead of saving them, and a process holding rows
// [offset, offset + B) of a larger batch draws exactly those rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "lif.h"
#include "philox.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using delrec::LIFConstants;
using delrec::LIFUpdate;
using delrec::SurrogateDerivative;
using delrec::Mask;
using delrec::MaskArgs;
using delrec::mask_of;
using delrec::mask_values;
using delrec::kChunk;

constexpr int64_t kGrain = 8192;  // elements per parallel chunk

// fn(b0, b1) on blocks of batch rows [b0, b1) of a (T, B, N) sequence, in parallel.
template <typename Fn>
void for_each_row_block(int64_t batch, int64_t n, const Fn& fn) {
  const int64_t rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n));
  at::parallel_for(0, batch, rows, fn);
}

// out = x ⊙ mask (x undefined: out = mask), on (T, B, N) sequences.
template <typename scalar_t>
void dropout_loop(const at::Tensor& x, at::Tensor& out, const Mask& mask) {
  const int64_t steps = out.size(0), batch = out.size(1), n = out.size(2);
  const scalar_t* x_p = x.defined() ? x.data_ptr<scalar_t>() : nullptr;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const Mask m = mask;
  for_each_row_block(batch, n, [=](int64_t b0, int64_t b1) {
    std::vector<uint32_t> words(n + kChunk);
    const scalar_t kept = static_cast<scalar_t>(m.scale);
    for (int64_t t = 0; t < steps; ++t) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row = (t * batch + b) * n;
        if (x_p == nullptr) {
          m.draw(words, n, b, t);
          mask_values(out_p + row, words.data(), n, m.threshold, kept);
        } else {
          m.apply_to_row(out_p + row, x_p + row, words, n, b, t);
        }
      }
    }
  });
}

// --------------------------------------------------------------------------- LIF layer
// Forward: h = (gain·(c ⊙ m_in) + offset) + leak·v, s = Θ(h - θ), out = s ⊙ m_out; saves h.
template <typename scalar_t>
void lif_forward_loop(const at::Tensor& current, const LIFConstants& constants, double gain,
                      double offset, const Mask& in, const Mask& out_mask, at::Tensor& spikes,
                      at::Tensor& membrane) {
  const int64_t steps = current.size(0), batch = current.size(1), n = current.size(2);
  const scalar_t* c_p = current.data_ptr<scalar_t>();
  scalar_t* s_p = spikes.data_ptr<scalar_t>();
  scalar_t* h_p = membrane.data_ptr<scalar_t>();
  const LIFConstants k = constants;
  const Mask m_in = in, m_out = out_mask;
  for_each_row_block(batch, n, [=](int64_t b0, int64_t b1) {
    const LIFUpdate<scalar_t> lif(k);
    const scalar_t g = gain, o = offset;
    std::vector<scalar_t> v_store((b1 - b0) * n, static_cast<scalar_t>(k.v0));
    std::vector<uint32_t> words(n + kChunk);
    std::vector<scalar_t> in_values(n, scalar_t(1)), out_values(n, scalar_t(1));
    for (int64_t t = 0; t < steps; ++t) {
      for (int64_t b = b0; b < b1; ++b) {
        m_in.values_of_row(in_values, words, n, b, t);
        m_out.values_of_row(out_values, words, n, b, t);
        const int64_t row = (t * batch + b) * n;
        const scalar_t* __restrict__ c = c_p + row;
        const scalar_t* __restrict__ mi = in_values.data();
        const scalar_t* __restrict__ mo = out_values.data();
        scalar_t* __restrict__ h_t = h_p + row;
        scalar_t* __restrict__ s_t = s_p + row;
        scalar_t* __restrict__ v = v_store.data() + (b - b0) * n;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t h = lif.charge(g * (c[i] * mi[i]) + o, scalar_t(0), v[i]);
          const bool spike = lif.fires(h);
          h_t[i] = h;
          v[i] = lif.reset_after(h, spike);
          s_t[i] = (spike ? scalar_t(1) : scalar_t(0)) * mo[i];
        }
      }
    }
  });
}

// Backward: the reverse loop of the LIF adjoint; ∂L/∂c = gain·∂L/∂h ⊙ m_in, with
// ∂L/∂s = ∂L/∂out ⊙ m_out. ψ' is computed here (Triangle, ATan) or read from `psi`.
template <typename scalar_t, int kSurrogate>
void lif_backward_loop(const at::Tensor& grad_out, const at::Tensor& membrane,
                       const at::Tensor& psi, const LIFConstants& constants, double gain,
                       const Mask& in, const Mask& out_mask, at::Tensor& grad_current) {
  const int64_t steps = membrane.size(0), batch = membrane.size(1), n = membrane.size(2);
  const scalar_t* g_p = grad_out.data_ptr<scalar_t>();
  const scalar_t* h_p = membrane.data_ptr<scalar_t>();
  const scalar_t* psi_p = kSurrogate == 0 ? psi.data_ptr<scalar_t>() : nullptr;
  scalar_t* gc_p = grad_current.data_ptr<scalar_t>();
  const LIFConstants k = constants;
  const Mask m_in = in, m_out = out_mask;
  for_each_row_block(batch, n, [=](int64_t b0, int64_t b1) {
    const LIFUpdate<scalar_t> lif(k);
    const SurrogateDerivative<scalar_t> surrogate(k);
    const scalar_t g = gain;
    std::vector<scalar_t> gh_store((b1 - b0) * n, scalar_t(0));  // ∂L/∂h[t+1]
    std::vector<uint32_t> words(n + kChunk);
    std::vector<scalar_t> in_values(n, scalar_t(1)), out_values(n, scalar_t(1));
    for (int64_t t = steps - 1; t >= 0; --t) {
      for (int64_t b = b0; b < b1; ++b) {
        m_in.values_of_row(in_values, words, n, b, t);
        m_out.values_of_row(out_values, words, n, b, t);
        const int64_t row = (t * batch + b) * n;
        const scalar_t* __restrict__ grad = g_p + row;
        const scalar_t* __restrict__ h_t = h_p + row;
        const scalar_t* __restrict__ psi_t = psi_p ? psi_p + row : nullptr;
        const scalar_t* __restrict__ mi = in_values.data();
        const scalar_t* __restrict__ mo = out_values.data();
        scalar_t* __restrict__ gc = gc_p + row;
        scalar_t* __restrict__ gh = gh_store.data() + (b - b0) * n;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t h = h_t[i];
          const scalar_t slope =
              kSurrogate == 0 ? psi_t[i] : surrogate.template of<kSurrogate>(h - lif.threshold);
          const scalar_t next = lif.adjoint(grad[i] * mo[i], gh[i], h, lif.fires(h), slope);
          gh[i] = next;
          gc[i] = (g * next) * mi[i];
        }
      }
    }
  });
}

// --------------------------------------------------------------------------- leaky integrator
// v[t] = gain·u[t] + leak·v[t-1] from v[-1] = initial (B, K): the membrane sequence is the
// output (a sequence run in chunks computes what one pass does, to the bit).
template <typename scalar_t>
void integrator_forward_loop(const at::Tensor& current, double leak, double gain,
                             const at::Tensor& initial, at::Tensor& out) {
  const int64_t steps = current.size(0), width = current.size(1) * current.size(2);
  const scalar_t* u_p = current.data_ptr<scalar_t>();
  const scalar_t* v0_p = initial.data_ptr<scalar_t>();
  scalar_t* v_p = out.data_ptr<scalar_t>();
  const scalar_t l = leak, g = gain;
  at::parallel_for(0, width, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t t = 0; t < steps; ++t) {
      const scalar_t* __restrict__ u = u_p + t * width;
      const scalar_t* __restrict__ before = t > 0 ? v_p + (t - 1) * width : v0_p;
      scalar_t* __restrict__ v = v_p + t * width;
      for (int64_t i = i0; i < i1; ++i) v[i] = g * u[i] + l * before[i];
    }
  });
}

// a[t] = ∂L/∂v[t] + leak·a[t+1]; ∂L/∂u[t] = gain·a[t].
template <typename scalar_t>
void integrator_backward_loop(const at::Tensor& grad_out, double leak, double gain,
                              at::Tensor& grad_current) {
  const int64_t steps = grad_out.size(0), width = grad_out.size(1) * grad_out.size(2);
  const scalar_t* g_p = grad_out.data_ptr<scalar_t>();
  scalar_t* gu_p = grad_current.data_ptr<scalar_t>();
  const scalar_t l = leak, g = gain;
  at::parallel_for(0, width, kGrain, [&](int64_t i0, int64_t i1) {
    std::vector<scalar_t> adjoint(i1 - i0, scalar_t(0));
    scalar_t* __restrict__ a = adjoint.data();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const scalar_t* __restrict__ grad = g_p + t * width + i0;
      scalar_t* __restrict__ gu = gu_p + t * width + i0;
      for (int64_t i = 0; i < i1 - i0; ++i) {
        a[i] = grad[i] + l * a[i];
        gu[i] = g * a[i];
      }
    }
  });
}

// --------------------------------------------------------------------------- BatchNorm
// Statistics over the M = T·B frames of each channel, in float64, summed in fixed chunks of
// frames (the same sums whatever the thread count).
constexpr int64_t kFrames = 256;

// out (rows, N) float64 = per-channel sums over the frames of `rows` terms each:
// frame_terms(f, acc) adds frame f's terms to acc[r·N + channel]. Frames are summed in fixed
// chunks (the same sums whatever the thread count), the chunks in order.
template <typename Fn>
void channel_sums(int64_t frames, int64_t n, int64_t rows, at::Tensor& out,
                  const Fn& frame_terms) {
  const int64_t chunks = (frames + kFrames - 1) / kFrames, width = rows * n;
  std::vector<double> partial(chunks * width, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t f = k * kFrames; f < std::min(frames, (k + 1) * kFrames); ++f) {
        frame_terms(f, partial.data() + k * width);
      }
    }
  });
  double* sums = out.data_ptr<double>();
  std::fill(sums, sums + width, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < width; ++i) sums[i] += partial[k * width + i];
  }
}

// Forward (training): mean and biased variance of each channel, then
// y = (x - mean)·(γ·invstd) + β. Fills out, mean (N) and var (N) (float64).
template <typename scalar_t>
void batch_norm_forward_loop(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias, double eps, at::Tensor& out,
                             at::Tensor& mean, at::Tensor& var) {
  const int64_t n = x.size(-1), frames = x.numel() / n;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  // the sums are taken around a pivot, each channel's first value: Σx²/M − mean² of values far
  // from zero against their spread would cancel most of the variance's digits
  std::vector<double> pivot(n, 0.0);
  for (int64_t i = 0; i < n && frames > 0; ++i) pivot[i] = x_p[i];
  at::Tensor sums = at::empty({2, n}, x.options().dtype(at::kDouble));
  channel_sums(frames, n, 2, sums, [&](int64_t f, double* acc) {
    const scalar_t* __restrict__ row = x_p + f * n;
    const double* __restrict__ k = pivot.data();
    double* __restrict__ a = acc;
    double* __restrict__ b = acc + n;
    for (int64_t i = 0; i < n; ++i) {
      const double value = double(row[i]) - k[i];
      a[i] += value;
      b[i] += value * value;
    }
  });
  const double* s = sums.data_ptr<double>();
  double* mean_p = mean.data_ptr<double>();
  double* var_p = var.data_ptr<double>();
  std::vector<scalar_t> centre(n), scale(n), shift(n);
  const scalar_t* w_p = weight.data_ptr<scalar_t>();
  const scalar_t* b_p = bias.data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) {
    const double offset = s[i] / frames;  // mean − pivot
    mean_p[i] = pivot[i] + offset;
    var_p[i] = std::max(0.0, s[n + i] / frames - offset * offset);
    centre[i] = static_cast<scalar_t>(mean_p[i]);
    scale[i] = static_cast<scalar_t>(w_p[i] / std::sqrt(var_p[i] + eps));
    shift[i] = b_p[i];
  }
  scalar_t* out_p = out.data_ptr<scalar_t>();
  at::parallel_for(0, frames, std::max<int64_t>(1, kGrain / n), [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const scalar_t* __restrict__ row = x_p + f * n;
      scalar_t* __restrict__ y = out_p + f * n;
      for (int64_t i = 0; i < n; ++i) y[i] = (row[i] - centre[i]) * scale[i] + shift[i];
    }
  });
}

// Backward: with g = ∂L/∂y, S1 = Σ g and S2 = Σ g·(x - mean) per channel,
// ∂L/∂x = γ·invstd·(g - S1/M - (x - mean)·invstd²·S2/M), ∂L/∂γ = S2·invstd, ∂L/∂β = S1.
// Fills grad_x and sums (3, N) float64 = (S1, S2, Σ ∂L/∂x): the last is the gradient of a bias
// added to x before the normalisation (zero up to rounding).
template <typename scalar_t>
void batch_norm_backward_loop(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              const at::Tensor& weight, at::Tensor& grad_x, at::Tensor& sums) {
  const int64_t n = x.size(-1), frames = x.numel() / n;
  const scalar_t* g_p = grad.data_ptr<scalar_t>();
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const double* mean_p = mean.data_ptr<double>();
  const double* invstd_p = invstd.data_ptr<double>();
  std::vector<scalar_t> centre(n);
  for (int64_t i = 0; i < n; ++i) centre[i] = static_cast<scalar_t>(mean_p[i]);
  at::Tensor moments = at::empty({2, n}, sums.options());
  channel_sums(frames, n, 2, moments, [&](int64_t f, double* acc) {
    const scalar_t* __restrict__ g = g_p + f * n;
    const scalar_t* __restrict__ row = x_p + f * n;
    double* __restrict__ a = acc;
    double* __restrict__ b = acc + n;
    for (int64_t i = 0; i < n; ++i) {
      a[i] += g[i];
      b[i] += static_cast<double>(g[i]) * static_cast<double>(row[i] - centre[i]);
    }
  });
  const double* s = moments.data_ptr<double>();
  const scalar_t* w_p = weight.data_ptr<scalar_t>();
  std::vector<scalar_t> scale(n), by_x(n), constant(n);
  for (int64_t i = 0; i < n; ++i) {
    const double a = w_p[i] * invstd_p[i];
    scale[i] = static_cast<scalar_t>(a);
    by_x[i] = static_cast<scalar_t>(-a * invstd_p[i] * invstd_p[i] * s[n + i] / frames);
    constant[i] = static_cast<scalar_t>(-a * s[i] / frames);
  }
  scalar_t* gx_p = grad_x.data_ptr<scalar_t>();
  at::Tensor total = at::empty({1, n}, sums.options());
  channel_sums(frames, n, 1, total, [&](int64_t f, double* acc) {
    const scalar_t* __restrict__ g = g_p + f * n;
    const scalar_t* __restrict__ row = x_p + f * n;
    scalar_t* __restrict__ out = gx_p + f * n;
    double* __restrict__ a = acc;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = (scale[i] * g[i] + constant[i]) + by_x[i] * (row[i] - centre[i]);
      a[i] += out[i];
    }
  });
  sums.select(0, 0).copy_(moments.select(0, 0));
  sums.select(0, 1).copy_(moments.select(0, 1));
  sums.select(0, 2).copy_(total.select(0, 0));
}

// --------------------------------------------------------------------------- spike products
// A linear map of spikes, y = x·Wᵀ + b with x (M, I) mostly zeros, over the non-zero inputs
// only: x compressed by rows (offsets (M+1), index (nnz) int32, value (nnz)), W given as
// Wᵀ (I, O) so that one input's weights are contiguous. Outputs are taken in blocks of up to
// kVectors vectors held in registers; every output's sum runs over the rows' non-zeros in
// order (the same sums whatever the thread count).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
constexpr int kVectors = 8;

template <typename scalar_t>
struct Vector {
  // loaded and stored at any address of a scalar_t, aliasing scalar_t arrays
  typedef scalar_t type
      __attribute__((vector_size(kVectorBytes), aligned(sizeof(scalar_t)), may_alias));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(scalar_t);
};

// Fills offsets (M+1) with the row starts of x's non-zeros and returns their count, or stops
// as soon as the rows counted hold more than max_count and returns -1 (a dense input then pays
// for about max_count / its density of the pass, not all of it: the count only has to say
// "more"). Each thread adds its rows' counts to a shared total every kCountCheck rows.
constexpr int64_t kCountCheck = 64;

template <typename scalar_t>
int64_t count_nonzero_rows(const at::Tensor& x, at::Tensor& offsets, int64_t max_count) {
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  int64_t* o_p = offsets.data_ptr<int64_t>();
  std::atomic<int64_t> counted{0};
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t c0 = r0; c0 < r1; c0 += kCountCheck) {
      const int64_t c1 = std::min(r1, c0 + kCountCheck);
      int64_t sum = 0;
      for (int64_t r = c0; r < c1; ++r) {
        const scalar_t* __restrict__ row = x_p + r * n;
        int32_t count = 0;
        for (int64_t i = 0; i < n; ++i) count += row[i] != scalar_t(0);
        o_p[r + 1] = count;
        sum += count;
      }
      if (counted.fetch_add(sum, std::memory_order_relaxed) + sum > max_count) return;
    }
  });
  if (counted.load() > max_count) return -1;
  o_p[0] = 0;
  for (int64_t r = 0; r < rows; ++r) o_p[r + 1] += o_p[r];
  return o_p[rows];
}

// Fills index and value from the offsets, 64 inputs at a time: a bit mask of the non-zeros,
// then its set bits in order.
template <typename scalar_t>
void gather_nonzero_rows(const at::Tensor& x, const at::Tensor& offsets, at::Tensor& index,
                         at::Tensor& value) {
  const int64_t rows = x.size(0), n = x.size(1);
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const int64_t* o_p = offsets.data_ptr<int64_t>();
  int32_t* i_p = index.data_ptr<int32_t>();
  scalar_t* v_p = value.data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ row = x_p + r * n;
      int64_t k = o_p[r];
      for (int64_t i0 = 0; i0 < n; i0 += 64) {
        const int64_t width = std::min<int64_t>(64, n - i0);
        uint64_t bits = 0;
        for (int64_t i = 0; i < width; ++i) bits |= uint64_t(row[i0 + i] != scalar_t(0)) << i;
        for (; bits != 0; bits &= bits - 1) {
          const int64_t i = i0 + __builtin_ctzll(bits);
          i_p[k] = static_cast<int32_t>(i);
          v_p[k++] = row[i];
        }
      }
    }
  });
}

// y[j, j + kCount·lanes) = bias + Σ_k value[k]·Wᵀ[index[k], same outputs], k in [k0, k1).
template <typename scalar_t, int kCount>
inline void product_block(const int32_t* index, const scalar_t* value, int64_t k0, int64_t k1,
                          const scalar_t* weight_t, int64_t n_out, int64_t j,
                          const scalar_t* bias, scalar_t* y) {
  using vec = typename Vector<scalar_t>::type;
  constexpr int64_t lanes = Vector<scalar_t>::kLanes;
  vec acc[kCount];
  for (int a = 0; a < kCount; ++a) {
    acc[a] = bias != nullptr ? *reinterpret_cast<const vec*>(bias + j + a * lanes) : vec{};
  }
  for (int64_t k = k0; k < k1; ++k) {
    const vec* w = reinterpret_cast<const vec*>(weight_t + index[k] * n_out + j);
    const scalar_t v = value[k];
    for (int a = 0; a < kCount; ++a) acc[a] += v * w[a];
  }
  for (int a = 0; a < kCount; ++a) reinterpret_cast<vec*>(y + j)[a] = acc[a];
}

// gradᵀ[index[k], j + kCount·lanes) += value[k]·grad_row[same outputs], k in [k0, k1).
template <typename scalar_t, int kCount>
inline void scatter_block(const int32_t* index, const scalar_t* value, int64_t k0, int64_t k1,
                          const scalar_t* grad_row, int64_t n_out, int64_t j,
                          scalar_t* grad_weight_t) {
  using vec = typename Vector<scalar_t>::type;
  constexpr int64_t lanes = Vector<scalar_t>::kLanes;
  vec g[kCount];
  for (int a = 0; a < kCount; ++a) g[a] = *reinterpret_cast<const vec*>(grad_row + j + a * lanes);
  for (int64_t k = k0; k < k1; ++k) {
    vec* w = reinterpret_cast<vec*>(grad_weight_t + index[k] * n_out + j);
    const scalar_t v = value[k];
    for (int a = 0; a < kCount; ++a) w[a] += v * g[a];
  }
}

// Calls block<kVectors>(j) on whole blocks of outputs in [j0, j1), then block<1>(j) on the
// whole vectors left, then tail(j) on each output left: the outputs of [j0, j1) in register
// blocks.
template <typename scalar_t, typename Block, typename Tail>
inline void for_each_block(int64_t j0, int64_t j1, const Block& block, const Tail& tail) {
  constexpr int64_t lanes = Vector<scalar_t>::kLanes;
  int64_t j = j0;
  for (; j + kVectors * lanes <= j1; j += kVectors * lanes) {
    block(std::integral_constant<int, kVectors>{}, j);
  }
  for (; j + lanes <= j1; j += lanes) block(std::integral_constant<int, 1>{}, j);
  for (; j < j1; ++j) tail(j);
}

// out (M, O) = x·Wᵀ (+ bias) from x compressed; weight_t (I, O). Threads take rows.
template <typename scalar_t>
void sparse_linear_loop(const at::Tensor& offsets, const at::Tensor& index,
                        const at::Tensor& value, const at::Tensor& weight_t,
                        const scalar_t* bias, at::Tensor& out) {
  const int64_t rows = out.size(0), n_out = out.size(1);
  const int64_t* o_p = offsets.data_ptr<int64_t>();
  const int32_t* i_p = index.data_ptr<int32_t>();
  const scalar_t* v_p = value.data_ptr<scalar_t>();
  const scalar_t* w_p = weight_t.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n_out), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* y = out_p + r * n_out;
      const int64_t k0 = o_p[r], k1 = o_p[r + 1];
      for_each_block<scalar_t>(
          0, n_out,
          [&](auto count, int64_t j) {
            product_block<scalar_t, decltype(count)::value>(i_p, v_p, k0, k1, w_p, n_out, j,
                                                            bias, y);
          },
          [&](int64_t j) {
            scalar_t acc = bias != nullptr ? bias[j] : scalar_t(0);
            for (int64_t k = k0; k < k1; ++k) acc += v_p[k] * w_p[i_p[k] * n_out + j];
            y[j] = acc;
          });
    }
  });
}

// Rows of the weight gradient's partial sums: at least kRowChunk, at most kRowChunks of them,
// a function of the row count only (the same sums whatever the thread count).
constexpr int64_t kRowChunk = 2048, kRowChunks = 64;

// grad_weight_t (I, O) = xᵀ·grad (the weight gradient, transposed) from x compressed; grad
// (M, O). The rows are cut into chunks, each summed in order into a partial gradient of its
// own by blocks of outputs (threads take (chunk, block) pairs), and the partials are added in
// chunk order.
template <typename scalar_t>
void sparse_weight_grad_loop(const at::Tensor& offsets, const at::Tensor& index,
                             const at::Tensor& value, const at::Tensor& grad,
                             at::Tensor& grad_weight_t) {
  const int64_t rows = grad.size(0), n_out = grad.size(1);
  const int64_t* o_p = offsets.data_ptr<int64_t>();
  const int32_t* i_p = index.data_ptr<int32_t>();
  const scalar_t* v_p = value.data_ptr<scalar_t>();
  const scalar_t* g_p = grad.data_ptr<scalar_t>();
  const int64_t chunk = std::max(kRowChunk, (rows + kRowChunks - 1) / kRowChunks);
  const int64_t chunks = std::max<int64_t>(1, (rows + chunk - 1) / chunk);
  at::Tensor partial = chunks == 1 ? grad_weight_t
                                   : at::empty({chunks, grad_weight_t.size(0), n_out},
                                               grad_weight_t.options());
  partial.zero_();
  scalar_t* part_p = partial.data_ptr<scalar_t>();
  const int64_t part_size = grad_weight_t.numel();
  constexpr int64_t block = kVectors * Vector<scalar_t>::kLanes;
  const int64_t blocks = (n_out + block - 1) / block;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t c = task / blocks, b = task % blocks;
      const int64_t j0 = b * block, j1 = std::min(n_out, j0 + block);
      scalar_t* gw_p = part_p + c * part_size;
      for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
        const int64_t k0 = o_p[r], k1 = o_p[r + 1];
        if (k0 == k1) continue;
        const scalar_t* g = g_p + r * n_out;
        for_each_block<scalar_t>(
            j0, j1,
            [&](auto count, int64_t j) {
              scatter_block<scalar_t, decltype(count)::value>(i_p, v_p, k0, k1, g, n_out, j,
                                                              gw_p);
            },
            [&](int64_t j) {
              for (int64_t k = k0; k < k1; ++k) gw_p[i_p[k] * n_out + j] += v_p[k] * g[j];
            });
      }
    }
  });
  if (chunks > 1) {
    scalar_t* out_p = grad_weight_t.data_ptr<scalar_t>();
    at::parallel_for(0, part_size, kGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        scalar_t sum = part_p[e];
        for (int64_t c = 1; c < chunks; ++c) sum += part_p[c * part_size + e];
        out_p[e] = sum;
      }
    });
  }
}

// --------------------------------------------------------------------------- bindings
void check_sequence(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 3,
              "delrec fused kernel: ", name, " must be a contiguous (T, B, N) CPU tensor");
  TORCH_CHECK(x.size(1) < (int64_t(1) << 32) && x.size(0) < (int64_t(1) << 32),
              "delrec fused kernel: ", name, " is too long for 32-bit mask counters");
}

LIFConstants lif_constants(double leak, double v0, double threshold, double v_reset,
                           bool soft_reset, bool detach_reset, int64_t surrogate,
                           double surrogate_param) {
  return LIFConstants{leak,         v0, threshold, v_reset, soft_reset, detach_reset,
                      surrogate, surrogate_param};
}

void dropout(const c10::optional<at::Tensor>& x, at::Tensor out, MaskArgs mask_args) {
  check_sequence(out, "out");
  const at::Tensor input = x.has_value() ? *x : at::Tensor();
  if (input.defined()) {
    check_sequence(input, "x");
    TORCH_CHECK(input.sizes() == out.sizes() && input.scalar_type() == out.scalar_type(),
                "delrec dropout: x and out differ in shape or dtype");
  }
  const Mask mask = mask_of(mask_args);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "delrec_dropout",
                             [&] { dropout_loop<scalar_t>(input, out, mask); });
}

void lif_forward(const at::Tensor& current, double leak, double gain, double offset, double v0,
                 double threshold, double v_reset, bool soft_reset, MaskArgs in_mask,
                 MaskArgs out_mask, at::Tensor spikes, at::Tensor membrane) {
  check_sequence(current, "current");
  check_sequence(spikes, "spikes");
  check_sequence(membrane, "membrane");
  const LIFConstants constants =
      lif_constants(leak, v0, threshold, v_reset, soft_reset, false, 0, 0.0);
  const Mask in = mask_of(in_mask), out = mask_of(out_mask);
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "delrec_lif_forward", [&] {
    lif_forward_loop<scalar_t>(current, constants, gain, offset, in, out, spikes, membrane);
  });
}

void lif_backward(const at::Tensor& grad_out, const at::Tensor& membrane, const at::Tensor& psi,
                  double leak, double gain, double threshold, double v_reset, bool soft_reset,
                  bool detach_reset, int64_t surrogate, double surrogate_param,
                  MaskArgs in_mask, MaskArgs out_mask, at::Tensor grad_current) {
  check_sequence(grad_out, "grad_out");
  check_sequence(membrane, "membrane");
  check_sequence(grad_current, "grad_current");
  TORCH_CHECK(surrogate != 0 || (psi.is_contiguous() && psi.sizes() == membrane.sizes()),
              "delrec fused kernel: ψ' must be a contiguous (T, B, N) tensor");
  const LIFConstants constants = lif_constants(leak, 0.0, threshold, v_reset, soft_reset,
                                               detach_reset, surrogate, surrogate_param);
  const Mask in = mask_of(in_mask), out = mask_of(out_mask);
  AT_DISPATCH_FLOATING_TYPES(membrane.scalar_type(), "delrec_lif_backward", [&] {
    if (surrogate == 1) {
      lif_backward_loop<scalar_t, 1>(grad_out, membrane, psi, constants, gain, in, out,
                                     grad_current);
    } else if (surrogate == 2) {
      lif_backward_loop<scalar_t, 2>(grad_out, membrane, psi, constants, gain, in, out,
                                     grad_current);
    } else {
      lif_backward_loop<scalar_t, 0>(grad_out, membrane, psi, constants, gain, in, out,
                                     grad_current);
    }
  });
}

void integrator_forward(const at::Tensor& current, double leak, double gain,
                        const at::Tensor& initial, at::Tensor out) {
  check_sequence(current, "current");
  check_sequence(out, "out");
  TORCH_CHECK(initial.is_contiguous() && initial.scalar_type() == current.scalar_type() &&
                  initial.numel() == current.size(1) * current.size(2),
              "delrec fused kernels: initial must be a contiguous (B, K) tensor of the "
              "current's dtype");
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "delrec_integrator_forward", [&] {
    integrator_forward_loop<scalar_t>(current, leak, gain, initial, out);
  });
}

void integrator_backward(const at::Tensor& grad_out, double leak, double gain,
                         at::Tensor grad_current) {
  check_sequence(grad_out, "grad_out");
  check_sequence(grad_current, "grad_current");
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "delrec_integrator_backward", [&] {
    integrator_backward_loop<scalar_t>(grad_out, leak, gain, grad_current);
  });
}

void batch_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        double eps, at::Tensor out, at::Tensor mean, at::Tensor var) {
  check_sequence(x, "x");
  TORCH_CHECK(mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble,
              "delrec batch norm: mean and var are float64");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "delrec_batch_norm_forward", [&] {
    batch_norm_forward_loop<scalar_t>(x, weight.contiguous(), bias.contiguous(), eps, out, mean,
                                      var);
  });
}

void batch_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& weight, at::Tensor grad_x,
                         at::Tensor sums) {
  check_sequence(grad, "grad");
  check_sequence(x, "x");
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.numel() == 3 * x.size(2),
              "delrec batch norm: sums must be (3, N) float64");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "delrec_batch_norm_backward", [&] {
    batch_norm_backward_loop<scalar_t>(grad, x, mean, invstd, weight.contiguous(), grad_x, sums);
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2,
              "delrec fused kernel: ", name, " must be a contiguous (M, N) CPU tensor");
}

// x (M, I) compressed by rows: [offsets (M+1) int64, index int32, value], or [] where x has
// more than max_count non-zeros (then the dense product is the faster one).
std::vector<at::Tensor> nonzero_rows(const at::Tensor& x, int64_t max_count) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) < (int64_t(1) << 31), "delrec spike products: too many inputs");
  at::Tensor offsets = at::empty({x.size(0) + 1}, x.options().dtype(at::kLong));
  std::vector<at::Tensor> compressed;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "delrec_nonzero_rows", [&] {
    const int64_t count = count_nonzero_rows<scalar_t>(x, offsets, max_count);
    if (count < 0) return;
    at::Tensor index = at::empty({count}, x.options().dtype(at::kInt));
    at::Tensor value = at::empty({count}, x.options());
    gather_nonzero_rows<scalar_t>(x, offsets, index, value);
    compressed = {offsets, index, value};
  });
  return compressed;
}

void check_compressed(const at::Tensor& offsets, const at::Tensor& index,
                      const at::Tensor& value, int64_t rows, const at::Tensor& like) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == rows + 1 &&
                  index.scalar_type() == at::kInt && value.scalar_type() == like.scalar_type() &&
                  index.numel() == value.numel() && offsets.is_contiguous() &&
                  index.is_contiguous() && value.is_contiguous(),
              "delrec spike products: the compressed rows do not match (nonzero_rows' output)");
}

void sparse_linear(const at::Tensor& offsets, const at::Tensor& index, const at::Tensor& value,
                   const at::Tensor& weight_t, const c10::optional<at::Tensor>& bias,
                   at::Tensor out) {
  check_rows(weight_t, "weight_t");
  check_rows(out, "out");
  check_compressed(offsets, index, value, out.size(0), out);
  TORCH_CHECK(weight_t.size(1) == out.size(1) && weight_t.scalar_type() == out.scalar_type(),
              "delrec spike products: weight_t (I, O) and out (M, O) do not match");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == out.size(1) &&
                    bias->scalar_type() == out.scalar_type(),
                "delrec spike products: bias must be a contiguous (O,) tensor of out's dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "delrec_sparse_linear", [&] {
    const scalar_t* b = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    sparse_linear_loop<scalar_t>(offsets, index, value, weight_t, b, out);
  });
}

void sparse_weight_grad(const at::Tensor& offsets, const at::Tensor& index,
                        const at::Tensor& value, const at::Tensor& grad,
                        at::Tensor grad_weight_t) {
  check_rows(grad, "grad");
  check_rows(grad_weight_t, "grad_weight_t");
  check_compressed(offsets, index, value, grad.size(0), grad);
  TORCH_CHECK(grad_weight_t.size(1) == grad.size(1) &&
                  grad_weight_t.scalar_type() == grad.scalar_type(),
              "delrec spike products: grad_weight_t (I, O) and grad (M, O) do not match");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "delrec_sparse_weight_grad", [&] {
    sparse_weight_grad_loop<scalar_t>(offsets, index, value, grad, grad_weight_t);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: fused feedforward LIF layers, leaky-integrator readout, dropout, BatchNorm";
  m.def("dropout", &dropout, "out = x ⊙ Philox dropout mask (or the mask alone)");
  m.attr("philox") = delrec::kPhiloxVectors;  // the vectors the masks are drawn with
  m.attr("vector_bytes") = kVectorBytes;        // the spike products' vectors
  m.def("lif_forward", &lif_forward, "feedforward LIF layer: spikes and pre-spike membrane");
  m.def("lif_backward", &lif_backward, "feedforward LIF layer: gradient of the input current");
  m.def("integrator_forward", &integrator_forward, "leaky integrator: membrane sequence");
  m.def("integrator_backward", &integrator_backward, "leaky integrator: input gradient");
  m.def("batch_norm_forward", &batch_norm_forward, "BatchNorm over frames: output and stats");
  m.def("batch_norm_backward", &batch_norm_backward, "BatchNorm over frames: input gradient");
  m.def("nonzero_rows", &nonzero_rows, "a matrix compressed by rows (or [] past max_count)");
  m.def("sparse_linear", &sparse_linear, "x·Wᵀ + b from x compressed by rows");
  m.def("sparse_weight_grad", &sparse_weight_grad, "xᵀ·grad from x compressed by rows");
}
