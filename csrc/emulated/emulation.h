// CPU emulation of the CUDA execution model, for tests only: the .cu sources compiled as
// plain C++ with ATTENTION_EXT_CUDA_EMULATION defined (csrc/emulated/). Each CUDA thread
// of a block runs as its own fiber (a stack of its own, switched cooperatively on one OS
// thread, csrc/emulated/fiber_switch.cpp), so __syncthreads() and the warp shuffles are
// real rendezvous of the threads involved, not sequential approximations; blocks run one
// after another. Fibers rather than OS threads: a shuffle is then 32 stack switches
// instead of 32 futex wake-ups, which lets the whole test suite run through the emulated
// kernels. Only what this project's kernels use is provided, with
// cp.async's copies, groups and waits (copy_async, for device_primitives.cuh) and the
// 16 x 16 x 16 and TF32 16 x 16 x 8 tiles of nvcuda::wmma (tensor cores) at the end:
// anything else (dynamic shared memory, atomics, votes, __half intrinsics, inline PTX)
// fails to compile.
//
// Not emulated: the GPU memory model, concurrency between blocks, timing. Shuffles check
// that every lane named in the mask took part; they do not check that the lanes reached
// the *same* shuffle call (divergent shuffles are undefined behaviour on a GPU too). A
// block whose threads all wait and none can go on (a barrier or shuffle some thread never
// reaches) stops the process with a message.
#pragma once

#if !defined(ATTENTION_EXT_CUDA_EMULATION) || defined(__CUDACC__)
#error "emulation.h is for compiling .cu files as C++ with ATTENTION_EXT_CUDA_EMULATION"
#endif

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_ext/device_check.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// Execution-space qualifiers mean nothing on the host. __restrict__ is a GCC/Clang keyword.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// Register limits mean nothing on the host.
#define __launch_bounds__(...)
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

// The running CUDA thread's indices: set by the scheduler before it resumes a fiber.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace attention_ext::emu {

constexpr int kWarpLanes = 32;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::abort();  // a broken kernel contract: no sane way to unwind a block of fibers
}

// Stack switching (csrc/emulated/fiber_switch.cpp). switch_stack saves the callee-saved
// state on the current stack, stores its stack pointer in *save and resumes the stack at
// `load`. new_stack prepares a stack whose first resumption calls entry(arg).
extern "C" void attention_ext_emu_switch_stack(void** save, void* load);
void* new_stack(char* base, std::size_t size, void (*entry)(void*), void* arg);

// AddressSanitizer tracks which stack is current; every switch between stacks tells it,
// or a noreturn call on a fiber (fail's abort) makes it warn of false positives.
// start_switch(save, bottom, size) before switching to the stack [bottom, bottom + size)
// (save = nullptr when the current stack is never resumed), finish_switch after arriving.
#if defined(__SANITIZE_ADDRESS__)
inline void start_switch(void** save, const void* bottom, std::size_t size) {
  __sanitizer_start_switch_fiber(save, bottom, size);
}
inline void finish_switch(void* saved, const void** bottom_old, std::size_t* size_old) {
  __sanitizer_finish_switch_fiber(saved, bottom_old, size_old);
}
#else
inline void start_switch(void**, const void*, std::size_t) {}
inline void finish_switch(void*, const void**, std::size_t*) {}
#endif

// The fibers of one block and the loop that runs them: each resumption runs a fiber until
// it waits (yield) or returns from the kernel. `progress` counts the events that can let
// a waiting fiber go on; a full round without one is a deadlock.
class Scheduler {
 public:
  static constexpr std::size_t kStackBytes = 256 * 1024;  // sanitizer builds need room

  // Runs body() once per thread of a block of `threads` threads, as fibers, resuming them
  // in thread order, or in reverse thread order with `reverse`.
  void run_block(unsigned threads, const dim3& block, bool reverse,
                 const std::function<void()>& body);

  void yield() { switch_out(); }
  void note_progress() { ++progress_; }
  unsigned current() const { return current_; }

 private:
  struct Fiber {
    std::unique_ptr<char[]> stack;
    void* sp = nullptr;
    void* sanitizer_state = nullptr;
    bool done = false;
  };
  static void fiber_main(void* self);
  void switch_out();
  void arrived_on_fiber();

  std::vector<Fiber> fibers_;
  void* scheduler_sp_ = nullptr;
  const void* scheduler_stack_bottom_ = nullptr;  // learnt from the sanitizer, if any
  std::size_t scheduler_stack_size_ = 0;
  const std::function<void()>* body_ = nullptr;
  unsigned current_ = 0;
  uint64_t progress_ = 0;
};

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
  int exchange(Scheduler& sched, int id, uint64_t bits, uint64_t& who) {
    const uint32_t phase = phase_;
    const int buf = static_cast<int>(phase & 1u);
    if (id < kWarpLanes) slots_[buf][id] = bits;
    arrived_ |= uint64_t(1) << id;
    sched.note_progress();
    if (arrived_ == members_) {
      complete(sched, buf);
    } else {
      while (phase_ == phase) sched.yield();
    }
    who = took_part_[buf];
    return buf;
  }

  uint64_t slot(int buf, int id) const { return slots_[buf][id]; }

  // Member `id` returned from the kernel; the others no longer wait for it.
  void leave(Scheduler& sched, int id) {
    members_ &= ~(uint64_t(1) << id);
    if (arrived_ != 0 && arrived_ == members_) complete(sched, static_cast<int>(phase_ & 1u));
  }

 private:
  void complete(Scheduler& sched, int buf) {
    took_part_[buf] = arrived_;
    arrived_ = 0;
    ++phase_;
    sched.note_progress();
  }

  uint32_t phase_ = 0;
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
  void arrive_and_wait(Scheduler& sched) {
    const uint32_t phase = phase_;
    sched.note_progress();
    if (++arrived_ == members_) {
      complete(sched);
    } else {
      while (phase_ == phase) sched.yield();
    }
  }
  void leave(Scheduler& sched) {
    --members_;
    if (arrived_ != 0 && arrived_ == members_) complete(sched);
  }

 private:
  void complete(Scheduler& sched) {
    arrived_ = 0;
    ++phase_;
    sched.note_progress();
  }
  uint32_t phase_ = 0;
  unsigned members_ = 0, arrived_ = 0;
};

// One thread's asynchronous copies (cp.async) that have not landed, in issue order, and
// the end of each group its commits closed.
struct AsyncCopies {
  struct Copy {
    void* dst;
    const void* src;
    std::size_t bytes;
  };
  std::vector<Copy> copies;
  std::vector<std::size_t> group_ends;

  // Lands the first `count` copies.
  void land(std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) {
      std::memcpy(copies[i].dst, copies[i].src, copies[i].bytes);
    }
    copies.erase(copies.begin(), copies.begin() + static_cast<std::ptrdiff_t>(count));
    std::size_t kept = 0;
    for (const std::size_t end : group_ends) {
      if (end > count) group_ends[kept++] = end - count;
    }
    group_ends.resize(kept);
  }
  void land_all() { land(copies.size()); }
};

struct Block {
  Scheduler scheduler;
  BlockBarrier barrier;
  std::unique_ptr<Rendezvous[]> warps;
  std::unique_ptr<AsyncCopies[]> async_copies;  // one per thread
};

inline thread_local Block* tl_block = nullptr;
inline thread_local unsigned tl_linear = 0;  // the running thread's linear index in its block

// cp.async, commit_group and wait_group (sm_80 and later). A copy lands at some moment
// between its issue and the wait that covers its group; the emulation lands it as late as
// that allows, at the wait, and fills its destination with 0xff bytes (a NaN in every
// floating type) when it is issued. So a stage read before its wait, or a copy issued into
// a buffer that other threads still read, shows in the results. Both addresses must be
// aligned to the copy's size, as on a GPU. Copies still in flight when their thread
// returns land then.
inline void copy_async(void* dst, const void* src, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(dst) % bytes != 0 ||
      reinterpret_cast<std::uintptr_t>(src) % bytes != 0) {
    fail("cp.async: an address not aligned to the copy's size");
  }
  std::memset(dst, 0xff, bytes);
  tl_block->async_copies[tl_linear].copies.push_back({dst, src, bytes});
}

inline void commit_async_group() {
  AsyncCopies& mine = tl_block->async_copies[tl_linear];
  mine.group_ends.push_back(mine.copies.size());
}

// Lands every committed group but the newest `in_flight`.
inline void wait_async_groups(std::size_t in_flight) {
  AsyncCopies& mine = tl_block->async_copies[tl_linear];
  if (mine.group_ends.size() > in_flight) {
    mine.land(mine.group_ends[mine.group_ends.size() - 1 - in_flight]);
  }
}

// One shuffle: every lane publishes `v`, then reads lane `src`'s value. Lanes in `mask`
// that did not take part (returned early, or diverged away) and sources outside the mask
// are errors, as they are undefined on a GPU.
template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "emulated shuffles carry values of at most 8 bytes");
  const unsigned linear = tl_linear;
  const int lane = static_cast<int>(linear % kWarpLanes);
  if (!((mask >> lane) & 1u)) fail("shuffle by a lane outside its own mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  uint64_t who = 0;
  Rendezvous& warp = tl_block->warps[linear / kWarpLanes];
  const int buf = warp.exchange(tl_block->scheduler, lane, bits, who);
  if ((uint64_t(mask) & ~who) != 0) fail("shuffle mask names a lane that did not take part");
  // CUDA leaves a read from a lane outside the mask undefined: refuse it.
  if (!((mask >> src) & 1u)) fail("shuffle reads a lane outside its mask");
  const uint64_t got = warp.slot(buf, src);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// The one block in flight (launches are serialised); its fibers' stacks are kept from
// launch to launch.
inline Block& launch_state() {
  static Block state;
  return state;
}

// Runs `kernel(args...)` over the grid: one fiber per CUDA thread of a block, blocks in
// order (x fastest), each block's fibers run to completion before the next block starts.
// Returns the message of the launch's first failed device check, or nullptr.
template <typename... KernelArgs, typename... Args>
const char* launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t smem,
                   Args&&... args) {
  if (smem != 0) fail("dynamic shared memory is not emulated");
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) fail("block size must be in [1, 1024]");
  // Kernel arguments are copied, as a launch copies them to the device.
  const std::tuple<std::decay_t<KernelArgs>...> packed(std::forward<Args>(args)...);
  // One launch at a time in the process: __shared__ variables are process-wide statics.
  const std::lock_guard<std::mutex> guard(launch_mutex());

  Block& state = launch_state();
  const unsigned warps = (threads + kWarpLanes - 1) / kWarpLanes;
  state.warps = std::make_unique<Rendezvous[]>(warps);
  state.async_copies = std::make_unique<AsyncCopies[]>(threads);
  tl_block = &state;
  blockDim = block;
  gridDim = grid;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const std::function<void()> body = [&] {
    std::apply(kernel, packed);
    // Returned: the thread's copies in flight land, and the rest of the block no longer
    // waits for it.
    const unsigned linear = tl_linear;
    state.async_copies[linear].land_all();
    state.warps[linear / kWarpLanes].leave(state.scheduler, static_cast<int>(linear % kWarpLanes));
    state.barrier.leave(state.scheduler);
  };
  for (uint64_t n = 0; n < blocks; ++n) {
    blockIdx = uint3{static_cast<unsigned>(n % grid.x),
                     static_cast<unsigned>((n / grid.x) % grid.y),
                     static_cast<unsigned>(n / (uint64_t(grid.x) * grid.y))};
    state.barrier.reset(threads);
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned lanes = std::min<unsigned>(kWarpLanes, threads - w * kWarpLanes);
      state.warps[w].reset((uint64_t(1) << lanes) - 1);
    }
    // Odd blocks resume their threads in reverse order. A race between threads of a block
    // (shared memory written and read with no barrier between) gives the intended result
    // in one of the orders only, so blocks that run the same code in both orders show it.
    state.scheduler.run_block(threads, block, n % 2 == 1, body);
  }
  tl_block = nullptr;
  return failed_device_check().exchange(nullptr);
}

// The scheduler's loop and fiber entry, header-only so that every emulated translation
// unit shares one definition (inline).
inline void Scheduler::run_block(unsigned threads, const dim3& block, bool reverse,
                                 const std::function<void()>& body) {
  if (fibers_.size() < threads) fibers_.resize(threads);
  body_ = &body;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers_[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);  // untouched until used
    f.done = false;
    f.sp = new_stack(f.stack.get(), kStackBytes, &Scheduler::fiber_main, this);
  }
  unsigned live = threads;
  while (live > 0) {
    const uint64_t before = progress_;
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = reverse ? threads - 1 - i : i;
      Fiber& f = fibers_[t];
      if (f.done) continue;
      current_ = t;
      tl_linear = t;
      threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      void* sanitizer_state = nullptr;
      start_switch(&sanitizer_state, f.stack.get(), kStackBytes);
      attention_ext_emu_switch_stack(&scheduler_sp_, f.sp);
      finish_switch(sanitizer_state, nullptr, nullptr);
      if (f.done) --live;
    }
    if (live > 0 && progress_ == before) {
      fail("deadlock: every live thread of the block waits at a barrier or shuffle that "
           "the others never reach");
    }
  }
  body_ = nullptr;
}

inline void Scheduler::arrived_on_fiber() {
  finish_switch(fibers_[current_].sanitizer_state, &scheduler_stack_bottom_,
                &scheduler_stack_size_);
}

inline void Scheduler::switch_out() {
  Fiber& f = fibers_[current_];
  // A finished fiber's stack is never resumed: the next block prepares a new one.
  start_switch(f.done ? nullptr : &f.sanitizer_state, scheduler_stack_bottom_,
               scheduler_stack_size_);
  attention_ext_emu_switch_stack(&f.sp, scheduler_sp_);
  arrived_on_fiber();
}

inline void Scheduler::fiber_main(void* self) {
  auto* sched = static_cast<Scheduler*>(self);
  sched->fibers_[sched->current_].sanitizer_state = nullptr;
  sched->arrived_on_fiber();
  (*sched->body_)();
  sched->fibers_[sched->current_].done = true;
  sched->note_progress();
  sched->switch_out();
  fail("a finished fiber was resumed");
}

}  // namespace attention_ext::emu

// The CUDA intrinsics the kernels use, with their CUDA semantics (width = 32).
inline void __syncthreads() {
  auto* block = attention_ext::emu::tl_block;
  block->barrier.arrive_and_wait(block->scheduler);
}

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

// nvcuda::wmma, the warp-wide matrix products of the tensor cores: the subset the kernels
// may use, 16 x 16 x 16 tiles of 16-bit inputs (c10::Half as __half, c10::BFloat16 as
// __nv_bfloat16) and 16 x 16 x 8 tiles of precision::tf32 (float storage, rounded by
// __float_to_tf32), with float accumulators; fragments, fill, load, store, mma. A
// fragment's element layout is opaque in CUDA; here lane l holds elements n l .. n l + n - 1
// of its tile (rows x cols) in row-major order, n = num_elements. Every call is a warp
// collective that all 32 lanes must reach, as on a GPU (a missing lane stops the process).
// Loads and stores refuse what CUDA leaves undefined: a pointer not 32-byte aligned, a
// leading dimension not a multiple of 16 bytes. mma_sync computes D = A B + C in float,
// summing k in order: the products of 16-bit or TF32 values are exact in float, as in the
// tensor cores; the sums' rounding may differ.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace attention_ext::emu {

// A rendezvous of the running thread's whole warp; returns the buffer in which
// warp_slot(buf, lane) holds each lane's `bits` until the warp's next rendezvous but one.
inline int warp_rendezvous(uint64_t bits) {
  const unsigned linear = tl_linear;
  uint64_t who = 0;
  Rendezvous& warp = tl_block->warps[linear / kWarpLanes];
  const int buf = warp.exchange(tl_block->scheduler, static_cast<int>(linear % kWarpLanes), bits,
                                who);
  if (who != 0xffffffffu) fail("a wmma operation reached by only part of the warp");
  return buf;
}

inline const void* warp_slot(int buf, int lane) {
  const unsigned linear = tl_linear;
  const uint64_t bits = tl_block->warps[linear / kWarpLanes].slot(buf, lane);
  const void* p = nullptr;
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

inline int lane_now() { return static_cast<int>(tl_linear % kWarpLanes); }

inline void check_tile_address(const void* p, unsigned ldm, std::size_t element_bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) fail("wmma: pointer not 32-byte aligned");
  if ((ldm * element_bytes) % 16 != 0) fail("wmma: ldm not a multiple of 16 bytes");
}

}  // namespace attention_ext::emu

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// What a fragment of element type T stores: TF32 values live in floats.
template <typename T>
struct storage_of {
  using type = T;
};
template <>
struct storage_of<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8),
                "the emulation provides 16 x 16 x 16 and 16 x 16 x 8 tiles");
  static_assert(K == 16 || std::is_same_v<T, precision::tf32> || std::is_same_v<T, float>,
                "16 x 16 x 8 tiles are TF32's");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols / 32;
  typename storage_of<T>::type x[num_elements];
};

// Element e of the running lane in a fragment of Frag's shape: its row and column.
template <typename Frag>
inline int tile_row(int e) {
  return (attention_ext::emu::lane_now() * Frag::num_elements + e) / Frag::cols;
}
template <typename Frag>
inline int tile_col(int e) {
  return (attention_ext::emu::lane_now() * Frag::num_elements + e) % Frag::cols;
}

// A warp-wide load or store of a fragment of Frag's shape from or to the matrix at p
// (leading dimension ldm, row- or column-major): visit(e, m) for each element e of the
// running lane, m its element of the matrix.
template <typename Frag, typename E, typename Visit>
inline void visit_tile(E* p, unsigned ldm, bool row_major_memory, Visit visit) {
  attention_ext::emu::warp_rendezvous(0);
  attention_ext::emu::check_tile_address(p, ldm, sizeof(E));
  for (int e = 0; e < Frag::num_elements; ++e) {
    const int r = tile_row<Frag>(e), c = tile_col<Frag>(e);
    visit(e, row_major_memory ? p[r * ldm + c] : p[c * ldm + r]);
  }
}

template <typename Use, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, K, T, Layout>& f,
                             const typename storage_of<T>::type* p, unsigned ldm) {
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>,
                "accumulators are loaded with a layout_t");
  visit_tile<fragment<Use, 16, 16, K, T, Layout>>(
      p, ldm, std::is_same_v<Layout, row_major>, [&](int e, const auto& m) { f.x[e] = m; });
}

template <int K>
inline void load_matrix_sync(fragment<accumulator, 16, 16, K, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  visit_tile<fragment<accumulator, 16, 16, K, float>>(
      p, ldm, layout == mem_row_major, [&](int e, const float& m) { f.x[e] = m; });
}

template <int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f,
                              unsigned ldm, layout_t layout) {
  visit_tile<fragment<accumulator, 16, 16, K, float>>(
      p, ldm, layout == mem_row_major, [&](int e, float& m) { m = f.x[e]; });
}

template <typename Use, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, K, T, Layout>& f,
                          const typename storage_of<T>::type& v) {
  attention_ext::emu::warp_rendezvous(0);
  for (auto& x : f.x) x = v;
}

// x rounded to TF32 (10 explicit mantissa bits), to nearest with ties away from zero, as
// cvt.rna.tf32.f32; infinities and NaNs pass unchanged.
inline float __float_to_tf32(float x) {
  uint32_t bits = 0;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

// D = A B + C. Each lane publishes where its A and B fragments are, reads the row of A and
// the columns of B its elements need from the other lanes, and writes its D only after
// the whole warp has read (D may be C).
template <int K, typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, K, float>& d,
                     const fragment<matrix_a, 16, 16, K, T, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, K, T, LayoutB>& b,
                     const fragment<accumulator, 16, 16, K, float>& c) {
  using FragA = fragment<matrix_a, 16, 16, K, T, LayoutA>;
  using FragB = fragment<matrix_b, 16, 16, K, T, LayoutB>;
  using FragD = fragment<accumulator, 16, 16, K, float>;
  const void* mine[2] = {&a, &b};
  uint64_t bits = 0;
  const void* where = mine;
  std::memcpy(&bits, &where, sizeof(where));
  const int buf = attention_ext::emu::warp_rendezvous(bits);
  // Element i (row-major) of a fragment lies in lane i / n, slot i % n.
  auto element_a = [&](int i) {
    const auto* ops = static_cast<const void* const*>(
        attention_ext::emu::warp_slot(buf, i / FragA::num_elements));
    return static_cast<float>(static_cast<const FragA*>(ops[0])->x[i % FragA::num_elements]);
  };
  auto element_b = [&](int i) {
    const auto* ops = static_cast<const void* const*>(
        attention_ext::emu::warp_slot(buf, i / FragB::num_elements));
    return static_cast<float>(static_cast<const FragB*>(ops[1])->x[i % FragB::num_elements]);
  };
  float out[FragD::num_elements];
  for (int e = 0; e < FragD::num_elements; ++e) {
    const int r = tile_row<FragD>(e), n = tile_col<FragD>(e);
    float sum = c.x[e];
    for (int k = 0; k < K; ++k) sum += element_a(r * K + k) * element_b(k * 16 + n);
    out[e] = sum;
  }
  attention_ext::emu::warp_rendezvous(0);
  for (int e = 0; e < FragD::num_elements; ++e) d.x[e] = out[e];
}

}  // namespace nvcuda::wmma
