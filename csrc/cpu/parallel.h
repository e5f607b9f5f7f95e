// parallel_for for the plain C++ CPU kernels (no torch, no OpenMP runtime,
// so a program can link them alone): splits [begin, end) into contiguous
// chunks of at least `grain` items over std::thread workers, the calling
// thread taking the first chunk. RLHF_ENGINE_NUM_THREADS caps the workers
// (default: the hardware's concurrency).
#ifndef RLHF_ENGINE_CPU_PARALLEL_H_
#define RLHF_ENGINE_CPU_PARALLEL_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace rlhf {

inline int64_t max_threads() {
  static const int64_t n = [] {
    const char* env = std::getenv("RLHF_ENGINE_NUM_THREADS");
    const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
    return env ? std::max<int64_t>(1, std::atoll(env)) : hw;
  }();
  return n;
}

// fn(chunk_begin, chunk_end) on disjoint chunks covering [begin, end).
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t chunks = std::min(max_threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
  if (chunks == 1) {
    fn(begin, end);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t lo = begin + c * step;
    const int64_t hi = std::min(end, lo + step);
    if (lo < hi) workers.emplace_back([&fn, lo, hi] { fn(lo, hi); });
  }
  fn(begin, std::min(end, begin + step));
  for (auto& w : workers) w.join();
}

}  // namespace rlhf

#endif  // RLHF_ENGINE_CPU_PARALLEL_H_
