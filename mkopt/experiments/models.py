"""The paper's fully connected networks (section 5.1): A1 [100], A2 [200, 100], A3 [400, 200, 100]."""

from __future__ import annotations

from torch import nn

ARCHS: dict[str, tuple[int, ...]] = {"A1": (100,), "A2": (200, 100), "A3": (400, 200, 100)}


def mlp(hidden: tuple[int, ...] | list[int], inputs: int, classes: int) -> nn.Sequential:
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    Example:
        >>> mlp((4,), inputs=6, classes=3)
        Sequential(
          (0): Flatten(start_dim=1, end_dim=-1)
          (1): Linear(in_features=6, out_features=4, bias=True)
          (2): ReLU()
          (3): Linear(in_features=4, out_features=3, bias=True)
        )
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def arch(name: str, inputs: int, classes: int) -> nn.Sequential:
    """The paper's network ``name`` (A1, A2, A3) for ``inputs`` features and ``classes`` classes."""
    if name not in ARCHS:
        raise ValueError(f"arch={name!r} is unknown: use one of {sorted(ARCHS)}")
    return mlp(ARCHS[name], inputs, classes)
