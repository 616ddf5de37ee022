// CUDA implementations of ptpeft_fast::singular_values / spectrum_stats: checks and launches the
// torch-free kernels of spectrum_cuda.cu through their C ABI on the current stream.
// Compiled only when torch has CUDA (see ptpeft_fast/_ext.py); the ops are defined in
// spectrum_cpu.cpp. NOTE: compile-checked only where torch ships the c10/cuda headers.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "spectrum_cuda.h"

namespace ptpeft_fast {
namespace {

struct CudaSvals {
  at::Tensor svals;  // [B, min(L, d)]
  at::Tensor ranks;  // [B] int64 on device: min(length_b, d)
};

CudaSvals run_svals(const at::Tensor& features, const c10::optional<at::Tensor>& lengths) {
  TORCH_CHECK_VALUE(features.dim() == 3, "features must be 3-D [batch, tokens, dim], got ", features.dim(), "-D");
  TORCH_CHECK_VALUE(features.is_cuda(), "features must be a CUDA tensor for this kernel");
  TORCH_CHECK_VALUE(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
                    "features must be float32 or float64, got ", features.scalar_type());
  const int64_t B = features.size(0), L = features.size(1), d = features.size(2);
  TORCH_CHECK_VALUE(B > 0, "features is an empty batch (batch size 0)");
  TORCH_CHECK_VALUE(L > 0 && d > 0, "features has an empty token or feature dimension");
  c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const int64_t kcols = std::min(L, d);
  at::Tensor len_dev;
  if (lengths.has_value()) {
    TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->size(0) == B, "lengths must be 1-D of size batch=", B);
    const at::Tensor len_cpu = lengths->to(at::kCPU, at::kLong);
    TORCH_CHECK_VALUE(len_cpu.min().item<int64_t>() >= 1 && len_cpu.max().item<int64_t>() <= L,
                      "lengths must lie in [1, ", L, "]");
    len_dev = len_cpu.to(x.device()).contiguous();
  }
  const int64_t* lp = len_dev.defined() ? len_dev.const_data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({B, kcols}, x.options());
  at::Tensor status = at::zeros({B}, x.options().dtype(at::kInt));
  at::Tensor ws = at::empty(
      {static_cast<int64_t>(ptpeft_spectrum_workspace_bytes(B, kcols, static_cast<int64_t>(x.element_size())))},
      x.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  int err = 0;
  if (x.scalar_type() == at::kFloat) {
    err = ptpeft_spectrum_svals_f32(x.const_data_ptr<float>(), lp, B, L, d, out.mutable_data_ptr<float>(), kcols,
                                    ws.mutable_data_ptr(), status.mutable_data_ptr<int32_t>(), stream);
  } else {
    err = ptpeft_spectrum_svals_f64(x.const_data_ptr<double>(), lp, B, L, d, out.mutable_data_ptr<double>(), kcols,
                                    ws.mutable_data_ptr(), status.mutable_data_ptr<int32_t>(), stream);
  }
  TORCH_CHECK(err == 0, "ptpeft_fast spectrum CUDA kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  const at::Tensor st = status.cpu();  // synchronises; needed to report bad samples
  const int32_t* sp = st.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(sp[b] != PTPEFT_SPECTRUM_NONFINITE, "features contain NaN or Inf (or values whose square overflows ",
                      x.scalar_type(), ") in sample ", b);
    TORCH_CHECK(sp[b] != PTPEFT_SPECTRUM_NOT_CONVERGED, "the Jacobi eigensolver did not converge for sample ", b);
  }
  at::Tensor ranks = len_dev.defined() ? len_dev.clamp_max(d) : at::full({B}, kcols, x.options().dtype(at::kLong));
  return {out, ranks};
}

at::Tensor singular_values_cuda(const at::Tensor& features, const c10::optional<at::Tensor>& lengths) {
  return run_svals(features, lengths).svals;
}

// Same formulas as the CPU kernel, as ATen ops on the device (the singular values dominate).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectrum_stats_cuda(const at::Tensor& features,
                                                                             const c10::optional<at::Tensor>& lengths,
                                                                             double threshold) {
  TORCH_CHECK_VALUE(threshold > 0.0 && threshold <= 1.0, "threshold must be in (0, 1], got ", threshold);
  const CudaSvals r = run_svals(features, lengths);
  const int64_t K = r.ranks.max().item<int64_t>();
  at::Tensor s = r.svals.narrow(1, 0, K).to(at::kDouble);
  const at::Tensor valid = at::arange(K, r.ranks.options()).unsqueeze(0) < r.ranks.unsqueeze(1);
  s = s * valid.to(at::kDouble);
  const at::Tensor total = s.sum(1, /*keepdim=*/true);
  const at::Tensor zero = (total <= 0).flatten();
  TORCH_CHECK_VALUE(!zero.any().item<bool>(), "sample ", zero.nonzero().flatten()[0].item<int64_t>(),
                    " has all-zero features: its normalised spectrum is undefined");
  const at::Tensor p = s / total;
  const at::Tensor plogp = at::where(p > 0, p * at::log(p), at::zeros_like(p));
  const at::Tensor erank = at::exp(-plogp.sum(1)).mean();
  const at::Tensor mean_p = p.mean(0);
  const at::Tensor curve = at::cumsum(mean_p, 0);
  const at::Tensor hit = (curve >= threshold).nonzero();
  const int64_t kstar = hit.size(0) > 0 ? hit[0][0].item<int64_t>() + 1 : K;
  const at::Tensor ratio = at::scalar_tensor(static_cast<double>(kstar) / static_cast<double>(K),
                                             at::TensorOptions().dtype(at::kDouble));
  return {mean_p.cpu(), curve.cpu(), ratio, erank.cpu()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ptpeft_fast, CUDA, m) {
  m.impl("singular_values", &singular_values_cuda);
  m.impl("spectrum_stats", &spectrum_stats_cuda);
}

}  // namespace ptpeft_fast
