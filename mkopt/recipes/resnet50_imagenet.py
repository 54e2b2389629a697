"""ResNet-50 on ImageNet (paper section 5.2, Table 2): BASELINE, BASELINE-LONG, MK, Adv-MK, ENSEMBLE, DISTILLED.

Usage (each YAML header has its full launch command):
    python mkopt/recipes/resnet50_imagenet.py --config mkopt/recipes/configs/resnet50_imagenet/mk.yaml data.root=/data/imagenet out=/ckpt/mk
    torchrun --nproc_per_node=8 mkopt/recipes/resnet50_imagenet.py --config ... [key=value ...]

Overrides are dotted ``key=value`` pairs (values parsed as YAML: ``schedule.milestones=[30,60]``).
On SLURM, submit ``mkopt.job.RecipeJob("mkopt/recipes/resnet50_imagenet.py", config)`` (what ``main`` runs
in-process): ranks come from submitit, a preemption signal checkpoints at the next step boundary
and requeues, and the requeued job resumes from ``<out>/checkpoints`` with the same data order.

Outputs in ``out``: ``config.yaml``, ``log.csv`` (one row per epoch, rewritten atomically from the
checkpointed history), ``checkpoints/`` (see :mod:`mkopt.checkpoint`), ``model_deployed.pt`` (a
plain state_dict that loads into ``torchvision.models.resnet50(num_classes=..., width_per_group=...)``
with ``strict=True``; for MK the mean of the copies, via ``mkopt.deploy``) and ``result.json``.
"""

from __future__ import annotations

import argparse
import sys
import contextlib
import copy
import csv
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from tqdm import tqdm

import mkopt
from mkopt.checkpoint import CheckpointStore, atomic_save, atomic_write, capture_training_state, restore_training_state
from mkopt.distributed import (
    DistributedContext, average_probability_grads, cleanup, setup_distributed, unwrap, wrap_model,
)  # fmt: skip
from mkopt.losses import distillation_loss
from mkopt import config as mkopt_config
from mkopt.diagnostics import loggable
from mkopt.errors import ConfigError
from mkopt.job import PreemptionGuard, RecipeJob, preemption_signal
from mkopt.resumable import EpochBatches, SeededSamples, shard

METHODS = ("baseline", "mk", "distilled", "ensemble")
AMP_MODES = ("auto", "bf16", "fp16", "off")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CSV_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "top1", "top5", "train_top1", "train_top5", "train_eval_loss",
               "mk/spread", "mk/collapsed", "epoch_seconds", "images_per_second")  # fmt: skip
TRAIN_SAMPLE_SEED = 0  # the same training images for every run and seed, so train-test gaps compare (Fig. 5.2)
# Keys that may change between a run and its resumption (paths, machine, logging); all others must match.
RUNTIME_KEYS = ("out", "data.root", "data.workers", "data.eval_batch", "device", "log", "checkpoint", "debug", "ensemble")


# -- configuration ---------------------------------------------------------------------------------
# The schema of the YAML configs (mkopt's one config system: typed, nested, unknown keys refused).
@dataclass
class DataConfig:
    root: Optional[str] = None
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int = 224
    eval_resize: int = 256
    eval_batch: int = 256
    workers: int = 8
    train_eval_samples: int = 0  # fixed training images scored at every validation (Fig. 5.2's train curve); 0: off


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    num_classes: int = 1000
    width_per_group: int = 64
    channels_last: bool = True
    sync_bn: bool = False


@dataclass
class OptimConfig:
    batch_size: int = 256
    lr_per_256: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    epochs: int = 90
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1


@dataclass
class MKConfig:
    e: int = 3
    probabilities: str = "dirichlet"
    init: str = "replicate"
    lr_compensation: bool = False  # the paper runs MK on BASELINE-LONG unchanged; mk_lr_compensation.yaml is the ablation
    adversarial_eps: float = 1e5  # mkopt.adversarial.DEFAULT_ADVERSARIAL_EPS (results/adversarial_eps.md)
    sampler_compile: Optional[bool] = None


@dataclass
class DistillConfig:
    teachers: list[str] = field(default_factory=list)
    temperature: float = 4.0
    alpha: float = 0.9


@dataclass
class EnsembleConfig:
    members: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    every_minutes: float = 30.0
    keep: int = 2


@dataclass
class LogConfig:
    progress: bool = True
    progress_interval: float = 10.0
    postfix_every: int = 50
    tensorboard: bool = False


@dataclass
class DebugConfig:
    signal_at_step: Optional[int] = None


@dataclass
class ResNet50Config:
    method: str = "mk"
    seed: int = 0
    out: Optional[str] = None
    device: str = "auto"
    amp: Union[str, bool] = "auto"  # YAML 1.1 reads a bare `off` as false: validate() maps it back
    amp_init_scale: float = 65536.0
    deterministic: bool = False
    eval_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mk: MKConfig = field(default_factory=MKConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML config with dotted ``key=value`` overrides applied (types checked against
    :class:`ResNet50Config` by :func:`mkopt.config.load_config`), paths made absolute, values validated.

    Returns a plain nested dict (what checkpoints record and :class:`mkopt.job.RecipeJob` pickles).
    """
    config = asdict(mkopt_config.load_config(ResNet50Config, path, overrides))
    if config.get("out"):
        config["out"] = str(Path(config["out"]).expanduser().resolve())
    if config["data"].get("root"):
        config["data"]["root"] = str(Path(config["data"]["root"]).expanduser().resolve())
    for section, key in (("ensemble", "members"), ("distill", "teachers")):
        config[section][key] = [str(Path(p).expanduser().resolve()) for p in config[section][key]]
    try:
        validate(config)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a config's values (types are checked on loading); raises ``ValueError`` naming the key and what to do."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"config: {message}")

    if cfg.get("amp") is False:  # YAML 1.1 reads a bare `off` as false
        cfg["amp"] = "off"
    need(cfg.get("method") in METHODS, f"method={cfg.get('method')!r}: choose one of {METHODS}")
    need(bool(cfg.get("out")) and Path(cfg["out"]).is_absolute(), f"out={cfg.get('out')!r} must be an absolute path (the run's folder)")
    need(cfg["amp"] in AMP_MODES, f"amp={cfg['amp']!r}: choose one of {AMP_MODES}")
    need(cfg["model"]["arch"] == "resnet50", f"model.arch={cfg['model']['arch']!r}: this recipe trains torchvision's resnet50")
    # Numeric keys are also checked here (a config built in Python skips the loader's type checks).
    optim, schedule = cfg["optim"], cfg["schedule"]
    batch = optim["batch_size"]
    need(_is_int(batch) and batch > 0, f"optim.batch_size={batch!r} must be a positive int (the global batch)")
    need(_is_number(optim["lr_per_256"]) and optim["lr_per_256"] > 0, f"optim.lr_per_256={optim['lr_per_256']!r} must be a positive number")
    for key in ("momentum", "weight_decay"):
        need(_is_number(optim[key]) and optim[key] >= 0, f"optim.{key}={optim[key]!r} must be a number >= 0")
    need(_is_int(schedule["epochs"]) and schedule["epochs"] > 0, f"schedule.epochs={schedule['epochs']!r} must be a positive int")
    need(_is_number(schedule["gamma"]) and schedule["gamma"] > 0, f"schedule.gamma={schedule['gamma']!r} must be a positive number (the LR factor at each milestone)")
    milestones = schedule["milestones"]
    need(isinstance(milestones, list) and all(_is_int(m) for m in milestones), f"schedule.milestones={milestones!r} must be a list of ints (epochs)")
    need(all(0 < m < schedule["epochs"] for m in milestones), f"schedule.milestones={milestones} must lie inside (0, {schedule['epochs']})")
    need(cfg["mk"]["probabilities"] in mkopt.PROBABILITY_MODES, f"mk.probabilities={cfg['mk']['probabilities']!r}: choose one of {mkopt.PROBABILITY_MODES}")
    if cfg["method"] == "ensemble":
        need(len(cfg["ensemble"]["members"]) >= 2, "method=ensemble needs ensemble.members: two or more model_deployed.pt files (or run folders)")
    if cfg["method"] == "distilled":
        need(len(cfg["distill"]["teachers"]) >= 1, "method=distilled needs distill.teachers: the ensemble members' model_deployed.pt files")
    need(bool(cfg["data"]["root"]), "data.root is not set: pass data.root=/path/to/imagenet (with train/ and val/)")
    samples = cfg["data"]["train_eval_samples"]
    need(samples >= 0, f"data.train_eval_samples={samples!r} must be an int >= 0 (0: no train accuracy)")
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trajectory_keys(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The flattened config minus :data:`RUNTIME_KEYS`: what a resumed run must share with the saved one."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = prefix + key
        if name in RUNTIME_KEYS:
            continue
        if isinstance(value, dict):
            flat.update(trajectory_keys(value, name + "."))
        else:
            flat[name] = value
    return flat


# -- building blocks ---------------------------------------------------------------------------------
def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if amp == "auto":
        if device.type != "cuda":
            return None, False
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True), "off": (None, False)}[amp]


def build_model(cfg: dict[str, Any]) -> nn.Module:
    spec = cfg["model"]
    return torchvision.models.resnet50(num_classes=spec["num_classes"], width_per_group=spec["width_per_group"])


def build_optimizer(cfg: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    optim = cfg["optim"]
    kwargs = dict(
        lr=optim["lr_per_256"] * optim["batch_size"] / 256, momentum=optim["momentum"],
        weight_decay=optim["weight_decay"], nesterov=optim["nesterov"],
    )  # fmt: skip
    if cfg["method"] != "mk":
        return torch.optim.SGD(model.parameters(), **kwargs)
    mk = cfg["mk"]
    return mkopt.MKOptimizer(
        torch.optim.SGD, model, e=mk["e"], seed=cfg["seed"], init=mk["init"], probabilities=mk["probabilities"],
        adversarial_eps=mk["adversarial_eps"], lr_compensation=mk["lr_compensation"],
        sampler_compile=mk["sampler_compile"], **kwargs,
    )  # fmt: skip


def train_transform(size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])  # fmt: skip


def eval_transform(size: int, resize: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def image_folder(cfg: dict[str, Any], split: str, transform: Any) -> torchvision.datasets.ImageFolder:
    root = Path(cfg["data"]["root"]) / cfg["data"][f"{split}_dir"]
    if not root.is_dir():
        raise FileNotFoundError(f"{split} images: {root} is not a directory (ImageFolder layout: {root}/<class>/<image>)")
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    if len(dataset.classes) != cfg["model"]["num_classes"]:
        raise ValueError(f"{root} has {len(dataset.classes)} classes but model.num_classes={cfg['model']['num_classes']}")
    return dataset


def load_member(cfg: dict[str, Any], path: str | os.PathLike, device: torch.device) -> nn.Module:
    """A deployed ResNet-50 (``model_deployed.pt``, or a run folder holding one), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "model_deployed.pt"
    if not path.is_file():
        raise FileNotFoundError(f"ensemble/teacher member {path} does not exist: train it with baseline_long.yaml first")
    model = build_model(cfg)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit resnet50(num_classes={cfg['model']['num_classes']}, "
                         f"width_per_group={cfg['model']['width_per_group']}): {error}") from error  # fmt: skip
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if cfg["model"]["channels_last"] else model


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(models: list[nn.Module], loader: DataLoader, ctx: DistributedContext, amp: torch.dtype | None, channels_last: bool) -> dict[str, float]:
    """Top-1/top-5 and NLL of the members' averaged softmax over this rank's shard, summed over ranks."""
    for model in models:
        model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # correct@1, correct@5, nll, count
    for x, y in loader:
        x = x.to(ctx.device, non_blocking=True, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        y = y.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, amp):
            probs = torch.stack([m(x).float().softmax(-1) for m in models]).mean(0)
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices
        hits = top.eq(y[:, None])
        nll = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().sum()
        totals += torch.stack([hits[:, :1].sum(), hits.sum(), nll, torch.tensor(len(y), device=ctx.device)]).double()
    if ctx.distributed:
        dist.all_reduce(totals)
    count = max(float(totals[3]), 1.0)
    return {"top1": float(totals[0]) / count, "top5": float(totals[1]) / count, "val_loss": float(totals[2]) / count}


def val_loader(cfg: dict[str, Any], ctx: DistributedContext) -> DataLoader:
    data = cfg["data"]
    dataset = image_folder(cfg, "val", eval_transform(data["image_size"], data["eval_resize"]))
    return DataLoader(
        Subset(dataset, shard(len(dataset), ctx.rank, ctx.world_size)), batch_size=data["eval_batch"],
        num_workers=data["workers"], pin_memory=ctx.device.type == "cuda",
    )  # fmt: skip


def train_sample_loader(cfg: dict[str, Any], ctx: DistributedContext) -> DataLoader | None:
    """``data.train_eval_samples`` fixed training images with the *eval* transform (None if 0): the deployed
    (eval-mode) model's train accuracy on them against its val accuracy is Fig. 5.2's train-test gap."""
    data = cfg["data"]
    count = data["train_eval_samples"]
    if count == 0:
        return None
    dataset = image_folder(cfg, "train", eval_transform(data["image_size"], data["eval_resize"]))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(TRAIN_SAMPLE_SEED))[:count].sort().values
    mine = chosen[shard(len(chosen), ctx.rank, ctx.world_size)].tolist()
    return DataLoader(Subset(dataset, mine), batch_size=data["eval_batch"], num_workers=data["workers"], pin_memory=ctx.device.type == "cuda")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


# -- training ----------------------------------------------------------------------------------------
class Training:
    """One training run (baseline, MK/Adv-MK or distilled), resumable from its checkpoint folder."""

    def __init__(self, cfg: dict[str, Any], ctx: DistributedContext, job: RecipeJob | None) -> None:
        self.cfg, self.ctx, self.job = cfg, ctx, job
        self.out = Path(cfg["out"])
        device = ctx.device
        torch.manual_seed(cfg["seed"])
        self.amp, use_scaler = amp_settings(cfg["amp"], device)
        self.channels_last = cfg["model"]["channels_last"]
        model = build_model(cfg)
        if cfg["model"]["sync_bn"] and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # before MK: the [e, ...] stacks are 5-D
        self.model = model
        self.opt = build_optimizer(cfg, model)  # expands an MK model: before the DDP wrap
        self.adversarial = getattr(self.opt, "adversarial", False)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, cfg["schedule"]["milestones"], cfg["schedule"]["gamma"])
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg["amp_init_scale"], enabled=use_scaler)
        self.net = wrap_model(model, ctx)
        distill = cfg["distill"]
        self.teachers = [load_member(cfg, p, device) for p in distill["teachers"]] if cfg["method"] == "distilled" else []
        data = cfg["data"]
        self.train_set = SeededSamples(image_folder(cfg, "train", train_transform(data["image_size"])), cfg["seed"])
        self.val = val_loader(cfg, ctx)
        self.train_sample = train_sample_loader(cfg, ctx)
        if cfg["optim"]["batch_size"] % ctx.world_size:
            raise ValueError(f"optim.batch_size={cfg['optim']['batch_size']} does not split over {ctx.world_size} ranks")
        self.store = CheckpointStore(self.out / "checkpoints", keep=cfg["checkpoint"]["keep"])
        self.progress: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "loss_count": 0}
        self.history: list[dict[str, Any]] = []
        self.consistent = True
        self.last_save = time.monotonic()
        self.resumed_from: str | None = None
        self._resume()

    # checkpoints
    def _resume(self) -> None:
        loaded = self.store.load_latest(map_location=self.ctx.device)
        if loaded is None:
            return
        state, path = loaded
        saved, now = trajectory_keys(state["extra"]["config"]), trajectory_keys(self.cfg)
        changed = {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)}
        if changed:
            raise ValueError(
                f"{path} was written by a run with another config: {changed} (saved, now). Resume with the saved "
                f"config, or point out= at a new folder to start over"
            )
        self.progress = restore_training_state(state, unwrap(self.net), self.opt, scheduler=self.sched, scaler=self.scaler)
        self.history = list(state["extra"]["history"])
        self.resumed_from = str(path)
        if self.ctx.is_main:
            print(f"resumed from {path} (epoch {self.progress['epoch']}, step {self.progress['step']})", flush=True)

    def save(self) -> None:
        """Rank 0 writes the full training state (other ranks hold the same state)."""
        if not self.ctx.is_main:
            return
        progress = {**self.progress, "loss_sum": float(self.progress["loss_sum"])}  # the running sum (over all ranks) is a tensor
        state = capture_training_state(
            unwrap(self.net), self.opt, scheduler=self.sched, scaler=self.scaler, progress=progress,
            config=self.cfg, history=self.history,
        )  # fmt: skip
        self.store.save(state, self.progress["step"])
        self.last_save = time.monotonic()

    def save_if_consistent(self) -> None:
        """``RecipeJob.checkpoint``'s saver: never a state from the middle of a step."""
        if self.consistent:
            self.save()
        else:
            warnings.warn(
                f"preempted in the middle of step {self.progress['step'] + 1}: not saving a half-updated state; the "
                "requeued run resumes from the last checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )

    # the loop
    def fit(self) -> dict[str, Any]:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", lambda f: f.write(yaml.safe_dump(self.cfg, sort_keys=False).encode()))
        if self.job is not None:
            self.job.attach(self.save_if_consistent)
        try:
            with PreemptionGuard() as guard:
                while self.progress["epoch"] < self.cfg["schedule"]["epochs"]:
                    self.train_epoch(guard)
                    self.end_epoch()
                    guard.check()
        finally:
            if self.job is not None:
                self.job.attach(None)
        return self.finish()

    def train_epoch(self, guard: PreemptionGuard) -> None:
        cfg, ctx = self.cfg, self.ctx
        epoch, start = self.progress["epoch"], self.progress["batch"]
        order = EpochBatches(
            len(self.train_set), cfg["optim"]["batch_size"], cfg["seed"], epoch, ctx.rank, ctx.world_size, start=start
        )
        loader = DataLoader(
            self.train_set, batch_sampler=order, num_workers=cfg["data"]["workers"], pin_memory=ctx.device.type == "cuda"
        )
        self.net.train()
        loss_sum = torch.tensor(self.progress["loss_sum"], dtype=torch.float64, device=ctx.device)
        bar = tqdm(
            total=order.batches_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg['schedule']['epochs']}",
            disable=not (ctx.is_main and cfg["log"]["progress"]), dynamic_ncols=True, mininterval=cfg["log"]["progress_interval"],
        )  # fmt: skip
        self.epoch_start, self.epoch_images = time.monotonic(), 0
        for x, y in loader:
            x = x.to(ctx.device, non_blocking=True, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
            y = y.to(ctx.device, non_blocking=True)
            self.consistent = False
            loss = self.train_step(x, y)
            step_loss = loss.double()
            if ctx.distributed:
                # Sum the step's loss over ranks now (8 bytes, no host sync on NCCL), so loss_sum is the
                # global running sum, the same on every rank: a checkpoint from rank 0 alone (a
                # preemption save runs on rank 0 only, where a collective would hang) then carries the
                # whole epoch's sum, and every rank resumes with it.
                dist.all_reduce(step_loss)
            loss_sum += step_loss
            self.progress["batch"] += 1
            self.progress["step"] += 1
            self.progress["loss_count"] += 1
            self.progress["loss_sum"] = loss_sum  # summed over ranks; a tensor until saved: no device sync per step
            self.consistent = True
            self.epoch_images += len(y) * ctx.world_size
            bar.update(1)
            if self.progress["step"] % cfg["log"]["postfix_every"] == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{self.opt.param_groups[0]['lr']:.4g}")
            if self.progress["step"] == cfg["debug"]["signal_at_step"]:
                os.kill(os.getpid(), preemption_signal())  # fault injection: act as if SLURM preempted us here
            if time.monotonic() - self.last_save > 60 * cfg["checkpoint"]["every_minutes"]:
                self.save()
            guard.check()
        bar.close()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt, scaler = self.opt, self.scaler
        teacher = self.teacher_probs(x) if self.teachers else None
        opt.zero_grad(set_to_none=True)  # MK adversarial modes: also arms the probe pass (p = 1/e)
        if self.adversarial:
            with self.net.no_sync() if self.ctx.distributed else contextlib.nullcontext():
                scaler.scale(self.loss(x, y, teacher)).backward()  # probe: records dL/dp, no all-reduce
            average_probability_grads(opt)  # every rank ascends on the global batch's dL/dp
            opt.ascend_probabilities(scaler)
        loss = self.loss(x, y, teacher)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    def loss(self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        with autocast(self.ctx.device, self.amp):
            logits = self.net(x)
        logits = logits.float()
        if teacher is None:
            return F.cross_entropy(logits, y)
        return distillation_loss(logits, teacher, y, self.cfg["distill"]["temperature"], self.cfg["distill"]["alpha"])

    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        temperature = self.cfg["distill"]["temperature"]
        with autocast(self.ctx.device, self.amp):
            logits = [t(x).float() for t in self.teachers]
        return torch.stack([(z / temperature).softmax(-1) for z in logits]).mean(0)

    def end_epoch(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        epoch = self.progress["epoch"] + 1
        lr = self.opt.param_groups[0]["lr"]
        # loss_sum is already summed over ranks (every step, see train_epoch); loss_count counts one rank's steps
        train_loss = float(self.progress["loss_sum"]) / max(self.progress["loss_count"] * ctx.world_size, 1)
        self.sched.step()
        row: dict[str, Any] = {"epoch": epoch, "step": self.progress["step"], "lr": lr, "train_loss": train_loss}
        if epoch % cfg["eval_every"] == 0 or epoch == cfg["schedule"]["epochs"]:
            row.update(evaluate([unwrap(self.net)], self.val, ctx, self.amp, self.channels_last))
            if self.train_sample is not None:
                sampled = evaluate([unwrap(self.net)], self.train_sample, ctx, self.amp, self.channels_last)
                row.update(train_top1=sampled["top1"], train_top5=sampled["top5"], train_eval_loss=sampled["val_loss"])
        if isinstance(self.opt, mkopt.MKOptimizer):  # copy spread, collapse, p entropy: CSV, TensorBoard, stdout
            row.update(loggable(self.opt))
        seconds = time.monotonic() - self.epoch_start
        row.update(epoch_seconds=seconds, images_per_second=self.epoch_images / max(seconds, 1e-9))
        self.history.append(row)
        self.progress.update(epoch=epoch, batch=0, loss_sum=0.0, loss_count=0)
        if ctx.is_main:
            write_csv(self.out / "log.csv", self.history)
            log_tensorboard(cfg, self.out, row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        self.save()

    def finish(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        model = unwrap(self.net).eval()
        plain = mkopt.deploy(model) if mkopt.is_expanded(model) else model
        state = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
        check = build_model(cfg)
        check.load_state_dict(state, strict=True)  # the promise: loads into torchvision's resnet50 unchanged
        result = {
            "method": cfg["method"], "seed": cfg["seed"], "epochs": self.progress["epoch"], "steps": self.progress["step"],
            "final": self.history[-1] if self.history else {}, "deployed": str(self.out / "model_deployed.pt"),
            "parameters_deployed": sum(p.numel() for p in check.parameters()), "world_size": ctx.world_size,
            "mk": {k: cfg["mk"][k] for k in ("e", "probabilities", "lr_compensation", "adversarial_eps")} if cfg["method"] == "mk" else None,
        }  # fmt: skip
        if ctx.is_main:
            atomic_save(state, self.out / "model_deployed.pt")
            write_json(self.out / "result.json", result)
        if ctx.distributed:
            dist.barrier()
        return result


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def log_tensorboard(cfg: dict[str, Any], out: Path, row: dict[str, Any]) -> None:
    if not cfg["log"]["tensorboard"]:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("log.tensorboard=true needs the tensorboard package: pip install tensorboard (or set log.tensorboard=false)") from error
    with SummaryWriter(str(out / "tensorboard")) as writer:
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key, value, row["epoch"])


def evaluate_ensemble(cfg: dict[str, Any], ctx: DistributedContext) -> dict[str, Any]:
    """ENSEMBLE: the members' averaged softmax on the validation set (no training)."""
    members = [load_member(cfg, p, ctx.device) for p in cfg["ensemble"]["members"]]
    amp, _ = amp_settings(cfg["amp"], ctx.device)
    start = time.monotonic()
    metrics = evaluate(members, val_loader(cfg, ctx), ctx, amp, cfg["model"]["channels_last"])
    result = {"method": "ensemble", "members": [str(p) for p in cfg["ensemble"]["members"]], "final": metrics}
    if ctx.is_main:
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "log.csv", [{"epoch": 0, "step": 0, **metrics, "epoch_seconds": time.monotonic() - start}])
        write_json(out / "result.json", result)
    return result


def run(config: dict[str, Any], job: RecipeJob | None = None) -> dict[str, Any]:
    """Run one config (the ``RecipeJob`` entry point); resumes from ``<out>/checkpoints`` if present."""
    cfg = validate(copy.deepcopy(config))
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA's first cuBLAS call
    ctx = setup_distributed(device=None if cfg["device"] == "auto" else cfg["device"])
    saved_flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(cfg["deterministic"])
    torch.backends.cudnn.benchmark = not cfg["deterministic"]
    try:
        if cfg["method"] == "ensemble":
            return evaluate_ensemble(cfg, ctx)
        return Training(cfg, ctx, job).fit()
    finally:
        torch.use_deterministic_algorithms(saved_flags[0])
        torch.backends.cudnn.benchmark = saved_flags[1]
        if ctx.source != "existing":
            cleanup()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="mkopt/recipes/configs/resnet50_imagenet/<variant>.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value pairs, e.g. optim.batch_size=512 data.workers=16")
    args = parser.parse_args(argv)
    return RecipeJob(__file__, load_config(args.config, args.overrides))()


if __name__ == "__main__":
    from mkopt.errors import exit_on_user_error

    sys.exit(exit_on_user_error(main, "resnet50_imagenet.py"))
