// pybind11 bindings for phased_dmd_mp._C.
//
// Kernels take raw data pointers (Python passes tensor.data_ptr()) and, on CUDA, the device
// index and the raw stream, so the extension needs no libtorch headers: the same sources build
// against a CPU-only torch (and compile their CUDA part wherever nvcc exists). The wrappers in
// phased_dmd_mp/ops/kernels.py validate devices, dtypes, shapes and contiguity first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "dmd/dmd.h"
#include "subinterval_loss/subinterval_loss.h"

namespace py = pybind11;

namespace {

using phased_dmd::DType;
using Ptr = std::uintptr_t;

const void* in(Ptr p) { return reinterpret_cast<const void*>(p); }
void* out(Ptr p) { return reinterpret_cast<void*>(p); }
DType dtype_of(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("unknown dtype code");
  return static_cast<DType>(code);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "phased_dmd_mp fused kernels; csrc/*/*.h document each op's reference semantics";
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.attr("max_cuda_parts") = phased_dmd::kMaxCudaParts;
  // Bumped whenever a kernel's signature changes; phased_dmd_mp/ops/backend.py refuses a build
  // of another version (a stale _C next to newer Python code) and names the rebuild command.
  m.attr("abi_version") = 2;

  m.def(
      "residual_loss_cpu",
      [](int dtype, Ptr pred, Ptr x_s, Ptr eps, Ptr scale, Ptr xs_coef, Ptr eps_coef, Ptr gscale,
         Ptr grad, Ptr sums, int64_t batch, int64_t per_sample, int threads) {
        phased_dmd::residual_loss_cpu(dtype_of(dtype), in(pred), in(x_s), in(eps), in(scale),
                                      in(xs_coef), in(eps_coef), in(gscale), out(grad), out(sums),
                                      batch, per_sample, threads);
      },
      release);
  m.def(
      "axpby_cpu",
      [](int dtype, Ptr x, Ptr y, Ptr a, Ptr c, Ptr result, int64_t batch, int64_t per_sample,
         int threads) {
        phased_dmd::axpby_cpu(dtype_of(dtype), in(x), in(y), in(a), in(c), out(result), batch,
                              per_sample, threads);
      },
      release);
  m.def(
      "dmd_direction_cpu",
      [](int dtype, Ptr cond, Ptr uncond, double guidance, Ptr fake, Ptr weight,
         double out_scale, Ptr g, Ptr sq_sums, int64_t batch, int64_t per_sample, int threads) {
        phased_dmd::dmd_direction_cpu(dtype_of(dtype), in(cond), in(uncond), guidance, in(fake),
                                      in(weight), out_scale, out(g), out(sq_sums), batch,
                                      per_sample, threads);
      },
      release);
  m.def(
      "dmd_normalizer_sums_cpu",
      [](int dtype, Ptr x_s, Ptr x_t, Ptr cond, Ptr uncond, double guidance, Ptr jump_x,
         Ptr jump_v, Ptr sums, int64_t batch, int64_t per_sample, int threads) {
        phased_dmd::dmd_normalizer_sums_cpu(dtype_of(dtype), in(x_s), in(x_t), in(cond),
                                            in(uncond), guidance, in(jump_x), in(jump_v),
                                            out(sums), batch, per_sample, threads);
      },
      release);

#ifdef PHASED_DMD_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def(
      "residual_loss_cuda",
      [](int dtype, Ptr pred, Ptr x_s, Ptr eps, Ptr scale, Ptr xs_coef, Ptr eps_coef, Ptr gscale,
         Ptr grad, Ptr sums, Ptr workspace, int64_t batch, int64_t per_sample, int device,
         Ptr stream) {
        phased_dmd::residual_loss_cuda(dtype_of(dtype), in(pred), in(x_s), in(eps), in(scale),
                                       in(xs_coef), in(eps_coef), in(gscale), out(grad),
                                       out(sums), out(workspace), batch, per_sample, device,
                                       stream);
      },
      release);
  m.def(
      "axpby_cuda",
      [](int dtype, Ptr x, Ptr y, Ptr a, Ptr c, Ptr result, int64_t batch, int64_t per_sample,
         int device, Ptr stream) {
        phased_dmd::axpby_cuda(dtype_of(dtype), in(x), in(y), in(a), in(c), out(result), batch,
                               per_sample, device, stream);
      },
      release);
  m.def(
      "dmd_direction_cuda",
      [](int dtype, Ptr cond, Ptr uncond, double guidance, Ptr fake, Ptr weight,
         double out_scale, Ptr g, Ptr sq_sums, Ptr workspace, int64_t batch, int64_t per_sample,
         int device, Ptr stream) {
        phased_dmd::dmd_direction_cuda(dtype_of(dtype), in(cond), in(uncond), guidance, in(fake),
                                       in(weight), out_scale, out(g), out(sq_sums),
                                       out(workspace), batch, per_sample, device, stream);
      },
      release);
  m.def(
      "dmd_normalizer_sums_cuda",
      [](int dtype, Ptr x_s, Ptr x_t, Ptr cond, Ptr uncond, double guidance, Ptr jump_x,
         Ptr jump_v, Ptr sums, Ptr workspace, int64_t batch, int64_t per_sample, int device,
         Ptr stream) {
        phased_dmd::dmd_normalizer_sums_cuda(dtype_of(dtype), in(x_s), in(x_t), in(cond),
                                             in(uncond), guidance, in(jump_x), in(jump_v),
                                             out(sums), out(workspace), batch, per_sample,
                                             device, stream);
      },
      release);
#else
  m.attr("built_with_cuda") = false;
#endif
}
