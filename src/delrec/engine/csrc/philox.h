// Dropout masks drawn by a counter-based generator (Philox4x32-10), shared by the kernels that
// apply them (csrc/fused.cpp; csrc/axonal.cpp, a recurrent layer's input and output dropout).
// What a mask is: delrec/engine/dropout.py. Element (t, b, n) of a mask, n = 128k + 16j + l (j < 8,
// l < 16), is kept when half j div 4 (0: the low 16 bits, 1: the high ones) of word j mod 4 of
// Philox4x32-10(counter = (16k + l, b + batch_offset, t, 0), key = (key mod 2³², key div 2³²))
// is below `threshold` = round(keep·2¹⁶); a kept element is multiplied by 1/keep (in the
// tensor's dtype), a dropped one by 0.
#pragma once

#include <torch/extension.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <tuple>
#include <vector>

namespace delrec {

// --------------------------------------------------------------------------- Philox4x32-10
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kLanes = 16;              // Philox blocks computed side by side
constexpr int64_t kChunk = 8 * kLanes;      // mask elements per group of kLanes blocks

// The 16-bit draws 0 … count-1 of the mask row (row, step), one per uint32 of out (room for
// count rounded up to kChunk): in each chunk of 128 elements k, element 128k + 16j + l is half
// j div 4 of word j mod 4 of the block with counter (16k + l, row, step, 0). Sixteen blocks are
// computed at once, one per 32-bit lane.
#if defined(__AVX512F__)
// The 32×32 → 64-bit products of the even and odd lanes (vpmuludq), split into the high and
// low words of each lane.
inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

inline __attribute__((noinline)) void philox_row(uint32_t* __restrict__ out, int64_t count,
                                                 uint32_t row, uint32_t step, uint32_t key0,
                                                 uint32_t key1) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  for (int64_t first = 0; 8 * first < count; first += kLanes) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<uint32_t>(first)), lanes);
    __m512i c1 = _mm512_set1_epi32(row), c2 = _mm512_set1_epi32(step);
    __m512i c3 = _mm512_setzero_si512();
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(k0), 0x96);  // a ^ b ^ c
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(k1), 0x96);
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t* draws = out + 8 * first;
    _mm512_storeu_si512(draws, _mm512_and_si512(c0, low));
    _mm512_storeu_si512(draws + kLanes, _mm512_and_si512(c1, low));
    _mm512_storeu_si512(draws + 2 * kLanes, _mm512_and_si512(c2, low));
    _mm512_storeu_si512(draws + 3 * kLanes, _mm512_and_si512(c3, low));
    _mm512_storeu_si512(draws + 4 * kLanes, _mm512_srli_epi32(c0, 16));
    _mm512_storeu_si512(draws + 5 * kLanes, _mm512_srli_epi32(c1, 16));
    _mm512_storeu_si512(draws + 6 * kLanes, _mm512_srli_epi32(c2, 16));
    _mm512_storeu_si512(draws + 7 * kLanes, _mm512_srli_epi32(c3, 16));
  }
}
#elif defined(__AVX2__)
// Eight lanes per register: the sixteen blocks are two groups of eight, run side by side.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline __attribute__((noinline)) void philox_row(uint32_t* __restrict__ out, int64_t count,
                                                 uint32_t row, uint32_t step, uint32_t key0,
                                                 uint32_t key1) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  for (int64_t first = 0; 8 * first < count; first += kLanes) {
    __m256i c0[2], c1[2], c2[2], c3[2];
    for (int g = 0; g < 2; ++g) {
      c0[g] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<uint32_t>(first + 8 * g)), lanes);
      c1[g] = _mm256_set1_epi32(row);
      c2[g] = _mm256_set1_epi32(step);
      c3[g] = _mm256_setzero_si256();
    }
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const __m256i key_a = _mm256_set1_epi32(k0), key_b = _mm256_set1_epi32(k1);
      for (int g = 0; g < 2; ++g) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[g], m0, hi0, lo0);
        mulhilo8(c2[g], m1, hi1, lo1);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), key_a);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), key_b);
        c1[g] = lo1;
        c3[g] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t* draws = out + 8 * first;
    for (int g = 0; g < 2; ++g) {
      uint32_t* lane = draws + 8 * g;
      const __m256i words[4] = {c0[g], c1[g], c2[g], c3[g]};
      for (int w = 0; w < 4; ++w) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane + w * kLanes),
                            _mm256_and_si256(words[w], low));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane + (w + 4) * kLanes),
                            _mm256_srli_epi32(words[w], 16));
      }
    }
  }
}
#else
inline __attribute__((noinline)) void philox_row(uint32_t* __restrict__ out, int64_t count,
                                                 uint32_t row, uint32_t step, uint32_t key0,
                                                 uint32_t key1) {
  for (int64_t first = 0; 8 * first < count; first += kLanes) {
    uint32_t* draws = out + 8 * first;
    for (int64_t l = 0; l < kLanes; ++l) {  // the ten rounds unrolled: GCC vectorises the lanes
      uint32_t c0 = static_cast<uint32_t>(first + l), c1 = row, c2 = step, c3 = 0;
      uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
      for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
        const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
        c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
        c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
        c1 = static_cast<uint32_t>(p1);
        c3 = static_cast<uint32_t>(p0);
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      const uint32_t words[4] = {c0, c1, c2, c3};
      for (int w = 0; w < 4; ++w) {
        draws[w * kLanes + l] = words[w] & 0xFFFFu;
        draws[(w + 4) * kLanes + l] = words[w] >> 16;
      }
    }
  }
}
#endif

// The vectors philox_row runs on in this build (a test builds each variant this CPU can run).
#if defined(__AVX512F__)
constexpr const char* kPhiloxVectors = "avx512";
#elif defined(__AVX2__)
constexpr const char* kPhiloxVectors = "avx2";
#else
constexpr const char* kPhiloxVectors = "portable";
#endif

// The value of each element of a mask row: 1/keep (kept) or 0 (dropped).
template <typename scalar_t>
inline void mask_values(scalar_t* __restrict__ out, const uint32_t* __restrict__ words,
                        int64_t n, uint32_t threshold, scalar_t kept) {
  for (int64_t i = 0; i < n; ++i) out[i] = words[i] < threshold ? kept : scalar_t(0);
}

// One dropout mask: key, threshold on the words, value of a kept element, first batch row.
struct Mask {
  bool active = false;
  uint32_t key0 = 0, key1 = 0, threshold = 0;
  double scale = 1.0;
  int64_t batch_offset = 0;

  // the words of row (b, t) into buffer (length ≥ N rounded up to kChunk)
  void draw(std::vector<uint32_t>& buffer, int64_t n, int64_t b, int64_t t) const {
    TORCH_CHECK(b + batch_offset < (int64_t(1) << 32),
                "delrec dropout: the masks tell apart 2^32 rows of a batch only");
    philox_row(buffer.data(), n, static_cast<uint32_t>(b + batch_offset),
               static_cast<uint32_t>(t), key0, key1);
  }

  // the values of row (b, t), 1/keep or 0, into values (left as they are when inactive)
  template <typename scalar_t>
  void values_of_row(std::vector<scalar_t>& values, std::vector<uint32_t>& words, int64_t n,
                     int64_t b, int64_t t) const {
    if (!active) return;
    draw(words, n, b, t);
    mask_values(values.data(), words.data(), n, threshold, static_cast<scalar_t>(scale));
  }

  // out = x ⊙ the mask's row (b, t), in one pass over the row's draws (x may be out)
  template <typename scalar_t>
  void apply_to_row(scalar_t* out, const scalar_t* x, std::vector<uint32_t>& words, int64_t n,
                    int64_t b, int64_t t) const {
    draw(words, n, b, t);
    const uint32_t* __restrict__ w = words.data();
    const scalar_t kept = static_cast<scalar_t>(scale);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * (w[i] < threshold ? kept : scalar_t(0));
  }
};

inline Mask make_mask(bool active, int64_t key, int64_t threshold, double scale, int64_t batch_offset) {
  Mask mask;
  if (!active) return mask;
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 16),
              "delrec dropout: threshold must be in [0, 2^16]");
  TORCH_CHECK(batch_offset >= 0 && batch_offset < (int64_t(1) << 32),
              "delrec dropout: batch_offset must be in [0, 2^32)");
  const uint64_t k = static_cast<uint64_t>(key);
  mask.active = true;
  mask.key0 = static_cast<uint32_t>(k);
  mask.key1 = static_cast<uint32_t>(k >> 32);
  mask.threshold = static_cast<uint32_t>(threshold);
  mask.scale = scale;
  mask.batch_offset = batch_offset;
  return mask;
}

// masks travel as (active, key, threshold, scale, batch_offset)
using MaskArgs = std::tuple<bool, int64_t, int64_t, double, int64_t>;

inline Mask mask_of(const MaskArgs& m) {
  return make_mask(std::get<0>(m), std::get<1>(m), std::get<2>(m), std::get<3>(m),
                   std::get<4>(m));
}

}  // namespace delrec
