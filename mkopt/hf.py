"""Majority Kernels for Hugging Face ``transformers`` models: pretrained expansion, ties, ``Trainer``.

Import it explicitly (``import mkopt.hf``); ``import mkopt`` never needs ``transformers``.

**Pretrained expansion needs no special API.** Load the model as usual, build
:class:`mkopt.MKOptimizer` (``init="replicate"`` is the default: every copy starts as the
pretrained kernel, so the expanded model computes exactly what the pretrained one did, the
paper's section 5.3 recipe), fine-tune, then ``mkopt.deploy(model)``: the result is the original
class with the original ``state_dict`` keys; ``save_pretrained()`` / ``from_pretrained()`` round-trip
it with no missing or unexpected keys::

    model = T5ForConditionalGeneration.from_pretrained("t5-small")
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=3e-4)
    ...  # train: opt.zero_grad(); model(**batch).loss.backward(); opt.step()
    mkopt.deploy(model.eval()).save_pretrained("t5-small-mk")

**Ties.** mkopt finds ties by tensor identity (not by ``config.tie_word_embeddings`` or
``_tied_weights_keys``), so it follows whatever ``from_pretrained`` actually tied. In
transformers 5.x, ``T5Config`` forces ``tie_word_embeddings=True`` (the flag only decides
``scale_decoder_outputs``): ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and
``lm_head`` are one Parameter, expanded into one ``[e, vocab, d_model]`` stack that all four read,
still one tensor after deploy. A checkpoint whose ``lm_head`` differs from ``shared`` (T5 v1.1)
loads untied (``from_pretrained`` refuses to tie unequal weights) and then ``lm_head`` is its own
target. ``BertForMaskedLM`` ties the MLM decoder to ``word_embeddings`` the same way.

**Default targets** (``targets=None``: every floating parameter with ``ndim >= 2``):

- T5: the shared token embedding (= ``lm_head`` when tied), attention ``q``, ``k``, ``v``, ``o`` in
  every self- and cross-attention, the FFN ``wi`` / ``wi_0`` / ``wi_1`` / ``wo``, and the
  ``relative_attention_bias`` tables (``[num_buckets, heads]`` embeddings of the first block).
- BERT family: ``word``/``position``/``token_type`` embeddings, ``query``/``key``/``value``,
  attention ``output.dense``, ``intermediate.dense``, ``output.dense``, the pooler and the
  classifier (and the MLM ``transform.dense``).
- Never by default: LayerNorm / T5LayerNorm scales and every bias (1-D): the paper expands
  *kernels*, the matrices whose rows are the "neurons" simulated overparameterization multiplies;
  a 1-D scale or shift has no such structure, and at ``init="replicate"`` its mean would just
  track the plain parameter at a smaller effective step. Exclude the embeddings (they carry most of
  T5-small's parameters, so ``e`` times their memory) with e.g.
  ``targets=lambda name, t, m: isinstance(m, torch.nn.Linear) and m is not model.lm_head``.

**Trainer, params form** (no model rewrite; Trainer builds the optimizer itself)::

    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,
                      optimizer_cls_and_kwargs=(mkopt.optim.AdamW, {"lr": 5e-5, "e": 3}))
    mkopt.hf.attach(trainer)   # diagnostics into every logger Trainer reports to; the mean at the end
    trainer.train(); trainer.save_model(out)   # saves the mean of the copies: an ordinary checkpoint

``Trainer`` calls ``optimizer.eval()`` before evaluating and ``optimizer.train()`` before each
training step, so evaluation runs on the mean of the copies; :func:`attach` also leaves the model at
the mean when training ends, so ``save_model`` writes the deployable weights (same class, keys,
size). Checkpoints saved during training hold the training weights plus the optimizer state (the
copies), and ``trainer.train(resume_from_checkpoint=...)`` continues from them.

**Trainer, model form.** Pass the optimizer and :class:`MKTrainerCallback`::

    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=5e-5)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None), callbacks=[MKTrainerCallback()])

``Trainer`` builds its LR scheduler over ``opt`` and ``accelerate`` wraps it in an
``AcceleratedOptimizer`` whose ``step()`` calls ``opt.step()`` (which draws the next ``p``; with
gradient accumulation every micro-batch of one step sees the same ``p``). Evaluation runs in
``model.eval()``, i.e. on the mean of the copies. The callback checks this set-up once and lets
``save_pretrained`` write checkpoints of the *expanded* model, whose tied stacks would otherwise
make transformers refuse to save ("shared tensors ... not properly defined"): tied stacks are saved
once, and ``trainer.train(resume_from_checkpoint=...)`` continues bit-identically (the ties are
restored through the shared storage; transformers logs the tied stacks as "missing keys"). Such a
checkpoint holds ``e`` copies per kernel: ship ``mkopt.deploy(model)`` instead.

**Limits.** Change the architecture before expanding: ``resize_token_embeddings()`` and
``tie_weights()`` on an *expanded* model fail inside transformers (``shared.weight`` is then a
parametrization, not a Parameter); ``from_pretrained`` ties before you expand, so it is not
affected. ``Trainer`` with FSDP refuses a prebuilt optimizer; DeepSpeed and ``torch_compile=True``
inside ``Trainer`` are untested.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .diagnostics import loggable
from .expand import expansion_of, is_expanded
from .optim import MKParamOptimizer
from .optimizer import MKOptimizer

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mkopt.hf needs the Hugging Face libraries: pip install 'mkopt[hf]' (transformers and accelerate)"
    ) from error

__all__ = ["MKTrainerCallback", "attach", "mark_tied_stacks"]


def mark_tied_stacks(model: nn.Module) -> list[str]:
    """Let ``model.save_pretrained()`` save an expanded model whose tied kernels share one stack.

    transformers saves one name per shared storage only when that name is declared tied
    (``_tied_weights_keys``); the stacks of an expanded model live under
    ``<module>.parametrizations.<attr>.original`` names it does not know. This declares every
    non-first owner's stack as tied to the first one, on the owner's generated ``Parametrized*``
    class, so the declaration disappears with the parametrization (deployed models are untouched).
    Returns the names declared; idempotent. :class:`MKTrainerCallback` calls it for you.

    Example:
        >>> import torch, mkopt
        >>> from transformers import T5Config, T5ForConditionalGeneration
        >>> t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
        >>> opt = mkopt.MKOptimizer(torch.optim.AdamW, t5, e=2, sampler_compile=False)
        >>> mark_tied_stacks(t5)
        ['encoder.embed_tokens.parametrizations.weight.original', 'decoder.embed_tokens.parametrizations.weight.original', 'lm_head.parametrizations.weight.original']
    """
    expansion = expansion_of(model)
    declared: list[str] = []
    for target in expansion.targets:
        primary = f"{target.owners[0].path + '.' if target.owners[0].path else ''}parametrizations.{target.owners[0].attr}.original"
        for owner in target.owners[1:]:
            cls = type(owner.module)
            if not parametrize.is_parametrized(owner.module) or not cls.__name__.startswith("Parametrized"):
                raise RuntimeError(f"{owner.qualified_name!r} is not parametrized by mkopt: was the model collapsed?")
            key = f"parametrizations.{owner.attr}.original"
            cls._tied_weights_keys = {**(cls.__dict__.get("_tied_weights_keys") or {}), key: primary}
            declared.append(f"{owner.path}.{key}" if owner.path else key)
    _check_saveable(model)
    return declared


def _check_saveable(model: nn.Module) -> None:
    """Run transformers' own de-aliasing on the state_dict now, so a problem surfaces before step 1."""
    from transformers.modeling_utils import PreTrainedModel

    try:  # transformers >= 5; older versions raise their own error at save time
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover
        return
    if not isinstance(model, PreTrainedModel):
        return
    try:
        remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    except RuntimeError as error:
        raise RuntimeError(
            f"save_pretrained() cannot write this expanded {type(model).__name__}: {error}. Its shared tensors are "
            "reachable under names mkopt cannot declare tied (e.g. one module registered under two paths). Use "
            "TrainingArguments(save_strategy='no') and torch.save(model.state_dict(), ...) for checkpoints"
        ) from error


def _unwrap_mk_optimizer(optimizer: Any) -> MKOptimizer | MKParamOptimizer:
    """The mkopt optimizer inside ``optimizer`` (e.g. accelerate's ``AcceleratedOptimizer``)."""
    seen = optimizer
    for _ in range(8):  # AcceleratedOptimizer -> MKOptimizer; a few layers at most
        if isinstance(seen, (MKOptimizer, MKParamOptimizer)):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(
        f"the Trainer's optimizer is {type(optimizer).__name__}, not an mkopt optimizer: pass "
        "Trainer(..., optimizer_cls_and_kwargs=(mkopt.optim.AdamW, {'lr': ..., 'e': 3})), or build "
        "opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=...) and pass Trainer(..., optimizers=(opt, None)); "
        "a plain optimizer would never draw a new p"
    )


def attach(trainer: Any, log_per_tensor: bool = False) -> "MKTrainerCallback":
    """Add an :class:`MKTrainerCallback` to ``trainer`` *ahead of* its reporting callbacks, so MK's
    diagnostics reach every logger the Trainer reports to (TensorBoard, W&B, ...), and run its checks now.

    ``Trainer(callbacks=[MKTrainerCallback()])`` also works, but Trainer runs the reporting callbacks
    first, so the diagnostics then reach only ``trainer.state.log_history`` and the console.

    Example:
        >>> import tempfile, torch, mkopt, mkopt.hf
        >>> from transformers import Trainer, TrainingArguments, BertConfig, BertForSequenceClassification
        >>> bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=16))
        >>> args = TrainingArguments(tempfile.mkdtemp(), report_to=[], use_cpu=True)
        >>> trainer = Trainer(model=bert, args=args, optimizer_cls_and_kwargs=(mkopt.optim.AdamW, {"lr": 1e-3, "e": 3}))
        >>> callback = mkopt.hf.attach(trainer)
        >>> trainer.callback_handler.callbacks[0] is callback
        True
    """
    handler = trainer.callback_handler
    handler.callbacks = [c for c in handler.callbacks if not isinstance(c, MKTrainerCallback)]
    callback = MKTrainerCallback(log_per_tensor=log_per_tensor)
    handler.callbacks.insert(0, callback)
    callback.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model, optimizer=trainer.optimizer)
    return callback


class MKTrainerCallback(TrainerCallback):
    """Checks an MK set-up inside ``transformers.Trainer``, logs MK's diagnostics, makes checkpoints saveable.

    Model form (``optimizers=(MKOptimizer, None)``): at the end of ``Trainer.__init__`` it verifies
    that the model is expanded, that the optimizer is the :class:`mkopt.MKOptimizer` built over this
    very model, and that ``p`` lives on the model's device (Trainer moves the model: build the
    optimizer after ``model.to(device)``); then it calls :func:`mark_tied_stacks`. Params form
    (``optimizer_cls_and_kwargs=(mkopt.optim.AdamW, {...})``): when training starts it verifies that
    Trainer built an mkopt optimizer, and when training ends it leaves the model at the mean of the
    copies (``optimizer.eval()``), so ``save_model`` writes the deployable weights. Both: every log
    gets ``mk/spread`` (relative spread of the copies), ``mk/collapsed`` and, for the adversarial
    modes, ``mk/p_entropy`` (``log_per_tensor=True`` adds one ``mk/spread/<tensor>`` per kernel).
    Each failure is a clear error. Use :func:`attach` so the diagnostics reach the reporting loggers.

    Example:
        >>> import tempfile, torch, mkopt
        >>> from transformers import Trainer, TrainingArguments, BertConfig, BertForSequenceClassification
        >>> bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=16))
        >>> opt = mkopt.MKOptimizer(torch.optim.AdamW, bert, e=3, lr=1e-3, sampler_compile=False)
        >>> args = TrainingArguments(tempfile.mkdtemp(), report_to=[], use_cpu=True)
        >>> trainer = Trainer(model=bert, args=args, optimizers=(opt, None), callbacks=[MKTrainerCallback()])
    """

    def __init__(self, log_per_tensor: bool = False) -> None:
        self.log_per_tensor = log_per_tensor
        self._optimizer: MKOptimizer | MKParamOptimizer | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("MKTrainerCallback needs Trainer(model=...); model_init is not supported with mkopt")
        if optimizer is None:
            if is_expanded(model):
                raise ValueError(
                    "MKTrainerCallback found an expanded model but no optimizer: pass Trainer(..., optimizers=(opt, None)) "
                    "with opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=...); an optimizer Trainer builds "
                    "itself would never draw a new p (or use the params form on an unexpanded model: "
                    "optimizer_cls_and_kwargs=(mkopt.optim.AdamW, {...}))"
                )
            return  # the params form: Trainer builds the optimizer when training starts
        mk = _unwrap_mk_optimizer(optimizer)
        self._optimizer = mk
        if isinstance(mk, MKOptimizer):
            expansion_of(model)  # clear error when the model was never expanded
            if mk.model is not model:
                raise ValueError("the MKOptimizer passed to Trainer was built over another model than Trainer(model=...)")
            _check_device(mk)
            mark_tied_stacks(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._optimizer = _unwrap_mk_optimizer(optimizer)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._optimizer is None or logs is None or "loss" not in logs:  # training logs only
            return
        stats = loggable(self._optimizer, per_tensor=self.log_per_tensor)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A checkpoint saved at this step holds the mean (Trainer calls ``optimizer.train()`` before the next step;
        resuming restores the training weights from the optimizer state)."""
        if isinstance(self._optimizer, MKParamOptimizer) and _saves_at(args, state.global_step):
            self._optimizer.eval()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if isinstance(self._optimizer, MKParamOptimizer):
            self._optimizer.eval()  # save_model() now writes the mean: the deployable weights


def _saves_at(args: Any, step: int) -> bool:
    """Whether Trainer saves a checkpoint after ``step`` (the step-based strategy; epoch ends are rarer)."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    return strategy == "steps" and bool(args.save_steps) and step % int(args.save_steps) == 0


def _check_device(mk: MKOptimizer) -> None:
    slots = mk.expansion.sampler.slots
    for target, slot in zip(mk.expansion.targets, slots):
        if target.param.device != slot.device:
            raise RuntimeError(
                f"{target.name!r} is on {target.param.device} but its MK probabilities are on {slot.device}: Trainer "
                "moved the model after MKOptimizer was built; call model.to(device) first, then build MKOptimizer"
            )

