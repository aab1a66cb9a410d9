// The vector unit shared by every C++ CPU kernel (torch.ops.ssmblocks_cpu.*): the vector types and lane
// helpers, and the machinery that compiles each kernel for AVX-512, AVX2 and the baseline vector unit and
// picks one at run time. Header-only, so that each kernel file instantiates its own variants. The kernels'
// torch references are the paths of ssmblocks/ops/ named in each kernel file.
//
// A kernel is a parameter struct P (with `using Type = T`) and an overload of run<T, Bytes>(p, b, u0, u1),
// declared beside P (found by argument-dependent lookup when run_avx512<P> etc. are instantiated), that runs
// units u0 .. u1 of batch element b in vectors of Bytes; parallel_run(p, batch, units, grain) runs it.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#define SSM_INLINE inline __attribute__((always_inline))

namespace ssmblocks_cpu {

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

// Each kernel compiled for each vector unit; the one to use is picked at run time on x86-64, so that the
// cached build runs on any x86-64 CPU. A kernel runs over units [u0, u1) (channel groups, channels) of
// one batch element b.
template <typename P>
using KernelFn = void (*)(const P&, int64_t b, int64_t u0, int64_t u1);

// Never defined: it only makes `run<` below name a template; the kernels' run overloads, declared beside
// their parameter structs, are found by argument-dependent lookup where the variants are instantiated.
template <typename T, int Bytes>
void run();

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
// tests run every variant on one machine this way); read once a process (inline: one function, one static,
// for all the kernel files).
inline int vector_bytes() {
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
inline void check_arg(const char* op, const at::Tensor& t, at::IntArrayRef shape, const char* name,
                      const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor of x's dtype");
}

inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace ssmblocks_cpu
