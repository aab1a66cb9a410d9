// Decode's one-call steps, from the entry points of the other kernel files (kernels.h): the whole mixer step,
// optionally its pre-norm residual block, of Mamba1 (selective_ssm_step) and of SSD (ssd_mixer_step, with its
// own one-token SSD kernel), and the final norm and LM head (norm_linear). References: the torch paths the
// layers' forward takes for one token with a state (SelectiveSSM, SSD in ssmblocks/layers/, through
// ssmblocks/ops/: selective_scan_step, ssd_step, conv.py, norm.py, linear.py) and CausalLM.head
// (ssmblocks/model.py); ssmblocks/layers/_fused_step.py says when the calls may run.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/softplus.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "kernels.h"
#include "vectors.h"

namespace ssmblocks_cpu {
namespace {

// One token of SSD (Mamba2) from the rows of the conv's output: x (b, h p) at row stride sx, B and C (b, g n)
// at the same row stride; dt_raw (b, h) at row stride sdt, before the bias and softplus; A_log (h,); D (h,)
// or (h p,), may be null; h (b, h, p, n) contiguous, updated in place; y (b, h p).
template <typename T>
struct SsdStep {
  using Type = T;
  const T *x, *B, *C, *dt_raw, *dt_bias, *A_log, *D;
  T *h, *y;
  int64_t heads, p, n, g, sx, sdt;
  T dt_min, dt_max;
  bool D_per_channel;
};

// Heads h0 .. h1 of batch element b: dt = clamp(softplus(dt_raw + dt_bias)), then for each of the head's p
// rows h <- exp(-dt exp(A_log)) h + (dt x) B, y = h C + D x, in vectors along n (the last n % lanes one by one).
template <typename T, int Bytes>
SSM_INLINE void run(const SsdStep<T>& s, int64_t b, int64_t h0, int64_t h1) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T);
  const int64_t n = s.n, p = s.p, full = n / L * L, per_group = s.heads / s.g;
  for (int64_t hd = h0; hd < h1; ++hd) {
    const T raw = s.dt_raw[b * s.sdt + hd] + s.dt_bias[hd];
    const T dt = std::min(std::max(raw > T(20) ? raw : std::log1p(std::exp(raw)), s.dt_min), s.dt_max);
    const T decay = std::exp(-dt * std::exp(s.A_log[hd]));
    const int64_t bc = b * s.sx + hd / per_group * n;
    const T *Bg = s.B + bc, *Cg = s.C + bc, *x = s.x + b * s.sx + hd * p;
    T* y = s.y + (b * s.heads + hd) * p;
    T* h = s.h + (b * s.heads + hd) * p * n;
    for (int64_t i = 0; i < p; ++i, h += n) {
      const T u = dt * x[i];
      V acc{}, hv, bv, cv;
      for (int64_t k = 0; k < full; k += L) {
        std::memcpy(&hv, h + k, Bytes);
        std::memcpy(&bv, Bg + k, Bytes);
        std::memcpy(&cv, Cg + k, Bytes);
        hv = decay * hv + u * bv;
        std::memcpy(h + k, &hv, Bytes);
        acc += hv * cv;
      }
      T out = lane_sum<T, Bytes>(acc);
      for (int64_t k = full; k < n; ++k) {
        h[k] = decay * h[k] + u * Bg[k];
        out += h[k] * Cg[k];
      }
      y[i] = out + (s.D ? s.D[s.D_per_channel ? hd * p + i : hd] : T(0)) * x[i];
    }
  }
}

// The input of a mixer inside a pre-norm residual block: x (b, d) normalised by RMS with weight (d,), or x
// itself without a weight.
at::Tensor pre_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  return weight ? rms_norm(x, std::nullopt, *weight, eps, x.size(1), false) : x;
}

// The mixer's output, plus the block's input x (b, d) when the call runs a whole pre-norm residual block.
at::Tensor finish_block(const at::Tensor& out, const at::Tensor& x, bool residual) {
  return (residual ? out.add_(x) : out).unsqueeze(1);
}

// x w^T + bias for the rows of decode: the small-batch kernel up to 16 rows (at one row it streams the weights
// as fast as MKL's gemv), torch's linear above.
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return x.size(0) <= 16 ? small_batch_linear(x, weight, bias) : at::linear(x, weight, bias);
}

}  // namespace

// The final norm and the LM head of decode's token, one call: x (b, 1, d) -> rms_norm(x) weight^T + bias
// (b, 1, o); norm_weight (d,), weight (o, d), bias (o,) or None; one dtype, float32 or float64, on the CPU.
at::Tensor norm_linear(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "norm_linear: x must be (b, 1, d), got ", x.sizes());
  return project(pre_norm(x.select(1, 0), norm_weight, eps), weight, bias).unsqueeze(1);
}

// Decode's whole SelectiveSSM (Mamba1) step, one call: x (b, 1, d) -> in_proj -> [x | z] (in_proj_weight
// (2e, d)); x -> conv step + silu (conv_state (b, e, k - 1), conv_weight (e, 1, k), conv_bias (e,) or None) ->
// [dt | B | C] = x x_proj_weight^T (x_proj_weight (r + 2n, e)); dt = softplus(dt dt_proj_weight^T +
// dt_proj_bias) (dt_proj_weight (e, r)); the scan step with A = -exp(A_log) (A_log (e, n)) on ssm_state
// (b, e, n); D (e,) or None; y = (h C + D x) silu(z) -> out_proj (out_proj_weight (d, e)). Biases may be None.
// With block_norm_weight (d,), the call is a whole pre-norm residual block: x + mixer(rms_norm(x)). Both
// states are updated in place; one dtype, float32 or float64, on the CPU. Returns (b, 1, d).
at::Tensor selective_ssm_step(const at::Tensor& x_, at::Tensor& conv_state, at::Tensor& ssm_state,
                              const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                              const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                              const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                              const std::optional<at::Tensor>& dt_proj_bias, const at::Tensor& A_log,
                              const std::optional<at::Tensor>& D, const at::Tensor& out_proj_weight,
                              const std::optional<at::Tensor>& out_proj_bias,
                              const std::optional<at::Tensor>& block_norm_weight, double block_norm_eps) {
  TORCH_CHECK(x_.dim() == 3 && x_.size(1) == 1 && A_log.dim() == 2 && dt_proj_weight.dim() == 2 &&
                  conv_weight.dim() == 3 && conv_weight.size(1) == 1,
              "selective_ssm_step: x must be (b, 1, d), A_log (e, n), dt_proj_weight (e, r) and conv_weight "
              "(e, 1, k)");
  const int64_t e = A_log.size(0), n = A_log.size(1), r = dt_proj_weight.size(1);
  check_arg("selective_ssm_step", x_proj_weight, {r + 2 * n, e}, "x_proj_weight", x_);
  const at::Tensor x = x_.select(1, 0);
  const at::Tensor xz = project(pre_norm(x, block_norm_weight, block_norm_eps), in_proj_weight, in_proj_bias);
  TORCH_CHECK(xz.size(1) == 2 * e, "selective_ssm_step: in_proj gives ", xz.size(1), " features, expected 2e = ",
              2 * e);
  const at::Tensor xc = causal_conv1d_step(xz.narrow(1, 0, e), conv_state, conv_weight.select(1, 0), conv_bias, true);
  const at::Tensor dbc = project(xc, x_proj_weight, std::nullopt);  // (b, r + 2n)
  const at::Tensor dt = at::softplus(project(dbc.narrow(1, 0, r), dt_proj_weight, dt_proj_bias));
  const at::Tensor y =
      scan_step(xc, dt, A_log, dbc.narrow(1, r, n), dbc.narrow(1, r + n, n), ssm_state, D, xz.narrow(1, e, e), true);
  return finish_block(project(y, out_proj_weight, out_proj_bias), x, block_norm_weight.has_value());
}

// Decode's whole SSD (Mamba2) step, one call: x (b, 1, d) -> in_proj -> [z | xBC | dt] (in_proj_weight
// (e + c + h, d), c = e + 2 g n). xBC -> conv step + silu (conv_state (b, c, k - 1), conv_weight (c, 1, k),
// conv_bias (c,) or None); dt = clamp(softplus(dt + dt_bias), dt_min, dt_max) (dt_bias (h,)); the SSD step
// with A = -exp(A_log) (A_log (h,)) on ssm_state (b, h, p, n), e = h p; D (h,) or (e,) or None; the gated
// RMS norm with z over groups of group_size channels (norm_weight (e,)) -> out_proj (out_proj_weight (d, e)).
// Biases may be None. With block_norm_weight (d,), the call is a whole pre-norm residual block:
// x + mixer(rms_norm(x)). Both states are updated in place; one dtype, float32 or float64, on the CPU.
// Returns (b, 1, d).
at::Tensor ssd_mixer_step(const at::Tensor& x_, at::Tensor& conv_state, at::Tensor& ssm_state,
                          const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                          const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                          const at::Tensor& dt_bias, const at::Tensor& A_log, const std::optional<at::Tensor>& D_,
                          double dt_min, double dt_max, const at::Tensor& norm_weight, double eps,
                          int64_t group_size, bool norm_before_gate, const at::Tensor& out_proj_weight,
                          const std::optional<at::Tensor>& out_proj_bias,
                          const std::optional<at::Tensor>& block_norm_weight, double block_norm_eps) {
  TORCH_CHECK(x_.dim() == 3 && x_.size(1) == 1 && ssm_state.dim() == 4 && conv_weight.dim() == 3 &&
                  conv_weight.size(1) == 1,
              "ssd_mixer_step: x must be (b, 1, d), ssm_state (b, h, p, n) and conv_weight (c, 1, k)");
  const int64_t b = x_.size(0), h = ssm_state.size(1), p = ssm_state.size(2), n = ssm_state.size(3);
  const int64_t e = h * p, c = conv_weight.size(0), g = (c - e) / (2 * n);
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    check_arg("ssd_mixer_step", t, shape, name, x_);
    return t.contiguous();
  };
  TORCH_CHECK(g >= 1 && c == e + 2 * g * n && h % g == 0, "ssd_mixer_step: conv_weight has ", c,
              " channels, which is not h p + 2 g n for h = ", h, ", p = ", p, ", n = ", n, " and g dividing h");
  TORCH_CHECK(group_size >= 1 && e % group_size == 0, "ssd_mixer_step: group_size ", group_size,
              " does not divide ", e);
  check(ssm_state, {b, h, p, n}, "ssm_state");
  TORCH_CHECK(ssm_state.is_contiguous(), "ssd_mixer_step: ssm_state must be contiguous");
  const at::Tensor dtb = check(dt_bias, {h}, "dt_bias"), Alog = check(A_log, {h}, "A_log");
  const at::Tensor w = check(norm_weight, {e}, "norm_weight");
  at::Tensor D;
  if (D_) {
    TORCH_CHECK(D_->numel() == h || D_->numel() == e, "ssd_mixer_step: D must be (h,) or (h p,), got ", D_->sizes());
    D = check(*D_, D_->sizes(), "D");
  }
  const at::Tensor x = x_.select(1, 0);
  const at::Tensor zxbcdt = project(pre_norm(x, block_norm_weight, block_norm_eps), in_proj_weight, in_proj_bias);
  TORCH_CHECK(zxbcdt.size(1) == e + c + h, "ssd_mixer_step: in_proj gives ", zxbcdt.size(1),
              " features, expected 2 h p + 2 g n + h = ", e + c + h);
  const at::Tensor xbc =
      causal_conv1d_step(zxbcdt.narrow(1, e, c), conv_state, conv_weight.select(1, 0), conv_bias, true);
  at::Tensor y = at::empty({b, e}, zxbcdt.options());
  AT_DISPATCH_FLOATING_TYPES(zxbcdt.scalar_type(), "ssd_mixer_step", [&] {
    using T = scalar_t;
    const T* xs = xbc.const_data_ptr<T>();
    const SsdStep<T> s{xs, xs + e, xs + e + g * n, zxbcdt.const_data_ptr<T>() + e + c, dtb.const_data_ptr<T>(),
                       Alog.const_data_ptr<T>(), D_ ? D.const_data_ptr<T>() : nullptr,
                       ssm_state.mutable_data_ptr<T>(), y.mutable_data_ptr<T>(), h, p, n, g, c, e + c + h,
                       T(dt_min), T(dt_max), D_ && D.numel() == e};
    parallel_run(s, b, h, std::max<int64_t>(1, 8192 / (p * n)));  // >= 8k state values a thread
    const GatedNorm<T> norm{y.const_data_ptr<T>(), zxbcdt.const_data_ptr<T>(), w.const_data_ptr<T>(),
                            y.mutable_data_ptr<T>(), e, group_size, e, e + c + h, T(eps), norm_before_gate};
    gated_norm(norm, b);
  });
  return finish_block(project(y, out_proj_weight, out_proj_bias), x, block_norm_weight.has_value());
}

}  // namespace ssmblocks_cpu
