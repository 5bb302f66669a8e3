// Clamped subinterval score-matching loss (paper Eq. 13; x-prediction form Eq. 35) and the
// conditional noising that feeds it.
//
// Reference semantics: phased_dmd_mp/losses.py (pure torch, the test oracle). Python folds the
// schedule into per-sample coefficients, so these kernels know nothing of alpha or sigma:
//
//   residual_loss:  r[b,d] = scale[b] pred[b,d] - xs_coef[b] x_s[b,d] - eps_coef[b] eps[b,d]
//                   sums[b] = sum_d r[b,d]^2           (from the unrounded r)
//                   grad[b,d] = gscale[b] r[b,d]       (x_t, target, r never stored)
//   axpby:          out[b,d] = a[b] x[b,d] + c[b] y[b,d]   (x_t = alpha_{t|s} x_s + sigma_{t|s} eps)
//
// with scale = sigma_{t|s}, xs_coef = sigma_{t|s} a, eps_coef = b as in losses.py. The loss and
// its gradient come out of one pass over pred, x_s and eps: the caller picks per-sample loss
// coefficients c[b] (weight / per_sample, and 1 / batch for a mean), takes loss[b] = c[b] sums[b]
// and passes gscale = 2 c[b] scale[b], so grad is d loss / d pred for an upstream gradient of 1
// (as Liger-Kernel's fused cross-entropy: backward only rescales it when that is not 1).
//
// Layout: data (batch, per_sample) contiguous, one dtype (float32, float64, bfloat16, float16);
// per-sample coefficients and sums in the accumulation type (float64 for float64 data, float32
// otherwise). CUDA entry points also take the device, the stream and a workspace of
// batch * kMaxCudaParts doubles.
#pragma once

#include <cstdint>

#include "../common/element.h"

namespace phased_dmd {

void residual_loss_cpu(DType dtype, const void* pred, const void* x_s, const void* eps,
                       const void* scale, const void* xs_coef, const void* eps_coef,
                       const void* gscale, void* grad, void* sums, int64_t batch,
                       int64_t per_sample, int num_threads);

void axpby_cpu(DType dtype, const void* x, const void* y, const void* a, const void* c, void* out,
               int64_t batch, int64_t per_sample, int num_threads);

#ifdef PHASED_DMD_WITH_CUDA
void residual_loss_cuda(DType dtype, const void* pred, const void* x_s, const void* eps,
                        const void* scale, const void* xs_coef, const void* eps_coef,
                        const void* gscale, void* grad, void* sums, void* workspace,
                        int64_t batch, int64_t per_sample, int device, uintptr_t stream);

void axpby_cuda(DType dtype, const void* x, const void* y, const void* a, const void* c, void* out,
                int64_t batch, int64_t per_sample, int device, uintptr_t stream);
#endif

}  // namespace phased_dmd
