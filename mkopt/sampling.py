"""Per-element Dirichlet(1, ..., 1) probabilities, drawn once per optimizer step into flat buffers.

``p`` for step ``t`` is a pure function of ``(seed, t)``: a resumed run, or every rank of a
distributed run, draws exactly the same ``p`` without communicating or saving RNG state.

The uniforms come from a counter-based generator: element ``i`` of a buffer at step ``t`` takes
the SplitMix64 output number ``i`` of the stream seeded with ``step_seed(seed, t, buffer)``
(Steele, Lea & Flood 2014; passes BigCrush). Being a pure function of the element index it
vectorizes and parallelizes, and ``torch.compile`` fuses hash, spacings and normalization into one
pass: ~2 ms for 1.33 M elements x e=3 on 2 CPU cores, against ~5.5 ms for NumPy's PCG64 and
~8 ms for torch's serial mt19937. Up to e = 16, Dirichlet(1) comes from the spacings of e - 1 sorted
uniforms (two float32 uniforms per 64-bit output, no logarithms), so eager and compiled execution
give bit-identical values; above, from normalized exponentials (the logarithm may then differ in
the last bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .compiled import compile_by_default, run_kernel
from .streams import stream_id

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a well-mixed 64-bit integer from a counter (Steele et al., 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The generator seed used for ``(seed, step, stream)``; distinct inputs give unrelated seeds."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) ^ (stream & _MASK64))
    return mixed & ((1 << 63) - 1)  # torch.Generator.manual_seed takes a non-negative int64


MAX_SPACINGS_E = 16  # up to here uniform spacings (a sorting network of ~e^2/2 min/max pairs); above, exponentials


def uniform_rows(e: int) -> tuple[int, ...]:
    """Indices of the U[0, 1) draws a Dirichlet(1) column of size ``e`` needs: ``e - 1`` for spacings, ``e`` above 16."""
    return tuple(range(e - 1)) if e <= MAX_SPACINGS_E else tuple(range(e))


def fill_dirichlet_(out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` (shape ``[e, n]``) with ``n`` independent Dirichlet(1, ..., 1) vectors along dim 0.

    Example:
        >>> p = fill_dirichlet_(torch.empty(3, 5), torch.Generator().manual_seed(0))
        >>> bool((p > 0).all()), torch.allclose(p.sum(0), torch.ones(5))
        (True, True)
    """
    if out.dim() != 2:
        raise ValueError(f"fill_dirichlet_ expects a [e, n] tensor, got shape {tuple(out.shape)}")
    e, n = out.shape
    if e == 1:
        return out.fill_(1.0)
    uniforms = [torch.rand(n, generator=generator, dtype=out.dtype, device=out.device) for _ in uniform_rows(e)]
    return out.copy_(torch.stack(dirichlet_from_uniforms(uniforms, e, out.dtype)))


@dataclass(frozen=True)
class BufferKey:
    """Tensors that share device and dtype share one flat probability buffer."""

    device: torch.device
    dtype: torch.dtype


def probability_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float64 weights get float64 ``p`` (exact tests); every other dtype float32 (bf16 p is too coarse)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass(eq=False, repr=False)  # identity semantics: slots hold tensors
class ProbabilitySlot:
    """Where one target tensor's ``p`` lives: columns ``offset .. offset + numel`` of a stream.

    Buffer mode: ``view`` aliases the flat ``[e, n]`` buffer (valid after the first draw).
    Regenerate mode: no buffer exists; :meth:`current` recomputes ``p`` from the step's key.
    """

    sampler: "DirichletSampler"
    key: BufferKey
    offset: int
    shape: torch.Size
    view: torch.Tensor
    offset_tensor: torch.Tensor
    adversarial_p: Any = None  # the fused path's adversarial step: a callable returning this step's p

    @property
    def device(self) -> torch.device:
        return self.key.device

    def __repr__(self) -> str:
        return f"ProbabilitySlot(shape={tuple(self.shape)}, offset={self.offset}, device={self.key.device}, dtype={self.key.dtype})"

    @property
    def step_key(self) -> torch.Tensor:
        """This step's stream key, a 0-dim int64 tensor (a new tensor per step, never mutated)."""
        return self.sampler.keys[self.key]

    def current(self) -> torch.Tensor:
        """``p`` in use now, ``[e, *shape]``: the buffer view, or a freshly regenerated tensor."""
        sampler = self.sampler
        if not sampler.regenerate:
            return self.view
        shape = (sampler.e, *self.shape)
        if sampler.fused_phase == "adversarial" and self.adversarial_p is not None:
            return self.adversarial_p().view(shape)
        if sampler.uniform or sampler.fused_phase == "probe":
            return torch.full(shape, 1.0 / sampler.e, device=self.key.device, dtype=self.key.dtype)
        from . import triton as mk_triton

        if mk_triton.handles(self.key.device) and sampler.e <= mk_triton.MAX_E:  # CUDA: one kernel, the same values
            return mk_triton.launch.probabilities(sampler.e, self.shape.numel(), self.step_key, self.offset, self.key.dtype).view(shape)
        if self.key.device.type == "cpu" and sampler.e <= MAX_SPACINGS_E:
            from . import native  # the same values, bit for bit, without compiling a kernel

            if native.available():
                return native.probabilities(sampler.e, self.shape.numel(), sampler.seeds[self.key], self.offset, dtype=self.key.dtype).view(shape)
        flat = torch.empty(sampler.e, self.shape.numel(), device=self.key.device, dtype=self.key.dtype)
        with torch.no_grad():
            counter_dirichlet_(flat, self.step_key, compiled=sampler.compiled, offset=self.offset_tensor)
        return flat.view(shape)


class DirichletSampler:
    """Owns the probabilities of an expanded model and redraws them once per step.

    Buffer mode (``regenerate=False``): flat ``[e, n]`` buffers, allocated once and refilled in
    place; the parametrizations hold views into them (fresh multi-megabyte allocations every
    step would cost page faults). The adversarial modes need this: their ``p`` comes from
    gradients, not from the stream.

    Regenerate mode (``regenerate=True``): no buffer at all. A draw only computes each stream's
    key; the parametrization regenerates ``p`` inside its fused forward and backward kernels
    (:mod:`mkopt.fused`) from ``(key, element index)``, the same values the buffer would hold.
    This saves ``e`` floats per weight and two passes over them per step.

    Example:
        >>> s = DirichletSampler(e=3, seed=0)
        >>> slot = s.allocate(torch.device("cpu"), torch.float32, torch.Size([2, 2]))
        >>> s.draw(step=0); tuple(slot.current().shape)
        (3, 2, 2)
    """

    def __init__(self, e: int, seed: int, compiled: bool | None = None, regenerate: bool = False) -> None:
        self.e = e
        self.seed = seed
        self.compiled = compiled
        self.regenerate = regenerate
        self._sizes: dict[BufferKey, int] = {}
        self._pending: list[ProbabilitySlot] = []
        self.slots: list[ProbabilitySlot] = []
        self.buffers: dict[BufferKey, torch.Tensor] = {}
        self.keys: dict[BufferKey, torch.Tensor] = {}
        self.seeds: dict[BufferKey, int] = {}  # the same keys as Python ints (the fused path's kernels)
        self.uniform = False  # the fused path's uniform mode: p = 1/e without a buffer
        self.fused_phase = "stream"  # the fused path: "stream", or an adversarial "probe" / "adversarial" pass
        self._constants: dict[torch.device, torch.Tensor] = {}
        self.step: int | None = None
        self.driven: bool | None = False  # an MKOptimizer redraws p (None: trained without one, warned)

    def stream_of(self, key: BufferKey) -> int:
        """The stream id of the tensors stored under ``key`` (:mod:`mkopt.streams`; order of first allocation)."""
        return stream_id("probabilities", list(self._sizes).index(key))

    def compile_kernels(self, device: torch.device) -> bool:
        """Whether the kernels for tensors on ``device`` run compiled (see :mod:`mkopt.compiled`)."""
        return compile_by_default(device, self.compiled)

    @property
    def compile_required(self) -> bool:
        """``sampler_compile=True`` was asked for: a compilation error is raised, never worked around."""
        return self.compiled is True

    def constants(self, device: torch.device) -> torch.Tensor:
        """SplitMix64's constants on ``device``, made once."""
        if device not in self._constants:
            self._constants[device] = splitmix64_constants(device)
        return self._constants[device]

    @property
    def views(self) -> list[torch.Tensor]:
        """The buffer views, one per slot (buffer mode only: regenerated ``p`` has no storage)."""
        if self.regenerate:
            raise RuntimeError(
                "this sampler regenerates p inside the MK kernels and keeps no buffer: read a tensor's current p "
                "with slot.current() (or module.parametrizations.weight[0].p)"
            )
        return [slot.view for slot in self.slots]

    def allocate(self, device: torch.device, dtype: torch.dtype, shape: torch.Size) -> ProbabilitySlot:
        """Reserve ``p`` for a tensor of ``shape``; its values exist after the first :meth:`draw`."""
        key = BufferKey(torch.device(device), probability_dtype(dtype))
        offset = self._sizes.get(key, 0)
        numel = shape.numel()
        self._sizes[key] = offset + numel
        # The view is materialized lazily: the flat buffer's final size is known only after all allocations.
        holder = torch.empty(0, device=device, dtype=key.dtype)
        offset_tensor = torch.tensor(offset, dtype=torch.int64, device=device)
        slot = ProbabilitySlot(self, key, offset, torch.Size(shape), holder, offset_tensor)
        self._pending.append(slot)
        return slot

    def _materialize(self) -> None:
        if not self.regenerate:
            for key, size in self._sizes.items():
                if key not in self.buffers:
                    self.buffers[key] = torch.empty(self.e, size, device=key.device, dtype=key.dtype)
        for slot in self._pending:
            if not self.regenerate:
                flat = self.buffers[slot.key]
                view = flat[:, slot.offset : slot.offset + slot.shape.numel()].view(self.e, *slot.shape)
                with torch.no_grad():
                    slot.view.set_(view)  # the parametrization's tensor now aliases the flat buffer
            self.slots.append(slot)
        self._pending.clear()

    def draw(self, step: int, fill: bool = True) -> None:
        """Fill every buffer (or set every key) with the probabilities of step ``step`` (deterministic).

        ``fill=False`` only sets the keys, for a kernel that regenerates the draw itself (Adv-MK's ascent).
        """
        if self._pending:
            self._materialize()
        for key in self._sizes:
            seed = self.seeds[key] = step_seed(self.seed, step, self.stream_of(key))
            # a new tensor each step: a graph built at step t keeps step t's key for its backward. torch.full, not
            # torch.tensor: on CUDA a fill kernel with the value as its argument, not a synchronizing host copy
            self.keys[key] = torch.full((), seed, dtype=torch.int64, device=key.device)
            if fill and not self.regenerate:
                counter_dirichlet_(self.buffers[key], self.keys[key], compiled=self.compiled)
        self._drawn(step)

    def rehome(self, old: BufferKey, new: BufferKey) -> None:
        """Move the stream of ``old`` to ``new`` (a model moved by ``.to()``): same stream number and offsets.

        Regenerate mode only (a buffer would have to move with its views). ``p`` is a function of
        ``(seed, step, stream, element)``, so on the new device it has the same values (in the new
        key's dtype: float64 weights draw float64 ``p``).
        """
        if self.regenerate is False:
            raise RuntimeError(
                "this sampler keeps p in buffers that the parametrizations view: move the model before building "
                "MKOptimizer (or rebuild it after moving)"
            )
        if new in self._sizes:
            raise RuntimeError(f"cannot move p from {old} to {new}: tensors on {new} already have their own stream")
        self._sizes = {(new if key == old else key): size for key, size in self._sizes.items()}  # order = stream ids
        if old in self.seeds:
            self.seeds[new] = self.seeds.pop(old)
            self.keys[new] = self.keys.pop(old).to(new.device)
        for slot in [*self.slots, *self._pending]:
            if slot.key == old:
                slot.key = new
                slot.offset_tensor = slot.offset_tensor.to(new.device)

    def fill_uniform(self, step: int) -> None:
        """Set every ``p`` to ``1/e`` (uniform mode, and the start of an adversarial step)."""
        if self.regenerate:
            raise RuntimeError("uniform and adversarial p need the buffer mode: build the sampler with regenerate=False")
        if self._pending:
            self._materialize()
        for flat in self.buffers.values():
            flat.fill_(1.0 / self.e)
        self._drawn(step)

    def _drawn(self, step: int) -> None:
        # set_() aliases give each view its own version counter: bump them, so autograd refuses
        # a backward through a graph that was built with the previous p.
        if not self.regenerate:
            torch.autograd.graph.increment_version(self.views)
        self.step = step


_GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)  # as a wrapped int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_MANTISSA_BITS = {torch.float32: 24, torch.float64: 53}  # uniforms on the grid k * 2**-bits


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)  # torch's >> on int64 is arithmetic


def splitmix64(counter: torch.Tensor, key: torch.Tensor, constants: torch.Tensor | None = None) -> torch.Tensor:
    """SplitMix64 output ``counter`` of the stream seeded with ``key`` (int64 tensors, wrapping).

    ``constants`` = ``splitmix64_constants()`` on the right device; passing them as a tensor keeps
    the compiler from folding the 64-bit products into (overflowing) index arithmetic.

    Example:
        >>> int(splitmix64(torch.tensor([0]), torch.tensor(0))[0]) & (2**64 - 1) == 0xE220A8397B1DCDAF
        True
    """
    if constants is None:
        constants = splitmix64_constants(counter.device)
    gamma, mix1, mix2 = constants[0], constants[1], constants[2]
    x = key + (counter + 1) * gamma
    x = (x ^ _shift_right_logical(x, 30)) * mix1
    x = (x ^ _shift_right_logical(x, 27)) * mix2
    return x ^ _shift_right_logical(x, 31)


def splitmix64_constants(device: torch.device | str = "cpu") -> torch.Tensor:
    """SplitMix64's increment and multipliers as wrapped int64 values."""
    return torch.tensor([_GOLDEN_GAMMA, _MIX1, _MIX2], dtype=torch.int64, device=device)


def probability_rows(n: int, e: int, key: torch.Tensor, offset: torch.Tensor, constants: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The ``e`` rows of ``p`` for stream columns ``offset .. offset + n`` (``e >= 2``), as ``[n]`` tensors.

    Element ``i`` depends only on ``(key, offset + i)``: any slice of a stream can be recomputed
    anywhere (a flat buffer fill, or inside a fused kernel) with the same values. Written
    functionally so the compiler fuses hash, spacings and normalization into the consumer.
    """
    index = torch.arange(n, device=key.device, dtype=torch.int64) + offset
    bits = _MANTISSA_BITS[dtype]
    count = len(uniform_rows(e))
    per_word = 2 if bits <= 32 else 1  # float32: two 24-bit uniforms from each 64-bit output
    words = -(-count // per_word)
    fields = []
    for r in range(words):
        word = splitmix64(index * words + r if words > 1 else index, key, constants)
        fields.append(_shift_right_logical(word, 64 - bits))
        if per_word == 2:
            fields.append(_shift_right_logical(word, 32 - bits) & ((1 << bits) - 1))
    fields = fields[:count]
    uniforms = [f.to(dtype) * 2.0**-bits for f in fields]
    return dirichlet_from_uniforms(uniforms, e, dtype)


def _counter_fill(out: torch.Tensor, key: torch.Tensor, constants: torch.Tensor, offset: torch.Tensor) -> None:
    """Hash -> uniforms -> Dirichlet columns into ``out``; the compiler fuses it into one pass."""
    e, n = out.shape
    if e == 1:
        out.fill_(1.0)
        return
    rows = probability_rows(n, e, key, offset, constants, out.dtype)
    if torch.compiler.is_compiling():
        out.copy_(torch.stack(rows))  # one loop, e stores per element (row copies: e loops, hash redone)
    else:
        for row, values in enumerate(rows):
            out[row].copy_(values)  # eagerly a stack would materialize a second [e, n] tensor


def dirichlet_from_uniforms(uniforms: list[torch.Tensor], e: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The ``e >= 2`` rows of Dirichlet(1) columns from ``len(uniform_rows(e))`` U[0, 1) tensors.

    Up to ``e = 16`` the spacings of the ``e - 1`` sorted uniforms (sorted by a network of min/max
    pairs, elementwise; no logarithms); above, normalized ``-log U``. Exact up to the uniforms'
    resolution; every entry > 0; columns sum to 1 within a rounding.

    Example:
        >>> [round(float(r), 2) for r in dirichlet_from_uniforms([torch.tensor(0.2), torch.tensor(0.7)], 3, torch.float32)]
        [0.2, 0.5, 0.3]
    """
    tiny = torch.finfo(dtype).eps / 4  # lifts u = 0 by a quarter ulp: every p > 0
    if e <= MAX_SPACINGS_E:
        order = list(uniforms)
        for sweep in range(len(order) - 1, 0, -1):  # bubble-sort network: compare-exchange neighbours
            for j in range(sweep):
                order[j], order[j + 1] = torch.minimum(order[j], order[j + 1]), torch.maximum(order[j], order[j + 1])
        order[0] = order[0].clamp_min(tiny)  # clamped before differencing: the e = 2, 3 streams of version 2
        rows = [order[0]] + [(high - low).clamp_min(tiny) for low, high in zip(order, order[1:])]
        return rows + [1.0 - order[-1]]  # spacings of the sorted uniforms
    exponentials = [-torch.log(u.clamp_min(tiny)) for u in uniforms]
    total = sum(exponentials[1:], exponentials[0])
    return [x / total for x in exponentials]


def counter_dirichlet_(
    out: torch.Tensor, key: int | torch.Tensor, compiled: bool | None = None, offset: int | torch.Tensor = 0
) -> torch.Tensor:
    """Fill ``out`` (``[e, n]``) with columns ``offset .. offset + n`` of the Dirichlet(1) stream ``key``.

    ``compiled=None`` compiles on CPU (once per e and dtype, a few seconds; any size) and runs
    eagerly elsewhere; if compilation is impossible it warns once and runs eagerly (see
    :mod:`mkopt.compiled`). The values are identical either way.

    Example:
        >>> p = counter_dirichlet_(torch.empty(3, 4), key=7, compiled=False)
        >>> bool((p > 0).all()), torch.allclose(p.sum(0), torch.ones(4))
        (True, True)
    """
    key_tensor = torch.as_tensor(key, dtype=torch.int64, device=out.device)
    offset_tensor = torch.as_tensor(offset, dtype=torch.int64, device=out.device)
    constants = splitmix64_constants(out.device)
    use_compiled = compile_by_default(out.device, compiled)
    run_kernel(_counter_fill, out, key_tensor, constants, offset_tensor, compiled=use_compiled, required=bool(compiled))
    return out
