// CUDA kernels for batched singular values (issue 4). No torch headers: see spectrum_cuda.h.
//
// Per sample b (n_b valid rows, n = min(n_b, d)):
//   1. gram_kernel: G = F F^T (n_b ≤ d) or F^T F, 16×16 shared-memory tiles, lower-triangle
//      tiles only, mirrored to the upper triangle.
//   2. jacobi_kernel: one block per matrix, parallel cyclic two-sided Jacobi with round-robin
//      (tournament) ordering: n/2 disjoint rotations per round, applied as one row pass and one
//      column pass. Small matrices (n ≤ kSharedMaxN) are solved in shared memory, larger ones
//      in the global workspace. Eigenvalues λ → s = sqrt(max(λ, 0)), sorted descending by rank.

#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>

#include "spectrum_cuda.h"

namespace {

constexpr int kTile = 16;
constexpr int kThreads = 256;  // power of two (block_sum)
constexpr int64_t kSharedMaxN = 64;
constexpr int kMaxSweeps = 40;
constexpr int64_t kMaxGridZ = 65535;

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  __device__ static float eps() { return FLT_EPSILON; }
};
template <>
struct Traits<double> {
  __device__ static double eps() { return DBL_EPSILON; }
};

__device__ inline int64_t sample_rows(const int64_t* lengths, int64_t b, int64_t rows) {
  return lengths != nullptr ? lengths[b] : rows;
}

// Round-robin pairing: index m-1 is fixed, 0..m-2 rotate; every pair meets once per m-1 rounds.
__device__ inline void pair_of(int r, int k, int m, int* p, int* q) {
  int a, b;
  if (k == 0) {
    a = r;
    b = m - 1;
  } else {
    a = (r + k) % (m - 1);
    b = (r - k + (m - 1)) % (m - 1);
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

template <typename T>
__device__ T block_sum(T v, T* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const T r = red[0];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void gram_kernel(const T* __restrict__ x, const int64_t* __restrict__ lengths, int64_t b0, int64_t rows,
                            int64_t d, T* __restrict__ g, int64_t ld) {
  const int64_t b = b0 + blockIdx.z;
  const int64_t nb = sample_rows(lengths, b, rows);
  const bool row_gram = nb <= d;  // G = F F^T (order nb), else F^T F (order d)
  const int64_t n = row_gram ? nb : d;
  const int64_t kdim = row_gram ? d : nb;
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj > ti || ti * kTile >= n) return;  // uniform per block: upper tiles come from the mirror
  // sa[k][r] = M[ti*kTile + r][k0 + k] with M = F (row gram) or F^T; loads are coalesced either way.
  __shared__ T sa[kTile][kTile + 1];
  __shared__ T sb[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const T* f = x + b * rows * d;
  T acc = T(0);
  for (int64_t k0 = 0; k0 < kdim; k0 += kTile) {
    T va = T(0), vb = T(0);
    if (row_gram) {
      const int64_t k = k0 + tx, ra = ti * kTile + ty, rb = tj * kTile + ty;
      if (k < kdim && ra < n) va = f[ra * d + k];
      if (k < kdim && rb < n) vb = f[rb * d + k];
      sa[tx][ty] = va;
      sb[tx][ty] = vb;
    } else {
      const int64_t k = k0 + ty, ca = ti * kTile + tx, cb = tj * kTile + tx;
      if (k < kdim && ca < n) va = f[k * d + ca];
      if (k < kdim && cb < n) vb = f[k * d + cb];
      sa[ty][tx] = va;
      sb[ty][tx] = vb;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) acc += sa[k][ty] * sb[k][tx];
    __syncthreads();
  }
  const int64_t i = ti * kTile + ty, j = tj * kTile + tx;
  if (i < n && j < n && j <= i) {
    T* gb = g + b * ld * ld;
    gb[i * ld + j] = acc;
    gb[j * ld + i] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) jacobi_kernel(T* __restrict__ g, int64_t ld, const int64_t* __restrict__ lengths,
                                                          int64_t b0, int64_t rows, int64_t d, T* __restrict__ out,
                                                          int64_t kcols, int32_t* __restrict__ status, int use_shared) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int rotated;
  __shared__ int bad;
  const int64_t b = b0 + blockIdx.x;
  const int64_t nb = sample_rows(lengths, b, rows);
  const int n = static_cast<int>(nb < d ? nb : d);
  const int m = n + (n & 1);  // odd n: one dummy index, its pairs are skipped
  const int npairs = m / 2;
  const int tid = threadIdx.x, nt = blockDim.x;

  T* a = g + b * ld * ld;
  int64_t lda = ld;
  unsigned char* cursor = smem;
  if (use_shared) {
    T* sa = reinterpret_cast<T*>(cursor);
    cursor += static_cast<size_t>(ld) * ld * sizeof(T);
    for (int w = tid; w < n * n; w += nt) sa[w] = a[(w / n) * ld + (w % n)];
    a = sa;
    lda = n;
  }
  T* cs = reinterpret_cast<T*>(cursor);  // cosines [npairs]
  T* sn = cs + npairs;                   // sines [npairs]
  T* red = sn + npairs;                  // reduction scratch [blockDim]
  if (tid == 0) bad = 0;
  __syncthreads();

  T diag_sq = T(0), off_sq = T(0);
  for (int w = tid; w < n * n; w += nt) {
    const T v = a[(w / n) * lda + (w % n)];
    if (w / n == w % n) {
      if (!isfinite(v)) bad = 1;
      diag_sq += v * v;
    } else {
      off_sq += v * v;
    }
  }
  __syncthreads();
  T* ob = out + b * kcols;
  if (bad) {
    for (int w = tid; w < kcols; w += nt) ob[w] = T(0);
    if (tid == 0) status[b] = PTPEFT_SPECTRUM_NONFINITE;
    return;
  }
  const T eps = Traits<T>::eps();
  const T norm_a = sqrt(block_sum(diag_sq, red) + block_sum(off_sq, red));
  // Absolute floor: off-diagonal entries below eps·‖A‖/n move eigenvalues by < eps·‖A‖.
  const T tol_abs = eps * norm_a / static_cast<T>(n > 0 ? n : 1);

  int sweep = 0;
  for (; sweep < kMaxSweeps && n > 1; ++sweep) {
    if (tid == 0) rotated = 0;
    __syncthreads();
    for (int r = 0; r < m - 1; ++r) {
      for (int k = tid; k < npairs; k += nt) {
        int p, q;
        pair_of(r, k, m, &p, &q);
        T c = T(1), s = T(0);
        if (q < n) {
          const T apq = a[p * lda + q], app = a[p * lda + p], aqq = a[q * lda + q];
          const T tol = fmax(eps * sqrt(fabs(app * aqq)), tol_abs);
          if (fabs(apq) > tol) {
            const T theta = (aqq - app) / (T(2) * apq);
            const T t = copysign(T(1), theta) / (fabs(theta) + sqrt(theta * theta + T(1)));
            c = T(1) / sqrt(t * t + T(1));
            s = t * c;
            rotated = 1;
          }
        }
        cs[k] = c;
        sn[k] = s;
      }
      __syncthreads();
      // Rows: A <- P^T A (disjoint pairs commute). Consecutive threads walk a row: coalesced.
      for (int w = tid; w < npairs * n; w += nt) {
        const int k = w / n, j = w % n;
        const T s = sn[k];
        if (s == T(0)) continue;
        int p, q;
        pair_of(r, k, m, &p, &q);
        const T c = cs[k];
        const T ap = a[p * lda + j], aq = a[q * lda + j];
        a[p * lda + j] = c * ap - s * aq;
        a[q * lda + j] = s * ap + c * aq;
      }
      __syncthreads();
      // Columns: A <- A P. Consecutive threads take different pairs of the same row.
      for (int w = tid; w < npairs * n; w += nt) {
        const int k = w % npairs, i = w / npairs;
        const T s = sn[k];
        if (s == T(0)) continue;
        int p, q;
        pair_of(r, k, m, &p, &q);
        const T c = cs[k];
        const T ap = a[i * lda + p], aq = a[i * lda + q];
        a[i * lda + p] = c * ap - s * aq;
        a[i * lda + q] = s * ap + c * aq;
      }
      __syncthreads();
    }
    if (!rotated) break;
    __syncthreads();  // everyone read `rotated` before thread 0 resets it
  }

  // Descending order by rank (ties broken by index), then zero padding up to kcols.
  for (int i = tid; i < n; i += nt) {
    const T li = a[i * lda + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const T lj = a[j * lda + j];
      rank += (lj > li) || (lj == li && j < i);
    }
    ob[rank] = li > T(0) ? sqrt(li) : T(0);
  }
  for (int w = n + tid; w < kcols; w += nt) ob[w] = T(0);
  if (tid == 0) status[b] = sweep >= kMaxSweeps ? PTPEFT_SPECTRUM_NOT_CONVERGED : PTPEFT_SPECTRUM_OK;
}

template <typename T>
int launch(const T* x, const int64_t* lengths, int64_t batch, int64_t rows, int64_t d, T* out, int64_t kcols,
           void* workspace, int32_t* status, cudaStream_t stream) {
  if (batch <= 0 || kcols <= 0) return static_cast<int>(cudaSuccess);
  const int64_t nmax = kcols;
  T* g = static_cast<T*>(workspace);
  const int64_t tiles = (nmax + kTile - 1) / kTile;
  const int use_shared = nmax <= kSharedMaxN ? 1 : 0;
  const int64_t npairs = (nmax + 1) / 2;
  const size_t smem = (use_shared ? static_cast<size_t>(nmax * nmax) * sizeof(T) : 0) +
                      static_cast<size_t>(2 * npairs + kThreads) * sizeof(T);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(jacobi_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridZ) {
    const int64_t nb = batch - b0 < kMaxGridZ ? batch - b0 : kMaxGridZ;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles), static_cast<unsigned>(nb));
    gram_kernel<T><<<grid, dim3(kTile, kTile), 0, stream>>>(x, lengths, b0, rows, d, g, nmax);
    jacobi_kernel<T><<<static_cast<unsigned>(nb), kThreads, smem, stream>>>(g, nmax, lengths, b0, rows, d, out, kcols,
                                                                             status, use_shared);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" size_t ptpeft_spectrum_workspace_bytes(int64_t batch, int64_t n_max, int64_t elem_bytes) {
  return static_cast<size_t>(batch) * static_cast<size_t>(n_max) * static_cast<size_t>(n_max) *
         static_cast<size_t>(elem_bytes);
}

extern "C" int ptpeft_spectrum_svals_f32(const float* x, const int64_t* lengths, int64_t batch, int64_t rows, int64_t d,
                                         float* out, int64_t kcols, void* workspace, int32_t* status,
                                         struct CUstream_st* stream) {
  return launch<float>(x, lengths, batch, rows, d, out, kcols, workspace, status, stream);
}

extern "C" int ptpeft_spectrum_svals_f64(const double* x, const int64_t* lengths, int64_t batch, int64_t rows,
                                         int64_t d, double* out, int64_t kcols, void* workspace, int32_t* status,
                                         struct CUstream_st* stream) {
  return launch<double>(x, lengths, batch, rows, d, out, kcols, workspace, status, stream);
}
