// The time loops of the synaptic-delay engine (delrec/engine/synaptic.py), fused.
//
// Each synapse (i, j) reads, instead of its own kernel, one "slot" of its presynaptic neuron j:
// a pair of traces (Z_s, E_s) over the batch, where Z_s is the triangle trace at the slot's
// centre and E_s the ε-box sum (the centre derivative times w²); the recurrent input is
//     r_i[t] = Σ_j a_ij Z_s[t] + b_ij E_s[t],   s = slot(i, j)
// (a = gain·W, b = gain·W·(c_ij - G_s)/w²). Traces are float64 three- and four-tap recursions
// over the spike history (what they mean: synaptic.py, _SlotPlan). Layouts are neuron-major
// ((N, T+1, B) history and spike counts, (T, N, B) membrane, (N, T, B') adjoint ∂L/∂r, B'
// padded to whole cache lines) so that batch rows are contiguous and one neuron's recent past
// is close together; what the layer exchanges with the network is batch-major (T, B, N).
//
// plan:      the slots of each neuron and the synapses reading them, one pass, no sort.
// forward:   per step, the slot traces, then r_i gathered per postsynaptic neuron (the sums in
//            registers, the slot traces of a block of presynaptic neurons in L1), then the LIF
//            update.
// backward:  per reverse step, the adjoint of the spikes (one float64 recursion per neuron fed
//            by a ring of injections), the LIF adjoint, the per-slot sums of a·ḡ and b·ḡ over
//            the slot's members (in registers, a block of rows of ḡ in L1), their injections at
//            the slot's taps (grouped by lag: one ring row update per lag), and Σ K_s·x_s.
// gradients: a second forward sweep of the slot traces, in chunks of time, dotting them with
//            the stored adjoint: D0_ij = Σ ḡ_i Z_s, D1_ij = Σ ḡ_i E_s.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include "lif.h"

namespace {

using delrec::LIFConstants;
using delrec::LIFUpdate;

// the sums of the forward and backward: vector blocks of a batch row summed at once, and the
// bytes of slot traces (forward) or adjoint rows (backward) a block of neurons keeps in L1
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kColumnBytes = 1 << 15;
// the gradient sweep: longest chunk of time, the adjoint over one chunk (all neurons) that is
// kept in cache, the per-synapse sums of one group of neurons
constexpr int64_t kChunk = 64;
constexpr int64_t kAdjointBytes = 1 << 20;
constexpr int64_t kSumBytes = 1 << 18;

// Vector lanes: one cache line of scalars. Batch rows of the internal buffers are padded to a
// multiple of it (zero lanes), so the inner loops run over whole blocks the compiler vectorises.
template <typename scalar_t>
constexpr int64_t kLanes = 64 / sizeof(scalar_t);

template <typename scalar_t>
int64_t padded(int64_t batch) {
  return (batch + kLanes<scalar_t> - 1) / kLanes<scalar_t> * kLanes<scalar_t>;
}

// kLanes scalars as one vector (GCC/Clang vector extension: an AVX-512 register, or two AVX2
// ones); load and store accept any scalar-aligned address. Kernels marked DELREC_CONTRACT fuse
// `acc += a * x` into FMAs (the module is built with -ffp-contract=off, so that the LIF update
// rounds as PyTorch's ops do).
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

#if defined(__GNUC__) && !defined(__clang__)
#define DELREC_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define DELREC_CONTRACT
#endif

// The slot plan (synaptic.py, _SlotPlan.native): per slot s its presynaptic neuron, the three
// triangle taps (lags, increments of z and of its slope), the four ε-box taps (signs -, +, +, -)
// and the closed support [lo, hi]; the synapses grouped by slot ("members", postsynaptic i
// ascending), whose coefficients a, b come in the same order.
struct Plan {
  int64_t n, slots;
  const int64_t* owner_start;   // (N+1): slots of neuron j are [owner_start[j], owner_start[j+1])
  const int64_t* z_lags;        // (S, 3)
  const double* z_coef;         // (S, 6): γ₀ γ₁ γ₂ δ₀ δ₁ δ₂ (already / w²)
  const int64_t* e_lags;        // (S, 4)
  const int64_t* support;       // (S, 2): lo, hi
  const int64_t* member_start;  // (S+1)
  const int32_t* member;        // (N²): postsynaptic i of each member, grouped by slot
};

Plan plan_of(const at::Tensor& owner_start, const at::Tensor& z_lags, const at::Tensor& z_coef,
             const at::Tensor& e_lags, const at::Tensor& support, const at::Tensor& member_start,
             const at::Tensor& member) {
  auto ok = [](bool c, const char* what) { TORCH_CHECK(c, "delrec synaptic kernel: ", what); };
  const int64_t n = owner_start.numel() - 1, s = z_lags.size(0);
  ok(member_start.numel() == s + 1 && member.numel() == n * n, "plan sizes disagree");
  ok(z_lags.scalar_type() == at::kLong && e_lags.scalar_type() == at::kLong &&
         support.scalar_type() == at::kLong && owner_start.scalar_type() == at::kLong &&
         member_start.scalar_type() == at::kLong, "lags and offsets must be int64");
  ok(z_coef.scalar_type() == at::kDouble && z_coef.size(1) == 6, "z_coef must be (S, 6) float64");
  ok(member.scalar_type() == at::kInt, "members must be int32");
  for (const at::Tensor* x : {&owner_start, &z_lags, &z_coef, &e_lags, &support, &member_start,
                              &member}) {
    ok(x->is_contiguous() && x->device().is_cpu(), "plan tensors must be contiguous CPU tensors");
  }
  return {n, s, owner_start.data_ptr<int64_t>(), z_lags.data_ptr<int64_t>(),
          z_coef.data_ptr<double>(), e_lags.data_ptr<int64_t>(), support.data_ptr<int64_t>(),
          member_start.data_ptr<int64_t>(), member.data_ptr<int32_t>()};
}

// The state of the slot recursions, (S, B) each: z and its slope D/w² (float64), E (exact).
struct SlotState {
  std::vector<double> z, d;
  std::vector<int32_t> e;
  SlotState(int64_t slots, int64_t batch)
      : z(slots * batch, 0.0), d(slots * batch, 0.0), e(slots * batch, 0) {}
};

// The recursions of one slot over a batch row: taps x (triangle) and y (ε-boxes) are 0/1 bytes.
// Kept out of line: with its own restrict pointers the compiler vectorises it, inlined it doesn't.
template <typename scalar_t>
__attribute__((noinline)) void slot_step(
    const uint8_t* __restrict x0, const uint8_t* __restrict x1, const uint8_t* __restrict x2,
    const uint8_t* __restrict y0, const uint8_t* __restrict y1, const uint8_t* __restrict y2,
    const uint8_t* __restrict y3, const double* __restrict c, int64_t batch,
    double* __restrict z, double* __restrict d, int32_t* __restrict e,
    scalar_t* __restrict z_out, scalar_t* __restrict e_out) {
  const double c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3], c4 = c[4], c5 = c[5];
  for (int64_t b = 0; b < batch; ++b) {
    const double s0 = x0[b], s1 = x1[b], s2 = x2[b];
    const double zb = z[b] + d[b];
    z[b] = zb + (s0 * c0 + s1 * c1 + s2 * c2);
    d[b] += s0 * c3 + s1 * c4 + s2 * c5;
    e[b] += (static_cast<int32_t>(y1[b]) + y2[b]) - (static_cast<int32_t>(y0[b]) + y3[b]);
    z_out[b] = static_cast<scalar_t>(z[b]);
    e_out[b] = static_cast<scalar_t>(e[b]);
  }
}

// One step of slot s at time t: reads the spikes s_j[t - lag] of its neuron j from j's (T+1, B)
// history (frame u + 1 holds step u, frame 0 is all zero) and writes Z_s[t], E_s[t] to z_out,
// e_out.
template <typename scalar_t>
inline void advance_slot(const Plan& p, int64_t s, int64_t t, int64_t batch,
                         const bool* history_j, SlotState& st, int64_t row,
                         scalar_t* z_out, scalar_t* e_out) {
  auto tap = [&](int64_t lag) {  // as bytes: the compiler vectorises byte loads, not bool
    return reinterpret_cast<const uint8_t*>(history_j) + std::max<int64_t>(t - lag + 1, 0) * batch;
  };
  const int64_t* zl = p.z_lags + 3 * s;
  const int64_t* el = p.e_lags + 4 * s;
  slot_step(tap(zl[0]), tap(zl[1]), tap(zl[2]), tap(el[0]), tap(el[1]), tap(el[2]), tap(el[3]),
            p.z_coef + 6 * s, batch, st.z.data() + row * batch, st.d.data() + row * batch,
            st.e.data() + row * batch, z_out, e_out);
}

// One synapse as the sums read it: a = gain·W, b = gain·W·(c - G_s)/w², and an index: the slot
// it reads (forward) or its postsynaptic neuron i (backward).
template <typename scalar_t>
struct Synapse {
  int32_t index;
  scalar_t a, b;
};

// fn(std::integral_constant<int, NB>) for a run-time number of vector blocks NB, 1 … kGroupBlocks:
// the sums below keep NB blocks of accumulators in registers, so NB must be a constant there.
template <typename Fn>
void with_blocks(int64_t blocks, const Fn& fn) {
  switch (blocks) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    default: return fn(std::integral_constant<int, 4>{});
  }
}

// For each of `rows` postsynaptic neurons (`count` synapses each, consecutive in `synapse`):
// r += Σ a·Z_s + b·E_s over NB vector blocks of the batch, where table points at the first lane
// of the (S, 2, width) slot traces and r advances by width per neuron. The sums stay in
// registers (two chains per block); each Z_s, E_s block is one load.
template <typename scalar_t, int NB>
__attribute__((noinline)) DELREC_CONTRACT void gather_rows(
    const scalar_t* __restrict table, int64_t width, const Synapse<scalar_t>* __restrict synapse,
    int64_t count, int64_t rows, scalar_t* __restrict r) {
  constexpr int64_t L = kLanes<scalar_t>;
  for (int64_t row = 0; row < rows; ++row, synapse += count, r += width) {
    Vec<scalar_t> by_z[NB] = {}, by_e[NB] = {};
    for (int64_t k = 0; k < count; ++k) {
      const scalar_t* z = table + static_cast<int64_t>(synapse[k].index) * 2 * width;
      const scalar_t a = synapse[k].a, b = synapse[k].b;
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) {
        by_z[q] += a * load(z + q * L);
        by_e[q] += b * load(z + width + q * L);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) store(r + q * L, load(r + q * L) + by_z[q] + by_e[q]);
  }
}

template <typename scalar_t>
void forward_loop(const Plan& p, const at::Tensor& drive, const at::Tensor& a_rows,
                  const at::Tensor& b_rows, const at::Tensor& slot_of, const at::Tensor& mask,
                  const LIFConstants& lif, at::Tensor& spikes_out, at::Tensor& history,
                  at::Tensor& membrane) {
  const int64_t steps = drive.size(0), batch = drive.size(1), n = drive.size(2);
  const int64_t nb = n * batch;
  const bool has_mask = mask.defined();
  const scalar_t* drive_p = drive.data_ptr<scalar_t>();  // (T, B, N)
  const scalar_t* a = a_rows.data_ptr<scalar_t>();       // (N, N): gain·W
  const scalar_t* b = b_rows.data_ptr<scalar_t>();       // (N, N): gain·W·(c - G_s)/w²
  const int32_t* slot = slot_of.data_ptr<int32_t>();     // (N, N): the slot synapse (i, j) reads
  const scalar_t* mask_p = has_mask ? mask.data_ptr<scalar_t>() : nullptr;  // (B, N)
  scalar_t* spikes_p = spikes_out.data_ptr<scalar_t>();  // (T, B, N)
  bool* hist = history.data_ptr<bool>();                 // (N, T+1, B)
  const int64_t frames = (steps + 1) * batch;            // one neuron's history
  scalar_t* membrane_p = membrane.data_ptr<scalar_t>();  // (T, N, B)

  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t width = padded<scalar_t>(batch);
  const int64_t group = std::min(width, kGroupBlocks * L);  // batch lanes summed in one pass
  // presynaptic neurons in column blocks whose slot traces (one lane group) stay in L1
  const int64_t slot_bytes = 2 * group * static_cast<int64_t>(sizeof(scalar_t));
  std::vector<int64_t> columns{0};
  for (int64_t j = 1; j < n; ++j) {
    if ((p.owner_start[j + 1] - p.owner_start[columns.back()]) * slot_bytes > kColumnBytes) {
      columns.push_back(j);
    }
  }
  columns.push_back(n);
  // the synapses in the order the sums read them: column block, postsynaptic i, presynaptic j
  std::vector<Synapse<scalar_t>> synapses(n * n);
  for (size_t c = 0, k = 0; c + 1 < columns.size(); ++c) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = columns[c]; j < columns[c + 1]; ++j, ++k) {
        synapses[k] = {slot[i * n + j], a[i * n + j], b[i * n + j]};
      }
    }
  }
  SlotState state(p.slots, batch);
  std::vector<scalar_t> table(p.slots * 2 * width, scalar_t(0));  // (S, 2, B'): Z_s, E_s at t
  std::vector<scalar_t> recurrent(n * width);                      // (N, B'): r_i at t
  std::vector<scalar_t> v(nb, static_cast<scalar_t>(lif.v0));
  const LIFUpdate<scalar_t> neuron(lif);
  for (int64_t j = 0; j < n; ++j) std::fill_n(hist + j * frames, batch, false);

  for (int64_t t = 0; t < steps; ++t) {
    at::parallel_for(0, n, 1, [&](int64_t j0, int64_t j1) {  // the slot traces at t
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t s = p.owner_start[j]; s < p.owner_start[j + 1]; ++s) {
          scalar_t* z = table.data() + s * 2 * width;
          advance_slot(p, s, t, batch, hist + j * frames, state, s, z, z + width);
        }
      }
    });
    const int64_t now = t * nb;
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      std::fill(recurrent.begin() + i0 * width, recurrent.begin() + i1 * width, scalar_t(0));
      for (int64_t lane = 0; lane < width; lane += group) {
        const int64_t blocks = std::min(group, width - lane) / L;
        for (size_t c = 0; c + 1 < columns.size(); ++c) {
          const int64_t count = columns[c + 1] - columns[c];
          with_blocks(blocks, [&](auto nb) {
            gather_rows<scalar_t, decltype(nb)::value>(
                table.data() + lane, width, synapses.data() + n * columns[c] + i0 * count, count,
                i1 - i0, recurrent.data() + i0 * width + lane);
          });
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* r = recurrent.data() + i * width;
        for (int64_t b = 0; b < batch; ++b) {  // the LIF update (lif.h)
          const int64_t k = i * batch + b, out = now + b * n + i;
          const scalar_t rec = has_mask ? mask_p[b * n + i] * r[b] : r[b];
          const scalar_t h = neuron.charge(drive_p[out], rec, v[k]);
          const bool spike = neuron.fires(h);
          membrane_p[now + k] = h;
          hist[i * frames + (t + 1) * batch + b] = spike;
          spikes_p[out] = static_cast<scalar_t>(spike);
          v[k] = neuron.reset_after(h, spike);
        }
      }
    });
  }
}

// For slots [0, slots) of a table (x_s at row 2s, e_s at row 2s + 1, rows of `width`, pointing
// at the first lane): x_s (+)= Σ a·ḡ_i and e_s (+)= Σ b·ḡ_i over NB vector blocks, the sum over
// the members [cut[s·stride], cut[s·stride + 1]) of slot s (`member`: row i of g, a, b);
// `overwrite` stores instead of adding. The sums stay in registers, each ḡ_i block is one load.
template <typename scalar_t, int NB>
__attribute__((noinline)) DELREC_CONTRACT void sum_members(
    const scalar_t* __restrict g, int64_t width, const Synapse<scalar_t>* __restrict member,
    const int64_t* __restrict cut, int64_t stride, int64_t slots, bool overwrite,
    scalar_t* __restrict table) {
  constexpr int64_t L = kLanes<scalar_t>;
  for (int64_t s = 0; s < slots; ++s) {
    Vec<scalar_t> by_a[NB] = {}, by_b[NB] = {};
    for (int64_t k = cut[s * stride]; k < cut[s * stride + 1]; ++k) {
      const scalar_t* gi = g + static_cast<int64_t>(member[k].index) * width;
      const scalar_t a = member[k].a, b = member[k].b;
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) {
        const Vec<scalar_t> gq = load(gi + q * L);
        by_a[q] += a * gq;
        by_b[q] += b * gq;
      }
    }
    scalar_t* x = table + 2 * s * width;
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      store(x + q * L, overwrite ? by_a[q] : load(x + q * L) + by_a[q]);
      store(x + width + q * L, overwrite ? by_b[q] : load(x + width + q * L) + by_b[q]);
    }
  }
}

// What the backward injects into the adjoint recursion of each presynaptic neuron j, grouped by
// lag so that each ring row of j is updated once per step: ∂L/∂Z_s (row 2s of the (S, 2, B')
// adjoint table) enters through the triangle taps, with increments `coef` of the adjoint y and
// `slope` of its slope d; ∂L/∂E_s (row 2s + 1) through the ε-box taps, with ±1 into y.
template <typename scalar_t>
struct TapGroups {
  struct Term {
    int64_t row;
    scalar_t coef, slope;
  };
  struct Group {
    int64_t lag, begin, mid, end;  // terms [begin, mid): triangle taps, [mid, end): ε-box taps
  };
  std::vector<int64_t> start{0};  // (N+1): the groups of neuron j
  std::vector<Group> groups;
  std::vector<Term> terms;

  explicit TapGroups(const Plan& p) {
    for (int64_t j = 0; j < p.n; ++j) {
      std::map<int64_t, std::pair<std::vector<Term>, std::vector<Term>>> by_lag;
      for (int64_t s = p.owner_start[j]; s < p.owner_start[j + 1]; ++s) {
        const int64_t* zl = p.z_lags + 3 * s;
        const int64_t* el = p.e_lags + 4 * s;
        const double* c = p.z_coef + 6 * s;
        for (int q = 0; q < 3; ++q) {
          by_lag[zl[q]].first.push_back({2 * s, static_cast<scalar_t>(c[q]),
                                         static_cast<scalar_t>(c[3 + q])});
        }
        for (int q = 0; q < 4; ++q) {  // signs -, +, +, -
          by_lag[el[q]].second.push_back({2 * s + 1, scalar_t(q == 1 || q == 2 ? 1 : -1), 0});
        }
      }
      for (const auto& [lag, taps] : by_lag) {
        const int64_t begin = terms.size();
        terms.insert(terms.end(), taps.first.begin(), taps.first.end());
        const int64_t mid = terms.size();
        terms.insert(terms.end(), taps.second.begin(), taps.second.end());
        groups.push_back({lag, begin, mid, static_cast<int64_t>(terms.size())});
      }
      start.push_back(groups.size());
    }
  }
};

// One group's injection over NB vector blocks: y += Σ coef·x + Σ ±e, d += Σ slope·x, with x, e
// rows of the adjoint table (which points at the first lane) and y, d one ring row of the neuron.
template <typename scalar_t, int NB>
__attribute__((noinline)) DELREC_CONTRACT void inject_group(
    const scalar_t* __restrict table, int64_t width,
    const typename TapGroups<scalar_t>::Term* __restrict term, int64_t mid, int64_t end,
    scalar_t* __restrict y, scalar_t* __restrict d) {
  constexpr int64_t L = kLanes<scalar_t>;
  Vec<scalar_t> to_y[NB] = {}, to_d[NB] = {};
  for (int64_t k = 0; k < mid; ++k) {
    const scalar_t* x = table + term[k].row * width;
    const scalar_t coef = term[k].coef, slope = term[k].slope;
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      const Vec<scalar_t> xq = load(x + q * L);
      to_y[q] += coef * xq;
      to_d[q] += slope * xq;
    }
  }
  for (int64_t k = mid; k < end; ++k) {
    const scalar_t* e = table + term[k].row * width;
    const scalar_t sign = term[k].coef;
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) to_y[q] += sign * load(e + q * L);
  }
#pragma GCC unroll 4
  for (int q = 0; q < NB; ++q) {
    store(y + q * L, load(y + q * L) + to_y[q]);
    store(d + q * L, load(d + q * L) + to_d[q]);
  }
}

template <typename scalar_t>
void backward_loop(const Plan& p, const at::Tensor& grad_spikes, const at::Tensor& history,
                   const at::Tensor& membrane, const at::Tensor& psi, const at::Tensor& a_m,
                   const at::Tensor& b_m, const at::Tensor& mask, const at::Tensor& counts,
                   const LIFConstants& lif, int64_t ring, at::Tensor& grad_h,
                   at::Tensor& adjoint, at::Tensor& by_support) {
  const int64_t steps = membrane.size(0), n = membrane.size(1), batch = membrane.size(2);
  const int64_t nb = n * batch;
  const bool has_mask = mask.defined(), need_support = counts.defined();
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t width = adjoint.size(2);
  const scalar_t* grad_out = grad_spikes.data_ptr<scalar_t>();  // (T, B, N)
  const bool* hist = history.data_ptr<bool>();                 // (N, T+1, B)
  const int64_t frames = (steps + 1) * batch;
  const scalar_t* membrane_p = membrane.data_ptr<scalar_t>();   // (T, N, B)
  const scalar_t* psi_p = psi.data_ptr<scalar_t>();             // (T, N, B)
  const scalar_t* am = a_m.data_ptr<scalar_t>();                // (N²) in member order
  const scalar_t* bm = b_m.data_ptr<scalar_t>();
  const scalar_t* mask_p = has_mask ? mask.data_ptr<scalar_t>() : nullptr;  // (B, N)
  const int32_t* count_p = need_support ? counts.data_ptr<int32_t>() : nullptr;  // (N, T+1, B)
  scalar_t* grad_h_p = grad_h.data_ptr<scalar_t>();   // (T, B, N)
  scalar_t* adj = adjoint.data_ptr<scalar_t>();  // (N, T, B'): ∂L/∂r / gain = ∂L/∂h · m
  double* support_sum = by_support.data_ptr<double>();  // (N): Σ_t Σ_s K_s·x_s

  // injections of the future adjoints into the recursion of each neuron: (N, R, 2, B'), so that
  // one neuron's injections at all ring slots stay within a few cache lines
  std::vector<scalar_t> inject(ring * 2 * n * width, scalar_t(0));
  const auto injection = [&](int64_t j, int64_t time) {
    return inject.data() + (j * ring + time % ring) * 2 * width;
  };
  const TapGroups<scalar_t> taps(p);
  const int64_t group = std::min(width, kGroupBlocks * L);  // batch lanes summed at once
  std::vector<double> y(nb, 0.0), d(nb, 0.0);  // Σ_k κ(k)·x[t+k] and its slope, (N, B)
  std::vector<scalar_t> gh(nb, scalar_t(0));   // ∂L/∂h[t+1], then ∂L/∂h[t]
  std::vector<scalar_t> g_now(n * width, scalar_t(0));  // ∂L/∂h[t] · m, (N, B')
  std::vector<scalar_t> adjoints(p.slots * 2 * width);  // (S, 2, B'): ∂L/∂Z_s, ∂L/∂E_s at t
  // the members in order (their i, a, b), cut into blocks of postsynaptic neurons whose rows of
  // g_now (one lane group) stay in L1: members of slot s in block q are [cut[s, q], cut[s, q+1])
  std::vector<Synapse<scalar_t>> members(n * n);
  for (int64_t m = 0; m < n * n; ++m) members[m] = {p.member[m], am[m], bm[m]};
  const int64_t block_rows = std::max<int64_t>(
      1, kColumnBytes / (group * static_cast<int64_t>(sizeof(scalar_t))));
  const int64_t row_blocks = (n + block_rows - 1) / block_rows;
  std::vector<int64_t> cut(p.slots * (row_blocks + 1));
  for (int64_t s = 0; s < p.slots; ++s) {
    const int32_t* first = p.member + p.member_start[s];
    const int32_t* last = p.member + p.member_start[s + 1];
    for (int64_t q = 0; q <= row_blocks; ++q) {
      const int64_t row = std::min(n, q * block_rows);
      cut[s * (row_blocks + 1) + q] = std::lower_bound(first, last, row) - p.member;
    }
  }
  const LIFUpdate<scalar_t> neuron(lif);

  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t now = t * nb;
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* inj = injection(i, t);
        for (int64_t b = 0, k = i * batch; b < batch; ++b, ++k) {
          y[k] += d[k] + inj[b];
          d[k] += inj[width + b];
          inj[b] = inj[width + b] = scalar_t(0);
          // the LIF adjoint (lif.h)
          const int64_t out = now + b * n + i;
          const scalar_t g = neuron.adjoint(grad_out[out] + static_cast<scalar_t>(y[k]), gh[k],
                                            membrane_p[now + k],
                                            hist[i * frames + (t + 1) * batch + b], psi_p[now + k]);
          grad_h_p[out] = g;
          gh[k] = g;
          g_now[i * width + b] = has_mask ? g * mask_p[b * n + i] : g;
        }
        std::copy_n(g_now.data() + i * width, width, adj + (i * steps + t) * width);
      }
    });
    at::parallel_for(0, n, 1, [&](int64_t j0, int64_t j1) {
      const int64_t s0 = p.owner_start[j0], s1 = p.owner_start[j1];
      // x = Σ a·ḡ_i, e = Σ b·ḡ_i over the members of each slot
      for (int64_t lane = 0; lane < width; lane += group) {
        for (int64_t q = 0; q < row_blocks; ++q) {
          with_blocks(std::min(group, width - lane) / L, [&](auto nb) {
            sum_members<scalar_t, decltype(nb)::value>(
                g_now.data() + lane, width, members.data(), cut.data() + s0 * (row_blocks + 1) + q,
                row_blocks + 1, s1 - s0, q == 0, adjoints.data() + s0 * 2 * width + lane);
          });
        }
      }
      std::vector<double> support(batch);
      for (int64_t j = j0; j < j1; ++j) {
        std::fill(support.begin(), support.end(), 0.0);
        for (int64_t g = taps.start[j]; g < taps.start[j + 1]; ++g) {
          const auto& tap = taps.groups[g];
          if (tap.lag > t) continue;
          // x = ∂L/∂Z_s[t] and e = ∂L/∂E_s[t] reach s_j[t - lag]: injections at time t - lag
          scalar_t* to = injection(j, t - tap.lag);
          for (int64_t lane = 0; lane < width; lane += group) {
            with_blocks(std::min(group, width - lane) / L, [&](auto nb) {
              inject_group<scalar_t, decltype(nb)::value>(
                  adjoints.data() + lane, width, taps.terms.data() + tap.begin,
                  tap.mid - tap.begin, tap.end - tap.begin, to + lane, to + width + lane);
            });
          }
        }
        if (need_support) {
          for (int64_t s = p.owner_start[j]; s < p.owner_start[j + 1]; ++s) {
            // K_s[t] = spikes of j at lags lo … hi = P[t-lo+1] - P[t-hi]
            const scalar_t* x = adjoints.data() + s * 2 * width;
            const int64_t lo = p.support[2 * s], hi = p.support[2 * s + 1];
            const int32_t* upper = count_p + j * frames + std::max<int64_t>(t - lo + 1, 0) * batch;
            const int32_t* lower = count_p + j * frames + std::max<int64_t>(t - hi, 0) * batch;
            for (int64_t b = 0; b < batch; ++b) {
              support[b] += static_cast<double>(upper[b] - lower[b]) * x[b];
            }
          }
        }
        for (int64_t b = 0; b < batch; ++b) support_sum[j] += support[b];
      }
    });
  }
}

// The dot products of the gradient sweep, R members of one slot at a time:
//   dot_tile<R>(member, g, stride, z, e, len, dz, de): Σ_k ḡ_i[k]·z[k] and ḡ_i[k]·e[k] over
//   k < len (a multiple of kLanes) for the members i = member[0 … R), added to dz[i], de[i],
//   where ḡ_i = g + i·stride (float32 sums for float32 data).
// With AVX-512 in register tiles: z and e are loaded once per vector block for the R rows, R + 2
// loads per 2R FMAs in 2R independent chains. kTile: members per tile; kMinChunk: the shortest
// chunk of the sweep.
#if defined(__AVX512F__)
constexpr int kTile = 8;
constexpr int64_t kMinChunk = 1;

// AVX-512 registers of kLanes scalars: zero, load, fma(a, b, c) = a·b + c, and sums(v, sum):
// sum[q] = Σ over the lanes of v[q], for 16 registers at once.
template <typename scalar_t>
struct Registers;

// An empty asm keeps a loaded vector in a register: GCC would otherwise fold the load into every
// FMA that reads it (one load per FMA instead of one per vector block).
template <typename V>
inline V kept(V x) {
  asm("" : "+v"(x));
  return x;
}

template <>
struct Registers<float> {
  using type = __m512;
  static type zero() { return _mm512_setzero_ps(); }
  static type load(const float* p) { return kept(_mm512_loadu_ps(p)); }
  static type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  // a transposing tree: 16 registers -> 8 (halves summed, two registers' halves side by side)
  // -> 4 (quarters) -> 2 -> 1, whose lane 4k + m holds the sum of input 4m + k
  static void sums(const type (&v)[16], float* sum) {
    type in[16], half[8], quarter[4], pair[2];
    for (int q = 0; q < 16; ++q) in[4 * (q % 4) + q / 4] = v[q];  // lane q <- v[q]
    for (int q = 0; q < 8; ++q) {
      const type a = in[2 * q], b = in[2 * q + 1];
      half[q] =
          _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int q = 0; q < 4; ++q) {
      const type a = half[2 * q], b = half[2 * q + 1];
      quarter[q] =
          _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    }
    for (int q = 0; q < 2; ++q) {
      const type a = quarter[2 * q], b = quarter[2 * q + 1];
      pair[q] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
    }
    _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_shuffle_ps(pair[0], pair[1], 0x88),
                                        _mm512_shuffle_ps(pair[0], pair[1], 0xDD)));
  }
};

template <>
struct Registers<double> {
  using type = __m512d;
  static type zero() { return _mm512_setzero_pd(); }
  static type load(const double* p) { return kept(_mm512_loadu_pd(p)); }
  static type fma(type a, type b, type c) { return _mm512_fmadd_pd(a, b, c); }
  // the same tree per 8 registers: 8 -> 4 (halves) -> 2 (quarters) -> 1, whose lane 2k + m
  // holds the sum of input 4m + k
  static void sums(const type (&v)[16], double* sum) {
    for (int g = 0; g < 16; g += 8) {
      type in[8], half[4], quarter[2];
      for (int q = 0; q < 8; ++q) in[4 * (q % 2) + q / 2] = v[g + q];  // lane q <- v[g + q]
      for (int q = 0; q < 4; ++q) {
        const type a = in[2 * q], b = in[2 * q + 1];
        half[q] =
            _mm512_add_pd(_mm512_shuffle_f64x2(a, b, 0x44), _mm512_shuffle_f64x2(a, b, 0xEE));
      }
      for (int q = 0; q < 2; ++q) {
        const type a = half[2 * q], b = half[2 * q + 1];
        quarter[q] =
            _mm512_add_pd(_mm512_shuffle_f64x2(a, b, 0x88), _mm512_shuffle_f64x2(a, b, 0xDD));
      }
      _mm512_storeu_pd(sum + g, _mm512_add_pd(_mm512_unpacklo_pd(quarter[0], quarter[1]),
                                              _mm512_unpackhi_pd(quarter[0], quarter[1])));
    }
  }
};

// 16 accumulators whatever R (the unused ones stay zero), summed in one tree
template <int R, typename scalar_t>
inline void dot_tile(const int32_t* member, const scalar_t* g, int64_t stride, const scalar_t* z,
                     const scalar_t* e, int64_t len, double* dz, double* de) {
  using V = Registers<scalar_t>;
  const scalar_t* row[R];
  typename V::type acc[16];  // Σ ḡ·z of member r at r, Σ ḡ·e at 8 + r
  for (int q = 0; q < 16; ++q) acc[q] = V::zero();
  for (int r = 0; r < R; ++r) row[r] = g + member[r] * stride;
  for (int64_t k = 0; k < len; k += kLanes<scalar_t>) {
    const auto zk = V::load(z + k), ek = V::load(e + k);
    for (int r = 0; r < R; ++r) {
      const auto gk = V::load(row[r] + k);
      acc[r] = V::fma(gk, zk, acc[r]);
      acc[8 + r] = V::fma(gk, ek, acc[8 + r]);
    }
  }
  scalar_t sum[16];
  V::sums(acc, sum);
  for (int r = 0; r < R; ++r) {
    dz[member[r]] += sum[r];
    de[member[r]] += sum[8 + r];
  }
}
#else
// One member at a time (tiles of plain vector loops spill or defeat the vectoriser), in whole
// chunks: dot2 is bound by its sums per call more than by memory.
constexpr int kTile = 1;
constexpr int64_t kMinChunk = kChunk;

// Σ over k < len of g[k]·z[k] and g[k]·e[k], added to sz, se
template <typename scalar_t>
inline void dot2(const scalar_t* g, const scalar_t* z, const scalar_t* e, int64_t len,
                 double& sz, double& se) {
  constexpr int64_t L = kLanes<scalar_t>;
  scalar_t acc[4][L] = {};  // four chains: (Z, E) × (even, odd) blocks
  int64_t k = 0;
  for (; k + 2 * L <= len; k += 2 * L) {
    for (int64_t l = 0; l < L; ++l) {
      acc[0][l] = std::fma(g[k + l], z[k + l], acc[0][l]);
      acc[1][l] = std::fma(g[k + l], e[k + l], acc[1][l]);
      acc[2][l] = std::fma(g[k + L + l], z[k + L + l], acc[2][l]);
      acc[3][l] = std::fma(g[k + L + l], e[k + L + l], acc[3][l]);
    }
  }
  if (k < len) {
    for (int64_t l = 0; l < L; ++l) {
      acc[0][l] = std::fma(g[k + l], z[k + l], acc[0][l]);
      acc[1][l] = std::fma(g[k + l], e[k + l], acc[1][l]);
    }
  }
  double rz = 0.0, re = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    rz += acc[0][l] + acc[2][l];
    re += acc[1][l] + acc[3][l];
  }
  sz += rz;
  se += re;
}

template <int R, typename scalar_t>
inline void dot_tile(const int32_t* member, const scalar_t* g, int64_t stride, const scalar_t* z,
                     const scalar_t* e, int64_t len, double* dz, double* de) {
  for (int r = 0; r < R; ++r) {
    dot2(g + member[r] * stride, z, e, len, dz[member[r]], de[member[r]]);
  }
}
#endif

// dot_tile over the members [m, m1) of one slot: tiles of R, then of R/2, … for the rest.
template <int R, typename scalar_t>
inline void dot_members(const int32_t* member, int64_t m, int64_t m1, const scalar_t* g,
                        int64_t stride, const scalar_t* z, const scalar_t* e, int64_t len,
                        double* dz, double* de) {
  for (; m + R <= m1; m += R) dot_tile<R>(member + m, g, stride, z, e, len, dz, de);
  if constexpr (R > 1) dot_members<R / 2>(member, m, m1, g, stride, z, e, len, dz, de);
}

template <typename scalar_t>
void gradient_sweep(const Plan& p, const at::Tensor& history, const at::Tensor& adjoint,
                    int64_t batch, at::Tensor& dz, at::Tensor& de) {
  const int64_t n = adjoint.size(0), steps = adjoint.size(1), width = adjoint.size(2);
  const bool* hist = history.data_ptr<bool>();        // (N, T+1, B)
  const int64_t frames = (steps + 1) * batch;
  const scalar_t* adj = adjoint.data_ptr<scalar_t>();  // (N, T, B')
  double* dz_p = dz.data_ptr<double>();                // (N, N): Σ ḡ_i Z_s
  double* de_p = de.data_ptr<double>();                // (N, N): Σ ḡ_i E_s

  // Each thread takes its presynaptic neurons j in groups and sweeps time chunk by chunk over a
  // group: per slot of each j, its traces over the chunk, then its members' dots in tiles.
  // With register tiles, chunks are short enough that the adjoint of all N neurons over one
  // chunk (kAdjointBytes) stays in L2 while the group's neurons read it.
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t chunk = std::clamp(kAdjointBytes / (n * row_bytes), kMinChunk, kChunk);
  const int64_t group = std::max<int64_t>(1, kSumBytes / (2 * n * sizeof(double)));
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = p.owner_start[begin];
    SlotState state(p.owner_start[end] - first, batch);
    // (2, chunk, B'): Z_s, E_s of one slot over one chunk, each contiguous over (t, b)
    at::Tensor table = at::zeros({2, chunk, width}, adjoint.options());
    scalar_t* z = table.data_ptr<scalar_t>();
    scalar_t* e = z + chunk * width;
    // one group's sums, (j, 2, N): Σ ḡ_i Z_s, Σ ḡ_i E_s of synapse (i, j) at [j - j0][·][i]
    // (contiguous in i, where (N, N) would put one j's members a row apart)
    std::vector<double> sums(group * 2 * n, 0.0);
    for (int64_t j0 = begin; j0 < end; j0 += group) {
      const int64_t j1 = std::min(end, j0 + group);
      for (int64_t t0 = 0; t0 < steps; t0 += chunk) {
        const int64_t len = std::min(chunk, steps - t0);
        for (int64_t j = j0; j < j1; ++j) {
          double* sz = sums.data() + (j - j0) * 2 * n;
          for (int64_t s = p.owner_start[j]; s < p.owner_start[j + 1]; ++s) {
            for (int64_t u = 0; u < len; ++u) {
              advance_slot(p, s, t0 + u, batch, hist + j * frames, state, s - first,
                           z + u * width, e + u * width);
            }
            dot_members<kTile>(p.member, p.member_start[s], p.member_start[s + 1],
                               adj + t0 * width, steps * width, z, e, len * width, sz, sz + n);
          }
        }
      }
      for (int64_t i = 0; i < n; ++i) {  // into (N, N), clearing the sums for the next group
        for (int64_t j = j0; j < j1; ++j) {
          double* sz = sums.data() + (j - j0) * 2 * n + i;
          dz_p[i * n + j] += std::exchange(sz[0], 0.0);
          de_p[i * n + j] += std::exchange(sz[n], 0.0);
        }
      }
    }
  });
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "delrec synaptic kernel: ", what); }

// The slots of each presynaptic neuron j and the synapses that read them (synaptic.py,
// _SlotPlan), from the centres c = 1 + d (N, N) and half-widths w (N,), both float64. A
// synapse's pattern is its closed support [lo, hi] and its ε-boxes (ε = -1 on [lo, rises], +1 on
// [falls, hi]); each distinct pattern of neuron j is one slot, j's slots in pattern order.
// Returns owner_start (N+1), slot_of (N, N) int32, G_s (S,) (the least centre of the slot),
// patterns (S, 4) = (lo, hi, rises, falls), member_start (S+1), member (N²) int32 (postsynaptic
// i, grouped by slot, i ascending) and order (N²) (the row-major index of each member).
std::vector<at::Tensor> plan(const at::Tensor& centre, const at::Tensor& width) {
  check(centre.scalar_type() == at::kDouble && width.scalar_type() == at::kDouble &&
            width.is_contiguous() && centre.dim() == 2 && centre.size(0) == centre.size(1) &&
            width.numel() == centre.size(0),
        "plan needs float64 centres (N, N) and widths (N,)");
  const int64_t n = centre.size(0);
  const at::Tensor by_column = centre.t().contiguous();  // (j, i): one neuron's synapses together
  const double* c = by_column.data_ptr<double>();
  const double* w = width.data_ptr<double>();
  // a pattern packed in 16 bits per field (lo, hi, rises + 1, falls), so that keys sort like
  // the tuples; every field is ≥ 0, the largest is hi
  auto key_of = [](double ci, double wj) -> uint64_t {
    int64_t lo = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(ci - wj)));
    int64_t hi = static_cast<int64_t>(std::floor(ci + wj));
    if (hi < lo) lo = 1, hi = 0;
    const int64_t falls = std::min(std::max(static_cast<int64_t>(std::floor(ci)) + 1, lo), hi + 1);
    const int64_t rises = std::min(std::max(static_cast<int64_t>(std::ceil(ci)) - 1, lo - 1), hi);
    return static_cast<uint64_t>(lo) << 48 | static_cast<uint64_t>(hi) << 32 |
           static_cast<uint64_t>(rises + 1) << 16 | static_cast<uint64_t>(falls);
  };
  const double longest = at::max(centre).item<double>() + at::max(width).item<double>();
  check(std::isfinite(longest) && longest < 65000.0,
        "delays and spreads must be finite and below 65000 steps");

  at::Tensor owner_start = at::empty({n + 1}, at::kLong);
  at::Tensor slot_by_column = at::empty({n, n}, at::kInt);  // (j, i)
  at::Tensor member = at::empty({n * n}, at::kInt);
  at::Tensor order = at::empty({n * n}, at::kLong);
  int64_t* owner = owner_start.data_ptr<int64_t>();
  int32_t* slot = slot_by_column.data_ptr<int32_t>();
  int32_t* member_p = member.data_ptr<int32_t>();
  int64_t* order_p = order.data_ptr<int64_t>();
  std::vector<uint64_t> keys, patterns;  // the distinct keys of one neuron; of all slots
  std::vector<double> least;             // G_s
  std::vector<int64_t> starts{0}, local(n), rank, count;
  owner[0] = 0;
  for (int64_t j = 0, m = 0; j < n; ++j) {
    const double* cj = c + j * n;
    keys.clear();
    for (int64_t i = 0, last = 0; i < n; ++i) {  // neighbours often share a pattern
      const uint64_t key = key_of(cj[i], w[j]);
      if (last >= static_cast<int64_t>(keys.size()) || keys[last] != key) {
        last = std::find(keys.begin(), keys.end(), key) - keys.begin();
        if (last == static_cast<int64_t>(keys.size())) keys.push_back(key);
      }
      local[i] = last;
    }
    // slots in key order; members of each slot in i order (a counting sort)
    const int64_t first_slot = patterns.size();
    patterns.insert(patterns.end(), keys.begin(), keys.end());
    std::sort(patterns.begin() + first_slot, patterns.end());
    rank.resize(keys.size());
    for (size_t k = 0; k < keys.size(); ++k) {
      rank[k] = std::lower_bound(patterns.begin() + first_slot, patterns.end(), keys[k]) -
                (patterns.begin() + first_slot);
    }
    least.resize(patterns.size(), INFINITY);
    count.assign(keys.size() + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++count[rank[local[i]] + 1];
    for (size_t k = 0; k < keys.size(); ++k) {
      count[k + 1] += count[k];
      starts.push_back(m + count[k + 1]);
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rank[local[i]], s = first_slot + r, at = m + count[r]++;
      slot[j * n + i] = static_cast<int32_t>(s);
      least[s] = std::min(least[s], cj[i]);
      member_p[at] = static_cast<int32_t>(i);
      order_p[at] = i * n + j;
    }
    m += n;
    owner[j + 1] = patterns.size();
  }
  const int64_t slots = patterns.size();
  at::Tensor first = at::empty({slots}, at::kDouble);
  at::Tensor pattern_t = at::empty({slots, 4}, at::kLong);
  at::Tensor member_start = at::empty({slots + 1}, at::kLong);
  std::copy(least.begin(), least.end(), first.data_ptr<double>());
  std::copy(starts.begin(), starts.end(), member_start.data_ptr<int64_t>());
  int64_t* field = pattern_t.data_ptr<int64_t>();
  for (int64_t s = 0; s < slots; ++s, field += 4) {
    field[0] = patterns[s] >> 48;
    field[1] = patterns[s] >> 32 & 0xffff;
    field[2] = static_cast<int64_t>(patterns[s] >> 16 & 0xffff) - 1;
    field[3] = patterns[s] & 0xffff;
  }
  return {owner_start, slot_by_column.t().contiguous(), first, pattern_t, member_start, member,
          order};
}

void forward(const at::Tensor& drive, const at::Tensor& a_rows, const at::Tensor& b_rows,
             const at::Tensor& slot_of, const c10::optional<at::Tensor>& mask,
             const at::Tensor& owner_start, const at::Tensor& z_lags, const at::Tensor& z_coef,
             const at::Tensor& e_lags, const at::Tensor& support, const at::Tensor& member_start,
             const at::Tensor& member, double leak, double v0, double threshold, double v_reset, bool soft_reset,
             at::Tensor spikes, at::Tensor history, at::Tensor membrane) {
  const int64_t n = drive.size(2);
  check(drive.is_contiguous() && drive.dim() == 3 && a_rows.is_contiguous() &&
            b_rows.is_contiguous() && a_rows.numel() == n * n && b_rows.numel() == n * n,
        "drive (T, B, N) and coefficients (N, N) must be contiguous");
  check(slot_of.is_contiguous() && slot_of.scalar_type() == at::kInt && slot_of.numel() == n * n,
        "slot_of must be a contiguous (N, N) int32 tensor");
  const Plan p = plan_of(owner_start, z_lags, z_coef, e_lags, support, member_start, member);
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const LIFConstants lif{leak, v0, threshold, v_reset, soft_reset, false};
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "delrec_synaptic_forward", [&] {
    forward_loop<scalar_t>(p, drive, a_rows, b_rows, slot_of, mask_c, lif, spikes, history,
                           membrane);
  });
}

void backward(const at::Tensor& grad_spikes, const at::Tensor& history,
              const at::Tensor& membrane, const at::Tensor& psi, const at::Tensor& a_members,
              const at::Tensor& b_members, const c10::optional<at::Tensor>& mask,
              const c10::optional<at::Tensor>& counts, const at::Tensor& owner_start,
              const at::Tensor& z_lags, const at::Tensor& z_coef, const at::Tensor& e_lags,
              const at::Tensor& support, const at::Tensor& member_start,
              const at::Tensor& member, double leak, double threshold, double v_reset,
              bool soft_reset, bool detach_reset, int64_t ring, at::Tensor grad_h,
              at::Tensor adjoint, at::Tensor by_support) {
  check(grad_spikes.is_contiguous() && membrane.is_contiguous() && psi.is_contiguous() &&
            a_members.is_contiguous() && b_members.is_contiguous(),
        "sequences and coefficients must be contiguous");
  check(by_support.scalar_type() == at::kDouble, "by_support must be float64");
  check(!counts.has_value() || counts->scalar_type() == at::kInt, "counts must be int32");
  const Plan p = plan_of(owner_start, z_lags, z_coef, e_lags, support, member_start, member);
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor counts_c = counts.has_value() ? counts->contiguous() : at::Tensor();
  const LIFConstants lif{leak, 0.0, threshold, v_reset, soft_reset, detach_reset};
  AT_DISPATCH_FLOATING_TYPES(membrane.scalar_type(), "delrec_synaptic_backward", [&] {
    backward_loop<scalar_t>(p, grad_spikes, history, membrane, psi, a_members, b_members, mask_c,
                            counts_c, lif, ring, grad_h, adjoint, by_support);
  });
}

void gradients(const at::Tensor& history, const at::Tensor& adjoint, int64_t batch,
               const at::Tensor& owner_start, const at::Tensor& z_lags,
               const at::Tensor& z_coef, const at::Tensor& e_lags, const at::Tensor& support,
               const at::Tensor& member_start, const at::Tensor& member, at::Tensor dz,
               at::Tensor de) {
  check(adjoint.is_contiguous() && adjoint.dim() == 3 &&
            adjoint.size(2) * adjoint.element_size() % 64 == 0 &&
            dz.scalar_type() == at::kDouble && de.scalar_type() == at::kDouble,
        "adjoint must be contiguous (N, T, B') with B' a whole number of cache lines, the sums "
        "(N, N) float64");
  const Plan p = plan_of(owner_start, z_lags, z_coef, e_lags, support, member_start, member);
  AT_DISPATCH_FLOATING_TYPES(adjoint.scalar_type(), "delrec_synaptic_gradients", [&] {
    gradient_sweep<scalar_t>(p, history, adjoint, batch, dz, de);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: fused time loops of the synaptic-delay engine (slot traces)";
  m.def("plan", &plan, "the slots of each neuron and the synapses that read them");
  m.def("forward", &forward, "spikes, spike history and membrane of a synaptic-delay LIF layer");
  m.def("backward", &backward, "reverse loop: ∂L/∂h, the adjoint ∂L/∂r (N, T, B), Σ K·x");
  m.def("gradients", &gradients, "per-synapse sums Σ ḡ·Z and Σ ḡ·E over time and batch");
}
