// What both fused decode kernels share (quant_decode.cpp, mla_decode.cpp): which build this is, the
// softmax's exp, fp16 -> fp32, and the AVX-512 dot product of a tile with its tokens across lanes.
//
// Two builds of every kernel source (pikv/kv/kernels/__init__.py): the default one takes the AVX-512
// loops where the compiler targets AVX512F/BW (-march=native on such a CPU); the one compiled with
// -DPIKV_NO_SIMD (ops named *_portable) keeps the portable, auto-vectorised loops, the baseline the
// benchmark times beside it.
#pragma once
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(PIKV_NO_SIMD)
#define PIKV_SIMD 1
#include <immintrin.h>
#endif
#ifdef PIKV_NO_SIMD
#define PIKV_OP_SUFFIX "_portable"
#else
#define PIKV_OP_SUFFIX ""
#endif
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// exp(x) for x <= 0 (a score minus the running max), written so that the compiler vectorises it
// without -ffast-math (which breaks -inf masking and, linked into a shared object, may set
// flush-to-zero for the whole process): Cephes expf's range reduction and degree-5 polynomial,
// relative error ~2e-7. x < -87 (and -inf, a masked score) gives exactly 0.
inline float exp_nonpos(float x) {
  const bool underflow = !(x >= -87.0f);
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126: a normal float
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return underflow ? 0.0f : y * scale;
}

// fp16 -> fp32 through GCC's _Float16 (vectorised, F16C / AVX512-FP16 conversions): c10::Half's
// portable bit-twiddling conversion cost ~100 cycles per KIVI token here (measured).
inline float half_to_float(c10::Half h) {
  _Float16 x;
  std::memcpy(&x, &h, sizeof(x));
  return static_cast<float>(x);
}

// f(std::integral_constant<int, V>) with V the first of Vs equal to x, else the last one: a size
// known at run time that a loop needs at compile time (to unroll, or to keep its sums in registers).
template <int... Vs, typename F>
inline void with_constant(int64_t x, F&& f) {
  constexpr int kLast = (Vs, ...);
  bool done = false;
  ((done = done || ((x == Vs || Vs == kLast) && (f(std::integral_constant<int, Vs>{}), true))), ...);
}

#ifdef PIKV_SIMD
namespace simd {

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dots[v] = sum_e coef_v[e] * codes[e * Tp + 16 v + lane] for NVEC vectors of 16 tokens; two
// accumulators per vector (even / odd e) hide the FMA latency.
template <int NVEC>
inline void dot_tokens(const float* codes, int64_t Tp, int64_t E, const float* const* coef, __m512* dots) {
  __m512 even[NVEC], odd[NVEC];
  for (int v = 0; v < NVEC; ++v) even[v] = odd[v] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 1 < E; e += 2)
    for (int v = 0; v < NVEC; ++v) {
      even[v] = _mm512_fmadd_ps(_mm512_set1_ps(coef[v][e]), _mm512_loadu_ps(codes + e * Tp + 16 * v), even[v]);
      odd[v] = _mm512_fmadd_ps(_mm512_set1_ps(coef[v][e + 1]), _mm512_loadu_ps(codes + (e + 1) * Tp + 16 * v), odd[v]);
    }
  for (; e < E; ++e)
    for (int v = 0; v < NVEC; ++v)
      even[v] = _mm512_fmadd_ps(_mm512_set1_ps(coef[v][e]), _mm512_loadu_ps(codes + e * Tp + 16 * v), even[v]);
  for (int v = 0; v < NVEC; ++v) dots[v] = _mm512_add_ps(even[v], odd[v]);
}

// For vectors v0..v0+n-1 (n <= 4) of the tile: dots of 16 tokens each (coef(v) gives vector v's coefficients).
template <class Coef>
inline void dot_tile(const float* codes, int64_t Tp, int64_t E, int64_t v0, int n, Coef coef, __m512* dots) {
  const float* c[4];
  for (int v = 0; v < n; ++v) c[v] = coef(v0 + v);
  const float* at = codes + 16 * v0;
  switch (n) {
    case 4: dot_tokens<4>(at, Tp, E, c, dots); break;
    case 3: dot_tokens<3>(at, Tp, E, c, dots); break;
    case 2: dot_tokens<2>(at, Tp, E, c, dots); break;
    default: dot_tokens<1>(at, Tp, E, c, dots); break;
  }
}

// exp(x) for x <= 0, 16 lanes: the portable exp_nonpos's range reduction and polynomial (Cephes
// expf), 2^n by vscalefps; x < -87 (and -inf, a masked score) gives exactly 0.
inline __m512 exp_nonpos(__m512 x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(y, n));
}

inline float max_of(const float* x, int64_t n, float init) {
  __m512 m = _mm512_set1_ps(init);
  for (int64_t t = 0; t < n; t += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, first_lanes(n - t), x + t));
  return _mm512_reduce_max_ps(m);
}

inline float exp_shifted(float* x, int64_t n, float m, float mul) {
  const __m512 mv = _mm512_set1_ps(m), scale = _mm512_set1_ps(mul);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 lanes = first_lanes(n - t);
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + t), mv));
    const __m512 kept = _mm512_maskz_mov_ps(lanes, e);
    total = _mm512_add_ps(total, kept);
    _mm512_mask_storeu_ps(x + t, lanes, _mm512_mul_ps(kept, scale));
  }
  return _mm512_reduce_add_ps(total);
}

}  // namespace simd
#endif

// max(init, x[0..n))
inline float max_of(const float* x, int64_t n, float init) {
#ifdef PIKV_SIMD
  return simd::max_of(x, n, init);
#endif
  float m = init;
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < n; ++t) m = std::max(m, x[t]);
  return m;
}

// x[t] = exp(x[t] - m) * mul in place (x <= m); returns the sum of the exp(x[t] - m).
inline float exp_shifted(float* x, int64_t n, float m, float mul) {
#ifdef PIKV_SIMD
  return simd::exp_shifted(x, n, m, mul);
#endif
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < n; ++t) {
    const float e = exp_nonpos(x[t] - m);
    total += e;
    x[t] = e * mul;
  }
  return total;
}

// One tile of an online softmax for one row: scores x[0..n) -> unnormalised weights exp(x - max) in
// place, the row's running max and sum updated; returns the factor (<= 1) the row's running
// accumulators must be multiplied by.
inline float online_softmax_step(float* x, int64_t n, float& max, float& sum) {
  const float m = max_of(x, n, max);
  const float alpha = exp_nonpos(max - m);
  max = m;
  sum = sum * alpha + exp_shifted(x, n, m, 1.0f);
  return alpha;
}
