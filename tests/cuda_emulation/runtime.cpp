// The scheduler of cuda_emulation.h, and the launch status the sources read
// through cudaGetLastError.
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda_emulation.h"

namespace nnk_cuda_emulation {
namespace {

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
  uint64_t slot = 0;
};

struct Scheduler {
  Coordinates coords;
  std::vector<Fiber> fibers;
  ucontext_t main;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
  cudaError_t error = cudaSuccess;
};

Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

dim3 unflatten(unsigned i, dim3 shape) {
  return dim3(i % shape.x, (i / shape.x) % shape.y, i / (shape.x * shape.y));
}

void set_current(unsigned i) {
  Scheduler& s = scheduler();
  s.current = i;
  s.coords.thread_idx = unflatten(i, s.coords.block);
}

void fiber_main() {
  Scheduler& s = scheduler();
  (*s.body)();
  s.fibers[s.current].state = State::kDone;
  // Returning resumes uc_link: the scheduler.
}

void suspend(State state) {
  Scheduler& s = scheduler();
  const unsigned me = s.current;
  s.fibers[me].state = state;
  swapcontext(&s.fibers[me].context, &s.main);
  set_current(me);
}

bool reverse_order() {
  const char* v = std::getenv("NNK_CUDA_EMULATION_ORDER");
  return v != nullptr && std::strcmp(v, "reverse") == 0;
}

DeviceMath device_math_mode() {
  const char* v = std::getenv("NNK_CUDA_EMULATION_MATH");
  if (v == nullptr || std::strcmp(v, "random") == 0) return DeviceMath::kRandom;
  if (std::strcmp(v, "high") == 0) return DeviceMath::kHigh;
  if (std::strcmp(v, "low") == 0) return DeviceMath::kLow;
  if (std::strcmp(v, "exact") == 0) return DeviceMath::kExact;
  std::fprintf(stderr, "NNK_CUDA_EMULATION_MATH=%s: expected random, high, low or exact\n", v);
  std::abort();
}

// Runs the threads of the current block until all are done. Returns false on
// a barrier that cannot complete.
bool run_block() {
  Scheduler& s = scheduler();
  const unsigned n = s.coords.block.x * s.coords.block.y * s.coords.block.z;
  if (s.fibers.size() < n) s.fibers.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &s.main;
    makecontext(&f.context, fiber_main, 0);
    f.state = State::kReady;
  }
  const bool reverse = reverse_order();
  for (;;) {
    // 1. Run every ready thread until it waits or ends.
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = reverse ? n - 1 - k : k;
      if (s.fibers[i].state != State::kReady) continue;
      set_current(i);
      swapcontext(&s.main, &s.fibers[i].context);
    }
    // 2. Release the warps whose 32 lanes all wait at a shuffle.
    bool released = false, any_waiting = false, any_done = false, all_at_block = true, all_done = true;
    for (unsigned w = 0; w * 32 < n; ++w) {
      const unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
      unsigned at_warp = 0;
      for (unsigned i = lo; i < hi; ++i) at_warp += s.fibers[i].state == State::kWarpBarrier;
      if (at_warp == 32) {
        for (unsigned i = lo; i < hi; ++i) s.fibers[i].state = State::kReady;
        released = true;
      }
    }
    if (released) continue;
    for (unsigned i = 0; i < n; ++i) {
      const State st = s.fibers[i].state;
      all_done &= st == State::kDone;
      any_done |= st == State::kDone;
      any_waiting |= st != State::kDone;
      all_at_block &= st == State::kDone || st == State::kBlockBarrier;
    }
    if (all_done) return true;
    // 3. A __syncthreads that every thread of the block reached. One that
    //    exited threads skipped completes on Volta and later, but CUDA leaves
    //    it undefined: reported, as a shuffle some lanes skip.
    if (any_waiting && all_at_block && !any_done) {
      for (unsigned i = 0; i < n; ++i) {
        if (s.fibers[i].state == State::kBlockBarrier) s.fibers[i].state = State::kReady;
      }
      continue;
    }
    return false;  // a shuffle or __syncthreads that some threads never reach
  }
}

}  // namespace

DeviceMath device_math = DeviceMath::kRandom;

Coordinates& coordinates() { return scheduler().coords; }

uint64_t& slot(unsigned thread) { return scheduler().fibers[thread].slot; }

unsigned linear_thread() { return scheduler().current; }

void block_barrier() { suspend(State::kBlockBarrier); }

void warp_barrier() { suspend(State::kWarpBarrier); }

void launch(dim3 grid, dim3 block, std::function<void()> body) {
  Scheduler& s = scheduler();
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    s.error = cudaErrorInvalidConfiguration;
    return;
  }
  device_math = device_math_mode();
  s.body = &body;
  s.coords.grid = grid;
  s.coords.block = block;
  // Blocks one after another, in reverse too: a block that reads what
  // another block of the same launch writes (a race on a GPU, where blocks
  // run in any order) then sees different data in the two orders.
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const bool reverse = reverse_order();
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t i = reverse ? blocks - 1 - k : k;
    s.coords.block_idx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                              static_cast<unsigned>(i / grid.x / grid.y));
    if (!run_block()) {
      s.error = cudaErrorLaunchFailure;
      return;
    }
  }
}

cudaError_t get_last_error() {
  Scheduler& s = scheduler();
  const cudaError_t e = s.error;
  s.error = cudaSuccess;
  return e;
}

}  // namespace nnk_cuda_emulation
