#include "../dmd.h"

#include "../../common/cpu.h"

namespace phased_dmd {
namespace cpu {

template <bool kGuided, typename T>
PHASED_DMD_ALWAYS_INLINE Acc<T> teacher_at(const T* cond, const T* uncond, Acc<T> guidance,
                                           int64_t i) {
  if constexpr (kGuided) {
    return guided_velocity<Acc<T>>(Io<T>::load(cond[i]), Io<T>::load(uncond[i]), guidance);
  } else {
    return Io<T>::load(cond[i]);
  }
}

template <bool kGuided, typename T>
PHASED_DMD_ALWAYS_INLINE double direction_chunk_impl(const T* cond, const T* uncond,
                                                     Acc<T> guidance, const T* fake,
                                                     Acc<T> weight, Acc<T> out_scale, T* g,
                                                     int64_t n) {
  return blocked_sum<Acc<T>>(n, [&](int64_t i) {
    const Acc<T> value =
        weight * (teacher_at<kGuided>(cond, uncond, guidance, i) - Io<T>::load(fake[i]));
    g[i] = Io<T>::store(out_scale * value);
    return value * value;
  });
}

template <bool kGuided, typename T>
PHASED_DMD_ALWAYS_INLINE double normalizer_chunk_impl(const T* x_s, const T* x_t, const T* cond,
                                                      const T* uncond, Acc<T> guidance,
                                                      Acc<T> jump_x, Acc<T> jump_v, int64_t n) {
  return blocked_sum<Acc<T>>(n, [&](int64_t i) {
    return teacher_jump_distance<Acc<T>>(Io<T>::load(x_s[i]), Io<T>::load(x_t[i]),
                                         teacher_at<kGuided>(cond, uncond, guidance, i), jump_x,
                                         jump_v);
  });
}

#define PHASED_DMD_DMD_CHUNKS(T, GUIDED)                                                        \
  PHASED_DMD_CPU_CLONES double direction_chunk(std::integral_constant<bool, GUIDED>,           \
                                               const T* cond, const T* uncond, Acc<T> guidance, \
                                               const T* fake, Acc<T> weight, Acc<T> out_scale,  \
                                               T* g, int64_t n) {                               \
    return direction_chunk_impl<GUIDED>(cond, uncond, guidance, fake, weight, out_scale, g, n); \
  }                                                                                             \
  PHASED_DMD_CPU_CLONES double normalizer_chunk(                                                \
      std::integral_constant<bool, GUIDED>, const T* x_s, const T* x_t, const T* cond,          \
      const T* uncond, Acc<T> guidance, Acc<T> jump_x, Acc<T> jump_v, int64_t n) {              \
    return normalizer_chunk_impl<GUIDED>(x_s, x_t, cond, uncond, guidance, jump_x, jump_v, n); \
  }
#define PHASED_DMD_DMD_CHUNKS_BOTH(T) \
  PHASED_DMD_DMD_CHUNKS(T, true)      \
  PHASED_DMD_DMD_CHUNKS(T, false)

PHASED_DMD_DMD_CHUNKS_BOTH(float)
PHASED_DMD_DMD_CHUNKS_BOTH(double)
PHASED_DMD_DMD_CHUNKS_BOTH(bfloat16)
PHASED_DMD_DMD_CHUNKS_BOTH(float16)
#undef PHASED_DMD_DMD_CHUNKS_BOTH
#undef PHASED_DMD_DMD_CHUNKS

// Calls fn(std::integral_constant<bool, guided>) so loops carry no per-element branch.
template <typename Fn>
void dispatch_guided(const void* uncond, Fn&& fn) {
  if (uncond != nullptr) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

}  // namespace cpu

void dmd_direction_cpu(DType dtype, const void* cond, const void* uncond, double guidance,
                       const void* fake, const void* weight, double out_scale, void* g,
                       void* sq_sums,
                       int64_t batch, int64_t per_sample, int num_threads) {
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cpu::Acc<T>;
    const auto *c = static_cast<const T*>(cond), *u = static_cast<const T*>(uncond),
               *f = static_cast<const T*>(fake);
    const auto* w = static_cast<const A*>(weight);
    auto* out = static_cast<T*>(g);
    cpu::dispatch_guided(uncond, [&](auto guided) {
      cpu::per_sample_sums<A>(
          batch, per_sample, num_threads, static_cast<A*>(sq_sums),
          [&](int64_t b, int64_t begin, int64_t end) {
            return cpu::direction_chunk(guided, c + begin, guided ? u + begin : nullptr,
                                        static_cast<A>(guidance), f + begin, w[b],
                                        static_cast<A>(out_scale), out + begin, end - begin);
          });
    });
  });
}

void dmd_normalizer_sums_cpu(DType dtype, const void* x_s, const void* x_t, const void* cond,
                             const void* uncond, double guidance, const void* jump_x,
                             const void* jump_v, void* sums, int64_t batch, int64_t per_sample,
                             int num_threads) {
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = cpu::Acc<T>;
    const auto *xs = static_cast<const T*>(x_s), *xt = static_cast<const T*>(x_t),
               *c = static_cast<const T*>(cond), *u = static_cast<const T*>(uncond);
    const auto *jx = static_cast<const A*>(jump_x), *jv = static_cast<const A*>(jump_v);
    cpu::dispatch_guided(uncond, [&](auto guided) {
      cpu::per_sample_sums<A>(
          batch, per_sample, num_threads, static_cast<A*>(sums),
          [&](int64_t b, int64_t begin, int64_t end) {
            return cpu::normalizer_chunk(guided, xs + begin, xt + begin, c + begin,
                                         guided ? u + begin : nullptr, static_cast<A>(guidance),
                                         jx[b], jv[b], end - begin);
          });
    });
  });
}

}  // namespace phased_dmd
