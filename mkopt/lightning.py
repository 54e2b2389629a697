"""Majority Kernels in Lightning: return ``mkopt.optim.SGD(self.parameters(), ...)`` from
``configure_optimizers`` and add :class:`MKCallback`.

Lightning builds the optimizer after it has wrapped the model (in DDP, too), so the params form
is the one that fits: the model is never rewritten, each target parameter holds the weight the
training forward reads, DDP averages ordinary N-sized gradients. Lightning's
``optimizer.step(closure)`` runs the closure as torch's optimizers do. Import it explicitly
(``import mkopt.lightning``); ``import mkopt`` never needs Lightning.

Example:
    >>> import torch, mkopt, mkopt.lightning
    >>> import lightning.pytorch as pl
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__(); self.net = torch.nn.Linear(4, 2)
    ...     def training_step(self, batch, _):
    ...         x, y = batch; return torch.nn.functional.cross_entropy(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return mkopt.optim.SGD(self.parameters(), lr=0.1, e=3)
    >>> data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    >>> trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...     enable_progress_bar=False, enable_model_summary=False, callbacks=[mkopt.lightning.MKCallback()])
    >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> trainer.optimizers[0].mk_step
    2
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError("mkopt.lightning needs Lightning 2.x: pip install lightning") from error

from .diagnostics import loggable
from .optim import MKParamOptimizer
from .optimizer import MKOptimizer

__all__ = ["MKCallback"]

MKOptimizers = (MKParamOptimizer, MKOptimizer)


def mk_optimizers(trainer: Any) -> list[MKParamOptimizer | MKOptimizer]:
    """The mkopt optimizers among ``trainer.optimizers`` (unwrapping Lightning's own wrappers)."""
    found = []
    for optimizer in trainer.optimizers:
        seen = optimizer
        for _ in range(4):
            if isinstance(seen, MKOptimizers):
                found.append(seen)
                break
            seen = getattr(seen, "optimizer", getattr(seen, "_optimizer", None))
            if seen is None:
                break
    return found


class MKCallback(pl.Callback):
    """Logs MK's diagnostics, validates at the mean of the copies, and ends fitting at the mean.

    Every ``log_every_n_steps`` optimizer steps it logs ``mk/spread`` and ``mk/collapsed`` (plus
    ``mk/p_entropy`` for the adversarial modes, ``mk/spread/<tensor>`` with ``per_tensor=True``)
    through ``pl_module.log_dict``, i.e. to whatever logger the Trainer has (TensorBoard, CSV, W&B).
    Around validation it calls ``optimizer.eval()`` / ``optimizer.train()``, so validation metrics
    are those of the deployable model; after ``fit`` the model holds the mean (save it as usual).
    """

    def __init__(self, log_every_n_steps: int = 50, per_tensor: bool = False) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} must be an int >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.per_tensor = per_tensor

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not mk_optimizers(trainer):
            raise TypeError(
                "MKCallback found no mkopt optimizer: return mkopt.optim.SGD/Adam/AdamW(self.parameters(), ...) (or "
                "mkopt.optim.wrap(cls)(...)) from configure_optimizers"
            )
        for optimizer in mk_optimizers(trainer):
            optimizer.train()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.log_every_n_steps != 0 or step == getattr(self, "_logged_step", None):
            return  # (micro-batches of one accumulated step share its global_step: log once)
        self._logged_step = step
        for index, optimizer in enumerate(mk_optimizers(trainer)):
            prefix = "mk/" if index == 0 else f"mk{index}/"
            stats = loggable(optimizer, prefix=prefix, per_tensor=self.per_tensor)
            pl_module.log_dict(stats, on_step=True, on_epoch=False, sync_dist=False)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.training or trainer.state.fn == "fit":
            for optimizer in mk_optimizers(trainer):
                optimizer.eval()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.should_stop:
            for optimizer in mk_optimizers(trainer):
                optimizer.train()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for optimizer in mk_optimizers(trainer):  # e.g. after a sanity check or a validation run
            optimizer.train()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's weights are the mean of the copies (the model that was validated and would ship);
        resuming restores the training weights from the optimizer state, which carries the copies."""
        names = {id(param): name for name, param in pl_module.named_parameters()}
        weights = checkpoint.get("state_dict", {})
        for optimizer in mk_optimizers(trainer):
            if isinstance(optimizer, MKParamOptimizer):
                for name, mean in optimizer.mean_weights(names).items():
                    if name in weights:
                        weights[name] = mean

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for optimizer in mk_optimizers(trainer):
            optimizer.eval()  # the fitted model holds the mean: evaluate, save or ship it as is
