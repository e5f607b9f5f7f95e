// parallel_for for the plain C++ CPU kernels (no torch, no OpenMP runtime,
// so a program can link them alone). [begin, end) is split into
// min(threads, (end - begin) / grain) contiguous chunks of equal size (at
// least 1), where `threads` is the calling thread's count
// (rlhf_set_num_threads in rlhf_engine/threads.h); the chunks run on the
// calling thread and on the workers of one persistent pool (parallel.cpp).
// Which thread runs a chunk never changes the chunks themselves, so results
// depend only on the sizes and the thread count.
#ifndef RLHF_ENGINE_CPU_PARALLEL_H_
#define RLHF_ENGINE_CPU_PARALLEL_H_

#include <cstdint>

namespace rlhf {

// The calling thread's thread count (>= 1).
int num_threads();

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);

// fn(ctx, chunk_begin, chunk_end) on the chunks of [begin, end); returns when
// all have run. An exception thrown by a chunk is rethrown here (the first
// one; the other chunks still run).
void parallel_run(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx);

// fn(chunk_begin, chunk_end) on disjoint chunks covering [begin, end).
template <typename Fn>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  parallel_run(
      begin, end, grain, [](const void* ctx, int64_t lo, int64_t hi) { (*static_cast<const Fn*>(ctx))(lo, hi); },
      &fn);
}

}  // namespace rlhf

#endif  // RLHF_ENGINE_CPU_PARALLEL_H_
