// Prefix-augmented attention for a few queries per row (decode steps), CPU, no autograd.
//
// out[b,h,l] = softmax([q·Kp | q·K + mask] · scale) · [Vp | V] over the P prefix keys of the
// row's key/value head g = h / (H / Hkv) and the S real keys, in one pass per (b, h, l).
// At decode sizes (L = 1, S ~ 10^2) the work is a few hundred thousand flops: the cost of
// the generic path is its ~10 tensor ops and their dispatch, which this single op replaces.
// Inputs: q [B,H,L,D], k/v [B,Hkv,S,D] (any strides, unit stride in D), prefix_k/v [Hkv,P,D],
// mask (optional) additive and finite, broadcastable to [B,H,L,S]. The prefix is never
// masked, so every softmax has at least P >= 1 finite terms and a positive denominator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using ptpeft_cpu::dot;
using ptpeft_cpu::softmax_weight;
using ptpeft_cpu::sum_of;

template <typename T, typename A>
inline void axpy(A* acc, A w, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(x[i]);
}

// DC > 0: the head dim as a compile-time constant (64, 128: the common ones), so the loops over
// it unroll and q and the output accumulator stay in vector registers; DC == 0: any head dim.
template <typename T, int DC>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                   const at::Tensor& pv, const at::Tensor& mask, double scale, at::Tensor& out) {
  using A = T;  // fp32 accumulates in fp32 (as ATen's CPU SDPA does), fp64 in fp64
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = DC > 0 ? DC : q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), P = pk.size(1), G = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* pkp = pk.data_ptr<T>();
  const T* pvp = pv.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool has_mask = mask.defined();
  const T* mp = has_mask ? mask.data_ptr<T>() : nullptr;
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), pks = pk.strides(), pvs = pv.strides();
  const std::vector<int64_t> ms = has_mask ? mask.strides().vec() : std::vector<int64_t>(4, 0);
  const int64_t rows = B * H * L;
  // keep tiny problems on one thread: a thread hand-off costs more than the row
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (P + S) * D));
  const A sc = static_cast<A>(scale);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> w(P + S);
    std::vector<A> acc(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * L), h = (r / L) % H, l = r % L, g = h / G;
      const T* qrow = qp + b * qs[0] + h * qs[1] + l * qs[2];
      A mx = -std::numeric_limits<A>::infinity();
      for (int64_t j = 0; j < P; ++j) {
        const A s = dot<T, A>(qrow, pkp + g * pks[0] + j * pks[1], D) * sc;
        w[j] = s;
        mx = std::max(mx, s);
      }
      const T* mrow = has_mask ? mp + b * ms[0] + h * ms[1] + l * ms[2] : nullptr;
      for (int64_t j = 0; j < S; ++j) {
        A s = dot<T, A>(qrow, kp + b * ks[0] + g * ks[1] + j * ks[2], D) * sc;
        if (mrow) s += static_cast<A>(mrow[j * ms[3]]);
        w[P + j] = s;
        mx = std::max(mx, s);
      }
      for (int64_t j = 0; j < P + S; ++j) w[j] = softmax_weight(w[j] - mx);  // masked keys: exactly 0
      const A denom = sum_of(w.data(), P + S);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = 0; j < P; ++j) axpy<T, A>(acc.data(), w[j], pvp + g * pvs[0] + j * pvs[1], D);
      for (int64_t j = 0; j < S; ++j) axpy<T, A>(acc.data(), w[P + j], vp + b * vs[0] + g * vs[1] + j * vs[2], D);
      T* orow = op + ((b * H + h) * L + l) * D;
      const A inv = A(1) / denom;
      for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

at::Tensor prefix_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                   const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefix_decode_attention: q, k, v must be 4-D");
  TORCH_CHECK(prefix_k.dim() == 3 && prefix_v.dim() == 3, "prefix_decode_attention: prefix_k/v must be [Hkv, P, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && prefix_k.sizes() == prefix_v.sizes(), "prefix_decode_attention: k/v shapes differ");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && prefix_k.size(0) == Hkv &&
                  prefix_k.size(2) == D && prefix_k.size(1) >= 1,
              "prefix_decode_attention: mismatched shapes");
  for (const at::Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type(), "prefix_decode_attention: CPU tensors of one dtype");
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1, "prefix_decode_attention: the head dim must have unit stride");
  }
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == q.scalar_type() && mask->dim() == 4, "prefix_decode_attention: mask must be 4-D, q's dtype");
    m = mask->expand({B, H, L, k.size(2)});
  }
  at::Tensor out = at::empty({B, H, L, D}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_decode_attention", [&] {
    if (D == 64)
      decode_kernel<scalar_t, 64>(q, k, v, prefix_k, prefix_v, m, scale, out);
    else if (D == 128)
      decode_kernel<scalar_t, 128>(q, k, v, prefix_k, prefix_v, m, scale, out);
    else
      decode_kernel<scalar_t, 0>(q, k, v, prefix_k, prefix_v, m, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptpeft_fast, m) {
  m.def("prefix_decode_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ptpeft_fast, CPU, m) { m.impl("prefix_decode_attention", &prefix_decode_attention); }
