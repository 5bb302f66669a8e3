#include "../../common/cuda.cuh"
#include "../subinterval_loss.h"

namespace phased_dmd {
namespace cuda {
namespace {

// One pass: grad = gscale r, and per-block partial sums of r^2 (from the unrounded r).
template <typename T, int kVec>
__global__ void residual_loss_kernel(const T* pred, const T* x_s, const T* eps,
                                     const Acc<T>* scale, const Acc<T>* xs_coef,
                                     const Acc<T>* eps_coef, const Acc<T>* gscale, T* grad,
                                     double* partials, int64_t per_sample) {
  using A = Acc<T>;
  const int64_t b = blockIdx.y;
  const A sc = scale[b], xc = xs_coef[b], ec = eps_coef[b], g = gscale[b];
  const int64_t base = b * per_sample, vectors = per_sample / kVec;
  double sum = 0;
  for (int64_t v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A p[kVec], x[kVec], e[kVec], out[kVec];
    load_pack<kVec>(pred, base + v * kVec, p);
    load_pack<kVec>(x_s, base + v * kVec, x);
    load_pack<kVec>(eps, base + v * kVec, e);
    A pack_sum = 0;  // at most 8 terms in the accumulation type, then into the double sum
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const A r = subinterval_residual<A>(p[j], x[j], e[j], sc, xc, ec);
      out[j] = g * r;
      pack_sum += r * r;
    }
    store_pack<kVec>(grad, base + v * kVec, out);
    sum += static_cast<double>(pack_sum);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
}

template <typename T, int kVec>
__global__ void axpby_kernel(const T* x, const T* y, const Acc<T>* a, const Acc<T>* c, T* out,
                             int64_t per_sample) {
  using A = Acc<T>;
  const int64_t b = blockIdx.y;
  const A ab = a[b], cb = c[b];
  const int64_t base = b * per_sample, vectors = per_sample / kVec;
  for (int64_t v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A xv[kVec], yv[kVec], o[kVec];
    load_pack<kVec>(x, base + v * kVec, xv);
    load_pack<kVec>(y, base + v * kVec, yv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = ab * xv[j] + cb * yv[j];
    store_pack<kVec>(out, base + v * kVec, o);
  }
}

}  // namespace
}  // namespace cuda

void residual_loss_cuda(DType dtype, const void* pred, const void* x_s, const void* eps,
                        const void* scale, const void* xs_coef, const void* eps_coef,
                        const void* gscale, void* grad, void* sums, void* workspace,
                        int64_t batch, int64_t per_sample, int device, uintptr_t stream) {
  cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cuda::Acc<T>;
    const bool vectorize = cuda::can_vectorize<T>(per_sample, {pred, x_s, eps, grad});
    cuda::dispatch_vec<T>(vectorize, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const cuda::Launch launch = cuda::make_launch(batch, per_sample / kVec, device, stream);
      cuda::residual_loss_kernel<T, kVec><<<launch.grid, cuda::kThreads, 0, launch.stream>>>(
          static_cast<const T*>(pred), static_cast<const T*>(x_s), static_cast<const T*>(eps),
          static_cast<const A*>(scale), static_cast<const A*>(xs_coef),
          static_cast<const A*>(eps_coef), static_cast<const A*>(gscale), static_cast<T*>(grad),
          static_cast<double*>(workspace), per_sample);
      cuda::finalize_sums_kernel<A><<<static_cast<unsigned>(batch), 32, 0, launch.stream>>>(
          static_cast<const double*>(workspace), launch.parts, static_cast<A*>(sums));
    });
  });
  cuda::check(cudaGetLastError(), "residual_loss launch");
}

void axpby_cuda(DType dtype, const void* x, const void* y, const void* a, const void* c, void* out,
                int64_t batch, int64_t per_sample, int device, uintptr_t stream) {
  cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cuda::Acc<T>;
    const bool vectorize = cuda::can_vectorize<T>(per_sample, {x, y, out});
    cuda::dispatch_vec<T>(vectorize, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const cuda::Launch launch = cuda::make_launch(batch, per_sample / kVec, device, stream);
      cuda::axpby_kernel<T, kVec><<<launch.grid, cuda::kThreads, 0, launch.stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const A*>(a),
          static_cast<const A*>(c), static_cast<T*>(out), per_sample);
    });
  });
  cuda::check(cudaGetLastError(), "axpby launch");
}

}  // namespace phased_dmd
