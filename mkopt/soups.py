"""Model soups (Wortsman et al., 2022): average the weights of separately fine-tuned models.

The comparator of the paper's Table 5. Ingredients are stacked into one ``TensorDict`` with
``batch_size=[n]``, the same representation as MK's copy store (``store[k]`` is model k), so a
uniform soup is ``stack.mean(0)`` exactly as deploying MK is the mean of its copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict

StateDict = Mapping[str, torch.Tensor]


def stack_ingredients(state_dicts: Sequence[StateDict]) -> TensorDict:
    """Stack the floating tensors of ``n`` state dicts (same keys and shapes) into a ``[n]`` TensorDict.

    Example:
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
        >>> stack_ingredients([a, b])["w"]
        tensor([[0., 0.],
                [1., 1.]])
    """
    if not state_dicts:
        raise ValueError("a soup needs at least one ingredient (state dict)")
    keys = list(state_dicts[0])
    for index, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            diff = sorted(set(keys).symmetric_difference(sd))
            raise ValueError(f"ingredient {index} has different keys from ingredient 0 (differing: {diff[:5]}); soups need one architecture")
        for k in keys:  # torch.stack would fail with a message naming neither the key nor the ingredient
            if sd[k].shape != state_dicts[0][k].shape:
                raise ValueError(
                    f"ingredient {index}: {k!r} has shape {tuple(sd[k].shape)} but ingredient 0 has "
                    f"{tuple(state_dicts[0][k].shape)}; soups need one architecture"
                )
    floating = [k for k in keys if state_dicts[0][k].is_floating_point()]
    stacked = {k.replace(".", "/"): torch.stack([sd[k].detach() for sd in state_dicts]) for k in floating}
    return TensorDict(stacked, batch_size=[len(state_dicts)])


def _as_state_dict(mean: TensorDict, template: StateDict) -> dict[str, torch.Tensor]:
    """Averaged floating tensors back under the template's keys; integer buffers from the template."""
    return {k: mean[k.replace(".", "/")] if v.is_floating_point() else v.clone() for k, v in template.items()}


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The plain mean of all ingredients' weights (integer buffers taken from the first one).

    Example:
        >>> uniform_soup([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"]
        tensor([0.5000, 0.5000])
    """
    return _as_state_dict(stack_ingredients(state_dicts).mean(0), state_dicts[0])


def greedy_soup(
    state_dicts: Sequence[StateDict], score: Callable[[StateDict], float]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Wortsman et al.'s greedy soup: ingredients sorted by their own held-out ``score`` (higher is
    better); each is kept if the soup with it scores at least as well as without. Returns the soup
    and the kept indices. ``score`` must use validation data, never the test set.

    Example:
        >>> sds = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([-9.0])}]
        >>> soup, kept = greedy_soup(sds, score=lambda sd: -abs(sd["w"].item() - 2))
        >>> soup["w"], kept
        (tensor([2.]), [0, 1])
    """
    own = [score(sd) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -own[i])
    kept, best = [order[0]], own[order[0]]
    for index in order[1:]:
        candidate = uniform_soup([state_dicts[i] for i in kept + [index]])
        value = score(candidate)
        if value >= best:
            kept, best = kept + [index], value
    return uniform_soup([state_dicts[i] for i in kept]), sorted(kept)
