// SSD's (Mamba2's) recurrence over a sequence, one head's state block at a time (ssd_scan). Reference:
// ssd_chunked in ssmblocks/ops/ssd.py (the torch path it replaces; ssd_ref, the plain recurrence).

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "vectors.h"

namespace ssmblocks_cpu {
namespace {

// SSD (Mamba2) over a sequence, time step after time step: x, y (b, l, h, p) with unit last stride (x's
// other strides sx); dt (b, l, h) at strides sdt; A (h,); B, C (b, l, g, n) at strides sB, sC (unit last);
// D (h,) or (h p,), may be null; h0, hT (b, h, p, n) contiguous, h0 may be null.
template <typename T>
struct SsdScan {
  using Type = T;
  const T *x, *dt, *A, *B, *C, *D, *h0;
  T *y, *hT;
  int64_t l, heads, p, n, g, sx[3], sdt[2], sB[3], sC[3];
  bool D_per_channel;
};

// Bytes of a head's p columns per unit of work (64 float32, 32 float64), whatever the vector unit.
constexpr int64_t kSsdBytes = 256;

// The smallest scale of the scaled SSD state (see ssd_scan_block) before it is folded into the state.
constexpr double kSsdRescale = 1.0 / 4096;

// Tokens t .. t + K - 1 (K = 1 or 2) of one (head, column block) of SSD, in one pass over its scaled state g
// (n NV vectors; h = scale g): for each token, g[j] += B_j u, y = scale_token sum_j C_j g[j] + D x, with
// u = dt x / scale_token. Two tokens share each load and store of g, the pass's bottleneck.
template <typename T, int Bytes, int K>
SSM_INLINE void ssd_tokens(const SsdScan<T>& s, typename Simd<T, Bytes>::V* g, const typename Simd<T, Bytes>::V* Dv,
                           int64_t b, int64_t hd, int64_t c0, int64_t t, const T* scales) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T), NV = kSsdBytes / Bytes, W = NV * L;
  const int64_t n = s.n, w = std::min(W, s.p - c0), grp = hd / (s.heads / s.g);
  V x[K][NV], u[K][NV], acc[K][NV];
  const T *Bt[K], *Ct[K];
  for (int k = 0; k < K; ++k) {
    const T dt = s.dt[b * s.sdt[0] + (t + k) * s.sdt[1] + hd];
    Bt[k] = s.B + b * s.sB[0] + (t + k) * s.sB[1] + grp * s.sB[2];
    Ct[k] = s.C + b * s.sC[0] + (t + k) * s.sC[1] + grp * s.sC[2];
    if (w < W) std::memset(x[k], 0, sizeof(x[k]));
    copy_bytes<kSsdBytes>(x[k], s.x + b * s.sx[0] + (t + k) * s.sx[1] + hd * s.sx[2] + c0, w * sizeof(T));
    for (int64_t v = 0; v < NV; ++v) {
      u[k][v] = (dt / scales[k]) * x[k][v];
      acc[k][v] = V{};
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    V* gj = g + j * NV;
    for (int64_t v = 0; v < NV; ++v) {
      V gv = gj[v];
      for (int k = 0; k < K; ++k) {
        gv += u[k][v] * Bt[k][j];
        acc[k][v] += gv * Ct[k][j];
      }
      gj[v] = gv;
    }
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t v = 0; v < NV; ++v) acc[k][v] = acc[k][v] * scales[k] + Dv[v] * x[k][v];
    copy_bytes<kSsdBytes>(s.y + ((b * s.l + t + k) * s.heads + hd) * s.p + c0, acc[k], w * sizeof(T));
  }
}

// The whole sequence of one (head hd, block of p columns from c0) of batch element b. The state block is kept
// transposed, (n, columns), in a local buffer, and scaled: h = scale g, scale the product of the decays since
// the last renormalisation. A step is then two multiply-adds per vector of columns, no sums across lanes:
//     scale <- exp(dt A) scale,   g[j] += B_j (dt x / scale),   y = scale sum_j C_j g[j] + D x.
// When scale would drop below kSsdRescale, g takes it in (g <- scale g, a pass over the block) and restarts at 1,
// so that 1 / scale stays small. Tokens go two to a pass over the state, one where the second token's own decay
// is below kSsdRescale.
template <typename T, int Bytes>
SSM_INLINE void ssd_scan_block(const SsdScan<T>& s, int64_t b, int64_t hd, int64_t c0) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T), NV = kSsdBytes / Bytes, W = NV * L;  // columns per block
  const int64_t n = s.n, w = std::min(W, s.p - c0);
  std::vector<T> buffer((n * NV + 1) * L, T(0));  // + one vector to align
  V* g = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(buffer.data()) + Bytes - 1) & -uintptr_t(Bytes));
  const int64_t state0 = (b * s.heads + hd) * s.p * n;
  if (s.h0) {
    for (int64_t i = 0; i < w; ++i) {
      for (int64_t j = 0; j < n; ++j) reinterpret_cast<T*>(g + j * NV)[i] = s.h0[state0 + (c0 + i) * n + j];
    }
  }
  V Dv[NV] = {};
  if (s.D) {
    for (int64_t i = 0; i < w; ++i) Dv[i / L][i % L] = s.D[s.D_per_channel ? hd * s.p + c0 + i : hd];
  }
  const T A = s.A[hd], rescale = T(kSsdRescale);
  const auto decay = [&](int64_t t) { return std::exp(s.dt[b * s.sdt[0] + t * s.sdt[1] + hd] * A); };
  const auto fold = [&](T factor) {  // h = factor g becomes g, the scale 1
    for (int64_t i = 0; i < n * NV; ++i) g[i] *= factor;
  };
  T scale = 1;
  for (int64_t t = 0; t < s.l;) {
    const T d1 = decay(t), d2 = t + 1 < s.l ? decay(t + 1) : T(0);
    T scales[2] = {scale * d1, 0};
    if (d2 >= rescale) {
      if (scales[0] * d2 < rescale) {
        fold(scales[0]);
        scales[0] = 1;
      }
      scales[1] = scales[0] * d2;
      ssd_tokens<T, Bytes, 2>(s, g, Dv, b, hd, c0, t, scales);
      scale = scales[1];
      t += 2;
    } else {
      if (scales[0] < rescale) {
        fold(scales[0]);
        scales[0] = 1;
      }
      ssd_tokens<T, Bytes, 1>(s, g, Dv, b, hd, c0, t, scales);
      scale = scales[0];
      t += 1;
    }
  }
  fold(scale);
  for (int64_t i = 0; i < w; ++i) {
    for (int64_t j = 0; j < n; ++j) s.hT[state0 + (c0 + i) * n + j] = reinterpret_cast<const T*>(g + j * NV)[i];
  }
}

// Units: (head, block of kSsdBytes of columns) pairs of batch element b.
template <typename T, int Bytes>
SSM_INLINE void run(const SsdScan<T>& s, int64_t b, int64_t u0, int64_t u1) {
  const int64_t blocks = (s.p * int64_t(sizeof(T)) + kSsdBytes - 1) / kSsdBytes;
  for (int64_t u = u0; u < u1; ++u) ssd_scan_block<T, Bytes>(s, b, u / blocks, u % blocks * (kSsdBytes / sizeof(T)));
}

}  // namespace

// x: (b, l, h, p); dt: (b, l, h) (after softplus, bias and clamping); A: (h,); B, C: (b, l, g, n); D: (h,) or
// (h, p) or None; initial_state: (b, h, p, n) or None; one dtype, float32 or float64, on the CPU. Returns y:
// (b, l, h, p) = the scan's output + D x, and the final state (b, h, p, n).
std::tuple<at::Tensor, at::Tensor> ssd_scan(const at::Tensor& x_, const at::Tensor& dt_, const at::Tensor& A,
                                            const at::Tensor& B_, const at::Tensor& C_,
                                            const std::optional<at::Tensor>& D_,
                                            const std::optional<at::Tensor>& h0_) {
  TORCH_CHECK(x_.dim() == 4 && B_.dim() == 4, "ssd_scan: x must be (b, l, h, p) and B (b, l, g, n)");
  const int64_t b = x_.size(0), l = x_.size(1), h = x_.size(2), p = x_.size(3), g = B_.size(2), n = B_.size(3);
  TORCH_CHECK(g >= 1 && h % g == 0, "ssd_scan: ", g, " groups do not divide ", h, " heads");
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    check_arg("ssd_scan", t, shape, name, x_);
  };
  check(dt_, {b, l, h}, "dt");
  check(A, {h}, "A");
  check(B_, {b, l, g, n}, "B");
  check(C_, {b, l, g, n}, "C");
  if (D_) {
    TORCH_CHECK(D_->numel() == h || D_->numel() == h * p, "ssd_scan: D must be (h,) or (h, p), got ", D_->sizes());
  }
  if (D_) check(*D_, D_->sizes(), "D");
  if (h0_) check(*h0_, {b, h, p, n}, "initial_state");
  const at::Tensor x = unit_last_stride(x_), dt = unit_last_stride(dt_), B = unit_last_stride(B_);
  const at::Tensor C = unit_last_stride(C_), Ac = A.contiguous();
  const at::Tensor D = D_ ? D_->contiguous() : at::Tensor(), h0 = h0_ ? h0_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({b, l, h, p}, x.options()), hT = at::empty({b, h, p, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_scan", [&] {
    using T = scalar_t;
    const SsdScan<T> s{x.const_data_ptr<T>(), dt.const_data_ptr<T>(), Ac.const_data_ptr<T>(), B.const_data_ptr<T>(),
                       C.const_data_ptr<T>(), D_ ? D.const_data_ptr<T>() : nullptr,
                       h0_ ? h0.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), hT.mutable_data_ptr<T>(),
                       l, h, p, n, g, {x.stride(0), x.stride(1), x.stride(2)}, {dt.stride(0), dt.stride(1)},
                       {B.stride(0), B.stride(1), B.stride(2)}, {C.stride(0), C.stride(1), C.stride(2)},
                       D_ && D.numel() == h * p};
    const int64_t blocks = (p * int64_t(sizeof(T)) + kSsdBytes - 1) / kSsdBytes;
    parallel_run(s, b, h * blocks, 1);
  });
  return {y, hT};
}

}  // namespace ssmblocks_cpu
