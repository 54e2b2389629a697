"""Every random stream mkopt seeds, in one table: ``step_seed(seed, step, stream)`` keys them apart.

A stream id is a base from :data:`STREAMS` plus an index below its span; the ranges are disjoint,
so no two uses of the same ``(seed, step)`` can draw the same numbers. The values are fixed: they
define the bits of ``p``, of independently initialized copies and of resumable data orders, so a
change here breaks the reproducibility of saved runs (checkpoints resume bit-identically because
these never move).

Example:
    >>> stream_id("probabilities", 1), stream_id("independent_init", 2)
    (1, 1000005)
    >>> stream_id("data_order", 1)
    Traceback (most recent call last):
    ...
    ValueError: stream 'data_order' has 1 id(s): index 1 is out of range
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["STREAMS", "stream_id"]


class Stream(NamedTuple):
    base: int
    span: int  # how many consecutive ids the stream owns
    what: str


STREAMS: dict[str, Stream] = {
    # p of every step: one stream per flat buffer (device, dtype) of the sampler, in allocation order
    "probabilities": Stream(0, 0x0DA7A0, "mkopt.sampling.DirichletSampler: p, one id per (device, dtype) buffer"),
    # resumable data pipelines (recipes): the per-epoch permutation, and per-sample augmentation below
    "data_order": Stream(0x0DA7A0, 1, "mkopt.resumable: the permutation of each epoch"),
    # init="independent": copy k of target i is drawn with step_seed(seed, k, base + i)
    "independent_init": Stream(1_000_003, 1 << 32, "mkopt.expand: independent copies, one id per target"),
    "sample": Stream(0x5A3F1E << 32, 1 << 32, "mkopt.resumable: augmentation RNG of each sample"),
}


def stream_id(name: str, index: int = 0) -> int:
    """The stream id of use ``name`` (a key of :data:`STREAMS`) for its ``index``-th member."""
    stream = STREAMS[name]
    if not 0 <= index < stream.span:
        raise ValueError(f"stream {name!r} has {stream.span} id(s): index {index} is out of range")
    return stream.base + index
