// Clamped subinterval score-matching loss (paper Eq. 13; x-prediction form Eq. 35) and the
// conditional noising that feeds it.
//
// Reference semantics: phased_dmd_mp/losses.py (pure torch, the test oracle). Python folds the
// schedule into per-sample coefficients, so these kernels know nothing of alpha or sigma:
//
//   residual_sq_sums:  r[b,d] = scale[b] pred[b,d] - xs_coef[b] x_s[b,d] - eps_coef[b] eps[b,d]
//                      sums[b] = sum_d r[b,d]^2                  (x_t, target, r never stored)
//   residual_grad:     grad[b,d] = gscale[b] * r[b,d]            (gscale = 2 dL/dsums[b] scale[b])
//   axpby:             out[b,d] = a[b] x[b,d] + c[b] y[b,d]      (x_t = alpha_{t|s} x_s + sigma_{t|s} eps)
//
// with scale = sigma_{t|s}, xs_coef = sigma_{t|s} a, eps_coef = b as in losses.py, and the loss
// weight * sums / per_sample applied by the caller.
//
// Layout: data (batch, per_sample) contiguous, one dtype (float32, float64, bfloat16, float16);
// per-sample coefficients and sums in the accumulation type (float64 for float64 data, float32
// otherwise). CUDA entry points also take the device, the stream and a workspace of
// batch * kMaxCudaParts doubles.
#pragma once

#include <cstdint>

#include "../common/element.h"

namespace phased_dmd {

void residual_sq_sums_cpu(DType dtype, const void* pred, const void* x_s, const void* eps,
                          const void* scale, const void* xs_coef, const void* eps_coef,
                          void* sums, int64_t batch, int64_t per_sample, int num_threads);

void residual_grad_cpu(DType dtype, const void* gscale, const void* pred, const void* x_s,
                       const void* eps, const void* scale, const void* xs_coef,
                       const void* eps_coef, void* grad, int64_t batch, int64_t per_sample,
                       int num_threads);

void axpby_cpu(DType dtype, const void* x, const void* y, const void* a, const void* c, void* out,
               int64_t batch, int64_t per_sample, int num_threads);

#ifdef PHASED_DMD_WITH_CUDA
void residual_sq_sums_cuda(DType dtype, const void* pred, const void* x_s, const void* eps,
                           const void* scale, const void* xs_coef, const void* eps_coef,
                           void* sums, void* workspace, int64_t batch, int64_t per_sample,
                           int device, uintptr_t stream);

void residual_grad_cuda(DType dtype, const void* gscale, const void* pred, const void* x_s,
                        const void* eps, const void* scale, const void* xs_coef,
                        const void* eps_coef, void* grad, int64_t batch, int64_t per_sample,
                        int device, uintptr_t stream);

void axpby_cuda(DType dtype, const void* x, const void* y, const void* a, const void* c, void* out,
                int64_t batch, int64_t per_sample, int device, uintptr_t stream);
#endif

}  // namespace phased_dmd
