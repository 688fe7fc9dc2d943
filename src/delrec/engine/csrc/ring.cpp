// Integer-delay layers run a chunk at a time from their state (delrec/engine/ring.py,
// IntegerLayer): what the recurrent layer's integer-delay inference and the streaming network
// both run on the CPU. The algorithm: docs/design.md#ring-buffers.
//
// One layer, for each sample b (in parallel over the batch) and step t of the chunk:
//
//   a[t]  = bias + Σ_j W_ij x_j[t - f_ij]            feedforward synapses (or a[t] = x[t])
//   r[t]  = Σ_j V_ij s_j[t - l_ij]                   recurrent synapses, lags l ≥ 1 (or none)
//   LIF:  h = (gain·a + offset + m ⊙ r) + leak·v,  s = Θ(h - θ),  v = reset(h, s)   (lif.h)
//   LI:   v = leak·v + gain·a                          (the readout: out[t] = v)
//
// Inputs and spikes are read event by event: a presynaptic value that is 0 adds nothing, so a
// step costs O(N) per non-zero input or spike (plus O(N²) lookups for per-synapse recurrent
// lags), which at batch 1 with sparse spikes is far below a dense GEMV. Sums run over j in
// index order. The inputs before the chunk (x_past, (Hf, B, I)) and the spikes before it
// (s_past, (Hr, B, N)) are time-major, oldest first; the kernel writes the last rows of
// "past, then this chunk" into x_past_out and s_past_out (zero-padded in front), which may be
// the same tensors as x_past and s_past.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "lif.h"

#include <algorithm>
#include <initializer_list>
#include <cstdint>
#include <vector>

namespace {

using delrec::LIFConstants;
using delrec::LIFUpdate;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "delrec ring kernel: ", what); }

// Lags of a projection into N neurons from I inputs: one per input (I,), one per synapse
// stored input-major (I, N), or none (all 0).
struct Lags {
  const int64_t* data = nullptr;
  bool per_synapse = false;
  int64_t n = 0;
  int64_t of(int64_t j, int64_t i) const {
    return data == nullptr ? 0 : (per_synapse ? data[j * n + i] : data[j]);
  }
};

Lags lags_of(const at::Tensor& lags, int64_t inputs, int64_t n) {
  Lags out;
  out.n = n;
  if (!lags.defined() || lags.numel() == 0) return out;
  check(lags.scalar_type() == at::kLong && lags.is_contiguous(), "lags must be contiguous int64");
  out.per_synapse = lags.dim() == 2;
  check(out.per_synapse ? (lags.size(0) == inputs && lags.size(1) == n)
                        : (lags.dim() == 1 && lags.size(0) == inputs),
        "lags must be (I,) or (I, N)");
  out.data = lags.data_ptr<int64_t>();
  return out;
}

// A layer's constants: the projections (empty tensors where absent) and the neuron.
struct Layer {
  at::Tensor ff_weight_t, ff_lags, ff_bias, rec_weight_t, rec_lags;
  int64_t size;
  bool integrator;
  double gain, offset, leak, threshold, v_reset;
  bool soft_reset;

  Layer(at::Tensor ff_weight_t, at::Tensor ff_lags, at::Tensor ff_bias, at::Tensor rec_weight_t,
        at::Tensor rec_lags, int64_t size, bool integrator, double gain, double offset,
        double leak, double threshold, double v_reset, bool soft_reset)
      : ff_weight_t(std::move(ff_weight_t)), ff_lags(std::move(ff_lags)),
        ff_bias(std::move(ff_bias)), rec_weight_t(std::move(rec_weight_t)),
        rec_lags(std::move(rec_lags)), size(size), integrator(integrator), gain(gain),
        offset(offset), leak(leak), threshold(threshold), v_reset(v_reset),
        soft_reset(soft_reset) {}

  void forward(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& v,
               const at::Tensor& x_past, const at::Tensor& s_past, at::Tensor out,
               at::Tensor v_out, at::Tensor x_past_out, at::Tensor s_past_out) const;
};

template <typename scalar_t>
void layer_loop(const Layer& layer, const at::Tensor& input, const Lags& ff_lags,
                const Lags& rec_lags, const at::Tensor& mask, const at::Tensor& x_past,
                const at::Tensor& s_past, at::Tensor v, at::Tensor out, at::Tensor x_past_out,
                at::Tensor s_past_out) {
  const at::Tensor& ff_weight_t = layer.ff_weight_t;
  const at::Tensor& ff_bias = layer.ff_bias;
  const at::Tensor& rec_weight_t = layer.rec_weight_t;
  const bool integrator = layer.integrator;
  const double gain_d = layer.gain, offset_d = layer.offset;
  const LIFConstants constants{layer.leak, 0.0, layer.threshold, layer.v_reset,
                               layer.soft_reset, false, 0, 0.0};
  const int64_t steps = input.size(0), batch = input.size(1), inputs = input.size(2);
  const int64_t n = out.size(2);
  const bool feedforward = ff_weight_t.numel() > 0, recurrent = rec_weight_t.numel() > 0;
  const int64_t hf = x_past.size(0), hr = s_past.size(0);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* wf = feedforward ? ff_weight_t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* bias = ff_bias.numel() ? ff_bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* wr = recurrent ? rec_weight_t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* m = mask.numel() ? mask.data_ptr<scalar_t>() : nullptr;
  const scalar_t* xp = x_past.data_ptr<scalar_t>();
  const scalar_t* sp = s_past.data_ptr<scalar_t>();
  scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const LIFUpdate<scalar_t> lif(constants);
  const scalar_t gain = gain_d, offset = offset_d;
  const bool plain_drive = gain_d == 1.0 && offset_d == 0.0;
  const int64_t hf_out = x_past_out.size(0), hr_out = s_past_out.size(0);
  scalar_t* xpo = x_past_out.data_ptr<scalar_t>();
  scalar_t* spo = s_past_out.data_ptr<scalar_t>();

  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> a(n), r(n);
    for (int64_t b = b0; b < b1; ++b) {
      // row k of the windows "past, then this chunk": the past rows, then the chunk's inputs
      // and the spikes written so far (out holds this chunk's spikes)
      const auto x_at = [&](int64_t row, int64_t j) {
        if (row < 0) return scalar_t(0);
        return row < hf ? xp[(row * batch + b) * inputs + j]
                        : x[((row - hf) * batch + b) * inputs + j];
      };
      const auto s_at = [&](int64_t row, int64_t j) {
        if (row < 0) return scalar_t(0);
        return row < hr ? sp[(row * batch + b) * n + j] : o[((row - hr) * batch + b) * n + j];
      };
      scalar_t* vb = vp + b * n;
      const scalar_t* mb = m ? m + b * n : nullptr;
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t now_x = hf + t, now_s = hr + t;
        const scalar_t* xt = x + (t * batch + b) * inputs;
        if (feedforward) {  // a = bias + Σ_j W_ij x_j[t - f_ij], event by event
          for (int64_t i = 0; i < n; ++i) a[i] = bias ? bias[i] : scalar_t(0);
          for (int64_t j = 0; j < inputs; ++j) {
            const scalar_t* wj = wf + j * n;
            if (!ff_lags.per_synapse) {
              const int64_t lag = ff_lags.of(j, 0);
              const scalar_t xj = lag == 0 ? xt[j] : x_at(now_x - lag, j);
              if (xj != scalar_t(0)) {
                for (int64_t i = 0; i < n; ++i) a[i] += xj * wj[i];
              }
            } else {
              for (int64_t i = 0; i < n; ++i) {
                const scalar_t xj = x_at(now_x - ff_lags.of(j, i), j);
                if (xj != scalar_t(0)) a[i] += xj * wj[i];
              }
            }
          }
        } else {
          std::copy(xt, xt + inputs, a.begin());
        }
        scalar_t* ot = o + (t * batch + b) * n;
        if (integrator) {
          for (int64_t i = 0; i < n; ++i) {
            vb[i] = lif.leak * vb[i] + gain * a[i];
            ot[i] = vb[i];
          }
          continue;
        }
        std::fill(r.begin(), r.end(), scalar_t(0));
        if (recurrent) {  // r = Σ_j V_ij s_j[t - l_ij], spike by spike
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* wj = wr + j * n;
            if (!rec_lags.per_synapse) {
              if (s_at(now_s - rec_lags.of(j, 0), j) != scalar_t(0)) {
                for (int64_t i = 0; i < n; ++i) r[i] += wj[i];
              }
            } else {
              for (int64_t i = 0; i < n; ++i) {
                if (s_at(now_s - rec_lags.of(j, i), j) != scalar_t(0)) r[i] += wj[i];
              }
            }
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t drive = plain_drive ? a[i] : a[i] * gain + offset;
          const scalar_t h = lif.charge(drive, mb ? mb[i] * r[i] : r[i], vb[i]);
          const bool spike = lif.fires(h);
          vb[i] = lif.reset_after(h, spike);
          ot[i] = spike ? scalar_t(1) : scalar_t(0);
        }
      }
      // the last rows of the windows, in increasing order: an output that is the past tensor
      // itself keeps its length, so each row is read (at row + steps) before it is written
      for (int64_t k = 0; k < hf_out; ++k) {
        const int64_t row = hf + steps - hf_out + k;
        scalar_t* dest = xpo + (k * batch + b) * inputs;
        for (int64_t j = 0; j < inputs; ++j) dest[j] = x_at(row, j);
      }
      for (int64_t k = 0; k < hr_out; ++k) {
        const int64_t row = hr + steps - hr_out + k;
        scalar_t* dest = spo + (k * batch + b) * n;
        for (int64_t j = 0; j < n; ++j) dest[j] = integrator ? scalar_t(0) : s_at(row, j);
      }
    }
  });
}

void Layer::forward(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& v,
                    const at::Tensor& x_past, const at::Tensor& s_past, at::Tensor out,
                    at::Tensor v_out, at::Tensor x_past_out, at::Tensor s_past_out) const {
  check(input.device().is_cpu() && input.is_contiguous() && input.dim() == 3,
        "the input must be a contiguous (T, B, I) CPU tensor");
  const int64_t batch = input.size(1), inputs = input.size(2), n = size;
  const auto dtype = input.scalar_type();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &ff_weight_t, &ff_bias, &x_past, &rec_weight_t, &mask, &s_past, &v, &out, &v_out,
           &x_past_out, &s_past_out}) {
    check(t->numel() == 0 || (t->scalar_type() == dtype && t->is_contiguous()),
          "every tensor must be contiguous, in the input's dtype");
  }
  check(out.dim() == 3 && out.size(0) == input.size(0) && out.size(1) == batch && out.size(2) == n,
        "out must be (T, B, N)");
  check(ff_weight_t.numel() ? ff_weight_t.size(0) == inputs && ff_weight_t.size(1) == n
                            : inputs == n,
        "feedforward weights must be (I, N), or the input the current (I = N)");
  check(x_past.dim() == 3 && x_past.size(1) == batch && x_past.size(2) == inputs &&
            x_past_out.dim() == 3 && x_past_out.size(1) == batch && x_past_out.size(2) == inputs,
        "past inputs must be (Hf, B, I)");
  check(s_past.dim() == 3 && s_past.size(1) == batch && s_past.size(2) == n &&
            s_past_out.dim() == 3 && s_past_out.size(1) == batch && s_past_out.size(2) == n,
        "past spikes must be (Hr, B, N)");
  check(v.dim() == 2 && v.size(0) == batch && v.size(1) == n && v_out.sizes() == v.sizes(),
        "v must be (B, N)");
  check(rec_weight_t.numel() == 0 || (rec_weight_t.size(0) == n && rec_weight_t.size(1) == n),
        "recurrent weights must be (N, N)");
  const Lags ff = lags_of(ff_lags, inputs, n), rec = lags_of(rec_lags, n, n);
  if (!v_out.is_same(v)) v_out.copy_(v);
  AT_DISPATCH_FLOATING_TYPES(dtype, "delrec_ring_layer", [&] {
    layer_loop<scalar_t>(*this, input, ff, rec, mask, x_past, s_past, v_out, out, x_past_out,
                         s_past_out);
  });
}

// A stack of layers over a chunk, each feeding the next, every state updated in place:
// the outputs (T, B, N_l) of every layer.
std::vector<at::Tensor> stack_forward(const std::vector<const Layer*>& layers,
                                      const at::Tensor& input, const std::vector<at::Tensor>& v,
                                      const std::vector<at::Tensor>& x_past,
                                      const std::vector<at::Tensor>& s_past) {
  check(v.size() == layers.size() && x_past.size() == layers.size() &&
            s_past.size() == layers.size(),
        "one state per layer");
  std::vector<at::Tensor> outs;
  at::Tensor x = input.contiguous();
  const at::Tensor no_mask = at::empty({0}, x.options());
  for (size_t l = 0; l < layers.size(); ++l) {
    at::Tensor out = at::empty({x.size(0), x.size(1), layers[l]->size}, x.options());
    layers[l]->forward(x, no_mask, v[l], x_past[l], s_past[l], out, v[l], x_past[l], s_past[l]);
    outs.push_back(out);
    x = out;
  }
  return outs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delrec: integer-delay layers, a chunk at a time from their state";
  pybind11::class_<Layer>(m, "Layer")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                          bool, double, double, double, double, double, bool>())
      .def("forward", &Layer::forward,
           "one layer over a chunk: fills out and the state after it (v, past inputs, past "
           "spikes; may be the state's own tensors)");
  m.def("stack_forward", &stack_forward,
        "layers over a chunk, each feeding the next, states updated in place; their outputs");
}
