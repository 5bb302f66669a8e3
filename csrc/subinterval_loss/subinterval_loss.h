// Clamped subinterval score-matching loss (paper Eq. 13, x-prediction form Eq. 35).
//
// Reference semantics (the oracle is phased_dmd_mp.losses, pure torch):
//   for each sample b and element d of that sample (D elements per sample)
//     r[b,d]  = scale[b] * pred[b,d] - xs_coef[b] * x_s[b,d] - eps_coef[b] * eps[b,d]
//     loss[b] = weight[b] * sum_d r[b,d]^2
//   backward:
//     grad_pred[b,d] = grad_loss[b] * 2 * weight[b] * scale[b] * r[b,d]
//
// Python computes the per-sample coefficients once (float64), so one kernel serves both
// parameterisations:
//   scale = sigma_{t|s},  xs_coef = sigma_{t|s} * a,  eps_coef = b,
//   weight = clamp(1 / sigma_{t|s}^2, max) / D
// with a = -1/alpha_s, b = c   (velocity, Eq. 12/13) or
//      a =  1/alpha_s, b = -alpha_t sigma_s^2 / alpha_s^2   (x-prediction, Eq. 35).
// Data may be float32 or float64; coefficients are float64; sums accumulate in float64.
#pragma once

#include <cstdint>

namespace phased_dmd {

template <typename T>
void subinterval_loss_forward_cpu(const T* pred, const T* x_s, const T* eps, const double* scale,
                                  const double* xs_coef, const double* eps_coef,
                                  const double* weight, T* loss, int64_t batch,
                                  int64_t per_sample);

template <typename T>
void subinterval_loss_backward_cpu(const T* grad_loss, const T* pred, const T* x_s, const T* eps,
                                   const double* scale, const double* xs_coef,
                                   const double* eps_coef, const double* weight, T* grad_pred,
                                   int64_t batch, int64_t per_sample);

}  // namespace phased_dmd
