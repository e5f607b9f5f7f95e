// The thread pool behind rlhf::parallel_for (parallel.h) and the entry points
// of rlhf_engine/threads.h.
//
// One pool per process, created on first use and never destroyed (its
// workers wait on a condition variable until the process exits). A parallel
// loop is a Job: its chunks are claimed one at a time from an atomic counter,
// by the calling thread and by up to width - 1 workers, each of which was
// handed the job through the pool's queue. The caller claims chunks like any
// worker, so a loop finishes even when every worker is busy with another
// caller's loop (or, after a fork, when the child has none): workers only
// ever speed it up. Before returning, the caller takes its job's remaining
// queue entries back and waits for the workers still inside it to leave.
#include "parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "rlhf_engine/threads.h"

namespace rlhf {
namespace {

int default_threads() {
  static const int n = [] {
    const char* env = std::getenv("RLHF_ENGINE_NUM_THREADS");
    const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    return env ? std::max(1, std::atoi(env)) : hw;
  }();
  return n;
}

thread_local int tl_threads = 0;           // 0: default_threads()
thread_local int tl_last_width = 0;        // of the calling thread's last loop
thread_local int tl_last_participants = 0;

struct Job {
  RangeFn fn;
  const void* ctx;
  int64_t begin, end, step, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int> participants{0};
  int helpers = 0;  // workers inside run_chunks (guarded by Pool::mu_)
  std::mutex error_mu;
  std::exception_ptr error;
};

// Runs chunks of `job` until none is left to claim.
void run_chunks(Job& job) {
  bool counted = false;
  for (;;) {
    const int64_t k = job.next.fetch_add(1, std::memory_order_relaxed);
    if (k >= job.chunks) return;
    if (!counted) {
      job.participants.fetch_add(1, std::memory_order_relaxed);
      counted = true;
    }
    const int64_t lo = job.begin + k * job.step;
    const int64_t hi = std::min(job.end, lo + job.step);
    if (lo >= hi) continue;
    try {
      job.fn(job.ctx, lo, hi);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mu);
      if (!job.error) job.error = std::current_exception();
    }
  }
}

class Pool {
 public:
  // Runs `job` on the calling thread and up to `helpers` workers.
  void run(Job& job, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      grow(helpers);
      helpers = std::min(helpers, workers_);
      for (int i = 0; i < helpers; ++i) queue_.push_back(&job);
    }
    for (int i = 0; i < helpers; ++i) work_cv_.notify_one();
    run_chunks(job);
    std::unique_lock<std::mutex> lock(mu_);
    queue_.erase(std::remove(queue_.begin(), queue_.end(), &job), queue_.end());
    done_cv_.wait(lock, [&] { return job.helpers == 0; });
  }

  int workers() {
    std::lock_guard<std::mutex> lock(mu_);
    return workers_;
  }

 private:
  // At least n workers (as many as the system gives). Holds mu_.
  void grow(int n) {
    while (workers_ < n) {
      try {
        std::thread(&Pool::work, this).detach();
      } catch (...) {
        return;  // no more threads: run with the ones there are
      }
      ++workers_;
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return !queue_.empty(); });
      Job* job = queue_.front();
      queue_.pop_front();
      ++job->helpers;
      lock.unlock();
      run_chunks(*job);
      lock.lock();
      if (--job->helpers == 0) done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Job*> queue_;
  int workers_ = 0;
};

Pool* g_pool = nullptr;

// A forked child has none of the parent's workers (and maybe a locked
// mutex): it starts a fresh pool, leaking the parent's.
void reset_after_fork() { g_pool = new Pool(); }

Pool& pool() {
  static const bool created = [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, reset_after_fork);
    return true;
  }();
  (void)created;
  return *g_pool;
}

}  // namespace

int num_threads() { return tl_threads > 0 ? tl_threads : default_threads(); }

void parallel_run(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t chunks = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
  tl_last_width = static_cast<int>(chunks);
  tl_last_participants = 1;
  if (chunks == 1) {
    fn(ctx, begin, end);
    return;
  }
  Job job;
  job.fn = fn;
  job.ctx = ctx;
  job.begin = begin;
  job.end = end;
  job.step = (n + chunks - 1) / chunks;
  job.chunks = chunks;
  pool().run(job, static_cast<int>(chunks - 1));
  tl_last_participants = job.participants.load(std::memory_order_relaxed);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace rlhf

extern "C" {

int rlhf_set_num_threads(int n) {
  rlhf::tl_threads = n > 0 ? n : 0;
  return 0;
}

int rlhf_get_num_threads(void) { return rlhf::num_threads(); }

int rlhf_last_parallel_width(void) { return rlhf::tl_last_width; }

int rlhf_last_parallel_threads(void) { return rlhf::tl_last_participants; }

int rlhf_pool_workers(void) { return rlhf::pool().workers(); }

}  // extern "C"
