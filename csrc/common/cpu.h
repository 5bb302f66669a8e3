// CPU kernel scaffolding: element types, threading and deterministic per-sample reductions.
//
// Data are (batch, per_sample) row-major. Each sample is cut into fixed chunks (work items);
// items run on `num_threads` std::threads and reductions sum per-item partials in a fixed
// order, so results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "element.h"

// Hot loops are compiled for AVX-512, AVX2+FMA+F16C and baseline x86-64, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define PHASED_DMD_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PHASED_DMD_CPU_CLONES
#endif
#define PHASED_DMD_ALWAYS_INLINE inline __attribute__((always_inline))

namespace phased_dmd {
namespace cpu {

struct bfloat16 {
  uint16_t bits;
};
using float16 = _Float16;

// load: storage -> accumulation type; store: accumulation type -> storage (round to nearest even).
template <typename T>
struct Io {
  using acc = float;
  static PHASED_DMD_ALWAYS_INLINE float load(T v) { return static_cast<float>(v); }
  static PHASED_DMD_ALWAYS_INLINE T store(float v) { return static_cast<T>(v); }
};

template <>
struct Io<double> {
  using acc = double;
  static PHASED_DMD_ALWAYS_INLINE double load(double v) { return v; }
  static PHASED_DMD_ALWAYS_INLINE double store(double v) { return v; }
};

template <>
struct Io<bfloat16> {
  using acc = float;
  static PHASED_DMD_ALWAYS_INLINE float load(bfloat16 v) {
    const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static PHASED_DMD_ALWAYS_INLINE bfloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return bfloat16{static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded)};
  }
};

template <typename T>
using Acc = typename Io<T>::acc;

// Calls fn(dtype_tag) with a value of the storage type matching `dtype`.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kBFloat16: fn(bfloat16{}); break;
    case DType::kFloat16: fn(float16{}); break;
  }
}

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per work item
constexpr int kLanes = 16;                      // independent accumulators (vectorised)

struct Chunks {
  int64_t batch, per_sample, per_item, items_per_sample;

  Chunks(int64_t batch_, int64_t per_sample_)
      : batch(batch_),
        per_sample(per_sample_),
        per_item(kChunk),
        items_per_sample(std::max<int64_t>(1, (per_sample_ + kChunk - 1) / kChunk)) {}

  int64_t items() const { return batch * items_per_sample; }
  int64_t sample(int64_t item) const { return item / items_per_sample; }
  int64_t begin(int64_t item) const {
    return sample(item) * per_sample + (item % items_per_sample) * per_item;
  }
  int64_t end(int64_t item) const {
    return std::min(begin(item) + per_item, (sample(item) + 1) * per_sample);
  }
};

// Runs fn(item) for item in [0, items) on up to num_threads threads (the caller's included).
template <typename Fn>
void parallel_for(int64_t items, int num_threads, const Fn& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, items));
  auto run = [&](int64_t worker) {
    for (int64_t item = worker; item < items; item += workers) fn(item);
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t worker = 1; worker < workers; ++worker) threads.emplace_back(run, worker);
  run(0);
  for (auto& thread : threads) thread.join();
}

// Threads worth starting: about one per kChunk elements, at most num_threads.
inline int useful_threads(int64_t batch, int64_t per_sample, int num_threads) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(num_threads, batch * per_sample / kChunk)));
}

// sums[b] = sum over sample b of chunk_sum(b, begin, end) (a double), summed over chunks in a
// fixed order.
template <typename AccT, typename ChunkSum>
void per_sample_sums(int64_t batch, int64_t per_sample, int num_threads, AccT* sums,
                     const ChunkSum& chunk_sum) {
  const Chunks chunks(batch, per_sample);
  std::vector<double> partials(chunks.items());
  parallel_for(chunks.items(), useful_threads(batch, per_sample, num_threads), [&](int64_t item) {
    partials[item] = chunk_sum(chunks.sample(item), chunks.begin(item), chunks.end(item));
  });
  for (int64_t b = 0; b < batch; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks.items_per_sample; ++c) {
      total += partials[b * chunks.items_per_sample + c];
    }
    sums[b] = static_cast<AccT>(total);
  }
}

// Runs chunk_fn(b, begin, end) over every chunk of every sample.
template <typename ChunkFn>
void per_sample_chunks(int64_t batch, int64_t per_sample, int num_threads,
                       const ChunkFn& chunk_fn) {
  const Chunks chunks(batch, per_sample);
  parallel_for(chunks.items(), useful_threads(batch, per_sample, num_threads), [&](int64_t item) {
    chunk_fn(chunks.sample(item), chunks.begin(item), chunks.end(item));
  });
}

// Sum of kLanes accumulators in a fixed pairwise order.
template <typename A>
PHASED_DMD_ALWAYS_INLINE A sum_lanes(const A* lanes) {
  A pairs[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) pairs[j] = lanes[j] + lanes[j + kLanes / 2];
  A total = 0;
  for (int j = 0; j < kLanes / 2; ++j) total += pairs[j];
  return total;
}

// sum_{i < n} term(i): kLanes independent accumulators (so the loop vectorises) over blocks of
// kBlock elements, each block's sum added in double. Every accumulation-type rounding chain is
// at most kBlock / kLanes + 4 long, so a long sample sums as accurately as torch's cascade sum.
template <typename A, typename Term>
PHASED_DMD_ALWAYS_INLINE double blocked_sum(int64_t n, const Term& term) {
  constexpr int64_t kBlock = kLanes * 16;
  double total = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    A lanes[kLanes] = {};
    for (int64_t k = 0; k < kBlock; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += term(i + k + j);
    }
    total += static_cast<double>(sum_lanes(lanes));
  }
  for (; i < n; ++i) total += static_cast<double>(term(i));
  return total;
}

}  // namespace cpu
}  // namespace phased_dmd
