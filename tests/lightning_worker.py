"""Fit a small Lightning module with mkopt.optim.SGD; save the final state of this rank to OUT/rank<r>.pt.

Run by tests/test_lightning.py as ``python tests/lightning_worker.py OUT DEVICES``; with DEVICES=2
Lightning's DDP launcher starts the second rank by running this script again.
"""

import os
import sys

import torch

import mkopt
import mkopt.lightning
import lightning.pytorch as pl


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return mkopt.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, e=3)


def data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def fit(out: str, devices: int, global_batch: int = 8, steps: int = 6) -> None:
    rank, per_rank = int(os.environ.get("LOCAL_RANK", 0)), global_batch // devices
    # rank r takes rows r*per_rank .. of every global batch: together the ranks see the one-process batches
    mine = [i for i in range(len(data())) if (i // per_rank) % devices == rank]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data(), mine), batch_size=per_rank, shuffle=False)
    module = Classifier()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        logger=pl.loggers.CSVLogger(out), enable_progress_bar=False, enable_model_summary=False,
        callbacks=[mkopt.lightning.MKCallback(log_every_n_steps=2),
                   pl.callbacks.ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=3, save_top_k=-1)],
        limit_val_batches=1, val_check_interval=3, num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, loader, torch.utils.data.DataLoader(data(16), batch_size=8))
    opt = trainer.optimizers[0]
    torch.save(
        {"copies": [c.clone() for _, c in opt.named_copies()], "params": [p.detach().clone() for p in module.parameters()],
         "step": opt.mk_step, "metrics": {k: float(v) for k, v in trainer.logged_metrics.items()}},
        f"{out}/rank{trainer.global_rank}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    fit(sys.argv[1], int(sys.argv[2]))
