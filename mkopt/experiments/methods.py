"""The methods of the paper's Table 1, as reusable trainers over in-memory data.

Every method exposes the same shape: build from a :class:`RunSpec`, train with minibatches of
``spec.batch`` for ``spec.epochs`` epochs (one shared loop), and predict class probabilities.

- ``baseline`` / ``baseline-long``: the plain network (the sweep gives baseline-long MK's epochs);
- ``mk`` / ``adv-mk``: :class:`mkopt.MKOptimizer` (Dirichlet / Algorithm B.2), evaluated through
  the deployed (mean) kernels;
- ``ensemble``: ``e`` independently initialized networks trained together as one batched model
  with ``torch.func.stack_module_state`` + ``vmap`` (the loss is the sum of the members' losses, so
  each member follows exactly its own gradient); predictions average the members' probabilities;
- ``distilled``: the plain network trained on ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``
  (Hinton et al. 2015) with the ensemble as teacher; T = 4, alpha = 0.9;
- ``subset``: Algorithm D.1 (see :mod:`mkopt.experiments.subset`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import mkopt

from ..data import Split
from ..diagnostics import adversarial_statistics
from .models import ARCHS, arch
from .runs import RunSpec
from .subset import select_rows

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {}),  # plain SGD, as in the paper's section 5.1
}
LR_BASE: dict[str, float] = {"adam": 0.001, "sgd": 0.025}
LR_GRID: dict[str, list[float]] = {o: [base * 1.5**i for i in range(-4, 6)] for o, base in LR_BASE.items()}  # the paper's grid
DISTILL_TEMPERATURE = 4.0
DISTILL_ALPHA = 0.9


def make_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[spec.optimizer]
    return cls(params, lr=spec.lr, **kwargs)


class Trainee:
    """What the shared loop needs: one training step, and class probabilities for evaluation."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parameters_deployed(self) -> int:
        raise NotImplementedError

    def records(self) -> dict[str, Any]:
        """Method-specific measurements taken during training, stored with the run's result."""
        return {}


class Plain(Trainee):
    def __init__(self, spec: RunSpec, inputs: int, classes: int, loss: Callable | None = None) -> None:
        torch.manual_seed(spec.seed)
        self.model = arch(spec.arch, inputs, classes)
        self.opt = make_optimizer(spec, self.model.parameters())
        self.loss = loss

    def step(self, x, y):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = self.loss(logits, x, y) if self.loss else F.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def probabilities(self, x):
        self.model.eval()
        return self.model(x).softmax(-1)

    def parameters_deployed(self):
        return sum(p.numel() for p in self.model.parameters())


class MajorityKernels(Plain):
    """MK / Adv-MK; options: ``init`` (copies), ``eps`` (Adv-MK's ascent step; the library default otherwise).

    Adv-MK records :func:`mkopt.diagnostics.adversarial_statistics` every ``ADVERSARIAL_EVERY`` steps
    (what the ascent does to ``p``: without it "Adv-MK ~ MK" says nothing about B.2).
    """

    ADVERSARIAL_EVERY = 25

    def __init__(self, spec: RunSpec, inputs: int, classes: int) -> None:
        torch.manual_seed(spec.seed)
        self.model = arch(spec.arch, inputs, classes)
        cls, kwargs = OPTIMIZERS[spec.optimizer]
        self.adversarial = spec.method == "adv-mk"
        eps = spec.option("eps")
        if eps is not None:
            kwargs = {**kwargs, "adversarial_eps": float(eps)}
        self.opt = mkopt.MKOptimizer(
            cls, self.model, e=spec.e, lr=spec.lr, seed=spec.seed, init=spec.option("init", "replicate"),
            probabilities="adv-mk" if self.adversarial else "dirichlet", **kwargs,
        )  # fmt: skip
        self.loss = None
        self.steps = 0
        self.adversarial_trace: list[dict[str, float]] = []

    def step(self, x, y):
        if not self.adversarial:
            return super().step(x, y)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()  # probe at p = 1/e
        measure = self.steps % self.ADVERSARIAL_EVERY == 0
        if measure:
            stats = {"step": float(self.steps), **adversarial_statistics(self.opt)}
        self.opt.ascend_probabilities()
        if measure:
            stats["p_entropy"] = float(self.opt.last_p_entropy)  # the p B.2 trains with (mixed with Dirichlet)
            self.adversarial_trace.append(stats)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.steps += 1
        return float(loss.detach())

    def parameters_deployed(self):
        return sum(p.numel() for p in mkopt.deploy(self.model).parameters())

    def records(self) -> dict[str, Any]:
        if not self.adversarial:
            return {}
        return {"adversarial": {"eps": self.opt.adversarial_eps, "every": self.ADVERSARIAL_EVERY, "trace": self.adversarial_trace}}


class Ensemble(Trainee):
    """``e`` members as one batched model: ``vmap`` over stacked parameters."""

    def __init__(self, spec: RunSpec, inputs: int, classes: int) -> None:
        members = []
        for k in range(spec.e):
            torch.manual_seed(member_seed(spec.seed, k))
            members.append(arch(spec.arch, inputs, classes))
        self.template = copy.deepcopy(members[0]).to("meta")
        params, buffers = stack_module_state(members)
        self.params = {name: nn.Parameter(value) for name, value in params.items()}
        self.buffers = buffers
        self.opt = make_optimizer(spec, list(self.params.values()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        def one(params, buffers, inputs):
            return functional_call(self.template, (params, buffers), (inputs,))

        return torch.vmap(one, in_dims=(0, 0, None))(self.params, self.buffers, x)  # [e, n, classes]

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        logits = self.logits(x)
        # sum over members of each member's mean loss: member k's gradient is exactly its own
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="sum") / len(y)
        loss.backward()
        self.opt.step()
        return float(loss) / logits.shape[0]

    @torch.no_grad()
    def probabilities(self, x):
        return self.logits(x).softmax(-1).mean(0)

    def parameters_deployed(self):
        return sum(p.numel() for p in self.params.values())  # all e members are needed at inference


def member_seed(seed: int, k: int) -> int:
    return seed * 1000 + k


def distillation_loss(student_logits, teacher_probs, y, temperature=DISTILL_TEMPERATURE, alpha=DISTILL_ALPHA):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)`` (Hinton et al. 2015).

    ``teacher_probs`` are the teacher's probabilities at temperature T (for an ensemble: the mean
    over members of each member's tempered softmax).

    Example:
        >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[0.5, 0.5]]); y = torch.tensor([0])
        >>> round(float(distillation_loss(s, t, y, temperature=1.0, alpha=1.0)), 4)  # KL(t || softmax(s))
        0.4338
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher_probs, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(student_logits, y)


class Distilled(Plain):
    def __init__(self, spec: RunSpec, inputs: int, classes: int, teacher: Ensemble) -> None:
        self.teacher = teacher
        super().__init__(spec, inputs, classes, loss=self._loss)

    def _loss(self, logits, x, y):
        with torch.no_grad():
            teacher_probs = (self.teacher.logits(x) / DISTILL_TEMPERATURE).softmax(-1).mean(0)
        return distillation_loss(logits, teacher_probs, y)


class Subset(Trainee):
    """Algorithm D.1: ``e * m`` candidate neurons per hidden layer, ``m`` selected before each step."""

    def __init__(self, spec: RunSpec, inputs: int, classes: int) -> None:
        torch.manual_seed(spec.seed)
        self.widths = ARCHS[spec.arch]
        self.wide = _mlp_with_widths([spec.e * m for m in self.widths], inputs, classes)
        self.linears = [m for m in self.wide if isinstance(m, nn.Linear)]
        self.opt = make_optimizer(spec, self.wide.parameters())
        self.t = int(spec.option("t", 10))

    def select(self) -> list[torch.Tensor]:
        chosen, previous = [], None
        for layer, m in zip(self.linears[:-1], self.widths):
            rows = layer.weight.detach() if previous is None else layer.weight.detach()[:, previous]
            previous = select_rows(rows, m, t=self.t)
            chosen.append(previous)
        return chosen

    def forward(self, x: torch.Tensor, chosen: list[torch.Tensor]) -> torch.Tensor:
        h = x.flatten(1)
        previous = None
        for layer, rows in zip(self.linears[:-1], chosen):
            weight = layer.weight[rows] if previous is None else layer.weight[rows][:, previous]
            h = F.relu(F.linear(h, weight, layer.bias[rows]))
            previous = rows
        out = self.linears[-1]
        return F.linear(h, out.weight[:, previous], out.bias)

    def step(self, x, y):
        chosen = self.select()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x, chosen), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def final_model(self) -> nn.Sequential:
        """The deployable network of the original widths: one more selection (Algorithm D.1's return)."""
        chosen = self.select()
        model = _mlp_with_widths(list(self.widths), self.linears[0].in_features, self.linears[-1].out_features)
        small = [m for m in model if isinstance(m, nn.Linear)]
        previous = None
        with torch.no_grad():
            for target, layer, rows in zip(small[:-1], self.linears[:-1], chosen):
                weight = layer.weight[rows] if previous is None else layer.weight[rows][:, previous]
                target.weight.copy_(weight)
                target.bias.copy_(layer.bias[rows])
                previous = rows
            small[-1].weight.copy_(self.linears[-1].weight[:, previous])
            small[-1].bias.copy_(self.linears[-1].bias)
        return model

    @torch.no_grad()
    def probabilities(self, x):
        return self.forward(x, self.select()).softmax(-1)

    def parameters_deployed(self):
        return sum(p.numel() for p in self.final_model().parameters())


def _mlp_with_widths(widths: list[int], inputs: int, classes: int) -> nn.Sequential:
    from .models import mlp

    return mlp(tuple(widths), inputs, classes)


METHODS = ("baseline", "baseline-long", "mk", "adv-mk", "ensemble", "distilled", "subset")


def build(spec: RunSpec, inputs: int, classes: int, teacher: Ensemble | None = None) -> Trainee:
    """The trainee for ``spec.method``; ``distilled`` needs its trained ``teacher``."""
    if spec.method in ("baseline", "baseline-long"):
        return Plain(spec, inputs, classes)
    if spec.method in ("mk", "adv-mk"):
        return MajorityKernels(spec, inputs, classes)
    if spec.method == "ensemble":
        return Ensemble(spec, inputs, classes)
    if spec.method == "distilled":
        if teacher is None:
            raise ValueError("method 'distilled' needs a trained ensemble teacher")
        return Distilled(spec, inputs, classes, teacher)
    if spec.method == "subset":
        return Subset(spec, inputs, classes)
    raise ValueError(f"method={spec.method!r} is unknown: use one of {METHODS}")


@torch.no_grad()
def evaluate(trainee: Trainee, data: Split, batch: int = 4096) -> tuple[float, float]:
    """(mean negative log-likelihood, accuracy) of the trainee's probabilities on ``data``."""
    nll = correct = 0.0
    for i in range(0, len(data), batch):
        probs = trainee.probabilities(data.x[i : i + batch])
        y = data.y[i : i + batch]
        nll += float(-probs.gather(1, y[:, None]).clamp_min(1e-12).log().sum())
        correct += float((probs.argmax(1) == y).sum())
    return nll / len(data), correct / len(data)


def train(trainee: Trainee, spec: RunSpec, fit: Split, val: Split, test: Split, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The shared minibatch loop; evaluates after every epoch; returns curves and final metrics."""
    order_generator = torch.Generator().manual_seed(spec.seed + 7919)  # same batches for every method
    steps = len(fit) // spec.batch
    probe = Split(fit.x[:10_000], fit.y[:10_000])  # train accuracy on a fixed subset (speed)
    curves: dict[str, list[float]] = {k: [] for k in ("train_loss", "train_accuracy", "val_accuracy", "test_loss", "test_accuracy")}
    start = time.perf_counter()
    for _ in range(spec.epochs):
        order = torch.randperm(len(fit), generator=order_generator)
        total = 0.0
        for i in range(steps):
            index = order[i * spec.batch : (i + 1) * spec.batch]
            total += trainee.step(fit.x[index], fit.y[index])
            if progress:
                progress(1)
        curves["train_loss"].append(total / steps)
        curves["train_accuracy"].append(evaluate(trainee, probe)[1])
        curves["val_accuracy"].append(evaluate(trainee, val)[1])
        test_loss, test_accuracy = evaluate(trainee, test)
        curves["test_loss"].append(test_loss)
        curves["test_accuracy"].append(test_accuracy)
        if not math.isfinite(curves["train_loss"][-1]):
            break  # diverged (too large an lr): keep what we have, selection will not pick it
    return {
        "val_accuracy": curves["val_accuracy"][-1],
        "test_accuracy": curves["test_accuracy"][-1],
        "train_accuracy": curves["train_accuracy"][-1],
        "curves": curves,
        "seconds": round(time.perf_counter() - start, 2),
        "deployed_parameters": trainee.parameters_deployed(),
        **trainee.records(),
    }
