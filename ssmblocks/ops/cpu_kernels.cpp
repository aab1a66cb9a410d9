// The C++ CPU kernels, without autograd, registered as torch.ops.ssmblocks_cpu.* and built and loaded on first
// use by ssmblocks/ops/cpu_kernel.py. Each replaces a torch path of ssmblocks/ops (or of a layer) that stays
// beside it as the reference:
//
//   selective_scan, selective_scan_step   Mamba1's recurrence over a sequence (time outermost, each thread's
//                                         channel groups' states in a local buffer) and for one token
//   ssd_scan                              SSD's recurrence over a sequence, one head's state block at a time
//   causal_conv1d, causal_conv1d_step     the depthwise causal conv (+ silu) over a sequence and one token
//   small_batch_linear                    decode's matrix products at 1..16 rows (MKL is slow at 2..16)
//   rms_norm                              the (gated) RMS norm
//   selective_ssm_step, ssd_mixer_step    decode's whole mixer step (optionally its pre-norm residual block)
//                                         in one call, from the pieces above
//   norm_linear                           decode's final norm and LM head in one call
//   vector_bytes                          the vector unit the kernels use (64: AVX-512, 32: AVX2, 16: baseline)
//
// Each kernel is compiled for AVX-512, AVX2 and the baseline vector unit and picked at run time.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/softplus.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

#define SSM_INLINE inline __attribute__((always_inline))

// Bytes of T in one vector register (GCC / Clang vector extension): 64 for AVX-512, 32 for AVX2, 16 for SSE.
template <typename T, int Bytes>
struct Simd {
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(Bytes), aligned(Bytes)));
  typedef Int I __attribute__((vector_size(Bytes), aligned(Bytes)));
};

constexpr double kLog2e = 1.4426950408889634;  // log2(e)

// memcpy of `bytes` bytes, a constant-size copy (one or a few vector moves) when bytes == Full, the common case
// of the kernels' loops; the runtime-size copy of a partial tail is a library call.
template <int64_t Full>
SSM_INLINE void copy_bytes(void* dst, const void* src, int64_t bytes) {
  if (bytes == Full) {
    std::memcpy(dst, src, Full);
  } else {
    std::memcpy(dst, src, bytes);
  }
}

// m <= lanes values at src into a vector, zeros after them.
template <typename T, int Bytes>
SSM_INLINE typename Simd<T, Bytes>::V load_lanes(const T* src, int64_t m) {
  typename Simd<T, Bytes>::V v{};
  copy_bytes<Bytes>(&v, src, m * sizeof(T));
  return v;
}

// The first m <= lanes values of v to dst.
template <typename T, int Bytes>
SSM_INLINE void store_lanes(T* dst, typename Simd<T, Bytes>::V v, int64_t m) {
  copy_bytes<Bytes>(dst, &v, m * sizeof(T));
}

// Channels per group, the unit of work: 128 bytes, contiguous in x, dt, z and y.
template <typename T>
constexpr int64_t kGroup = 128 / sizeof(T);

// 2^y = 2^k 2^f with k = round(y), |f| <= 1/2; 2^f by a degree-6 polynomial fitted for relative error
// (1.9e-9, under float32 rounding). y is clamped to [-125, 127] first (so 2^y below 2^-125 comes out as
// 2^-125, never a denormal); NaN stays NaN.
template <int Bytes>
SSM_INLINE typename Simd<float, Bytes>::V exp2v(typename Simd<float, Bytes>::V y) {
  using V = typename Simd<float, Bytes>::V;
  using I = typename Simd<float, Bytes>::I;
  const V lo = V{} - 125.0f, hi = V{} + 127.0f, magic = V{} + 12582912.0f;  // 1.5 * 2^23
  y = lo > y ? lo : y;  // maxps, minps
  y = hi < y ? hi : y;
  const V shifted = y + magic;  // its low mantissa bits hold round(y)
  const V f = y - (shifted - magic);
  V p = V{} + 1.534580706e-4f;
  p = p * f + 1.339993118e-3f;
  p = p * f + 9.618488976e-3f;
  p = p * f + 5.550328777e-2f;
  p = p * f + 2.402264689e-1f;
  p = p * f + 6.931472057e-1f;
  p = p * f + 1.000000001f;
  return (V)((I)p + ((I)shifted << 23));  // times 2^round(y): the shift drops the 1.5 * 2^23
}

template <int Bytes>
SSM_INLINE typename Simd<double, Bytes>::V exp2v(typename Simd<double, Bytes>::V y) {
  for (int i = 0; i < Bytes / 8; ++i) y[i] = std::exp2(y[i]);
  return y;
}

// silu(v) = v sigmoid(v), lane by lane.
template <typename T, int Bytes>
SSM_INLINE typename Simd<T, Bytes>::V silu(typename Simd<T, Bytes>::V v) {
  return v / (T(1) + exp2v<Bytes>(v * T(-kLog2e)));
}

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
// parallel_run.)
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

// Sum of a vector's lanes, halving it.
template <typename T, int Bytes>
SSM_INLINE T lane_sum(typename Simd<T, Bytes>::V v) {
  if constexpr (Bytes == sizeof(T)) {
    return v[0];
  } else {
    typename Simd<T, Bytes / 2>::V lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<char*>(&v) + Bytes / 2, Bytes / 2);
    return lane_sum<T, Bytes / 2>(lo + hi);
  }
}

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
    for (int b = 0; b < M; ++b) p.y[(i + b) * p.o + r + a] = lane_sum<T, Bytes>(acc[a][b]) + (p.bias ? p.bias[r + a] : T(0));
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

// The causal depthwise conv over a sequence: x, y (b, l, c) with unit channel stride (x's other strides
// sx); w (k, c), the taps transposed; bias (c,) may be null; state (b, c, k - 1) the inputs before x[:, 0]
// (null: zeros), shifted in place to the last k - 1 inputs.
template <typename T>
struct Conv {
  using Type = T;
  const T *x, *w, *bias;
  T *state, *y;
  int64_t l, c, k, sx[2];
  bool silu;
};

// Channels c0 .. c1 of batch element b over the whole sequence, time outermost so that every step reads
// and writes contiguous row segments; the last k - 1 inputs of each vector of channels, the taps and the
// bias in a local buffer.
template <typename T, int Bytes, int K>
SSM_INLINE void conv_channels(const Conv<T>& p, int64_t b, int64_t c0, int64_t c1) {
  using V = typename Simd<T, Bytes>::V;
  constexpr int64_t L = Bytes / sizeof(T), H = K > 1 ? K - 1 : 1;
  const int64_t c = p.c, nv = (c1 - c0 + L - 1) / L;
  // per vector of channels: H inputs, K taps, the bias (zeros where unused); + one vector to align
  std::vector<T> storage((nv * (H + K + 1) + 1) * L, T(0));
  V* buffer = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(storage.data()) + Bytes - 1) & -uintptr_t(Bytes));
  for (int64_t v = 0; v < nv; ++v) {
    V* u = buffer + v * (H + K + 1);
    const int64_t ch = c0 + v * L, m = std::min(L, c1 - ch);
    for (int j = 0; j < K; ++j) std::memcpy(&u[H + j], p.w + j * c + ch, m * sizeof(T));
    if (p.bias) std::memcpy(&u[H + K], p.bias + ch, m * sizeof(T));
    for (int64_t i = 0; p.state && i < m; ++i) {
      for (int j = 0; j + 1 < K; ++j) u[j][i] = p.state[(b * c + ch + i) * (K - 1) + j];
    }
  }
  for (int64_t t = 0; t < p.l; ++t) {
    const T* x = p.x + b * p.sx[0] + t * p.sx[1];
    T* y = p.y + (b * p.l + t) * c;
    for (int64_t v = 0; v < nv; ++v) {
      V* u = buffer + v * (H + K + 1);
      const int64_t ch = c0 + v * L, m = std::min(L, c1 - ch);
      V xt = load_lanes<T, Bytes>(x + ch, m), out = u[H + K];
      for (int j = 0; j + 1 < K; ++j) out += u[H + j] * u[j];
      out += u[H + K - 1] * xt;
      for (int j = 0; j + 2 < K; ++j) u[j] = u[j + 1];
      if constexpr (K > 1) u[K - 2] = xt;
      if (p.silu) out = silu<T, Bytes>(out);
      store_lanes<T, Bytes>(y + ch, out, m);
    }
  }
  for (int64_t v = 0; p.state && v < nv; ++v) {
    const V* u = buffer + v * (H + K + 1);
    const int64_t ch = c0 + v * L, m = std::min(L, c1 - ch);
    for (int64_t i = 0; i < m; ++i) {
      for (int j = 0; j + 1 < K; ++j) p.state[(b * c + ch + i) * (K - 1) + j] = u[j][i];
    }
  }
}

// One token of the causal depthwise conv (decode): x (b, c) with unit channel stride, row stride sx;
// state (b, c, k - 1) the preceding inputs, contiguous, shifted in place to end with x; w (c, k);
// bias (c,) may be null. y (b, c) = [silu](bias + sum_j w[:, j] [state, x][:, j]).
template <typename T>
struct ConvStep {
  using Type = T;
  const T *x, *w, *bias;
  T *state, *y;
  int64_t c, k, sx;
  bool silu;
};

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

// Each kernel compiled for each vector unit; the one to use is picked at run time on x86-64, so that the
// cached build runs on any x86-64 CPU. A kernel runs over units [u0, u1) (channel groups, channels) of
// one batch element b.
template <typename P>
using KernelFn = void (*)(const P&, int64_t b, int64_t u0, int64_t u1);

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

// Units: groups of 128 bytes of channels (kGroup) of batch element b, a thread's share run together; the
// conv width is a template argument up to 4 (the callers send wider convs to torch).
template <typename T, int Bytes>
SSM_INLINE void run(const Conv<T>& p, int64_t b, int64_t u0, int64_t u1) {
  const int64_t c0 = u0 * kGroup<T>, c1 = std::min(u1 * kGroup<T>, p.c);
  switch (p.k) {
    case 1: conv_channels<T, Bytes, 1>(p, b, c0, c1); break;
    case 2: conv_channels<T, Bytes, 2>(p, b, c0, c1); break;
    case 3: conv_channels<T, Bytes, 3>(p, b, c0, c1); break;
    case 4: conv_channels<T, Bytes, 4>(p, b, c0, c1); break;
  }
}

// Channels c0 .. c1 of batch element b, the conv width K a template argument (0: any width, p.k).
template <typename T, int K>
SSM_INLINE void conv_step_channels(const ConvStep<T>& p, int64_t b, int64_t c0, int64_t c1) {
  const int64_t k = K ? K : p.k;
  const T* __restrict x = p.x + b * p.sx;
  T* __restrict y = p.y + b * p.c;
  for (int64_t c = c0; c < c1; ++c) {
    T* __restrict s = p.state + (b * p.c + c) * (k - 1);
    const T* __restrict w = p.w + c * k;
    T acc = p.bias ? p.bias[c] : T(0);
    for (int64_t j = 0; j + 1 < k; ++j) acc += w[j] * s[j];
    acc += w[k - 1] * x[c];
    for (int64_t j = 0; j + 2 < k; ++j) s[j] = s[j + 1];
    if (k > 1) s[k - 2] = x[c];
    y[c] = acc;
  }
}

// Units: channels of batch element b: a few multiply-adds each, then silu in vectors of Bytes.
template <typename T, int Bytes>
SSM_INLINE void run(const ConvStep<T>& p, int64_t b, int64_t c0, int64_t c1) {
  switch (p.k) {
    case 2: conv_step_channels<T, 2>(p, b, c0, c1); break;
    case 3: conv_step_channels<T, 3>(p, b, c0, c1); break;
    case 4: conv_step_channels<T, 4>(p, b, c0, c1); break;
    default: conv_step_channels<T, 0>(p, b, c0, c1);
  }
  if (!p.silu) return;
  constexpr int64_t L = Bytes / sizeof(T);
  for (int64_t c = c0; c < c1; c += L) {  // in vectors
    const int64_t m = std::min(L, c1 - c);
    store_lanes<T, Bytes>(p.y + b * p.c + c, silu<T, Bytes>(load_lanes<T, Bytes>(p.y + b * p.c + c, m)), m);
  }
}

// Units: (head, block of kSsdBytes of columns) pairs of batch element b.
template <typename T, int Bytes>
SSM_INLINE void run(const SsdScan<T>& s, int64_t b, int64_t u0, int64_t u1) {
  const int64_t blocks = (s.p * int64_t(sizeof(T)) + kSsdBytes - 1) / kSsdBytes;
  for (int64_t u = u0; u < u1; ++u) ssd_scan_block<T, Bytes>(s, b, u / blocks, u % blocks * (kSsdBytes / sizeof(T)));
}

#if defined(__x86_64__)
template <typename P>
__attribute__((target("avx512f,avx2,fma"))) void run_avx512(const P& p, int64_t b, int64_t u0, int64_t u1) {
  run<typename P::Type, 64>(p, b, u0, u1);
}

template <typename P>
__attribute__((target("avx2,fma"))) void run_avx2(const P& p, int64_t b, int64_t u0, int64_t u1) {
  run<typename P::Type, 32>(p, b, u0, u1);
}
#endif

template <typename P>
void run_baseline(const P& p, int64_t b, int64_t u0, int64_t u1) {
  run<typename P::Type, 16>(p, b, u0, u1);
}

// The widest vector unit the CPU has, capped by $SSMBLOCKS_CPU_VECTORS when set ("avx2" or "baseline": the
// tests run every variant on one machine this way); read once a process.
int vector_bytes() {
  static const int bytes = [] {
    const char* cap = std::getenv("SSMBLOCKS_CPU_VECTORS");
    const bool any = cap == nullptr || cap[0] == '\0';
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (any && __builtin_cpu_supports("avx512f")) return 64;
    if ((any || std::strcmp(cap, "avx2") == 0) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return 32;
#endif
    return 16;
  }();
  return bytes;
}

template <typename P>
KernelFn<P> pick_variant() {
#if defined(__x86_64__)
  if (vector_bytes() == 64) return run_avx512<P>;
  if (vector_bytes() == 32) return run_avx2<P>;
#endif
  return run_baseline<P>;
}

// The kernel for P over `units` units of each of `batch` elements, in parallel (at least `grain` units a
// thread), each thread's share cut at batch boundaries.
template <typename P>
void parallel_run(const P& p, int64_t batch, int64_t units, int64_t grain) {
  static const KernelFn<P> fn = pick_variant<P>();
  at::parallel_for(0, batch * units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / units, stop = std::min(end, (b + 1) * units);
      fn(p, b, i - b * units, stop - b * units);
      i = stop;
    }
  });
}

// The checks every entry point makes of its tensor arguments: op's argument `name` has `shape` and is a
// CPU tensor of x's dtype.
void check_arg(const char* op, const at::Tensor& t, at::IntArrayRef shape, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor of x's dtype");
}

at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

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
  if (D_) TORCH_CHECK(D_->numel() == h || D_->numel() == h * p, "ssd_scan: D must be (h,) or (h, p), got ", D_->sizes());
  if (D_) check(*D_, D_->sizes(), "D");
  if (h0_) check(*h0_, {b, h, p, n}, "initial_state");
  const at::Tensor x = unit_last_stride(x_), dt = unit_last_stride(dt_), B = unit_last_stride(B_);
  const at::Tensor C = unit_last_stride(C_), Ac = A.contiguous(), D = D_ ? D_->contiguous() : at::Tensor(), h0 = h0_ ? h0_->contiguous() : at::Tensor();
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

// x: (b, l, c) with unit channel stride; weight: (c, k), k <= 4; bias: (c,) or None; state: (b, c, k - 1),
// contiguous, updated in place, or None (zeros); one dtype, float32 or float64, on the CPU. Returns y:
// (b, l, c), silu applied if asked.
at::Tensor causal_conv1d(const at::Tensor& x_, const at::Tensor& weight, const std::optional<at::Tensor>& bias_,
                         std::optional<at::Tensor> state, bool silu) {
  TORCH_CHECK(x_.dim() == 3 && weight.dim() == 2, "causal_conv1d: x must be (b, l, c) and weight (c, k)");
  const int64_t b = x_.size(0), l = x_.size(1), c = x_.size(2), k = weight.size(1);
  TORCH_CHECK(k >= 1 && k <= 4, "causal_conv1d: kernel width ", k, " not in 1..4");
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    check_arg("causal_conv1d", t, shape, name, x_);
  };
  check(weight, {c, k}, "weight");
  if (bias_) check(*bias_, {c}, "bias");
  if (state) {
    check(*state, {b, c, k - 1}, "state");
    TORCH_CHECK(state->is_contiguous(), "causal_conv1d: state must be contiguous");
  }
  const at::Tensor x = unit_last_stride(x_), w = weight.t().contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({b, l, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d", [&] {
    using T = scalar_t;
    const Conv<T> p{x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias_ ? bias.const_data_ptr<T>() : nullptr,
                    state ? state->mutable_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(), l, c, k,
                    {x.stride(0), x.stride(1)}, silu};
    parallel_run(p, b, (c + kGroup<T> - 1) / kGroup<T>, 1);
  });
  return y;
}

// x: (b, c) with unit channel stride; state: (b, c, k - 1), contiguous, updated in place; weight: (c, k);
// bias: (c,) or None; one dtype, float32 or float64, on the CPU. Returns y: (b, c), silu applied if asked.
at::Tensor causal_conv1d_step(const at::Tensor& x_, at::Tensor& state, const at::Tensor& weight_,
                              const std::optional<at::Tensor>& bias_, bool silu) {
  TORCH_CHECK(x_.dim() == 2 && weight_.dim() == 2, "causal_conv1d_step: x must be (b, c) and weight (c, k)");
  const int64_t b = x_.size(0), c = x_.size(1), k = weight_.size(1);
  const auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    check_arg("causal_conv1d_step", t, shape, name, x_);
  };
  check(weight_, {c, k}, "weight");
  check(state, {b, c, k - 1}, "state");
  if (bias_) check(*bias_, {c}, "bias");
  TORCH_CHECK(state.is_contiguous(), "causal_conv1d_step: state must be contiguous");
  const at::Tensor x = unit_last_stride(x_), w = weight_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({b, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_step", [&] {
    using T = scalar_t;
    const ConvStep<T> p{x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias_ ? bias.const_data_ptr<T>() : nullptr,
                        state.mutable_data_ptr<T>(), y.mutable_data_ptr<T>(), c, k, x.stride(0), silu};
    parallel_run(p, b, c, 4096);
  });
  return y;
}

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
    parallel_run(p, rows, d / group_size, std::max<int64_t>(1, 4096 / group_size));  // >= 4k values a thread
  });
  return y;
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
    parallel_run(norm, b, e / group_size, std::max<int64_t>(1, 4096 / group_size));
  });
  return finish_block(project(y, out_proj_weight, out_proj_bias), x, block_norm_weight.has_value());
}

}  // namespace

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
