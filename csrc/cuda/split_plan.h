// Host-side split-S decision (flash-decoding style): when batch x query rows give too few
// warps to fill the GPU, each row's source range is cut into `splits` chunks of
// `split_len` keys that run in parallel and are merged by log-sum-exp afterwards.
// Plain C++ so the same decision runs under the CUDA emulation in tests.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"

namespace attention_ext {

constexpr int64_t kMaxSplits = 32;            // the merge keeps one split per lane
constexpr int64_t kMinKeysPerWarpSplit = 64;  // below this a warp's split costs more than it saves
constexpr int64_t kTargetWarpsPerSm = 32;     // half of an SM's 64 resident warps
constexpr int64_t kKeyTile = 32;              // keys a warp scores per online-softmax step

struct SplitPlan {
  int64_t splits;     // >= 1
  int64_t split_len;  // keys per split; splits * split_len >= S
};

// rows = B * Tq, S >= 1. forced > 0 (test knob) fixes the count, capped by S and kMaxSplits.
inline SplitPlan plan_splits(int64_t rows, int64_t S, int64_t sm_count, int64_t forced) {
  int64_t splits = 1;
  if (forced > 0) {
    splits = std::min({forced, S, kMaxSplits});
    const int64_t len = ceil_div(S, splits);
    return SplitPlan{ceil_div(S, len), len};
  }
  const int64_t target_warps = std::max<int64_t>(sm_count, 1) * kTargetWarpsPerSm;
  if (rows < target_warps) {
    splits = std::min({ceil_div(target_warps, rows), ceil_div(S, kMinKeysPerWarpSplit), kMaxSplits});
    splits = std::max<int64_t>(splits, 1);
  }
  // Whole key tiles per split; recount so that no split is left empty.
  const int64_t len = ceil_div(ceil_div(S, splits), kKeyTile) * kKeyTile;
  return SplitPlan{ceil_div(S, len), len};
}

}  // namespace attention_ext
