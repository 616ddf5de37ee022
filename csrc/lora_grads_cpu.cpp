// LoRA factor gradients in one pass over X and dY, CPU, fp32.
//
// For y = X W'ᵀ with W' = W + s·B·A (A [r, in], B [out, r]) the factor gradients are
//     T  = X Aᵀ        [N, r]
//     U  = dY B        [N, r]
//     dA = s · Uᵀ X    [r, in]
//     dB = s · dYᵀ T   [out, r]
// four GEMMs with an r-wide side, which BLAS runs as four separate, inefficient passes over
// a [N, in] or [N, out] operand (X twice, dY twice). Here a block of NB rows is read once:
//     1. T[n]   = Σ_i X[n,i] · Aᵀ[i]                      (X block, from memory)
//     2. U[n]   = Σ_o dY[n,o] · B[o];  dB[o] += Σ_n dY[n,o] · T[n]   (dY block, one read)
//     3. dAᵀ[i] += Σ_n X[n,i] · U[n]                      (X block again, still in cache)
// with every r-vector (Aᵀ[i], B[o], T[n], U[n], dAᵀ[i], dB[o]) held as K SIMD vectors and
// T, U of the block in registers. Each thread accumulates dAᵀ, dB over its own rows; the
// partial sums are added at the end. Accumulation is fp32 (as MKL's sgemm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using ptpeft_cpu::load;
using ptpeft_cpu::store;
using ptpeft_cpu::v16;
using ptpeft_cpu::v8;

#if defined(__AVX512F__)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Rows per block: T and U of the block (2·NB·K vectors) plus B[o] and dB[o] (2·K) fit in the
// vector registers (a V of 16 floats takes two without AVX-512); at most 12 rows, as more
// rows 4 KiB apart would contend for the same L1 set.
template <typename V, int K>
constexpr int rows_per_block() {
  constexpr int regs_per_v = (sizeof(V) == 64 && kVectorRegisters == 16) ? 2 : 1;
  constexpr int nb = (kVectorRegisters / regs_per_v - 2 * K - 2) / (2 * K);
  return nb < 1 ? 1 : (nb > 12 ? 12 : nb);
}

// One block of NB rows (see the file comment). At [in, R], B [out, R]; dAt [in, R], dB [out, R]
// are this thread's accumulators.
template <typename V, int K, int NB>
inline void block(const float* X, int64_t ldx, const float* DY, int64_t ldy, int64_t in, int64_t out,
                  const float* At, const float* Bm, float* dAt, float* dB) {
  constexpr int L = sizeof(V) / sizeof(float);
  constexpr int R = L * K;
  V t[NB][K], u[NB][K];
  for (int n = 0; n < NB; ++n)
    for (int k = 0; k < K; ++k) t[n][k] = V{} , u[n][k] = V{};
  for (int64_t i = 0; i < in; ++i) {
    V a[K];
    for (int k = 0; k < K; ++k) a[k] = load<V>(At + i * R + k * L);
    for (int n = 0; n < NB; ++n) {
      const float xv = X[n * ldx + i];
      for (int k = 0; k < K; ++k) t[n][k] += xv * a[k];
    }
  }
  for (int64_t o = 0; o < out; ++o) {
    V b[K], db[K];
    for (int k = 0; k < K; ++k) b[k] = load<V>(Bm + o * R + k * L), db[k] = load<V>(dB + o * R + k * L);
    for (int n = 0; n < NB; ++n) {
      const float d = DY[n * ldy + o];
      for (int k = 0; k < K; ++k) {
        u[n][k] += d * b[k];
        db[k] += d * t[n][k];
      }
    }
    for (int k = 0; k < K; ++k) store<V>(dB + o * R + k * L, db[k]);
  }
  for (int64_t i = 0; i < in; ++i) {
    V da[K];
    for (int k = 0; k < K; ++k) da[k] = load<V>(dAt + i * R + k * L);
    for (int n = 0; n < NB; ++n) {
      const float xv = X[n * ldx + i];
      for (int k = 0; k < K; ++k) da[k] += xv * u[n][k];
    }
    for (int k = 0; k < K; ++k) store<V>(dAt + i * R + k * L, da[k]);
  }
}

template <typename V, int K>
void lora_grads_kernel(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& at_, const at::Tensor& b,
                       at::Tensor& dat, at::Tensor& db) {
  constexpr int NB = rows_per_block<V, K>();
  constexpr int R = static_cast<int>(sizeof(V) / sizeof(float)) * K;
  const int64_t N = x.size(0), in = x.size(1), out = dy.size(1);
  const int64_t ldx = x.stride(0), ldy = dy.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* yp = dy.data_ptr<float>();
  const float* ap = at_.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const int64_t blocks = (N + NB - 1) / NB;
  const int threads = at::get_num_threads();
  // per-thread accumulators [threads, in + out, R]; thread 0's are summed into
  std::vector<float> acc(static_cast<size_t>(threads) * (in + out) * R, 0.0f);
  // a block of rows is ~ (in + out)·R·NB·4 flops: keep small problems on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, (in + out) * R * NB * 4));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float* mine = acc.data() + static_cast<size_t>(at::get_thread_num()) * (in + out) * R;
    float* dA = mine;
    float* dB = mine + in * R;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * NB;
      if (r0 + NB <= N) {
        block<V, K, NB>(xp + r0 * ldx, ldx, yp + r0 * ldy, ldy, in, out, ap, bp, dA, dB);
      } else {
        for (int64_t r = r0; r < N; ++r) block<V, K, 1>(xp + r * ldx, ldx, yp + r * ldy, ldy, in, out, ap, bp, dA, dB);
      }
    }
  });
  float* da_out = dat.data_ptr<float>();
  float* db_out = db.data_ptr<float>();
  const int64_t na = in * R, nbn = out * R;
  for (int64_t j = 0; j < na; ++j) {
    float s = 0;
    for (int th = 0; th < threads; ++th) s += acc[static_cast<size_t>(th) * (in + out) * R + j];
    da_out[j] = s;
  }
  for (int64_t j = 0; j < nbn; ++j) {
    float s = 0;
    for (int th = 0; th < threads; ++th) s += acc[static_cast<size_t>(th) * (in + out) * R + na + j];
    db_out[j] = s;
  }
}

// Ranks 8, 16, 24, 32. Larger ranks leave too few rows per block in registers, and the
// per-block traffic of the dAᵀ, dB accumulators makes the kernel slower than BLAS (r = 64:
// 1.4x BLAS's time, measured).
bool lora_grads_supported_rank(int64_t r) { return r % 8 == 0 && r >= 8 && r <= 32; }

// Returns (dA [r, in], dB [out, r]), both already multiplied by `scale`.
std::tuple<at::Tensor, at::Tensor> lora_factor_grads(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, double scale) {
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2,
              "lora_factor_grads: x [N, in], dy [N, out], lora_a [r, in], lora_b [out, r] must be 2-D");
  const int64_t N = x.size(0), in = x.size(1), out = dy.size(1), r = lora_a.size(0);
  TORCH_CHECK(dy.size(0) == N && lora_a.size(1) == in && lora_b.size(0) == out && lora_b.size(1) == r,
              "lora_factor_grads: mismatched shapes");
  for (const at::Tensor* t : {&x, &dy, &lora_a, &lora_b})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "lora_factor_grads: float32 CPU tensors");
  TORCH_CHECK(lora_grads_supported_rank(r), "lora_factor_grads: rank ", r, " unsupported (8, 16, 24 or 32)");
  TORCH_CHECK(x.stride(1) == 1 && dy.stride(1) == 1, "lora_factor_grads: x and dy need unit stride in features");
  const at::Tensor at_ = lora_a.t().contiguous();  // [in, r]: Aᵀ[i] is one r-vector
  const at::Tensor b = lora_b.contiguous();
  at::Tensor dat = at::empty({in, r}, x.options());
  at::Tensor db = at::empty({out, r}, x.options());
  if (N == 0) {
    dat.zero_();
    db.zero_();
  } else {
#if defined(__AVX512F__)
    if (r % 16 == 0) {
      switch (r / 16) {
        case 1: lora_grads_kernel<v16, 1>(x, dy, at_, b, dat, db); break;
        default: lora_grads_kernel<v16, 2>(x, dy, at_, b, dat, db); break;
      }
      return {dat.t().contiguous().mul_(scale), db.mul_(scale)};
    }
#endif
    switch (r / 8) {
      case 1: lora_grads_kernel<v8, 1>(x, dy, at_, b, dat, db); break;
      case 2: lora_grads_kernel<v8, 2>(x, dy, at_, b, dat, db); break;
      case 3: lora_grads_kernel<v8, 3>(x, dy, at_, b, dat, db); break;
      default: lora_grads_kernel<v8, 4>(x, dy, at_, b, dat, db); break;
    }
  }
  return {dat.t().contiguous().mul_(scale), db.mul_(scale)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptpeft_fast, m) {
  m.def("lora_factor_grads(Tensor x, Tensor dy, Tensor lora_a, Tensor lora_b, float scale) -> (Tensor, Tensor)");
}

// Registered in every build, so every build is tested; lora_linear's dispatch table takes it
// under "auto" only from the avx512 build (32 vector registers: 12 rows per block at r = 16).
// With AVX2's 16 registers a block is 2 rows and the kernel measured 1.1-1.2x BLAS's time;
// lowered to SSE2, 15x.
TORCH_LIBRARY_IMPL(ptpeft_fast, CPU, m) { m.impl("lora_factor_grads", &lora_factor_grads); }
