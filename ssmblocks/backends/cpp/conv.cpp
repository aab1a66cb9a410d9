// The depthwise causal conv (+ silu) over a sequence (causal_conv1d) and for one token (causal_conv1d_step).
// Reference: the torch path of causal_conv1d in ssmblocks/ops/conv.py.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <vector>

#include "kernels.h"
#include "vectors.h"

namespace ssmblocks_cpu {
namespace {

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

}  // namespace

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

}  // namespace ssmblocks_cpu
