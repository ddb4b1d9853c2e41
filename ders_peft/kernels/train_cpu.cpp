// The per-slot part of a DeRS low-rank routed FFN in training (forward and backward), CPU, float32, gated SiLU.
//
// Same function as ders_peft/functional.py::_LowRankSlots. For token t and slot s (expert e, router weight w):
//     g = base_gate[t] + sum_k zg[t, e*R + k] Bg[e, k]        u = base_up[t] + sum_k zu[t, e*R + k] Bu[e, k]
//     h = silu(g) * u,   mixed[t] += w h,   zd[t, s, k] = <h, A[e, k]>,   z_out[t, e*R + k] += w zd[t, s, k]
// (Bg, Bu, A: (E, R, I), expert-major, so a slot reads only its own expert's R rows). The Python path computes the
// same with a dozen tensor operations over (tokens, slots, intermediate) temporaries and recomputes them in backward;
// here every slot's row is computed once per pass in registers, forward and backward, with nothing of size
// (tokens, slots, intermediate) written to memory. Backward recomputes g, u and h (nothing large is saved).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

using ders_kernels::dot;
using ders_kernels::sigmoid;

struct Shapes {
  int64_t T, S, I, E, Z;
};

Shapes check(const torch::Tensor& base, const torch::Tensor& z, const torch::Tensor& idx, const torch::Tensor& w,
             const torch::Tensor& bg, const torch::Tensor& bu, const torch::Tensor& a, int64_t R) {
  for (const auto* t : {&base, &z, &w, &bg, &bu, &a}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "ders_peft train kernel: float32 contiguous CPU tensors expected");
  }
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous(), "ders_peft train kernel: int64 indices");
  const int64_t T = base.size(0), I = base.size(1) / 2, E = bg.size(0);
  TORCH_CHECK(bg.size(1) == R && bg.size(2) == I && bu.sizes() == bg.sizes() && a.sizes() == bg.sizes(),
              "ders_peft train kernel: factors must be (E, R, I)");
  TORCH_CHECK(idx.size(0) == T && w.sizes() == idx.sizes() && z.size(0) == T, "ders_peft train kernel: shapes");
  return {T, idx.size(1), I, E, z.size(1)};
}

template <int R>
void forward_rows(int64_t t0, int64_t t1, const Shapes& sh, const float* base, const float* z, int64_t og, int64_t ou,
                  const int64_t* idx, const float* w, const float* bg, const float* bu, const float* a, float* mixed,
                  float* z_out, float* z_slots) {
  const int64_t I = sh.I, S = sh.S;
  std::vector<float> row(I);  // the slot's h, in L1
  float* __restrict H = row.data();
  for (int64_t t = t0; t < t1; ++t) {
    const float* __restrict G = base + t * 2 * I;
    const float* __restrict U = G + I;
    float* __restrict M = mixed + t * I;
    std::fill(M, M + I, 0.0f);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = idx[t * S + s];
      const float ww = w[t * S + s];
      float cg[R], cu[R];
      for (int k = 0; k < R; ++k) {
        cg[k] = z[t * sh.Z + og + e * R + k];
        cu[k] = z[t * sh.Z + ou + e * R + k];
      }
      const float* __restrict Bg = bg + e * R * I;
      const float* __restrict Bu = bu + e * R * I;
      const float* __restrict A = a + e * R * I;
      // (written out here and in backward: an inline helper with reference outputs stops GCC 12 vectorising the loop)
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        float g = G[i], u = U[i];
        for (int k = 0; k < R; ++k) {
          g += cg[k] * Bg[k * I + i];
          u += cu[k] * Bu[k * I + i];
        }
        const float h = g * sigmoid(g) * u;
        H[i] = h;
        M[i] += ww * h;
      }
      float acc[R];
      for (int k = 0; k < R; ++k) acc[k] = dot(H, A + k * I, I);
      for (int k = 0; k < R; ++k) {
        z_slots[(t * S + s) * R + k] = acc[k];
        z_out[t * sh.E * R + e * R + k] += ww * acc[k];
      }
    }
  }
}

// acc: this thread's (3, E, R, I) gradient accumulators of Bg, Bu and A.
template <int R>
void backward_rows(int64_t t0, int64_t t1, const Shapes& sh, const float* d_mixed, const float* d_z_out,
                   const float* base, const float* z, int64_t og, int64_t ou, const int64_t* idx, const float* w,
                   const float* bg, const float* bu, const float* a, const float* z_slots, float* d_w, float* d_z,
                   float* d_base, float* acc) {
  const int64_t I = sh.I, S = sh.S, ER = sh.E * R;
  std::vector<float> rows(2 * I);  // the slot's d gate and d up, in L1
  float* __restrict DG = rows.data();
  float* __restrict DU = DG + I;
  for (int64_t t = t0; t < t1; ++t) {
    const float* __restrict G = base + t * 2 * I;
    const float* __restrict U = G + I;
    const float* __restrict dM = d_mixed + t * I;
    const float* dzo = d_z_out + t * ER;
    float* __restrict dG = d_base + t * 2 * I;
    float* __restrict dU = dG + I;
    std::fill(dG, dG + 2 * I, 0.0f);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = idx[t * S + s];
      const float ww = w[t * S + s];
      float cg[R], cu[R], c[R], rg[R], ru[R];
      float dw = 0.0f;
      for (int k = 0; k < R; ++k) {
        cg[k] = z[t * sh.Z + og + e * R + k];
        cu[k] = z[t * sh.Z + ou + e * R + k];
        c[k] = ww * dzo[e * R + k];  // gradient of the slot's zd[k]
        dw += dzo[e * R + k] * z_slots[(t * S + s) * R + k];
      }
      const float* __restrict Bg = bg + e * R * I;
      const float* __restrict Bu = bu + e * R * I;
      const float* __restrict A = a + e * R * I;
      float* __restrict dBg = acc + e * R * I;
      float* __restrict dBu = acc + (sh.E + e) * R * I;
      float* __restrict dA = acc + (2 * sh.E + e) * R * I;
      // one pass: recompute the slot's row, its gradients, the router-weight dot and the factor gradients (axpys);
      // the dots with Bg and Bu follow (reductions into R-arrays inside this loop stop GCC 12 vectorising it)
      float dwh = 0.0f;
#pragma omp simd reduction(+ : dwh)
      for (int64_t i = 0; i < I; ++i) {
        float g = G[i], u = U[i];
        for (int k = 0; k < R; ++k) {
          g += cg[k] * Bg[k * I + i];
          u += cu[k] * Bu[k * I + i];
        }
        const float sig = sigmoid(g);
        const float act = g * sig;
        const float h = act * u;
        const float dmi = dM[i];
        float dh = ww * dmi;
        for (int k = 0; k < R; ++k) dh += c[k] * A[k * I + i];
        const float du = dh * act;
        const float dg = dh * u * sig * (1.0f + g * (1.0f - sig));
        DG[i] = dg;
        DU[i] = du;
        dG[i] += dg;
        dU[i] += du;
        dwh += h * dmi;
        for (int k = 0; k < R; ++k) {
          dBg[k * I + i] += cg[k] * dg;
          dBu[k * I + i] += cu[k] * du;
          dA[k * I + i] += c[k] * h;
        }
      }
      for (int k = 0; k < R; ++k) {
        rg[k] = dot(DG, Bg + k * I, I);
        ru[k] = dot(DU, Bu + k * I, I);
      }
      d_w[t * S + s] = dw + dwh;
      for (int k = 0; k < R; ++k) {
        d_z[t * sh.Z + og + e * R + k] += rg[k];
        d_z[t * sh.Z + ou + e * R + k] += ru[k];
      }
    }
  }
}

constexpr int64_t kGrain = 16;  // tokens per parallel task

template <typename F>
void dispatch_rank(int64_t R, F&& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, "ders_peft train kernel: rank must be 1, 2, 4, 8 or 16, got ", R);
  }
}

}  // namespace

// base: (T, 2I), the gate and up base pre-activations side by side; z: (T, Z), the gate's and up's z = x A^T at
// column offsets og and ou (equal for one fused gate_up projection); idx, w: (T, S); bg, bu, a: (E, R, I).
// Returns mixed (T, I), z_out (T, E*R), z_slots (T, S, R).
std::vector<torch::Tensor> lowrank_slots_forward(const torch::Tensor& base, const torch::Tensor& z, int64_t og,
                                                 int64_t ou, const torch::Tensor& idx, const torch::Tensor& w,
                                                 const torch::Tensor& bg, const torch::Tensor& bu,
                                                 const torch::Tensor& a, int64_t R) {
  const Shapes sh = check(base, z, idx, w, bg, bu, a, R);
  auto mixed = torch::empty({sh.T, sh.I}, base.options());
  auto z_out = torch::zeros({sh.T, sh.E * R}, base.options());
  auto z_slots = torch::empty({sh.T, sh.S, R}, base.options());
  dispatch_rank(R, [&](auto rank) {
    at::parallel_for(0, sh.T, kGrain, [&](int64_t t0, int64_t t1) {
      forward_rows<decltype(rank)::value>(t0, t1, sh, base.data_ptr<float>(), z.data_ptr<float>(), og, ou,
                                          idx.data_ptr<int64_t>(), w.data_ptr<float>(), bg.data_ptr<float>(),
                                          bu.data_ptr<float>(), a.data_ptr<float>(), mixed.data_ptr<float>(),
                                          z_out.data_ptr<float>(), z_slots.data_ptr<float>());
    });
  });
  return {mixed, z_out, z_slots};
}

// Returns d_w (T, S), d_z (T, Z), d_base (T, 2I), d_bg, d_bu, d_a (E, R, I).
std::vector<torch::Tensor> lowrank_slots_backward(const torch::Tensor& d_mixed, const torch::Tensor& d_z_out,
                                                  const torch::Tensor& base, const torch::Tensor& z, int64_t og,
                                                  int64_t ou, const torch::Tensor& idx, const torch::Tensor& w,
                                                  const torch::Tensor& bg, const torch::Tensor& bu,
                                                  const torch::Tensor& a, const torch::Tensor& z_slots, int64_t R) {
  const Shapes sh = check(base, z, idx, w, bg, bu, a, R);
  TORCH_CHECK(d_mixed.is_contiguous() && d_z_out.is_contiguous() && d_mixed.scalar_type() == at::kFloat &&
                  d_z_out.scalar_type() == at::kFloat,
              "ders_peft train kernel: float32 contiguous gradients expected");
  auto d_w = torch::empty({sh.T, sh.S}, base.options());
  auto d_z = torch::zeros({sh.T, sh.Z}, base.options());
  auto d_base = torch::empty({sh.T, 2 * sh.I}, base.options());
  const int64_t threads = at::get_num_threads();
  auto acc = torch::zeros({threads, 3, sh.E, R, sh.I}, base.options());  // per-thread factor gradients
  dispatch_rank(R, [&](auto rank) {
    at::parallel_for(0, sh.T, kGrain, [&](int64_t t0, int64_t t1) {
      float* mine = acc.data_ptr<float>() + at::get_thread_num() * 3 * sh.E * R * sh.I;
      backward_rows<decltype(rank)::value>(t0, t1, sh, d_mixed.data_ptr<float>(), d_z_out.data_ptr<float>(),
                                           base.data_ptr<float>(), z.data_ptr<float>(), og, ou,
                                           idx.data_ptr<int64_t>(), w.data_ptr<float>(), bg.data_ptr<float>(),
                                           bu.data_ptr<float>(), a.data_ptr<float>(), z_slots.data_ptr<float>(),
                                           d_w.data_ptr<float>(), d_z.data_ptr<float>(), d_base.data_ptr<float>(),
                                           mine);
    });
  });
  auto grads = threads == 1 ? acc[0] : acc.sum(0);
  return {d_w, d_z, d_base, grads[0], grads[1], grads[2]};
}
