// CUDA kernel scaffolding: element types, vectorised packs, deterministic per-sample reductions.
//
// Data are (batch, per_sample) row-major. Kernels run on a grid (parts, batch): blockIdx.y is
// the sample, the `parts` blocks of a sample stride over it (grid-stride) in packs of kVec
// elements (16-byte loads when per_sample and every pointer allow, else kVec = 1). Element math
// runs in the accumulation type (float32, float64 for float64 data); reductions accumulate each
// thread's terms in double (a thread may see thousands of them, and the kernels are bound by
// memory, not by double adds), write one partial per block to a double workspace, and a
// one-warp kernel per sample sums the partials in a fixed order: results are deterministic for
// a given launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "element.h"

namespace phased_dmd {
namespace cuda {

constexpr int kThreads = 256;

template <typename T>
struct Io {
  using acc = float;
  static __device__ __forceinline__ float load(T v) { return static_cast<float>(v); }
  static __device__ __forceinline__ T store(float v) { return static_cast<T>(v); }
};

template <>
struct Io<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Io<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Io<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <typename T>
using Acc = typename Io<T>::acc;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ void load_pack(const T* data, int64_t i, Acc<T> (&out)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(data + i);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = Io<T>::load(pack.v[j]);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* data, int64_t i, const Acc<T> (&in)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pack.v[j] = Io<T>::store(in[j]);
  *reinterpret_cast<Pack<T, kVec>*>(data + i) = pack;
}

// Sum over the block; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double value) {
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename A>
__global__ void finalize_sums_kernel(const double* partials, int parts, A* sums) {
  const int64_t b = blockIdx.x;
  double value = 0;
  for (int p = threadIdx.x; p < parts; p += 32) value += partials[b * parts + p];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x == 0) sums[b] = static_cast<A>(value);
}

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("phased_dmd_mp CUDA ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

struct Launch {
  dim3 grid;
  int parts;
  cudaStream_t stream;
};

// Grid for `vectors` packs per sample: enough blocks to fill the device, none idle.
inline Launch make_launch(int64_t batch, int64_t vectors, int device, uintptr_t stream) {
  if (batch < 1 || batch > 65535) throw std::invalid_argument("batch must be in 1..65535");
  check(cudaSetDevice(device), "cudaSetDevice");
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  const int64_t needed = std::max<int64_t>(1, (vectors + kThreads - 1) / kThreads);
  const int64_t fill = std::max<int64_t>(1, 4 * static_cast<int64_t>(sms) / batch);
  const int parts = static_cast<int>(std::min<int64_t>({needed, fill, kMaxCudaParts}));
  return Launch{dim3(parts, static_cast<unsigned>(batch)), parts,
                reinterpret_cast<cudaStream_t>(stream)};
}

// 16-byte packs when the sample length and every pointer allow them, else single elements.
template <typename T>
bool can_vectorize(int64_t per_sample, std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / sizeof(T);
  if (per_sample % kVec != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    case DType::kFloat16: fn(__half{}); break;
  }
}

// Calls fn(std::integral_constant<int, kVec>) with kVec = 16 / sizeof(T) or 1.
template <typename T, typename Fn>
void dispatch_vec(bool vectorize, Fn&& fn) {
  if (vectorize) {
    fn(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

}  // namespace cuda
}  // namespace phased_dmd
