// The op schemas of torch.ops.ssmblocks_cpu and their CPU implementations, the entry points of the other
// kernel files (kernels.h); and vector_bytes, the vector unit the kernels use (64: AVX-512, 32: AVX2,
// 16: baseline). ssmblocks/ops/cpu_kernel.py builds and loads them; each op's reference is named in its file.

#include <torch/library.h>

#include <cstdint>

#include "kernels.h"
#include "vectors.h"

using namespace ssmblocks_cpu;

TORCH_LIBRARY(ssmblocks_cpu, m) {
  m.def(
      "selective_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? initial_state) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_step(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor(a!) state, Tensor? D, "
      "Tensor? z) -> Tensor");
  m.def(
      "ssd_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? initial_state) -> (Tensor, "
      "Tensor)");
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? z, Tensor weight, float eps, int group_size, bool norm_before_gate) -> Tensor");
  m.def("norm_linear(Tensor x, Tensor norm_weight, float eps, Tensor weight, Tensor? bias) -> Tensor");
  m.def("vector_bytes() -> int", [] { return int64_t(vector_bytes()); });  // which variant runs, for the tests
  m.def("causal_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor(a!)? state, bool silu) -> Tensor");
  m.def("causal_conv1d_step(Tensor x, Tensor(a!) state, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "selective_ssm_step(Tensor x, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor in_proj_weight, "
      "Tensor? in_proj_bias, Tensor conv_weight, Tensor? conv_bias, Tensor x_proj_weight, Tensor dt_proj_weight, "
      "Tensor? dt_proj_bias, Tensor A_log, Tensor? D, Tensor out_proj_weight, Tensor? out_proj_bias, "
      "Tensor? block_norm_weight, float block_norm_eps) -> Tensor");
  m.def(
      "ssd_mixer_step(Tensor x, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor in_proj_weight, "
      "Tensor? in_proj_bias, Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor A_log, Tensor? D, "
      "float dt_min, float dt_max, Tensor norm_weight, float eps, int group_size, bool norm_before_gate, "
      "Tensor out_proj_weight, Tensor? out_proj_bias, Tensor? block_norm_weight, float block_norm_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssmblocks_cpu, CPU, m) {
  m.impl("selective_scan", &selective_scan);
  m.impl("selective_scan_step", &selective_scan_step);
  m.impl("ssd_scan", &ssd_scan);
  m.impl("small_batch_linear", &small_batch_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("norm_linear", &norm_linear);
  m.impl("causal_conv1d", &causal_conv1d);
  m.impl("causal_conv1d_step", &causal_conv1d_step);
  m.impl("selective_ssm_step", &selective_ssm_step);
  m.impl("ssd_mixer_step", &ssd_mixer_step);
}
