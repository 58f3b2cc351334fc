// The forward pass of both ops, everything but the score (each op's Scorer, scorers.cuh).
// One block per (row, source split, context slice), row = (b, t), sized by the launch plan
// (forward_plan.h). The block walks its split's keys in rounds of up to 32 keys:
//  0. staging (when the plan stages): every thread issues its share of the asynchronous
//     copies of the round's key rows, and value rows, into shared memory, then waits; with
//     two buffers the next round's copies are issued first, so they fly during this round;
//  1. scores: groups of key_lanes lanes take one key each, every lane a few 16-byte chunks,
//     summed over the group by shuffles; the round's scores meet in shared memory;
//  2. softmax step: every warp reads the round's scores (lane jj holds key jj) and takes the
//     online-softmax step (max, rescale, sum) itself; all warps compute the same bits;
//  3. context: the block's threads add p_j v_j into the context, held in registers
//     (BlockRowSum); each warp's lanes get p_j from the lane that holds it by a shuffle.
// With one split the block finalises the row (context, lse, weights); with several it
// writes its partial (max, sum, unnormalised context) and split_merge_kernel combines
// the splits in a fixed order, so results never depend on timing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention_ext/math.h"
#include "device_primitives.cuh"
#include "attention_ext/forward_plan.h"
#include "kernel_params.cuh"

namespace attention_ext {

// A block's running sum of weighted rows, sum_k w_k row_k, over the chunks
// [first, first + count) of the rows (at most blockDim.x * kContextChunksPerThread),
// held in registers. The chunks are dealt to row_threads threads (a power of two); when
// that is fewer than the block's threads, the block holds `slots` copies that take
// every slots-th row each and combine() adds them in slot order.
template <int VEC, typename acc_t>
class BlockRowSum {
 public:
  __device__ __forceinline__ BlockRowSum(int64_t first, int64_t count, int tid, int threads)
      : row_threads_(pow2_at_least(count, threads)),
        slots_(threads / row_threads_),
        slot_(tid / row_threads_),
        tid_(tid),
        first_(first + tid % row_threads_),
        end_(first + count) {
#pragma unroll
    for (int k = 0; k < kContextChunksPerThread; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc_[k][i] = acc_t(0);
    }
  }

  __device__ __forceinline__ void scale(acc_t f) {
#pragma unroll
    for (int k = 0; k < kContextChunksPerThread; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc_[k][i] *= f;
    }
  }

  // Adds sum_k weight_of(k) row_of(k) over k < count, k in order. Every thread calls
  // weight_of the same number of times (with k clamped below count), so weight_of may
  // shuffle within the warp. Rows go in batches of kBatch: their weights first, then each
  // chunk's loads for the whole batch at once; a zero weight (masked or underflowed) never
  // reads its row.
  template <int kBatch = kChunksInFlight, typename WeightOf, typename RowOf>
  __device__ __forceinline__ void add(int64_t count, WeightOf weight_of, RowOf row_of) {
    using row_t = std::remove_cv_t<std::remove_pointer_t<decltype(row_of(int64_t{0}))>>;
    const int64_t rounds = ceil_div(count, slots_);
    for (int64_t r0 = 0; r0 < rounds; r0 += kBatch) {
      acc_t w[kBatch];
      const row_t* rows[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t k = (r0 + u) * slots_ + slot_;
        const int64_t kk = std::min(k, count - 1);
        w[u] = r0 + u < rounds ? weight_of(kk) : acc_t(0);  // the same in every thread
        if (k >= count) w[u] = acc_t(0);
        rows[u] = row_of(kk);
      }
#pragma unroll
      for (int n = 0; n < kContextChunksPerThread; ++n) {
        const int64_t c = first_ + int64_t(n) * row_threads_;
        if (c >= end_) break;
        Pack<row_t, VEC> x[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (w[u] != acc_t(0)) {
            x[u] = load_pack<VEC>(rows[u], c);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) x[u].v[i] = row_t(0);
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc_[n][i] += w[u] * unpack<acc_t>(x[u], i);
        }
      }
    }
  }

  // Adds the other slots' copies into slot 0's, in slot order. Every thread of the block
  // calls it. With several slots a thread holds at most one chunk (row_threads >= count).
  __device__ __forceinline__ void combine() {
    if (slots_ == 1) return;
    __shared__ acc_t copies[kForwardMaxThreads * VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) copies[tid_ * VEC + i] = acc_[0][i];
    __syncthreads();
    if (slot_ == 0) {
      for (int s = 1; s < slots_; ++s) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc_[0][i] += copies[(s * row_threads_ + tid_) * VEC + i];
      }
    }
  }

  // out_row's chunks of this block = f * the sum; slot 0 writes (after combine()).
  template <typename out_t>
  __device__ __forceinline__ void store(out_t* out_row, acc_t f) const {
    if (slot_ != 0) return;
#pragma unroll
    for (int n = 0; n < kContextChunksPerThread; ++n) {
      const int64_t c = first_ + int64_t(n) * row_threads_;
      if (c >= end_) break;
      acc_t a[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] = acc_[n][i] * f;
      store_chunk<VEC>(out_row, c, a);
    }
  }

 private:
  acc_t acc_[kContextChunksPerThread][VEC];
  int row_threads_, slots_, slot_, tid_;
  int64_t first_, end_;
};

// The block of (row, slice) among a launch's (row, slice, split) blocks, split fastest.
struct ForwardBlock {
  int64_t row, split, slice;
};

__device__ __forceinline__ ForwardBlock forward_block(int64_t splits, int64_t slices) {
  const int64_t block = blockIdx.x;
  const int64_t row_slice = block / splits;
  return ForwardBlock{row_slice / slices, block % splits, row_slice % slices};
}

// weights[row, j] = exp(score_j - lse) for j in [first, last), 0 where j does not attend;
// the block's threads take j = first + tid, first + tid + threads, ... The raw scores were
// written by this block (one split) or by the row's split blocks in an earlier launch.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_weights(const SoftmaxForwardParams<scalar_t, acc_t>& p,
                                              int64_t row, acc_t lse, int64_t first,
                                              int64_t last) {
  const int64_t b = row / p.Tq;
  const int64_t end = p.positions.end(b);
  scalar_t* w = p.weights + row * p.S;
  const acc_t* s = p.scores + row * p.S;
#pragma unroll 4
  for (int64_t j = first + threadIdx.x; j < last; j += blockDim.x) {
    const bool att = j < end && p.positions.attends(b, j);
    w[j] = static_cast<scalar_t>(att ? prob_from_lse(s[j], lse) : acc_t(0));
  }
}

// The softmax of rows whose raw scores are all in p.scores (the query-tile path,
// tile_products.cuh): one warp per row takes the max, then the sum of exp(score - max),
// over the attending keys, and writes lse and the weights.
template <typename scalar_t, typename acc_t>
__global__ void softmax_rows_kernel(const SoftmaxForwardParams<scalar_t, acc_t> p) {
  const int64_t row = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t b = row / p.Tq;
  const int64_t end = p.positions.end(b);
  const acc_t* s = p.scores + row * p.S;
  SoftmaxState<acc_t> st = softmax_init<acc_t>();
  acc_t m = neg_inf<acc_t>();
  for (int64_t j = lane; j < end; j += kWarpSize) {
    if (p.positions.attends(b, j)) m = ae_max(m, s[j]);
  }
  st.max = warp_max(m);
  acc_t sum = acc_t(0);
  if (st.max != neg_inf<acc_t>()) {  // else no key attends and the sum stays 0
    for (int64_t j = lane; j < end; j += kWarpSize) {
      if (p.positions.attends(b, j)) sum += ae_exp(s[j] - st.max);
    }
  }
  st.sum = warp_sum(sum);
  const acc_t lse = softmax_lse(st);
  if (lane == 0) p.lse[row] = lse;
  if (p.weights != nullptr) write_weights(p, row, lse, 0, p.S);
}

// The combined softmax state of a row's split partials, and each split's context factor
// exp(max_k - max) (0 for a split that saw no key). Lane l of every warp loads splits l
// and l + 32 at once and the warp combines them by shuffles, in a fixed order: every
// thread holds the same bits.
template <typename acc_t>
class MergedSplits {
 public:
  static_assert(kMaxSplits <= 2 * kWarpSize, "two splits per lane");

  __device__ __forceinline__ MergedSplits(const acc_t* part_max, const acc_t* part_sum,
                                          int64_t splits) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    acc_t m[2], s[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t k = lane + i * kWarpSize;
      m[i] = k < splits ? part_max[k] : neg_inf<acc_t>();
      s[i] = k < splits ? part_sum[k] : acc_t(0);
    }
    state_.max = warp_max(ae_max(m[0], m[1]));
    acc_t sum = acc_t(0);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const acc_t f = rescale_factor(m[i], state_.max);
      sum += s[i] * f;
      factor_[i] = softmax_saw_keys(SoftmaxState<acc_t>{m[i], s[i]}) ? f : acc_t(0);
    }
    state_.sum = warp_sum(sum);
  }

  __device__ __forceinline__ const SoftmaxState<acc_t>& state() const { return state_; }

  // Split k's factor; every lane of the warp calls it together, with the same k.
  __device__ __forceinline__ acc_t factor(int64_t k) const {
    return __shfl_sync(kFullWarpMask, k < kWarpSize ? factor_[0] : factor_[1],
                       static_cast<int>(k % kWarpSize));
  }

 private:
  SoftmaxState<acc_t> state_;
  acc_t factor_[2];
};

// A block's stage (forward_plan.h): one or two buffers, each holding a round's key rows
// (round_keys x width) and, with stage_values, its value rows after them (round_keys x Dv).
template <typename scalar_t>
class RoundStage {
 public:
  __device__ __forceinline__ RoundStage(scalar_t* shared, int round_keys, int64_t width,
                                        int64_t Dv, bool with_values)
      : shared_(shared),
        round_keys_(round_keys),
        width_(width),
        Dv_(Dv),
        buffer_len_(round_keys * (width + (with_values ? Dv : 0))) {}

  __device__ __forceinline__ scalar_t* key(int buffer, int jj) const {
    return shared_ + buffer * buffer_len_ + jj * width_;
  }
  __device__ __forceinline__ scalar_t* value(int buffer, int jj) const {
    return shared_ + buffer * buffer_len_ + round_keys_ * width_ + jj * Dv_;
  }

  // Issues the copies of `keys` rows from each source (rows of `len` elements, contiguous
  // from src) into the buffer's rows from dst, dealt to the block's threads, then closes
  // the copy group.
  template <int VEC>
  __device__ __forceinline__ static void copy_rows(scalar_t* dst, const scalar_t* src,
                                                   int keys, int64_t len, int tid, int threads) {
    const int64_t chunks = keys * len / VEC;
    for (int64_t c = tid; c < chunks; c += threads) {
      copy_chunk_async<VEC>(dst + c * VEC, src + c * VEC);
    }
  }

 private:
  scalar_t* shared_;
  int round_keys_;
  int64_t width_, Dv_, buffer_len_;
};

// The forward kernel of an op whose score is Scorer's (scorers.cuh).
template <typename Scorer>
__global__ void __launch_bounds__(kForwardMaxThreads, kTargetBlocksPerSm)
    attention_forward_kernel(const typename Scorer::ForwardParams p) {
  using scalar_t = typename Scorer::scalar_t;
  using acc_t = typename Scorer::acc_t;
  constexpr int VEC = Scorer::kVec;
  __shared__ acc_t round_scores[kMaxRoundKeys];

  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const int lane = tid % kWarpSize;
  const ForwardBlock blk = forward_block(p.splits, p.slices);
  const int64_t row = blk.row;
  const int64_t b = row / p.Tq;
  // Slice 0 writes what belongs to the whole row: raw scores, lse, weights, split state.
  const bool row_writer = blk.slice == 0;
  const int64_t j_begin = blk.split * p.split_len;
  const int64_t j_end = std::min(j_begin + p.split_len, p.positions.end(b));
  const Scorer scorer(p, row);
  const int key_lanes = p.key_lanes;
  const int groups = threads / key_lanes;
  const int group = tid / key_lanes;
  const int64_t first_chunk = blk.slice * p.slice_chunks;
  const scalar_t* values = p.values + p.positions.row(b) * p.S * p.Dv;
  const int64_t Dv = p.Dv;
  BlockRowSum<VEC, acc_t> context(first_chunk, std::min(p.slice_chunks, Dv / VEC - first_chunk),
                                  tid, threads);

  // The stage: sized for 16-byte chunks, so a narrower kernel's rows fit it too.
  __shared__ Pack<scalar_t, vec_width<scalar_t>()> stage_chunks[kStageChunks];
  const int buffers = p.stage_buffers;
  const int64_t width = scorer.width();
  const RoundStage<scalar_t> stage(reinterpret_cast<scalar_t*>(stage_chunks), p.round_keys,
                                   width, Dv, p.stage_values);
  const auto stage_round = [&](int64_t j0, int buffer) {
    const int keys = static_cast<int>(std::min<int64_t>(p.round_keys, j_end - j0));
    RoundStage<scalar_t>::template copy_rows<VEC>(stage.key(buffer, 0), scorer.key(j0), keys,
                                                  width, tid, threads);
    if (p.stage_values) {
      RoundStage<scalar_t>::template copy_rows<VEC>(stage.value(buffer, 0), values + j0 * Dv,
                                                    keys, Dv, tid, threads);
    }
    commit_async_copies();
  };
  if (buffers > 0 && j_begin < j_end) stage_round(j_begin, 0);

  SoftmaxState<acc_t> state = softmax_init<acc_t>();
  int buffer = 0;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += p.round_keys) {
    const int keys = static_cast<int>(std::min<int64_t>(p.round_keys, j_end - j0));
    if (buffers > 0) {
      if (buffers == 2 && j0 + p.round_keys < j_end) {
        stage_round(j0 + p.round_keys, 1 - buffer);  // its buffer's last round is done
        wait_async_copies<1>();
      } else {
        wait_async_copies<0>();
      }
      __syncthreads();  // every thread's copies of this round have landed
    }
    const auto key_row = [&](int jj) {
      return buffers > 0 ? stage.key(buffer, jj) : scorer.key(j0 + jj);
    };
    const auto value_row = [&](int64_t k) -> const scalar_t* {
      if (buffers > 0 && p.values_are_keys) return stage.key(buffer, static_cast<int>(k));
      if (buffers > 0 && p.stage_values) return stage.value(buffer, static_cast<int>(k));
      return values + (j0 + k) * Dv;
    };
    // 1. Scores of the round's keys, group by group.
    for (int jj0 = 0; jj0 < keys; jj0 += groups) {
      const int jj = jj0 + group;
      const bool live = jj < keys && p.positions.attends(b, j0 + jj);
      const acc_t part =
          live ? scorer.partial(key_row(jj), tid % key_lanes, key_lanes) : acc_t(0);
      const acc_t sum = group_sum(part, key_lanes);
      if (tid % key_lanes == 0 && jj < keys) {
        const acc_t s = live ? scorer.finish(sum) : neg_inf<acc_t>();
        round_scores[jj] = s;
        if (live && row_writer && p.scores != nullptr) p.scores[row * p.S + j0 + jj] = s;
      }
    }
    __syncthreads();
    // 2. The online-softmax step, in every warp alike.
    const acc_t my_score = lane < keys ? round_scores[lane] : neg_inf<acc_t>();
    const acc_t round_max = warp_max(my_score);
    if (round_max != neg_inf<acc_t>()) {  // some key attends (the same in every thread)
      const acc_t alpha = softmax_raise_max(state, round_max);
      const acc_t my_p = ae_exp(my_score - state.max);  // 0 for masked keys and lanes >= keys
      state.sum += warp_sum(my_p);
      // 3. The context.
      context.scale(alpha);
      context.add(
          keys, [&](int64_t k) { return __shfl_sync(kFullWarpMask, my_p, static_cast<int>(k)); },
          value_row);
    }
    __syncthreads();  // round_scores and this round's stage buffer are rewritten next
    if (buffers == 2) buffer = 1 - buffer;
  }
  context.combine();

  if (p.splits == 1) {
    context.store(p.context + row * Dv, softmax_inv_sum(state));  // 0 for an empty row
    if (!row_writer) return;
    const acc_t lse = softmax_lse(state);
    if (tid == 0) p.lse[row] = lse;
    // The raw scores this block wrote are visible to it after the rounds' barriers.
    if (p.weights != nullptr) write_weights(p, row, lse, 0, p.S);
    return;
  }
  const int64_t part = row * p.splits + blk.split;
  context.store(p.ctx_acc + part * Dv, acc_t(1));  // zeros for a split with no key
  if (row_writer && tid == 0) {
    p.part_max[part] = state.max;
    p.part_sum[part] = state.sum;
  }
}

// Split partials the merge loads at once: the splits of a decode plan (8 for 64 rows on an
// H100) in one batch.
constexpr int kMergeBatch = 8;

// p.merge_parts blocks per row: parts [0, slices) merge one slice of the context from
// the row's split partials in split order (part 0 also writes lse); the parts after them,
// when the weights are asked for, each write a contiguous range of the row's weights. The
// context is sum_k exp(max_k - max) ctx_k / sum.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kForwardMaxThreads, kTargetBlocksPerSm)
    split_merge_kernel(const SoftmaxForwardParams<scalar_t, acc_t> p) {
  const int64_t row = blockIdx.x / p.merge_parts;
  const int64_t part = blockIdx.x % p.merge_parts;
  const MergedSplits<acc_t> merged(p.part_max + row * p.splits, p.part_sum + row * p.splits,
                                   p.splits);
  const SoftmaxState<acc_t>& state = merged.state();
  if (part >= p.slices) {
    const int64_t weight_parts = p.merge_parts - p.slices;
    const int64_t len = ceil_div(p.S, weight_parts);
    const int64_t first = (part - p.slices) * len;
    write_weights(p, row, softmax_lse(state), first, std::min(p.S, first + len));
    return;
  }

  const int64_t first_chunk = part * p.slice_chunks;
  const int64_t Dv = p.Dv;
  BlockRowSum<VEC, acc_t> context(first_chunk, std::min(p.slice_chunks, Dv / VEC - first_chunk),
                                  static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  const acc_t* partials = p.ctx_acc + row * p.splits * Dv;
  context.template add<kMergeBatch>(
      p.splits, [&](int64_t k) { return merged.factor(k); },
      [&](int64_t k) { return partials + k * Dv; });
  context.combine();
  context.store(p.context + row * Dv, softmax_inv_sum(state));
  if (part == 0 && threadIdx.x == 0) p.lse[row] = softmax_lse(state);
}

}  // namespace attention_ext
