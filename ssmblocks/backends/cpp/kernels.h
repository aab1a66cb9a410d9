// The entry points of the C++ CPU kernels, without autograd, registered as torch.ops.ssmblocks_cpu.* by
// bindings.cpp and built and loaded on first use by ssmblocks/ops/cpu_kernel.py; declared here so that the
// decode steps can call the pieces. Each replaces a torch path of ssmblocks/ops (or of a layer) that stays
// beside it as the reference, named at the top of its file:
//
//   selective_scan, selective_scan_step   Mamba1's recurrence over a sequence (time outermost, each thread's
//                                         channel groups' states in a local buffer) and for one token
//                                         (selective_scan.cpp)
//   ssd_scan                              SSD's recurrence over a sequence, one head's state block at a time
//                                         (ssd_scan.cpp)
//   causal_conv1d, causal_conv1d_step     the depthwise causal conv (+ silu) over a sequence and one token
//                                         (conv.cpp)
//   small_batch_linear                    decode's matrix products at 1..16 rows (MKL is slow at 2..16)
//                                         (linear.cpp)
//   rms_norm                              the (gated) RMS norm (norm.cpp)
//   selective_ssm_step, ssd_mixer_step    decode's whole mixer step (optionally its pre-norm residual block)
//                                         in one call, from the pieces above (decode_steps.cpp)
//   norm_linear                           decode's final norm and LM head in one call (decode_steps.cpp)
//   vector_bytes                          the vector unit the kernels use (64: AVX-512, 32: AVX2, 16: baseline)
//                                         (vectors.h, registered in bindings.cpp)
//
// Each kernel is compiled for AVX-512, AVX2 and the baseline vector unit and picked at run time (vectors.h).
// All take and return tensors of one dtype, float32 or float64, on the CPU.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ssmblocks_cpu {

// selective_scan.cpp: Mamba1's recurrence over a sequence and for one token (scan_step: A_is_log, A holds the
// layer's A_log and A = -exp(A_log) is taken on the fly; selective_scan_step is scan_step with A itself).
std::tuple<at::Tensor, at::Tensor> selective_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                                  const at::Tensor& B, const at::Tensor& C,
                                                  const std::optional<at::Tensor>& D,
                                                  const std::optional<at::Tensor>& z,
                                                  const std::optional<at::Tensor>& h0);
at::Tensor scan_step(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, at::Tensor& state, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& z, bool A_is_log);
at::Tensor selective_scan_step(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& C, at::Tensor& state, const std::optional<at::Tensor>& D,
                               const std::optional<at::Tensor>& z);

// ssd_scan.cpp: SSD's recurrence over a sequence.
std::tuple<at::Tensor, at::Tensor> ssd_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                            const at::Tensor& B, const at::Tensor& C,
                                            const std::optional<at::Tensor>& D,
                                            const std::optional<at::Tensor>& h0);

// conv.cpp: the depthwise causal conv (+ silu) over a sequence and for one token.
at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         std::optional<at::Tensor> state, bool silu);
at::Tensor causal_conv1d_step(const at::Tensor& x, at::Tensor& state, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, bool silu);

// linear.cpp: x weight^T + bias at 1..16 rows.
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// norm.cpp: the (gated) RMS norm, of tensors (rms_norm) and of raw rows (gated_norm, for callers that hold
// their own buffers: ssd_mixer_step normalises the SSD step's output in place).
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& z, const at::Tensor& weight, double eps,
                    int64_t group_size, bool norm_before_gate);

// The (gated) RMS norm of rows: x (rows, d) at row stride sx, z (rows, d) at row stride sz or null, w (d,);
// y (rows, d) contiguous, which may be x. Per group of `group` channels: norm_before_gate ? norm(x) w silu(z) :
// norm(x silu(z)) w; without z, norm(x) w.
template <typename T>
struct GatedNorm {
  using Type = T;
  const T *x, *z, *w;
  T* y;
  int64_t d, group, sx, sz;
  T eps;
  bool norm_before_gate;
};

// The norm of p's `rows` rows, in parallel; defined for float and double.
template <typename T>
void gated_norm(const GatedNorm<T>& p, int64_t rows);

// decode_steps.cpp: decode's one-call steps.
at::Tensor norm_linear(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);
at::Tensor selective_ssm_step(const at::Tensor& x, at::Tensor& conv_state, at::Tensor& ssm_state,
                              const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                              const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                              const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                              const std::optional<at::Tensor>& dt_proj_bias, const at::Tensor& A_log,
                              const std::optional<at::Tensor>& D, const at::Tensor& out_proj_weight,
                              const std::optional<at::Tensor>& out_proj_bias,
                              const std::optional<at::Tensor>& block_norm_weight, double block_norm_eps);
at::Tensor ssd_mixer_step(const at::Tensor& x, at::Tensor& conv_state, at::Tensor& ssm_state,
                          const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                          const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                          const at::Tensor& dt_bias, const at::Tensor& A_log, const std::optional<at::Tensor>& D,
                          double dt_min, double dt_max, const at::Tensor& norm_weight, double eps,
                          int64_t group_size, bool norm_before_gate, const at::Tensor& out_proj_weight,
                          const std::optional<at::Tensor>& out_proj_bias,
                          const std::optional<at::Tensor>& block_norm_weight, double block_norm_eps);

}  // namespace ssmblocks_cpu
