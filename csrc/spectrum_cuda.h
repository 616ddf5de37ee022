/* C ABI of the CUDA spectrum kernels (csrc/spectrum_cuda.cu).
 *
 * Free of torch and CUDA headers so the kernels compile with plain nvcc (design §3/§4);
 * the torch binding (spectrum_cuda_binding.cpp) passes raw device pointers and the current
 * stream. All pointers are device pointers. Return value: a cudaError_t (0 = success).
 */
#ifndef PTPEFT_FAST_SPECTRUM_CUDA_H_
#define PTPEFT_FAST_SPECTRUM_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st; /* cudaStream_t is `struct CUstream_st*` */

/* Status codes written per sample into `status`. */
enum { PTPEFT_SPECTRUM_OK = 0, PTPEFT_SPECTRUM_NONFINITE = 1, PTPEFT_SPECTRUM_NOT_CONVERGED = 2 };

/* Bytes of scratch memory the solver needs for `batch` matrices of order at most `n_max`. */
size_t ptpeft_spectrum_workspace_bytes(int64_t batch, int64_t n_max, int64_t elem_bytes);

/* Singular values of x[b, :lengths[b], :] (x: contiguous [batch, rows, d]; lengths may be NULL
 * = all rows), descending, into out[b, 0:kcols] (kcols = min(rows, d)), zero beyond
 * min(lengths[b], d). `status` receives one code per sample. */
int ptpeft_spectrum_svals_f32(const float* x, const int64_t* lengths, int64_t batch, int64_t rows, int64_t d,
                              float* out, int64_t kcols, void* workspace, int32_t* status, struct CUstream_st* stream);
int ptpeft_spectrum_svals_f64(const double* x, const int64_t* lengths, int64_t batch, int64_t rows, int64_t d,
                              double* out, int64_t kcols, void* workspace, int32_t* status, struct CUstream_st* stream);

#ifdef __cplusplus
}
#endif

#endif /* PTPEFT_FAST_SPECTRUM_CUDA_H_ */
