// The two-tap feedforward-delay engine (delrec/engine/feedforward.py): shifted sums and dots.
//
// Sequences are channel-major, (C, rows, W) contiguous: row `lead + t` of a channel holds step t
// (W values: the batch padded with zeros to whole vectors), with zero rows around the steps
// (at least kRows before step 0, and after the last step up to the end). A synapse (r, c) with
// base delay `base` reads its source channel c at two adjacent rows:
//     shifted_sum: out[r, t] = Σ_c a_rc · src[c, f + t] + b_rc · src[c, f + t + 1],
//                  f = direction · base_rc + offset
//                  (layer output: direction -1, offset -1, a = far, b = near;
//                   input gradient: direction +1, offset 0, a = near, b = far, synapses transposed)
//     pair_dots:   c0[r, c] = Σ_t grad[r, t] · src[c, t - base_rc],
//                  c1[r, c] = Σ_t grad[r, t] · src[c, t - base_rc - 1]
// where every sum runs over the W values of a row too; parameter_gradients turns c0, c1 (and,
// for the few synapses on a kink, one more dot each) into the weight and position gradients.
//
// shifted_sum keeps a tile of kRows steps x the row's vectors of one output row in registers and
// streams the synapses of a block of kBlock (kWideBlock) source channels: per synapse it loads
// kRows + 1 source rows, each feeding two FMAs (the `b` term of one output step and the `a` term
// of the next). The synapses of a block that read only zero rows at this tile are skipped
// through a bit mask (no sorting, no unpredictable branch per synapse), so a synapse costs in
// proportion to its overlap with the sequence, whatever the delay window. Loop order: tiles of
// steps, blocks of channels (their rows for the tile stay in L1), output rows (their tiles stay
// in L2); the synapses are packed block after block so that they stream. A tile of 10 steps
// (2 x 10 accumulators with AVX-512) measured faster than 8 or 12 at N = 1024 (fewer costs per
// synapse for its FMAs; T = 100 in whole tiles).
// pair_dots keeps the two sums of kGroup synapses of one output row in registers and sweeps
// steps: per step one load of the next grad row, and one source row per synapse feeding two
// FMAs (with the grad rows of this step and the next). The synapses of a group start at
// different steps (t >= base): the sweep runs in phases, adding one synapse at a time in the
// order of their start.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// shifted_sum: steps per output tile; source channels per block (one bit each in a mask), more
// where the base delays spread over more than two tiles (the block's rows for a tile then
// outgrow L1 anyway; a larger block halves the trips of the output tiles through L2)
constexpr int kRows = 10;
constexpr int kBlock = 16;
constexpr int kWideBlock = 32;
// pair_dots: synapses per group; bytes of the rows a chunk of steps reads that should stay in L1
// (the group's source rows, the grad rows of an output row and of the next one), and of a block
// of outputs' grad rows for a chunk kept in L2
constexpr int kGroup = 4;
constexpr int64_t kChunkBytes = 44 << 10;
constexpr int64_t kBlockBytes = 1 << 20;

// `acc += a * b` fused into FMAs in the portable vectors (the module is built with
// -ffp-contract=off)
#if defined(__GNUC__) && !defined(__clang__)
#define DELREC_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define DELREC_CONTRACT
#endif

// One vector of scalars: AVX-512 intrinsics where the CPU has them (GCC's generic vectors
// broadcast through the stack there), elsewhere GCC/Clang generic vectors of the CPU's own width
// (wider ones are split into registers that spill: ×5 to ×40 slower on AVX2). Rows of W values
// are whole 64-byte blocks, so whole vectors of any of these widths.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;  // SSE, NEON
#endif
// Vectors of a row held per tile in registers: two where there are 32 vector registers
// (AVX-512, AArch64), one where there are 16 (the tile of kRows steps takes kRows per vector).
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kRowVectors = 2;
#else
constexpr int kRowVectors = 1;
#endif

template <typename scalar_t>
struct Simd {
  typedef scalar_t V __attribute__((vector_size(kVectorBytes)));
  typedef scalar_t Unaligned __attribute__((vector_size(kVectorBytes), aligned(sizeof(scalar_t))));
  static constexpr int lanes = kVectorBytes / sizeof(scalar_t);
  static V zero() { return V{}; }
  static V splat(scalar_t s) { return s - V{}; }  // s - 0 keeps the sign of -0
  static V load(const scalar_t* p) { return *reinterpret_cast<const Unaligned*>(p); }
  static void store(scalar_t* p, V v) { *reinterpret_cast<Unaligned*>(p) = v; }
  DELREC_CONTRACT static V fmadd(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static double sum(V v) {
    double s = 0.0;
    for (int q = 0; q < lanes; ++q) s += v[q];
    return s;
  }
};

#if defined(__AVX512F__)
template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int lanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V splat(float s) { return _mm512_set1_ps(s); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static double sum(V v) {  // in float64
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm512_reduce_add_pd(
        _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), _mm512_cvtps_pd(high)));
  }
};

template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int lanes = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V splat(double s) { return _mm512_set1_pd(s); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static double sum(V v) { return _mm512_reduce_add_pd(v); }
};
#endif

// Fetch the cache line of p into L1 (a hint; nothing where the compiler has no builtin)
inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

// Keep v in a register: stops the compiler from folding a load that feeds two FMAs into both
// (two loads where one will do)
template <typename V>
inline void in_register(V& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#endif
}

void check(bool ok, const char* message) { TORCH_CHECK(ok, "delrec feedforward kernels: ", message); }

// --------------------------------------------------------------------------- shifted_sum
// The synapses of one pass, packed [block][output row][size]: block k holds source channels
// [k·size, (k+1)·size) (the last one padded with zeros).
template <typename scalar_t>
struct PackedTaps {
  int64_t size;  // channels per block
  std::vector<int32_t> base;
  std::vector<scalar_t> a, b;
};

// From (O, I) matrices: output rows r = o, channels c = i; transposed: r = i, c = o.
template <typename scalar_t>
PackedTaps<scalar_t> pack(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b,
                          bool transposed, int64_t size) {
  const int64_t outputs = base.size(transposed ? 1 : 0), channels = base.size(transposed ? 0 : 1);
  const int64_t blocks = (channels + size - 1) / size, stride = base.size(1);
  PackedTaps<scalar_t> packed;
  packed.size = size;
  packed.base.assign(blocks * outputs * size, 0);
  packed.a.assign(blocks * outputs * size, scalar_t(0));
  packed.b.assign(blocks * outputs * size, scalar_t(0));
  const int32_t* bs = base.data_ptr<int32_t>();
  const scalar_t* as = a.data_ptr<scalar_t>();
  const scalar_t* bb = b.data_ptr<scalar_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = std::min<int64_t>(size, channels - k * size);
      auto copy = [&](int64_t r, int64_t j) {  // reads along the matrices' rows
        const int64_t c = k * size + j;
        const int64_t from = transposed ? c * stride + r : r * stride + c;
        const int64_t to = (k * outputs + r) * size + j;
        packed.base[to] = bs[from];
        packed.a[to] = as[from];
        packed.b[to] = bb[from];
      };
      if (transposed)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < outputs; ++r) copy(r, j);
      else
        for (int64_t r = 0; r < outputs; ++r)
          for (int64_t j = 0; j < n; ++j) copy(r, j);
    }
  });
  return packed;
}

// Bit j: synapse j of the block (n <= 32 of them) reads a row of steps [0, steps) among
// f_j … f_j + kRows, with f_j = start + direction · base_j (start = tile's first step + offset).
inline uint32_t active_taps(const int32_t* base, int64_t n, int32_t direction, int64_t start,
                            int64_t steps) {
#if defined(__AVX512F__)
  static_assert(kBlock <= 32 && kWideBlock <= 32, "32 bits a block");
  uint32_t mask = 0;
  for (int64_t h = 0; h < n; h += 16) {  // 16 lanes at a time
    const __mmask16 valid = __mmask16((1u << std::min<int64_t>(16, n - h)) - 1);
    const __m512i bases = _mm512_maskz_loadu_epi32(valid, base + h);
    const __m512i origin = _mm512_set1_epi32(int32_t(start));
    const __m512i first = direction > 0 ? _mm512_add_epi32(origin, bases)
                                        : _mm512_sub_epi32(origin, bases);
    const __mmask16 active =
        _mm512_mask_cmpge_epi32_mask(valid, first, _mm512_set1_epi32(-kRows)) &
        _mm512_cmplt_epi32_mask(first, _mm512_set1_epi32(int32_t(steps)));
    mask |= uint32_t(active) << h;
  }
  return mask;
#else
  uint32_t mask = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t first = start + direction * int64_t(base[j]);
    mask |= uint32_t(first >= -kRows && first < steps) << j;
  }
  return mask;
#endif
}

// One output tile: steps [t0, t0 + kRows) of one output row, vectors [0, VB) from `out`, summed
// over the synapses of a block set in `mask` (src: the block's first channel at step 0).
template <typename scalar_t, int VB, bool kAccumulate>
DELREC_CONTRACT void sum_tile(const scalar_t* src, int64_t channel_stride, int64_t width,
                              const int32_t* base, const scalar_t* a, const scalar_t* b,
                              uint32_t mask, int32_t direction, int64_t start, scalar_t* out) {
  using S = Simd<scalar_t>;
  using V = typename S::V;
  constexpr int L = S::lanes;
  V acc[kRows][VB];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < VB; ++v) acc[r][v] = kAccumulate ? S::load(out + r * width + v * L) : S::zero();
  while (mask) {
    const int j = __builtin_ctz(mask);
    mask &= mask - 1;
    const V va = S::splat(a[j]), vb = S::splat(b[j]);
    const scalar_t* p = src + j * channel_stride + (start + direction * int64_t(base[j])) * width;
    V previous[VB];
    for (int v = 0; v < VB; ++v) previous[v] = S::load(p + v * L);
    for (int r = 0; r < kRows; ++r) {
      p += width;
      for (int v = 0; v < VB; ++v) {
        const V x = S::load(p + v * L);
        acc[r][v] = S::fmadd(va, previous[v], acc[r][v]);
        acc[r][v] = S::fmadd(vb, x, acc[r][v]);
        previous[v] = x;
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < VB; ++v) S::store(out + r * width + v * L, acc[r][v]);
}

// Tiles of steps one after the other, each summed over the blocks of channels into a buffer of
// one tile per output row (in L2), then copied into the time-major output (T, B, R): no
// full-size intermediate, and the copy reads a tile that is still in cache.
template <typename scalar_t, int VB>
void shifted_sum_loop(const at::Tensor& src, const PackedTaps<scalar_t>& taps, int32_t direction,
                      int64_t offset, int64_t lead, int64_t steps, at::Tensor& out) {
  const int64_t channels = src.size(0), width = src.size(2), channel_stride = src.size(1) * width;
  const int64_t batch = out.size(1), outputs = out.size(2);
  const int64_t size = taps.size, tiles = (steps + kRows - 1) / kRows;
  const int64_t blocks = (channels + size - 1) / size;
  constexpr int64_t L = Simd<scalar_t>::lanes;
  const scalar_t* s = src.data_ptr<scalar_t>() + lead * width;
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, outputs, 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned (PyTorch's allocator), so that its vectors never straddle cache lines
    const at::Tensor storage = at::empty({(end - begin) * kRows * width}, src.options());
    scalar_t* buffer = storage.data_ptr<scalar_t>();
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t t0 = tile * kRows;
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t n = std::min<int64_t>(size, channels - k * size);
        const scalar_t* block = s + k * size * channel_stride;
        for (int64_t r = begin; r < end; ++r) {
          const int64_t q = (k * outputs + r) * size;
          const uint32_t mask =
              active_taps(taps.base.data() + q, n, direction, t0 + offset, steps);
          for (int64_t v0 = 0; v0 < width; v0 += VB * L) {
            scalar_t* into = buffer + (r - begin) * kRows * width + v0;
            if (k == 0)
              sum_tile<scalar_t, VB, false>(block + v0, channel_stride, width,
                                            taps.base.data() + q, taps.a.data() + q,
                                            taps.b.data() + q, mask, direction, t0 + offset, into);
            else
              sum_tile<scalar_t, VB, true>(block + v0, channel_stride, width,
                                           taps.base.data() + q, taps.a.data() + q,
                                           taps.b.data() + q, mask, direction, t0 + offset, into);
          }
        }
      }
      for (int64_t t = t0; t < std::min(steps, t0 + kRows); ++t)
        for (int64_t b = 0; b < batch; ++b) {
          const scalar_t* from = buffer + (t - t0) * width + b;
          scalar_t* to = o + (t * batch + b) * outputs;
          for (int64_t r = begin; r < end; ++r) to[r] = from[(r - begin) * kRows * width];
        }
    }
  });
}

// --------------------------------------------------------------------------- pair_dots
// Steps s in [t, t + count) of the first NA synapses of a group, added to their sums: each loaded
// source row x[s - base] feeds C(base) with grad row s and C(base + 1) with grad row s + 1 (the
// term of grad row s + 1 that C(base + 1) needs, so the steps' grad rows s and s + 1 stay in
// registers and each source row is loaded once). p[j] points at row t - base_j - 1 of synapse
// j's source channel (advanced past the steps), g at grad row t, `ahead` at the grad row t of the
// next output row, fetched into L1 step by step (a stream the hardware prefetcher would start
// too late: it changes with every call).
template <typename scalar_t, int NA, int VB>
DELREC_CONTRACT inline __attribute__((always_inline)) void dot_steps(
    const scalar_t* g, const scalar_t* ahead, const scalar_t** p, int64_t width, int64_t count,
    typename Simd<scalar_t>::V (&lo)[kGroup][VB], typename Simd<scalar_t>::V (&hi)[kGroup][VB]) {
  using S = Simd<scalar_t>;
  using V = typename S::V;
  constexpr int L = S::lanes;
  V now[VB];
  for (int v = 0; v < VB; ++v) now[v] = S::load(g + v * L);
  for (int64_t step = 0; step < count; ++step, g += width, ahead += width) {
    for (int v = 0; v < VB; ++v) prefetch(ahead + v * L);
    V next[VB];
    for (int v = 0; v < VB; ++v) next[v] = S::load(g + width + v * L);
    for (int j = 0; j < NA; ++j) {
      p[j] += width;
      for (int v = 0; v < VB; ++v) {
        V x = S::load(p[j] + v * L);  // x[s - base]
        in_register(x);
        lo[j][v] = S::fmadd(now[v], x, lo[j][v]);   // C(base):     grad row s
        hi[j][v] = S::fmadd(next[v], x, hi[j][v]);  // C(base + 1): grad row s + 1
      }
    }
    for (int v = 0; v < VB; ++v) now[v] = next[v];
  }
}

// The two sums of n <= kGroup synapses (r, c + j) over the source rows s - base_j of steps s in
// [t0, t1) (C(base + 1) takes grad row s + 1 there: over all chunks, the steps base + 1 … T, the
// last one a zero row), vectors [0, VB) of the rows (g: grad row 0 of r, x: channel c at step
// 0), written to c0/c1 or added to them. Synapse j contributes from step max(t0, base_j) (before
// it, its source rows are zeros): the steps run in phases, one more synapse each.
template <typename scalar_t, int VB>
DELREC_CONTRACT void dot_group(const scalar_t* g, const scalar_t* ahead, const scalar_t* x,
                               int64_t channel_stride, int64_t width, const int32_t* base,
                               int64_t n, int64_t t0, int64_t t1, bool add, double* c0,
                               double* c1) {
  using S = Simd<scalar_t>;
  using V = typename S::V;
  V lo[kGroup][VB], hi[kGroup][VB];
  for (int q = 0; q < kGroup; ++q)
    for (int v = 0; v < VB; ++v) lo[q][v] = hi[q][v] = S::zero();
  const scalar_t* p[kGroup];
  int index[kGroup] = {0, 1, 2, 3};
  static_assert(kGroup == 4, "four synapses a group");
  if (n == kGroup && std::max(std::max(base[0], base[1]), std::max(base[2], base[3])) <= t0) {
    for (int j = 0; j < kGroup; ++j)  // all started: one phase
      p[j] = x + j * channel_stride + (t0 - base[j] - 1) * width;
    dot_steps<scalar_t, 4, VB>(g + t0 * width, ahead + t0 * width, p, width, t1 - t0, lo, hi);
  } else {
    // the synapses in the order of their first step (a sorting network on (start, index)),
    // those missing from a short group last
    int64_t key[kGroup];
    for (int j = 0; j < kGroup; ++j)
      key[j] = (j < n ? std::min<int64_t>(std::max<int64_t>(t0, base[j]), t1) : t1 + 1) << 3 | j;
    auto order = [&](int i, int j) {
      const int64_t low = std::min(key[i], key[j]), high = std::max(key[i], key[j]);
      key[i] = low;
      key[j] = high;
    };
    order(0, 1);
    order(2, 3);
    order(0, 2);
    order(1, 3);
    order(1, 2);
    int64_t start[kGroup + 1];
    for (int q = 0; q < kGroup; ++q) {
      index[q] = int(key[q] & 7);
      start[q] = std::min(t1, key[q] >> 3);
      p[q] = index[q] < n && start[q] < t1
                 ? x + index[q] * channel_stride + (start[q] - base[index[q]] - 1) * width
                 : x;
    }
    start[kGroup] = t1;
    for (int q = 0; q < n; ++q) {
      const int64_t count = start[q + 1] - start[q];
      if (count <= 0) continue;
      const scalar_t *gq = g + start[q] * width, *aq = ahead + start[q] * width;
      switch (q) {
        case 0: dot_steps<scalar_t, 1, VB>(gq, aq, p, width, count, lo, hi); break;
        case 1: dot_steps<scalar_t, 2, VB>(gq, aq, p, width, count, lo, hi); break;
        case 2: dot_steps<scalar_t, 3, VB>(gq, aq, p, width, count, lo, hi); break;
        default: dot_steps<scalar_t, 4, VB>(gq, aq, p, width, count, lo, hi); break;
      }
    }
  }
  for (int q = 0; q < n; ++q) {
    V l = lo[q][0], h = hi[q][0];
    for (int v = 1; v < VB; ++v) {
      l = S::add(l, lo[q][v]);
      h = S::add(h, hi[q][v]);
    }
    const int j = index[q];
    c0[j] = (add ? c0[j] : 0.0) + S::sum(l);
    c1[j] = (add ? c1[j] : 0.0) + S::sum(h);
  }
}

template <typename scalar_t, int VB>
void pair_dots_loop(const at::Tensor& grad, const at::Tensor& src, const at::Tensor& base,
                    int64_t spread, int64_t lead, int64_t steps, at::Tensor& c0,
                    at::Tensor& c1) {
  const int64_t outputs = grad.size(0), width = grad.size(2), channels = src.size(0);
  const int64_t grad_stride = grad.size(1) * width, channel_stride = src.size(1) * width;
  const int64_t row_bytes = width * int64_t(sizeof(scalar_t));
  // chunks of steps of (about) equal length whose rows stay in L1: per channel of a group, the
  // chunk's steps shifted by every base delay of the block (chunk + spread rows), and two grad
  // rows per step; one chunk where no length fits (a wide spread: L2 either way, and each chunk
  // costs a reduction per synapse). Blocks of outputs whose grad rows for a chunk stay in L2.
  const int64_t room = kChunkBytes / row_bytes - kGroup * spread;
  const int64_t longest =
      std::max<int64_t>(1, room >= 16 * (kGroup + 2) ? room / (kGroup + 2) : steps);
  const int64_t chunks = std::max<int64_t>(1, (steps + longest - 1) / longest);
  const int64_t chunk = (steps + chunks - 1) / chunks;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (chunk * row_bytes));
  constexpr int64_t L = Simd<scalar_t>::lanes;
  const scalar_t* gr = grad.data_ptr<scalar_t>() + lead * width;
  const scalar_t* s = src.data_ptr<scalar_t>() + lead * width;
  const int32_t* bs = base.data_ptr<int32_t>();
  double* d0 = c0.data_ptr<double>();
  double* d1 = c1.data_ptr<double>();
  const int64_t blocks = (outputs + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, r1 = std::min(outputs, r0 + block);
      for (int64_t t0 = 0; t0 < std::max<int64_t>(steps, 1); t0 += chunk) {
        const int64_t t1 = std::min(steps, t0 + chunk);
        for (int64_t c = 0; c < channels; c += kGroup)
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t q = r * channels + c;
            for (int64_t v0 = 0; v0 < width; v0 += VB * L)
              dot_group<scalar_t, VB>(gr + r * grad_stride + v0,
                                      gr + std::min(r + 1, r1 - 1) * grad_stride + v0,
                                      s + c * channel_stride + v0, channel_stride, width, bs + q,
                                      std::min<int64_t>(kGroup, channels - c), t0, t1,
                                      t0 > 0 || v0 > 0, d0 + q, d1 + q);
          }
      }
    }
  });
}

template <typename scalar_t>
DELREC_CONTRACT double span_dot(const scalar_t* a, const scalar_t* b, int64_t length) {
  using S = Simd<scalar_t>;
  using V = typename S::V;
  constexpr int64_t L = S::lanes;
  V acc[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
  int64_t q = 0;
  for (; q + 4 * L <= length; q += 4 * L)
    for (int u = 0; u < 4; ++u) acc[u] = S::fmadd(S::load(a + q + u * L), S::load(b + q + u * L), acc[u]);
  double sum = 0.0;
  for (int u = 0; u < 4; ++u) sum += S::sum(acc[u]);
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

void check_taps(const at::Tensor& base, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& src) {
  check(base.dim() == 2 && base.scalar_type() == at::kInt && base.is_contiguous() &&
            a.is_contiguous() && b.is_contiguous() && a.sizes() == base.sizes() &&
            b.sizes() == base.sizes() && a.scalar_type() == src.scalar_type() &&
            b.scalar_type() == src.scalar_type(),
        "base (O, I) int32 and the coefficients (O, I) in the sequences' dtype, contiguous");
}

// The rows a pass may read around steps [0, steps): `before` zero rows before step 0, and rows
// up to `after` steps past the start (zeros from `steps` on).
void check_rows(const at::Tensor& seq, int64_t lead, int64_t before, int64_t after) {
  check(lead >= before && lead + after <= seq.size(1),
        "the sequences need zero rows around the steps (lead >= the tile rows, rows after)");
}

// The spread of the base delays that reach the steps (largest, at most `steps`, - smallest)
int64_t check_bases(const at::Tensor& base, int64_t steps) {
  const int32_t low = base.numel() ? base.min().item<int32_t>() : 0;
  const int32_t high = base.numel() ? base.max().item<int32_t>() : 0;
  check(low >= 0 && int64_t(high) + steps + 2 * kRows < (int64_t(1) << 31),
        "base delays must lie in [0, 2^31 - steps - 2·kRows)");
  return std::max<int64_t>(0, std::min<int64_t>(high, steps) - low);
}

at::Tensor shifted_sum(const at::Tensor& src, const at::Tensor& base, const at::Tensor& a,
                       const at::Tensor& b, bool transposed, int64_t direction, int64_t offset,
                       int64_t lead, int64_t steps, int64_t batch) {
  check(src.dim() == 3 && src.is_contiguous() && src.size(2) * src.element_size() % 64 == 0,
        "src (C, rows, W) contiguous, W a whole number of 64-byte vectors");
  check_taps(base, a, b, src);
  check(direction == 1 || direction == -1, "direction must be +1 or -1");
  check(src.size(0) == base.size(transposed ? 0 : 1),
        "the synapses must connect the source channels to the output rows");
  check(batch >= 0 && batch <= src.size(2), "the rows must hold the batch");
  check(offset <= 0 && offset >= -1, "offset must be 0 or -1");
  const int64_t spread = check_bases(base, steps);
  check_rows(src, lead, kRows, steps + kRows);  // whole tiles of kRows steps end before it
  const int64_t outputs = base.size(transposed ? 1 : 0);
  at::Tensor out = at::empty({steps, batch, outputs}, src.options());
  if (src.size(0) == 0) return out.zero_();  // no synapses
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "delrec_feedforward_shifted_sum", [&] {
    const PackedTaps<scalar_t> taps =
        pack<scalar_t>(base, a, b, transposed, spread > 2 * kRows ? kWideBlock : kBlock);
    if (kRowVectors == 2 && src.size(2) / Simd<scalar_t>::lanes % 2 == 0)
      shifted_sum_loop<scalar_t, 2>(src, taps, int32_t(direction), offset, lead, steps, out);
    else
      shifted_sum_loop<scalar_t, 1>(src, taps, int32_t(direction), offset, lead, steps, out);
  });
  return out;
}

std::vector<at::Tensor> pair_dots(const at::Tensor& grad, const at::Tensor& src,
                                  const at::Tensor& base, int64_t lead, int64_t steps) {
  check_sequences(grad, src);
  check(base.dim() == 2 && base.scalar_type() == at::kInt && base.is_contiguous() &&
            base.size(0) == grad.size(0) && base.size(1) == src.size(0),
        "base must be (O, I) int32, contiguous");
  const int64_t spread = check_bases(base, steps);
  check_rows(src, lead, 0, steps);
  check_rows(grad, lead, 0, steps + 1);  // the zero row after the last step: see dot_steps
  const auto options = grad.options().dtype(at::kDouble);
  at::Tensor c0 = at::empty(base.sizes(), options), c1 = at::empty(base.sizes(), options);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "delrec_feedforward_pair_dots", [&] {
    if (kRowVectors == 2 && src.size(2) / Simd<scalar_t>::lanes % 2 == 0)
      pair_dots_loop<scalar_t, 2>(grad, src, base, spread, lead, steps, c0, c1);
    else
      pair_dots_loop<scalar_t, 1>(grad, src, base, spread, lead, steps, c0, c1);
  });
  return {c0, c1};
}

// --------------------------------------------------------------------------- taps, gradients
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

// ⌊p⌋ clamped into [0, top]: clamped first, then truncated (the same for p >= 0, and a
// conversion the compiler vectorizes where std::floor is not)
template <typename scalar_t>
inline int32_t window_base(scalar_t p, scalar_t top) {
  return int32_t(std::min(std::max(p, scalar_t(0)), top));
}

template <typename scalar_t>
Around<scalar_t> around(scalar_t p, int64_t kernel_size) {
  Around<scalar_t> a;
  const scalar_t top = scalar_t(kernel_size - 1);
  a.base = window_base(p, top);
  for (int q = 0; q < 4; ++q) {
    const scalar_t d = scalar_t(a.base - 1 + q);
    const scalar_t value = scalar_t(1) - std::abs(d - p);
    const bool inside = d >= 0 && d <= top;
    a.lam[q] = inside && value > 0 ? value : scalar_t(0);
    a.slope[q] = inside && value >= 0 ? scalar_t((d > p) - (d < p)) : scalar_t(0);
  }
  return a;
}

void check_parameters(const at::Tensor& weight, const at::Tensor& position) {
  check(weight.dim() == 2 && weight.is_contiguous() && position.is_contiguous() &&
            position.sizes() == weight.sizes() && position.scalar_type() == weight.scalar_type(),
        "weight and position must be contiguous (O, I) of one dtype");
}

// base (int32) and the coefficients near = w·λ(base), far = w·λ(base + 1), (O, I) each: around()
// at q = 1, 2 in a loop the compiler vectorizes (base is inside the window, base + 1 may not be)
std::vector<at::Tensor> taps(const at::Tensor& weight, const at::Tensor& position,
                             int64_t kernel_size) {
  check_parameters(weight, position);
  at::Tensor base = at::empty(weight.sizes(), weight.options().dtype(at::kInt));
  at::Tensor near = at::empty_like(weight), far = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "delrec_feedforward_taps", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* p = position.data_ptr<scalar_t>();
    int32_t* b = base.data_ptr<int32_t>();
    scalar_t* n0 = near.data_ptr<scalar_t>();
    scalar_t* n1 = far.data_ptr<scalar_t>();
    const scalar_t top = scalar_t(kernel_size - 1);
    at::parallel_for(0, weight.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int32_t k = window_base(p[n], top);
        const scalar_t d = scalar_t(k);
        const scalar_t value = scalar_t(1) - std::abs(d - p[n]);
        const scalar_t next = scalar_t(1) - std::abs((d + scalar_t(1)) - p[n]);
        b[n] = k;
        n0[n] = w[n] * (value > 0 ? value : scalar_t(0));
        n1[n] = w[n] * (d + scalar_t(1) <= top && next > 0 ? next : scalar_t(0));
      }
    });
  });
  return {base, near, far};
}

// ∂L/∂w = Σ_q λ_q C(base - 1 + q) and ∂L/∂p = w Σ_q σ_q C(base - 1 + q) per synapse, summed in
// float64 and returned in the parameters' dtype, with C(d) = Σ_t grad[o, t] src[i, t - d]:
// C(base) and C(base + 1) of every synapse from pair_dots, then in one loop the compiler
// vectorizes around() at q = 1, 2 and a flag for the synapses whose slope is not zero at
// base - 1 or base + 2 (a position on an integer, or |base + 2 - p| rounding to 1; never
// λ there); those few get all four taps again, their extra dots C(base - 1), C(base + 2) summed
// on the spot.
std::vector<at::Tensor> parameter_gradients(const at::Tensor& grad, const at::Tensor& src,
                                            const at::Tensor& base, const at::Tensor& weight,
                                            const at::Tensor& position, int64_t kernel_size,
                                            int64_t lead, int64_t steps) {
  check_parameters(weight, position);
  check(base.sizes() == weight.sizes(), "base must be the (O, I) base delays of the synapses");
  const std::vector<at::Tensor> dots = pair_dots(grad, src, base, lead, steps);
  const double* d0 = dots[0].data_ptr<double>();
  const double* d1 = dots[1].data_ptr<double>();
  const int64_t columns = weight.size(1), width = grad.size(2);
  const int64_t grad_rows = grad.size(1), src_rows = src.size(1);
  at::Tensor grad_w = at::empty_like(weight), grad_p = at::empty_like(position);
  std::vector<uint8_t> extra(weight.numel());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "delrec_feedforward_parameter_gradients", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* p = position.data_ptr<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t* gp = grad_p.data_ptr<scalar_t>();
    uint8_t* flag = extra.data();
    const scalar_t top = scalar_t(kernel_size - 1);
    auto sign = [](scalar_t x) { return scalar_t((x > 0) - (x < 0)); };
    at::parallel_for(0, weight.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t d = scalar_t(window_base(p[n], top));
        const scalar_t value = scalar_t(1) - std::abs(d - p[n]);
        const scalar_t next = scalar_t(1) - std::abs((d + scalar_t(1)) - p[n]);
        const bool inside = d + scalar_t(1) <= top;
        const scalar_t lam0 = value > 0 ? value : scalar_t(0);
        const scalar_t lam1 = inside && next > 0 ? next : scalar_t(0);
        const scalar_t slope0 = value >= 0 ? sign(d - p[n]) : scalar_t(0);
        const scalar_t slope1 = inside && next >= 0 ? sign(d + scalar_t(1) - p[n]) : scalar_t(0);
        const scalar_t before = d - scalar_t(1), after = d + scalar_t(2);
        const bool low = before >= 0 && scalar_t(1) - std::abs(before - p[n]) >= 0;
        const bool high = after <= top && scalar_t(1) - std::abs(after - p[n]) >= 0;
        flag[n] = uint8_t(low || high);
        gw[n] = scalar_t(double(lam0) * d0[n] + double(lam1) * d1[n]);
        gp[n] = scalar_t(double(w[n]) * (double(slope0) * d0[n] + double(slope1) * d1[n]));
      }
    });
    const scalar_t* g = grad.data_ptr<scalar_t>() + lead * width;
    const scalar_t* x = src.data_ptr<scalar_t>() + lead * width;
    auto dot = [&](int64_t n, int64_t delay) {  // C(delay), steps t with t - delay in [0, T)
      const int64_t t0 = std::max<int64_t>(0, delay), t1 = std::min(steps, steps + delay);
      return t0 < t1 ? span_dot<scalar_t>(g + (n / columns * grad_rows + t0) * width,
                                          x + (n % columns * src_rows + t0 - delay) * width,
                                          (t1 - t0) * width)
                     : 0.0;
    };
    for (int64_t n = 0; n < weight.numel(); ++n) {
      if (!flag[n]) continue;
      const Around<scalar_t> a = around<scalar_t>(p[n], kernel_size);
      const double c[4] = {a.slope[0] != 0 ? dot(n, a.base - 1) : 0.0, d0[n], d1[n],
                           a.slope[3] != 0 ? dot(n, a.base + 2) : 0.0};
      double sw = 0.0, sp = 0.0;
      for (int q = 0; q < 4; ++q) {
        sw += double(a.lam[q]) * c[q];
        sp += double(a.slope[q]) * c[q];
      }
      gw[n] = scalar_t(sw);
      gp[n] = scalar_t(double(w[n]) * sp);
    }
  });
  return {grad_w, grad_p};
}

// (T, B, C) time-major -> (C, rows, W) channel-major, sequence at rows [lead, lead + T),
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: the two-tap feedforward-delay engine (shifted sums and dots)";
  m.attr("tile_rows") = kRows;
#if defined(__AVX512F__)
  m.attr("simd") = "avx512";  // the vectors this build runs (Simd)
#else
  m.attr("simd") = "portable";
#endif
  m.def("shifted_sum", &shifted_sum,
        "out (T, B, R): out[t, :, r] = Σ_c a[r, c] src[c, f + t] + b[r, c] src[c, f + t + 1], "
        "f = direction·base[r, c] + offset (base, a, b (O, I), r = i, c = o if transposed)");
  m.def("parameter_gradients", &parameter_gradients,
        "∂L/∂w and ∂L/∂p from grad (O, rows, W) and src (I, rows, W), channel-major");
  m.def("taps", &taps, "base delay (int32), near = w·λ(base), far = w·λ(base + 1) per synapse");
  m.def("channel_major", &channel_major,
        "(T, B, C) -> zeros (C, rows, W) holding the sequence at rows [lead, lead + T)");
}
