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
// Packed documents (`cu_seqlens`, int32 [n_docs + 1] offsets from 0 to L; B = 1, L == S, causal,
// no mask): each document is a segment of its own, causal within itself, with every prefix key, so
// the blocks and products run over the documents' rows only (work Σ Lᵢ·(Lᵢ + P), not L²) and all
// documents share one parallel loop. A dense call is B segments of L queries over S keys.
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

// One sequence the blocks run over: batch row b, its queries [q0, q0 + len) and keys [k0, k0 + keys).
struct Segment {
  int64_t b, q0, len, k0, keys;
};

// The segments of a call: the B rows (dense), or the documents of the one packed row.
std::vector<Segment> segments(int64_t B, int64_t L, int64_t S, const c10::optional<at::Tensor>& cu_seqlens) {
  std::vector<Segment> out;
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) {
    for (int64_t b = 0; b < B; ++b) out.push_back({b, 0, L, 0, S});
    return out;
  }
  const at::Tensor cu = cu_seqlens->contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  for (int64_t d = 0; d + 1 < cu.numel(); ++d)
    if (c[d + 1] > c[d]) out.push_back({0, c[d], c[d + 1] - c[d], c[d], c[d + 1] - c[d]});
  return out;
}

// The most real keys any segment has (what sizes a block's score buffer and picks its rows).
int64_t segs_keys(const std::vector<Segment>& segs) {
  int64_t n = 0;
  for (const Segment& g : segs) n = std::max(n, g.keys);
  return n;
}

void check_offsets(const char* op, const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& q,
                   const at::Tensor& k, const c10::optional<at::Tensor>& mask, bool causal) {
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) return;
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2 && cu.scalar_type() == at::kInt && cu.device().is_cpu(), op,
              ": cu_seqlens must be int32 CPU offsets [n_docs + 1]");
  TORCH_CHECK(q.size(0) == 1 && q.size(2) == k.size(2) && causal && !(mask.has_value() && mask->defined()), op,
              ": packed documents need one row, L == S, causal and no mask");
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[c.numel() - 1] == q.size(2), op, ": cu_seqlens must run from 0 to L");
  for (int64_t d = 0; d + 1 < c.numel(); ++d) TORCH_CHECK(p[d + 1] >= p[d], op, ": cu_seqlens must not fall");
}

// The shape of one call: checked once, shared by forward and backward.
struct Shape {
  int64_t B, H, L, S, D, Hkv, G, P;
  bool causal;
  Shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pk, bool causal_)
      : B(q.size(0)), H(q.size(1)), L(q.size(2)), S(k.size(2)), D(q.size(3)), Hkv(k.size(1)),
        G(k.size(1) ? q.size(1) / k.size(1) : 1), P(pk.size(1)), causal(causal_) {}
  // real keys a block [m0, m1) of a segment sees (m1 relative to the segment's first query)
  int64_t keys_seen(const Segment& g, int64_t m1) const { return causal ? m1 : g.keys; }
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
                                                        double scale, const c10::optional<at::Tensor>& cu_seqlens) {
  check_inputs("flash_prefix_forward", q, k, v, prefix_k, prefix_v, mask, causal);
  check_offsets("flash_prefix_forward", cu_seqlens, q, k, mask, causal);
  const Mask M(mask);
  const Shape sh(q, k, prefix_k, causal);
  const std::vector<Segment> segs = segments(sh.B, sh.L, sh.S, cu_seqlens);
  at::Tensor out = at::empty_like(q);  // keeps transformers' [B, L, H, D] memory: its transpose back is free
  at::Tensor lse = at::empty({sh.B, sh.H, sh.L}, q.options());
  if (q.numel() == 0) return {out, lse};
  const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  const Rows Q(q), K(k), V(v), O(out);
  const float* pkp = pk.data_ptr<float>();
  const float* pvp = pv.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float s = static_cast<float>(scale);
  // the blocks of every segment: (segment, first row within it)
  // a block's score rows hold the prefix and the most keys a segment has
  const int64_t P = sh.P, D = sh.D, lds = P + segs_keys(segs), qb = query_block(lds);
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t i = 0; i < static_cast<int64_t>(segs.size()); ++i)
    for (int64_t m0 = 0; m0 < segs[i].len; m0 += qb) blocks.push_back({i, m0});
  const int64_t nb = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, nb * sh.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(qb * lds);
    float inv_z[kMaxQueryBlock];
    for (int64_t t = begin; t < end; ++t) {
      const Segment& sg = segs[blocks[t / sh.H].first];
      const int64_t b = sg.b, h = t % sh.H, g = h / sh.G;
      const int64_t m0 = blocks[t / sh.H].second, rows = std::min(sg.len, m0 + qb) - m0;
      const int64_t nreal = sh.keys_seen(sg, m0 + rows), n = P + nreal;
      float* Sc = scores.data();
      const float* q0 = Q.at(b, h, sg.q0 + m0);
      gemm(false, true, rows, P, D, s, q0, Q.ld, pkp + g * P * D, D, 0.0f, Sc, lds);
      gemm(false, true, rows, nreal, D, s, q0, Q.ld, K.at(b, g, sg.k0), K.ld, 0.0f, Sc + P, lds);
      M.add(Sc + P, lds, rows, nreal, b, h, m0);  // dense calls only (segment = row)
      block_softmax(Sc, lds, rows, n, P + m0 + 1, sh.causal, inv_z, lp + (b * sh.H + h) * sh.L + sg.q0 + m0);
      float* o = O.at(b, h, sg.q0 + m0);
      gemm(false, false, rows, D, P, 1.0f, Sc, lds, pvp + g * P * D, D, 0.0f, o, O.ld);
      gemm(false, false, rows, D, nreal, 1.0f, Sc + P, lds, V.at(b, g, sg.k0), V.ld, P > 0 ? 1.0f : 0.0f, o,
           O.ld);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < D; ++d) o[i * O.ld + d] *= inv_z[i];
    }
  });
  return {out, lse};
}

// The backward of one query head h over all its blocks. dK/dV (rows [0, S) of this key head, or of a
// per-query-head scratch) and dKp/dVp ([P, D]) are accumulated; dQ is written.
void backward_head(const Shape& sh, const Mask& M, const Segment& sg, int64_t h, const Rows& dO, const Rows& Q,
                   const Rows& K, const Rows& V, const Rows& O, const float* lse, const float* pk, const float* pv,
                   float scale, bool need_qkv, const Rows& dQ, float* dK, int64_t ldk, float* dV, int64_t ldv,
                   float* dKp, float* dVp, int64_t qb, int64_t lds, std::vector<float>& sbuf,
                   std::vector<float>& dpbuf) {
  const int64_t P = sh.P, D = sh.D, g = h / sh.G, b = sg.b;
  const float* kp = pk + g * P * D;
  const float* vp = pv + g * P * D;
  for (int64_t m0 = 0; m0 < sg.len; m0 += qb) {
    const int64_t rows = std::min(sg.len, m0 + qb) - m0;
    // without q/k/v gradients only the prefix columns are needed
    const int64_t nreal = need_qkv ? sh.keys_seen(sg, m0 + rows) : 0, n = P + nreal;
    float* Sc = sbuf.data();
    float* dP = dpbuf.data();
    const float* q0 = Q.at(b, h, sg.q0 + m0);
    const float* g0 = dO.at(b, h, sg.q0 + m0);
    const float* o0 = O.at(b, h, sg.q0 + m0);
    gemm(false, true, rows, P, D, scale, q0, Q.ld, kp, D, 0.0f, Sc, lds);
    gemm(false, true, rows, nreal, D, scale, q0, Q.ld, K.at(b, g, sg.k0), K.ld, 0.0f, Sc + P, lds);
    M.add(Sc + P, lds, rows, nreal, b, h, m0);  // dense calls only (segment = row)
    gemm(false, true, rows, P, D, 1.0f, g0, dO.ld, vp, D, 0.0f, dP, lds);
    gemm(false, true, rows, nreal, D, 1.0f, g0, dO.ld, V.at(b, g, sg.k0), V.ld, 0.0f, dP + P, lds);
    const float* l = lse + (b * sh.H + h) * sh.L + sg.q0 + m0;
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
    gemm(true, false, nreal, D, rows, 1.0f, Sc + P, lds, g0, dO.ld, 1.0f, dV + sg.k0 * ldv, ldv);
    gemm(true, false, nreal, D, rows, scale, dP + P, lds, q0, Q.ld, 1.0f, dK + sg.k0 * ldk, ldk);
    float* dq0 = dQ.at(b, h, sg.q0 + m0);
    gemm(false, false, rows, D, P, scale, dP, lds, kp, D, 0.0f, dq0, dQ.ld);
    gemm(false, false, rows, D, nreal, scale, dP + P, lds, K.at(b, g, sg.k0), K.ld, P > 0 ? 1.0f : 0.0f, dq0,
         dQ.ld);
  }
}

// Returns (dq, dk, dv, dprefix_k, dprefix_v); dq/dk/dv are undefined when `need_qkv` is false
// (stage 1's first layer: only the prefix trains).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_prefix_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
    bool causal, double scale, bool need_qkv, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* name = "flash_prefix_backward";
  check_inputs(name, q, k, v, prefix_k, prefix_v, mask, causal);
  check_offsets(name, cu_seqlens, q, k, mask, causal);
  const Mask M(mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat && grad_out.device().is_cpu() && out.device().is_cpu(),
              name, ": grad_out and out must be float32 CPU tensors of q's shape");
  for (const at::Tensor* t : {&grad_out, &out}) check_dense_rows(name, *t);
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2) && lse.scalar_type() == at::kFloat,
              name, ": lse must be the forward's contiguous [B, H, L]");
  const Shape sh(q, k, prefix_k, causal);
  const std::vector<Segment> segs = segments(sh.B, sh.L, sh.S, cu_seqlens);
  const int64_t nseg = static_cast<int64_t>(segs.size());
  const int64_t P = sh.P, D = sh.D, lds = P + segs_keys(segs), qb = query_block(lds);
  const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  at::Tensor dq, dk, dv;
  // key/value-head gradients: written in place by the task owning that head when each task
  // owns one (MHA, or enough batch x kv heads to keep the threads busy); otherwise per query
  // head into scratch, summed over the group after
  const int threads = at::get_num_threads();
  const bool by_kv_head = sh.G == 1 || nseg * sh.Hkv >= 2 * threads;
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
  const int64_t tasks = by_kv_head ? nseg * sh.Hkv : nseg * sh.H;
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
      const int64_t cells = qb * lds;
      std::vector<float> sbuf(cells), dpbuf(cells);
      for (int64_t t = begin; t < end; ++t) {
        const Segment& sg = segs[by_kv_head ? t / sh.Hkv : t / sh.H];
        const int64_t h_first = by_kv_head ? (t % sh.Hkv) * sh.G : t % sh.H;
        const int64_t h_count = by_kv_head ? sh.G : 1;
        // the rows of this segment's keys are written by this task only (segments do not overlap)
        float* dK = need_qkv ? dKr.at(sg.b, by_kv_head ? t % sh.Hkv : h_first) : nullptr;
        float* dV = need_qkv ? dVr.at(sg.b, by_kv_head ? t % sh.Hkv : h_first) : nullptr;
        for (int64_t h = h_first; h < h_first + h_count; ++h)
          backward_head(sh, M, sg, h, dO, Q, K, V, O, lp, pkp, pvp, s, need_qkv, dQ, dK, dKr.ld, dV, dVr.ld,
                        dkp + t * P * D, dvp + t * P * D, qb, lds, sbuf, dpbuf);
      }
    });
  }
  // tasks are (segment, kv head) or (segment, query head): sum the prefix partials over segments and group
  const int64_t per_b = by_kv_head ? sh.Hkv : sh.H;
  at::Tensor dpk = dpk_part.view({nseg, per_b, P, D}).sum(0);
  at::Tensor dpv = dpv_part.view({nseg, per_b, P, D}).sum(0);
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
  m.def("flash_prefix_forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? mask, bool causal, float scale, Tensor? cu_seqlens=None) -> (Tensor, Tensor)");
  m.def("flash_prefix_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? mask, Tensor out, Tensor lse, bool causal, float scale, bool need_qkv, Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ptpeft_fast, CPU, m) {
  m.impl("flash_prefix_forward", &flash_prefix_forward);
  m.impl("flash_prefix_backward", &flash_prefix_backward);
}
