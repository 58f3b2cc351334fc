// The CUDA forward's launch plan: how many blocks work on one query row and how big they
// are. Plain C++ that every build carries: the CUDA host code plans with it, on a GPU and
// under the CUDA emulation in tests, its constants size the kernels, and
// attention_ext._C._testing.forward_plan exposes it to a test that checks the decode
// shapes fill a 132-SM GPU.
//
// One block per (row, source split, context slice), csrc/cuda/attention_forward.cuh:
//  - source splits (flash-decoding): when the rows give too few blocks to fill the GPU,
//    each row's keys are cut into `splits` chunks of `split_len` keys that run in parallel,
//    as many as fit one wave; split_merge_kernel combines them by log-sum-exp;
//  - context slices: a block keeps at most kContextChunksPerThread chunks of the context
//    per thread in registers, so values wider than the block's threads can hold are cut
//    into slices, each block recomputing the scores of its keys;
//  - key_lanes lanes score one key together, each about kScoreChunksPerLane 16-byte
//    chunks;
//  - staging: a round's key rows (and value rows, unless the values are the keys or are
//    sliced) are copied into shared memory by asynchronous copies that every thread issues
//    at once, so a round waits on one memory latency, not on one per key group and one
//    per batch of context rows. With more keys in the split than one buffer holds, two
//    buffers alternate and the next round's copies fly while this round computes. Rows too
//    wide for kMinStagedKeys keys a round are read from global memory in place.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"

namespace attention_ext {

constexpr int kForwardMaxWarps = 4;
constexpr int kForwardMaxThreads = kForwardMaxWarps * 32;
// Keys per round of a block: at most one per lane, so a warp holds a round's
// probabilities. Staged, as many as the stage holds; read in place, at most kRoundBytes of
// key rows, because the context phase reads a round's keys again when they are the values
// (the dot op without values): about 800 resident blocks x 32 KB stay within an H100's 50
// MB L2, so that second read hits it.
constexpr int kMaxRoundKeys = 32;
constexpr int kMinRoundKeys = 8;
constexpr int64_t kRoundBytes = 32 * 1024;
constexpr int kScoreChunksPerLane = 4;
// The stage's shared memory per block: with the block's other shared arrays (up to 4 KB)
// and the 1 KB the GPU reserves per block, the kTargetBlocksPerSm blocks the split plan
// counts on stay resident on an A100 (164 KB per SM) as on an H100 (228 KB).
constexpr int64_t kStageBytes = 32 * 1024;
constexpr int64_t kStageChunks = kStageBytes / 16;
constexpr int kMinStagedKeys = 4;
constexpr int kContextChunksPerThread = 4;
constexpr int64_t kMaxSplits = 64;
// Fewest keys per split: below this the merge's extra pass costs more than the splits
// save.
constexpr int64_t kMinKeysPerSplit = 8;
// Weights per thread of the merge's weight blocks: a split row's weights get
// ceil(S / (threads * kMergeWeightsPerThread)) merge blocks of their own, so a long
// source's weights are written by many blocks, each thread with a few independent loads
// in flight, and not by one block per row looping over all S.
constexpr int64_t kMergeWeightsPerThread = 4;
// Blocks per SM that the split plan fills and does not exceed, so that the grid runs in
// one wave (a second wave of a few blocks costs a whole block's latency again): the
// forward kernels are compiled for 4 resident blocks of 4 warps (__launch_bounds__, at
// most 128 registers per thread).
constexpr int kTargetBlocksPerSm = 4;

struct ForwardPlan {
  int64_t splits;        // >= 1
  int64_t split_len;     // keys per split; splits * split_len >= S
  int64_t slices;        // >= 1
  int64_t slice_chunks;  // context chunks per slice; slices * slice_chunks >= Dv chunks
  int warps;             // per block, of the forward and of the merge
  int key_lanes;         // a power of two <= 32
  int round_keys;        // keys per round of the forward's loop
  int stage_buffers;     // 0: rows read in place; 1 or 2 stage buffers of round_keys rows
  bool stage_values;     // the value rows are staged beside the key rows
  int64_t weight_parts;  // merge blocks per split row that write its weights (when asked)

  int64_t blocks(int64_t rows) const { return rows * splits * slices; }
  // The merge's blocks per row: one per context slice, then the weights' parts.
  int64_t merge_parts(bool weights) const { return slices + (weights ? weight_parts : 0); }
};

// rows = B * Tq >= 1, S >= 1; d_chunks and v_chunks: the scores' and the context's row
// lengths in chunks of the kernel's vector width (16 bytes or less); values_are_keys: the
// values are the key rows themselves (the dot op without values). forced > 0 (test hook)
// fixes the number of splits, capped by S and kMaxSplits.
inline ForwardPlan plan_forward(int64_t rows, int64_t S, int64_t d_chunks, int64_t v_chunks,
                                bool values_are_keys, int64_t sm_count, int64_t forced) {
  ForwardPlan plan{};
  plan.key_lanes = pow2_at_least(ceil_div(d_chunks, kScoreChunksPerLane), 32);
  constexpr int64_t kMaxSliceChunks = int64_t(kForwardMaxThreads) * kContextChunksPerThread;
  plan.slices = std::max<int64_t>(1, ceil_div(v_chunks, kMaxSliceChunks));

  int64_t splits = std::min({forced, S, kMaxSplits});
  if (forced <= 0) {
    const int64_t target = std::max<int64_t>(sm_count, 1) * kTargetBlocksPerSm;
    const int64_t row_blocks = rows * plan.slices;
    splits = row_blocks >= target ? 1
                                  : std::min({std::max<int64_t>(1, target / row_blocks),
                                              std::max<int64_t>(1, S / kMinKeysPerSplit),
                                              kMaxSplits});
  }
  // Recounted so that no split is left empty.
  plan.split_len = ceil_div(S, std::max<int64_t>(splits, 1));
  plan.splits = ceil_div(S, plan.split_len);

  // The stage: the whole split in one buffer when it fits, else two buffers.
  plan.stage_values = !values_are_keys && plan.slices == 1;
  const int64_t row_chunks = std::max<int64_t>(1, d_chunks + (plan.stage_values ? v_chunks : 0));
  const int64_t fit = kStageChunks / row_chunks;
  if (plan.split_len <= std::min<int64_t>(fit, kMaxRoundKeys)) {
    plan.stage_buffers = 1;
    plan.round_keys = static_cast<int>(plan.split_len);
  } else if (fit / 2 >= kMinStagedKeys) {
    plan.stage_buffers = 2;
    plan.round_keys = static_cast<int>(std::min<int64_t>(fit / 2, kMaxRoundKeys));
  } else {
    plan.stage_buffers = 0;
    plan.stage_values = false;
    plan.round_keys = static_cast<int>(std::clamp<int64_t>(
        kRoundBytes / std::max<int64_t>(1, d_chunks * 16), kMinRoundKeys, kMaxRoundKeys));
  }

  // Warps: enough that a round's keys are scored at once, and that the slice's context
  // fits kContextChunksPerThread chunks per thread; a power of two, so the context's
  // chunks and its copies over the keys tile the block (BlockRowSum).
  const int64_t round_keys = std::min<int64_t>(plan.split_len, plan.round_keys);
  const int64_t score_warps = ceil_div(round_keys * plan.key_lanes, 32);
  const int64_t slice_warps =
      ceil_div(std::min(v_chunks, kMaxSliceChunks), int64_t(32) * kContextChunksPerThread);
  plan.warps = pow2_at_least(std::max(score_warps, slice_warps), kForwardMaxWarps);
  plan.slice_chunks = int64_t(plan.warps) * 32 * kContextChunksPerThread;
  plan.weight_parts = ceil_div(S, int64_t(plan.warps) * 32 * kMergeWeightsPerThread);
  return plan;
}

}  // namespace attention_ext
