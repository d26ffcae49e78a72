// AVX-512 hot loops of quant_decode.cpp: unpacking the planar codes and the two dot products of a
// decode step. Included by quant_decode.cpp when the compiler targets AVX512F + AVX512BW
// (-march=native on such a CPU) and PIKV_NO_SIMD is not defined; anything else (another CPU, an
// unsupported shape) runs the portable loops there, which give the same sums in another order.
//
// Layout (measured on the 2-core Xeon, docs/benchmarks.md "AVX-512 decode kernel"; tiles of 64
// tokens: 128 or 256 spill the fp32 codes out of L1 and measured slower): a tile's codes
// are unpacked ONCE into fp32 in L1, then every query head of the kv head reads them:
//   keys:   tokens across the 16 lanes, [E][Tp] (E = D planar positions, Tp the tile rounded up to 16):
//           score lanes += q'_e * code[e, t..t+15], no horizontal sums;
//   values: channels across the lanes, [T][D]: acc[d..d+15] += w_t * code[t, d..d+15].
// A code becomes fp32 with one vpermps on a 16-entry table (k & mask): vpermps reads the low 4 bits
// of each lane, so it masks and converts at once (8-bit codes: and + cvtdq2ps). Planar packing puts
// channel order (or, for KIVI's per-channel blocks, token order) into lanes with a whole-vector shift:
// a row of 8 (4) bytes holds 2 (4) planes in one vector (variable shift), a row of 16k bytes one plane
// per 16 bytes. Per-token key rows are transposed to tokens-in-lanes by a dword gather. Bit slices
// (quant_decode.cpp): each lower slice is unpacked onto what the slices above left in the tile (one
// scale group per row, so every slice's planar order is the channels'), one load + FMA per vector.
#pragma once
#include <immintrin.h>

#include <atomic>
#include <type_traits>

namespace simd {

// Tiles that took these loops (token keys, KIVI keys, values): tests assert the SIMD path really ran.
inline std::atomic<int64_t> tiles[3] = {0, 0, 0};

template <int BITS>
inline __m512 to_float(__m512i x) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(0xff)));
  } else {
    constexpr int kMask = (1 << BITS) - 1;
    alignas(64) static const float table[16] = {0 & kMask,  1 & kMask,  2 & kMask,  3 & kMask,  4 & kMask,  5 & kMask,
                                                6 & kMask,  7 & kMask,  8 & kMask,  9 & kMask,  10 & kMask, 11 & kMask,
                                                12 & kMask, 13 & kMask, 14 & kMask, 15 & kMask};
    return _mm512_permutexvar_ps(x, _mm512_load_ps(table));
  }
}

inline __m512i shift_right(__m512i x, int n) { return _mm512_srlv_epi32(x, _mm512_set1_epi32(n)); }

// Stores the codes of a BITS-wide slice at p: the top slice's as they are, a lower slice's (ADD) as
// what the slices above left there times 2^BITS plus its own (exact in fp32: whole codes < 256).
template <int BITS, bool ADD>
inline void put(float* p, __m512 codes) {
  if constexpr (ADD) codes = _mm512_fmadd_ps(_mm512_loadu_ps(p), _mm512_set1_ps(1 << BITS), codes);
  _mm512_storeu_ps(p, codes);
}

// One row of ROW planar-packed bytes (4, 8, or a multiple of 16) -> its ROW*8/BITS codes in planar
// order (position i*ROW + x: plane i of byte x), 16 per vector, into out. ROW is a compile-time
// constant: with a runtime row (and scalar fp16 scales) per-token codes took 1.8x longer (measured).
template <int BITS, int ROW, bool ADD = false>
inline void row_codes(const uint8_t* src, float* out) {
  if constexpr (ROW == 8) {
    int64_t word;
    std::memcpy(&word, src, sizeof(word));
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_set1_epi64x(word));  // lanes 0-7 and 8-15: bytes 0-7
    for (int v = 0; v < 4 / BITS; ++v) {  // planes 2v (lanes 0-7) and 2v + 1 (lanes 8-15)
      const __m512i shift = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * v * BITS),
                                                    _mm512_set1_epi32((2 * v + 1) * BITS));
      put<BITS, ADD>(out + 16 * v, to_float<BITS>(_mm512_srlv_epi32(bytes, shift)));
    }
  } else if constexpr (ROW == 4) {  // 1-bit codes of 32 channels (a bit slice at head dim 32), 2-bit of 16
    int32_t word;
    std::memcpy(&word, src, sizeof(word));
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_set1_epi32(word));  // lanes 4p..4p+3: bytes 0-3
    const __m512i plane = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int v = 0; v < 2 / BITS; ++v) {  // planes 4v + p (lanes 4p..4p+3)
      const __m512i shift =
          _mm512_mullo_epi32(_mm512_add_epi32(plane, _mm512_set1_epi32(4 * v)), _mm512_set1_epi32(BITS));
      put<BITS, ADD>(out + 16 * v, to_float<BITS>(_mm512_srlv_epi32(bytes, shift)));
    }
  } else {
    for (int x = 0; x < ROW; x += 16) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + x)));
      for (int i = 0; i < 8 / BITS; ++i)
        put<BITS, ADD>(out + i * ROW + x, to_float<BITS>(i ? _mm512_srli_epi32(bytes, i * BITS) : bytes));
    }
  }
}

// f(std::integral_constant<int, R>) with R = `row` (4, 8, 16, 32, else 64): the unpack loops need
// the row size at compile time to unroll.
template <typename F>
inline void with_row_size(int64_t row, F&& f) {
  with_constant<4, 8, 16, 32, 64>(row, f);
}

// T rows of `row` bytes each -> out[t * D + e], the row's codes in planar order (D = row*8/BITS).
template <int BITS, bool ADD>
inline void rows_codes(const uint8_t* src, int64_t row, int64_t T, float* out) {
  const int64_t D = row * 8 / BITS;
  with_row_size(row, [&](auto R) {
    for (int64_t t = 0; t < T; ++t) row_codes<BITS, decltype(R)::value, ADD>(src + t * R, out + t * D);
  });
}

// (a row of 4 bytes fills a vector at 1 or 2 bits only: values_ok's head dims and kivi_keys_ok's groups)
inline bool row_ok(int64_t row) { return row == 4 || row == 8 || row == 16 || row == 32 || row == 64; }

// T per-token rows (row % 4 == 0, row <= 64 bytes) -> codes with the tokens across lanes:
// out[e * Tp + t] is planar position e of token t (lanes past T are 0).
template <int BITS, bool ADD>
void token_rows_transposed(const uint8_t* src, int64_t row, int64_t T, int64_t Tp, float* out) {
  const int64_t words = row / 4;
  const __m512i first = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(words)));
  for (int64_t t0 = 0; t0 < T; t0 += 16) {
    const __mmask16 lanes = first_lanes(T - t0);
    const void* base = src + t0 * row;
    for (int64_t w = 0; w < words; ++w) {  // dword w of 16 rows: bytes 4w..4w+3 of each token
      const __m512i dwords = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes,
                                                         _mm512_add_epi32(first, _mm512_set1_epi32(w)), base, 4);
      for (int b = 0; b < 4; ++b)
        for (int i = 0; i < 8 / BITS; ++i)
          put<BITS, ADD>(out + (i * row + 4 * w + b) * Tp + t0, to_float<BITS>(shift_right(dwords, 8 * b + i * BITS)));
    }
  }
}

// nb KIVI blocks of g tokens (D channels of rb = g*BITS/8 bytes each: byte x, plane i holds token
// i*rb + x) -> out[d * Tp + blk * g + t].
template <int BITS>
void kivi_blocks_transposed(const uint8_t* src, int64_t D, int64_t rb, int64_t nb, int64_t Tp, float* out) {
  const int64_t g = rb * 8 / BITS;
  with_row_size(rb, [&](auto R) {
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t d = 0; d < D; ++d)
        row_codes<BITS, decltype(R)::value>(src + (blk * D + d) * R, out + d * Tp + blk * g);
  });
}

// acc[0..16 NV) += sum_t w[t] * codes[t * 16 NV + ...] (values, channels across lanes); four tokens
// in flight, each with its own accumulators.
template <int NV>
inline void weighted_rows(const float* codes, const float* w, int64_t T, float* acc) {
  constexpr int64_t D = 16 * NV;
  __m512 a[4][NV];
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < NV; ++v) a[u][v] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 3 < T; t += 4)
    for (int u = 0; u < 4; ++u) {
      const __m512 wt = _mm512_set1_ps(w[t + u]);
      for (int v = 0; v < NV; ++v) a[u][v] = _mm512_fmadd_ps(wt, _mm512_loadu_ps(codes + (t + u) * D + 16 * v), a[u][v]);
    }
  for (; t < T; ++t)
    for (int v = 0; v < NV; ++v)
      a[0][v] = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), _mm512_loadu_ps(codes + t * D + 16 * v), a[0][v]);
  for (int v = 0; v < NV; ++v) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[0][v], a[1][v]), _mm512_add_ps(a[2][v], a[3][v]));
    _mm512_storeu_ps(acc + 16 * v, _mm512_add_ps(_mm512_loadu_ps(acc + 16 * v), sum));
  }
}

inline bool weighted_rows_ok(int64_t D) { return D == 16 || D == 32 || D == 64 || D == 128; }

inline void weighted_rows(const float* codes, const float* w, int64_t T, int64_t D, float* acc) {
  switch (D) {
    case 16: weighted_rows<1>(codes, w, T, acc); break;
    case 32: weighted_rows<2>(codes, w, T, acc); break;
    case 64: weighted_rows<4>(codes, w, T, acc); break;
    default: weighted_rows<8>(codes, w, T, acc); break;
  }
}

// Dispatch on the bit width (1, 2, 4 or 8) to the templates above.
#define PIKV_SIMD_BITS(bits, CALL) \
  switch (bits) {                  \
    case 1: CALL(1); break;        \
    case 2: CALL(2); break;        \
    case 4: CALL(4); break;        \
    default: CALL(8); break;       \
  }

// f(slice, std::bool_constant<ADD>) for the top slice of c (ADD false), then for each lower one.
template <class F>
inline void for_slices(const Codes& c, F f) {
  f(c, std::false_type{});
  for (const Codes& s : c.low) f(s, std::true_type{});
}

// Per-token rows t0..t0+T-1 of every slice -> out[t * D + e] (rows_codes).
inline void unpack_rows(const Codes& c, int64_t t0, int64_t T, float* out) {
  for_slices(c, [&](const Codes& s, auto add) {
#define PIKV_ROWS(B) rows_codes<B, decltype(add)::value>(s.codes + t0 * s.row, s.row, T, out)
    PIKV_SIMD_BITS(s.bits, PIKV_ROWS)
#undef PIKV_ROWS
  });
}

// fp16 scale/zero of tokens t0..t0+T-1 (one per token) -> fp32 [T].
inline void scales_per_token(const Codes& c, int64_t t0, int64_t T, float* scale, float* zero) {
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 lanes = first_lanes(T - t);
    _mm512_storeu_ps(scale + t, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, c.scale + t0 + t)));
    _mm512_storeu_ps(zero + t, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, c.zero + t0 + t)));
  }
}

// Per-token rows t0..t0+T-1 of every slice -> out[e * Tp + t] (token_rows_transposed).
inline void unpack_token_keys(const Codes& c, int64_t t0, int64_t T, int64_t Tp, float* out) {
  for_slices(c, [&](const Codes& s, auto add) {
#define PIKV_KEYS(B) token_rows_transposed<B, decltype(add)::value>(s.codes + t0 * s.row, s.row, T, Tp, out)
    PIKV_SIMD_BITS(s.bits, PIKV_KEYS)
#undef PIKV_KEYS
  });
}

inline void unpack_kivi_keys(int bits, const uint8_t* src, int64_t D, int64_t rb, int64_t nb, int64_t Tp, float* out) {
#define PIKV_KIVI(B) kivi_blocks_transposed<B>(src, D, rb, nb, Tp, out)
  PIKV_SIMD_BITS(bits, PIKV_KIVI)
#undef PIKV_KIVI
}

}  // namespace simd

// The three hot loops of attend_row (quant_decode.cpp), same contracts as the portable ones there;
// each `*_ok` says whether a shape is covered (else the portable loop runs).
namespace simd {

// Whether every slice of c passes ok(slice).
template <class F>
inline bool all_slices(const Codes& c, F ok) {
  return ok(c) && std::all_of(c.low.begin(), c.low.end(), ok);
}

inline bool token_keys_ok(const Codes& k, int64_t D) {
  return k.n == 1 && D % 16 == 0 && all_slices(k, [](const Codes& s) { return s.row % 4 == 0 && s.row <= 64; });
}
inline bool kivi_keys_ok(const Codes& k, int64_t D) { return D % 16 == 0 && k.group % 16 == 0 && row_ok(k.row / D); }
inline bool values_ok(const Codes& v, int64_t D) {
  return v.n == 1 && weighted_rows_ok(D) && all_slices(v, [](const Codes& s) { return row_ok(s.row); });
}

// s = scale_t (q . code_t) + zero_t sum(q): per-token keys, one scale per token.
inline void token_scores(const Codes& k, const float* q_planar, const float* q_sum, int64_t M, int64_t D, int64_t t0,
                         int64_t T, TokenTile& tt, float* s) {
  const int64_t Tp = (T + 15) / 16 * 16, nvec = Tp / 16;
  unpack_token_keys(k, t0, T, Tp, tt.codes.data());
  scales_per_token(k, t0, T, tt.scale.data(), tt.zero.data());
  for (int64_t h = 0; h < M; ++h) {
    const float* qh = q_planar + h * D;
    const __m512 qs = _mm512_set1_ps(q_sum[h]);
    for (int64_t v0 = 0; v0 < nvec; v0 += 4) {
      const int n = static_cast<int>(std::min<int64_t>(4, nvec - v0));
      __m512 dots[4];
      dot_tile(tt.codes.data(), Tp, D, v0, n, [&](int64_t) { return qh; }, dots);
      for (int v = 0; v < n; ++v) {
        const int64_t t = 16 * (v0 + v);
        const __mmask16 lanes = first_lanes(T - t);
        const __m512 sc = _mm512_maskz_loadu_ps(lanes, tt.scale.data() + t);
        const __m512 zr = _mm512_maskz_loadu_ps(lanes, tt.zero.data() + t);
        _mm512_mask_storeu_ps(s + h * T + t, lanes, _mm512_fmadd_ps(sc, dots[v], _mm512_mul_ps(zr, qs)));
      }
    }
  }
  tiles[0].fetch_add(1, std::memory_order_relaxed);
}

// KIVI blocks b0..b0+nb-1: s_t = q . zero_blk + sum_d (q_d scale_blk,d) code_td, tokens across lanes.
// q_scaled: nb * M * D floats.
inline void channel_scores(const Codes& k, const float* q, int64_t M, int64_t D, int64_t b0, int64_t nb,
                           float* planes, float* q_scaled, float* s) {
  const int64_t g = k.group, T = nb * g, nvec = T / 16;
  unpack_kivi_keys(k.bits, k.codes + b0 * k.row, D, k.row / D, nb, T, planes);
  std::vector<float> base(nb * M);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const c10::Half* sc = k.scale + (b0 + blk) * D;
    const c10::Half* zr = k.zero + (b0 + blk) * D;
    for (int64_t h = 0; h < M; ++h) {
      const float* qh = q + h * D;
      float* qs = q_scaled + (blk * M + h) * D;
      __m512 dot = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {  // kivi_keys_ok: D % 16 == 0
        const __m512 qd = _mm512_loadu_ps(qh + d);
        _mm512_storeu_ps(qs + d, _mm512_mul_ps(qd, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + d)))));
        dot = _mm512_fmadd_ps(qd, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zr + d))), dot);
      }
      base[blk * M + h] = _mm512_reduce_add_ps(dot);
    }
  }
  for (int64_t h = 0; h < M; ++h)
    for (int64_t v0 = 0; v0 < nvec; v0 += 4) {
      const int n = static_cast<int>(std::min<int64_t>(4, nvec - v0));
      __m512 dots[4];
      dot_tile(planes, T, D, v0, n, [&](int64_t v) { return q_scaled + (16 * v / g * M + h) * D; }, dots);
      for (int v = 0; v < n; ++v) {
        const int64_t t = 16 * (v0 + v);
        _mm512_storeu_ps(s + h * T + t, _mm512_add_ps(dots[v], _mm512_set1_ps(base[t / g * M + h])));
      }
    }
  tiles[1].fetch_add(1, std::memory_order_relaxed);
}

// acc += sum_t (p_t scale_t) code_t, zero_sum += sum_t p_t zero_t: per-token values, one scale per token.
inline void token_values(const Codes& v, const float* p, Heads& st, int64_t t0, int64_t T, TokenTile& tt) {
  unpack_rows(v, t0, T, tt.codes.data());
  scales_per_token(v, t0, T, tt.scale.data(), tt.zero.data());
  const float* sc = tt.scale.data();
  const float* zr = tt.zero.data();
  float* ws = tt.tmp.data();
  for (int64_t h = 0; h < st.M; ++h) {
    const float* ph = p + h * T;
    __m512 zsum = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t += 16) {  // sc, zr: zero past T (scales_per_token)
      const __m512 pt = _mm512_maskz_loadu_ps(first_lanes(T - t), ph + t);
      _mm512_storeu_ps(ws + t, _mm512_mul_ps(pt, _mm512_loadu_ps(sc + t)));
      zsum = _mm512_fmadd_ps(pt, _mm512_loadu_ps(zr + t), zsum);
    }
    st.zero_sum[h] += _mm512_reduce_add_ps(zsum);
    weighted_rows(tt.codes.data(), ws, T, st.D, st.acc_planar.data() + h * st.D);
  }
  tiles[2].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace simd
