#include "../subinterval_loss.h"

#include "../../common/cpu.h"

namespace phased_dmd {
namespace cpu {

template <typename T>
PHASED_DMD_ALWAYS_INLINE Acc<T> residual_at(const T* pred, const T* x_s, const T* eps,
                                            Acc<T> scale, Acc<T> xs_coef, Acc<T> eps_coef,
                                            int64_t i) {
  return subinterval_residual<Acc<T>>(Io<T>::load(pred[i]), Io<T>::load(x_s[i]),
                                      Io<T>::load(eps[i]), scale, xs_coef, eps_coef);
}

// Writes grad[i] = gscale r_i and returns sum r_i^2 (from the unrounded r): one pass.
template <typename T>
PHASED_DMD_ALWAYS_INLINE double residual_loss_chunk_impl(const T* pred, const T* x_s,
                                                         const T* eps, Acc<T> scale,
                                                         Acc<T> xs_coef, Acc<T> eps_coef,
                                                         Acc<T> gscale, T* grad, int64_t n) {
  return blocked_sum<Acc<T>>(n, [&](int64_t i) {
    const Acc<T> r = residual_at(pred, x_s, eps, scale, xs_coef, eps_coef, i);
    grad[i] = Io<T>::store(gscale * r);
    return r * r;
  });
}

template <typename T>
PHASED_DMD_ALWAYS_INLINE void axpby_chunk_impl(const T* x, const T* y, Acc<T> a, Acc<T> c,
                                               T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = Io<T>::store(a * Io<T>::load(x[i]) + c * Io<T>::load(y[i]));
  }
}

// One ISA-dispatched function per storage type (target_clones needs concrete functions).
#define PHASED_DMD_SUBINTERVAL_CHUNKS(T)                                                       \
  PHASED_DMD_CPU_CLONES double residual_loss_chunk(const T* pred, const T* x_s, const T* eps,  \
                                                   Acc<T> scale, Acc<T> xs_coef,               \
                                                   Acc<T> eps_coef, Acc<T> gscale, T* grad,    \
                                                   int64_t n) {                                \
    return residual_loss_chunk_impl(pred, x_s, eps, scale, xs_coef, eps_coef, gscale, grad, n); \
  }                                                                                            \
  PHASED_DMD_CPU_CLONES void axpby_chunk(const T* x, const T* y, Acc<T> a, Acc<T> c, T* out, \
                                         int64_t n) {                                         \
    axpby_chunk_impl(x, y, a, c, out, n);                                                     \
  }

PHASED_DMD_SUBINTERVAL_CHUNKS(float)
PHASED_DMD_SUBINTERVAL_CHUNKS(double)
PHASED_DMD_SUBINTERVAL_CHUNKS(bfloat16)
PHASED_DMD_SUBINTERVAL_CHUNKS(float16)
#undef PHASED_DMD_SUBINTERVAL_CHUNKS

}  // namespace cpu

void residual_loss_cpu(DType dtype, const void* pred, const void* x_s, const void* eps,
                       const void* scale, const void* xs_coef, const void* eps_coef,
                       const void* gscale, void* grad, void* sums, int64_t batch,
                       int64_t per_sample, int num_threads) {
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cpu::Acc<T>;
    const auto *p = static_cast<const T*>(pred), *x = static_cast<const T*>(x_s),
               *e = static_cast<const T*>(eps);
    const auto *sc = static_cast<const A*>(scale), *xc = static_cast<const A*>(xs_coef),
               *ec = static_cast<const A*>(eps_coef), *g = static_cast<const A*>(gscale);
    auto* out = static_cast<T*>(grad);
    cpu::per_sample_sums<A>(batch, per_sample, num_threads, static_cast<A*>(sums),
                            [&](int64_t b, int64_t begin, int64_t end) {
                              return cpu::residual_loss_chunk(p + begin, x + begin, e + begin,
                                                              sc[b], xc[b], ec[b], g[b],
                                                              out + begin, end - begin);
                            });
  });
}

void axpby_cpu(DType dtype, const void* x, const void* y, const void* a, const void* c, void* out,
               int64_t batch, int64_t per_sample, int num_threads) {
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cpu::Acc<T>;
    const auto *xp = static_cast<const T*>(x), *yp = static_cast<const T*>(y);
    const auto *ap = static_cast<const A*>(a), *cp = static_cast<const A*>(c);
    auto* o = static_cast<T*>(out);
    cpu::per_sample_chunks(batch, per_sample, num_threads,
                           [&](int64_t b, int64_t begin, int64_t end) {
                             cpu::axpby_chunk(xp + begin, yp + begin, ap[b], cp[b], o + begin,
                                              end - begin);
                           });
  });
}

}  // namespace phased_dmd
