#include "../subinterval_loss.h"

namespace phased_dmd {
namespace {

template <typename T>
inline double residual(const T* pred, const T* x_s, const T* eps, double scale, double xs_coef,
                       double eps_coef, int64_t i) {
  return scale * static_cast<double>(pred[i]) - xs_coef * static_cast<double>(x_s[i]) -
         eps_coef * static_cast<double>(eps[i]);
}

}  // namespace

template <typename T>
void subinterval_loss_forward_cpu(const T* pred, const T* x_s, const T* eps, const double* scale,
                                  const double* xs_coef, const double* eps_coef,
                                  const double* weight, T* loss, int64_t batch,
                                  int64_t per_sample) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t offset = b * per_sample;
    double sum = 0.0;
    for (int64_t d = 0; d < per_sample; ++d) {
      const double r = residual(pred, x_s, eps, scale[b], xs_coef[b], eps_coef[b], offset + d);
      sum += r * r;
    }
    loss[b] = static_cast<T>(weight[b] * sum);
  }
}

template <typename T>
void subinterval_loss_backward_cpu(const T* grad_loss, const T* pred, const T* x_s, const T* eps,
                                   const double* scale, const double* xs_coef,
                                   const double* eps_coef, const double* weight, T* grad_pred,
                                   int64_t batch, int64_t per_sample) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t offset = b * per_sample;
    const double g = 2.0 * static_cast<double>(grad_loss[b]) * weight[b] * scale[b];
    for (int64_t d = 0; d < per_sample; ++d) {
      const double r = residual(pred, x_s, eps, scale[b], xs_coef[b], eps_coef[b], offset + d);
      grad_pred[offset + d] = static_cast<T>(g * r);
    }
  }
}

#define PHASED_DMD_INSTANTIATE(T)                                                               \
  template void subinterval_loss_forward_cpu<T>(const T*, const T*, const T*, const double*,    \
                                                const double*, const double*, const double*, T*, \
                                                int64_t, int64_t);                              \
  template void subinterval_loss_backward_cpu<T>(const T*, const T*, const T*, const T*,        \
                                                 const double*, const double*, const double*,   \
                                                 const double*, T*, int64_t, int64_t);

PHASED_DMD_INSTANTIATE(float)
PHASED_DMD_INSTANTIATE(double)

}  // namespace phased_dmd
