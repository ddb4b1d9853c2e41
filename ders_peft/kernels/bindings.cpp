// Python bindings of the compiled CPU kernels (decode_cpu.cpp: generation; train_cpu.cpp: the training step).
#include <torch/extension.h>

#include <vector>

torch::Tensor lowrank_decode(const torch::Tensor& x, const std::vector<torch::Tensor>& base_in,
                             const torch::Tensor& w_down, const torch::Tensor& stacked,
                             const std::vector<torch::Tensor>& b_in, const torch::Tensor& a_out,
                             const torch::Tensor& b_out_t, int64_t num_experts, int64_t rank, int64_t top_k,
                             bool normalize, bool shared, double mix);
torch::Tensor sparse_decode(const torch::Tensor& x, const std::vector<torch::Tensor>& base_in,
                            const torch::Tensor& w_down, const torch::Tensor& router,
                            const std::vector<torch::Tensor>& values_in, const std::vector<torch::Tensor>& index_in,
                            const std::vector<double>& scale_in, const torch::Tensor& values_out,
                            const torch::Tensor& index_out, double scale_out, int64_t top_k, bool normalize,
                            bool shared, double mix);
std::vector<torch::Tensor> lowrank_slots_forward(const torch::Tensor& base, const torch::Tensor& z, int64_t og,
                                                 int64_t ou, const torch::Tensor& idx, const torch::Tensor& w,
                                                 const torch::Tensor& bg, const torch::Tensor& bu,
                                                 const torch::Tensor& a, int64_t R);
std::vector<torch::Tensor> lowrank_slots_backward(const torch::Tensor& d_mixed, const torch::Tensor& d_z_out,
                                                  const torch::Tensor& base, const torch::Tensor& z, int64_t og,
                                                  int64_t ou, const torch::Tensor& idx, const torch::Tensor& w,
                                                  const torch::Tensor& bg, const torch::Tensor& bu,
                                                  const torch::Tensor& a, const torch::Tensor& z_slots, int64_t R);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_decode", &lowrank_decode, "DeRS low-rank layer for a few tokens (CPU, float32, gated SiLU)");
  m.def("sparse_decode", &sparse_decode, "DeRS sparse layer for a few tokens (CPU, float32, gated SiLU)");
  m.def("lowrank_slots_forward", &lowrank_slots_forward, "Per-slot part of a low-rank DeRS layer, training forward");
  m.def("lowrank_slots_backward", &lowrank_slots_backward, "Its backward (recomputes the per-slot activations)");
}
