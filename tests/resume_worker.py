"""Trains a fixed MLP with MKOptimizer; used by test_checkpoint.py in fresh processes.

python resume_worker.py STEPS_TOTAL LOSSES_OUT [--save-at N CKPT] [--resume CKPT]
"""

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import mkopt


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, weight_decay=0.01, seed=11)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, sched


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)


def main() -> None:
    total, out = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[3:]
    model, opt, sched = build()
    start = 0
    if args and args[0] == "--resume":
        ckpt = torch.load(args[1])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        start = ckpt["step"]
    losses = []
    for step in range(start, total):
        x, y = batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if args and args[0] == "--save-at" and step + 1 == int(args[1]):
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1}, args[2])
    json.dump({"losses": losses, "weights": [w.tolist() for w in mkopt.deploy(model).state_dict().values()]}, open(out, "w"))


if __name__ == "__main__":
    main()
