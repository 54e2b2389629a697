"""Probability modes as data: what each ``probabilities=`` value means to the optimizer and the kernels.

Every part of mkopt asks a mode the same few questions (is ``p`` a stream of ``(seed, step)``?
is it uniform? does a step take an adversarial probe and ascent? does B.2 mix in the draw?)
instead of comparing mode strings. A new mode that combines these facts is one
:func:`register_probability_mode` call; one that needs new arithmetic also needs a kernel.

Example:
    >>> probability_mode("adv-mk").two_pass, probability_mode("adv-mk").randomize
    (True, True)
    >>> PROBABILITY_MODES
    ('dirichlet', 'uniform', 'adversarial', 'adv-mk')
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbabilityMode:
    """The facts of one probability mode.

    ``stream``: ``p`` of step ``t`` is the Dirichlet(1) stream of ``(seed, t)`` (regenerable, never
    stored). ``uniform``: ``p = 1/e``. ``two_pass``: each step probes at the mean, ascends on ``p``
    (appendix B) and then descends. ``randomize``: B.2 mixes the stream's draw into the ascent's ``p``.
    ``replicate_ok``: ``init="replicate"`` lets the copies separate (B.1 does not: equal copies get
    equal ``dL/dp``).
    """

    name: str
    stream: bool = False
    uniform: bool = False
    two_pass: bool = False
    randomize: bool = False
    replicate_ok: bool = True
    summary: str = ""

    @property
    def regenerable(self) -> bool:
        """``p`` of every pass is the stream's: the generic path need not store it."""
        return self.stream and not self.two_pass


_REGISTRY: dict[str, ProbabilityMode] = {}


def register_probability_mode(mode: ProbabilityMode) -> ProbabilityMode:
    """Add ``mode`` under ``mode.name`` (a name registered twice is an error)."""
    if mode.name in _REGISTRY:
        raise ValueError(f"probability mode {mode.name!r} is already registered")
    _REGISTRY[mode.name] = mode
    return mode


def probability_mode(name: str) -> ProbabilityMode:
    """The registered mode called ``name``; an error listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"probabilities={name!r} is unknown: use one of {tuple(_REGISTRY)}") from None


register_probability_mode(ProbabilityMode("dirichlet", stream=True, summary="per-element Dirichlet(1) each step (Eq. 4.2)"))
register_probability_mode(ProbabilityMode("uniform", uniform=True, summary="p = 1/e (Lemma 4.3's setting, ablations)"))
register_probability_mode(ProbabilityMode("adversarial", two_pass=True, replicate_ok=False, summary="Algorithm B.1"))
register_probability_mode(ProbabilityMode("adv-mk", stream=True, two_pass=True, randomize=True, summary="Algorithm B.2"))


PROBABILITY_MODES: tuple[str, ...] = tuple(_REGISTRY)  # the built-in names (probability_mode() reads the live registry)
