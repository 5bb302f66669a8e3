#include "../../common/cuda.cuh"
#include "../dmd.h"

namespace phased_dmd {
namespace cuda {
namespace {

template <bool kGuided, int kVec, typename T>
__device__ __forceinline__ void load_teacher(const T* cond, const T* uncond, Acc<T> guidance,
                                             int64_t i, Acc<T> (&out)[kVec]) {
  load_pack<kVec>(cond, i, out);
  if constexpr (kGuided) {
    Acc<T> u[kVec];
    load_pack<kVec>(uncond, i, u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = guided_velocity<Acc<T>>(out[j], u[j], guidance);
  }
}

template <typename T, int kVec, bool kGuided>
__global__ void direction_kernel(const T* cond, const T* uncond, Acc<T> guidance, const T* fake,
                                 const Acc<T>* weight, Acc<T> out_scale, T* g, double* partials,
                                 int64_t per_sample) {
  using A = Acc<T>;
  const int64_t b = blockIdx.y;
  const A w = weight[b];
  const int64_t base = b * per_sample, vectors = per_sample / kVec;
  double sum = 0;
  for (int64_t v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A teacher[kVec], f[kVec], out[kVec];
    load_teacher<kGuided, kVec>(cond, uncond, guidance, base + v * kVec, teacher);
    load_pack<kVec>(fake, base + v * kVec, f);
    A pack_sum = 0;  // at most 8 terms in the accumulation type, then into the double sum
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const A value = w * (teacher[j] - f[j]);
      pack_sum += value * value;
      out[j] = out_scale * value;
    }
    store_pack<kVec>(g, base + v * kVec, out);
    sum += static_cast<double>(pack_sum);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
}

template <typename T, int kVec, bool kGuided>
__global__ void normalizer_kernel(const T* x_s, const T* x_t, const T* cond, const T* uncond,
                                  Acc<T> guidance, const Acc<T>* jump_x, const Acc<T>* jump_v,
                                  double* partials, int64_t per_sample) {
  using A = Acc<T>;
  const int64_t b = blockIdx.y;
  const A jx = jump_x[b], jv = jump_v[b];
  const int64_t base = b * per_sample, vectors = per_sample / kVec;
  double sum = 0;
  for (int64_t v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A teacher[kVec], xs[kVec], xt[kVec];
    load_teacher<kGuided, kVec>(cond, uncond, guidance, base + v * kVec, teacher);
    load_pack<kVec>(x_s, base + v * kVec, xs);
    load_pack<kVec>(x_t, base + v * kVec, xt);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      sum += static_cast<double>(teacher_jump_distance<A>(xs[j], xt[j], teacher[j], jx, jv));
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
}

template <typename Fn>
void dispatch_guided(const void* uncond, Fn&& fn) {
  if (uncond != nullptr) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

}  // namespace
}  // namespace cuda

void dmd_direction_cuda(DType dtype, const void* cond, const void* uncond, double guidance,
                        const void* fake, const void* weight, double out_scale, void* g,
                        void* sq_sums,
                        void* workspace, int64_t batch, int64_t per_sample, int device,
                        uintptr_t stream) {
  cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cuda::Acc<T>;
    const bool vectorize = cuda::can_vectorize<T>(per_sample, {cond, uncond, fake, g});
    cuda::dispatch_vec<T>(vectorize, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      cuda::dispatch_guided(uncond, [&](auto guided) {
        constexpr bool kGuided = decltype(guided)::value;
        const cuda::Launch launch = cuda::make_launch(batch, per_sample / kVec, device, stream);
        cuda::direction_kernel<T, kVec, kGuided><<<launch.grid, cuda::kThreads, 0, launch.stream>>>(
            static_cast<const T*>(cond), static_cast<const T*>(uncond), static_cast<A>(guidance),
            static_cast<const T*>(fake), static_cast<const A*>(weight),
            static_cast<A>(out_scale), static_cast<T*>(g),
            static_cast<double*>(workspace), per_sample);
        cuda::finalize_sums_kernel<A><<<static_cast<unsigned>(batch), 32, 0, launch.stream>>>(
            static_cast<const double*>(workspace), launch.parts, static_cast<A*>(sq_sums));
      });
    });
  });
  cuda::check(cudaGetLastError(), "dmd_direction launch");
}

void dmd_normalizer_sums_cuda(DType dtype, const void* x_s, const void* x_t, const void* cond,
                              const void* uncond, double guidance, const void* jump_x,
                              const void* jump_v, void* sums, void* workspace, int64_t batch,
                              int64_t per_sample, int device, uintptr_t stream) {
  cuda::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cuda::Acc<T>;
    const bool vectorize = cuda::can_vectorize<T>(per_sample, {x_s, x_t, cond, uncond});
    cuda::dispatch_vec<T>(vectorize, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      cuda::dispatch_guided(uncond, [&](auto guided) {
        constexpr bool kGuided = decltype(guided)::value;
        const cuda::Launch launch = cuda::make_launch(batch, per_sample / kVec, device, stream);
        cuda::normalizer_kernel<T, kVec, kGuided><<<launch.grid, cuda::kThreads, 0, launch.stream>>>(
            static_cast<const T*>(x_s), static_cast<const T*>(x_t), static_cast<const T*>(cond),
            static_cast<const T*>(uncond), static_cast<A>(guidance),
            static_cast<const A*>(jump_x), static_cast<const A*>(jump_v),
            static_cast<double*>(workspace), per_sample);
        cuda::finalize_sums_kernel<A><<<static_cast<unsigned>(batch), 32, 0, launch.stream>>>(
            static_cast<const double*>(workspace), launch.parts, static_cast<A*>(sums));
      });
    });
  });
  cuda::check(cudaGetLastError(), "dmd_normalizer_sums launch");
}

}  // namespace phased_dmd
