"""`mllm` with one injected fault, for the reliability tests: `python fault_worker.py FAULT ARGS...`.

FAULT is `kind:step:rank`:
  nan_loss     the loss of that step on that rank is NaN
  nan_grad     the loss is finite but its gradient is NaN (through the logits)
  hang         the rank sleeps for an hour inside that step (first writing the file $MLLM_FAULT_HUNG, if set)
  kill_in_save the rank SIGKILLs itself while writing that step's checkpoint (after the files, before commit)
  sigterm      the rank sends itself SIGTERM during that step (preemption)
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from mllm.modeling import causal_lm_loss_sum
from mllm.train import checkpoint, cli, objectives, trainer

KIND, STEP, RANK = sys.argv[1].split(":")[0], int(sys.argv[1].split(":")[1]), int(sys.argv[1].split(":")[2])
CURRENT = {"step": 0}


def here() -> bool:
    return CURRENT["step"] == STEP and int(os.environ.get("RANK", "0")) == RANK


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


original_step = trainer.train_step


def train_step(*args, **kwargs):
    CURRENT["step"] = kwargs.get("step", args[5] if len(args) > 5 else 0)
    return original_step(*args, **kwargs)


original_loss = objectives.LMObjective.loss


def loss(self, engine, batch):
    if here() and KIND == "hang":
        if os.environ.get("MLLM_FAULT_HUNG"):  # tells the harness to dump the stacks now
            with open(os.environ["MLLM_FAULT_HUNG"], "w") as f:
                f.write(str(os.getpid()))
        time.sleep(3600)
    if here() and KIND == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if here() and KIND in ("nan_loss", "nan_grad"):
        labels = batch.pop("labels")
        logits = engine(**batch).logits
        if KIND == "nan_grad":
            logits = NanGrad.apply(logits)
        total, _ = causal_lm_loss_sum(logits, labels)
        return (total * float("nan") if KIND == "nan_loss" else total), None
    return original_loss(self, engine, batch)


original_commit = checkpoint._commit


def commit(tmp, final, info, meta):
    if KIND == "kill_in_save" and tmp.name == f"step-{STEP:08d}.tmp" and info.rank == RANK:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_commit(tmp, final, info, meta)


trainer.train_step = train_step
objectives.LMObjective.loss = loss
checkpoint._commit = commit

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[2:]))
