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
// Inputs and spikes are read event by event: a presynaptic value that is 0 adds nothing. With
// one lag per presynaptic neuron a non-zero x_j adds the row j of Wᵀ (O(N), vectorised); with
// one lag per synapse the synapses of j are grouped by lag, and a non-zero x_j at a group's lag
// adds that group's weights (O(N²) work only for a dense input). Sums run over j in index
// order. The inputs before the chunk (x_past, (Hf, B, I)) and the spikes before it (s_past,
// (Hr, B, N)) are time-major, oldest first; the kernel writes the last rows of "past, then this
// chunk" into x_past_out and s_past_out (zero-padded in front), which may be the same tensors
// as x_past and s_past.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "lif.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace {

using delrec::LIFConstants;
using delrec::LIFUpdate;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "delrec ring kernel: ", what); }

// Synapses from I inputs to N neurons with integer lags. Column mode: weight_t (I, N) and one
// lag per input, lags (I,) (empty: all 0). Grouped mode (one lag per synapse): the synapses of
// input j are the groups input_groups[j] … input_groups[j+1] - 1, group g has lag group_lag[g]
// and members group_start[g] … group_start[g+1] - 1, each a neuron member[k] and a weight
// member_weight[k]. An absent projection has present = false.
struct Projection {
  bool present = false, grouped = false;
  int64_t inputs = 0, size = 0;
  at::Tensor weight_t, lags, input_groups, group_lag, group_start, member, member_weight;

  Projection() = default;
  Projection(int64_t inputs, int64_t size, at::Tensor weight_t, at::Tensor lags,
             at::Tensor input_groups, at::Tensor group_lag, at::Tensor group_start,
             at::Tensor member, at::Tensor member_weight)
      : present(true), grouped(member_weight.numel() > 0), inputs(inputs), size(size),
        weight_t(std::move(weight_t)), lags(std::move(lags)),
        input_groups(std::move(input_groups)), group_lag(std::move(group_lag)),
        group_start(std::move(group_start)), member(std::move(member)),
        member_weight(std::move(member_weight)) {
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
             &this->lags, &this->input_groups, &this->group_lag, &this->group_start,
             &this->member}) {
      check(t->numel() == 0 || (t->scalar_type() == at::kLong && t->is_contiguous()),
            "lags and groups must be contiguous int64");
    }
    if (grouped) {
      check(this->input_groups.numel() == inputs + 1, "input_groups must be (I + 1,)");
    } else {
      check(this->weight_t.dim() == 2 && this->weight_t.size(0) == inputs &&
                this->weight_t.size(1) == size && this->weight_t.is_contiguous(),
            "weight_t must be a contiguous (I, N)");
      check(this->lags.numel() == 0 || this->lags.numel() == inputs, "lags must be (I,)");
    }
  }

  at::ScalarType dtype() const {
    return grouped ? member_weight.scalar_type() : weight_t.scalar_type();
  }

  // acc[i] += Σ_j W_ij · value_at(now - lag_ij, j), over the inputs whose value is not 0
  template <typename scalar_t, typename Value>
  void accumulate(int64_t now, const Value& value_at, scalar_t* acc) const {
    if (!grouped) {
      const scalar_t* w = weight_t.data_ptr<scalar_t>();
      const int64_t* lag = lags.numel() ? lags.data_ptr<int64_t>() : nullptr;
      for (int64_t j = 0; j < inputs; ++j) {
        const scalar_t xj = value_at(now - (lag ? lag[j] : 0), j);
        if (xj == scalar_t(0)) continue;
        const scalar_t* wj = w + j * size;
        for (int64_t i = 0; i < size; ++i) acc[i] += xj * wj[i];
      }
      return;
    }
    const int64_t* groups = input_groups.data_ptr<int64_t>();
    const int64_t* lag = group_lag.data_ptr<int64_t>();
    const int64_t* start = group_start.data_ptr<int64_t>();
    const int64_t* to = member.data_ptr<int64_t>();
    const scalar_t* w = member_weight.data_ptr<scalar_t>();
    for (int64_t j = 0; j < inputs; ++j) {
      for (int64_t g = groups[j]; g < groups[j + 1]; ++g) {
        const scalar_t xj = value_at(now - lag[g], j);
        if (xj == scalar_t(0)) continue;
        for (int64_t k = start[g]; k < start[g + 1]; ++k) acc[to[k]] += xj * w[k];
      }
    }
  }
};

// A layer's constants: its projections, the bias and the neuron.
struct Layer {
  Projection feedforward, recurrent;
  at::Tensor bias;
  int64_t size;
  bool integrator;
  double gain, offset, leak, threshold, v_reset;
  bool soft_reset;

  Layer(const Projection& feedforward, const Projection& recurrent, at::Tensor bias,
        int64_t size, bool integrator, double gain, double offset, double leak,
        double threshold, double v_reset, bool soft_reset)
      : feedforward(feedforward), recurrent(recurrent), bias(std::move(bias)), size(size),
        integrator(integrator), gain(gain), offset(offset), leak(leak), threshold(threshold),
        v_reset(v_reset), soft_reset(soft_reset) {
    check(!feedforward.present || feedforward.size == size, "feedforward synapses into N");
    check(!recurrent.present || (recurrent.size == size && recurrent.inputs == size),
          "recurrent synapses (N, N)");
  }

  void forward(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& v,
               const at::Tensor& x_past, const at::Tensor& s_past, at::Tensor out,
               at::Tensor v_out, at::Tensor x_past_out, at::Tensor s_past_out) const;
};

template <typename scalar_t>
void layer_loop(const Layer& layer, const at::Tensor& input, const at::Tensor& mask,
                const at::Tensor& x_past, const at::Tensor& s_past, at::Tensor v, at::Tensor out,
                at::Tensor x_past_out, at::Tensor s_past_out) {
  const int64_t steps = input.size(0), batch = input.size(1), inputs = input.size(2);
  const int64_t n = layer.size, hf = x_past.size(0), hr = s_past.size(0);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* bias = layer.bias.numel() ? layer.bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* m = mask.numel() ? mask.data_ptr<scalar_t>() : nullptr;
  const scalar_t* xp = x_past.data_ptr<scalar_t>();
  const scalar_t* sp = s_past.data_ptr<scalar_t>();
  scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const LIFUpdate<scalar_t> lif(LIFConstants{layer.leak, 0.0, layer.threshold, layer.v_reset,
                                             layer.soft_reset, false, 0, 0.0});
  const scalar_t gain = layer.gain, offset = layer.offset;
  const bool plain_drive = layer.gain == 1.0 && layer.offset == 0.0;
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
        if (layer.feedforward.present) {
          for (int64_t i = 0; i < n; ++i) a[i] = bias ? bias[i] : scalar_t(0);
          layer.feedforward.accumulate(hf + t, x_at, a.data());
        } else {
          const scalar_t* xt = x + (t * batch + b) * inputs;
          std::copy(xt, xt + inputs, a.begin());
        }
        scalar_t* ot = o + (t * batch + b) * n;
        if (layer.integrator) {
          for (int64_t i = 0; i < n; ++i) {
            vb[i] = lif.leak * vb[i] + gain * a[i];
            ot[i] = vb[i];
          }
          continue;
        }
        std::fill(r.begin(), r.end(), scalar_t(0));
        if (layer.recurrent.present) layer.recurrent.accumulate(hr + t, s_at, r.data());
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
        for (int64_t j = 0; j < n; ++j) dest[j] = layer.integrator ? scalar_t(0) : s_at(row, j);
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
           &bias, &x_past, &mask, &s_past, &v, &out, &v_out, &x_past_out, &s_past_out}) {
    check(t->numel() == 0 || (t->scalar_type() == dtype && t->is_contiguous()),
          "every tensor must be contiguous, in the input's dtype");
  }
  for (const Projection* p : {&feedforward, &recurrent}) {
    check(!p->present || p->dtype() == dtype, "weights must be in the input's dtype");
  }
  check(mask.numel() == 0 || (mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == n),
        "the recurrent dropout mask must be (B, N)");
  check(feedforward.present ? feedforward.inputs == inputs : inputs == n,
        "the input must have the feedforward synapses' I inputs, or be the current (I = N)");
  check(out.dim() == 3 && out.size(0) == input.size(0) && out.size(1) == batch && out.size(2) == n,
        "out must be (T, B, N)");
  check(x_past.dim() == 3 && x_past.size(1) == batch && x_past.size(2) == inputs &&
            x_past_out.dim() == 3 && x_past_out.size(1) == batch && x_past_out.size(2) == inputs,
        "past inputs must be (Hf, B, I)");
  check(s_past.dim() == 3 && s_past.size(1) == batch && s_past.size(2) == n &&
            s_past_out.dim() == 3 && s_past_out.size(1) == batch && s_past_out.size(2) == n,
        "past spikes must be (Hr, B, N)");
  check(v.dim() == 2 && v.size(0) == batch && v.size(1) == n && v_out.sizes() == v.sizes(),
        "v must be (B, N)");
  if (!v_out.is_same(v)) v_out.copy_(v);
  AT_DISPATCH_FLOATING_TYPES(dtype, "delrec_ring_layer", [&] {
    layer_loop<scalar_t>(*this, input, mask, x_past, s_past, v_out, out, x_past_out, s_past_out);
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
  pybind11::class_<Projection>(m, "Projection")
      .def(pybind11::init<>())
      .def(pybind11::init<int64_t, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, at::Tensor>());
  pybind11::class_<Layer>(m, "Layer")
      .def(pybind11::init<const Projection&, const Projection&, at::Tensor, int64_t, bool, double,
                          double, double, double, double, bool>())
      .def("forward", &Layer::forward,
           "one layer over a chunk: fills out and the state after it (v, past inputs, past "
           "spikes; may be the state's own tensors)");
  m.def("stack_forward", &stack_forward,
        "layers over a chunk, each feeding the next, states updated in place; their outputs");
}
