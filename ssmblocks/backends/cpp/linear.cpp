// Decode's matrix products at 1..16 rows (small_batch_linear; MKL is slow at 2..16). Reference: linear in
// ssmblocks/ops/linear.py, which takes F.linear where this kernel may not run.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "kernels.h"
#include "vectors.h"

namespace ssmblocks_cpu {
namespace {

// y = x w^T + bias for small batches (decode): x (m, k), w (o, k), y (m, o), contiguous; bias (o,) may be
// null. MKL's sgemm runs m = 2..16 at a fraction of its large-m speed (m = 8: 2.7x the time of m = 1 on
// the same weights); this streams w once, each block of 4 rows of w against 4 rows of x at a time, with
// the 16 partial sums in registers.
template <typename T>
struct Linear {
  using Type = T;
  const T *x, *w, *bias;
  T* y;
  int64_t m, k, o;
};

// Rows r of w (R of them) against rows of x (M of them): y[i, r] = sum_j x[i, j] w[r, j] (+ bias[r]).
template <typename T, int Bytes, int R, int M>
SSM_INLINE void dot_block(const Linear<T>& p, int64_t r, int64_t i) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T);
  const int64_t k = p.k, full = k / L * L;
  const T *w = p.w + r * k, *x = p.x + i * k;
  V acc[R][M] = {}, wv[R], xv;
  for (int64_t j = 0; j < full; j += L) {
    for (int a = 0; a < R; ++a) std::memcpy(&wv[a], w + a * k + j, Bytes);
    for (int b = 0; b < M; ++b) {
      std::memcpy(&xv, x + b * k + j, Bytes);
      for (int a = 0; a < R; ++a) acc[a][b] += wv[a] * xv;
    }
  }
  if (full < k) {  // the last k % L columns, zero-padded
    for (int a = 0; a < R; ++a) {
      wv[a] = V{};
      std::memcpy(&wv[a], w + a * k + full, (k - full) * sizeof(T));
    }
    for (int b = 0; b < M; ++b) {
      xv = V{};
      std::memcpy(&xv, x + b * k + full, (k - full) * sizeof(T));
      for (int a = 0; a < R; ++a) acc[a][b] += wv[a] * xv;
    }
  }
  for (int a = 0; a < R; ++a) {
    for (int b = 0; b < M; ++b) {
      p.y[(i + b) * p.o + r + a] = lane_sum<T, Bytes>(acc[a][b]) + (p.bias ? p.bias[r + a] : T(0));
    }
  }
}

// All rows of x against w's rows r .. r + R - 1, in blocks of 4 rows of x.
template <typename T, int Bytes, int R>
SSM_INLINE void dot_rows(const Linear<T>& p, int64_t r) {
  int64_t i = 0;
  for (; i + 4 <= p.m; i += 4) dot_block<T, Bytes, R, 4>(p, r, i);
  switch (p.m - i) {
    case 3: dot_block<T, Bytes, R, 3>(p, r, i); break;
    case 2: dot_block<T, Bytes, R, 2>(p, r, i); break;
    case 1: dot_block<T, Bytes, R, 1>(p, r, i); break;
  }
}

// Units: blocks of 4 rows of w (the last may be shorter); b is always 0.
template <typename T, int Bytes>
SSM_INLINE void run(const Linear<T>& p, int64_t, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    if (4 * u + 4 <= p.o) {
      dot_rows<T, Bytes, 4>(p, 4 * u);
    } else {
      for (int64_t r = 4 * u; r < p.o; ++r) dot_rows<T, Bytes, 1>(p, r);
    }
  }
}

}  // namespace

// x: (m, k), weight: (o, k), bias: (o,) or None; float32 or float64 CPU tensors of one dtype. Returns
// x weight^T + bias: (m, o). For small m (the callers use it for 1..16).
at::Tensor small_batch_linear(const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(x_.dim() == 2 && weight_.dim() == 2 && x_.size(1) == weight_.size(1),
              "small_batch_linear: x must be (m, k) and weight (o, k), got ", x_.sizes(), " and ", weight_.sizes());
  TORCH_CHECK(x_.scalar_type() == weight_.scalar_type() && x_.device().is_cpu() && weight_.device().is_cpu(),
              "small_batch_linear: x and weight must be CPU tensors of one dtype");
  const int64_t m = x_.size(0), k = x_.size(1), o = weight_.size(0);
  TORCH_CHECK(!bias_ || (bias_->sizes() == at::IntArrayRef{o} && bias_->scalar_type() == x_.scalar_type()),
              "small_batch_linear: bias must be (", o, ",) of x's dtype");
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, o}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_batch_linear", [&] {
    using T = scalar_t;
    const Linear<T> p{x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias_ ? bias.const_data_ptr<T>() : nullptr,
                      y.mutable_data_ptr<T>(), m, k, o};
    parallel_run(p, 1, (o + 3) / 4, std::max<int64_t>(1, 8192 / std::max<int64_t>(k, 1)));  // >= 32k weights a thread
  });
  return y;
}

}  // namespace ssmblocks_cpu
