// Host-side split-S decision (flash-decoding style): when batch x query rows give too few
// warps to fill the GPU, each row's source range is cut into `splits` chunks of
// `split_len` keys that run in parallel and are merged by log-sum-exp afterwards.
// Plain C++ so the same decision runs under the CUDA emulation in tests.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_ext/math.h"

namespace attention_ext {

constexpr int64_t kMaxSplits = 32;           // the merge keeps one split per lane
constexpr int64_t kTargetWarpsPerSm = 32;    // half of an SM's 64 resident warps
// Fewest keys per split. A warp walks its keys one after another, each a chain of
// dependent loads and shuffles, so short splits are what make a decode step fast: on an
// H100 at B = 64, S = 100, D = 512, splits of 13 keys take 33 us against 107 us for the
// 50 keys of two splits; below 8 keys the merge costs more than the splits save.
constexpr int64_t kMinKeysPerWarpSplit = 8;

struct SplitPlan {
  int64_t splits;     // >= 1
  int64_t split_len;  // keys per split; splits * split_len >= S
};

// rows = B * Tq, S >= 1. forced > 0 (test knob) fixes the count, capped by S and kMaxSplits.
inline SplitPlan plan_splits(int64_t rows, int64_t S, int64_t sm_count, int64_t forced) {
  int64_t splits = std::min({forced, S, kMaxSplits});
  if (forced <= 0) {
    const int64_t target_warps = std::max<int64_t>(sm_count, 1) * kTargetWarpsPerSm;
    splits = rows >= target_warps ? 1
                                  : std::min({ceil_div(target_warps, rows),
                                              ceil_div(S, kMinKeysPerWarpSplit), kMaxSplits});
  }
  // Recounted so that no split is left empty.
  const int64_t len = ceil_div(S, std::max<int64_t>(splits, 1));
  return SplitPlan{ceil_div(S, len), len};
}

}  // namespace attention_ext
