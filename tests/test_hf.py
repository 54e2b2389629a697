"""Hugging Face models: pretrained expansion, ties through expand -> steps -> deploy -> save, Trainer."""

import subprocess
import sys

import pytest
import torch

import mkopt

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import mkopt.hf  # noqa: E402
from mkopt.hf import MKTrainerCallback, mark_tied_stacks  # noqa: E402

T5_TIES = ["shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)  # fmt: skip
    return T5ForConditionalGeneration(config)


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16)  # fmt: skip


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, 48, (3, 7), generator=g), "labels": torch.randint(2, 48, (3, 4), generator=g)}


def train_steps(model, opt, steps: int = 3) -> list[float]:
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(**batch(step)).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_import_mkopt_does_not_import_transformers():
    code = "import sys, mkopt; assert 'transformers' not in sys.modules, 'mkopt imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_t5_ties_stay_one_tensor_through_expand_steps_deploy():
    model = tiny_t5()
    assert len({model.get_submodule(n).weight.data_ptr() for n in T5_TIES}) == 1  # transformers 5 ties all four
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, sampler_compile=False)
    stacks = [model.get_submodule(n).parametrizations.weight.original for n in T5_TIES]
    assert all(s is stacks[0] for s in stacks) and stacks[0].shape == (3, 48, 16)
    assert len({s.data_ptr() for s in stacks}) == 1
    before = stacks[0].detach().clone()
    train_steps(model, opt)
    assert len({model.get_submodule(n).parametrizations.weight.original.data_ptr() for n in T5_TIES}) == 1
    assert not torch.equal(before, stacks[0].detach())  # the shared stack was trained (once per step)
    plain = mkopt.deploy(model.eval())
    weights = [plain.get_submodule(n).weight for n in T5_TIES]
    assert all(w is weights[0] for w in weights) and weights[0].shape == (48, 16)
    assert len({w.data_ptr() for w in weights}) == 1
    assert torch.equal(weights[0], stacks[0].detach().mean(0))


def test_replicated_pretrained_model_computes_what_it_did():
    model = tiny_t5()
    with torch.no_grad():
        reference = model(**batch()).logits
    mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, sampler_compile=False)
    with torch.no_grad():
        mixed = model.train()(**batch()).logits  # a random p, but every copy is the pretrained kernel
        mean = model.eval()(**batch()).logits
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, reference, rtol=1e-5, atol=1e-5)


def test_deployed_t5_save_pretrained_round_trip(tmp_path):
    model = tiny_t5()
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, sampler_compile=False)
    train_steps(model, opt)
    model.eval()
    with torch.no_grad():
        expected = model(**batch(9)).logits
    mkopt.deploy(model).save_pretrained(tmp_path)
    reloaded, info = T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    assert type(reloaded) is T5ForConditionalGeneration
    assert len({reloaded.get_submodule(n).weight.data_ptr() for n in T5_TIES}) == 1
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch(9)).logits, expected)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in tiny_t5().parameters())


def test_untied_lm_head_checkpoint_stays_untied(tmp_path):
    """A T5 v1.1-style checkpoint (lm_head != shared) loads untied; mkopt expands what is really tied."""
    source = tiny_t5()
    source.lm_head.weight = torch.nn.Parameter(torch.randn_like(source.lm_head.weight))
    source.save_pretrained(tmp_path / "v11")
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "v11")
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    targets = {t.name: [o.qualified_name for o in t.owners] for t in mkopt.select_targets(model)}
    assert targets["lm_head.weight"] == ["lm_head.weight"]
    assert len(targets["shared.weight"]) == 3
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=2, lr=1e-2, sampler_compile=False)
    train_steps(model, opt, 2)
    model.eval()
    with torch.no_grad():
        expected = model(**batch(5)).logits
    mkopt.deploy(model).save_pretrained(tmp_path / "out")
    reloaded, info = T5ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch(5)).logits, expected)


def test_default_targets_t5_and_bert():
    t5 = {t.name for t in mkopt.select_targets(tiny_t5())}
    assert "shared.weight" in t5 and "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in t5
    for kind in ("q", "k", "v", "o"):
        assert f"decoder.block.1.layer.1.EncDecAttention.{kind}.weight" in t5
    assert {"encoder.block.0.layer.1.DenseReluDense.wi.weight", "encoder.block.0.layer.1.DenseReluDense.wo.weight"} <= t5
    assert not any("layer_norm" in name for name in t5)

    mlm = BertForMaskedLM(tiny_bert_config())
    targets = {t.name: [o.qualified_name for o in t.owners] for t in mkopt.select_targets(mlm)}
    assert targets["bert.embeddings.word_embeddings.weight"] == ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"]
    cls = BertForSequenceClassification(tiny_bert_config())
    names = {t.name for t in mkopt.select_targets(cls)}
    assert {"bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.intermediate.dense.weight",
            "bert.pooler.dense.weight", "classifier.weight", "bert.embeddings.position_embeddings.weight"} <= names  # fmt: skip
    assert not any("LayerNorm" in n or n.endswith("bias") for n in names)


def test_bert_mlm_tie_survives_deploy_and_reload(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config())
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, sampler_compile=False)
    ids = torch.randint(0, 40, (2, 6))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    plain = mkopt.deploy(model)
    assert plain.cls.predictions.decoder.weight is plain.bert.embeddings.word_embeddings.weight
    plain.save_pretrained(tmp_path)
    reloaded, info = BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)


def test_no_targetable_kernels_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no tensor of T5ForConditionalGeneration"):
        mkopt.MKOptimizer(torch.optim.AdamW, tiny_t5(), targets="no.such.*", sampler_compile=False)


def test_expanded_tied_t5_save_pretrained_needs_the_declaration(tmp_path):
    model = tiny_t5()
    mkopt.MKOptimizer(torch.optim.AdamW, model, e=2, sampler_compile=False)
    with pytest.raises(RuntimeError, match="shared tensors"):
        model.save_pretrained(tmp_path / "a")
    mark_tied_stacks(model)
    model.save_pretrained(tmp_path / "b")
    plain = mkopt.deploy(model)  # the declaration lives on the Parametrized* classes only
    assert "_tied_weights_keys" not in vars(type(plain.lm_head)) and type(plain.lm_head) is torch.nn.Linear


# -- Trainer ---------------------------------------------------------------------------------


class Seq2SeqData(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(2, 48, (n, 7), generator=g), torch.randint(2, 48, (n, 3), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


class RecordP(TrainerCallback):
    def __init__(self, opt) -> None:
        self.opt, self.draws, self.steps = opt, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.draws.append(self.opt.expansion.sampler.slots[0].current().detach().clone())
        self.steps.append(self.opt.mk_step)


def make_trainer(model, opt, out, steps: int = 4, **overrides):
    args = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
                disable_tqdm=True)  # fmt: skip
    args.update(overrides)
    callbacks = [MKTrainerCallback()]
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=Seq2SeqData(), eval_dataset=Seq2SeqData(16),
                   optimizers=(opt, None), callbacks=callbacks)  # fmt: skip


def test_trainer_trains_with_fresh_p_each_step_evaluates_the_mean_and_deploys(tmp_path):
    model = tiny_t5()
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, sampler_compile=False)
    trainer = make_trainer(model, opt, tmp_path)
    spy = RecordP(opt)
    trainer.add_callback(spy)
    trainer.train()
    assert spy.steps == [1, 2, 3, 4] and opt.mk_step == 4
    assert all(not torch.equal(a, b) for a, b in zip(spy.draws, spy.draws[1:]))  # p redrawn every step
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"

    evaluated = trainer.evaluate()["eval_loss"]
    plain = mkopt.deploy(model.eval())
    data = Seq2SeqData(16)
    with torch.no_grad():
        losses = [plain(input_ids=data.x[i : i + 8], labels=data.y[i : i + 8]).loss for i in (0, 8)]
    assert evaluated == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)  # eval = mean kernels
    plain.save_pretrained(tmp_path / "deployed")
    _, info = T5ForConditionalGeneration.from_pretrained(tmp_path / "deployed", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())


def test_trainer_gradient_accumulation_draws_p_once_per_optimizer_step(tmp_path):
    model = tiny_t5()
    opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, sampler_compile=False)
    trainer = make_trainer(model, opt, tmp_path, steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer.train()
    assert opt.mk_step == 2 and trainer.state.global_step == 2


@pytest.mark.slow
def test_trainer_checkpoints_of_expanded_t5_resume_bit_identically(tmp_path):
    def run(resume=None):
        model = tiny_t5()
        opt = mkopt.MKOptimizer(torch.optim.AdamW, model, e=3, lr=1e-2, sampler_compile=False)
        make_trainer(model, opt, tmp_path, save_strategy="steps", save_steps=2).train(resume_from_checkpoint=resume)
        return model, opt

    straight, opt_a = run()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    resumed, opt_b = run(resume=str(tmp_path / "checkpoint-2"))
    assert opt_a.mk_step == opt_b.mk_step == 4
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert len({resumed.get_submodule(n).parametrizations.weight.original.data_ptr() for n in T5_TIES}) == 1


def test_trainer_callback_rejects_bad_setups(tmp_path):
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=1, per_device_train_batch_size=4)
    plain = Trainer(model=tiny_t5(), args=args, train_dataset=Seq2SeqData(8), callbacks=[MKTrainerCallback()])
    with pytest.raises(TypeError, match="not an mkopt optimizer"):  # Trainer built a plain AdamW
        plain.train()
    model = tiny_t5()
    mkopt.MKOptimizer(torch.optim.AdamW, model, e=2, sampler_compile=False)
    with pytest.raises(ValueError, match="found an expanded model but no optimizer"):
        Trainer(model=model, args=args, callbacks=[MKTrainerCallback()])
    with pytest.raises(TypeError, match="not an mkopt optimizer"):
        Trainer(model=model, args=args, optimizers=(torch.optim.AdamW(model.parameters()), None), callbacks=[MKTrainerCallback()])
    other = tiny_t5()
    other_opt = mkopt.MKOptimizer(torch.optim.AdamW, other, e=2, sampler_compile=False)
    with pytest.raises(ValueError, match="another model"):
        Trainer(model=model, args=args, optimizers=(other_opt, None), callbacks=[MKTrainerCallback()])


class Sentences(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randint(2, 40, (n, 8), generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def test_trainer_builds_mkopt_optim_itself_evaluates_the_mean_and_saves_a_plain_model(tmp_path):
    """The params form: Trainer(optimizer_cls_and_kwargs=...), no model rewrite, save_model ships the mean."""
    torch.manual_seed(0)
    bert = BertForSequenceClassification(tiny_bert_config())
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             logging_steps=2, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                             disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=bert, args=args, train_dataset=Sentences(), eval_dataset=Sentences(16, seed=1),
                      optimizer_cls_and_kwargs=(mkopt.optim.AdamW, {"lr": 1e-2, "e": 3}))  # fmt: skip
    callback = mkopt.hf.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    opt = callback._optimizer
    assert isinstance(opt, mkopt.optim.MKParamOptimizer) and opt.mk_step == 4 and opt.path == "fused"
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 2 and all(log["mk/spread"] > 0 and log["mk/collapsed"] == 0.0 for log in logged)
    word = bert.bert.embeddings.word_embeddings.weight
    copies = dict(opt.named_copies())[opt._name(word)]
    assert torch.equal(word, copies.mean(0))  # training ended at the mean
    from safetensors.torch import load_file  # a mid-training checkpoint holds the mean too

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    saved_copies = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=False)["state"][opt._index(word)]["copies"]
    assert torch.equal(saved, saved_copies.mean(0)) and not torch.equal(saved, copies.mean(0))
    evaluated = trainer.evaluate()["eval_loss"]
    data = Sentences(16, seed=1)
    bert.eval()
    with torch.no_grad():
        losses = [bert(input_ids=data.x[i : i + 8], labels=data.y[i : i + 8]).loss for i in (0, 8)]
    assert evaluated == pytest.approx(float(torch.stack(losses).mean()), rel=1e-6)
    trainer.save_model(str(tmp_path / "plain"))
    reloaded, info = BertForSequenceClassification.from_pretrained(tmp_path / "plain", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=data.x).logits, bert(input_ids=data.x).logits)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in bert.parameters())
