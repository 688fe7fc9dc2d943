// The time loops of the synaptic-delay engine (delrec/engine/synaptic.py), fused.
//
// Synapse (i, j) with centre c = 1 + d_ij reads, instead of its own kernel, one row of a ring
// of its presynaptic neuron j (docs/design.md#synaptic-delays-by-shifted-reads): the
// synapses of j fall into at most four classes (the pattern of c translated to (w, w+1]) and
// levels m = ⌈c - w⌉ - 1, and all levels of a class are read from one ring indexed by diagonal
// u = t - m, each row holding (Z, E) over the batch:
//     r_i[t] = Σ_j a_ij Z[row t - m_ij] + b_ij E[row t - m_ij]
// (a = gain·W, b = gain·W·(c - G_p - m)/w²). Per class and step, one triangle and ε-box
// recursion enters the lowest used level m_a (float64 state; E exact), a chain of lag-0 terms
// carries the rows up to level 0 (at most ⌈w⌉ stages, one rounding in scalar_t each), and rows
// of levels ≥ 0 never change again: the work per step does not depend on the delay range.
//
// The recursions and sums run neuron-major ((N, T+1, B) spike history and prefix counts, rings
// and adjoint (N, T', B') of ∂L/∂r, B' padded to whole cache lines) so that batch rows are
// contiguous; the LIF update and its adjoint run batch-major (T, B, N) like the layer's
// sequences and its saved membrane, each step transposing 16-neuron blocks.
//
// plan:      classes, levels and slots (class, level) of every neuron and what each synapse reads.
// forward:   per step, each class's entry recursion and chain into its ring, then r_i gathered per
//            postsynaptic neuron (sums in registers, the rings of a block of presynaptic neurons
//            in L1; synapses far above the chain read in blocks of kSpan steps), then the LIF
//            update. On one thread the rings advance block by block, just before the sums.
// backward:  per reverse step, the adjoint of the spikes (one float64 recursion per neuron fed by
//            a float64 ring of injections, plus one-off lag-1 terms), the LIF adjoint, the slot
//            sums of a·ḡ and b·ḡ added into each class's adjoint ring at row t - m (far slots once
//            per block), then per class the chain's lag-1 term and the entry row's injections at
//            its taps, and Σ K·x (near sums and class steps by groups of presynaptic neurons).
// gradients: a second forward sweep of the classes, in chunks of time, dotting each level's
//            values with the stored adjoint: D0_ij = Σ ḡ_i Z, D1_ij = Σ ḡ_i E, then ∂L/∂W and
//            ∂L/∂d.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <new>
#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "lif.h"

namespace {

using delrec::charge_and_fire;
using delrec::LIFConstants;
using delrec::LIFUpdate;
using delrec::SurrogateDerivative;

// the sums of the forward and backward: vector blocks of a batch row summed at once, and the
// bytes of ring rows (forward) or adjoint rows (backward) a block of neurons keeps in L1
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kColumnBytes = 1 << 15;
// the gradient sweep: longest chunk of time, the adjoint over one chunk (all neurons) that is
// kept in cache, the per-synapse sums of one group of neurons and the class states (entry
// recursions, chain rows, stage histories) of one group
constexpr int64_t kChunk = 64;
constexpr int64_t kAdjointBytes = 1 << 20;
constexpr int64_t kSumBytes = 1 << 18;
constexpr int64_t kStateBytes = 1 << 21;

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

// An empty asm keeps a loaded vector in a register: GCC would otherwise fold the load into every
// FMA that reads it (one load per FMA instead of one per vector block). With AVX-512 only, where
// a vector is one register.
template <typename V>
inline V kept(V x) {
#if defined(__AVX512F__)
  asm("" : "+v"(x));
#endif
  return x;
}

#if defined(__GNUC__) && !defined(__clang__)
#define DELREC_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define DELREC_CONTRACT
#endif

void check(bool ok, const char* what) { TORCH_CHECK(ok, "delrec synaptic kernel: ", what); }

// Buffers of whole cache lines: a vector block of a batch row is then one aligned load (a load
// across two lines costs about twice as much, and the sums are bound by loads).
template <typename T>
struct CacheLines {
  using value_type = T;
  CacheLines() = default;
  template <typename U>
  CacheLines(const CacheLines<U>&) {}
  T* allocate(size_t count) {
    void* p = ::operator new(count * sizeof(T), std::align_val_t(64));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLines<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLines<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLines<T>>;

// The plan (synaptic.py, _SlotPlan.native). Classes are grouped by neuron, slots by class (levels
// ascending), members by slot (postsynaptic i ascending). Per class p: levels (m_a, m_b, m_top) =
// the lowest used level (where the entry recursion runs), the top chain stage and the highest
// used level; the entry's triangle taps (lags, increments of z and of its slope) and ε-box taps
// (signs -, +, +, -), its closed support [lo, hi]; its chain stages m_a+1 … m_b with the lag-0
// values (a, e, χ) of the level below each. Rings have `depth` rows per class: diagonal u is
// row u mod depth (see ring_row_at).
struct Plan {
  int64_t n, classes, slots, depth, lowest;
  const int64_t* class_start;   // (N+1): classes of neuron j
  const int64_t* slot_start;    // (C+1): slots of class p
  const int64_t* slot_level;    // (S): level m of the slot
  const int64_t* levels;        // (C, 3): m_a, m_b, m_top
  const int64_t* z_lags;        // (C, 3)
  const double* z_coef;         // (C, 6): γ₀ γ₁ γ₂ δ₀ δ₁ δ₂ (already / w²)
  const int64_t* e_lags;        // (C, 4)
  const int64_t* support;       // (C, 2): lo, hi
  const int64_t* chain_start;   // (C+1): chain stages of class p
  const double* chain;          // (stages, 3): a, e, χ of the level below the stage
  const int64_t* member_start;  // (S+1)
  const int32_t* member;        // (N²): postsynaptic i of each member, grouped by slot

  int64_t m_a(int64_t c) const { return levels[3 * c]; }
  int64_t m_b(int64_t c) const { return levels[3 * c + 1]; }
  int64_t m_top(int64_t c) const { return levels[3 * c + 2]; }
  // rows of the class's chain stages m_a … m_b (a ring by diagonal)
  int64_t stages(int64_t c) const { return m_b(c) - m_a(c) + 1; }
  // the ring row of diagonal t - lowest: (t - lowest) mod depth, in [0, depth) also while
  // t < lowest (when every delay exceeds the half-width)
  int64_t head_at(int64_t t) const { return ((t - lowest) % depth + depth) % depth; }
  // the ring row (within a class's `depth` rows) that level m reads at time t, diagonal t - m,
  // where head = head_at(t)
  int64_t ring_row_at(int64_t head, int64_t m) const {
    const int64_t row = head - (m - lowest);
    return row < 0 ? row + depth : row;
  }
};

Plan plan_of(const std::vector<at::Tensor>& t, int64_t depth, int64_t lowest) {
  check(t.size() == 12, "the plan has 12 tensors");
  const at::Tensor &class_start = t[0], &slot_start = t[1], &slot_level = t[2], &levels = t[3],
                   &z_lags = t[4], &z_coef = t[5], &e_lags = t[6], &support = t[7],
                   &chain_start = t[8], &chain = t[9], &member_start = t[10], &member = t[11];
  for (const at::Tensor& x : t) {
    check(x.is_contiguous() && x.device().is_cpu(), "plan tensors must be contiguous CPU tensors");
  }
  for (const at::Tensor* x : {&class_start, &slot_start, &slot_level, &levels, &z_lags, &e_lags,
                              &support, &chain_start, &member_start}) {
    check(x->scalar_type() == at::kLong, "plan offsets, levels and lags must be int64");
  }
  check(z_coef.scalar_type() == at::kDouble && chain.scalar_type() == at::kDouble,
        "plan coefficients must be float64");
  check(member.scalar_type() == at::kInt, "members must be int32");
  const int64_t n = class_start.numel() - 1, c = levels.size(0), s = slot_level.numel();
  check(slot_start.numel() == c + 1 && chain_start.numel() == c + 1 &&
            member_start.numel() == s + 1 && member.numel() == n * n && z_coef.size(0) == c &&
            chain.size(0) == chain_start[c].item<int64_t>(),
        "plan sizes disagree");
  check(depth >= 1, "ring depth must be positive");
  return {n,
          c,
          s,
          depth,
          lowest,
          class_start.data_ptr<int64_t>(),
          slot_start.data_ptr<int64_t>(),
          slot_level.data_ptr<int64_t>(),
          levels.data_ptr<int64_t>(),
          z_lags.data_ptr<int64_t>(),
          z_coef.data_ptr<double>(),
          e_lags.data_ptr<int64_t>(),
          support.data_ptr<int64_t>(),
          chain_start.data_ptr<int64_t>(),
          chain.data_ptr<double>(),
          member_start.data_ptr<int64_t>(),
          member.data_ptr<int32_t>()};
}

// The entry recursions of one class over a batch row: z and its slope D/w² (float64, three
// triangle taps x) and E (exact, four ε-box taps y); taps are 0/1 bytes. Writes z (rounded once
// to scalar_t) into z_out and E into e_out. Out of line: with its own restrict pointers the
// compiler vectorises it, inlined it doesn't.
template <typename scalar_t>
__attribute__((noinline)) void entry_step(
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

// One chain stage over a batch row: z += a·s, e += ε·s for the newest spikes s (0/1).
template <typename scalar_t>
__attribute__((noinline)) void chain_step(const scalar_t* __restrict s, scalar_t a, scalar_t eps,
                                          int64_t batch, scalar_t* __restrict z,
                                          scalar_t* __restrict e) {
  for (int64_t b = 0; b < batch; ++b) {
    z[b] += a * s[b];
    e[b] += eps * s[b];
  }
}

// The newest spikes of a neuron (0/1 bytes) as scalar_t.
template <typename scalar_t>
__attribute__((noinline)) void widen(const uint8_t* __restrict s, int64_t batch,
                                     scalar_t* __restrict out) {
  for (int64_t b = 0; b < batch; ++b) out[b] = static_cast<scalar_t>(s[b]);
}

// The state of a class's entry recursions over the batch: z and its slope D/w² (float64), E.
struct ClassState {
  double *z, *d;
  int32_t* e;
};

// The states of classes [c0, c1) in one zeroed buffer (rows of `width`), class after class, so
// that a sweep over the neurons reads them in order.
struct ClassStates {
  Buffer<double> values;
  Buffer<int32_t> counts;
  std::vector<ClassState> states;
  int64_t first;

  ClassStates(int64_t c0, int64_t c1, int64_t width)
      : values(2 * (c1 - c0) * width, 0.0), counts((c1 - c0) * width, 0), first(c0) {
    for (int64_t c = c0; c < c1; ++c) {
      double* at = values.data() + 2 * (c - c0) * width;
      states.push_back({at, at + width, counts.data() + (c - c0) * width});
    }
  }
  ClassState& operator[](int64_t c) { return states[c - first]; }
};

// The row (within `stages` rows by diagonal) of diagonal t - m_b: the chain rows of a class
// hold diagonals t - m_b … t - m_a, diagonal t - m at row chain_row + (m_b - m) (mod stages).
inline int64_t chain_row(const Plan& p, int64_t c, int64_t t) {
  const int64_t stages = p.stages(c);
  return ((t - p.m_b(c)) % stages + stages) % stages;
}

// Advances class c of neuron j (spike history `history_j`, (T+1, B), frame t+1 = step t; its
// spikes at t - 1 as scalar_t `newest`) to time t: the chain stages of diagonals t - m_b …
// t - m_a + 1 (one rounding in scalar_t each), then the entry recursion into stage m_a of
// diagonal t - m_a. row(m) points at the (Z, E) row of diagonal t - m (Z, then E at +width: the
// caller's storage, a ring or the chain rows).
template <typename scalar_t, typename Row>
void advance_class(const Plan& p, int64_t c, int64_t t, int64_t batch, int64_t width,
                   const bool* history_j, const scalar_t* newest, ClassState& st,
                   const Row& row) {
  auto frame = [&](int64_t lag) {  // as bytes: the compiler vectorises byte loads, not bool
    return reinterpret_cast<const uint8_t*>(history_j) + std::max<int64_t>(t - lag + 1, 0) * batch;
  };
  const int64_t m_a = p.m_a(c);
  for (int64_t m = p.m_b(c); m > m_a; --m) {  // s[t - 1] reaches every stage
    const double* stage = p.chain + 3 * (p.chain_start[c] + m - m_a - 1);
    scalar_t* z = row(m);
    chain_step(newest, static_cast<scalar_t>(stage[0]), static_cast<scalar_t>(stage[1]), batch,
               z, z + width);
  }
  const int64_t* zl = p.z_lags + 3 * c;
  const int64_t* el = p.e_lags + 4 * c;
  scalar_t* z = row(m_a);
  entry_step(frame(zl[0]), frame(zl[1]), frame(zl[2]), frame(el[0]), frame(el[1]), frame(el[2]),
             frame(el[3]), p.z_coef + 6 * c, batch, st.z, st.d, st.e, z, z + width);
}

// ψ'(h - θ) over `count` neurons (surrogates 1 and 2).
template <typename scalar_t>
__attribute__((noinline)) void surrogate_row(const SurrogateDerivative<scalar_t> derivative,
                                             scalar_t threshold, const scalar_t* __restrict h,
                                             scalar_t* __restrict psi, int64_t count) {
  for (int64_t i = 0; i < count; ++i) psi[i] = derivative(h[i] - threshold);
}

// The LIF adjoint over `count` neurons of one batch row: ∂L/∂h[t] into gh (which held
// ∂L/∂h[t+1]), times the input gain into grad_current (∂L/∂c) and times the mask (may be null)
// into masked; grad_s: the spikes' adjoint from the next layer, from_rec: from the recurrence.
template <typename scalar_t>
__attribute__((noinline)) void adjoint_row(const LIFUpdate<scalar_t> neuron, scalar_t gain,
                                           const scalar_t* __restrict h,
                                           const scalar_t* __restrict psi,
                                           const scalar_t* __restrict grad_s,
                                           const scalar_t* __restrict from_rec,
                                           const scalar_t* __restrict mask,
                                           scalar_t* __restrict gh,
                                           scalar_t* __restrict grad_current,
                                           scalar_t* __restrict masked, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t g =
        neuron.adjoint(grad_s[i] + from_rec[i], gh[i], h[i], neuron.fires(h[i]), psi[i]);
    grad_current[i] = g * gain;
    gh[i] = g;
    masked[i] = mask ? g * mask[i] : g;
  }
}

// Neurons per block of a transposition between neuron-major rows (N, B') and batch-major
// (B, N) sequences: a cache line of float32 per batch row.
constexpr int64_t kBlock = 16;

// Asks for the cache lines of the kBlock scalars at p (for writing if `write`). The LIF loops
// below read and write the batch-major sequences one block of neurons per batch row, rows
// N scalars apart, each line once per step: the hardware does not foresee that stride, so each
// block prefetches the same batch row's next block.
template <typename scalar_t>
inline void prefetch_block(const scalar_t* p, bool write) {
  for (int64_t l = 0; l < kBlock; l += kLanes<scalar_t>) {
    if (write) {
      __builtin_prefetch(p + l, 1);
    } else {
      __builtin_prefetch(p + l);
    }
  }
}

// In parallel (ATen's intra-op threads), each thread a range of whole blocks of kBlock neurons:
// on_range(i0, i1) on the thread's range, then on_block(i0, i1) on each of its blocks.
template <typename Range, typename Block>
void for_each_range(int64_t n, const Range& on_range, const Block& on_block) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    on_range(begin * kBlock, std::min(n, end * kBlock));
    for (int64_t block = begin; block < end; ++block) {
      on_block(block * kBlock, std::min(n, (block + 1) * kBlock));
    }
  });
}

// on_block(i0, i1) on blocks of kBlock neurons, in parallel.
template <typename Block>
void for_each_block(int64_t n, const Block& on_block) {
  for_each_range(n, [](int64_t, int64_t) {}, on_block);
}

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

// One synapse as the forward's sums read it: its class's first ring row, its level minus the
// plan's lowest (the ring row it reads at time t is row + Plan::ring_row_at), a = gain·W and
// b = gain·W·(c - G_p - m)/w².
template <typename scalar_t>
struct ForwardSynapse {
  int32_t row, level;
  scalar_t a, b;
};

// The coefficients of synapse k (row-major (i, j)) as the sums read them: a = gain·W and
// b = gain·W·(c - G_p - m)/w² (the offset in float64, rounded once into scalar_t).
template <typename scalar_t>
struct Coefficients {
  const scalar_t* weight;  // (N, N)
  const double* offset;    // (N, N)
  scalar_t gain;

  scalar_t a(int64_t k) const { return weight[k] * gain; }
  scalar_t b(int64_t k) const {
    return static_cast<scalar_t>(static_cast<double>(a(k)) * offset[k]);
  }
};

// Steps of a time block: a synapse whose level is at least kSpan above its class's top chain
// stage ("far") reads, at the first step t0 of a block, rows that are final for the whole
// block (diagonals up to t0 + kSpan - 1 - m ≤ t0 - m_b), so the forward sums its input to
// steps t0 … t0 + kSpan - 1 at once, and the backward adds its slot sums of a block at once
// (rows t - m are consumed at reverse step t - m + m_b at the earliest, after the block): each
// synapse's rows of a block are consecutive, and a neuron's rings are read once per block.
constexpr int64_t kSpan = 8;

// Whether a slot is far (see kSpan).
inline bool far_slot(const Plan& p, int64_t c, int64_t s) {
  return p.slot_level[s] - p.m_b(c) >= kSpan;
}

// The forward's synapses of one kind (near or far) in the order its sums read them: column
// blocks of presynaptic neurons, postsynaptic i, presynaptic j; row i of column block c holds
// synapses [start[c·N + i], start[c·N + i + 1]). A column block's rings stay in L1
// (kColumnBytes) unless its rows would then hold fewer than kRowSynapses synapses on average
// (each row's sums are stored once per block): then it grows up to kColumnBytes·kColumnGrowth.
constexpr int64_t kRowSynapses = 8;
constexpr int64_t kColumnGrowth = 8;

template <typename scalar_t>
struct SynapseList {
  std::vector<int64_t> columns{0}, start{0};
  std::vector<ForwardSynapse<scalar_t>> synapses;

  // bytes(j): the ring bytes neuron j's synapses of this kind read at once; keep(s): the kind
  SynapseList(const Plan& p, const int32_t* slot, const Coefficients<scalar_t>& coef,
              const std::vector<int64_t>& class_of, const std::function<int64_t(int64_t)>& bytes,
              const std::function<bool(int64_t)>& keep) {
    const int64_t n = p.n;
    std::vector<int64_t> kept(n, 0);  // synapses of this kind per presynaptic neuron
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) kept[j] += keep(slot[i * n + j]);
    }
    for (int64_t j = 0, used = 0, count = 0; j < n; ++j) {
      const int64_t more = used + bytes(j);
      if (j > columns.back() && more > kColumnBytes &&
          (count >= kRowSynapses * n || more > kColumnBytes * kColumnGrowth)) {
        columns.push_back(j);
        used = count = 0;
      }
      used += bytes(j);
      count += kept[j];
    }
    columns.push_back(n);
    for (size_t c = 0; c + 1 < columns.size(); ++c) {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = columns[c]; j < columns[c + 1]; ++j) {
          const int32_t s = slot[i * n + j];
          if (!keep(s)) continue;
          synapses.push_back({static_cast<int32_t>(class_of[s] * p.depth),
                              static_cast<int32_t>(p.slot_level[s] - p.lowest),
                              coef.a(i * n + j), coef.b(i * n + j)});
        }
        start.push_back(synapses.size());
      }
    }
  }
  bool empty() const { return synapses.empty(); }
};

// For each of `rows` postsynaptic neurons (synapses [start[i], start[i+1]) of `synapse`):
// r += Σ a·Z + b·E over NB vector blocks of the batch, where ring points at the first lane of
// the (C·depth, 2, width) rings, `head` = (t - lowest) mod depth and r advances by width per
// neuron. The sums stay in registers, in two sets (even and odd synapses) so that 4·NB chains
// of FMAs run at once; each Z, E block is one load.
template <typename scalar_t, int NB>
__attribute__((noinline)) DELREC_CONTRACT void gather_rows(
    const scalar_t* __restrict ring, int64_t width, int64_t head, int64_t depth,
    const ForwardSynapse<scalar_t>* __restrict synapse, const int64_t* __restrict start,
    int64_t rows, scalar_t* __restrict r) {
  constexpr int64_t L = kLanes<scalar_t>;
  auto at = [&](const ForwardSynapse<scalar_t>& s) {
    int64_t row = head - s.level;
    row += row < 0 ? depth : 0;
    return ring + (s.row + row) * 2 * width;
  };
  for (int64_t i = 0; i < rows; ++i, r += width) {
    Vec<scalar_t> by_z[2][NB] = {}, by_e[2][NB] = {};
    int64_t k = start[i];
    const int64_t end = start[i + 1];
    for (; k + 2 <= end; k += 2) {
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u) {
        const scalar_t* z = at(synapse[k + u]);
        const scalar_t a = synapse[k + u].a, b = synapse[k + u].b;
#pragma GCC unroll 4
        for (int q = 0; q < NB; ++q) {
          by_z[u][q] += a * load(z + q * L);
          by_e[u][q] += b * load(z + width + q * L);
        }
      }
    }
    if (k < end) {
      const scalar_t* z = at(synapse[k]);
      const scalar_t a = synapse[k].a, b = synapse[k].b;
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) {
        by_z[0][q] += a * load(z + q * L);
        by_e[0][q] += b * load(z + width + q * L);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      store(r + q * L, load(r + q * L) + ((by_z[0][q] + by_z[1][q]) + (by_e[0][q] + by_e[1][q])));
    }
  }
}

// The backward's far sums prefetch the adjoint ring rows of the slot kAhead places ahead: at long
// delay ranges the rings outgrow the cache, and the slots' rows are in no order the hardware
// foresees. (The forward's far sums read a column block's rings from L2; prefetching them there
// measured slower.)
constexpr int64_t kAhead = 4;

// Prefetches the cache lines of a (Z, E) ring row that a lane group of `lanes` scalars reads.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t width, int64_t lanes) {
  for (int64_t l = 0; l < lanes; l += kLanes<scalar_t>) {
    __builtin_prefetch(row + l);
    __builtin_prefetch(row + width + l);
  }
}

// Steps of a block the far sums keep in registers at once: Q·NB accumulators (≤ 16).
template <int NB>
constexpr int kFarSteps = NB <= 2 ? 8 : 4;

// The far synapses' input to steps t0 + q0 … t0 + q0 + Q - 1 of a block: for each of `rows`
// postsynaptic neurons, future (rows of (kSpan, width), at the first lane) += Σ a·Z + b·E over
// the Q consecutive rows of each synapse, `head` = (t0 - lowest) mod depth.
template <typename scalar_t, int NB, int Q>
__attribute__((noinline)) DELREC_CONTRACT void gather_far(
    const scalar_t* __restrict ring, int64_t width, int64_t head, int64_t depth, int64_t q0,
    const ForwardSynapse<scalar_t>* __restrict synapse, const int64_t* __restrict start,
    int64_t rows, scalar_t* __restrict future) {
  constexpr int64_t L = kLanes<scalar_t>;
  for (int64_t i = 0; i < rows; ++i) {
    Vec<scalar_t> acc[Q][NB] = {};
    for (int64_t k = start[i]; k < start[i + 1]; ++k) {
      const ForwardSynapse<scalar_t> s = synapse[k];
      int64_t row = head + q0 - s.level;  // diagonal t0 + q0 - m
      row += row < 0 ? depth : 0;
      row -= row >= depth ? depth : 0;
      const scalar_t* base = ring + static_cast<int64_t>(s.row) * 2 * width;
#pragma GCC unroll 8
      for (int q = 0; q < Q; ++q) {
        const scalar_t* z = base + row * 2 * width;
#pragma GCC unroll 4
        for (int v = 0; v < NB; ++v) {
          acc[q][v] += s.a * load(z + v * L);
          acc[q][v] += s.b * load(z + width + v * L);
        }
        row = row + 1 == depth ? 0 : row + 1;
      }
    }
    scalar_t* f = future + (i * kSpan + q0) * width;
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
#pragma GCC unroll 4
      for (int v = 0; v < NB; ++v) {
        store(f + q * width + v * L, load(f + q * width + v * L) + acc[q][v]);
      }
    }
  }
}

template <typename scalar_t>
void forward_loop(const Plan& p, const at::Tensor& drive, const Coefficients<scalar_t>& coef,
                  const at::Tensor& slot_of, const at::Tensor& mask, const LIFConstants& lif,
                  at::Tensor& spikes_out, at::Tensor& history, at::Tensor& membrane) {
  const int64_t steps = drive.size(0), batch = drive.size(1), n = drive.size(2);
  const int64_t nb = n * batch;
  const bool has_mask = mask.defined();
  const scalar_t* drive_p = drive.data_ptr<scalar_t>();  // (T, B, N)
  const int32_t* slot = slot_of.data_ptr<int32_t>();     // (N, N): the slot synapse (i, j) reads
  const scalar_t* mask_p = has_mask ? mask.data_ptr<scalar_t>() : nullptr;  // (B, N)
  scalar_t* spikes_p = spikes_out.data_ptr<scalar_t>();  // (T, B, N)
  bool* hist = history.data_ptr<bool>();                 // (N, T+1, B)
  const int64_t frames = (steps + 1) * batch;            // one neuron's history
  scalar_t* membrane_p = membrane.data_ptr<scalar_t>();  // (T, B, N)

  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t width = padded<scalar_t>(batch);
  const int64_t group = std::min(width, kGroupBlocks * L);  // batch lanes summed in one pass
  const int64_t row_bytes = 2 * group * static_cast<int64_t>(sizeof(scalar_t));
  std::vector<int64_t> class_of(p.slots);
  for (int64_t c = 0; c < p.classes; ++c) {
    std::fill(class_of.begin() + p.slot_start[c], class_of.begin() + p.slot_start[c + 1], c);
  }
  auto is_far = [&](int64_t s) { return far_slot(p, class_of[s], s); };
  // near synapses: the ring rows a neuron's near slots read at one step; far synapses: the rows
  // a neuron's far slots read in one block
  const SynapseList<scalar_t> near(
      p, slot, coef, class_of,
      [&](int64_t j) {
        int64_t used = 0;
        for (int64_t s = p.slot_start[p.class_start[j]]; s < p.slot_start[p.class_start[j + 1]];
             ++s) {
          used += !is_far(s);
        }
        return used * row_bytes;
      },
      [&](int64_t s) { return !is_far(s); });
  const SynapseList<scalar_t> far(
      p, slot, coef, class_of,
      [&](int64_t j) {
        int64_t rows = 0;
        for (int64_t c = p.class_start[j]; c < p.class_start[j + 1]; ++c) {
          int64_t low = INT64_MAX;
          for (int64_t s = p.slot_start[c]; s < p.slot_start[c + 1]; ++s) {
            if (far_slot(p, c, s)) low = std::min(low, p.slot_level[s]);
          }
          if (low != INT64_MAX) rows += p.m_top(c) - low + kSpan;
        }
        return rows * row_bytes;
      },
      is_far);
  // the rings (C·depth rows of Z then E, B' lanes each) and the class states
  Buffer<scalar_t> ring(p.classes * p.depth * 2 * width, scalar_t(0));
  ClassStates state(0, p.classes, width);
  // the far synapses' input to the steps of the current block, (N, kSpan, B')
  Buffer<scalar_t> future(far.empty() ? 0 : n * kSpan * width, scalar_t(0));
  Buffer<scalar_t> recurrent(n * width);  // (N, B'): r_i at t
  std::vector<scalar_t> v(nb, static_cast<scalar_t>(lif.v0));  // (B, N)
  const LIFUpdate<scalar_t> neuron(lif);
  for (int64_t j = 0; j < n; ++j) std::fill_n(hist + j * frames, batch, false);
  // On one thread, each step advances the rings column block by column block, just before the
  // near sums read that block's rows (still in cache then; all rings at once outgrow L2 at
  // N = 512). The far sums at a block's first step read only diagonals the step does not
  // write (kSpan). On several threads every thread's sums read every column block, so the
  // rings advance first, in parallel.
  const bool fused = at::get_num_threads() == 1;

  for (int64_t t = 0; t < steps; ++t) {
    const int64_t head = p.head_at(t);
    auto advance = [&](int64_t j0, int64_t j1) {  // the rings of neurons j0 … j1 - 1 at t
      Buffer<scalar_t> newest(width);
      for (int64_t j = j0; j < j1; ++j) {
        widen(reinterpret_cast<const uint8_t*>(hist + j * frames + t * batch), batch,
              newest.data());
        for (int64_t c = p.class_start[j]; c < p.class_start[j + 1]; ++c) {
          scalar_t* rows = ring.data() + c * p.depth * 2 * width;
          advance_class<scalar_t>(p, c, t, batch, width, hist + j * frames, newest.data(),
                                  state[c], [&](int64_t m) {
                                    return rows + p.ring_row_at(head, m) * 2 * width;
                                  });
        }
      }
    };
    if (!fused) at::parallel_for(0, n, 1, advance);
    const int64_t now = t * nb;
    // the sums over all of a thread's neurons at once (each column block's rings in L1 once
    // per step), then the LIF update block by block
    for_each_range(n, [&](int64_t i0, int64_t i1) {
      const int64_t q = t % kSpan;
      if (!far.empty() && q == 0) {  // the far synapses' input to this block
        std::fill(future.begin() + i0 * kSpan * width, future.begin() + i1 * kSpan * width,
                  scalar_t(0));
        for (int64_t lane = 0; lane < width; lane += group) {
          with_blocks(std::min(group, width - lane) / L, [&](auto nb) {
            constexpr int NB = decltype(nb)::value;
            constexpr int Q = kFarSteps<NB>;
            for (size_t c = 0; c + 1 < far.columns.size(); ++c) {
              for (int64_t q0 = 0; q0 < kSpan; q0 += Q) {
                gather_far<scalar_t, NB, Q>(ring.data() + lane, width, head, p.depth, q0,
                                            far.synapses.data(), far.start.data() + c * n + i0,
                                            i1 - i0, future.data() + i0 * kSpan * width + lane);
              }
            }
          });
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* r = recurrent.data() + i * width;
        if (far.empty()) {
          std::fill_n(r, width, scalar_t(0));
        } else {
          std::copy_n(future.data() + (i * kSpan + q) * width, width, r);
        }
      }
      for (int64_t lane = 0; lane < width; lane += group) {
        const int64_t blocks = std::min(group, width - lane) / L;
        for (size_t c = 0; c + 1 < near.columns.size(); ++c) {
          if (fused && lane == 0) advance(near.columns[c], near.columns[c + 1]);
          with_blocks(blocks, [&](auto nb) {
            gather_rows<scalar_t, decltype(nb)::value>(
                ring.data() + lane, width, head, p.depth, near.synapses.data(),
                near.start.data() + c * n + i0, i1 - i0, recurrent.data() + i0 * width + lane);
          });
        }
      }
    }, [&](int64_t i0, int64_t i1) {
      // the LIF update, batch-major (T, B, N) like the layer's sequences
      for (int64_t b = 0; b < batch; ++b) {
        scalar_t rec[kBlock];
        for (int64_t i = i0; i < i1; ++i) rec[i - i0] = recurrent[i * width + b];
        const int64_t at = now + b * n + i0;
        if (i1 < n) {  // the next block's lines (prefetch_block)
          prefetch_block(drive_p + at + kBlock, false);
          prefetch_block(membrane_p + at + kBlock, true);
          prefetch_block(spikes_p + at + kBlock, true);
        }
        if (has_mask) {
          charge_and_fire<scalar_t, true, false>(neuron, drive_p + at, mask_p + b * n + i0, rec,
                                                 v.data() + b * n + i0, membrane_p + at,
                                                 spikes_p + at, nullptr, i1 - i0);
        } else {
          charge_and_fire<scalar_t, false, false>(neuron, drive_p + at, nullptr, rec,
                                                  v.data() + b * n + i0, membrane_p + at,
                                                  spikes_p + at, nullptr, i1 - i0);
        }
      }
      for (int64_t i = i0; i < i1; ++i) {  // spikes, into the neuron-major history
        bool* row = hist + i * frames + (t + 1) * batch;
        for (int64_t b = 0; b < batch; ++b) row[b] = spikes_p[now + b * n + i] != scalar_t(0);
      }
    });
  }
}

// One member as the backward's sums read it: postsynaptic i, a and b.
template <typename scalar_t>
struct Member {
  int32_t index;
  scalar_t a, b;
};

// For the slots s = slots[0 … count): x += Σ a·ḡ_i and e += Σ b·ḡ_i over NB vector blocks, the
// sums over the members [cut[s·stride], cut[s·stride + 1]) of slot s (`member`: row i of g, a,
// b), added to the adjoint ring row to[s] (x at +0, e at +width, both advanced by `lane`). The
// sums stay in registers in two sets (even and odd members); each ḡ_i block is one load.
template <typename scalar_t, int NB>
__attribute__((noinline)) DELREC_CONTRACT void sum_members(
    const scalar_t* __restrict g, int64_t width, const Member<scalar_t>* __restrict member,
    const int64_t* __restrict cut, int64_t stride, const int64_t* __restrict slots,
    int64_t count, scalar_t* const* __restrict to, int64_t lane) {
  constexpr int64_t L = kLanes<scalar_t>;
  for (int64_t k_slot = 0; k_slot < count; ++k_slot) {
    const int64_t s = slots[k_slot];
    const int64_t k0 = cut[s * stride], k1 = cut[s * stride + 1];
    if (k0 == k1) continue;
    Vec<scalar_t> by_a[2][NB] = {}, by_b[2][NB] = {};
    int64_t k = k0;
    for (; k + 2 <= k1; k += 2) {
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u) {
        const scalar_t* gi = g + static_cast<int64_t>(member[k + u].index) * width;
        const scalar_t a = member[k + u].a, b = member[k + u].b;
#pragma GCC unroll 4
        for (int q = 0; q < NB; ++q) {
          const Vec<scalar_t> gq = kept(load(gi + q * L));
          by_a[u][q] += a * gq;
          by_b[u][q] += b * gq;
        }
      }
    }
    if (k < k1) {
      const scalar_t* gi = g + static_cast<int64_t>(member[k].index) * width;
      const scalar_t a = member[k].a, b = member[k].b;
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) {
        const Vec<scalar_t> gq = kept(load(gi + q * L));
        by_a[0][q] += a * gq;
        by_b[0][q] += b * gq;
      }
    }
    scalar_t* x = to[s] + lane;
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      store(x + q * L, load(x + q * L) + (by_a[0][q] + by_a[1][q]));
      store(x + width + q * L, load(x + width + q * L) + (by_b[0][q] + by_b[1][q]));
    }
  }
}

// The backward's per-class row operations, out of line with restrict pointers (vectorised):
// lag1 += a·x + e·xe (a chain stage's one-off term)
template <typename scalar_t>
__attribute__((noinline)) void chain_adjoint(const scalar_t* __restrict x,
                                             const scalar_t* __restrict xe, scalar_t a,
                                             scalar_t e, int64_t batch, scalar_t* __restrict lag1) {
  for (int64_t b = 0; b < batch; ++b) lag1[b] += a * x[b] + e * xe[b];
}

// support += s·x for spikes s (0/1 bytes)
template <typename scalar_t>
__attribute__((noinline)) void gate(const uint8_t* __restrict s, const scalar_t* __restrict x,
                                    int64_t batch, double* __restrict support) {
  for (int64_t b = 0; b < batch; ++b) support[b] += s[b] ? static_cast<double>(x[b]) : 0.0;
}

// y += coef·x, d += slope·x (a triangle tap's injection), in float64 like the recursion they
// feed: the slope increments (1, -2, 1)/w² of one entry row, injected at three times, then cancel
// in the slope as exactly as in the forward recursion; summed in scalar_t, a float32 rounding of
// each ring row stays in the slope, which the adjoint integrates twice (an error growing as T²)
template <typename scalar_t>
__attribute__((noinline)) void inject_tap(const scalar_t* __restrict x, double coef, double slope,
                                          int64_t width, double* __restrict y,
                                          double* __restrict d) {
  for (int64_t b = 0; b < width; ++b) {
    const double xb = static_cast<double>(x[b]);
    y[b] += coef * xb;
    d[b] += slope * xb;
  }
}

// y += sign·x (an ε-box tap's injection, float64 like inject_tap)
template <typename scalar_t>
__attribute__((noinline)) void inject_sign(const scalar_t* __restrict x, double sign,
                                           int64_t width, double* __restrict y) {
  for (int64_t b = 0; b < width; ++b) y[b] += sign * static_cast<double>(x[b]);
}

// support += (upper - lower)·x (a closed-support spike count from prefix counts, times x)
template <typename scalar_t>
__attribute__((noinline)) void count_times(const int32_t* __restrict upper,
                                           const int32_t* __restrict lower,
                                           const scalar_t* __restrict x, int64_t batch,
                                           double* __restrict support) {
  for (int64_t b = 0; b < batch; ++b) {
    support[b] += static_cast<double>(upper[b] - lower[b]) * static_cast<double>(x[b]);
  }
}

// The backward adds the near slot sums of a group of kSlotNeurons presynaptic neurons into their
// adjoint rings, then runs those neurons' chain stages and entries, which read the same rows:
// they are then still in cache (all neurons' rows at once outgrow L2 at N = 512).
constexpr int64_t kSlotNeurons = 32;

// A far slot as the backward's block sums read it: the slot, its class's first ring row and its
// level minus the plan's lowest.
struct FarSlot {
  int64_t slot;
  int32_t row, level;
};

// Steps of a block the far slot sums keep in registers at once: 2·Q·NB accumulators (≤ 16).
template <int NB>
constexpr int kFarSums = NB == 1 ? 8 : (NB == 2 ? 4 : 2);

// The block sums of far slots for steps t0 + q0 … t0 + q0 + Q - 1: for each slot, x = Σ a·ḡ_i
// and e = Σ b·ḡ_i per step over its members, added to its Q consecutive adjoint ring rows
// (diagonals t - m); g points at (neuron 0, step t0 + q0, first lane) of the (N, T', B')
// adjoint, `head` = (t0 + q0 - lowest) mod depth.
template <typename scalar_t, int NB, int Q>
__attribute__((noinline)) DELREC_CONTRACT void sum_far(
    const scalar_t* __restrict g, int64_t stride, int64_t width,
    const Member<scalar_t>* __restrict member, const int64_t* __restrict member_start,
    const FarSlot* __restrict slots, int64_t count, scalar_t* __restrict ring, int64_t head,
    int64_t depth) {
  constexpr int64_t L = kLanes<scalar_t>;
  auto first_row = [&](const FarSlot& f) {  // the slot's adjoint ring row at head
    int64_t row = head - f.level;
    row += row < 0 ? depth : 0;
    return row - (row >= depth ? depth : 0);
  };
  for (int64_t k = 0; k < count; ++k) {
    const FarSlot f = slots[k];
    if (k + kAhead < count) {  // the rings are larger than the cache at long delay ranges
      const FarSlot next = slots[k + kAhead];
      int64_t row = first_row(next);
      for (int q = 0; q < Q; ++q, row = row + 1 == depth ? 0 : row + 1) {
        prefetch_row(ring + (static_cast<int64_t>(next.row) + row) * 2 * width, width, NB * L);
      }
    }
    Vec<scalar_t> x[Q][NB] = {}, e[Q][NB] = {};
    for (int64_t m = member_start[f.slot]; m < member_start[f.slot + 1]; ++m) {
      const scalar_t* gi = g + static_cast<int64_t>(member[m].index) * stride;
      const scalar_t a = member[m].a, b = member[m].b;
#pragma GCC unroll 8
      for (int q = 0; q < Q; ++q) {
#pragma GCC unroll 4
        for (int v = 0; v < NB; ++v) {
          const Vec<scalar_t> gq = kept(load(gi + q * width + v * L));
          x[q][v] += a * gq;
          e[q][v] += b * gq;
        }
      }
    }
    int64_t row = first_row(f);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      scalar_t* to = ring + (static_cast<int64_t>(f.row) + row) * 2 * width;
#pragma GCC unroll 4
      for (int v = 0; v < NB; ++v) {
        store(to + v * L, load(to + v * L) + x[q][v]);
        store(to + width + v * L, load(to + width + v * L) + e[q][v]);
      }
      row = row + 1 == depth ? 0 : row + 1;
    }
  }
}

template <typename scalar_t>
void backward_loop(const Plan& p, const at::Tensor& grad_spikes, const at::Tensor& history,
                   const at::Tensor& membrane, const at::Tensor& psi,
                   const Coefficients<scalar_t>& coef, const int64_t* order,
                   const at::Tensor& mask, const at::Tensor& counts,
                   const LIFConstants& lif, int64_t reach, at::Tensor& grad_current,
                   at::Tensor& adjoint, at::Tensor& by_support) {
  const int64_t steps = membrane.size(0), batch = membrane.size(1), n = membrane.size(2);
  const int64_t nb = n * batch;
  const bool has_mask = mask.defined(), need_support = counts.defined();
  constexpr int64_t L = kLanes<scalar_t>;
  const int64_t width = adjoint.size(2);
  const scalar_t* grad_out = grad_spikes.data_ptr<scalar_t>();  // (T, B, N)
  const bool* hist = history.data_ptr<bool>();                 // (N, T+1, B)
  const int64_t frames = (steps + 1) * batch;
  const scalar_t* membrane_p = membrane.data_ptr<scalar_t>();   // (T, B, N)
  const scalar_t* psi_p = lif.surrogate == 0 ? psi.data_ptr<scalar_t>() : nullptr;  // (T, B, N)
  const scalar_t* mask_p = has_mask ? mask.data_ptr<scalar_t>() : nullptr;  // (B, N)
  const int32_t* count_p = need_support ? counts.data_ptr<int32_t>() : nullptr;  // (N, T+1, B)
  scalar_t* grad_current_p = grad_current.data_ptr<scalar_t>();  // (T, B, N): ∂L/∂c
  const scalar_t gain = coef.gain;
  // (N, T', B'): ḡ = ∂L/∂h · m = ∂L/∂r, T' a whole number of blocks (zero beyond T)
  scalar_t* adj = adjoint.data_ptr<scalar_t>();
  const int64_t span_steps = adjoint.size(1);
  for (int64_t i = 0; i < n; ++i) {  // steps T … T' - 1 stay zero (the last block's tail)
    std::fill(adj + (i * span_steps + steps) * width, adj + (i + 1) * span_steps * width,
              scalar_t(0));
  }
  double* support_sum = by_support.data_ptr<double>();  // (N): Σ_t Σ_s K_s·x_s

  // injections of the entry adjoints into the recursion of each neuron: a ring of `reach` rows
  // by time (reach > every tap lag), each row (N, 2, B') for all neurons, so that a step's
  // writes at each tap lag and its reads run through memory in order (neuron-major rings, with
  // all of a neuron's rows together, miss the cache at every write); `once`: the chain's lag-1
  // terms, ∂L/∂s_j[t - 1] formed at step t and used once. The injections are float64, as the
  // recursion they feed (inject_tap).
  Buffer<double> inject(reach * n * 2 * width, 0.0);
  const auto injection = [&](int64_t j, int64_t time) {
    return inject.data() + ((time % reach) * n + j) * 2 * width;
  };
  Buffer<scalar_t> once(n * width, scalar_t(0));
  // the adjoint rings (C·depth rows of ∂L/∂Z then ∂L/∂E, B' lanes each)
  Buffer<scalar_t> ring(p.classes * p.depth * 2 * width, scalar_t(0));
  const int64_t group = std::min(width, kGroupBlocks * L);  // batch lanes summed at once
  std::vector<double> y(nb, 0.0), d(nb, 0.0);  // Σ_k κ(k)·x[t+k] and its slope, (N, B)
  std::vector<scalar_t> gh(nb, scalar_t(0));   // ∂L/∂h[t+1], then ∂L/∂h[t], (B, N)
  Buffer<scalar_t> g_now(n * width, scalar_t(0));  // ∂L/∂h[t] · m, (N, B')
  std::vector<int64_t> class_of(p.slots);
  for (int64_t c = 0; c < p.classes; ++c) {
    std::fill(class_of.begin() + p.slot_start[c], class_of.begin() + p.slot_start[c + 1], c);
  }
  // far slots add their sums once per block (kSpan), near slots every step: per neuron j its
  // near slots [near_start[j], near_start[j+1]) of near_slots, its far ones likewise
  std::vector<int64_t> near_start{0}, near_slots, far_start{0};
  std::vector<FarSlot> far_slots;
  int64_t near_members = 0;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t c = p.class_start[j]; c < p.class_start[j + 1]; ++c) {
      for (int64_t s = p.slot_start[c]; s < p.slot_start[c + 1]; ++s) {
        if (far_slot(p, c, s)) {
          far_slots.push_back({s, static_cast<int32_t>(c * p.depth),
                               static_cast<int32_t>(p.slot_level[s] - p.lowest)});
        } else {
          near_slots.push_back(s);
          near_members += p.member_start[s + 1] - p.member_start[s];
        }
      }
    }
    near_start.push_back(near_slots.size());
    far_start.push_back(far_slots.size());
  }
  // the members in order (their i, a, b), cut into blocks of postsynaptic neurons whose rows of
  // g_now (one lane group) stay in L1, unless a near slot's members would then be too few per
  // block (each block's sums are added to the ring once): members of slot s in block q are
  // [cut[s, q], cut[s, q+1])
  std::vector<Member<scalar_t>> members(n * n);
  for (int64_t m = 0; m < n * n; ++m) {
    members[m] = {p.member[m], coef.a(order[m]), coef.b(order[m])};
  }
  const int64_t block_rows = std::max<int64_t>(
      1, kColumnBytes / (group * static_cast<int64_t>(sizeof(scalar_t))));
  const int64_t per_slot = near_members / std::max<int64_t>(1, near_slots.size());
  const int64_t row_blocks = std::clamp<int64_t>(per_slot / kRowSynapses, 1,
                                                 (n + block_rows - 1) / block_rows);
  std::vector<int64_t> cut(p.slots * (row_blocks + 1));
  for (int64_t s = 0; s < p.slots; ++s) {
    const int32_t* first = p.member + p.member_start[s];
    const int32_t* last = p.member + p.member_start[s + 1];
    for (int64_t q = 0; q <= row_blocks; ++q) {
      const int64_t row = (n * q + row_blocks - 1) / row_blocks;
      cut[s * (row_blocks + 1) + q] = std::lower_bound(first, last, row) - p.member;
    }
  }
  std::vector<scalar_t*> to(p.slots);  // the adjoint ring row each slot adds into at t
  const LIFUpdate<scalar_t> neuron(lif);
  const SurrogateDerivative<scalar_t> derivative(lif);

  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t now = t * nb, head = p.head_at(t);
    for_each_block(n, [&](int64_t i0, int64_t i1) {
      // the spikes' adjoint from the recurrence, neuron-major: y (the adjoint recursion fed by
      // the injections at t) plus the one-off lag-1 terms, gathered in `once`
      for (int64_t i = i0; i < i1; ++i) {
        double* inj = injection(i, t);
        scalar_t* from_rec = once.data() + i * width;
        double* yi = y.data() + i * batch;
        double* di = d.data() + i * batch;
        for (int64_t b = 0; b < batch; ++b) {
          yi[b] += di[b] + inj[b];
          di[b] += inj[width + b];
          from_rec[b] += static_cast<scalar_t>(yi[b]);
        }
        std::fill_n(inj, 2 * width, 0.0);
      }
      // the LIF adjoint, batch-major (T, B, N) like the layer's sequences
      for (int64_t b = 0; b < batch; ++b) {
        scalar_t from_rec[kBlock], psi[kBlock], masked[kBlock];
        for (int64_t i = i0; i < i1; ++i) from_rec[i - i0] = once[i * width + b];
        const int64_t at = now + b * n + i0;
        if (i1 < n) {  // the next block's lines (prefetch_block)
          prefetch_block(membrane_p + at + kBlock, false);
          prefetch_block(grad_out + at + kBlock, false);
          prefetch_block(grad_current_p + at + kBlock, true);
          if (psi_p) prefetch_block(psi_p + at + kBlock, false);
        }
        if (!psi_p) surrogate_row(derivative, neuron.threshold, membrane_p + at, psi, i1 - i0);
        adjoint_row(neuron, gain, membrane_p + at, psi_p ? psi_p + at : psi, grad_out + at,
                    from_rec, has_mask ? mask_p + b * n + i0 : nullptr, gh.data() + b * n + i0,
                    grad_current_p + at, masked, i1 - i0);
        for (int64_t i = i0; i < i1; ++i) g_now[i * width + b] = masked[i - i0];
      }
      for (int64_t i = i0; i < i1; ++i) {
        std::fill_n(once.data() + i * width, width, scalar_t(0));
        std::copy_n(g_now.data() + i * width, width, adj + (i * span_steps + t) * width);
      }
    });
    // near slot sums, then each class's chain and entry, group by group of presynaptic neurons
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j0 = begin; j0 < end; j0 += kSlotNeurons) {
        const int64_t j1 = std::min(end, j0 + kSlotNeurons);
        const int64_t k0 = near_start[j0], count = near_start[j1] - k0;
        for (int64_t k = k0; k < k0 + count; ++k) {  // x = Σ a·ḡ_i, e = Σ b·ḡ_i reach row t - m
          const int64_t s = near_slots[k];
          const int64_t row = class_of[s] * p.depth + p.ring_row_at(head, p.slot_level[s]);
          to[s] = ring.data() + row * 2 * width;
        }
        for (int64_t lane = 0; lane < width; lane += group) {
          for (int64_t q = 0; q < row_blocks; ++q) {
            with_blocks(std::min(group, width - lane) / L, [&](auto nb) {
              sum_members<scalar_t, decltype(nb)::value>(
                  g_now.data() + lane, width, members.data(), cut.data() + q, row_blocks + 1,
                  near_slots.data() + k0, count, to.data(), lane);
            });
          }
        }
        Buffer<double> support(width);
        for (int64_t j = j0; j < j1; ++j) {
          std::fill(support.begin(), support.end(), 0.0);
          const uint8_t* newest =  // s_j[t - 1]
              reinterpret_cast<const uint8_t*>(hist + j * frames + t * batch);
          scalar_t* lag1 = once.data() + j * width;
          for (int64_t c = p.class_start[j]; c < p.class_start[j + 1]; ++c) {
            scalar_t* rows = ring.data() + c * p.depth * 2 * width;
            auto row = [&](int64_t m) { return rows + p.ring_row_at(head, m) * 2 * width; };
            // chain stages: ∂L/∂s[t - 1] += a·Λ + e·Λ_E, and Σ_b s[t-1]·χ·Λ for the spread
            const double* stage = p.chain + 3 * p.chain_start[c];
            for (int64_t m = p.m_a(c) + 1; t > 0 && m <= p.m_b(c); ++m, stage += 3) {
              const scalar_t* x = row(m);
              chain_adjoint(x, x + width, static_cast<scalar_t>(stage[0]),
                            static_cast<scalar_t>(stage[1]), batch, lag1);
              if (need_support && stage[2] != 0.0) gate(newest, x, batch, support.data());
            }
            // the entry: Λ[t - m_a, m_a] is ∂L/∂Z of level m_a at t, injected at its taps
            scalar_t* x = row(p.m_a(c));
            const int64_t* zl = p.z_lags + 3 * c;
            const int64_t* el = p.e_lags + 4 * c;
            const double* zc = p.z_coef + 6 * c;
            for (int q = 0; q < 3; ++q) {
              if (zl[q] > t) continue;
              double* to = injection(j, t - zl[q]);
              inject_tap(x, zc[q], zc[3 + q], width, to, to + width);
            }
            for (int q = 0; q < 4; ++q) {  // signs -, +, +, -
              if (el[q] > t) continue;
              inject_sign(x + width, q == 1 || q == 2 ? 1.0 : -1.0, width, injection(j, t - el[q]));
            }
            if (need_support) {
              // K[t] = spikes of j at lags lo … hi = P[t-lo+1] - P[t-hi]
              const int64_t lo = p.support[2 * c], hi = p.support[2 * c + 1];
              if (hi >= lo) {
                count_times(count_p + j * frames + std::max<int64_t>(t - lo + 1, 0) * batch,
                            count_p + j * frames + std::max<int64_t>(t - hi, 0) * batch, x, batch,
                            support.data());
              }
            }
            std::fill_n(x, 2 * width, scalar_t(0));  // the row of diagonal t - m_a is done
          }
          for (int64_t b = 0; b < batch; ++b) support_sum[j] += support[b];
        }
      }
    });
    if (far_slots.empty() || t % kSpan != 0) continue;
    at::parallel_for(0, n, 1, [&](int64_t j0, int64_t j1) {  // far slots: the block t … t+kSpan-1
      const int64_t f0 = far_start[j0], count = far_start[j1] - f0;
      for (int64_t lane = 0; lane < width; lane += group) {
        with_blocks(std::min(group, width - lane) / L, [&](auto nb) {
          constexpr int NB = decltype(nb)::value;
          constexpr int Q = kFarSums<NB>;
          for (int64_t q0 = 0; q0 < kSpan; q0 += Q) {
            sum_far<scalar_t, NB, Q>(adj + (t + q0) * width + lane, span_steps * width, width,
                                     members.data(), p.member_start, far_slots.data() + f0, count,
                                     ring.data() + lane, p.head_at(t + q0), p.depth);
          }
        });
      }
    });
  }
}

// The dot products of the gradient sweep, R members at a time:
//   dot_tile<R>(member, g, stride, z, e, len, dz, de): Σ_k ḡ_i[k]·z_r[k] and ḡ_i[k]·e_r[k] over
//   k < len (a multiple of kLanes) for the members i = member[r], r < R, added to dz[i], de[i],
//   where ḡ_i = g + i·stride (float32 sums for float32 data); z_r = z[r], e_r = e[r].
// With AVX-512 in register tiles: 2R independent chains; when all members of a tile read the
// same level (`shared`), z and e are loaded once per vector block for the R rows. kTile: members
// per tile; kMinChunk: the shortest chunk of the sweep.
#if defined(__AVX512F__)
constexpr int kTile = 8;
constexpr int64_t kMinChunk = 1;

// AVX-512 registers of kLanes scalars: zero, load, fma(a, b, c) = a·b + c, and sums(v, sum):
// sum[q] = Σ over the lanes of v[q], for 16 registers at once.
template <typename scalar_t>
struct Registers;

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
template <int R, bool shared, typename scalar_t>
inline void dot_tile(const int32_t* member, const scalar_t* g, int64_t stride,
                     const scalar_t* const* z, const scalar_t* const* e, int64_t len, double* dz,
                     double* de) {
  using V = Registers<scalar_t>;
  const scalar_t* row[R];
  typename V::type acc[16];  // Σ ḡ·z of member r at r, Σ ḡ·e at 8 + r
  for (int q = 0; q < 16; ++q) acc[q] = V::zero();
  for (int r = 0; r < R; ++r) row[r] = g + member[r] * stride;
  for (int64_t k = 0; k < len; k += kLanes<scalar_t>) {
    if constexpr (shared) {
      const auto zk = V::load(z[0] + k), ek = V::load(e[0] + k);
      for (int r = 0; r < R; ++r) {
        const auto gk = V::load(row[r] + k);
        acc[r] = V::fma(gk, zk, acc[r]);
        acc[8 + r] = V::fma(gk, ek, acc[8 + r]);
      }
    } else {
      for (int r = 0; r < R; ++r) {
        const auto gk = V::load(row[r] + k);
        acc[r] = V::fma(gk, V::load(z[r] + k), acc[r]);
        acc[8 + r] = V::fma(gk, V::load(e[r] + k), acc[8 + r]);
      }
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

template <int R, bool shared, typename scalar_t>
inline void dot_tile(const int32_t* member, const scalar_t* g, int64_t stride,
                     const scalar_t* const* z, const scalar_t* const* e, int64_t len, double* dz,
                     double* de) {
  for (int r = 0; r < R; ++r) {
    dot2(g + member[r] * stride, z[shared ? 0 : r], e[shared ? 0 : r], len, dz[member[r]],
         de[member[r]]);
  }
}
#endif

// dot_tile over members [m, m1): tiles of R, then of R/2, … for the rest.
template <int R, bool shared, typename scalar_t>
inline void dot_members(const int32_t* member, int64_t m, int64_t m1, const scalar_t* g,
                        int64_t stride, const scalar_t* const* z, const scalar_t* const* e,
                        int64_t len, double* dz, double* de) {
  for (; m + R <= m1; m += R) {
    dot_tile<R, shared>(member + m, g, stride, z + (shared ? 0 : m), e + (shared ? 0 : m), len,
                        dz, de);
  }
  if constexpr (R > 1) dot_members<R / 2, shared>(member, m, m1, g, stride, z, e, len, dz, de);
}

// What the gradient sweep makes of the per-synapse sums D0 = Σ ḡ_i Z and D1 = Σ ḡ_i E (module
// docstring of synaptic.py): ∂L/∂W = gain·(D0 + offset·D1), ∂L/∂d = gain·W·D1/w² and, per
// presynaptic neuron, Σ_i W·∂L/∂W (the spread gradient's second term), all float64.
template <typename scalar_t>
struct Gradients {
  const scalar_t* weight;  // (N, N)
  const double* offset;    // (N, N)
  const double* width;     // (N,)
  double gain;
  double *grad_weight, *grad_delay;  // (N, N)
  double* weighted;                  // (N,)
};

template <typename scalar_t>
void gradient_sweep(const Plan& p, const at::Tensor& history, const at::Tensor& adjoint,
                    int64_t batch, const Gradients<scalar_t>& out) {
  const int64_t n = adjoint.size(0), steps = history.size(1) - 1, width = adjoint.size(2);
  const int64_t stride = adjoint.size(1) * width;  // one neuron's adjoint
  const bool* hist = history.data_ptr<bool>();        // (N, T+1, B)
  const int64_t frames = (steps + 1) * batch;
  const scalar_t* adj = adjoint.data_ptr<scalar_t>();  // (N, T', B')

  // Each thread takes its presynaptic neurons j in groups and sweeps time chunk by chunk over a
  // group: per class of each j, its levels over the chunk (the chain levels' values in `levels`,
  // the frozen rows in the class's stage history), then its members' dots in tiles. With
  // register tiles, chunks are short enough that the adjoint of all N neurons over one chunk
  // (kAdjointBytes) stays in L2 while the group's neurons read it.
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t chunk = std::clamp(kAdjointBytes / (n * row_bytes), kMinChunk, kChunk);
  // a class's stage history: the stage-m_b values (Z, E) of diagonals t0 - m_top … t0 + chunk -
  // m_b, each row written twice (at h and h + rows) so that every level's window is contiguous
  auto history_rows = [&](int64_t c) {
    return p.m_top(c) > p.m_b(c) ? p.m_top(c) - p.m_b(c) + chunk : 0;
  };
  auto state_bytes = [&](int64_t j) {
    int64_t bytes = 0;
    for (int64_t c = p.class_start[j]; c < p.class_start[j + 1]; ++c) {
      bytes += 2 * p.stages(c) * row_bytes + 4 * history_rows(c) * row_bytes;
    }
    return bytes;
  };
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // chain levels over one chunk (Z then E, chunk × B' each) of the class being swept
    int64_t most_levels = 0;
    for (int64_t c = p.class_start[begin]; c < p.class_start[end]; ++c) {
      int64_t chained = 0;
      for (int64_t s = p.slot_start[c]; s < p.slot_start[c + 1]; ++s) {
        chained += p.slot_level[s] <= p.m_b(c);
      }
      most_levels = std::max(most_levels, chained);
    }
    Buffer<scalar_t> levels(most_levels * 2 * chunk * width);
    std::vector<const scalar_t*> z_of, e_of;  // per member of a class: its level's values
    Buffer<scalar_t> newest(width);            // a neuron's spikes at t - 1
    std::vector<int32_t> mixed;               // members left over from whole tiles
    std::vector<double> sums;
    for (int64_t j0 = begin; j0 < end;) {
      // a group: its per-synapse sums (j, 2, N) and class states within budget
      int64_t j1 = j0, bytes = 0;
      while (j1 < end && (j1 == j0 || (bytes + state_bytes(j1) <= kStateBytes &&
                                       (j1 - j0 + 1) * 2 * n * 8 <= kSumBytes))) {
        bytes += state_bytes(j1++);
      }
      const int64_t c0 = p.class_start[j0], c1 = p.class_start[j1];
      ClassStates state(c0, c1, width);
      // per class: its chain rows ((Z, E) by diagonal, `stages` rows) and its stage history
      std::vector<Buffer<scalar_t>> chain(c1 - c0), stage(c1 - c0);
      for (int64_t c = c0; c < c1; ++c) {
        chain[c - c0].assign(2 * p.stages(c) * width, scalar_t(0));
        stage[c - c0].assign(4 * history_rows(c) * width, scalar_t(0));  // Z, E; doubled
      }
      sums.assign((j1 - j0) * 2 * n, 0.0);
      for (int64_t t0 = 0; t0 < steps; t0 += chunk) {
        const int64_t len = std::min(chunk, steps - t0);
        for (int64_t j = j0; j < j1; ++j) {
          double* sz = sums.data() + (j - j0) * 2 * n;
          for (int64_t c = p.class_start[j]; c < p.class_start[j + 1]; ++c) {
            ClassState& st = state[c];
            const int64_t stages = p.stages(c), rows = history_rows(c);
            const int64_t s0 = p.slot_start[c], s1 = p.slot_start[c + 1];
            scalar_t* stage_z = stage[c - c0].data();
            scalar_t* stage_e = stage_z + 2 * rows * width;
            for (int64_t u = 0; u < len; ++u) {
              const int64_t t = t0 + u;
              widen(reinterpret_cast<const uint8_t*>(hist + j * frames + t * batch), batch,
                    newest.data());
              const int64_t base = chain_row(p, c, t);  // the row of diagonal t - m_b
              auto row = [&](int64_t m) {                 // the (Z, E) row of diagonal t - m
                const int64_t r = base + (p.m_b(c) - m);
                return chain[c - c0].data() + (r >= stages ? r - stages : r) * 2 * width;
              };
              advance_class<scalar_t>(p, c, t, batch, width, hist + j * frames, newest.data(),
                                      st, row);
              int64_t k = 0;  // the chain levels this class uses, in slot order
              for (int64_t s = s0; s < s1 && p.slot_level[s] <= p.m_b(c); ++s, ++k) {
                const scalar_t* from = row(p.slot_level[s]);
                scalar_t* out = levels.data() + (2 * k * chunk + u) * width;
                std::copy_n(from, batch, out);
                std::copy_n(from + width, batch, out + chunk * width);
              }
              if (rows > 0) {  // diagonal t - m_b leaves the chain: into the stage history
                const scalar_t* from = row(p.m_b(c));
                const int64_t at = ((t - p.m_b(c)) % rows + rows) % rows;
                for (const int64_t h : {at, at + rows}) {
                  std::copy_n(from, batch, stage_z + h * width);
                  std::copy_n(from + width, batch, stage_e + h * width);
                }
              }
            }
            // the dots: whole tiles of one level share its values; the rest in mixed tiles
            z_of.resize(p.member_start[s1] - p.member_start[s0]);
            e_of.resize(z_of.size());
            mixed.clear();
            for (int64_t s = s0, k = 0; s < s1; ++s) {
              const int64_t m = p.slot_level[s];
              const scalar_t *z, *e;
              if (m <= p.m_b(c)) {
                z = levels.data() + 2 * k++ * chunk * width;
                e = z + chunk * width;
              } else {
                const int64_t at = ((t0 - m) % rows + rows) % rows;
                z = stage_z + at * width;
                e = stage_e + at * width;
              }
              // tiles of 8, 4 and 2 members share the level's loads; a last single member
              // joins the mixed tiles (a tile of one runs two chains of FMAs only)
              const int64_t m0 = p.member_start[s], m1 = p.member_start[s + 1];
              const int64_t whole = m1 - (kTile > 1 ? (m1 - m0) % 2 : 0);
              dot_members<kTile, true>(p.member, m0, whole, adj + t0 * width, stride, &z, &e,
                                       len * width, sz, sz + n);
              for (int64_t q = whole; q < m1; ++q) {
                z_of[mixed.size()] = z;
                e_of[mixed.size()] = e;
                mixed.push_back(p.member[q]);
              }
            }
            dot_members<kTile, false>(mixed.data(), 0, static_cast<int64_t>(mixed.size()),
                                      adj + t0 * width, stride, z_of.data(), e_of.data(),
                                      len * width, sz, sz + n);
          }
        }
      }
      // the group's gradients, row by row (the group's columns of a row are contiguous)
      std::fill(out.weighted + j0, out.weighted + j1, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const double* d0 = sums.data() + (j - j0) * 2 * n;
          const double* d1 = d0 + n;
          const int64_t k = i * n + j;
          const double w = out.weight[k];
          const double by_weight = out.gain * (d0[i] + out.offset[k] * d1[i]);
          out.grad_weight[k] = by_weight;
          out.grad_delay[k] = out.gain * w * d1[i] * (1.0 / (out.width[j] * out.width[j]));
          out.weighted[j] += w * by_weight;
        }
      }
      j0 = j1;
    }
  });
}

// The classes, levels and slots of each presynaptic neuron j and the synapses that read them
// (synaptic.py, _SlotPlan), from the centres c = 1 + d (N, N) and half-widths w (N,), both
// float64. A synapse's pattern is (⌈c - w⌉, ⌊c + w⌋, ⌈c⌉ - 1, ⌊c⌋ + 1), its level
// m = ⌈c - w⌉ - 1 and its class the pattern translated by -m; classes of j in pattern order,
// slots of a class by level.
// Returns class_start (N+1), slot_start (C+1), slot_level (S), levels (C, 3) = (m_a, m_b, m_top),
// entry (C,) = the least centre at level m_a, entry_pattern (C, 4) = its (lo, hi, rises, falls)
// after the lag-0 rule, chain_start (C+1), chain (stages, 3) = (a, e, χ) of the level below each
// chain stage, member_start (S+1), member (N²) int32 (postsynaptic i, grouped by slot, i
// ascending), order (N²) (the row-major index of each member), slot_of (N, N) int32 and offset
// (N, N) = (c - G_p - m)/w² with G_p + m_a the entry centre.
std::vector<at::Tensor> plan(const at::Tensor& centre, const at::Tensor& width) {
  check(centre.scalar_type() == at::kDouble && width.scalar_type() == at::kDouble &&
            width.is_contiguous() && centre.dim() == 2 && centre.size(0) == centre.size(1) &&
            width.numel() == centre.size(0),
        "plan needs float64 centres (N, N) and widths (N,)");
  const int64_t n = centre.size(0);
  const at::Tensor by_column = centre.t().contiguous();  // (j, i): one neuron's synapses together
  const double* c = by_column.data_ptr<double>();
  const double* w = width.data_ptr<double>();
  if (n > 0) {
    const double longest = at::max(centre.abs()).item<double>() + at::max(width).item<double>();
    check(std::isfinite(longest) && longest < 30000.0,
          "delays and spreads must be finite and below 30000 steps");
  }
  struct Pattern {
    int64_t lo, hi, rises, falls;  // untruncated: ⌈c - w⌉, ⌊c + w⌋, ⌈c⌉ - 1, ⌊c⌋ + 1
  };
  auto pattern_of = [](double ci, double wj) -> Pattern {
    return {static_cast<int64_t>(std::ceil(ci - wj)), static_cast<int64_t>(std::floor(ci + wj)),
            static_cast<int64_t>(std::ceil(ci)) - 1, static_cast<int64_t>(std::floor(ci)) + 1};
  };
  // the class of a pattern: its translate to level 0 (lo = 1), packed so that keys sort like
  // the tuples (every field is in [0, 2^16))
  auto class_key = [](const Pattern& q) -> uint64_t {
    const int64_t m = q.lo - 1;
    return static_cast<uint64_t>(q.hi - m) << 32 | static_cast<uint64_t>(q.rises - m) << 16 |
           static_cast<uint64_t>(q.falls - m);
  };

  std::vector<int64_t> class_start{0}, slot_start{0}, slot_level, levels, entry_pattern,
      chain_start{0}, member_start{0};
  std::vector<double> entry, chain;
  at::Tensor member = at::empty({n * n}, at::kInt);
  at::Tensor order = at::empty({n * n}, at::kLong);
  at::Tensor slot_by_column = at::empty({n, n}, at::kInt);  // (j, i)
  at::Tensor offset_by_column = at::empty({n, n}, at::kDouble);
  int32_t* member_p = member.data_ptr<int32_t>();
  int64_t* order_p = order.data_ptr<int64_t>();
  int32_t* slot_p = slot_by_column.data_ptr<int32_t>();
  double* offset_p = offset_by_column.data_ptr<double>();
  std::vector<uint64_t> keys;
  std::vector<int64_t> local(n), level(n), count, first_slot;
  for (int64_t j = 0, at_member = 0; j < n; ++j) {
    const double* cj = c + j * n;
    const double wj = w[j], inv_w2 = 1.0 / (wj * wj);
    keys.clear();
    for (int64_t i = 0; i < n; ++i) {
      const Pattern q = pattern_of(cj[i], wj);
      const uint64_t key = class_key(q);
      int64_t k = std::find(keys.begin(), keys.end(), key) - keys.begin();
      if (k == static_cast<int64_t>(keys.size())) keys.push_back(key);
      local[i] = k;
      level[i] = q.lo - 1;
    }
    std::vector<int64_t> rank(keys.size());  // classes in key order
    for (size_t k = 0; k < keys.size(); ++k) {
      rank[k] = std::count_if(keys.begin(), keys.end(), [&](uint64_t x) { return x < keys[k]; });
    }
    for (int64_t i = 0; i < n; ++i) local[i] = rank[local[i]];
    const int64_t classes = keys.size();
    std::vector<int64_t> low(classes, INT64_MAX), high(classes, INT64_MIN);
    for (int64_t i = 0; i < n; ++i) {
      low[local[i]] = std::min(low[local[i]], level[i]);
      high[local[i]] = std::max(high[local[i]], level[i]);
    }
    // slots: (class, level) with members, in class then level order; a counting sort by slot
    first_slot.assign(classes + 1, 0);  // dense level index of class k starts at first_slot[k]
    for (int64_t k = 0; k < classes; ++k) first_slot[k + 1] = first_slot[k] + high[k] - low[k] + 1;
    count.assign(first_slot[classes] + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++count[first_slot[local[i]] + level[i] - low[local[i]] + 1];
    std::vector<int64_t> slot_index(first_slot[classes], -1);
    for (int64_t k = 0; k < classes; ++k) {
      for (int64_t x = first_slot[k]; x < first_slot[k + 1]; ++x) {
        if (count[x + 1] == 0) continue;
        slot_index[x] = slot_level.size();
        slot_level.push_back(low[k] + x - first_slot[k]);
        member_start.push_back(member_start.back() + count[x + 1]);
      }
      slot_start.push_back(slot_level.size());
    }
    for (size_t x = 1; x < count.size(); ++x) count[x] += count[x - 1];
    // the entry of each class: the least centre at its lowest level
    std::vector<double> least(classes, INFINITY);
    for (int64_t i = 0; i < n; ++i) {
      if (level[i] == low[local[i]]) least[local[i]] = std::min(least[local[i]], cj[i]);
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = local[i], x = first_slot[k] + level[i] - low[k];
      const int64_t at = at_member + count[x]++;
      member_p[at] = static_cast<int32_t>(i);
      order_p[at] = i * n + j;
      slot_p[j * n + i] = static_cast<int32_t>(slot_index[x]);
      offset_p[j * n + i] = (cj[i] - least[k] - static_cast<double>(level[i] - low[k])) * inv_w2;
    }
    at_member += n;
    for (int64_t k = 0; k < classes; ++k) {
      const int64_t m_a = low[k], m_top = high[k];
      const int64_t m_b = m_a < 0 ? std::min<int64_t>(0, m_top) : m_a;
      levels.insert(levels.end(), {m_a, m_b, m_top});
      const double g = least[k];
      entry.push_back(g);
      // the entry's pattern after the lag-0 rule, as the ε-box and support taps read it
      const Pattern q = pattern_of(g, wj);
      int64_t lo = std::max<int64_t>(1, q.lo), hi = q.hi;
      if (hi < lo) lo = 1, hi = 0;
      const int64_t falls = std::min(std::max(q.falls, lo), hi + 1);
      const int64_t rises = std::min(std::max(q.rises, lo - 1), hi);
      entry_pattern.insert(entry_pattern.end(), {lo, hi, rises, falls});
      // chain stage m takes the lag-0 values of level m - 1 (the entry pattern translated)
      for (int64_t m = m_a + 1; m <= m_b; ++m) {
        const int64_t shift = m - 1 - m_a;
        const int64_t l = q.lo + shift, h = q.hi + shift, r = q.rises + shift,
                      f = q.falls + shift;
        const bool on = l <= 0 && 0 <= h;
        const int64_t e = !on ? 0 : (0 <= r ? -1 : (f <= 0 ? 1 : 0));
        const double centre_below = g + static_cast<double>(shift);
        const double a = on ? (wj + static_cast<double>(e) * centre_below) * inv_w2 : 0.0;
        chain.insert(chain.end(), {a, static_cast<double>(e), on ? 1.0 : 0.0});
      }
      chain_start.push_back(chain.size() / 3);
    }
    class_start.push_back(class_start.back() + classes);
  }
  auto longs = [](const std::vector<int64_t>& v, std::vector<int64_t> shape) {
    return at::tensor(v, at::kLong).view(shape);
  };
  const int64_t classes = class_start.back();
  return {longs(class_start, {n + 1}),
          longs(slot_start, {classes + 1}),
          longs(slot_level, {static_cast<int64_t>(slot_level.size())}),
          longs(levels, {classes, 3}),
          at::tensor(entry, at::kDouble),
          longs(entry_pattern, {classes, 4}),
          longs(chain_start, {classes + 1}),
          at::tensor(chain, at::kDouble).view({-1, 3}),
          longs(member_start, {static_cast<int64_t>(member_start.size())}),
          member,
          order,
          slot_by_column.t().contiguous(),
          offset_by_column.t().contiguous()};
}

// The coefficients' inputs: weight (N, N) in the kernel's scalar type, offset (N, N) float64.
void check_coefficients(const at::Tensor& weight, const at::Tensor& offset, const at::Tensor& like,
                        int64_t n) {
  check(weight.is_contiguous() && weight.numel() == n * n &&
            weight.scalar_type() == like.scalar_type(),
        "weight must be a contiguous (N, N) tensor of the sequences' dtype");
  check(offset.is_contiguous() && offset.numel() == n * n && offset.scalar_type() == at::kDouble,
        "offset must be a contiguous (N, N) float64 tensor");
}

// the recurrent dropout mask, if any: (B, N) in the dtype of the (T, B, N) sequence x
void check_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& x) {
  check(!mask.has_value() || (mask->dim() == 2 && mask->size(0) == x.size(1) &&
                              mask->size(1) == x.size(2) && mask->dtype() == x.dtype()),
        "the recurrent dropout mask must be (B, N), in the sequences' dtype");
}

void forward(const at::Tensor& drive, const at::Tensor& weight, const at::Tensor& offset,
             double gain, const at::Tensor& slot_of, const c10::optional<at::Tensor>& mask,
             const std::vector<at::Tensor>& plan_tensors, int64_t depth, int64_t lowest,
             double leak, double v0, double threshold, double v_reset, bool soft_reset,
             at::Tensor spikes, at::Tensor history, at::Tensor membrane) {
  const int64_t n = drive.size(2);
  check(drive.is_contiguous() && drive.dim() == 3, "drive (T, B, N) must be contiguous");
  check_coefficients(weight, offset, drive, n);
  check(slot_of.is_contiguous() && slot_of.scalar_type() == at::kInt && slot_of.numel() == n * n,
        "slot_of must be a contiguous (N, N) int32 tensor");
  const Plan p = plan_of(plan_tensors, depth, lowest);
  check(p.n == n, "the plan is for another layer size");
  check_mask(mask, drive);
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const LIFConstants lif{leak, v0, threshold, v_reset, soft_reset, false};
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "delrec_synaptic_forward", [&] {
    const Coefficients<scalar_t> coef{weight.data_ptr<scalar_t>(), offset.data_ptr<double>(),
                                      static_cast<scalar_t>(gain)};
    forward_loop<scalar_t>(p, drive, coef, slot_of, mask_c, lif, spikes, history, membrane);
  });
}

void backward(const at::Tensor& grad_spikes, const at::Tensor& history,
              const at::Tensor& membrane, const at::Tensor& psi, const at::Tensor& weight,
              const at::Tensor& offset, double gain, const at::Tensor& order,
              const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& counts,
              const std::vector<at::Tensor>& plan_tensors, int64_t depth, int64_t lowest,
              double leak, double threshold, double v_reset, bool soft_reset, bool detach_reset,
              int64_t surrogate, double surrogate_param, int64_t reach, at::Tensor grad_current,
              at::Tensor adjoint, at::Tensor by_support) {
  const int64_t n = membrane.size(2);
  check(grad_spikes.is_contiguous() && membrane.is_contiguous() &&
            (surrogate != 0 || psi.is_contiguous()),
        "sequences must be contiguous");
  check_coefficients(weight, offset, membrane, n);
  check(order.is_contiguous() && order.scalar_type() == at::kLong && order.numel() == n * n,
        "order must be a contiguous (N²) int64 tensor");
  check(by_support.scalar_type() == at::kDouble, "by_support must be float64");
  check(!counts.has_value() || counts->scalar_type() == at::kInt, "counts must be int32");
  const Plan p = plan_of(plan_tensors, depth, lowest);
  check_mask(mask, membrane);
  const at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor counts_c = counts.has_value() ? counts->contiguous() : at::Tensor();
  const LIFConstants lif{leak,       0.0,          threshold, v_reset, soft_reset,
                         detach_reset, surrogate, surrogate_param};
  AT_DISPATCH_FLOATING_TYPES(membrane.scalar_type(), "delrec_synaptic_backward", [&] {
    const Coefficients<scalar_t> coef{weight.data_ptr<scalar_t>(), offset.data_ptr<double>(),
                                      static_cast<scalar_t>(gain)};
    backward_loop<scalar_t>(p, grad_spikes, history, membrane, psi, coef,
                            order.data_ptr<int64_t>(), mask_c, counts_c, lif, reach, grad_current,
                            adjoint, by_support);
  });
}

void gradients(const at::Tensor& history, const at::Tensor& adjoint, int64_t batch,
               const std::vector<at::Tensor>& plan_tensors, int64_t depth, int64_t lowest,
               const at::Tensor& weight, const at::Tensor& offset, const at::Tensor& width,
               double gain, at::Tensor grad_weight, at::Tensor grad_delay, at::Tensor weighted) {
  const int64_t n = adjoint.size(0);
  check(adjoint.is_contiguous() && adjoint.dim() == 3 &&
            adjoint.size(2) * adjoint.element_size() % 64 == 0,
        "adjoint must be contiguous (N, T, B') with B' a whole number of cache lines");
  check_coefficients(weight, offset, adjoint, n);
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{
           &width, &grad_weight, &grad_delay, &weighted}) {
    check(x->is_contiguous() && x->scalar_type() == at::kDouble,
          "widths and the gradient outputs must be contiguous float64 tensors");
  }
  const Plan p = plan_of(plan_tensors, depth, lowest);
  AT_DISPATCH_FLOATING_TYPES(adjoint.scalar_type(), "delrec_synaptic_gradients", [&] {
    const Gradients<scalar_t> out{weight.data_ptr<scalar_t>(), offset.data_ptr<double>(),
                                  width.data_ptr<double>(),    gain,
                                  grad_weight.data_ptr<double>(), grad_delay.data_ptr<double>(),
                                  weighted.data_ptr<double>()};
    gradient_sweep<scalar_t>(p, history, adjoint, batch, out);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: fused time loops of the synaptic-delay engine (shifted reads of class rings)";
  m.def("plan", &plan, "the classes, levels and slots of each neuron and what each synapse reads");
  m.def("forward", &forward, "spikes, spike history and membrane of a synaptic-delay LIF layer");
  m.def("backward", &backward, "reverse loop: ∂L/∂c, the adjoint ∂L/∂r (N, T', B', padded), Σ K·x");
  m.def("gradients", &gradients, "∂L/∂W, ∂L/∂d and Σ_i W·∂L/∂W from the sweep's dot products");
  m.attr("span") = kSpan;
}
