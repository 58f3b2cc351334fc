"""Run by test_demo.py under torchrun (two processes, gloo): trains the demo's model for a
few steps with DistributedDataParallel and saves each process's parameters and losses to
OUT/rank<R>.pt, so the test can check that the replicas stayed identical."""
import sys

import torch
import torch.distributed as dist

from attention_ext.demo import dates as D
from attention_ext.demo.training import TrainConfig, build_model, train

out = sys.argv[1]
dist.init_process_group("gloo")
source, target = D.source_vocabulary(), D.target_vocabulary()
torch.manual_seed(dist.get_rank())  # different initial weights: DDP must broadcast rank 0's
model = build_model("bahdanau", source, target)
losses = []
train(model, D.DateWriter(D.split_dates()[0]), source, target,
      TrainConfig(steps=4, batch_size=16, seed=0), torch.device("cpu"),
      lambda step, loss, tokens_per_s: losses.append(loss))
torch.save({"parameters": [p.detach() for p in model.parameters()], "losses": losses},
           f"{out}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
