"""Triton device code of the GPU path: the p stream and every MK kernel (the CUDA twin of ``mk_cpu.cpp``).

All ``@triton.jit`` code lives in this one module on purpose: :mod:`mkopt.triton.launch` loads a
second copy of it with Triton's interpreter switched on (``triton.jit`` decides between compiling
and interpreting when it decorates, and kernels call their helpers through this module's globals),
so that the same kernels run on CPU tensors, in any process, whatever imported Triton first.

Arithmetic mirrors ``mkopt/native/mk_cpu.cpp`` operation for operation: the same SplitMix64 counters
and 24/53-bit fields, the same compare-exchange network for the uniform spacings, sums over copies
accumulated in copy order, IEEE division and square roots (``div_rn``, ``sqrt_rn`` for float32), and
launched with ``enable_fp_fusion=False`` (no fused multiply-adds, as the CPU build's ``-ffp-contract=off``).
So ``p`` is bit-identical to the CPU stream for e <= 16, and so are the SGD updates (tested); Adam's
bias corrections are ``exp2(t * log2(beta))`` in float64 on the device (last-bit differences from the
host's ``beta ** t``); above e = 16 ``p`` takes logarithms (last-bit differences). ``p`` of a block is a
tuple of ``e`` ``[BLOCK]`` rows (unrolled at compile time, as the CPU's ``p[k][j]`` arrays), so every
per-copy loop is plain elementwise code.

Only Triton builtins are used (no ``tl.sum``, ``tl.sort``, ``tl.zeros``): those are ``@triton.jit``
functions of Triton's standard library, which the interpreted copy cannot call.

Compute type ``P``: float64 for float64 copies (``DOUBLE``), float32 otherwise (bf16/fp16 storage
is loaded to float32 and rounded to nearest even on store, as the CPU kernels do for bf16).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_E = 32  # as the CPU kernels (mk_cpu.cpp's MAX_E)


# -- helpers -------------------------------------------------------------------------------------
@triton.jit
def _splitmix64(counter, key):
    """SplitMix64 output ``counter`` of stream ``key`` (uint64, wrapping), as ``sampling.splitmix64``."""
    x = key + (counter + 1) * 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _key(bits):
    """A stream key (an int argument or a loaded int64) as the uint64 the hash takes."""
    return _i64(bits).to(tl.uint64, bitcast=True)


@triton.jit
def _i64(x):
    """An int argument as an int64 scalar. Int arguments are not annotated ``tl.int64``: Triton specializes the
    value 1 as a constant, which an annotated parameter cannot take (its launcher asserts); this also widens
    ``i32`` sizes, so ``k * n`` cannot overflow."""
    return tl.full([], x, tl.int64)


@triton.jit
def _replace(rows, i: tl.constexpr, value):
    """``rows`` with entry ``i`` replaced (tuples are immutable)."""
    out = ()
    for k in tl.static_range(len(rows)):
        if k == i:
            out = out + (value,)
        else:
            out = out + (rows[k],)
    return out


@triton.jit
def _total(rows):
    """Sum over copies, accumulated in copy order (the CPU kernels' order)."""
    total = rows[0]
    for k in tl.static_range(1, len(rows)):
        total = total + rows[k]
    return total


@triton.jit
def _f64(x):
    """A float scalar argument as a float64 scalar tensor: compiled kernels receive float64 values, the
    interpreter plain Python floats, which arithmetic with a tensor would round to float32 first."""
    return tl.full([], x, tl.float64)


@triton.jit
def _cast(x, T: tl.constexpr):
    """``x`` in storage type ``T``, rounded to nearest even. bfloat16 by hand, as mk_cpu.cpp's ``Io<bf16>``:
    compiled kernels round so too, but the interpreter truncates, and the tests compare bits."""
    if T == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = tl.where(nan, (bits >> 16) | 0x40, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(T)
    return out


@triton.jit
def _div(a, b):
    """IEEE division (float32 ``/`` is approximate on GPUs; float64 ``/`` is already correctly rounded)."""
    if a.dtype == tl.float64:
        out = a / b
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def _sqrt(a):
    """IEEE square root (as ``_div``)."""
    if a.dtype == tl.float64:
        out = tl.sqrt(a)
    else:
        out = tl.sqrt_rn(a)
    return out


@triton.jit
def _uniform_rows(E: tl.constexpr, BLOCK: tl.constexpr, P: tl.constexpr):
    """``E`` rows of ``1/E``, typed from the double (a bare ``1/e`` would be rounded to float32 first)."""
    rows = ()
    for k in tl.static_range(E):
        rows = rows + (tl.full([BLOCK], 1.0 / E, P),)
    return rows


# -- the p stream ------------------------------------------------------------------------------
@triton.jit
def _probabilities(key, cols, E: tl.constexpr, BLOCK: tl.constexpr, DOUBLE: tl.constexpr, UNIFORM: tl.constexpr):
    """``p`` of stream ``key`` at stream columns ``cols`` (``[BLOCK]`` uint64) as ``E`` rows (mk_cpu.cpp's probabilities)."""
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    if E == 1 or UNIFORM:
        p = _uniform_rows(E, BLOCK, P)
    else:
        p = _dirichlet_rows(key, cols, E, DOUBLE)
    return p


@triton.jit
def _dirichlet_rows(key, cols, E: tl.constexpr, DOUBLE: tl.constexpr):
    """Dirichlet(1) rows for ``E >= 2`` (one return per function: the compiler needs it for tuples)."""
    COUNT: tl.constexpr = E - 1 if E <= 16 else E  # uniforms per column (sampling.uniform_rows; MAX_SPACINGS_E = 16)
    PER_WORD: tl.constexpr = 1 if DOUBLE else 2  # float32: two 24-bit fields per 64-bit output
    WORDS: tl.constexpr = (COUNT + PER_WORD - 1) // PER_WORD
    u = ()
    for r in tl.static_range(WORDS):
        if WORDS > 1:
            word = _splitmix64(cols * WORDS + r, key)
        else:
            word = _splitmix64(cols, key)
        if DOUBLE:
            u = u + ((word >> 11).to(tl.float64) * 1.1102230246251565e-16,)  # 53-bit field * 2**-53
        else:
            u = u + ((word >> 40).to(tl.float32) * 5.9604644775390625e-08,)  # 24-bit fields * 2**-24
            if 2 * r + 1 < COUNT:
                u = u + (((word >> 8) & 0xFFFFFF).to(tl.float32) * 5.9604644775390625e-08,)
    TINY: tl.constexpr = 5.551115123125783e-17 if DOUBLE else 2.9802322387695312e-08  # machine epsilon / 4
    p = ()
    if E <= 16:
        for sweep in tl.static_range(COUNT - 1, 0, -1):  # bubble-sort network: compare-exchange neighbours
            for i in tl.static_range(sweep):
                a = u[i]
                b = u[i + 1]
                u = _replace(_replace(u, i, tl.minimum(a, b)), i + 1, tl.maximum(a, b))
        low = tl.maximum(u[0], TINY)  # clamped before differencing, as the CPU and torch streams
        p = p + (low,)
        for i in tl.static_range(1, COUNT):
            p = p + (tl.maximum(u[i] - low, TINY),)
            low = u[i]
        p = p + (1.0 - low,)  # spacings of the sorted uniforms
    else:
        x = ()
        for k in tl.static_range(COUNT):
            x = x + (-tl.log(tl.maximum(u[k], TINY)),)
        total = _total(x)
        for k in tl.static_range(COUNT):
            p = p + (_div(x[k], total),)
    return p


@triton.jit
def _norm(p):
    """``s = sqrt(sum_k p_k^2)`` per element, summed in copy order (mk_cpu.cpp's norm_block)."""
    total = p[0] * p[0]
    for k in tl.static_range(1, len(p)):
        total = total + p[k] * p[k]
    return _sqrt(total)


@triton.jit
def _mix_rows(copies_ptr, p, idx, mask, n, P: tl.constexpr):
    """``sum_k p_k * copies[k]`` at ``idx``, accumulated in ``P`` in copy order."""
    acc = p[0] * tl.load(copies_ptr + idx, mask=mask, other=0.0).to(P)
    for k in tl.static_range(1, len(p)):
        acc = acc + p[k] * tl.load(copies_ptr + k * n + idx, mask=mask, other=0.0).to(P)
    return acc


# -- adversarial p (appendix B; mk_cpu.cpp's adversarial_probabilities) -----------------------------
@triton.jit
def _adversarial(copies_ptr, probe_ptr, weight_ptr, idx, mask, n, key, cols, ascent_step,
                 E: tl.constexpr, BLOCK: tl.constexpr, DOUBLE: tl.constexpr,
                 RANDOMIZE: tl.constexpr, WEIGHT_IN: tl.constexpr, WEIGHT_OUT: tl.constexpr):
    """B.1 ``Normalize(1/e + step * W~_k * probe)``; B.2 mixes in the stream's draw with the per-element
    weight ``u`` (read from ``weight_ptr`` if ``WEIGHT_IN``, else computed and, if ``WEIGHT_OUT``, saved)."""
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    base = tl.full([BLOCK], 1.0 / E, P)
    probe = tl.load(probe_ptr + idx, mask=mask, other=0.0).to(P)
    step = ascent_step.to(P)
    q = ()
    for k in tl.static_range(E):
        grad_p = tl.load(copies_ptr + k * n + idx, mask=mask, other=0.0).to(P) * probe
        q = q + (tl.maximum(tl.where(step != 0, grad_p * step + base, base), 0.0),)
    total = _total(q)
    TINY: tl.constexpr = 2.2250738585072014e-308 if DOUBLE else 1.1754943508222875e-38  # smallest normal
    p = ()
    for k in tl.static_range(E):
        p = p + (tl.where(total > 0, _div(q[k], tl.maximum(total, TINY)), base),)
    if RANDOMIZE and E > 1:
        drawn = _dirichlet_rows(key, cols, E, DOUBLE)
        if WEIGHT_IN:
            u = tl.load(weight_ptr + idx, mask=mask, other=0.0).to(P)
        else:
            terms = ()
            for k in tl.static_range(E):
                terms = terms + (p[k] * tl.log(tl.maximum(p[k], TINY)),)
            log_e = tl.log(tl.full([BLOCK], E, tl.float64)).to(P)
            u = _div(_total(terms) + log_e, log_e)
            u = tl.minimum(tl.maximum(u, 0.0), 1.0)
            if WEIGHT_OUT:
                tl.store(weight_ptr + idx, _cast(u, weight_ptr.dtype.element_ty), mask=mask)
        mixed = ()
        for k in tl.static_range(E):
            mixed = mixed + (u * p[k] + (1.0 - u) * drawn[k],)
        p = mixed
    return p


@triton.jit
def _store_rows(out_ptr, p, idx, mask, n):
    for k in tl.static_range(len(p)):
        tl.store(out_ptr + k * n + idx, _cast(p[k], out_ptr.dtype.element_ty), mask=mask)


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def probabilities_kernel(out_ptr, key_ptr, n, offset, E: tl.constexpr, BLOCK: tl.constexpr,
                         DOUBLE: tl.constexpr, UNIFORM: tl.constexpr):
    """``out[k, i] = p_k`` of stream column ``offset + i`` (``out``: ``[E, n]``)."""
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    p = _probabilities(_key(tl.load(key_ptr)), (idx + offset).to(tl.uint64), E, BLOCK, DOUBLE, UNIFORM)
    _store_rows(out_ptr, p, idx, mask, n)


@triton.jit
def mix_kernel(copies_ptr, out_ptr, key_ptr, n, offset, E: tl.constexpr, BLOCK: tl.constexpr,
               DOUBLE: tl.constexpr, UNIFORM: tl.constexpr):
    """``out = sum_k p_k * copies[k]`` (the generic path's forward, and the fused path's weight rewrite)."""
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    p = _probabilities(_key(tl.load(key_ptr)), (idx + offset).to(tl.uint64), E, BLOCK, DOUBLE, UNIFORM)
    tl.store(out_ptr + idx, _cast(_mix_rows(copies_ptr, p, idx, mask, n, P), out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def spread_kernel(grad_ptr, out_ptr, key_ptr, n, offset, scale: tl.float64, E: tl.constexpr,
                  BLOCK: tl.constexpr, DOUBLE: tl.constexpr, SCALED: tl.constexpr):
    """``out[k] = p_k * grad`` (times ``scale``): the generic path's backward into the copies."""
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    T: tl.constexpr = out_ptr.dtype.element_ty
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    p = _probabilities(_key(tl.load(key_ptr)), (idx + offset).to(tl.uint64), E, BLOCK, DOUBLE, False)
    grad = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(P)
    for k in tl.static_range(E):
        value = _cast(p[k] * grad, T)  # rounded to the gradient's dtype, then scaled (as mkopt.fused._spread)
        if SCALED:
            value = _cast(value.to(P) * _f64(scale).to(P), T)
        tl.store(out_ptr + k * n + idx, value, mask=mask)


@triton.jit
def scale_grad_kernel(grad_ptr, out_ptr, key_ptr, n, offset, E: tl.constexpr, BLOCK: tl.constexpr,
                      DOUBLE: tl.constexpr, UNIFORM: tl.constexpr):
    """``out = sqrt(sum_k p_k^2) * grad``: the fused path's proxy gradient (its norm is the copies')."""
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    p = _probabilities(_key(tl.load(key_ptr)), (idx + offset).to(tl.uint64), E, BLOCK, DOUBLE, UNIFORM)
    grad = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(P)
    tl.store(out_ptr + idx, _cast(_norm(p) * grad, out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["key_now"])
def ascend_kernel(copies_ptr, probe_ptr, w_ptr, norm_ptr, weight_ptr, ascent_ptr, n, offset,
                  key_now, ascent_scale: tl.float64, E: tl.constexpr, BLOCK: tl.constexpr,
                  DOUBLE: tl.constexpr, RANDOMIZE: tl.constexpr, WEIGHT_OUT: tl.constexpr):
    """The adversarial step's ``W = sum_k p_k W~_k`` and ``s = sqrt(sum_k p_k^2)`` (B.2 also saves ``u``).

    The ascent step is ``load(ascent_ptr) * ascent_scale``: a device scalar (e.g. the inverse loss
    scale times the probe's finite flag) so that the host never reads the scale or the finite check."""
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    step = tl.load(ascent_ptr).to(tl.float64) * _f64(ascent_scale)
    p = _adversarial(copies_ptr, probe_ptr, weight_ptr, idx, mask, n, _key(key_now), (idx + offset).to(tl.uint64), step,
                     E, BLOCK, DOUBLE, RANDOMIZE, False, WEIGHT_OUT)
    tl.store(w_ptr + idx, _cast(_mix_rows(copies_ptr, p, idx, mask, n, P), w_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + idx, _cast(_norm(p), norm_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["key_now"])
def adversarial_probabilities_kernel(copies_ptr, probe_ptr, out_ptr, ascent_ptr, n, offset,
                                     key_now, ascent_scale: tl.float64, E: tl.constexpr, BLOCK: tl.constexpr,
                                     DOUBLE: tl.constexpr, RANDOMIZE: tl.constexpr):
    """The adversarial ``p`` (``out``: ``[E, n]``) the ascent and the update use."""
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    step = tl.load(ascent_ptr).to(tl.float64) * _f64(ascent_scale)
    p = _adversarial(copies_ptr, probe_ptr, out_ptr, idx, mask, n, _key(key_now), (idx + offset).to(tl.uint64), step,
                     E, BLOCK, DOUBLE, RANDOMIZE, False, False)
    _store_rows(out_ptr, p, idx, mask, n)


@triton.jit(do_not_specialize=["key_now"])
def adversarial_divergence_kernel(copies_ptr, probe_ptr, out_ptr, ascent_ptr, n, offset, start, run, key_now,
                                  ascent_scale: tl.float64, E: tl.constexpr, BLOCK: tl.constexpr, DOUBLE: tl.constexpr,
                                  RANDOMIZE: tl.constexpr):
    """``out[i] = KL(p || uniform) / log e`` of the adversarial ``p`` at elements ``start + i``, ``i < run``
    (``adversarial.divergence_from_uniform``): the entropy diagnostic's samples, without materializing ``p``."""
    n, offset, start, run = _i64(n), _i64(offset), _i64(start), _i64(run)
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < run
    idx = start + local
    step = tl.load(ascent_ptr).to(tl.float64) * _f64(ascent_scale)
    p = _adversarial(copies_ptr, probe_ptr, out_ptr, idx, mask, n, _key(key_now), (idx + offset).to(tl.uint64), step,
                     E, BLOCK, DOUBLE, RANDOMIZE, False, False)
    if E == 1:
        divergence = tl.full([BLOCK], 0.0, P)
    else:
        TINY: tl.constexpr = 2.2250738585072014e-308 if DOUBLE else 1.1754943508222875e-38
        terms = ()
        for k in tl.static_range(E):
            terms = terms + (p[k] * tl.log(tl.maximum(p[k], TINY)),)
        log_e = tl.log(tl.full([BLOCK], E, tl.float64)).to(P)
        divergence = tl.minimum(tl.maximum(_div(_total(terms) + log_e, log_e), 0.0), 1.0)
    tl.store(out_ptr + local, _cast(divergence, out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["key_now", "key_next"])  # keys change every step: never recompile for them
def fused_update_kernel(
    copies_ptr, w_ptr, grad_ptr, buf_ptr, sq_ptr, max_sq_ptr, probe_ptr, weight_ptr, ascent_ptr, step_ptr, lr_ptr,
    n, offset, key_now, key_next,
    lr_value: tl.float64, weight_decay: tl.float64, momentum: tl.float64, dampening: tl.float64,
    beta1: tl.float64, beta2: tl.float64, eps: tl.float64, log2_beta1: tl.float64, log2_beta2: tl.float64,
    ascent_scale: tl.float64,
    E: tl.constexpr, BLOCK: tl.constexpr, DOUBLE: tl.constexpr, ADAM: tl.constexpr,
    HAS_GRAD: tl.constexpr, UNIFORM: tl.constexpr, UNIFORM_NEXT: tl.constexpr, ADVERSARIAL: tl.constexpr,
    RANDOMIZE: tl.constexpr, MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, AMSGRAD: tl.constexpr,
):
    """One fused MK step of a block (mk_cpu.cpp's fused_update with sgd_row / AdamRow).

    ``p_t`` (stream or adversarial), ``g_k = p_k / s * grad``, the SGD or Adam(W) update of copy ``k``
    and its state in place, then ``W_t+1 = sum_k p_t+1,k W~_k``. ``buf_ptr``: SGD's momentum buffer or
    Adam's ``exp_avg``; ``sq_ptr`` / ``max_sq_ptr``: ``exp_avg_sq`` / ``max_exp_avg_sq``. ``DECAY``: 0 none,
    1 coupled, 2 decoupled (AdamW). Adam reads its step count from ``step_ptr`` (a device tensor,
    already incremented) and ``lr`` from ``lr_ptr`` when ``LR_TENSOR``: no host value is needed.
    """
    P: tl.constexpr = tl.float64 if DOUBLE else tl.float32
    T: tl.constexpr = copies_ptr.dtype.element_ty
    n, offset = _i64(n), _i64(offset)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    cols = (idx + offset).to(tl.uint64)
    if HAS_GRAD:
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = _f64(lr_value)
        weight_decay = _f64(weight_decay)
        if ADVERSARIAL:
            step = tl.load(ascent_ptr).to(tl.float64) * _f64(ascent_scale)
            p = _adversarial(copies_ptr, probe_ptr, weight_ptr, idx, mask, n, _key(key_now), cols, step,
                             E, BLOCK, DOUBLE, RANDOMIZE, RANDOMIZE, False)
        else:
            p = _probabilities(_key(key_now), cols, E, BLOCK, DOUBLE, UNIFORM)
        factor = _div(tl.load(grad_ptr + idx, mask=mask, other=0.0).to(P), _norm(p))  # g_k = p_k * factor
        if MAXIMIZE:
            factor = -factor
        wd = weight_decay.to(P)
        if ADAM:
            t = tl.load(step_ptr).to(tl.float64)
            step_size = (lr / (1.0 - tl.exp2(t * _f64(log2_beta1)))).to(P)  # lr / (1 - beta1^t), in double
            inv_bias2_sqrt = (1.0 / _sqrt(1.0 - tl.exp2(t * _f64(log2_beta2)))).to(P)
            shrink = (1.0 - lr * weight_decay).to(P)
            one_minus_beta1 = (1.0 - _f64(beta1)).to(P)
            one_minus_beta2 = (1.0 - _f64(beta2)).to(P)
            beta2_p = _f64(beta2).to(P)
            eps_p = _f64(eps).to(P)
            for k in tl.static_range(E):
                row = k * n + idx
                weight = tl.load(copies_ptr + row, mask=mask, other=0.0).to(P)
                g = p[k] * factor
                if DECAY == 2:
                    weight = weight * shrink
                if DECAY == 1:
                    g = g + wd * weight
                m_old = tl.load(buf_ptr + row, mask=mask, other=0.0).to(P)
                m_new = _cast(m_old + one_minus_beta1 * (g - m_old), T).to(P)  # torch's lerp; stored precision
                tl.store(buf_ptr + row, _cast(m_new, T), mask=mask)
                second = _cast(beta2_p * tl.load(sq_ptr + row, mask=mask, other=0.0).to(P) + one_minus_beta2 * g * g, T).to(P)
                tl.store(sq_ptr + row, _cast(second, T), mask=mask)
                if AMSGRAD:
                    second = tl.maximum(tl.load(max_sq_ptr + row, mask=mask, other=0.0).to(P), second)
                    tl.store(max_sq_ptr + row, _cast(second, T), mask=mask)
                denom = _sqrt(second) * inv_bias2_sqrt + eps_p
                tl.store(copies_ptr + row, _cast(weight - _div(step_size * m_new, denom), T), mask=mask)
        else:
            lr_p = lr.to(P)
            mom = _f64(momentum).to(P)
            keep = (1.0 - _f64(dampening)).to(P)
            for k in tl.static_range(E):
                row = k * n + idx
                weight = tl.load(copies_ptr + row, mask=mask, other=0.0).to(P)
                g = p[k] * factor
                if DECAY != 0:
                    g = g + wd * weight
                if HAS_MOMENTUM:
                    if FIRST_MOMENTUM:
                        buf = _cast(g, T).to(P)
                    else:
                        buf = _cast(mom * tl.load(buf_ptr + row, mask=mask, other=0.0).to(P) + keep * g, T).to(P)
                    tl.store(buf_ptr + row, _cast(buf, T), mask=mask)
                    if NESTEROV:
                        g = g + mom * buf
                    else:
                        g = buf
                tl.store(copies_ptr + row, _cast(weight - lr_p * g, T), mask=mask)
    p_next = _probabilities(_key(key_next), cols, E, BLOCK, DOUBLE, UNIFORM or UNIFORM_NEXT)
    tl.store(w_ptr + idx, _cast(_mix_rows(copies_ptr, p_next, idx, mask, n, P), w_ptr.dtype.element_ty), mask=mask)
