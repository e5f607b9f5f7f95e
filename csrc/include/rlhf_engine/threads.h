// Plain C entry points that set and report the threads of the plain CPU
// kernels (the `_cpu` entry points of advantages.h, kl.h and losses.h; no
// torch headers, no OpenMP runtime).
//
// The kernels split their loops over one persistent pool of worker threads,
// created on first use and grown when a caller asks for more threads than it
// holds (never shrunk); the calling thread always takes part, so a loop split
// over n threads wakes at most n - 1 workers. Several callers may run kernels
// at once: each one's loop uses the thread count of its own calling thread.
//
//   rlhf_set_num_threads(n)   the threads (caller included) that kernel calls
//                             made from the calling thread may use from now
//                             on; n <= 0 restores the default,
//                             $RLHF_ENGINE_NUM_THREADS or else the hardware's
//                             concurrency. Per calling thread, as
//                             omp_set_num_threads is: rlhf_engine sets it from
//                             torch.get_num_threads() before each call.
//   rlhf_get_num_threads()    the calling thread's current count.
//
// Introspection, for tests and profiling (no effect on results: a loop's
// chunks are fixed by its size and the thread count, never by which thread
// runs them):
//   rlhf_last_parallel_width()    chunks (= threads it could use) of the last
//                                 parallel loop run from the calling thread;
//   rlhf_last_parallel_threads()  threads that ran at least one of them
//                                 (the caller included; <= the width);
//   rlhf_pool_workers()           worker threads the pool holds.
#ifndef RLHF_ENGINE_THREADS_H_
#define RLHF_ENGINE_THREADS_H_

#ifdef __cplusplus
extern "C" {
#endif

int rlhf_set_num_threads(int n);
int rlhf_get_num_threads(void);
int rlhf_last_parallel_width(void);
int rlhf_last_parallel_threads(void);
int rlhf_pool_workers(void);

#ifdef __cplusplus
}
#endif

#endif  // RLHF_ENGINE_THREADS_H_
