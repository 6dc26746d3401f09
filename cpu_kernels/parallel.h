// Tasks on XLA's intra-op thread pool, for our XLA:CPU custom calls.
//
// ParallelFor(pool, count, fn) runs fn(i) for every i in [0, count) and returns when all have run.
// Tasks are claimed from a counter by the calling thread and by up to num_threads - 1 helpers
// scheduled on the pool; the caller waits only for tasks a helper has claimed (and is running), so
// a pool whose threads all sit in such a call cannot deadlock. A helper that starts after the last
// task was claimed finds none and returns (the shared state outlives the call). Our own spinning
// workers were tried: on 2 cores they took the CPU from XLA's threads and decode got slower.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace xlaserve {

struct Tasks {
  std::function<void(int64_t)> fn;
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      fn(i);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> fn) {
  if (count <= 0) return;
  auto tasks = std::make_shared<Tasks>();
  tasks->fn = std::move(fn);
  tasks->count = count;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([tasks] { tasks->Drain(); });
  tasks->Drain();
  std::unique_lock<std::mutex> lock(tasks->mu);
  tasks->cv.wait(lock, [&] { return tasks->done.load() == tasks->count; });
}

}  // namespace xlaserve
