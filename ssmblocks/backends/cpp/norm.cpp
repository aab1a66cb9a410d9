// The (gated) RMS norm (rms_norm, and gated_norm on raw rows for ssd_mixer_step), its parameters GatedNorm in
// kernels.h. Reference: the torch paths of ssmblocks/ops/norm.py (rms_norm, gated_rms_norm).

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "kernels.h"
#include "vectors.h"

namespace ssmblocks_cpu {

// Groups g0 .. g1 of row b: one pass for the gate and the sum of squares (writing x, gated, to y), one for the
// scaling.
template <typename T, int Bytes>
SSM_INLINE void run(const GatedNorm<T>& p, int64_t b, int64_t g0, int64_t g1) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T);
  for (int64_t g = g0; g < g1; ++g) {
    T* y = p.y + b * p.d + g * p.group;
    const T *x = p.x + b * p.sx + g * p.group, *w = p.w + g * p.group;
    const T* z = p.z ? p.z + b * p.sz + g * p.group : nullptr;
    V squares{};
    for (int64_t c = 0; c < p.group; c += L) {
      const int64_t m = std::min(L, p.group - c);
      V v = load_lanes<T, Bytes>(x + c, m);
      if (z && !p.norm_before_gate) v *= silu<T, Bytes>(load_lanes<T, Bytes>(z + c, m));
      store_lanes<T, Bytes>(y + c, v, m);
      squares += v * v;
    }
    const T scale = T(1) / std::sqrt(lane_sum<T, Bytes>(squares) / T(p.group) + p.eps);
    for (int64_t c = 0; c < p.group; c += L) {
      const int64_t m = std::min(L, p.group - c);
      V v = load_lanes<T, Bytes>(y + c, m) * scale * load_lanes<T, Bytes>(w + c, m);
      if (z && p.norm_before_gate) v *= silu<T, Bytes>(load_lanes<T, Bytes>(z + c, m));
      store_lanes<T, Bytes>(y + c, v, m);
    }
  }
}

template <typename T>
void gated_norm(const GatedNorm<T>& p, int64_t rows) {
  parallel_run(p, rows, p.d / p.group, std::max<int64_t>(1, 4096 / p.group));  // >= 4k values a thread
}

template void gated_norm<float>(const GatedNorm<float>&, int64_t);
template void gated_norm<double>(const GatedNorm<double>&, int64_t);

// The (gated) RMS norm of rows: x (rows, d) and z (rows, d) or None, each with unit last stride; weight (d,);
// norm groups of group_size channels; one dtype, float32 or float64, on the CPU. Returns y (rows, d):
// norm_before_gate ? norm(x) w silu(z) : norm(x silu(z)) w, or norm(x) w without z.
at::Tensor rms_norm(const at::Tensor& x_, const std::optional<at::Tensor>& z_, const at::Tensor& weight, double eps,
                    int64_t group_size, bool norm_before_gate) {
  TORCH_CHECK(x_.dim() == 2, "rms_norm: x must be (rows, d), got ", x_.sizes());
  const int64_t rows = x_.size(0), d = x_.size(1);
  TORCH_CHECK(group_size >= 1 && d % group_size == 0, "rms_norm: group_size ", group_size, " does not divide ", d);
  check_arg("rms_norm", weight, {d}, "weight", x_);
  if (z_) check_arg("rms_norm", *z_, {rows, d}, "z", x_);
  const at::Tensor x = unit_last_stride(x_), z = z_ ? unit_last_stride(*z_) : at::Tensor(), w = weight.contiguous();
  at::Tensor y = at::empty({rows, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    const GatedNorm<T> p{x.const_data_ptr<T>(), z_ ? z.const_data_ptr<T>() : nullptr, w.const_data_ptr<T>(),
                         y.mutable_data_ptr<T>(), d, group_size, x.stride(0), z_ ? z.stride(0) : 0, T(eps),
                         norm_before_gate};
    gated_norm(p, rows);
  });
  return y;
}

}  // namespace ssmblocks_cpu
