"""The methods of the paper's Table 1, as reusable trainers over in-memory data.

Every method exposes the same shape: build from a :class:`RunSpec`, train with minibatches of
``spec.batch`` for ``spec.epochs`` epochs (one shared loop), and predict class probabilities.

- ``baseline`` / ``baseline-long``: the plain network (the sweep gives baseline-long MK's epochs);
- ``mk`` / ``adv-mk``: :class:`mkopt.MKOptimizer` (Dirichlet / Algorithm B.2), evaluated through
  the deployed (mean) kernels; both record Lemma 4.2's stochastic sharpness during training;
- ``ensemble``: ``e`` baseline-long runs (section 5.2: "three different BASELINE-LONG models"), each
  its own run with its own seed (init *and* batch order), trained separately and ensembled by
  averaging their probabilities (:class:`Ensemble` holds them as one ``vmap``-ed model);
- ``distilled``: a baseline-long network trained on ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``
  (Hinton et al. 2015) with that ensemble as teacher; T = 4, alpha = 0.9;
- ``subset``: Algorithm D.1 (see :class:`Subset` and :mod:`mkopt.experiments.subset`).
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
from ..diagnostics import adversarial_statistics, stochastic_sharpness
from .models import ARCHS, arch
from .runs import RunSpec
from .subset import select_rows
from ..losses import distillation_loss  # noqa: F401  (its home is the library; imported here for the Distilled trainer)

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {}),  # plain SGD, as in the paper's section 5.1
}
LR_BASE: dict[str, float] = {"adam": 0.001, "sgd": 0.025}
LR_GRID: dict[str, list[float]] = {o: [base * 1.5**i for i in range(-4, 6)] for o, base in LR_BASE.items()}  # the paper's grid
SHARPNESS_BATCH = 1024  # the fixed training batch MK's stochastic sharpness is measured on
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

    def watch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A fixed batch of training data for measurements during training (default: none taken)."""


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
        return loss.item()  # .item(), not float(): no requires_grad-to-scalar warning

    @torch.no_grad()
    def probabilities(self, x):
        self.model.eval()
        return self.model(x).softmax(-1)

    def parameters_deployed(self):
        return sum(p.numel() for p in self.model.parameters())


class MajorityKernels(Plain):
    """MK / Adv-MK; options: ``init`` (copies), ``eps`` (Adv-MK's ascent step; the library default otherwise).

    Records, every ``SHARPNESS_EVERY`` steps, Lemma 4.2's stochastic sharpness on a fixed batch
    (:func:`mkopt.diagnostics.stochastic_sharpness`, ``SHARPNESS_DRAWS`` draws of ``p``, the same
    draws each time) once :meth:`watch` gave that batch; Adv-MK also records
    :func:`mkopt.diagnostics.adversarial_statistics` every ``ADVERSARIAL_EVERY`` steps (what the
    ascent does to ``p``: without it "Adv-MK ~ MK" says nothing about B.2).
    """

    ADVERSARIAL_EVERY = 25
    SHARPNESS_EVERY = 50
    SHARPNESS_DRAWS = 8

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
        self.sharpness_trace: list[dict[str, float]] = []
        self.sharpness_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def watch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.sharpness_batch = (x, y)

    def step(self, x, y):
        if self.sharpness_batch is not None and self.steps % self.SHARPNESS_EVERY == 0:
            self.record_sharpness()
        self.steps += 1
        if not self.adversarial:
            return super().step(x, y)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()  # probe at p = 1/e
        measure = (self.steps - 1) % self.ADVERSARIAL_EVERY == 0
        if measure:
            stats = {"step": float(self.steps - 1), **adversarial_statistics(self.opt)}
        self.opt.ascend_probabilities()
        if measure:
            stats["p_entropy"] = float(self.opt.last_p_entropy)  # the p B.2 trains with (mixed with Dirichlet)
            self.adversarial_trace.append(stats)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()  # .item(), not float(): no requires_grad-to-scalar warning

    def record_sharpness(self) -> None:
        assert self.sharpness_batch is not None
        if not all(bool(torch.isfinite(copies).all()) for _, copies in self.opt.named_copies()):
            nan = float("nan")  # a diverged run is kept (lr selection skips it); its sharpness is undefined
            stats = {"sharpness": nan, "loss_mean_weights": nan, "loss_sampled": nan}
        else:
            stats = stochastic_sharpness(self.opt, *self.sharpness_batch, draws=self.SHARPNESS_DRAWS, seed=0)
        self.sharpness_trace.append({"step": float(self.steps), **stats})

    def parameters_deployed(self):
        return sum(p.numel() for p in mkopt.deploy(self.model, allow_nonfinite=True).parameters())  # diverged runs too

    def records(self) -> dict[str, Any]:
        if self.sharpness_batch is not None:
            self.record_sharpness()  # the end of training
        out: dict[str, Any] = {}
        if self.sharpness_trace:
            out["sharpness"] = {"every": self.SHARPNESS_EVERY, "draws": self.SHARPNESS_DRAWS,
                                "batch": len(self.sharpness_batch[1]), "trace": self.sharpness_trace}  # fmt: skip
        if self.adversarial:
            out["adversarial"] = {"eps": self.opt.adversarial_eps, "every": self.ADVERSARIAL_EVERY, "trace": self.adversarial_trace}
        return out


class Ensemble(Trainee):
    """Trained member networks as one batched model (``vmap`` over stacked parameters); not trained here.

    Each member is its own baseline(-long) run (see :func:`member_specs`); the ensemble predicts
    the mean of the members' probabilities.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one trained member")
        self.template = copy.deepcopy(members[0]).to("meta")
        params, self.buffers = stack_module_state(members)
        self.params = {name: value.detach() for name, value in params.items()}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        def one(params, buffers, inputs):
            return functional_call(self.template, (params, buffers), (inputs,))

        return torch.vmap(one, in_dims=(0, 0, None))(self.params, self.buffers, x)  # [members, n, classes]

    def step(self, x, y):
        raise RuntimeError("an Ensemble is built from trained members (their own runs); it has no training step")

    @torch.no_grad()
    def probabilities(self, x):
        return self.logits(x).softmax(-1).mean(0)

    def parameters_deployed(self):
        return sum(p.numel() for p in self.params.values())  # all members are needed at inference


def member_specs(spec: RunSpec, member_method: str = "baseline-long") -> list[RunSpec]:
    """The ``spec.e`` member runs of the ensemble ``spec``: ``member_method`` at the same lr and epochs,
    seeds ``e * seed + k`` (so the seed-0 ensemble is made of the baseline-long runs of seeds 0..e-1:
    independent inits and batch orders, and runs the sweep has anyway).

    Example:
        >>> [s.seed for s in member_specs(RunSpec("ensemble", "A1", "adam", 0.001, 1, 10))]
        [3, 4, 5]
    """
    return [RunSpec(member_method, spec.arch, spec.optimizer, spec.lr, spec.e * spec.seed + k, spec.epochs, spec.dataset,
                    spec.batch, spec.e) for k in range(spec.e)]  # fmt: skip


class Distilled(Plain):
    def __init__(self, spec: RunSpec, inputs: int, classes: int, teacher: Ensemble) -> None:
        self.teacher = teacher
        super().__init__(spec, inputs, classes, loss=self._loss)

    def _loss(self, logits, x, y):
        with torch.no_grad():
            teacher_probs = (self.teacher.logits(x) / DISTILL_TEMPERATURE).softmax(-1).mean(0)
        return distillation_loss(logits, teacher_probs, y)


class Subset(Trainee):
    """Algorithm D.1: hidden layer ``r`` holds ``e * m_r`` candidate units, ``m_r`` selected before each step.

    As D.1 writes it (``W_r in R^{n_r x m_r x e}``, the shape of an MK kernel), only the *outputs* are
    expanded: candidate ``u = k * m_r + j`` is copy ``k`` of output ``j``, and layer ``r + 1`` has the
    ``m_r`` inputs of the plain network, so it is an ``nn.Linear(m_r, e * m_{r+1})`` initialized for
    fan-in ``m_r`` (the output layer: the plain ``nn.Linear(m_L, classes)``). A selected candidate
    feeds its output's input ``j`` of the next layer; so the selected units form a plain layer of
    width ``m_r`` whose next weight is ``W_{r+1}[:, S_r mod m_r]``, which is what the forward runs and
    what :meth:`final_model` returns. (D.1 leaves the wiring open; the other reading, "the i-th selected
    unit feeds input i", reassigns most inputs whenever the selection changes, which it does every step:
    about 270 of 300 positions per step on the tests' synthetic data, where that variant did not train.)
    Selection: :func:`~mkopt.experiments.subset.select_rows` on each
    hidden layer's weight rows (t-NN graph, t = 10 by default; option ``t``).
    """

    def __init__(self, spec: RunSpec, inputs: int, classes: int) -> None:
        torch.manual_seed(spec.seed)
        self.widths = ARCHS[spec.arch]
        fan_in = [inputs, *self.widths[:-1]]
        self.hidden = nn.ModuleList(nn.Linear(n, spec.e * m) for n, m in zip(fan_in, self.widths))
        self.output = nn.Linear(self.widths[-1], classes)
        self.opt = make_optimizer(spec, [*self.hidden.parameters(), *self.output.parameters()])
        self.t = int(spec.option("t", 10))

    def select(self) -> list[torch.Tensor]:
        """The selected rows of every hidden layer (sorted), from the current weights."""
        return [select_rows(layer.weight.detach(), m, t=self.t) for layer, m in zip(self.hidden, self.widths)]

    def layers(self, chosen: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of the width-``m`` network the selection ``chosen`` forms (differentiable)."""
        out, columns = [], None
        for layer, rows, m in zip(self.hidden, chosen, self.widths):
            weight = layer.weight[rows]
            out.append((weight if columns is None else weight[:, columns], layer.bias[rows]))
            columns = rows % m  # candidate k * m + j feeds input j of the next layer
        out.append((self.output.weight[:, columns], self.output.bias))
        return out

    def forward(self, x: torch.Tensor, chosen: list[torch.Tensor]) -> torch.Tensor:
        h = x.flatten(1)
        *hidden, (weight, bias) = self.layers(chosen)
        for w, b in hidden:
            h = F.relu(F.linear(h, w, b))
        return F.linear(h, weight, bias)

    def step(self, x, y):
        chosen = self.select()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x, chosen), y)
        loss.backward()
        self.opt.step()
        return loss.item()  # .item(), not float(): no requires_grad-to-scalar warning

    def final_model(self) -> nn.Sequential:
        """The deployable network of the original widths: one more selection (Algorithm D.1's return)."""
        from .models import mlp

        model = mlp(self.widths, self.hidden[0].in_features, self.output.out_features)
        with torch.no_grad():
            for target, (weight, bias) in zip([m for m in model if isinstance(m, nn.Linear)], self.layers(self.select())):
                target.weight.copy_(weight)
                target.bias.copy_(bias)
        return model

    @torch.no_grad()
    def probabilities(self, x):
        return self.forward(x, self.select()).softmax(-1)

    def parameters_deployed(self):
        return sum(p.numel() for p in self.final_model().parameters())


METHODS = ("baseline", "baseline-long", "mk", "adv-mk", "ensemble", "distilled", "subset")


def build(spec: RunSpec, inputs: int, classes: int, teacher: Ensemble | None = None) -> Trainee:
    """The trainee for ``spec.method``; ``distilled`` needs its trained ``teacher``; an ``ensemble`` is
    not built here but from its trained members (:class:`Ensemble`, :func:`member_specs`)."""
    if spec.method in ("baseline", "baseline-long"):
        return Plain(spec, inputs, classes)
    if spec.method in ("mk", "adv-mk"):
        return MajorityKernels(spec, inputs, classes)
    if spec.method == "ensemble":
        raise ValueError("method 'ensemble' is made of trained member runs: build Ensemble(models of member_specs(spec))")
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
    trainee.watch(fit.x[:SHARPNESS_BATCH], fit.y[:SHARPNESS_BATCH])
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


def evaluate_ensemble(ensemble: Ensemble, members: list[tuple[RunSpec, dict[str, Any]]], fit: Split, val: Split, test: Split) -> dict[str, Any]:
    """The result of an ensemble of trained members (``members``: their specs and results): final metrics only
    (the members' per-epoch weights are not kept, so there are no ensemble curves); ``seconds`` is the
    members' training time together."""
    probe = Split(fit.x[:10_000], fit.y[:10_000])
    test_loss, test_accuracy = evaluate(ensemble, test)
    return {
        "val_accuracy": evaluate(ensemble, val)[1],
        "test_accuracy": test_accuracy,
        "train_accuracy": evaluate(ensemble, probe)[1],
        "curves": {"test_loss": [test_loss], "test_accuracy": [test_accuracy]},
        "seconds": round(sum(result["seconds"] for _, result in members), 2),
        "deployed_parameters": ensemble.parameters_deployed(),
        "members": [spec.run_id for spec, _ in members],
    }
