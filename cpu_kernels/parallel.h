// Tasks on XLA's intra-op thread pool, for our XLA:CPU custom calls.
//
// ParallelFor(pool, count, fn) runs fn(i) for every i in [0, count) and returns when all have run.
// The tasks are cut into as many contiguous parts as threads take part (the caller and up to
// num_threads - 1 helpers); each thread claims from its own part's counter, in order, then from the
// others'. So a thread streams neighbouring rows (its prefetches run on into its own next task), and
// a batch-1 attention step's query heads of one kv head mostly stay on one thread, which reads that
// head's K/V once (context 2048: 56-61 -> 61-63 tok/s against one shared counter). The caller waits
// only for tasks a helper has claimed (and is running), so a pool whose threads all sit in such a
// call cannot deadlock. A helper that comes after the last task was claimed finds none (the shared
// state outlives the call). Which thread runs a task never changes its result.
//
// Waking a sleeping thread costs ~20 us on a VM: as much as a small layer's whole GEMV, and a decode
// step makes ~150 calls a few us apart. So neither side sleeps at once:
// - a helper that has drained its call stays parked, spinning, for up to kSpinNs and takes the next
//   call posted in that time (Park); the caller schedules new helpers only for those not parked. A
//   helper that gives up just as a call is posted costs that call its help, never its result;
// - the caller spins up to kSpinNs for its helpers' last tasks before it sleeps on the condition.
// Both spins are bounded, so a pool thread is never held from XLA's own work for long. (Our own
// threads spinning without bound were tried: on 2 cores they took the CPU from XLA's threads and
// decode got slower.) Batch-1 decode of SmolLM2, same process, alternating: 78-88 -> 90-108 tok/s.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace xlaserve {

constexpr int64_t kSpinNs = 50'000;

// Spins until done() or kSpinNs have passed; whether done() held.
template <typename Done>
bool SpinFor(Done done) {
  std::chrono::steady_clock::time_point until{};
  for (int spin = 0;; ++spin) {
    if (done()) return true;
    if ((spin & 63) == 63) {  // the clock every 64 pauses
      const auto now = std::chrono::steady_clock::now();
      if (until == std::chrono::steady_clock::time_point{}) until = now + std::chrono::nanoseconds(kSpinNs);
      else if (now > until) return false;
    }
    _mm_pause();
  }
}

struct alignas(64) Part {  // the unclaimed tasks [next, end) of one part; a cache line of its own
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

struct Tasks {
  std::function<void(int64_t)> fn;
  int64_t count = 0, parts = 1;
  std::unique_ptr<Part[]> part;
  std::atomic<int64_t> arrived{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  Tasks(std::function<void(int64_t)> f, int64_t n, int64_t p)
      : fn(std::move(f)), count(n), parts(p), part(new Part[p]) {
    for (int64_t i = 0; i < p; ++i) part[i].next = i * n / p, part[i].end = (i + 1) * n / p;
  }

  void Drain() {
    const int64_t first = arrived.fetch_add(1) % parts;
    for (int64_t j = 0; j < parts; ++j) {
      Part& pt = part[(first + j) % parts];
      for (int64_t i; (i = pt.next.fetch_add(1)) < pt.end;) {
        fn(i);
        if (done.fetch_add(1) + 1 == count) {
          std::lock_guard<std::mutex> lock(mu);
          cv.notify_all();
        }
      }
    }
  }
};

// The latest call, for parked helpers: `posted` counts posts; `job` (under mu) is the latest, or
// null once its caller has returned.
struct Park {
  std::mutex mu;
  std::shared_ptr<Tasks> job;
  std::atomic<uint64_t> posted{0};
  std::atomic<int64_t> parked{0};
};

inline Park& ThePark() {
  static Park park;
  return park;
}

// A pool task: drains `tasks`, then each call posted before kSpinNs pass without one.
inline void Help(std::shared_ptr<Tasks> tasks) {
  Park& park = ThePark();
  while (tasks) {
    tasks->Drain();
    tasks.reset();
    const uint64_t seen = park.posted.load(std::memory_order_acquire);
    park.parked.fetch_add(1);
    const bool posted = SpinFor([&] { return park.posted.load(std::memory_order_acquire) != seen; });
    park.parked.fetch_sub(1);
    if (!posted) return;
    std::lock_guard<std::mutex> lock(park.mu);
    tasks = park.job;
  }
}

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> fn) {
  if (count <= 0) return;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  auto tasks = std::make_shared<Tasks>(std::move(fn), count, helpers + 1);
  Park& park = ThePark();
  int64_t parked = 0;
  if (helpers > 0) {
    std::lock_guard<std::mutex> lock(park.mu);
    parked = park.parked.load();
    park.job = tasks;
    park.posted.fetch_add(1, std::memory_order_release);
  }
  for (int64_t i = parked; i < helpers; ++i) pool.Schedule([tasks] { Help(tasks); });
  tasks->Drain();
  if (!SpinFor([&] { return tasks->done.load() == tasks->count; })) {
    std::unique_lock<std::mutex> lock(tasks->mu);
    tasks->cv.wait(lock, [&] { return tasks->done.load() == tasks->count; });
  }
  std::lock_guard<std::mutex> lock(park.mu);
  if (park.job == tasks) park.job.reset();  // its fn refers to this frame
}

}  // namespace xlaserve
