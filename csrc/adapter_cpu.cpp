// Bottleneck adapter forward and backward over blocks of rows, CPU, fp32 and fp64.
//
// The math is ptpeft_fast/ops/adapter.py's (Â = [act(H) | 1], Ŵu = [Wu | bu]):
//     forward:  H = X Wdᵀ + bd,  A = act(H),  Y = X + Â Ŵuᵀ
//     backward: dA = dY Wu,  dH = act'(H) ∘ dA,  dX = dY + dH Wd,
//               dŴuᵀ = Âᵀ dY,  dWd = dHᵀ X,  dbd = Σ_rows dH
// The unblocked path runs each line as one BLAS call over all N rows, so X, dY and the fresh
// Y and dX stream through memory several times (addmm's copy of the residual into its output
// is a full pass of its own). Here each thread takes blocks of `rows` rows and runs the same
// calls on the block (single-threaded BLAS inside the parallel region): a block of X or dY is
// read from memory once, and the other passes over it hit L2. The weight gradients accumulate
// per thread ([m(+1), d_out] and [m, d]) and are summed at the end; that traffic grows with
// m·d, which is why ops/adapter.py takes this path only for small m·d (measured there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

namespace {

enum class Act { kRelu, kGelu, kSilu };

Act parse_activation(c10::string_view name) {
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  TORCH_CHECK(name == "silu", "adapter_cpu: activation must be relu, gelu or silu, got ", std::string(name));
  return Act::kSilu;
}

void check_inputs(const char* op, const at::Tensor& x, std::initializer_list<const at::Tensor*> others, int64_t rows) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, d]");
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble), op,
              ": float32 or float64 CPU tensors");
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), op, ": all tensors need x's dtype, on CPU");
  TORCH_CHECK(rows >= 1, op, ": rows must be positive");
}

// Thread-local state differs between the calling thread and OpenMP's workers: workers start
// with grad mode on (out= ops then refuse inputs that require grad) and without the caller's
// autocast. Every block body runs without both, so all blocks compute alike.
template <typename F>
void for_each_block(int64_t n, int64_t rows, const F& body) {
  const int64_t blocks = (n + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows;
      body(r0, std::min(rows, n - r0));
    }
  });
}

// Returns (y [N, d_out], a_hat [N, m(+1)], h [N, m] for gelu/silu, else an empty tensor).
// up_hat_t is Ŵuᵀ: [m + 1, d_out] with the up bias as its last row, or [m, d_out] without.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_forward(const at::Tensor& x, const at::Tensor& down_w,
                                                               const c10::optional<at::Tensor>& down_b,
                                                               const at::Tensor& up_hat_t, c10::string_view activation,
                                                               bool residual, int64_t rows) {
  check_inputs("adapter_blocked_forward", x, {&down_w, &up_hat_t}, rows);
  const Act act = parse_activation(activation);
  const int64_t n = x.size(0), d = x.size(1), m = down_w.size(0), d_out = up_hat_t.size(1);
  TORCH_CHECK(down_w.dim() == 2 && down_w.size(1) == d, "adapter_blocked_forward: down_w must be [m, d]");
  TORCH_CHECK(up_hat_t.dim() == 2 && (up_hat_t.size(0) == m || up_hat_t.size(0) == m + 1),
              "adapter_blocked_forward: up_hat_t must be [m(+1), d_out]");
  TORCH_CHECK(!residual || d_out == d, "adapter_blocked_forward: residual needs d_out == d");
  const bool has_db = down_b.has_value() && down_b->defined();
  if (has_db) TORCH_CHECK(down_b->dim() == 1 && down_b->size(0) == m && down_b->scalar_type() == x.scalar_type(),
                          "adapter_blocked_forward: down_b must be [m] in x's dtype");
  const bool has_ub = up_hat_t.size(0) == m + 1;

  at::Tensor y = at::empty({n, d_out}, x.options());
  at::Tensor a_hat = at::empty({n, m + (has_ub ? 1 : 0)}, x.options());
  if (has_ub) a_hat.select(1, m).fill_(1.0);
  at::Tensor h = act == Act::kRelu ? at::empty({0}, x.options()) : at::empty({n, m}, x.options());
  const at::Tensor down_t = down_w.t();
  for_each_block(n, rows, [&](int64_t r0, int64_t nr) {
    const at::Tensor xb = x.narrow(0, r0, nr);
    at::Tensor ab = a_hat.narrow(0, r0, nr);
    at::Tensor a = ab.narrow(1, 0, m);
    // relu runs in place on H (its backward needs only A > 0); gelu/silu keep H for theirs
    at::Tensor hb = act == Act::kRelu ? a : h.narrow(0, r0, nr);
    if (has_db) at::addmm_out(hb, *down_b, xb, down_t);
    else at::mm_out(hb, xb, down_t);
    // through a contiguous temporary: a is a strided view, and gelu's out= variant writes a
    // strided out wrongly (torch 2.13 CPU, measured)
    if (act == Act::kRelu) a.clamp_min_(0);
    else if (act == Act::kGelu) a.copy_(at::gelu(hb));
    else a.copy_(at::silu(hb));
    at::Tensor yb = y.narrow(0, r0, nr);
    if (residual) at::addmm_out(yb, xb, ab, up_hat_t);
    else at::mm_out(yb, ab, up_hat_t);
  });
  return {y, a_hat, h};
}

// Returns (dx [N, d] or empty, d_down_w [m, d] or empty, d_down_b [m] or empty,
// d_up_hat_t [m(+1), d_out] or empty): the gradients asked for by need_x / need_down / need_up.
// d_up_hat_t = Âᵀ dY holds dWuᵀ in its first m rows and, with an up bias, dbu in its last.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a_hat, const at::Tensor& h, const at::Tensor& down_w,
    const at::Tensor& up_w, c10::string_view activation, bool residual, bool need_x, bool need_down, bool need_up,
    int64_t rows) {
  check_inputs("adapter_blocked_backward", x, {&dy, &a_hat, &down_w, &up_w}, rows);
  const Act act = parse_activation(activation);
  const int64_t n = x.size(0), d = x.size(1), m = down_w.size(0), d_out = up_w.size(0), m_hat = a_hat.size(1);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == n && dy.size(1) == d_out, "adapter_blocked_backward: dy must be [N, d_out]");
  TORCH_CHECK(down_w.dim() == 2 && down_w.size(1) == d && up_w.dim() == 2 && up_w.size(1) == m,
              "adapter_blocked_backward: down_w [m, d], up_w [d_out, m]");
  TORCH_CHECK(a_hat.dim() == 2 && a_hat.size(0) == n && (m_hat == m || m_hat == m + 1),
              "adapter_blocked_backward: a_hat must be [N, m(+1)]");
  TORCH_CHECK(act == Act::kRelu || (h.dim() == 2 && h.size(0) == n && h.size(1) == m && h.scalar_type() == x.scalar_type()),
              "adapter_blocked_backward: gelu/silu need h [N, m]");
  TORCH_CHECK(!residual || d_out == d, "adapter_blocked_backward: residual needs d_out == d");

  const at::Tensor none = at::empty({0}, x.options());
  at::Tensor dx = need_x ? at::empty({n, d}, x.options()) : none;
  const int threads = at::get_num_threads();
  // per-thread accumulators, summed after the loop
  at::Tensor acc_up = need_up ? at::zeros({threads, m_hat, d_out}, x.options()) : none;
  at::Tensor acc_down = need_down ? at::zeros({threads, m, d}, x.options()) : none;
  at::Tensor acc_db = need_down ? at::zeros({threads, m}, x.options()) : none;
  for_each_block(n, rows, [&](int64_t r0, int64_t nr) {
    const int t = at::get_thread_num();
    const at::Tensor dyb = dy.narrow(0, r0, nr);
    const at::Tensor ab = a_hat.narrow(0, r0, nr);
    if (need_up) acc_up[t].addmm_(ab.t(), dyb);
    if (!(need_x || need_down)) return;
    const at::Tensor da = at::mm(dyb, up_w);
    at::Tensor dh;
    if (act == Act::kRelu) dh = at::threshold_backward(da, ab.narrow(1, 0, m), 0);
    else if (act == Act::kGelu) dh = at::gelu_backward(da, h.narrow(0, r0, nr));
    else dh = at::silu_backward(da, h.narrow(0, r0, nr));
    if (need_x) {
      at::Tensor dxb = dx.narrow(0, r0, nr);
      if (residual) at::addmm_out(dxb, dyb, dh, down_w);
      else at::mm_out(dxb, dh, down_w);
    }
    if (need_down) {
      acc_down[t].addmm_(dh.t(), x.narrow(0, r0, nr));
      acc_db[t].add_(dh.sum(0));
    }
  });
  return {dx, need_down ? acc_down.sum(0) : none, need_down ? acc_db.sum(0) : none, need_up ? acc_up.sum(0) : none};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptpeft_fast, m) {
  m.def("adapter_blocked_forward(Tensor x, Tensor down_w, Tensor? down_b, Tensor up_hat_t, str activation, bool residual, "
        "int rows) -> (Tensor, Tensor, Tensor)");
  m.def("adapter_blocked_backward(Tensor dy, Tensor x, Tensor a_hat, Tensor h, Tensor down_w, Tensor up_w, str activation, "
        "bool residual, bool need_x, bool need_down, bool need_up, int rows) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ptpeft_fast, CPU, m) {
  m.impl("adapter_blocked_forward", &adapter_forward);
  m.impl("adapter_blocked_backward", &adapter_backward);
}
