// CPU emulation of the CUDA execution model, for tests only: the .cu sources compiled as
// plain C++ with ATTENTION_EXT_CUDA_EMULATION defined (csrc/emulated/). Each CUDA thread
// of a block runs as its own OS thread, so __syncthreads() and the warp shuffles are real
// rendezvous of the threads involved, not sequential approximations; blocks run one
// after another. Only what this project's kernels use is provided: anything else
// (dynamic shared memory, atomics, votes, __half intrinsics, inline PTX) fails to compile.
//
// Not emulated: the GPU memory model, concurrency between blocks, timing. Shuffles check
// that every lane named in the mask took part; they do not check that the lanes reached
// the *same* shuffle call (divergent shuffles are undefined behaviour on a GPU too).
#pragma once

#if !defined(ATTENTION_EXT_CUDA_EMULATION) || defined(__CUDACC__)
#error "emulation.h is for compiling .cu files as C++ with ATTENTION_EXT_CUDA_EMULATION"
#endif

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// Execution-space qualifiers mean nothing on the host. __restrict__ is a GCC/Clang keyword.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// Static shared memory: one instance per kernel instantiation is enough because blocks
// run one at a time and launches are serialised (emu::launch). Dynamic shared memory
// (`extern __shared__`) is not provided: `extern static` does not compile.
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The stream is opaque to the host code; the emulation runs launches synchronously.
using cudaStream_t = struct CUstream_st*;

// Per emulated thread, set by the launcher before the kernel body runs.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace attention_ext::emu {

constexpr int kWarpLanes = 32;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::abort();  // a broken kernel contract: no sane way to unwind 128 threads
}

// A rendezvous of a set of threads that shrinks as threads return from the kernel (CUDA
// counts exited threads as arrived). `slots` carry one 8-byte value per member, double
// buffered by phase parity: a member can only write the same buffer again two phases
// later, after every member has finished reading it.
class Rendezvous {
 public:
  void reset(uint64_t members) {
    members_ = members;
    arrived_ = 0;
  }

  // Publishes `bits` as member `id`'s slot, waits for all live members; returns the
  // phase's buffer index. `who` receives the members that took part.
  int exchange(int id, uint64_t bits, uint64_t& who) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint32_t phase = phase_.load(std::memory_order_relaxed);
    const int buf = static_cast<int>(phase & 1u);
    if (id < kWarpLanes) slots_[buf][id] = bits;
    arrived_ |= uint64_t(1) << id;
    if (arrived_ == members_) {
      complete(lock, buf);
    } else {
      lock.unlock();
      while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase);
    }
    who = took_part_[buf];
    return buf;
  }

  uint64_t slot(int buf, int id) const { return slots_[buf][id]; }

  // Member `id` returned from the kernel; the others no longer wait for it.
  void leave(int id) {
    std::unique_lock<std::mutex> lock(mutex_);
    members_ &= ~(uint64_t(1) << id);
    if (arrived_ != 0 && arrived_ == members_) {
      complete(lock, static_cast<int>(phase_.load(std::memory_order_relaxed) & 1u));
    }
  }

 private:
  void complete(std::unique_lock<std::mutex>& lock, int buf) {
    took_part_[buf] = arrived_;
    arrived_ = 0;
    phase_.fetch_add(1, std::memory_order_release);
    lock.unlock();
    phase_.notify_all();
  }

  std::mutex mutex_;
  std::atomic<uint32_t> phase_{0};
  uint64_t members_ = 0, arrived_ = 0;
  uint64_t took_part_[2] = {0, 0};
  uint64_t slots_[2][kWarpLanes] = {};
};

// __syncthreads() needs up to 1024 members; a bitmask of 64 is not enough, so the block
// barrier counts instead (no slots, no membership check).
class BlockBarrier {
 public:
  void reset(unsigned members) {
    members_ = members;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint32_t phase = phase_.load(std::memory_order_relaxed);
    if (++arrived_ == members_) {
      complete(lock);
    } else {
      lock.unlock();
      while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase);
    }
  }
  void leave() {
    std::unique_lock<std::mutex> lock(mutex_);
    --members_;
    if (arrived_ != 0 && arrived_ == members_) complete(lock);
  }

 private:
  void complete(std::unique_lock<std::mutex>& lock) {
    arrived_ = 0;
    phase_.fetch_add(1, std::memory_order_release);
    lock.unlock();
    phase_.notify_all();
  }
  std::mutex mutex_;
  std::atomic<uint32_t> phase_{0};
  unsigned members_ = 0, arrived_ = 0;
};

struct Block {
  BlockBarrier barrier;
  std::unique_ptr<Rendezvous[]> warps;
  unsigned threads = 0;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local unsigned tl_linear = 0;  // linear thread index within the block

// One shuffle: every lane publishes `v`, then reads lane `src`'s value. Lanes in `mask`
// that did not take part (returned early, or diverged away) and sources outside the mask
// are errors, as they are undefined on a GPU.
template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "emulated shuffles carry values of at most 8 bytes");
  const int lane = static_cast<int>(tl_linear % kWarpLanes);
  if (!((mask >> lane) & 1u)) fail("shuffle by a lane outside its own mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  uint64_t who = 0;
  Rendezvous& warp = tl_block->warps[tl_linear / kWarpLanes];
  const int buf = warp.exchange(lane, bits, who);
  if ((uint64_t(mask) & ~who) != 0) fail("shuffle mask names a lane that did not take part");
  // CUDA leaves a read from a lane outside the mask undefined: refuse it.
  if (!((mask >> src) & 1u)) fail("shuffle reads a lane outside its mask");
  const uint64_t got = warp.slot(buf, src);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// The first failed ATTENTION_EXT_DEVICE_CHECK of the launch in progress (launches are
// serialised); launch_kernel raises it once the grid has run.
inline std::atomic<const char*>& failed_device_check() {
  static std::atomic<const char*> msg{nullptr};
  return msg;
}

inline void device_check_failed(const char* msg) {
  const char* none = nullptr;
  failed_device_check().compare_exchange_strong(none, msg);
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs `kernel(args...)` over the grid: one OS thread per CUDA thread of a block, the same
// threads for every block, blocks in order (x fastest), separated by a full barrier.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t smem,
            Args&&... args) {
  if (smem != 0) fail("dynamic shared memory is not emulated");
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) fail("block size must be in [1, 1024]");
  // Kernel arguments are copied, as a launch copies them to the device.
  const std::tuple<std::decay_t<KernelArgs>...> packed(std::forward<Args>(args)...);
  // One launch at a time in the process: __shared__ variables are process-wide statics.
  const std::lock_guard<std::mutex> guard(launch_mutex());

  Block state;
  const unsigned warps = (threads + kWarpLanes - 1) / kWarpLanes;
  state.warps = std::make_unique<Rendezvous[]>(warps);
  state.threads = threads;
  auto reset = [&]() noexcept {
    state.barrier.reset(threads);
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned lanes = std::min<unsigned>(kWarpLanes, threads - w * kWarpLanes);
      state.warps[w].reset((uint64_t(1) << lanes) - 1);
    }
  };
  reset();
  std::barrier between_blocks(static_cast<std::ptrdiff_t>(threads), reset);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;

  auto body = [&](unsigned linear) {
    tl_block = &state;
    tl_linear = linear;
    blockDim = block;
    gridDim = grid;
    threadIdx = uint3{linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y)};
    for (uint64_t n = 0; n < blocks; ++n) {
      blockIdx = uint3{static_cast<unsigned>(n % grid.x),
                       static_cast<unsigned>((n / grid.x) % grid.y),
                       static_cast<unsigned>(n / (uint64_t(grid.x) * grid.y))};
      std::apply(kernel, packed);
      // Returned: the rest of the block no longer waits for this thread.
      state.warps[linear / kWarpLanes].leave(static_cast<int>(linear % kWarpLanes));
      state.barrier.leave();
      between_blocks.arrive_and_wait();  // the last arrival resets the block state
    }
    tl_block = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) pool.emplace_back(body, t);
  for (auto& t : pool) t.join();
}

}  // namespace attention_ext::emu

// The CUDA intrinsics the kernels use, with their CUDA semantics (width = 32).
inline void __syncthreads() { attention_ext::emu::tl_block->barrier.arrive_and_wait(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  return attention_ext::emu::shuffle(mask, v, src_lane & 31);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  const int lane = static_cast<int>(attention_ext::emu::tl_linear % 32);
  return attention_ext::emu::shuffle(mask, v, (lane ^ lane_mask) & 31);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const int lane = static_cast<int>(attention_ext::emu::tl_linear % 32);
  const int src = lane + static_cast<int>(delta);
  // Lanes whose source is past the warp's end keep their own value (and still take part).
  const T got = attention_ext::emu::shuffle(mask, v, src < 32 ? src : lane);
  return src < 32 ? got : v;
}
