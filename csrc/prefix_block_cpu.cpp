// The prefix block of prefix attention (training path), CPU: forward merge and backward.
//
// ops/prefix_attention.py runs the real keys through ATen's flash kernel, which returns O1 and
// lse1 per query row; the P prefix keys (shared by the batch, [Hkv, P, D]) are merged by
// log-sum-exp. In one pass per row (b, h, l), g = h / (H / Hkv):
//   forward:  s_j  = scale · q·Kp[g,j]                 (j < P)
//             m    = max(max_j s_j, lse1);  e_j = exp(s_j - m);  w = exp(lse1 - m)
//             Z    = Σ_j e_j + w;  p_j = e_j / Z;  lse = m + log Z
//             out  = (w / Z) · O1 + Σ_j p_j Vp[g,j]     (in place over O1)
//   backward: Δ    = dO·out
//             ds_j = p_j · (dO·Vp[g,j] - Δ)
//             dq  += scale · Σ_j ds_j Kp[g,j]           (in place: dq holds the flash part)
//             dKp[g,j] += scale · ds_j q;  dVp[g,j] += p_j dO   (per-thread sums, added at the end)
// replacing ~15 ATen calls (small GEMMs and elementwise passes over [B, H, L, P]) whose
// dispatch and memory passes cost as much as the arithmetic. fp32, accumulating in fp32 as
// the torch path; head dim 64 or 128, P <= 64. Tensors: any strides with a unit-stride head dim.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using ptpeft_cpu::max_of;
using ptpeft_cpu::sum_of;
using ptpeft_cpu::softmax_weight;

// pointer to row (b, h, l) of a [B, H, L, D] tensor with unit stride in D
template <typename T>
inline T* row(T* base, const at::IntArrayRef& st, int64_t b, int64_t h, int64_t l) {
  return base + b * st[0] + h * st[1] + l * st[2];
}

constexpr int64_t kBlock = 16;  // rows per task: one (b, h), so one key/value head g
constexpr int kRows = 4;        // rows computed together: independent FMA chains

using ptpeft_cpu::v16;
inline v16 ld(const float* p) { return ptpeft_cpu::load<v16>(p); }
inline void st(float* p, const v16& v) { ptpeft_cpu::store<v16>(p, v); }
inline float hsum(const v16& v) {
  float t = 0;
  for (int i = 0; i < 16; ++i) t += v[i];
  return t;
}

// The one micro-kernel of both passes: for n <= kRows rows at once,
//   y_i[0:16·W] = (SCALE_Y ? a_i · y_i : 0) + Σ_{k<K} c_i[k] · M[k, 0:16·W]     (M [K, 16·W] rows)
// with the rows' accumulators in vector registers and each M row loaded once for all rows.
// Scores are the case y = s, c = q (K = D), M = the transposed prefix; the merge and dq the case
// c = probabilities (K = P), M = the prefix.
template <int W, bool SCALE_Y>
inline void rows_times(float* const* y, const float* a, const float* const* c, int n, int64_t K, const float* m) {
  v16 acc[kRows][W];
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < W; ++v) acc[i][v] = SCALE_Y ? a[i] * ld(y[i] + 16 * v) : v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 mk[W];
    for (int v = 0; v < W; ++v) mk[v] = ld(m + k * 16 * W + 16 * v);
    for (int i = 0; i < kRows; ++i) {
      if (i >= n) break;
      const float ck = c[i][k];
      for (int v = 0; v < W; ++v) acc[i][v] += ck * mk[v];
    }
  }
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < W; ++v) st(y[i] + 16 * v, acc[i][v]);
}

// s[i][0:16·PC] = Σ_d x_i[d] · Mᵀ[d, :]   (Mᵀ [D, 16·PC], zero padded past P)
template <int PC, int DV>
inline void scores(const float* const* x, int n, const float* mt, float (*s)[16 * PC]) {
  float* y[kRows];
  for (int i = 0; i < n; ++i) y[i] = s[i];
  rows_times<PC, false>(y, nullptr, x, n, 16 * DV, mt);
}

// the joint softmax of one row: s (P scores, scaled in place) and the real part's lse1
inline void joint_softmax(float* s, int64_t P, float l1, float scale, float* w1, float* lse) {
  for (int64_t j = 0; j < P; ++j) s[j] *= scale;
  const float m = std::max(l1, max_of(s, P));
  for (int64_t j = 0; j < P; ++j) s[j] = softmax_weight(s[j] - m);
  const float w = softmax_weight(l1 - m);  // a fully masked row: exactly 0
  const float z = sum_of(s, P) + w;
  const float inv = 1.0f / z;
  for (int64_t j = 0; j < P; ++j) s[j] *= inv;
  *w1 = w * inv;
  *lse = m + std::log(z);
}

template <int PC, int DV>
void forward_kernel(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse1, const at::Tensor& pkt,
                    const at::Tensor& pv, double scale, at::Tensor& lse, at::Tensor& p2) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = 16 * DV;
  const int64_t Hkv = pv.size(0), P = pv.size(1), G = H / Hkv;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* l1p = lse1.data_ptr<float>();
  const float* ktp = pkt.data_ptr<float>();  // contiguous [Hkv, D, 16·PC], zero padded
  const float* pvp = pv.data_ptr<float>();   // contiguous [Hkv, P, D]
  float* lp = lse.data_ptr<float>();         // contiguous [B, H, L]
  float* pp = p2.data_ptr<float>();          // contiguous [B, H, L, P]
  const auto qs = q.strides(), os = out.strides(), ls = lse1.strides();
  const float sc = static_cast<float>(scale);
  const int64_t nb = (L + kBlock - 1) / kBlock;
  at::parallel_for(0, B * H * nb, 1, [&](int64_t begin, int64_t end) {
    float s[kRows][16 * PC];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (H * nb), h = (t / nb) % H, g = h / G;
      const int64_t l_end = std::min(L, (t % nb + 1) * kBlock);
      for (int64_t l0 = (t % nb) * kBlock; l0 < l_end; l0 += kRows) {
        const int n = static_cast<int>(std::min<int64_t>(kRows, l_end - l0));
        const float* x[kRows];
        float* y[kRows];
        const float* c[kRows];
        float w1[kRows];
        for (int i = 0; i < n; ++i) {
          x[i] = row(qp, qs, b, h, l0 + i);
          y[i] = row(op, os, b, h, l0 + i);
        }
        scores<PC, DV>(x, n, ktp + g * D * 16 * PC, s);
        for (int i = 0; i < n; ++i) {
          const int64_t l = l0 + i, r = (b * H + h) * L + l;
          joint_softmax(s[i], P, l1p[b * ls[0] + h * ls[1] + l * ls[2]], sc, &w1[i], &lp[r]);
          std::memcpy(pp + r * P, s[i], sizeof(float) * P);
          c[i] = pp + r * P;
        }
        rows_times<DV, true>(y, w1, c, n, P, pvp + g * P * D);
      }
    }
  });
}

template <int PC, int DV>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& p2,
                     const at::Tensor& pk, const at::Tensor& pvt, double scale, at::Tensor* dq, at::Tensor& dpk,
                     at::Tensor& dpv) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = 16 * DV;
  const int64_t Hkv = pk.size(0), P = pk.size(1), G = H / Hkv;
  const float* gp = dout.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* pp = p2.data_ptr<float>();
  const float* pkp = pk.data_ptr<float>();   // contiguous [Hkv, P, D]
  const float* vtp = pvt.data_ptr<float>();  // contiguous [Hkv, D, 16·PC], zero padded
  float* dqp = dq ? dq->data_ptr<float>() : nullptr;
  const auto gs = dout.strides(), qs = q.strides(), os = out.strides();
  const std::vector<int64_t> dqs = dq ? dq->strides().vec() : std::vector<int64_t>(4, 0);
  const float sc = static_cast<float>(scale);
  const int threads = at::get_num_threads();
  const int64_t n_acc = Hkv * P * D;
  // per-thread dKp (unscaled: the scale is applied once at the end) and dVp
  std::vector<float> acc(static_cast<size_t>(threads) * 2 * n_acc, 0.0f);
  const int64_t nb = (L + kBlock - 1) / kBlock;
  at::parallel_for(0, B * H * nb, 1, [&](int64_t begin, int64_t end) {
    float* mk = acc.data() + static_cast<size_t>(at::get_thread_num()) * 2 * n_acc;
    float* mv = mk + n_acc;
    float ds[kBlock][16 * PC];
    const float* qrow[kBlock];
    const float* grow[kBlock];
    const float* prow[kBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (H * nb), h = (t / nb) % H, g = h / G;
      const int64_t lb = (t % nb) * kBlock, rows = std::min(L, lb + kBlock) - lb;
      for (int64_t i = 0; i < rows; ++i) {
        qrow[i] = row(qp, qs, b, h, lb + i);
        grow[i] = row(gp, gs, b, h, lb + i);
        prow[i] = pp + ((b * H + h) * L + lb + i) * P;
      }
      for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
        const int n = static_cast<int>(std::min<int64_t>(kRows, rows - i0));
        scores<PC, DV>(grow + i0, n, vtp + g * D * 16 * PC, ds + i0);  // dO · Vpᵀ
        const float* c[kRows];
        float* y[kRows];
        float one[kRows];
        for (int i = 0; i < n; ++i) {
          const float* o = row(op, os, b, h, lb + i0 + i);
          v16 dl = v16{};
          for (int v = 0; v < DV; ++v) dl += ld(grow[i0 + i] + 16 * v) * ld(o + 16 * v);
          const float delta = hsum(dl);
          float* d = ds[i0 + i];
          const float* p = prow[i0 + i];
          for (int64_t j = 0; j < P; ++j) d[j] = p[j] * (d[j] - delta);
          c[i] = d;
          one[i] = 1.0f;
          if (dqp) y[i] = dqp + b * dqs[0] + h * dqs[1] + (lb + i0 + i) * dqs[2];
        }
        if (dqp) {
          // dq += scale · ds Kp: the scale folded into ds for this product only
          float dss[kRows][16 * PC];
          for (int i = 0; i < n; ++i) {
            for (int64_t j = 0; j < P; ++j) dss[i][j] = sc * c[i][j];
            c[i] = dss[i];
          }
          rows_times<DV, true>(y, one, c, n, P, pkp + g * P * D);
        }
      }
      // dKp[g, j] += Σ_rows ds[j] q,  dVp[g, j] += Σ_rows p[j] dO: accumulators in registers
      // over the block's rows, read and written once per block
      for (int64_t j = 0; j < P; ++j) {
        float* ka = mk + (g * P + j) * D;
        float* va = mv + (g * P + j) * D;
        v16 k[DV], vv[DV];
        for (int v = 0; v < DV; ++v) k[v] = ld(ka + 16 * v), vv[v] = ld(va + 16 * v);
        for (int64_t i = 0; i < rows; ++i) {
          const float cd = ds[i][j], cp = prow[i][j];
          for (int v = 0; v < DV; ++v) {
            k[v] += cd * ld(qrow[i] + 16 * v);
            vv[v] += cp * ld(grow[i] + 16 * v);
          }
        }
        for (int v = 0; v < DV; ++v) st(ka + 16 * v, k[v]), st(va + 16 * v, vv[v]);
      }
    }
  });
  float* dk = dpk.data_ptr<float>();
  float* dv = dpv.data_ptr<float>();
  for (int64_t i = 0; i < n_acc; ++i) {
    float sk = 0, sv = 0;
    for (int th = 0; th < threads; ++th) {
      sk += acc[static_cast<size_t>(th) * 2 * n_acc + i];
      sv += acc[static_cast<size_t>(th) * 2 * n_acc + n_acc + i];
    }
    dk[i] = sk * sc;
    dv[i] = sv;
  }
}

// Dispatch on the padded prefix length (16·PC >= P, PC <= 4) and the head dim (64 or 128).
template <template <int, int> class F, typename... Args>
void dispatch(int64_t P, int64_t D, Args&&... args) {
  const int pc = static_cast<int>((P + 15) / 16);
  const bool d64 = D == 64;
  switch (pc) {
    case 1: d64 ? F<1, 4>::run(args...) : F<1, 8>::run(args...); break;
    case 2: d64 ? F<2, 4>::run(args...) : F<2, 8>::run(args...); break;
    case 3: d64 ? F<3, 4>::run(args...) : F<3, 8>::run(args...); break;
    default: d64 ? F<4, 4>::run(args...) : F<4, 8>::run(args...); break;
  }
}

template <int PC, int DV>
struct Fwd {
  template <typename... A>
  static void run(A&... a) { forward_kernel<PC, DV>(a...); }
};
template <int PC, int DV>
struct Bwd {
  template <typename... A>
  static void run(A&... a) { backward_kernel<PC, DV>(a...); }
};

// Mᵀ of a [Hkv, P, D] prefix as [Hkv, D, 16·PC], zero padded past P
at::Tensor transposed_padded(const at::Tensor& m) {
  const int64_t P = m.size(1), pad = (P + 15) / 16 * 16;
  at::Tensor t = at::zeros({m.size(0), m.size(2), pad}, m.options());
  t.narrow(2, 0, P).copy_(m.transpose(1, 2));
  return t;
}

void check_rows(const char* op, const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.sizes() == q.sizes(), op, ": ", name, " must have q's shape [B, H, L, D]");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type(), op, ": ", name, " must be a CPU tensor of q's dtype");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name, " needs a unit-stride head dim");
}

void check_prefix(const char* op, const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& q) {
  TORCH_CHECK(pk.dim() == 3 && pv.sizes() == pk.sizes() && pk.size(1) >= 1 && pk.size(2) == q.size(3) &&
                  pk.size(0) > 0 && q.size(1) % pk.size(0) == 0,
              op, ": prefix_k/v must be [Hkv, P >= 1, D] with H % Hkv == 0");
  TORCH_CHECK(pk.scalar_type() == q.scalar_type() && pv.scalar_type() == q.scalar_type() && pk.device().is_cpu(),
              op, ": prefix_k/v must be CPU tensors of q's dtype");
}

void check_supported(const char* op, const at::Tensor& q, const at::Tensor& pk) {
  TORCH_CHECK(q.scalar_type() == at::kFloat, op, ": float32 only (other dtypes take the ATen path)");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, op, ": head dim 64 or 128 only, got ", q.size(3));
  TORCH_CHECK(pk.size(1) <= 64, op, ": at most 64 prefix tokens, got ", pk.size(1));
}

// Returns (lse [B, H, L], p2 [B, H, L, P]); `out` (= O1 on entry) is overwritten with the merged output.
std::tuple<at::Tensor, at::Tensor> prefix_block_forward(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse1,
                                                        const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                        double scale) {
  const char* name = "prefix_block_forward";
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), name, ": q must be a 4-D CPU tensor");
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, name, ": q needs a unit-stride head dim");
  check_rows(name, out, q, "out");
  check_prefix(name, prefix_k, prefix_v, q);
  check_supported(name, q, prefix_k);
  TORCH_CHECK(lse1.dim() == 3 && lse1.size(0) == q.size(0) && lse1.size(1) == q.size(1) && lse1.size(2) == q.size(2) &&
                  lse1.scalar_type() == q.scalar_type(),
              name, ": lse1 must be [B, H, L] in q's dtype");
  const at::Tensor pkt = transposed_padded(prefix_k), pv = prefix_v.contiguous();
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  at::Tensor p2 = at::empty({q.size(0), q.size(1), q.size(2), pv.size(1)}, q.options());
  if (q.numel() == 0) return {lse, p2};
  dispatch<Fwd>(pv.size(1), q.size(3), q, out, lse1, pkt, pv, scale, lse, p2);
  return {lse, p2};
}

// Adds the prefix terms to `dq` in place (when given) and returns (dKp, dVp) [Hkv, P, D],
// summed over the batch and the query heads of each key/value head.
std::tuple<at::Tensor, at::Tensor> prefix_block_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                         const at::Tensor& out, const at::Tensor& p2,
                                                         const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                         const c10::optional<at::Tensor>& dq, double scale) {
  const char* name = "prefix_block_backward";
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), name, ": q must be a 4-D CPU tensor");
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, name, ": q needs a unit-stride head dim");
  check_rows(name, grad_out, q, "grad_out");
  check_rows(name, out, q, "out");
  check_prefix(name, prefix_k, prefix_v, q);
  check_supported(name, q, prefix_k);
  TORCH_CHECK(p2.is_contiguous() && p2.dim() == 4 && p2.size(3) == prefix_k.size(1) && p2.size(0) == q.size(0) &&
                  p2.size(1) == q.size(1) && p2.size(2) == q.size(2) && p2.scalar_type() == q.scalar_type(),
              name, ": p2 must be the forward's contiguous [B, H, L, P]");
  at::Tensor dqt;
  if (dq.has_value() && dq->defined()) {
    dqt = *dq;
    check_rows(name, dqt, q, "dq");
  }
  const at::Tensor pk = prefix_k.contiguous(), pvt = transposed_padded(prefix_v);
  at::Tensor dpk = at::zeros(pk.sizes(), q.options());
  at::Tensor dpv = at::zeros(pk.sizes(), q.options());
  if (q.numel() == 0) return {dpk, dpv};
  at::Tensor* dqp = dqt.defined() ? &dqt : nullptr;
  dispatch<Bwd>(pk.size(1), q.size(3), grad_out, q, out, p2, pk, pvt, scale, dqp, dpk, dpv);
  return {dpk, dpv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptpeft_fast, m) {
  m.def("prefix_block_forward(Tensor q, Tensor(a!) out, Tensor lse1, Tensor prefix_k, Tensor prefix_v, float scale) -> (Tensor, Tensor)");
  m.def("prefix_block_backward(Tensor grad_out, Tensor q, Tensor out, Tensor p2, Tensor prefix_k, Tensor prefix_v, Tensor(a!)? dq, float scale) -> (Tensor, Tensor)");
}

// AVX-512 builds only (the row blocks keep 16-float vectors in registers; see lora_grads_cpu.cpp).
#if defined(__AVX512F__)
TORCH_LIBRARY_IMPL(ptpeft_fast, CPU, m) {
  m.impl("prefix_block_forward", &prefix_block_forward);
  m.impl("prefix_block_backward", &prefix_block_backward);
}
#endif
