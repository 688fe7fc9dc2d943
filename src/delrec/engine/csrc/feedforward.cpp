// The two-tap feedforward-delay engine (delrec/engine/feedforward.py): shifted sums and dots.
//
// A synapse (r, c) reads its source channel c at two adjacent rows (time steps): the layer's
// output, the input gradient and the per-synapse dots of the weight and position gradients are
//     shifted_sum: out[r, t] += lo_rc · src[c, t + s_rc] + hi_rc · src[c, t + s_rc + 1]
//     pair_dots:   lo_rc = Σ_t grad[r, t] · src[c, t + s_rc],  hi_rc = Σ_t grad[r, t] · src[c, t + s_rc + 1]
//     span_dots:   out_n = Σ_t grad[r_n, t] · src[c_n, t + offset_n]        (a list of synapses)
// where a row is W values (the batch, padded with zeros to whole vectors) and every sum runs
// over the W values of the row too. Sequences are channel-major, (C, S, W) contiguous: one
// channel's rows follow each other, so a synapse's term over a tile of rows is a contiguous
// span. Rows outside [first, last) of the source are zeros (padding); tiles whose rows all lie
// there are skipped, so a synapse costs in proportion to its overlap with the sequence, whatever
// the delay window.
//
// shifted_sum keeps a tile of kRows rows x kVectors vectors of one output row in registers and
// loops over the source channels: per channel it loads kRows + 1 source rows and does two FMAs
// per accumulator (each loaded row feeds the `hi` term of one output row and the `lo` term of the
// next). Channels are processed in blocks whose rows fit in L2, the output tile is reloaded once
// per block.
// pair_dots keeps the two sums of a group of kGroup synapses of one row r in registers and sweeps
// time: per row of grad, one load of grad and one load per synapse feed two FMAs per synapse.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// pair_dots: bytes of grad rows a block of outputs keeps in L2, and of source and grad rows one
// group keeps in L1
constexpr int64_t kBlockBytes = 1 << 20;
constexpr int64_t kDotBytes = 1 << 15;
// shifted_sum's tile: steps (rows) per output tile, channels per block
constexpr int kRows = 8;
constexpr int64_t kChannels = 16;

// An empty asm keeps a loaded vector in a register: GCC would otherwise fold the load into both
// FMAs that read it (two loads per vector instead of one).
template <typename V>
inline V kept(V x) {
  asm("" : "+v"(x));
  return x;
}

template <typename scalar_t>
constexpr int64_t kLanes = 64 / sizeof(scalar_t);

// kLanes scalars as one vector (GCC/Clang vector extension: an AVX-512 register, or two AVX2
// ones); load and store accept any scalar-aligned address.
template <typename scalar_t>
struct VectorTypes {
  typedef scalar_t vec __attribute__((vector_size(64)));
  typedef scalar_t unaligned __attribute__((vector_size(64), aligned(sizeof(scalar_t))));
};
template <typename scalar_t>
using Vec = typename VectorTypes<scalar_t>::vec;

template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* p) {
  return *reinterpret_cast<const typename VectorTypes<scalar_t>::unaligned*>(p);
}
template <typename scalar_t>
inline void store(scalar_t* p, Vec<scalar_t> v) {
  *reinterpret_cast<typename VectorTypes<scalar_t>::unaligned*>(p) = v;
}
template <typename scalar_t>
inline double lane_sum(Vec<scalar_t> v) {
  double s = 0.0;
  for (int64_t q = 0; q < kLanes<scalar_t>; ++q) s += v[q];
  return s;
}

// `acc += a * x` fused into FMAs here (the module is built with -ffp-contract=off)
#if defined(__GNUC__) && !defined(__clang__)
#define DELREC_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define DELREC_CONTRACT
#endif

void check(bool ok, const char* message) { TORCH_CHECK(ok, "delrec feedforward kernels: ", message); }

// A synapse as shifted_sum reads it: source channel, row offset and the two coefficients.
template <typename scalar_t>
struct Tap {
  int32_t channel, shift;
  scalar_t lo, hi;
};

// One output tile: rows [t0, t0 + R) of one output row, vectors [0, VB) from `out`, summed over
// the n taps from `tap`, sorted by shift (so the taps that read only padding come first or
// last: skipped without unpredictable branches).
template <typename scalar_t, int R, int VB>
DELREC_CONTRACT void sum_tile(const scalar_t* src, int64_t channel_stride, int64_t width,
                              const Tap<scalar_t>* tap, int64_t n, int64_t t0, int64_t first,
                              int64_t last, bool accumulate, scalar_t* out) {
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  V acc[R][VB];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VB; ++v) acc[r][v] = accumulate ? load(out + r * width + v * L) : V{};
  for (const Tap<scalar_t>* end = tap + n; tap < end; ++tap) {
    const int64_t row = t0 + tap->shift;
    if (row + R < first) continue;  // reads only padding
    if (row >= last) break;         // this one and the rest
    const V a = V{} + tap->lo, b = V{} + tap->hi;
    const scalar_t* p = src + tap->channel * channel_stride + row * width;
    V x[R + 1][VB];
    for (int r = 0; r <= R; ++r)
      for (int v = 0; v < VB; ++v) x[r][v] = kept(load(p + r * width + v * L));
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < VB; ++v) {
        acc[r][v] += a * x[r][v];
        acc[r][v] += b * x[r + 1][v];
      }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VB; ++v) store(out + r * width + v * L, acc[r][v]);
}

// Loop order: output rows split among threads; per tile of kRows steps, per block of channels
// (their source rows for the tile stay in L1), every output row of the thread. The taps are
// packed per channel block, output row after output row, so that they stream.
template <typename scalar_t, int VB>
void shifted_sum_loop(const at::Tensor& src, const at::Tensor& shift, const at::Tensor& lo,
                      const at::Tensor& hi, int64_t first, int64_t last, bool accumulate,
                      at::Tensor& out) {
  const int64_t channels = src.size(0), rows_in = src.size(1), width = src.size(2);
  const int64_t outputs = out.size(0), steps = out.size(1);
  const int64_t channel_stride = rows_in * width;
  constexpr int64_t L = kLanes<scalar_t>;
  const int32_t* sh = shift.data_ptr<int32_t>();
  const scalar_t* l = lo.data_ptr<scalar_t>();
  const scalar_t* h = hi.data_ptr<scalar_t>();
  std::vector<Tap<scalar_t>> taps(outputs * channels);  // [block][output][channel in block]
  at::parallel_for(0, outputs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c0 = 0; c0 < channels; c0 += kChannels) {
        const int64_t n = std::min(kChannels, channels - c0);
        Tap<scalar_t>* t = taps.data() + c0 * outputs + r * n;
        for (int64_t c = 0; c < n; ++c) {
          const int64_t q = r * channels + c0 + c;
          t[c] = Tap<scalar_t>{int32_t(c0 + c), sh[q], l[q], h[q]};
        }
        std::sort(t, t + n, [](const Tap<scalar_t>& a, const Tap<scalar_t>& b) {
          return a.shift < b.shift;
        });
      }
  });
  const scalar_t* s = src.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, outputs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = 0; t0 < steps; t0 += kRows)
      for (int64_t c0 = 0; c0 < channels; c0 += kChannels) {
        const int64_t n = std::min(kChannels, channels - c0);
        for (int64_t r = begin; r < end; ++r)
          for (int64_t v0 = 0; v0 < width; v0 += VB * L)
            sum_tile<scalar_t, kRows, VB>(s + v0, channel_stride, width,
                                          taps.data() + c0 * outputs + r * n, n, t0, first, last,
                                          accumulate || c0 > 0, o + (r * steps + t0) * width + v0);
      }
  });
}

// The two sums of kGroup synapses (r, c0 + j), vectors [v0, v0 + VB) of the rows, added to
// lo_sum/hi_sum (float64).
template <typename scalar_t, int G, int VB>
DELREC_CONTRACT void dot_tile(const scalar_t* grad, const scalar_t* src, int64_t channel_stride,
                              int64_t width, const int32_t* shift, int64_t t0, int64_t t1,
                              int64_t first, int64_t last, double* lo_sum, double* hi_sum) {
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  // rows t in [t0, t1) of grad with some source row t + s or t + s + 1 inside [first, last)
  int64_t begin = t1, end = t0;
  for (int j = 0; j < G; ++j) {
    begin = std::min(begin, std::max<int64_t>(t0, first - shift[j] - 1));
    end = std::max(end, std::min(t1, last - shift[j]));
  }
  if (begin >= end) return;
  const scalar_t* p[G];
  V acc_lo[G][VB], acc_hi[G][VB], previous[G][VB];
  for (int j = 0; j < G; ++j) {
    p[j] = src + j * channel_stride + (begin + shift[j]) * width;
    for (int v = 0; v < VB; ++v) {
      acc_lo[j][v] = V{};
      acc_hi[j][v] = V{};
      previous[j][v] = load(p[j] + v * L);
    }
  }
  const scalar_t* g = grad + begin * width;
  for (int64_t t = begin; t < end; ++t, g += width) {
    V gv[VB];
    for (int v = 0; v < VB; ++v) gv[v] = load(g + v * L);
    for (int j = 0; j < G; ++j) {
      p[j] += width;
      for (int v = 0; v < VB; ++v) {
        const V x = load(p[j] + v * L);
        acc_lo[j][v] += gv[v] * previous[j][v];
        acc_hi[j][v] += gv[v] * x;
        previous[j][v] = x;
      }
    }
  }
  for (int j = 0; j < G; ++j) {
    V l = acc_lo[j][0], h = acc_hi[j][0];
    for (int v = 1; v < VB; ++v) {
      l += acc_lo[j][v];
      h += acc_hi[j][v];
    }
    lo_sum[j] += lane_sum<scalar_t>(l);
    hi_sum[j] += lane_sum<scalar_t>(h);
  }
}

template <typename scalar_t, int G, int VB>
void pair_dots_loop(const at::Tensor& grad, const at::Tensor& src, const at::Tensor& shift,
                    int64_t steps, int64_t first, int64_t last, at::Tensor& lo_sum,
                    at::Tensor& hi_sum) {
  const int64_t outputs = grad.size(0), grad_rows = grad.size(1), width = grad.size(2);
  const int64_t channels = src.size(0), rows_in = src.size(1);
  const int64_t channel_stride = rows_in * width;
  const int64_t row_bytes = width * int64_t(sizeof(scalar_t));
  // a chunk of steps: the rows of a group's G channels and of one grad row stay in L1; a block
  // of output rows: their grad rows for one chunk stay in L2
  const int64_t chunk = std::max<int64_t>(8, kDotBytes / ((G + 1) * row_bytes));
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (chunk * row_bytes));
  const scalar_t* gr = grad.data_ptr<scalar_t>();
  const scalar_t* s = src.data_ptr<scalar_t>();
  const int32_t* sh = shift.data_ptr<int32_t>();
  double* lo = lo_sum.data_ptr<double>();
  double* hi = hi_sum.data_ptr<double>();
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t blocks = (outputs + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, r1 = std::min(outputs, r0 + block);
      for (int64_t t0 = 0; t0 < steps; t0 += chunk) {
        const int64_t t1 = std::min(steps, t0 + chunk);
        for (int64_t c = 0; c < channels; c += G) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* g = gr + r * grad_rows * width;
            const int64_t k = r * channels + c;
            for (int64_t v0 = 0; v0 < width; v0 += VB * L) {
              const scalar_t* x = s + c * channel_stride + v0;
              if (c + G <= channels)
                dot_tile<scalar_t, G, VB>(g + v0, x, channel_stride, width, sh + k, t0, t1, first,
                                          last, lo + k, hi + k);
              else
                for (int64_t j = 0; c + j < channels; ++j)
                  dot_tile<scalar_t, 1, VB>(g + v0, x + j * channel_stride, channel_stride, width,
                                            sh + k + j, t0, t1, first, last, lo + k + j,
                                            hi + k + j);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
DELREC_CONTRACT double span_dot(const scalar_t* a, const scalar_t* b, int64_t length) {
  using V = Vec<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t q = 0;
  for (; q + 4 * L <= length; q += 4 * L)
    for (int u = 0; u < 4; ++u) acc[u] += load(a + q + u * L) * load(b + q + u * L);
  double sum = 0.0;
  for (int u = 0; u < 4; ++u) sum += lane_sum<scalar_t>(acc[u]);
  for (; q < length; ++q) sum += double(a[q]) * double(b[q]);
  return sum;
}

void check_sequences(const at::Tensor& a, const at::Tensor& b) {
  check(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() &&
            a.scalar_type() == b.scalar_type() && a.size(2) == b.size(2) &&
            a.size(2) * a.element_size() % 64 == 0,
        "sequences must be contiguous (C, S, W) of one dtype, W a whole number of 64-byte "
        "vectors");
}

void shifted_sum(const at::Tensor& src, const at::Tensor& shift, const at::Tensor& lo,
                 const at::Tensor& hi, int64_t first, int64_t last, bool accumulate,
                 at::Tensor out) {
  check_sequences(src, out);
  check(shift.scalar_type() == at::kInt && shift.is_contiguous() && lo.is_contiguous() &&
            hi.is_contiguous() && lo.scalar_type() == src.scalar_type() &&
            hi.scalar_type() == src.scalar_type() && shift.numel() == out.size(0) * src.size(0) &&
            lo.numel() == shift.numel() && hi.numel() == shift.numel(),
        "shift (R, C) int32 and lo, hi (R, C) in the sequences' dtype, contiguous");
  check(out.size(1) % 8 == 0, "output rows must be a multiple of 8");
  auto max_shift = shift.numel() ? shift.max().item<int32_t>() : 0;
  auto min_shift = shift.numel() ? shift.min().item<int32_t>() : 0;
  check(min_shift >= 0 && out.size(1) + max_shift + 1 <= src.size(1),
        "shifts must keep every read inside the source rows");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "delrec_feedforward_shifted_sum", [&] {
    if (src.size(2) / kLanes<scalar_t> % 2 == 0)
      shifted_sum_loop<scalar_t, 2>(src, shift, lo, hi, first, last, accumulate, out);
    else
      shifted_sum_loop<scalar_t, 1>(src, shift, lo, hi, first, last, accumulate, out);
  });
}

void pair_dots(const at::Tensor& grad, const at::Tensor& src, const at::Tensor& shift,
               int64_t steps, int64_t first, int64_t last, at::Tensor lo_sum, at::Tensor hi_sum) {
  check_sequences(grad, src);
  check(shift.scalar_type() == at::kInt && shift.is_contiguous() &&
            shift.numel() == grad.size(0) * src.size(0),
        "shift must be (R, C) int32, contiguous");
  check(lo_sum.scalar_type() == at::kDouble && hi_sum.scalar_type() == at::kDouble &&
            lo_sum.is_contiguous() && hi_sum.is_contiguous() &&
            lo_sum.numel() == shift.numel() && hi_sum.numel() == shift.numel(),
        "the sums must be (R, C) float64, contiguous");
  auto max_shift = shift.numel() ? shift.max().item<int32_t>() : 0;
  auto min_shift = shift.numel() ? shift.min().item<int32_t>() : 0;
  check(min_shift >= 0 && steps <= grad.size(1) && steps + max_shift + 1 <= src.size(1),
        "shifts must keep every read inside the source rows");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "delrec_feedforward_pair_dots", [&] {
    if (src.size(2) / kLanes<scalar_t> % 2 == 0)
      pair_dots_loop<scalar_t, 4, 2>(grad, src, shift, steps, first, last, lo_sum, hi_sum);
    else
      pair_dots_loop<scalar_t, 8, 1>(grad, src, shift, steps, first, last, lo_sum, hi_sum);
  });
}

void span_dots(const at::Tensor& grad, const at::Tensor& src, const at::Tensor& row,
               const at::Tensor& column, const at::Tensor& offset, int64_t steps, int64_t first,
               int64_t last, at::Tensor out) {
  check_sequences(grad, src);
  check(row.scalar_type() == at::kLong && column.scalar_type() == at::kLong &&
            offset.scalar_type() == at::kLong && row.is_contiguous() && column.is_contiguous() &&
            offset.is_contiguous() && out.scalar_type() == at::kDouble && out.is_contiguous() &&
            column.numel() == row.numel() && offset.numel() == row.numel() &&
            out.numel() == row.numel(),
        "row, column, offset (n,) int64 and out (n,) float64, contiguous");
  const int64_t width = grad.size(2), grad_rows = grad.size(1), src_rows = src.size(1);
  const int64_t* rw = row.data_ptr<int64_t>();
  const int64_t* cl = column.data_ptr<int64_t>();
  const int64_t* of = offset.data_ptr<int64_t>();
  double* o = out.data_ptr<double>();
  for (int64_t n = 0; n < row.numel(); ++n)
    check(rw[n] >= 0 && rw[n] < grad.size(0) && cl[n] >= 0 && cl[n] < src.size(0) && of[n] >= 0 &&
              steps <= grad_rows && steps + of[n] <= src_rows,
          "span_dots: an entry reads outside its sequences");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "delrec_feedforward_span_dots", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* s = src.data_ptr<scalar_t>();
    at::parallel_for(0, row.numel(), 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t t0 = std::max<int64_t>(0, first - of[n]);
        const int64_t t1 = std::min(steps, last - of[n]);
        o[n] = t0 < t1 ? span_dot<scalar_t>(g + (rw[n] * grad_rows + t0) * width,
                                             s + (cl[n] * src_rows + t0 + of[n]) * width,
                                             (t1 - t0) * width)
                       : 0.0;
      }
    });
  });
}

// The reference's interpolation at the delays base - 1 … base + 2 of a synapse at position p
// (base = ⌊p⌋ clamped into the window [0, K-1]): λ = max(0, 1 - |d - p|) and its slope in p,
// σ = sign(d - p) where 1 - |d - p| ≥ 0 (|·|' = 0 at 0, the clamp passes at its bound), both
// zero outside the window. Computed in scalar_t exactly as PyTorch rounds the reference's
// expression (this file is built with -ffp-contract=off); engine/feedforward.py, _Taps, is the
// same in PyTorch ops.
template <typename scalar_t>
struct Around {
  int64_t base;
  scalar_t lam[4], slope[4];
};

template <typename scalar_t>
Around<scalar_t> around(scalar_t p, int64_t kernel_size) {
  Around<scalar_t> a;
  const scalar_t top = scalar_t(kernel_size - 1);
  a.base = int64_t(std::min(std::max(std::floor(p), scalar_t(0)), top));
  for (int q = 0; q < 4; ++q) {
    const scalar_t d = scalar_t(a.base - 1 + q);
    const scalar_t value = scalar_t(1) - std::abs(d - p);
    const bool inside = d >= 0 && d <= top;
    a.lam[q] = inside && value > 0 ? value : scalar_t(0);
    a.slope[q] = inside && value >= 0 ? scalar_t((d > p) - (d < p)) : scalar_t(0);
  }
  return a;
}

template <typename scalar_t, typename F>
void each_synapse(const at::Tensor& weight, const at::Tensor& position, int64_t kernel_size,
                  F f) {
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* p = position.data_ptr<scalar_t>();
  at::parallel_for(0, weight.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) f(n, w[n], around<scalar_t>(p[n], kernel_size));
  });
}

void check_parameters(const at::Tensor& weight, const at::Tensor& position) {
  check(weight.dim() == 2 && weight.is_contiguous() && position.is_contiguous() &&
            position.sizes() == weight.sizes() && position.scalar_type() == weight.scalar_type(),
        "weight and position must be contiguous (O, I) of one dtype");
}

// base (int32) and the coefficients near = w·λ(base), far = w·λ(base + 1), (O, I) each
std::vector<at::Tensor> taps(const at::Tensor& weight, const at::Tensor& position,
                             int64_t kernel_size) {
  check_parameters(weight, position);
  at::Tensor base = at::empty(weight.sizes(), weight.options().dtype(at::kInt));
  at::Tensor near = at::empty_like(weight), far = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "delrec_feedforward_taps", [&] {
    int32_t* b = base.data_ptr<int32_t>();
    scalar_t* n0 = near.data_ptr<scalar_t>();
    scalar_t* n1 = far.data_ptr<scalar_t>();
    each_synapse<scalar_t>(weight, position, kernel_size,
                           [&](int64_t n, scalar_t w, const Around<scalar_t>& a) {
                             b[n] = int32_t(a.base);
                             n0[n] = w * a.lam[1];
                             n1[n] = w * a.lam[2];
                           });
  });
  return {base, near, far};
}

// The synapses whose position gradient needs C(base - 1) or C(base + 2) (a non-zero slope
// there: a position on an integer, or |base + 2 - p| rounding to 1): flat index and delay.
std::vector<at::Tensor> extra_taps(const at::Tensor& weight, const at::Tensor& position,
                                   int64_t kernel_size) {
  check_parameters(weight, position);
  std::vector<int64_t> index, delay;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "delrec_feedforward_extra_taps", [&] {
    const scalar_t* p = position.data_ptr<scalar_t>();
    for (int64_t n = 0; n < position.numel(); ++n) {
      const Around<scalar_t> a = around<scalar_t>(p[n], kernel_size);
      for (int q : {0, 3})
        if (a.slope[q] != 0) {
          index.push_back(n);
          delay.push_back(a.base - 1 + q);
        }
    }
  });
  const auto options = at::TensorOptions().dtype(at::kLong);
  return {at::tensor(index, options), at::tensor(delay, options)};
}

// ∂L/∂w = Σ_q λ_q C(base - 1 + q) and ∂L/∂p = w Σ_q σ_q C(base - 1 + q) (float64), from the
// dots c (4, O, I) float64 (c[0] and c[3] zero but where extra_taps asked for them).
std::vector<at::Tensor> tap_gradients(const at::Tensor& weight, const at::Tensor& position,
                                      int64_t kernel_size, const at::Tensor& c) {
  check_parameters(weight, position);
  check(c.scalar_type() == at::kDouble && c.is_contiguous() && c.numel() == 4 * weight.numel(),
        "the dots must be (4, O, I) float64, contiguous");
  at::Tensor grad_w = at::empty(weight.sizes(), c.options());
  at::Tensor grad_p = at::empty(weight.sizes(), c.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "delrec_feedforward_tap_gradients", [&] {
    const double* cc = c.data_ptr<double>();
    double* gw = grad_w.data_ptr<double>();
    double* gp = grad_p.data_ptr<double>();
    const int64_t count = weight.numel();
    each_synapse<scalar_t>(weight, position, kernel_size,
                           [&](int64_t n, scalar_t w, const Around<scalar_t>& a) {
                             double sw = 0.0, sp = 0.0;
                             for (int q = 0; q < 4; ++q) {
                               sw += double(a.lam[q]) * cc[q * count + n];
                               sp += double(a.slope[q]) * cc[q * count + n];
                             }
                             gw[n] = sw;
                             gp[n] = double(w) * sp;
                           });
  });
  return {grad_w, grad_p};
}

// (T, B, C) time-major <-> (C, rows, W) channel-major, sequence at rows [lead, lead + T),
// columns [0, B), zeros elsewhere: transposed in blocks of channels so that reads and writes
// both stay within a few cache lines.
constexpr int64_t kTransposeChannels = 32;

at::Tensor channel_major(const at::Tensor& seq, int64_t lead, int64_t rows, int64_t width) {
  check(seq.dim() == 3 && lead >= 0 && lead + seq.size(0) <= rows && seq.size(1) <= width,
        "channel_major: the sequence must fit its rows and width");
  const at::Tensor in = seq.contiguous();
  const int64_t steps = in.size(0), batch = in.size(1), channels = in.size(2);
  at::Tensor out = at::empty({channels, rows, width}, in.options());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "delrec_feedforward_channel_major", [&] {
    const scalar_t* x = in.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t blocks = (channels + kTransposeChannels - 1) / kTransposeChannels;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t c0 = k * kTransposeChannels;
        const int64_t c1 = std::min(channels, c0 + kTransposeChannels);
        for (int64_t c = c0; c < c1; ++c) {  // zeros around the sequence
          scalar_t* channel = o + c * rows * width;
          std::fill(channel, channel + lead * width, scalar_t(0));
          std::fill(channel + (lead + steps) * width, channel + rows * width, scalar_t(0));
          if (batch < width)
            for (int64_t t = lead; t < lead + steps; ++t)
              std::fill(channel + t * width + batch, channel + (t + 1) * width, scalar_t(0));
        }
        for (int64_t t = 0; t < steps; ++t)
          for (int64_t b = 0; b < batch; ++b) {
            const scalar_t* from = x + (t * batch + b) * channels;
            scalar_t* to = o + (lead + t) * width + b;
            for (int64_t c = c0; c < c1; ++c) to[c * rows * width] = from[c];
          }
      }
    });
  });
  return out;
}

at::Tensor time_major(const at::Tensor& buffer, int64_t steps, int64_t batch) {
  check(buffer.dim() == 3 && buffer.is_contiguous() && steps <= buffer.size(1) &&
            batch <= buffer.size(2),
        "time_major: a contiguous (C, rows, W) buffer holding the steps and the batch");
  const int64_t channels = buffer.size(0), rows = buffer.size(1), width = buffer.size(2);
  at::Tensor out = at::empty({steps, batch, channels}, buffer.options());
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "delrec_feedforward_time_major", [&] {
    const scalar_t* x = buffer.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t blocks = (channels + kTransposeChannels - 1) / kTransposeChannels;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t c0 = k * kTransposeChannels;
        const int64_t c1 = std::min(channels, c0 + kTransposeChannels);
        for (int64_t t = 0; t < steps; ++t)
          for (int64_t b = 0; b < batch; ++b) {
            const scalar_t* from = x + t * width + b;
            scalar_t* to = o + (t * batch + b) * channels;
            for (int64_t c = c0; c < c1; ++c) to[c] = from[c * rows * width];
          }
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: the two-tap feedforward-delay engine (shifted sums and dots)";
  m.def("shifted_sum", &shifted_sum,
        "out[r, t] (+)= Σ_c lo[r, c] src[c, t + s[r, c]] + hi[r, c] src[c, t + s[r, c] + 1] "
        "(added to out if accumulate, else written)");
  m.def("pair_dots", &pair_dots,
        "lo[r, c] += Σ_t grad[r, t] src[c, t + s[r, c]], hi[r, c] += Σ_t grad[r, t] src[c, t + s + 1]");
  m.def("taps", &taps, "base delay (int32), near = w·λ(base), far = w·λ(base + 1) per synapse");
  m.def("extra_taps", &extra_taps, "synapses needing C(base - 1) or C(base + 2): index, delay");
  m.def("tap_gradients", &tap_gradients, "∂L/∂w and ∂L/∂p (float64) from the dots (4, O, I)");
  m.def("channel_major", &channel_major,
        "(T, B, C) -> zeros (C, rows, W) holding the sequence at rows [lead, lead + T)");
  m.def("time_major", &time_major, "(C, rows, W) -> (T, B, C): rows [0, T), columns [0, B)");
  m.def("span_dots", &span_dots, "out[n] = Σ_t grad[row_n, t] src[column_n, t + offset_n]");
}
