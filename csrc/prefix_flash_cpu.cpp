// Prefix attention by blocks of query rows, CPU, fp32: the P prefix keys and the real keys in
// one softmax, forward and backward, the products as BLAS sgemm calls on each block.
//
// For a block of QB query rows (b, h, [m0, m1)) of key/value head g = h / (H / Hkv), with
// keys [Kp; K] (the P prefix keys first, then the real keys the block can see: all S of them,
// or the first m1 under the causal mask, L == S) and s = scale:
//   forward:  S   = s · Q [Kp; K]ᵀ (+ M on the real keys)   (two sgemm calls into one [QB, P + n] buffer)
//             m   = rowmax(S);  E = exp(S - m) (0 above the diagonal);  z = rowsum(E)
//             O   = (E [Vp; V]) / z;  lse = m + log z
//   backward: Pr  = exp(S - lse) (S recomputed);  dP = dO [Vp; V]ᵀ;  Δ = rowsum(dO ∘ O)
//             dS  = Pr ∘ (dP - Δ)
//             dQ  = s · dS [Kp; K];   d[Kp; K] += s · dSᵀ Q;   d[Vp; V] += Prᵀ dO
// The block's scores stay in cache between the products, and no mask over P + S keys, no
// concatenated keys and no separate prefix merge pass exist. ATen's flash kernel, which the
// older path ran over the real keys before merging the prefix in (prefix_block_cpu.cpp),
// splits the same work into smaller products; this file measured 0.67-0.70x its fwd+bwd time
// for B=4 H=8 L=512 D=64 with P=32 on top (benchmarks/analysis.md).
//
// M is an optional additive float mask over the real keys ([B or 1, H or 1, L or 1, S], finite:
// padding rows keep the prefix), as transformers passes padding; `causal` may come with it when
// the mask allows nothing above the diagonal, so the blocks still skip those keys.
//
// sgemm is MKL's (or whichever BLAS torch links), looked up in libtorch_cpu at run time: a
// torch build without it reports flash_prefix_available() == false and Python keeps the older
// path. Tensors: fp32 CPU, q [B, H, L, D], k/v [B, Hkv, S, D], any strides with a unit-stride
// head dim; prefix [Hkv, P, D] shared by the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using ptpeft_cpu::softmax_weight;

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

// torch's own BLAS: the symbol is exported by libtorch_cpu (already loaded: this library links it)
sgemm_fn blas_sgemm() {
  static const sgemm_fn fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    if (lib == nullptr) return static_cast<sgemm_fn>(nullptr);
    void* sym = dlsym(lib, "sgemm_");
    if (sym == nullptr) sym = dlsym(lib, "SGEMM");
    return reinterpret_cast<sgemm_fn>(sym);
  }();
  return fn;
}

// Row-major C[M, N] = alpha · op(A) op(B) + beta · C, op(A) [M, K], op(B) [K, N]: the
// column-major call computing Cᵀ = op(B)ᵀ op(A)ᵀ.
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  blas_sgemm()(&tb, &ta, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

constexpr int64_t kMaxQueryBlock = 128;

// Rows per block: 64 (a block's [64, P + S] scores, two such buffers in the backward, stay in L2
// up to ~2.5K keys); 128 beyond, where the larger products won (0.98x the general path's time at
// 4K keys against 1.03x; 16 or 32 rows, for cache, were 1.8-2.6x slower).
inline int64_t query_block(int64_t keys) { return keys <= 2560 ? 64 : 128; }

// Rows of a [B, H, T, D] tensor: base pointer of (b, h) and the row stride (any value when T == 1).
struct Rows {
  float* base;
  int64_t sb, sh, ld;
  Rows(const at::Tensor& t) : base(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)),
                              ld(t.size(2) > 1 ? t.stride(2) : t.size(3)) {}
  float* at(int64_t b, int64_t h, int64_t row = 0) const { return base + b * sb + h * sh + row * ld; }
};

// The optional additive mask over the real keys, broadcast over size-1 dims.
struct Mask {
  const float* base = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
  Mask(const c10::optional<at::Tensor>& m) {
    if (!m.has_value() || !m->defined()) return;
    base = m->data_ptr<float>();
    sb = m->size(0) == 1 ? 0 : m->stride(0);
    sh = m->size(1) == 1 ? 0 : m->stride(1);
    sl = m->size(2) == 1 ? 0 : m->stride(2);
  }
  // adds row (b, h, l0 + i) of the mask to the real-key scores of each block row
  void add(float* S, int64_t lds, int64_t rows, int64_t nreal, int64_t b, int64_t h, int64_t l0) const {
    if (base == nullptr) return;
    for (int64_t i = 0; i < rows; ++i) {
      const float* m = base + b * sb + h * sh + (l0 + i) * sl;
      float* s = S + i * lds;
      for (int64_t j = 0; j < nreal; ++j) s[j] += m[j];
    }
  }
};

// The shape of one call: checked once, shared by forward and backward.
struct Shape {
  int64_t B, H, L, S, D, Hkv, G, P;
  bool causal;
  Shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pk, bool causal_)
      : B(q.size(0)), H(q.size(1)), L(q.size(2)), S(k.size(2)), D(q.size(3)), Hkv(k.size(1)),
        G(k.size(1) ? q.size(1) / k.size(1) : 1), P(pk.size(1)), causal(causal_) {}
  int64_t keys_seen(int64_t m1) const { return causal ? m1 : S; }  // real keys a block [m0, m1) sees
  int64_t row_width() const { return P + S; }
};

// BLAS reads rows of a [B, H, T, D] tensor with one leading dimension: unit-stride features,
// rows that do not overlap.
void check_dense_rows(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.size(3) <= 1 || (t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3))), op,
              ": tensors need a unit-stride head dim and rows that do not overlap");
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                  const at::Tensor& pv, const c10::optional<at::Tensor>& mask, bool causal) {
  TORCH_CHECK(blas_sgemm() != nullptr, op, ": torch exports no sgemm (see flash_prefix_available)");
  for (const at::Tensor* t : {&q, &k, &v, &pk, &pv})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": float32 CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), op, ": q [B, H, L, D], k/v [B, Hkv, S, D]");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": k/v must share q's batch and head dim, with H % Hkv == 0");
  TORCH_CHECK(pk.dim() == 3 && pv.sizes() == pk.sizes() && pk.size(0) == k.size(1) && pk.size(2) == q.size(3), op,
              ": prefix_k/v must be [Hkv, P, D]");
  TORCH_CHECK(!causal || q.size(2) == k.size(2), op, ": causal needs as many queries as keys (L == S)");
  for (const at::Tensor* t : {&q, &k, &v}) check_dense_rows(op, *t);
  TORCH_CHECK(q.numel() < (int64_t{1} << 31) && k.numel() < (int64_t{1} << 31), op, ": tensors too large for 32-bit BLAS");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.device().is_cpu() && m.scalar_type() == at::kFloat, op,
                ": mask must be a 4-D float32 CPU tensor (additive, over the real keys)");
    const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int d = 0; d < 3; ++d)
      TORCH_CHECK(m.size(d) == 1 || m.size(d) == full[d], op, ": mask does not broadcast to [B, H, L, S]");
    TORCH_CHECK(m.size(3) == full[3] && (m.size(3) <= 1 || m.stride(3) == 1), op,
                ": the mask's last dim must cover the S real keys with unit stride");
  }
}

// Softmax of one block's rows in place: E = exp(S - rowmax), zero where masked; returns via
// inv_z[i] = 1 / rowsum and lse[i] = rowmax + log(rowsum). Row i sees `P + m0 + i + 1` keys
// under the causal mask, all `n` otherwise.
void block_softmax(float* S, int64_t lds, int64_t rows, int64_t n, int64_t first_valid, bool causal, float* inv_z,
                   float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * lds;
    const int64_t valid = causal ? first_valid + i : n;
    const float m = ptpeft_cpu::max_of(s, valid);
    for (int64_t j = 0; j < valid; ++j) s[j] = softmax_weight(s[j] - m);
    for (int64_t j = valid; j < n; ++j) s[j] = 0.0f;
    const float z = ptpeft_cpu::sum_of(s, valid);
    inv_z[i] = 1.0f / z;
    lse[i] = m + std::log(z);
  }
}

// Returns (out, lse): out [B, H, L, D] in q's memory layout, lse [B, H, L].
std::tuple<at::Tensor, at::Tensor> flash_prefix_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                        const c10::optional<at::Tensor>& mask, bool causal,
                                                        double scale) {
  check_inputs("flash_prefix_forward", q, k, v, prefix_k, prefix_v, mask, causal);
  const Mask M(mask);
  const Shape sh(q, k, prefix_k, causal);
  at::Tensor out = at::empty_like(q);  // keeps transformers' [B, L, H, D] memory: its transpose back is free
  at::Tensor lse = at::empty({sh.B, sh.H, sh.L}, q.options());
  if (q.numel() == 0) return {out, lse};
  const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  const Rows Q(q), K(k), V(v), O(out);
  const float* pkp = pk.data_ptr<float>();
  const float* pvp = pv.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t P = sh.P, D = sh.D, lds = sh.row_width(), qb = query_block(lds), nq = (sh.L + qb - 1) / qb;
  at::parallel_for(0, sh.B * sh.H * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(qb * lds);
    float inv_z[kMaxQueryBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (sh.H * nq), h = (t / nq) % sh.H, g = h / sh.G;
      const int64_t m0 = (t % nq) * qb, rows = std::min(sh.L, m0 + qb) - m0;
      const int64_t nreal = sh.keys_seen(m0 + rows), n = P + nreal;
      float* Sc = scores.data();
      const float* q0 = Q.at(b, h, m0);
      gemm(false, true, rows, P, D, s, q0, Q.ld, pkp + g * P * D, D, 0.0f, Sc, lds);
      gemm(false, true, rows, nreal, D, s, q0, Q.ld, K.at(b, g), K.ld, 0.0f, Sc + P, lds);
      M.add(Sc + P, lds, rows, nreal, b, h, m0);
      block_softmax(Sc, lds, rows, n, P + m0 + 1, sh.causal, inv_z, lp + (b * sh.H + h) * sh.L + m0);
      float* o = O.at(b, h, m0);
      gemm(false, false, rows, D, P, 1.0f, Sc, lds, pvp + g * P * D, D, 0.0f, o, O.ld);
      gemm(false, false, rows, D, nreal, 1.0f, Sc + P, lds, V.at(b, g), V.ld, P > 0 ? 1.0f : 0.0f, o, O.ld);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < D; ++d) o[i * O.ld + d] *= inv_z[i];
    }
  });
  return {out, lse};
}

// The backward of one query head h over all its blocks. dK/dV (rows [0, S) of this key head, or of a
// per-query-head scratch) and dKp/dVp ([P, D]) are accumulated; dQ is written.
void backward_head(const Shape& sh, const Mask& M, int64_t b, int64_t h, const Rows& dO, const Rows& Q, const Rows& K,
                   const Rows& V, const Rows& O, const float* lse, const float* pk, const float* pv, float scale, bool need_qkv,
                   const Rows& dQ, float* dK, int64_t ldk, float* dV, int64_t ldv, float* dKp, float* dVp,
                   std::vector<float>& sbuf, std::vector<float>& dpbuf) {
  const int64_t P = sh.P, D = sh.D, lds = sh.row_width(), g = h / sh.G, qb = query_block(lds);
  const float* kp = pk + g * P * D;
  const float* vp = pv + g * P * D;
  for (int64_t m0 = 0; m0 < sh.L; m0 += qb) {
    const int64_t rows = std::min(sh.L, m0 + qb) - m0;
    // without q/k/v gradients only the prefix columns are needed
    const int64_t nreal = need_qkv ? sh.keys_seen(m0 + rows) : 0, n = P + nreal;
    float* Sc = sbuf.data();
    float* dP = dpbuf.data();
    const float* q0 = Q.at(b, h, m0);
    const float* g0 = dO.at(b, h, m0);
    const float* o0 = O.at(b, h, m0);
    gemm(false, true, rows, P, D, scale, q0, Q.ld, kp, D, 0.0f, Sc, lds);
    gemm(false, true, rows, nreal, D, scale, q0, Q.ld, K.at(b, g), K.ld, 0.0f, Sc + P, lds);
    M.add(Sc + P, lds, rows, nreal, b, h, m0);
    gemm(false, true, rows, P, D, 1.0f, g0, dO.ld, vp, D, 0.0f, dP, lds);
    gemm(false, true, rows, nreal, D, 1.0f, g0, dO.ld, V.at(b, g), V.ld, 0.0f, dP + P, lds);
    const float* l = lse + (b * sh.H + h) * sh.L + m0;
    for (int64_t i = 0; i < rows; ++i) {
      float* sp = Sc + i * lds;
      float* dp = dP + i * lds;
      const int64_t valid = sh.causal ? std::min(n, P + m0 + i + 1) : n;
      const float li = l[i];
      const float delta = ptpeft_cpu::dot(g0 + i * dO.ld, o0 + i * O.ld, D);
      for (int64_t j = 0; j < valid; ++j) {
        const float pr = softmax_weight(sp[j] - li);
        sp[j] = pr;
        dp[j] = pr * (dp[j] - delta);
      }
      for (int64_t j = valid; j < n; ++j) sp[j] = 0.0f, dp[j] = 0.0f;
    }
    gemm(true, false, P, D, rows, 1.0f, Sc, lds, g0, dO.ld, 1.0f, dVp, D);
    gemm(true, false, P, D, rows, scale, dP, lds, q0, Q.ld, 1.0f, dKp, D);
    if (!need_qkv) continue;
    gemm(true, false, nreal, D, rows, 1.0f, Sc + P, lds, g0, dO.ld, 1.0f, dV, ldv);
    gemm(true, false, nreal, D, rows, scale, dP + P, lds, q0, Q.ld, 1.0f, dK, ldk);
    float* dq0 = dQ.at(b, h, m0);
    gemm(false, false, rows, D, P, scale, dP, lds, kp, D, 0.0f, dq0, dQ.ld);
    gemm(false, false, rows, D, nreal, scale, dP + P, lds, K.at(b, g), K.ld, P > 0 ? 1.0f : 0.0f, dq0, dQ.ld);
  }
}

// Returns (dq, dk, dv, dprefix_k, dprefix_v); dq/dk/dv are undefined when `need_qkv` is false
// (stage 1's first layer: only the prefix trains).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_prefix_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
    bool causal, double scale, bool need_qkv) {
  const char* name = "flash_prefix_backward";
  check_inputs(name, q, k, v, prefix_k, prefix_v, mask, causal);
  const Mask M(mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat && grad_out.device().is_cpu() && out.device().is_cpu(),
              name, ": grad_out and out must be float32 CPU tensors of q's shape");
  for (const at::Tensor* t : {&grad_out, &out}) check_dense_rows(name, *t);
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2) && lse.scalar_type() == at::kFloat,
              name, ": lse must be the forward's contiguous [B, H, L]");
  const Shape sh(q, k, prefix_k, causal);
  const int64_t P = sh.P, D = sh.D;
  const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  at::Tensor dq, dk, dv;
  // key/value-head gradients: written in place by the task owning that head when each task
  // owns one (MHA, or enough batch x kv heads to keep the threads busy); otherwise per query
  // head into scratch, summed over the group after
  const int threads = at::get_num_threads();
  const bool by_kv_head = sh.G == 1 || sh.B * sh.Hkv >= 2 * threads;
  at::Tensor dk_acc, dv_acc;
  if (need_qkv) {
    dq = at::empty_like(q);
    if (by_kv_head) {
      dk_acc = at::zeros_like(k);
      dv_acc = at::zeros_like(v);
    } else {
      dk_acc = at::zeros({sh.B, sh.H, sh.S, D}, q.options());
      dv_acc = at::zeros({sh.B, sh.H, sh.S, D}, q.options());
    }
  }
  const int64_t tasks = by_kv_head ? sh.B * sh.Hkv : sh.B * sh.H;
  at::Tensor dpk_part = at::zeros({tasks, P, D}, q.options());
  at::Tensor dpv_part = at::zeros({tasks, P, D}, q.options());
  if (q.numel() > 0 && sh.S + P > 0) {
    const Rows dO(grad_out), Q(q), K(k), V(v), O(out);
    // without q/k/v gradients these are never written (backward_head stops before them)
    const Rows dQ = need_qkv ? Rows(dq) : Rows(q);
    const Rows dKr = need_qkv ? Rows(dk_acc) : Rows(k), dVr = need_qkv ? Rows(dv_acc) : Rows(v);
    const float* lp = lse.data_ptr<float>();
    const float* pkp = pk.data_ptr<float>();
    const float* pvp = pv.data_ptr<float>();
    float* dkp = dpk_part.data_ptr<float>();
    float* dvp = dpv_part.data_ptr<float>();
    const float s = static_cast<float>(scale);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      const int64_t cells = query_block(sh.row_width()) * sh.row_width();
      std::vector<float> sbuf(cells), dpbuf(cells);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = by_kv_head ? t / sh.Hkv : t / sh.H;
        const int64_t h_first = by_kv_head ? (t % sh.Hkv) * sh.G : t % sh.H;
        const int64_t h_count = by_kv_head ? sh.G : 1;
        float* dK = need_qkv ? dKr.at(b, by_kv_head ? t % sh.Hkv : h_first) : nullptr;
        float* dV = need_qkv ? dVr.at(b, by_kv_head ? t % sh.Hkv : h_first) : nullptr;
        for (int64_t h = h_first; h < h_first + h_count; ++h)
          backward_head(sh, M, b, h, dO, Q, K, V, O, lp, pkp, pvp, s, need_qkv, dQ, dK, dKr.ld, dV, dVr.ld,
                        dkp + t * P * D, dvp + t * P * D, sbuf, dpbuf);
      }
    });
  }
  // tasks are (b, kv head) or (b, query head): sum the prefix partials over batch and group
  const int64_t per_b = by_kv_head ? sh.Hkv : sh.H;
  at::Tensor dpk = dpk_part.view({sh.B, per_b, P, D}).sum(0);
  at::Tensor dpv = dpv_part.view({sh.B, per_b, P, D}).sum(0);
  if (!by_kv_head) {
    dpk = dpk.view({sh.Hkv, sh.G, P, D}).sum(1);
    dpv = dpv.view({sh.Hkv, sh.G, P, D}).sum(1);
  }
  if (need_qkv) {
    dk = by_kv_head ? dk_acc : dk_acc.view({sh.B, sh.Hkv, sh.G, sh.S, D}).sum(2);
    dv = by_kv_head ? dv_acc : dv_acc.view({sh.B, sh.Hkv, sh.G, sh.S, D}).sum(2);
  }
  return {dq, dk, dv, dpk, dpv};
}

bool flash_prefix_available() { return blas_sgemm() != nullptr; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptpeft_fast, m) {
  m.def("flash_prefix_available() -> bool", &flash_prefix_available);
  m.def("flash_prefix_forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? mask, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("flash_prefix_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? mask, Tensor out, Tensor lse, bool causal, float scale, bool need_qkv) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ptpeft_fast, CPU, m) {
  m.impl("flash_prefix_forward", &flash_prefix_forward);
  m.impl("flash_prefix_backward", &flash_prefix_backward);
}
