// Per-element math shared by the CPU and CUDA kernels, so both compute the same thing.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PHASED_DMD_HD __host__ __device__ __forceinline__
#else
#define PHASED_DMD_HD inline
#endif

namespace phased_dmd {

// Codes shared with phased_dmd_mp/ops/kernels.py.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// CUDA reductions use at most this many blocks per sample; their workspace holds
// batch * kMaxCudaParts doubles.
constexpr int kMaxCudaParts = 1024;

// Residual of the clamped subinterval loss: scale * pred - xs_coef * x_s - eps_coef * eps.
template <typename A>
PHASED_DMD_HD A subinterval_residual(A pred, A x_s, A eps, A scale, A xs_coef, A eps_coef) {
  return scale * pred - xs_coef * x_s - eps_coef * eps;
}

// Teacher velocity with classifier-free guidance: uncond + scale * (cond - uncond).
template <typename A>
PHASED_DMD_HD A guided_velocity(A cond, A uncond, A scale) {
  return uncond + scale * (cond - uncond);
}

// |x_s - (A x_t + C T)|: distance of the generator output from the teacher's jump back to s.
template <typename A>
PHASED_DMD_HD A teacher_jump_distance(A x_s, A x_t, A teacher, A jump_x, A jump_v) {
  const A d = x_s - (jump_x * x_t + jump_v * teacher);
  return d < A(0) ? -d : d;
}

}  // namespace phased_dmd
