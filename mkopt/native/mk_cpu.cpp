// Fused Majority-Kernels kernels for CPU: one pass per element and step (see mkopt/native/__init__.py).
//
// Every kernel regenerates the Dirichlet(1) probabilities p from (stream key, column index) exactly as
// mkopt/sampling.py's probability_rows does (SplitMix64 counters, uniform spacings up to e = 16, normalized
// exponentials above): bit-identical p for e <= 16. Work is done in blocks of BLOCK elements so that each
// inner loop runs over elements with no data-dependent branches and vectorizes; blocks are spread over
// torch's own OpenMP runtime (libgomp.so.1, already loaded by torch).
//
// Built with -ffp-contract=off: no fused multiply-adds, so the W written by a resumed run equals the W
// written in the step, whatever the build machine.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(MK_WITH_MVEC) && defined(__AVX512F__)
#include <immintrin.h>
extern "C" __m512 _ZGVeN16v_logf(__m512);  // glibc's libmvec: 16 logf at once (<= 4 ulp)
#endif

namespace {

constexpr int64_t BLOCK = 1024;
constexpr int MAX_E = 32;
constexpr int MAX_SPACINGS_E = 16;
// Below this many elements a kernel runs on the calling thread: waking the OpenMP team costs ~30-40 us
// inside a training step (measured: a 1,000-element scale_grad took 41 us in backward, 7 us serially),
// more than splitting ~30 k elements of this work saves. Which thread runs a block never changes its bits.
constexpr int64_t PARALLEL_MIN = 32768;

inline uint64_t splitmix64(uint64_t counter, uint64_t key) {
  uint64_t x = key + (counter + 1) * 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// A: the probability type (float for float32/bf16 weights, double for float64 weights).
template <typename A> struct Bits;
template <> struct Bits<float> {
  static constexpr int per_word = 2;
  static inline float tiny() { return 1.1920928955078125e-07f / 4; }  // FLT_EPSILON / 4
};
template <> struct Bits<double> {
  static constexpr int per_word = 1;
  static inline double tiny() { return 2.220446049250313e-16 / 4; }  // DBL_EPSILON / 4
};

// p[k][j] for columns col0 .. col0 + len of stream `key`; `uniform`: p = 1/e.
template <typename A>
void probabilities(int e, uint64_t key, int64_t col0, int64_t len, bool uniform, A (*p)[BLOCK]) {
  if (e == 1 || uniform) {
    const A value = e == 1 ? A(1) : A(1.0 / e);
    for (int k = 0; k < e; ++k)
      for (int64_t j = 0; j < len; ++j) p[k][j] = value;
    return;
  }
  const int count = e <= MAX_SPACINGS_E ? e - 1 : e;
  const int per_word = Bits<A>::per_word;
  const int words = (count + per_word - 1) / per_word;
  A u[MAX_E][BLOCK];
  for (int r = 0; r < words; ++r) {
    const bool second = per_word == 2 && 2 * r + 1 < count;
    A* first_row = u[per_word * r];
    A* second_row = u[second ? 2 * r + 1 : 0];
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t column = uint64_t(col0 + j);
      const uint64_t word = splitmix64(words > 1 ? column * uint64_t(words) + uint64_t(r) : column, key);
      if (per_word == 2) {
        // 24-bit fields through 32-bit integers: exact, and 16 lanes per conversion instead of 8
        first_row[j] = A(float(int32_t(uint32_t(word >> 40))) * 0x1p-24f);
        if (second) second_row[j] = A(float(int32_t(uint32_t(word >> 8) & 0xFFFFFFu)) * 0x1p-24f);
      } else {
        first_row[j] = A(double(word >> 11) * 0x1p-53);
      }
    }
  }
  const A tiny = Bits<A>::tiny();
  if (e <= MAX_SPACINGS_E) {
    for (int sweep = count - 1; sweep > 0; --sweep)  // bubble-sort network, as sampling.dirichlet_from_uniforms
      for (int i = 0; i < sweep; ++i)
        for (int64_t j = 0; j < len; ++j) {
          const A a = u[i][j], b = u[i + 1][j];
          u[i][j] = a < b ? a : b;
          u[i + 1][j] = a < b ? b : a;
        }
    for (int64_t j = 0; j < len; ++j) {
      const A first = u[0][j] > tiny ? u[0][j] : tiny;
      u[0][j] = first;
      p[0][j] = first;
    }
    for (int i = 1; i < count; ++i)
      for (int64_t j = 0; j < len; ++j) {
        const A gap = u[i][j] - u[i - 1][j];
        p[i][j] = gap > tiny ? gap : tiny;
      }
    for (int64_t j = 0; j < len; ++j) p[e - 1][j] = A(1) - u[count - 1][j];
    return;
  }
  A total[BLOCK];
  for (int k = 0; k < e; ++k)
    for (int64_t j = 0; j < len; ++j) {
      const A x = -std::log(u[k][j] > tiny ? u[k][j] : tiny);
      p[k][j] = x;
      total[j] = k == 0 ? x : total[j] + x;
    }
  for (int k = 0; k < e; ++k)
    for (int64_t j = 0; j < len; ++j) p[k][j] = p[k][j] / total[j];
}


// out[j] = log(in[j]) for a block: B.2's divergence weight takes e logarithms per element, and glibc's
// scalar logf dominated the ascent (gcc vectorizes neither it nor a hand-written polynomial log here).
// float: libmvec's AVX-512 logf where the build found it (mkopt/native tries -lmvec first); double: std::log.
inline void log_block(const double* in, double* out, int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = std::log(in[j]);
}
inline void log_block(const float* in, float* out, int64_t len) {
  int64_t j = 0;
#if defined(MK_WITH_MVEC) && defined(__AVX512F__)
  for (; j + 16 <= len; j += 16) _mm512_storeu_ps(out + j, _ZGVeN16v_logf(_mm512_loadu_ps(in + j)));
#endif
  for (; j < len; ++j) out[j] = std::log(in[j]);
}

// Ask for the next block's part of a row (the contiguous bytes after this block's): a block's run of
// one row spans about one 4 KiB page, and hardware prefetchers do not cross pages, so without this
// every row of every block starts with cache misses (measured: the update loop stalled on its loads).
// Into L2 (locality 1), not L1: a block's rows are ~32-44 KiB, more than L1 holds, and the L1 miss
// buffers are few (measured 2-4 % faster than locality 3 on the whole update, rows evicted first).
template <typename T>
inline void prefetch_next_block(const T* row, int64_t b0, int64_t n, bool write) {
  const int64_t next = b0 + BLOCK;
  if (row == nullptr || next >= n) return;
  const int64_t len = n - next < BLOCK ? n - next : BLOCK;
  const char* start = reinterpret_cast<const char*>(row + next);
  const int64_t bytes = len * int64_t(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write) __builtin_prefetch(start + off, 1, 1);
    else __builtin_prefetch(start + off, 0, 1);
  }
}

// Storage types: float, double, and bfloat16 held as uint16_t (computed in float, rounded to nearest even).
struct bf16 {
  uint16_t bits;
};
template <typename T, typename A> struct Io {
  static inline A load(const T* x, int64_t i) { return A(x[i]); }
  static inline void store(T* x, int64_t i, A v) { x[i] = T(v); }
  static inline A round(A v) { return v; }  // to the storage precision (a no-op unless T is narrower)
};
template <> struct Io<bf16, float> {
  static inline float load(const bf16* x, int64_t i) {
    uint32_t u = uint32_t(x[i].bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline void store(bf16* x, int64_t i, float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    x[i].bits = uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
  }
  static inline float round(float v) {
    bf16 b;
    store(&b, 0, v);
    return load(&b, 0);
  }
};

}  // namespace

extern "C" {

// Everything one fused update needs besides the tensors. Mirrors mkopt.native.StepArgs (ctypes).
struct StepArgs {
  int64_t n;          // elements per copy
  int64_t offset;     // first stream column of this tensor
  uint64_t key_now;   // stream key of the step being taken (p_t)
  uint64_t key_next;  // stream key of the next step (p_{t+1}), for the next W
  int32_t e;
  int32_t uniform;    // p = 1/e (probabilities="uniform")
  int32_t has_grad;   // 0: no gradient this step (copies and states untouched; W rewritten with p_{t+1})
  int32_t maximize;
  double lr;
  double weight_decay;
  double grad_scale;  // lr_compensation: e; else 1
  // SGD
  double momentum;
  double dampening;
  int32_t nesterov;
  int32_t first_momentum;  // no momentum buffer yet: buf = g (torch's first step)
  // Adam / AdamW
  double beta1;
  double beta2;
  double eps;
  double step_size;        // lr / (1 - beta1^t)
  double bias2_sqrt;       // sqrt(1 - beta2^t)
  int32_t amsgrad;
  int32_t decoupled;       // AdamW's decoupled weight decay
  // adversarial probabilities (appendix B): p_t from the probe's dL/dW instead of the stream
  int32_t adversarial;     // 1: p_t = Normalize(1/e + ascent_step * W~_k * probe) (B.1)
  int32_t randomize;       // B.2: mix in the stream's Dirichlet draw (key_now), weighted per element
  double ascent_step;      // eps / loss scale; 0: p_t uniform (B.1) or the draw (B.2)
  int32_t uniform_next;    // the next W is the mean (the next step's adversarial probe)
};

}  // extern "C"

namespace {

// Adversarial p of columns b0 .. b0 + len (mkopt/adversarial.py's ascend_, per element): q_k =
// 1/e + step * W~_k * probe, clamped at 0 and normalized (all-zero columns uniform); B.2 then mixes
// in the Dirichlet draw d with weight u = KL(q || uniform) / log e: p = u q + (1 - u) d.
// ``weight_in``: B.2's per-element weight u saved by the ascent (the update reuses it: no logarithms
// twice, identical p); ``weight_out``: where the ascent saves it. Both may be null.
template <typename T, typename A>
void adversarial_probabilities(const StepArgs& a, const T* copies, const T* probe, int64_t b0, int64_t len, A (*p)[BLOCK],
                               const A* weight_in = nullptr, A* weight_out = nullptr) {
  const int e = a.e;
  const A base = A(1.0 / e);
  const A step = A(a.ascent_step);
  A total[BLOCK];
  for (int k = 0; k < e; ++k) {
    const T* c = copies + k * a.n + b0;
    for (int64_t j = 0; j < len; ++j) {
      A q = base;
      if (a.ascent_step != 0) {
        const A grad_p = A(Io<T, A>::load(c, j) * Io<T, A>::load(probe + b0, j));
        q = grad_p * step + base;
      }
      q = q > A(0) ? q : A(0);
      p[k][j] = q;
      total[j] = k == 0 ? q : total[j] + q;
    }
  }
  const A tiny = std::numeric_limits<A>::min();
  for (int k = 0; k < e; ++k)
    for (int64_t j = 0; j < len; ++j) p[k][j] = total[j] > A(0) ? p[k][j] / (total[j] > tiny ? total[j] : tiny) : base;
  if (!a.randomize) return;
  if (e == 1) return;
  A drawn[MAX_E][BLOCK];
  A kl[BLOCK];
  probabilities<A>(e, a.key_now, a.offset + b0, len, false, drawn);
  if (weight_in != nullptr) {
    for (int64_t j = 0; j < len; ++j) kl[j] = weight_in[b0 + j];
  } else {
    A clamped[BLOCK];
    A logs[BLOCK];
    for (int k = 0; k < e; ++k) {  // once per step: the update reuses u
      for (int64_t j = 0; j < len; ++j) clamped[j] = p[k][j] > tiny ? p[k][j] : tiny;
      log_block(clamped, logs, len);
      for (int64_t j = 0; j < len; ++j) {
        const A term = p[k][j] * logs[j];
        kl[j] = k == 0 ? term : kl[j] + term;
      }
    }
    const A log_e = A(std::log(double(e)));
    for (int64_t j = 0; j < len; ++j) {
      A u = (kl[j] + log_e) / log_e;
      kl[j] = u < A(0) ? A(0) : (u > A(1) ? A(1) : u);
    }
    if (weight_out != nullptr)
      for (int64_t j = 0; j < len; ++j) weight_out[b0 + j] = kl[j];
  }
  for (int k = 0; k < e; ++k)
    for (int64_t j = 0; j < len; ++j) p[k][j] = kl[j] * p[k][j] + (A(1) - kl[j]) * drawn[k][j];
}

// p_t of one block: from the probe (adversarial modes) or from the stream.
template <typename T, typename A>
void step_probabilities(const StepArgs& a, const T* copies, const T* probe, const A* weight, int64_t b0, int64_t len,
                        A (*p)[BLOCK]) {
  if (a.adversarial) adversarial_probabilities<T, A>(a, copies, probe, b0, len, p, weight);
  else probabilities<A>(a.e, a.key_now, a.offset + b0, len, a.uniform, p);
}

// w[b0 .. b0 + len] = sum_k p_k * copies[k][b0 ..] (accumulated in A, in copy order, cast once).
template <typename T, typename A>
void mix_block(int e, int64_t n, const T* copies, T* w, int64_t b0, int64_t len, A (*p)[BLOCK]) {
  A acc[BLOCK];
  for (int k = 0; k < e; ++k) {
    const T* c = copies + k * n + b0;
    for (int64_t j = 0; j < len; ++j) {
      const A term = p[k][j] * Io<T, A>::load(c, j);
      acc[j] = k == 0 ? term : acc[j] + term;
    }
  }
  for (int64_t j = 0; j < len; ++j) Io<T, A>::store(w + b0, j, acc[j]);
}

// s[j] = sqrt(sum_k p_k[j]^2) for a block: the scale of the proxy's gradient (its norm is the copies').
template <typename A>
void norm_block(int e, int64_t len, A (*p)[BLOCK], A* s) {
  for (int k = 0; k < e; ++k)
    for (int64_t j = 0; j < len; ++j) s[j] = k == 0 ? p[k][j] * p[k][j] : s[j] + p[k][j] * p[k][j];
  for (int64_t j = 0; j < len; ++j) s[j] = std::sqrt(s[j]);
}

// The adversarial step's weight W = sum_k p_k W~_k and s = sqrt(sum_k p_k^2) (its gradient's scale).
template <typename T, typename A>
void ascend(const StepArgs& a, const T* copies, const T* probe, T* w, T* norm, A* weight) {
  const int e = a.e;
  const int64_t n = a.n;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
  for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
    const int64_t len = n - b0 < BLOCK ? n - b0 : BLOCK;
    A p[MAX_E][BLOCK];
    A s[BLOCK];
    adversarial_probabilities<T, A>(a, copies, probe, b0, len, p, nullptr, weight);
    mix_block<T, A>(e, n, copies, w, b0, len, p);
    norm_block<A>(e, len, p, s);
    for (int64_t j = 0; j < len; ++j) Io<T, A>::store(norm + b0, j, s[j]);
  }
}

template <typename T, typename A>
void mix(int e, int64_t n, int64_t offset, uint64_t key, bool uniform, const T* copies, T* w) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
  for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
    const int64_t len = n - b0 < BLOCK ? n - b0 : BLOCK;
    A p[MAX_E][BLOCK];
    probabilities<A>(e, key, offset + b0, len, uniform, p);
    mix_block<T, A>(e, n, copies, w, b0, len, p);
  }
}

// out = sqrt(sum_k p_k^2) * grad: the proxy's gradient, whose norm is the copies' gradients' norm.
template <typename T, typename A>
void scale_grad(int e, int64_t n, int64_t offset, uint64_t key, bool uniform, const T* grad, T* out) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
  for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
    const int64_t len = n - b0 < BLOCK ? n - b0 : BLOCK;
    A p[MAX_E][BLOCK];
    A s[BLOCK];
    probabilities<A>(e, key, offset + b0, len, uniform, p);
    norm_block<A>(e, len, p, s);
    for (int64_t j = 0; j < len; ++j) Io<T, A>::store(out + b0, j, s[j] * Io<T, A>::load(grad + b0, j));
  }
}

// g_k = p_k / s * grad (= p_k * dL/dW), sign and lr compensation applied, per column of the block.
template <typename T, typename A>
void per_copy_factor(const StepArgs& a, const T* grad, int64_t b0, int64_t len, A (*p)[BLOCK], A* factor) {
  A s[BLOCK];
  norm_block<A>(a.e, len, p, s);
  const A sign = A(a.maximize ? -a.grad_scale : a.grad_scale);
  for (int64_t j = 0; j < len; ++j) factor[j] = sign * Io<T, A>::load(grad + b0, j) / s[j];
}

// The skeleton every fused update shares, per block of columns: first the next block's rows are
// requested (``prefetch_rows(k, next_b0)``: copy k's state; copies, grad and w here), then this block's
// p_t and p_t+1 are drawn -- pure arithmetic in L1, during which those loads arrive -- then the
// per-column factor p_k / s * grad is folded into g_k by ``update_row(k, p_k, factor, b0, len)``, which
// updates copy k and its state in place, and the next W = sum_k p_t+1,k W~_k is written. (Drawing both
// p before streaming the rows measured faster than interleaving draws and rows: the hash and the memory
// traffic overlap instead of taking turns.)
template <typename T, typename A, typename RowUpdate, typename RowPrefetch>
void fused_update(const StepArgs& a, const T* copies, T* w, const T* grad, const T* probe, const A* weight,
                  RowUpdate update_row, RowPrefetch prefetch_rows) {
  const int e = a.e;
  const int64_t n = a.n;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
  for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
    const int64_t len = n - b0 < BLOCK ? n - b0 : BLOCK;
    A p[MAX_E][BLOCK];
    A p_next[MAX_E][BLOCK];
    A factor[BLOCK];
    if (a.has_grad) {
      prefetch_next_block(grad, b0, n, false);
      prefetch_next_block(w, b0, n, true);
      for (int k = 0; k < e; ++k) {
        prefetch_next_block(copies + k * n, b0, n, true);
        prefetch_rows(k, b0);
      }
      step_probabilities<T, A>(a, copies, probe, weight, b0, len, p);
      per_copy_factor<T, A>(a, grad, b0, len, p, factor);
    }
    probabilities<A>(e, a.key_next, a.offset + b0, len, a.uniform || a.uniform_next, p_next);
    if (a.has_grad)
      for (int k = 0; k < e; ++k) update_row(k, p[k], factor, b0, len);
    mix_block<T, A>(e, n, copies, w, b0, len, p_next);
  }
}

// One copy's SGD update over a block (torch.optim.SGD's single-tensor arithmetic).
template <typename T, typename A>
void sgd_row(const StepArgs& a, const A* p, const A* factor, T* __restrict__ c, T* __restrict__ m, int64_t len) {
  const A lr = A(a.lr), wd = A(a.weight_decay), mom = A(a.momentum), keep = A(1.0 - a.dampening);
  for (int64_t j = 0; j < len; ++j) {
    const A weight = Io<T, A>::load(c, j);
    A g = p[j] * factor[j];
    if (a.weight_decay != 0) g = g + wd * weight;
    if (m != nullptr) {
      const A next = Io<T, A>::round(a.first_momentum ? g : mom * Io<T, A>::load(m, j) + keep * g);  // stored precision
      Io<T, A>::store(m, j, next);
      g = a.nesterov ? g + mom * next : next;
    }
    Io<T, A>::store(c, j, weight - lr * g);
  }
}

template <typename T, typename A>
void sgd(const StepArgs& a, T* copies, T* w, const T* grad, T* buf, const T* probe, const A* weight) {
  const int64_t n = a.n;
  fused_update<T, A>(a, copies, w, grad, probe, weight, [&](int k, const A* p, const A* factor, int64_t b0, int64_t len) {
    sgd_row<T, A>(a, p, factor, copies + k * n + b0, buf == nullptr ? nullptr : buf + k * n + b0, len);
  }, [&](int k, int64_t b0) {
    if (buf != nullptr) prefetch_next_block(buf + k * n, b0, n, true);
  });
}

// One copy's Adam(W) update over a block; DECAY: 0 none, 1 coupled (Adam), 2 decoupled (AdamW).
template <typename T, typename A> struct AdamRow {
  const A* p;
  const A* factor;
  A wd, shrink, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bias2_sqrt, eps;
  template <int DECAY, bool AMSGRAD>
  void run(T* __restrict__ c, T* __restrict__ m, T* __restrict__ v, T* __restrict__ vmax, int64_t len) const {
    for (int64_t j = 0; j < len; ++j) {
      A weight = Io<T, A>::load(c, j);
      A g = p[j] * factor[j];
      if (DECAY == 2) weight = weight * shrink;
      if (DECAY == 1) g = g + wd * weight;
      const A m_old = Io<T, A>::load(m, j);
      const A m_new = Io<T, A>::round(m_old + one_minus_beta1 * (g - m_old));  // torch's lerp for weight < 0.5
      Io<T, A>::store(m, j, m_new);
      A second = Io<T, A>::round(beta2 * Io<T, A>::load(v, j) + one_minus_beta2 * g * g);  // stored precision, as torch
      Io<T, A>::store(v, j, second);
      if (AMSGRAD) {
        const A old = Io<T, A>::load(vmax, j);
        second = old > second ? old : second;
        Io<T, A>::store(vmax, j, second);
      }
      const A denom = std::sqrt(second) * inv_bias2_sqrt + eps;
      Io<T, A>::store(c, j, weight - step_size * m_new / denom);
    }
  }
};

template <typename T, typename A>
void adam(const StepArgs& a, T* copies, T* w, const T* grad, T* exp_avg, T* exp_avg_sq, T* max_exp_avg_sq, const T* probe,
          const A* weight) {
  const int64_t n = a.n;
  const A wd = A(a.weight_decay), shrink = A(1.0 - a.lr * a.weight_decay), beta2 = A(a.beta2), eps = A(a.eps);
  const A one_minus_beta1 = A(1.0 - a.beta1), one_minus_beta2 = A(1.0 - a.beta2);
  const A step_size = A(a.step_size), inv_bias2_sqrt = A(1.0 / a.bias2_sqrt);
  // weight decay off/coupled/decoupled and amsgrad as compile-time variants: branch-free inner loops
  const int variant = (a.weight_decay == 0 ? 0 : a.decoupled ? 2 : 1) + (max_exp_avg_sq != nullptr ? 3 : 0);
  fused_update<T, A>(a, copies, w, grad, probe, weight, [&](int k, const A* p, const A* factor, int64_t b0, int64_t len) {
    T* m = exp_avg + k * n + b0;
    T* v = exp_avg_sq + k * n + b0;
    T* vmax = max_exp_avg_sq == nullptr ? nullptr : max_exp_avg_sq + k * n + b0;
    const AdamRow<T, A> row{p, factor, wd, shrink, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bias2_sqrt, eps};
    T* c = copies + k * n + b0;
    switch (variant) {
      case 0: row.template run<0, false>(c, m, v, vmax, len); break;
      case 1: row.template run<1, false>(c, m, v, vmax, len); break;
      case 2: row.template run<2, false>(c, m, v, vmax, len); break;
      case 3: row.template run<0, true>(c, m, v, vmax, len); break;
      case 4: row.template run<1, true>(c, m, v, vmax, len); break;
      default: row.template run<2, true>(c, m, v, vmax, len); break;
    }
  }, [&](int k, int64_t b0) {
    prefetch_next_block(exp_avg + k * n, b0, n, true);
    prefetch_next_block(exp_avg_sq + k * n, b0, n, true);
    if (max_exp_avg_sq != nullptr) prefetch_next_block(max_exp_avg_sq + k * n, b0, n, true);
  });
}

}  // namespace

// The C entry points, one per storage type: f32 (p float), f64 (p double), bf16 (p float).
#define MK_ENTRY_POINTS(SUFFIX, T, A)                                                                           \
  extern "C" void mk_probabilities_##SUFFIX(int e, int64_t n, int64_t offset, uint64_t key, int uniform,        \
                                            A* out) {                                                          \
    _Pragma("omp parallel for schedule(static) if (n >= PARALLEL_MIN)") for (int64_t b0 = 0; b0 < n; b0 += BLOCK) { \
      const int64_t len = n - b0 < BLOCK ? n - b0 : BLOCK;                                                      \
      A p[MAX_E][BLOCK];                                                                                        \
      probabilities<A>(e, key, offset + b0, len, uniform != 0, p);                                              \
      for (int k = 0; k < e; ++k)                                                                               \
        for (int64_t j = 0; j < len; ++j) out[k * n + b0 + j] = p[k][j];                                        \
    }                                                                                                           \
  }                                                                                                             \
  extern "C" void mk_mix_##SUFFIX(int e, int64_t n, int64_t offset, uint64_t key, int uniform, const T* copies, \
                                  T* w) {                                                                       \
    mix<T, A>(e, n, offset, key, uniform != 0, copies, w);                                                      \
  }                                                                                                             \
  extern "C" void mk_scale_grad_##SUFFIX(int e, int64_t n, int64_t offset, uint64_t key, int uniform,           \
                                         const T* grad, T* out) {                                               \
    scale_grad<T, A>(e, n, offset, key, uniform != 0, grad, out);                                               \
  }                                                                                                             \
  extern "C" void mk_sgd_##SUFFIX(const StepArgs* a, T* copies, T* w, const T* grad, T* buf, const T* probe,   \
                                  const A* weight) {                                                            \
    sgd<T, A>(*a, copies, w, grad, buf, probe, weight);                                                         \
  }                                                                                                             \
  extern "C" void mk_adam_##SUFFIX(const StepArgs* a, T* copies, T* w, const T* grad, T* m, T* v, T* vmax,       \
                                   const T* probe, const A* weight) {                                           \
    adam<T, A>(*a, copies, w, grad, m, v, vmax, probe, weight);                                                 \
  }                                                                                                             \
  extern "C" void mk_ascend_##SUFFIX(const StepArgs* a, const T* copies, const T* probe, T* w, T* norm,         \
                                     A* weight) {                                                               \
    ascend<T, A>(*a, copies, probe, w, norm, weight);                                                           \
  }                                                                                                             \
  extern "C" void mk_adversarial_probabilities_##SUFFIX(const StepArgs* a, const T* copies, const T* probe,     \
                                                        A* out) {                                               \
    _Pragma("omp parallel for schedule(static) if (a->n >= PARALLEL_MIN)") for (int64_t b0 = 0; b0 < a->n; b0 += BLOCK) { \
      const int64_t len = a->n - b0 < BLOCK ? a->n - b0 : BLOCK;                                                \
      A p[MAX_E][BLOCK];                                                                                        \
      adversarial_probabilities<T, A>(*a, copies, probe, b0, len, p);                                           \
      for (int k = 0; k < a->e; ++k)                                                                            \
        for (int64_t j = 0; j < len; ++j) out[k * a->n + b0 + j] = p[k][j];                                     \
    }                                                                                                           \
  }

MK_ENTRY_POINTS(f32, float, float)
MK_ENTRY_POINTS(f64, double, double)
MK_ENTRY_POINTS(bf16, bf16, float)

extern "C" int mk_max_e() { return MAX_E; }
extern "C" int mk_abi_version() { return 3; }
