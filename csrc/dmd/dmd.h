// DMD generator gradient (paper Eq. 11), with classifier-free guidance and DMD2's per-sample
// normalisation, for the stop-gradient generator loss.
//
// Reference semantics: phased_dmd_mp/losses.py (pure torch, the test oracle). Python folds the
// schedule into per-sample coefficients:
//
//   T[b,d] = uncond + guidance (cond - uncond)   (guided; with no uncond, T = cond)
//   dmd_direction:        g[b,d] = weight[b] (T[b,d] - fake[b,d]),  sq_sums[b] = sum_d g^2
//                         out[b,d] = out_scale g[b,d]
//                         (sq_sums from the unrounded g, so the loss value is exact; with
//                         out_scale = 1 / numel, out is the surrogate loss's gradient w.r.t.
//                         x_s, written once and handed to autograd as it is)
//   dmd_normalizer_sums:  sums[b] = sum_d |x_s - (jump_x[b] x_t + jump_v[b] T)|
//
// Plain DMD: weight = w_{t|s}. DMD2-normalised: weight = k_{t|s} / max(sums / per_sample, min),
// with the teacher's jump back to s being x^_s = jump_x x_t + jump_v T (losses.py derives it).
// The op returns (a multiple of) g, not the target x - g: in bf16 the target rounds at the scale of x and
// x - target would lose g wherever |g| << |x|.
//
// Layout and types as in subinterval_loss.h; `uncond` may be null.
#pragma once

#include <cstdint>

#include "../common/element.h"

namespace phased_dmd {

void dmd_direction_cpu(DType dtype, const void* cond, const void* uncond, double guidance,
                       const void* fake, const void* weight, double out_scale, void* out,
                       void* sq_sums,
                       int64_t batch, int64_t per_sample, int num_threads);

void dmd_normalizer_sums_cpu(DType dtype, const void* x_s, const void* x_t, const void* cond,
                             const void* uncond, double guidance, const void* jump_x,
                             const void* jump_v, void* sums, int64_t batch, int64_t per_sample,
                             int num_threads);

#ifdef PHASED_DMD_WITH_CUDA
void dmd_direction_cuda(DType dtype, const void* cond, const void* uncond, double guidance,
                        const void* fake, const void* weight, double out_scale, void* out,
                        void* sq_sums,
                        void* workspace, int64_t batch, int64_t per_sample, int device,
                        uintptr_t stream);

void dmd_normalizer_sums_cuda(DType dtype, const void* x_s, const void* x_t, const void* cond,
                              const void* uncond, double guidance, const void* jump_x,
                              const void* jump_v, void* sums, void* workspace, int64_t batch,
                              int64_t per_sample, int device, uintptr_t stream);
#endif

}  // namespace phased_dmd
