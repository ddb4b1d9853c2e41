// One call for a DeRS low-rank or sparse layer on a few tokens (generation), CPU, float32, gated SiLU, no biases.
//
// Same arithmetic as ders_peft/decode.py::_lowrank: the router logits and every expert's z = x A^T come from one
// matmul over stacked rows; the base projections run once on x; each slot adds its expert's B z to the base
// pre-activation, applies SiLU(gate) * up, and is mixed by its router weight before the base down projection; the
// down-side delta mixes the slots' A_out h the same way before one product with B_out. The big products are ATen
// matmuls; the per-slot work, a few thousand multiply-adds, is plain loops instead of about twenty small tensor ops.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "vec_math.h"

namespace {

using ders_kernels::axpy;
using ders_kernels::DivMod;
using ders_kernels::dot;
using ders_kernels::silu;

// Expert indices and weights of one token, as ders_peft.decode.route_small.
void route_token(const float* logits, int64_t n, int64_t top_k, bool normalize, bool shared, float mix,
                 std::vector<int64_t>& idx, std::vector<float>& w) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                    [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  idx.assign(order.begin(), order.begin() + top_k);
  w.resize(top_k);
  const float top = logits[idx[0]];
  if (normalize) {  // softmax over the top-k logits
    float sum = 0.0f;
    for (int64_t s = 0; s < top_k; ++s) sum += (w[s] = std::exp(logits[idx[s]] - top));
    for (auto& v : w) v /= sum;
  } else {  // top-k of the softmax over every logit
    float sum = 0.0f;
    for (int64_t e = 0; e < n; ++e) sum += std::exp(logits[e] - top);
    for (int64_t s = 0; s < top_k; ++s) w[s] = std::exp(logits[idx[s]] - top) / sum;
  }
  if (shared) {
    for (auto& v : w) v *= mix;
    idx.push_back(n);
    w.push_back(mix);
  }
}

}  // namespace

// b_in[j]: (E, r, out_j) and a_out: (E, r, inter), expert-major copies of the stacked factors with each rank
// component's row contiguous, so that a slot reads only its own expert's rows and every per-slot loop runs over a
// contiguous row (vectorised); b_out_t: (E*r, hidden), whose rows of one expert are contiguous already.
torch::Tensor lowrank_decode(const torch::Tensor& x, const std::vector<torch::Tensor>& base_in,
                             const torch::Tensor& w_down, const torch::Tensor& stacked,
                             const std::vector<torch::Tensor>& b_in, const torch::Tensor& a_out,
                             const torch::Tensor& b_out_t, int64_t num_experts, int64_t rank, int64_t top_k,
                             bool normalize, bool shared, double mix) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (T, hidden) float32");
  TORCH_CHECK(base_in.size() == b_in.size() && (base_in.size() == 1 || base_in.size() == 2), "1 or 2 input projections");
  const int64_t T = x.size(0), n_in = base_in.size();
  const int64_t num_deltas = a_out.size(0), inter = a_out.size(2), hidden = b_out_t.size(1);
  const int64_t width = num_deltas * rank;
  TORCH_CHECK(a_out.is_contiguous() && a_out.size(1) == rank && b_out_t.is_contiguous() && b_out_t.size(0) == width,
              "down-side factors: contiguous (E, r, inter) and (E*r, hidden)");
  int64_t pre_width = 0;
  for (size_t j = 0; j < b_in.size(); ++j) {
    const auto& b = b_in[j];
    TORCH_CHECK(b.is_contiguous() && b.size(0) == num_deltas && b.size(1) == rank && b.size(2) == base_in[j].size(0),
                "B factors: contiguous (E, r, out)");
    pre_width += b.size(2);
  }
  TORCH_CHECK(pre_width == 2 * inter, "the input projections give gate and up: 2 * intermediate outputs in all");
  const int64_t ld = stacked.size(0);
  TORCH_CHECK(ld == num_experts + n_in * width, "stacked rows: router, then each input projection's A");

  at::Tensor small = at::mm(x, stacked.t());  // (T, N + n_in * E*r)
  std::vector<at::Tensor> base;
  for (const auto& w : base_in) base.push_back(at::mm(x, w.t()).contiguous());  // (T, out_j)
  at::Tensor mixed = at::empty({T, inter}, x.options());
  std::vector<float> zmix(T * width, 0.0f);

  const float* sp = small.data_ptr<float>();
  float* mp = mixed.data_ptr<float>();
  std::fill(mp, mp + T * inter, 0.0f);
  std::vector<float> pre(2 * inter), h(inter);  // one slot's [gate | up] pre-activations, then its hidden row
  float* gate = pre.data();
  const float* up = pre.data() + inter;
  std::vector<int64_t> idx;
  std::vector<float> w;
  std::vector<std::vector<int64_t>> slots(T);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = sp + t * ld;
    route_token(row, num_experts, top_k, normalize, shared, static_cast<float>(mix), idx, w);
    for (size_t s = 0; s < idx.size(); ++s) {
      const int64_t e = idx[s];
      slots[t].push_back(e);
      // pre-activations: base + B_e z_e, per input projection (a fused gate_up projection fills both halves)
      float* dst = pre.data();
      for (int64_t j = 0; j < n_in; ++j) {
        const int64_t out = base[j].size(1);
        const float* bp = base[j].data_ptr<float>() + t * out;
        const float* be = b_in[j].data_ptr<float>() + e * rank * out;
        const float* z = row + num_experts + j * width + e * rank;
        std::copy(bp, bp + out, dst);
        for (int64_t k = 0; k < rank; ++k) axpy(dst, z[k], be + k * out, out);
        dst += out;
      }
      const float ws = w[s];
      float* mrow = mp + t * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        h[i] = silu(gate[i]) * up[i];
        mrow[i] += ws * h[i];
      }
      const float* ae = a_out.data_ptr<float>() + e * rank * inter;
      for (int64_t k = 0; k < rank; ++k) zmix[t * width + e * rank + k] += ws * dot(h.data(), ae + k * inter, inter);
    }
  }
  at::Tensor y = at::mm(mixed, w_down.t()).contiguous();  // (T, hidden)
  float* yp = y.data_ptr<float>();
  const float* bo = b_out_t.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {  // + the selected experts' rows of B_out only
    std::vector<int64_t> seen;
    for (const int64_t e : slots[t]) {
      if (std::find(seen.begin(), seen.end(), e) != seen.end()) continue;
      seen.push_back(e);
      for (int64_t k = 0; k < rank; ++k) {
        const float c = zmix[t * width + e * rank + k];
        axpy(yp + t * hidden, c, bo + (e * rank + k) * hidden, hidden);
      }
    }
  }
  return y;
}

// Sparse deltas (DeRS-SM): per slot, the expert's fixed flat positions (int32, row * in + column) and values
// (scale folded in by the caller) add value * x[column] into the base projection's row; on the down side the same
// with h, weighted by the slot's router weight, into the output. As ders_peft/decode.py::_sparse.
torch::Tensor sparse_decode(const torch::Tensor& x, const std::vector<torch::Tensor>& base_in,
                            const torch::Tensor& w_down, const torch::Tensor& router,
                            const std::vector<torch::Tensor>& values_in, const std::vector<torch::Tensor>& index_in,
                            const std::vector<double>& scale_in, const torch::Tensor& values_out,
                            const torch::Tensor& index_out, double scale_out, int64_t top_k, bool normalize,
                            bool shared, double mix) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (T, hidden) float32");
  const int64_t n_in = base_in.size();
  TORCH_CHECK(n_in == 1 || n_in == 2, "1 or 2 input projections");
  TORCH_CHECK(values_in.size() == base_in.size() && index_in.size() == base_in.size() && scale_in.size() == base_in.size(),
              "one delta per projection");
  const int64_t T = x.size(0), hidden = x.size(1), num_experts = router.size(0), inter = w_down.size(1);
  auto check = [](const torch::Tensor& v, const torch::Tensor& i) {
    TORCH_CHECK(v.is_contiguous() && v.scalar_type() == at::kFloat && v.dim() == 2, "values: contiguous (E, nnz) f32");
    TORCH_CHECK(i.is_contiguous() && i.scalar_type() == at::kInt && i.sizes() == v.sizes(), "indices: (E, nnz) int32");
  };
  for (int64_t j = 0; j < n_in; ++j) check(values_in[j], index_in[j]);
  check(values_out, index_out);

  at::Tensor logits = at::mm(x, router.t()).contiguous();  // (T, N)
  std::vector<at::Tensor> base;
  for (const auto& w : base_in) base.push_back(at::mm(x, w.t()).contiguous());
  at::Tensor mixed = at::zeros({T, inter}, x.options());
  at::Tensor extra = at::zeros({T, hidden}, x.options());  // the down-side deltas' contributions
  const float* xp = x.data_ptr<float>();
  const float* lp = logits.data_ptr<float>();
  float* mp = mixed.data_ptr<float>();
  float* ep = extra.data_ptr<float>();
  std::vector<float> gate(inter), up(inter), h(inter);
  std::vector<int64_t> idx;
  std::vector<float> w;
  const DivMod by_hidden(hidden), by_inter(inter);  // flat index -> (row, column) of the (out, in) matrices
  for (int64_t t = 0; t < T; ++t) {
    route_token(lp + t * num_experts, num_experts, top_k, normalize, shared, static_cast<float>(mix), idx, w);
    const float* xt = xp + t * hidden;
    for (size_t s = 0; s < idx.size(); ++s) {
      const int64_t e = idx[s];
      for (int64_t j = 0; j < n_in; ++j) {
        const int64_t out = base[j].size(1), nnz = values_in[j].size(1);
        const float* bp = base[j].data_ptr<float>() + t * out;
        if (n_in == 2) {
          std::copy(bp, bp + out, j == 0 ? gate.data() : up.data());
        } else {
          std::copy(bp, bp + inter, gate.data());
          std::copy(bp + inter, bp + out, up.data());
        }
        const float* v = values_in[j].data_ptr<float>() + e * nnz;
        const int32_t* f = index_in[j].data_ptr<int32_t>() + e * nnz;
        const float scale = static_cast<float>(scale_in[j]);
        for (int64_t n = 0; n < nnz; ++n) {
          int64_t row, col;
          by_hidden(f[n], row, col);
          const float add = scale * v[n] * xt[col];
          if (n_in == 2 && j == 1) {
            up[row] += add;
          } else if (row < inter) {
            gate[row] += add;
          } else {
            up[row - inter] += add;
          }
        }
      }
      const float ws = w[s], wo = w[s] * static_cast<float>(scale_out);
      float* mrow = mp + t * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        h[i] = silu(gate[i]) * up[i];
        mrow[i] += ws * h[i];
      }
      const int64_t nnz = values_out.size(1);
      const float* v = values_out.data_ptr<float>() + e * nnz;
      const int32_t* f = index_out.data_ptr<int32_t>() + e * nnz;
      float* erow = ep + t * hidden;
      for (int64_t n = 0; n < nnz; ++n) {
        int64_t row, col;
        by_inter(f[n], row, col);
        erow[row] += wo * v[n] * h[col];
      }
    }
  }
  return at::mm(mixed, w_down.t()).add_(extra);
}
