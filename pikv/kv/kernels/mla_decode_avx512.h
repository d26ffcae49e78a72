// AVX-512 loops of mla_decode.cpp: the tile's transposition and its two dot products. Included by
// mla_decode.cpp when the compiler targets AVX512F + AVX512BW (decode_math.h's PIKV_SIMD); the
// portable loops there give the same sums in another order.
//
// Layout (measured on the 2-core Xeon, docs/benchmarks.md "Fused C++ decode op for the decoupled
// latent"): a tile of 64 tokens is converted once to fp32 [coordinate][64 tokens] (tokens across the
// lanes, 4 vectors); a register block of up to 6 query rows x 4 vectors loads each code vector once
// for all its rows, for the scores (q . code) and for the values (w . code, 16 partial sums per
// latent coordinate, reduced once per step).
#pragma once
#include <immintrin.h>

#include <type_traits>

namespace simd {

// T token rows of `width` >= 4 int8 codes (row stride `row` bytes) -> out[e * kTile + t] fp32,
// lanes t >= T zero. Dword w of 16 rows by one gather gives 4 codes per token; the last dword starts
// at width - 4 (overlapping the one before) so that no gather reads past a row's codes.
inline void signed_rows_transposed(const int8_t* src, int64_t row, int64_t width, int64_t T, float* out) {
  const __m512i first = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(row)));
  for (int64_t t0 = 0; t0 < kTile; t0 += 16) {
    if (t0 >= T) {
      for (int64_t e = 0; e < width; ++e) _mm512_storeu_ps(out + e * kTile + t0, _mm512_setzero_ps());
      continue;
    }
    const __mmask16 lanes = first_lanes(T - t0);
    const int8_t* base = src + t0 * row;
    for (int64_t e0 = 0; e0 < width; e0 += 4) {
      const int64_t at = std::min(e0, width - 4);
      const __m512i dwords = _mm512_mask_i32gather_epi32(
          _mm512_setzero_si512(), lanes, _mm512_add_epi32(first, _mm512_set1_epi32(static_cast<int>(at))), base, 1);
      for (int64_t b = e0 - at; b < 4; ++b) {  // byte b, sign-extended: shift it to the top, then back
        const __m512i top = _mm512_sllv_epi32(dwords, _mm512_set1_epi32(static_cast<int>(24 - 8 * b)));
        _mm512_storeu_ps(out + (at + b) * kTile + t0, _mm512_cvtepi32_ps(_mm512_srai_epi32(top, 24)));
      }
    }
  }
}

// out[h * 4 + v] = sum_e q[h * q_row + e] codes[e * kTile + 16 v + lane] for R query rows and the
// tile's 4 vectors of 16 tokens: each code vector loaded once serves all R rows (R <= 6: 24
// accumulators, 4 codes and a broadcast in the 32 registers).
template <int R>
inline void dot_rows(const float* codes, int64_t E, const float* q, int64_t q_row, __m512* out) {
  __m512 acc[R][4];
  for (int h = 0; h < R; ++h)
    for (int v = 0; v < 4; ++v) acc[h][v] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; ++e) {
    const float* ce = codes + e * kTile;
    const __m512 c0 = _mm512_loadu_ps(ce), c1 = _mm512_loadu_ps(ce + 16), c2 = _mm512_loadu_ps(ce + 32),
                 c3 = _mm512_loadu_ps(ce + 48);
    for (int h = 0; h < R; ++h) {
      const __m512 b = _mm512_set1_ps(q[h * q_row + e]);
      acc[h][0] = _mm512_fmadd_ps(b, c0, acc[h][0]);
      acc[h][1] = _mm512_fmadd_ps(b, c1, acc[h][1]);
      acc[h][2] = _mm512_fmadd_ps(b, c2, acc[h][2]);
      acc[h][3] = _mm512_fmadd_ps(b, c3, acc[h][3]);
    }
  }
  for (int h = 0; h < R; ++h)
    for (int v = 0; v < 4; ++v) out[h * 4 + v] = acc[h][v];
}

constexpr int64_t kRows = 6;  // query rows per register block

// f(std::integral_constant<int, R>) with R = rows (1..kRows): the blocks need R at compile time.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  with_constant<1, 2, 3, 4, 5, 6>(rows, f);
}

// s[h * kTile + t] (+)= scale_t (q_h . codes_t) for rows h0..h1-1 (add: accumulate into s).
inline void scaled_dots(const float* codes, int64_t E, const float* q, int64_t q_row, const float* scale, int64_t h0,
                        int64_t h1, bool add, float* s) {
  for (int64_t h = h0; h < h1; h += kRows) {
    const int64_t rows = std::min(kRows, h1 - h);
    __m512 dots[kRows * 4];
    with_rows(rows, [&](auto R) { dot_rows<decltype(R)::value>(codes, E, q + h * q_row, q_row, dots); });
    for (int64_t x = 0; x < rows; ++x)
      for (int v = 0; v < 4; ++v) {
        float* at = s + (h + x) * kTile + 16 * v;
        const __m512 base = add ? _mm512_loadu_ps(at) : _mm512_setzero_ps();
        _mm512_storeu_ps(at, _mm512_fmadd_ps(_mm512_loadu_ps(scale + 16 * v), dots[x * 4 + v], base));
      }
  }
}

// acc[(h * E + e) * 16 + lane] += sum_v w_h[16 v + lane] codes[e * kTile + 16 v + lane] for R rows
// (w in registers, each code vector loaded once for all R rows).
template <int R>
inline void weighted_codes(const float* codes, int64_t E, const float* w, float* acc) {
  __m512 wv[R][4];
  for (int h = 0; h < R; ++h)
    for (int v = 0; v < 4; ++v) wv[h][v] = _mm512_loadu_ps(w + h * kTile + 16 * v);
  for (int64_t e = 0; e < E; ++e) {
    const float* ce = codes + e * kTile;
    const __m512 c0 = _mm512_loadu_ps(ce), c1 = _mm512_loadu_ps(ce + 16), c2 = _mm512_loadu_ps(ce + 32),
                 c3 = _mm512_loadu_ps(ce + 48);
    for (int h = 0; h < R; ++h) {
      float* a = acc + (h * E + e) * 16;
      const __m512 sum = _mm512_fmadd_ps(wv[h][0], c0, _mm512_fmadd_ps(wv[h][1], c1, _mm512_fmadd_ps(
                                                           wv[h][2], c2, _mm512_mul_ps(wv[h][3], c3))));
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), sum));
    }
  }
}

// The tile's value sums (see the portable tile_values); w: kTile floats of scratch per row.
inline void tile_values(const Dims& d, const float* cf, const float* csc, const float* s, float* acc, float* w) {
  for (int64_t h = 0; h < d.rows(); ++h)
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(w + h * kTile + 16 * v,
                       _mm512_mul_ps(_mm512_loadu_ps(s + h * kTile + 16 * v), _mm512_loadu_ps(csc + 16 * v)));
  for (int64_t h = 0; h < d.rows(); h += kRows)
    with_rows(std::min(kRows, d.rows() - h), [&](auto R) {
      weighted_codes<decltype(R)::value>(cf, d.r, w + h * kTile, acc + h * d.r * 16);
    });
}

inline void unpack_scales(const c10::Half* scale, int64_t T, float* out) {
  for (int64_t t = 0; t < kTile; t += 16)
    _mm512_storeu_ps(out + t, t < T ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(T - t), scale + t))
                                    : _mm512_setzero_ps());
}

}  // namespace simd
