// Mamba1's recurrence over a sequence (selective_scan: time outermost, each thread's channel groups' states
// in a local buffer) and for one token (selective_scan_step, and scan_step for selective_ssm_step).
// Reference: the torch paths of selective_scan and selective_scan_step in ssmblocks/ops/selective_scan.py.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "vectors.h"

namespace ssmblocks_cpu {
namespace {

// Raw pointers and element strides. x, dt, z, y: (b, l, e) with unit channel stride; B, C: (b, l, n);
// A: (e, n); D: (e,); h0, hT: (b, e, n). D, z and h0 may be null.
template <typename T>
struct Scan {
  using Type = T;
  const T *x, *dt, *A, *B, *C, *D, *z, *h0;
  T *y, *hT;
  int64_t l, e, n;
  int64_t sx[2], sdt[2], sz[2], sB[3], sC[3], sA[2], sD, sh0[3];
};

// w values from src into a group's vectors, then zeros.
template <typename T>
SSM_INLINE void load_group(void* dst, const T* src, int64_t w) {
  copy_bytes<128>(dst, src, w * sizeof(T));
  if (w < kGroup<T>) std::memset(static_cast<T*>(dst) + w, 0, (kGroup<T> - w) * sizeof(T));
}

// The whole sequence of batch element b for the channel groups g0 .. g1 (the last may be partial: its
// missing channels are zero throughout), in vectors of Bytes. Time is the outer loop, so that each step
// reads and writes contiguous rows of x, dt, z and y. A step of one group:
//     h <- 2^(dt a) h + (dt x) B_t,   y = (h C_t + D x) silu(z),   a = A^T log2(e).
// (Each kernel is an overload of run(params, b, u0, u1) over units u0 .. u1 of batch element b; see
// vectors.h.)
template <typename T, int Bytes>
SSM_INLINE void run(const Scan<T>& s, int64_t b, int64_t g0, int64_t g1) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t G = kGroup<T>, nv = G * sizeof(T) / Bytes;  // channels, vectors per group
  const int64_t n = s.n, block = (2 * n + 1) * nv;                // per group: a, h (n, nv), D (nv)
  std::vector<T> buffer(((g1 - g0) * block + 1) * (Bytes / sizeof(T)), T(0));  // + one vector to align
  V* state = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(buffer.data()) + Bytes - 1) & -uintptr_t(Bytes));
  for (int64_t g = g0; g < g1; ++g) {
    T* a = reinterpret_cast<T*>(state + (g - g0) * block);
    T *h = a + n * G, *D = h + n * G;
    for (int64_t j = 0, c = g * G; j < G && c < s.e; ++j, ++c) {
      for (int64_t k = 0; k < n; ++k) {
        a[k * G + j] = s.A[c * s.sA[0] + k * s.sA[1]] * T(kLog2e);
        if (s.h0) h[k * G + j] = s.h0[b * s.sh0[0] + c * s.sh0[1] + k * s.sh0[2]];
      }
      if (s.D) D[j] = s.D[c * s.sD];
    }
  }
  V x[nv], dt[nv], z[nv], u[nv], acc[nv];
  for (int64_t t = 0; t < s.l; ++t) {
    const T* Bt = s.B + b * s.sB[0] + t * s.sB[1];
    const T* Ct = s.C + b * s.sC[0] + t * s.sC[1];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t e0 = g * G, w = std::min(G, s.e - e0);
      const V *a = state + (g - g0) * block, *D = a + 2 * n * nv;
      V* h = state + (g - g0) * block + n * nv;
      load_group(x, s.x + b * s.sx[0] + t * s.sx[1] + e0, w);
      load_group(dt, s.dt + b * s.sdt[0] + t * s.sdt[1] + e0, w);
      for (int64_t v = 0; v < nv; ++v) {
        u[v] = dt[v] * x[v];
        acc[v] = D[v] * x[v];
      }
      for (int64_t k = 0; k < n; ++k) {
        const T bk = Bt[k * s.sB[2]], ck = Ct[k * s.sC[2]];
        for (int64_t v = 0; v < nv; ++v) {
          const V hv = exp2v<Bytes>(dt[v] * a[k * nv + v]) * h[k * nv + v] + u[v] * bk;
          h[k * nv + v] = hv;
          acc[v] += hv * ck;
        }
      }
      if (s.z) {
        load_group(z, s.z + b * s.sz[0] + t * s.sz[1] + e0, w);
        for (int64_t v = 0; v < nv; ++v) acc[v] *= silu<T, Bytes>(z[v]);
      }
      copy_bytes<128>(s.y + (b * s.l + t) * s.e + e0, acc, w * sizeof(T));
    }
  }
  for (int64_t g = g0; g < g1; ++g) {
    const T* h = reinterpret_cast<const T*>(state + (g - g0) * block + n * nv);
    for (int64_t j = 0, c = g * G; j < G && c < s.e; ++j, ++c) {
      for (int64_t k = 0; k < n; ++k) s.hT[(b * s.e + c) * n + k] = h[k * G + j];
    }
  }
}

// One token, contiguous tensors: x, dt, z, y: (b, e); B, C: (b, n); A: (e, n); D: (e,); h: (b, e, n),
// updated in place. D and z may be null.
// A_is_log: A holds log(-A) (the layer's A_log), and A = -exp(A_log) is taken on the fly.
template <typename T>
struct Step {
  using Type = T;
  const T *x, *dt, *A, *B, *C, *D, *z;
  T *h, *y;
  int64_t e, n;
  bool A_is_log;
};

// y = (y + D x) silu(z) for m <= lanes consecutive channels; D and z may be null.
template <typename T, int Bytes>
SSM_INLINE void finish_lanes(T* y, const T* x, const T* D, const T* z, int64_t m) {
  auto yv = load_lanes<T, Bytes>(y, m);
  if (D) yv += load_lanes<T, Bytes>(D, m) * load_lanes<T, Bytes>(x, m);
  if (z) yv *= silu<T, Bytes>(load_lanes<T, Bytes>(z, m));
  store_lanes<T, Bytes>(y, yv, m);
}

// Channels c0 .. c1 of batch element b: the state in vectors of Bytes along n (the last n % lanes values
// one by one), then D and z in vectors along the channels.
template <typename T, int Bytes>
SSM_INLINE void run(const Step<T>& s, int64_t b, int64_t c0, int64_t c1) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T);
  const int64_t n = s.n, full = n / L * L;
  const T *Bb = s.B + b * n, *Cb = s.C + b * n, *x = s.x + b * s.e;
  T* y = s.y + b * s.e;
  for (int64_t c = c0; c < c1; ++c) {
    const T dt = s.dt[b * s.e + c], u = dt * x[c], *a = s.A + c * n;
    T* h = s.h + (b * s.e + c) * n;
    V acc{}, hv, av, bv, cv;
    for (int64_t k = 0; k < full; k += L) {
      std::memcpy(&hv, h + k, Bytes);
      std::memcpy(&av, a + k, Bytes);
      if (s.A_is_log) av = -exp2v<Bytes>(av * T(kLog2e));
      std::memcpy(&bv, Bb + k, Bytes);
      std::memcpy(&cv, Cb + k, Bytes);
      hv = exp2v<Bytes>(av * (dt * T(kLog2e))) * hv + u * bv;
      std::memcpy(h + k, &hv, Bytes);
      acc += hv * cv;
    }
    y[c] = lane_sum<T, Bytes>(acc);
    for (int64_t k = full; k < n; ++k) {
      h[k] = std::exp(dt * (s.A_is_log ? -std::exp(a[k]) : a[k])) * h[k] + u * Bb[k];
      y[c] += h[k] * Cb[k];
    }
  }
  const T *D = s.D, *z = s.z ? s.z + b * s.e : nullptr;
  if (!D && !z) return;
  int64_t c = c0;
  for (; c + L <= c1; c += L) finish_lanes<T, Bytes>(y + c, x + c, D ? D + c : nullptr, z ? z + c : nullptr, L);
  if (c < c1) finish_lanes<T, Bytes>(y + c, x + c, D ? D + c : nullptr, z ? z + c : nullptr, c1 - c);
}

}  // namespace

// x, dt: (b, l, e); A: (e, n); B, C: (b, l, n); D: (e,); z: (b, l, e); initial_state: (b, e, n); all of
// one dtype, float32 or float64, on the CPU. Returns y: (b, l, e) and the final state (b, e, n).
std::tuple<at::Tensor, at::Tensor> selective_scan(const at::Tensor& x_, const at::Tensor& dt_, const at::Tensor& A,
                                                  const at::Tensor& B, const at::Tensor& C,
                                                  const std::optional<at::Tensor>& D,
                                                  const std::optional<at::Tensor>& z_,
                                                  const std::optional<at::Tensor>& h0) {
  TORCH_CHECK(x_.dim() == 3 && A.dim() == 2, "selective_scan: x must be (b, l, e) and A (e, n)");
  const int64_t b = x_.size(0), l = x_.size(1), e = x_.size(2), n = A.size(1);
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    check_arg("selective_scan", t, shape, name, x_);
  };
  check(dt_, {b, l, e}, "dt");
  check(A, {e, n}, "A");
  check(B, {b, l, n}, "B");
  check(C, {b, l, n}, "C");
  if (D) check(*D, {e}, "D");
  if (z_) check(*z_, {b, l, e}, "z");
  if (h0) check(*h0, {b, e, n}, "initial_state");
  const at::Tensor x = unit_last_stride(x_), dt = unit_last_stride(dt_);
  const at::Tensor z = z_ ? unit_last_stride(*z_) : x;  // without z: x's strides, never read
  at::Tensor y = at::empty({b, l, e}, x.options()), hT = at::empty({b, e, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selective_scan", [&] {
    using T = scalar_t;
    const Scan<T> s{x.const_data_ptr<T>(), dt.const_data_ptr<T>(), A.const_data_ptr<T>(), B.const_data_ptr<T>(),
                    C.const_data_ptr<T>(), D ? D->const_data_ptr<T>() : nullptr,
                    z_ ? z.const_data_ptr<T>() : nullptr, h0 ? h0->const_data_ptr<T>() : nullptr,
                    y.mutable_data_ptr<T>(), hT.mutable_data_ptr<T>(), l, e, n,
                    {x.stride(0), x.stride(1)}, {dt.stride(0), dt.stride(1)}, {z.stride(0), z.stride(1)},
                    {B.stride(0), B.stride(1), B.stride(2)}, {C.stride(0), C.stride(1), C.stride(2)},
                    {A.stride(0), A.stride(1)}, D ? D->stride(0) : 0,
                    {h0 ? h0->stride(0) : 0, h0 ? h0->stride(1) : 0, h0 ? h0->stride(2) : 0}};
    parallel_run(s, b, (e + kGroup<T> - 1) / kGroup<T>, 1);
  });
  return {y, hT};
}

// x, dt: (b, e); A: (e, n); B, C: (b, n); state: (b, e, n), contiguous, updated in place; D: (e,); z: (b, e);
// all of one dtype, float32 or float64, on the CPU. Returns y: (b, e).
at::Tensor scan_step(const at::Tensor& x_, const at::Tensor& dt_, const at::Tensor& A_, const at::Tensor& B_,
                     const at::Tensor& C_, at::Tensor& state, const std::optional<at::Tensor>& D_,
                     const std::optional<at::Tensor>& z_, bool A_is_log) {
  TORCH_CHECK(x_.dim() == 2 && A_.dim() == 2, "selective_scan_step: x must be (b, e) and A (e, n)");
  const int64_t b = x_.size(0), e = x_.size(1), n = A_.size(1);
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    check_arg("selective_scan_step", t, shape, name, x_);
    return t.contiguous();
  };
  const at::Tensor x = check(x_, {b, e}, "x"), dt = check(dt_, {b, e}, "dt"), A = check(A_, {e, n}, "A");
  const at::Tensor B = check(B_, {b, n}, "B"), C = check(C_, {b, n}, "C");
  const at::Tensor D = D_ ? check(*D_, {e}, "D") : at::Tensor(), z = z_ ? check(*z_, {b, e}, "z") : at::Tensor();
  check(state, {b, e, n}, "state");
  TORCH_CHECK(state.is_contiguous(), "selective_scan_step: state must be contiguous");
  at::Tensor y = at::empty({b, e}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selective_scan_step", [&] {
    using T = scalar_t;
    const Step<T> s{x.const_data_ptr<T>(), dt.const_data_ptr<T>(), A.const_data_ptr<T>(), B.const_data_ptr<T>(),
                    C.const_data_ptr<T>(), D_ ? D.const_data_ptr<T>() : nullptr,
                    z_ ? z.const_data_ptr<T>() : nullptr, state.mutable_data_ptr<T>(), y.mutable_data_ptr<T>(), e, n,
                    A_is_log};
    parallel_run(s, b, e, std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)));  // >= 8k state values a thread
  });
  return y;
}

at::Tensor selective_scan_step(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& C, at::Tensor& state, const std::optional<at::Tensor>& D,
                               const std::optional<at::Tensor>& z) {
  return scan_step(x, dt, A, B, C, state, D, z, false);
}

}  // namespace ssmblocks_cpu
