"""The demo's model, its training loop (one process, or DistributedDataParallel under
torchrun) and its evaluation."""
from __future__ import annotations

import copy
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..nn import set_implementation
from ..seq2seq import BahdanauDecoder, Encoder, LuongDecoder, Seq2Seq, Vocabulary
from . import ATTENTIONS
from .dates import TARGET_LENGTH, DateWriter, Example, decode_target, encode_batch

EMBED_DIM = 64
HIDDEN_SIZE = 192
CELL = "gru"


def build_model(attention: str, source: Vocabulary, target: Vocabulary) -> Seq2Seq:
    """A bidirectional GRU encoder over characters and a GRU decoder with the fused
    attention that ``attention`` names."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    encoder = Encoder(len(source), EMBED_DIM, HIDDEN_SIZE, cell=CELL)
    if attention == "bahdanau":
        decoder = BahdanauDecoder(len(target), EMBED_DIM, HIDDEN_SIZE, cell=CELL,
                                  attention_units=HIDDEN_SIZE // 2)
    else:
        decoder = LuongDecoder(len(target), EMBED_DIM, HIDDEN_SIZE, cell=CELL,
                               score=attention.split("-", 1)[1])
    return Seq2Seq(encoder, decoder, bos_idx=target.bos_idx, eos_idx=target.eos_idx)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int  # in all, over the processes
    seed: int
    lr: float = 3e-3
    warmup: int = 30
    clip: float = 1.0


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a cosine decay to 5% of lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))


class TeacherForcedLoss(nn.Module):
    """model.loss as a module's forward: DistributedDataParallel synchronises the gradients
    of what runs through the forward of the module it wraps."""

    def __init__(self, model: Seq2Seq):
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        return self.model.loss(batch.src, batch.src_lengths, batch.tgt, batch.tgt_lengths)


def batch_tokens(batch) -> int:
    """Source and target tokens of a batch (the end tokens included): what tokens/s
    counts."""
    return int(batch.src_lengths.sum()) + int(batch.tgt_lengths.sum()) + len(batch.tgt_lengths)


def train(model: Seq2Seq, writer: DateWriter, source: Vocabulary, target: Vocabulary,
          cfg: TrainConfig, device: torch.device,
          progress: Optional[Callable[[int, float, float], None]] = None) -> None:
    """Trains model in place for cfg.steps steps of fresh examples. Under torchrun (a
    process group is initialised) every process draws its own share of each batch and
    DistributedDataParallel averages the gradients, so the replicas stay identical.
    ``progress(step, loss, tokens_per_s)`` is called after every step."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng = random.Random(cfg.seed * 1_000_003 + rank)
    per_process = max(1, cfg.batch_size // world)
    objective = TeacherForcedLoss(model)
    net = DistributedDataParallel(objective) if world > 1 else objective
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for step in range(cfg.steps):
        start = time.perf_counter()
        batch = encode_batch(writer.examples(per_process, rng), source, target).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss = net(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        if progress is not None:
            progress(step, loss.item(), batch_tokens(batch) * world /
                     (time.perf_counter() - start))
    model.eval()


@torch.no_grad()
def predict(model: Seq2Seq, examples: Sequence[Example], source: Vocabulary,
            target: Vocabulary, device: torch.device, beam_size: int = 0,
            batch_size: int = 512) -> List[str]:
    """ISO strings predicted for examples: greedy decoding, or beam search of beam_size."""
    out: List[str] = []
    for i in range(0, len(examples), batch_size):
        batch = encode_batch(examples[i:i + batch_size], source, target).to(device)
        if beam_size:
            result = model.beam_search(batch.src, batch.src_lengths, beam_size=beam_size,
                                       max_len=TARGET_LENGTH)
            out += [decode_target(h[0].tolist(), target) for h in result.hypotheses]
        else:
            tokens = model.greedy_decode(batch.src, batch.src_lengths, max_len=TARGET_LENGTH)
            out += [decode_target(row, target) for row in tokens.tolist()]
    return out


def compare_training_speed(model: Seq2Seq, batches: Sequence) -> dict:
    """Training tokens/s of copies of model with the fused and with the reference (eager)
    attention, the same batches, steps interleaved in alternating order (the first of each
    a warm-up), medians."""
    runs = {}
    for name in ("fused", "reference"):
        net = set_implementation(copy.deepcopy(model), name).train()
        runs[name] = (TeacherForcedLoss(net), torch.optim.Adam(net.parameters(), lr=1e-4), [])
    for i, batch in enumerate(batches):
        order = list(runs.values())
        for objective, optimizer, seconds in order[::-1] if i % 2 else order:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            objective(batch).backward()
            optimizer.step()
            if batch.src.is_cuda:
                torch.cuda.synchronize(batch.src.device)
            seconds.append(time.perf_counter() - start)
    return {name: statistics.median(batch_tokens(b) / s for b, s in zip(batches[1:], sec[1:]))
            for name, (_, _, sec) in runs.items()}
