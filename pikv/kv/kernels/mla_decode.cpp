// Fused decode attention over the decoupled learned latent with int8 codes (pikv/kv/mla.py,
// MLAStore.absorbed: MLA's absorbed attention, DeepSeek-V2 arXiv:2405.04434 section 2.1), CPU.
//
// One query token per sequence. For each batch row one pass over the S0 stored tokens in tiles of
// 64: the tile's int8 latent codes (shared by every kv head) and each kv head's int8 rotated key
// dims are converted to fp32 ONCE, into L1, with the tokens innermost; every query row then scores
// them, s_j = kr_scale_j (q_rot . kr_j) + c_scale_j (q_abs . c_j), an online softmax (flash
// attention's running max and sum) turns the scores into weights, and the weighted codes
// accumulate into the latent output o_lat = sum_j p_j c_scale_j c_j (r numbers per row): the same
// tile's fp32 codes serve the scores and the values. Then this step's E newest tokens (their scores
// computed by torch, passed in) join the softmax. Everything is fp32; only the order of the sums
// differs from the torch path.
//
// Inputs (one decode step; B batch, G kv heads, M = N/G query rows per kv head, r rank, P rotated
// dims, S0 stored tokens, E newest tokens):
//   q_abs [B,G,M,r], q_rot [B,G,M,P] fp32 contiguous (scaled by 1/sqrt(D); q_abs = q[P:] @ Uk_g)
//   c [B,S0,r] int8, c_scale [B,S0] fp16; kr [B,G,S0,P] int8, kr_scale [B,S0] fp16: views of the
//     store's capacity buffers (any batch / head strides; a token's codes contiguous)
//   s_new [B,G,M,E] fp32 contiguous: the newest tokens' scaled scores
// Returns (o_lat [B,G,M,r], p [B,G,M,S0+E] with need_probs else [B,G,M,E]): normalised.
//
// Threads: at::parallel_for over B (the codes are shared by the kv heads). Two builds (decode_math.h):
// the AVX-512 one transposes a tile by dword gathers and keeps the value sums in 16 lanes per
// latent coordinate (one per token lane, reduced once at the end); the portable one
// (-DPIKV_NO_SIMD, op mla_decode_portable) runs the same steps as plain auto-vectorised loops.
#include "decode_math.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTile = 64;  // tokens per online-softmax step (the tile's fp32 codes stay in L1)
#ifdef PIKV_SIMD
constexpr int64_t kLanes = 16;  // partial value sums per latent coordinate: one per token lane
#else
constexpr int64_t kLanes = 1;
#endif

std::atomic<int64_t> simd_tiles{0};  // tiles that took the AVX-512 loops (tests assert they ran)

struct Dims {
  int64_t G, M, r, P, S0, E;
  bool probs_all;  // p holds the S0 stored tokens' probabilities before the E newest ones'
  int64_t rows() const { return G * M; }
  int64_t p_row() const { return (probs_all ? S0 : 0) + E; }
};

struct Row {  // the inputs and outputs of one batch row
  const float* q_abs;  // [G*M, r]
  const float* q_rot;  // [G*M, P]
  const int8_t* c;     // token t's codes at c + t * c_row
  int64_t c_row;
  const c10::Half* c_scale;  // [S0]
  const int8_t* kr;  // kv head g, token t at kr + g * kr_head + t * kr_row
  int64_t kr_head, kr_row;
  const c10::Half* kr_scale;  // [S0]
  const float* s_new;  // [G*M, E]
  float* o_lat;        // [G*M, r]
  float* p;            // [G*M, p_row]
};

}  // namespace

#ifdef PIKV_SIMD
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
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 6>{}); break;
  }
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
#endif

namespace {

// Tiles hold kTile tokens whatever T (the last tile's lanes past T are zero): whole vectors.
// T token rows of `width` int8 codes (row stride `row` bytes) -> out[e * kTile + t] fp32, t >= T zero.
void unpack_transposed(const int8_t* src, int64_t row, int64_t width, int64_t T, float* out) {
#ifdef PIKV_SIMD
  if (width >= 4) return simd::signed_rows_transposed(src, row, width, T, out);
#endif
  for (int64_t e = 0; e < width; ++e) {
    float* o = out + e * kTile;
    for (int64_t t = 0; t < T; ++t) o[t] = static_cast<float>(src[t * row + e]);
    std::fill(o + T, o + kTile, 0.0f);
  }
}

void unpack_scales(const c10::Half* scale, int64_t T, float* out) {
#ifdef PIKV_SIMD
  return simd::unpack_scales(scale, T, out);
#endif
  for (int64_t t = 0; t < T; ++t) out[t] = half_to_float(scale[t]);
  std::fill(out + T, out + kTile, 0.0f);
}

// s[h * kTile + t] (+)= scale_t (q_h . codes_t) for query rows h0..h1-1 (q_h at q + h * q_row),
// codes [E][kTile]; add: accumulate into s.
void scaled_dots(const float* codes, int64_t E, const float* q, int64_t q_row, const float* scale, int64_t h0,
                 int64_t h1, bool add, float* s) {
#ifdef PIKV_SIMD
  return simd::scaled_dots(codes, E, q, q_row, scale, h0, h1, add, s);
#endif
  float dot[kTile];
  for (int64_t h = h0; h < h1; ++h) {
    std::fill(dot, dot + kTile, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      const float qe = q[h * q_row + e];
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) dot[t] += qe * codes[e * kTile + t];
    }
    float* sh = s + h * kTile;
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) sh[t] = (add ? sh[t] : 0.0f) + scale[t] * dot[t];
  }
}

// The latent output's sums: acc[(h * r + e) * kLanes + lane] += sum_t p_ht c_scale_t c_te;
// w: kTile floats of scratch per row.
void tile_values(const Dims& d, const float* cf, const float* csc, const float* s, float* acc, float* w) {
#ifdef PIKV_SIMD
  return simd::tile_values(d, cf, csc, s, acc, w);
#endif
  for (int64_t h = 0; h < d.rows(); ++h) {
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) w[t] = s[h * kTile + t] * csc[t];
    for (int64_t e = 0; e < d.r; ++e) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < kTile; ++t) sum += w[t] * cf[e * kTile + t];
      acc[h * d.r + e] += sum;
    }
  }
}

// The online softmax of the G*M query rows of one batch row, the latent output's sums in acc.
struct Softmax {
  std::vector<float> max, sum, acc;
  int64_t width;  // accumulator floats per row
  Softmax(int64_t rows, int64_t r) : max(rows, -1e30f), sum(rows, 0.0f), acc(rows * r * kLanes, 0.0f), width(r * kLanes) {}

  // Scores s[h * kTile + t], t < T -> unnormalised weights in place (0 past T); rescales the
  // running sums. -1e30, not -inf, as the running max's floor (as quant_decode.cpp): no special
  // case at the start.
  void weights(float* s, int64_t rows, int64_t T) {
    for (int64_t h = 0; h < rows; ++h) {
      float* sh = s + h * kTile;
      const float m = max_of(sh, T, max[h]);
      const float alpha = exp_nonpos(max[h] - m);
      max[h] = m;
      sum[h] = sum[h] * alpha + exp_shifted(sh, T, m, 1.0f);
      std::fill(sh + T, sh + kTile, 0.0f);
      if (alpha != 1.0f)
        for (int64_t x = 0; x < width; ++x) acc[h * width + x] *= alpha;
    }
  }
};

// The S0 stored tokens of one batch row, tile by tile, into st; their raw scores into p when asked.
void stored_tokens(const Dims& d, const Row& in, Softmax& st) {
  std::vector<float> cf(d.r * kTile), kf(d.P * kTile), csc(kTile), ksc(kTile), s(d.rows() * kTile),
      w(d.rows() * kTile);
  for (int64_t t0 = 0; t0 < d.S0; t0 += kTile) {
    const int64_t T = std::min(kTile, d.S0 - t0);
    unpack_transposed(in.c + t0 * in.c_row, in.c_row, d.r, T, cf.data());
    unpack_scales(in.c_scale + t0, T, csc.data());
    unpack_scales(in.kr_scale + t0, T, ksc.data());
    scaled_dots(cf.data(), d.r, in.q_abs, d.r, csc.data(), 0, d.rows(), false, s.data());
    for (int64_t g = 0; g < d.G; ++g) {
      unpack_transposed(in.kr + g * in.kr_head + t0 * in.kr_row, in.kr_row, d.P, T, kf.data());
      scaled_dots(kf.data(), d.P, in.q_rot, d.P, ksc.data(), g * d.M, (g + 1) * d.M, true, s.data());
    }
    if (d.probs_all)
      for (int64_t h = 0; h < d.rows(); ++h) std::memcpy(in.p + h * d.p_row() + t0, &s[h * kTile], T * sizeof(float));
    st.weights(s.data(), d.rows(), T);
    tile_values(d, cf.data(), csc.data(), s.data(), st.acc.data(), w.data());
#ifdef PIKV_SIMD
    simd_tiles.fetch_add(1, std::memory_order_relaxed);
#endif
  }
}

// Then the E newest tokens join the softmax; the outputs are normalised over all S0 + E.
void attend_row(const Dims& d, const Row& in) {
  Softmax st(d.rows(), d.r);
  stored_tokens(d, in, st);
  std::vector<float> exps(d.E);
  for (int64_t h = 0; h < d.rows(); ++h) {
    float* p = in.p + h * d.p_row();
    float* p_new = p + d.p_row() - d.E;
    std::memcpy(p_new, in.s_new + h * d.E, d.E * sizeof(float));
    std::memcpy(exps.data(), p_new, d.E * sizeof(float));
    const float m = max_of(p_new, d.E, st.max[h]);
    const float alpha = exp_nonpos(st.max[h] - m);
    const float inv = 1.0f / (st.sum[h] * alpha + exp_shifted(exps.data(), d.E, m, 1.0f));
    for (int64_t e = 0; e < d.r; ++e) {
      const float* a = &st.acc[(h * d.r + e) * kLanes];
      float total = 0.0f;
      for (int64_t lane = 0; lane < kLanes; ++lane) total += a[lane];
      in.o_lat[h * d.r + e] = total * alpha * inv;
    }
    exp_shifted(p, d.p_row(), m, inv);
  }
}

// A [B, tokens, width] tensor (or [B, tokens]: width 1) whose tokens' entries are contiguous.
void check_tokens(const at::Tensor& x, at::ScalarType type, int64_t dim, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == type && x.dim() == dim, what, ": ", c10::toString(type),
              " with ", dim, " dims on the CPU, got ", x.scalar_type(), " ", x.sizes());
  const int64_t last = x.size(dim - 1);
  TORCH_CHECK(x.numel() == 0 || last <= 1 || x.stride(dim - 1) == 1, what, ": a token's entries must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q_abs, const at::Tensor& q_rot, const at::Tensor& c,
                                              const at::Tensor& c_scale, const at::Tensor& kr,
                                              const at::Tensor& kr_scale, const at::Tensor& s_new, bool need_probs) {
  for (const auto* x : {&q_abs, &q_rot, &s_new})
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 4 && x->is_contiguous(),
                "q_abs, q_rot, s_new: contiguous fp32 [B, G, M, .] on the CPU");
  check_tokens(c, at::kChar, 3, "c [B, S0, r]");
  check_tokens(kr, at::kChar, 4, "kr [B, G, S0, P]");
  check_tokens(c_scale, at::kHalf, 2, "c_scale [B, S0]");
  check_tokens(kr_scale, at::kHalf, 2, "kr_scale [B, S0]");
  const int64_t B = q_abs.size(0), G = q_abs.size(1), M = q_abs.size(2), r = q_abs.size(3), P = q_rot.size(3);
  const int64_t S0 = c.size(1), E = s_new.size(3);
  TORCH_CHECK(q_rot.sizes().slice(0, 3) == q_abs.sizes().slice(0, 3) && s_new.sizes().slice(0, 3) == q_abs.sizes().slice(0, 3),
              "q_abs, q_rot, s_new: the same [B, G, M]");
  TORCH_CHECK(c.size(0) == B && c.size(2) == r && kr.size(0) == B && kr.size(1) == G && kr.size(2) == S0 &&
                  kr.size(3) == P && c_scale.size(0) == B && c_scale.size(1) == S0 && kr_scale.size(0) == B &&
                  kr_scale.size(1) == S0,
              "c [B, S0, r], kr [B, G, S0, P], c_scale / kr_scale [B, S0] do not match the queries");
  const Dims d{G, M, r, P, S0, E, need_probs};
  at::Tensor o_lat = at::empty({B, G, M, r}, q_abs.options());
  at::Tensor p = at::empty({B, G, M, d.p_row()}, q_abs.options());
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      Row in;
      in.q_abs = q_abs.data_ptr<float>() + b * G * M * r;
      in.q_rot = q_rot.data_ptr<float>() + b * G * M * P;
      in.c = c.data_ptr<int8_t>() + b * c.stride(0);
      in.c_row = c.stride(1);
      in.c_scale = c_scale.data_ptr<c10::Half>() + b * c_scale.stride(0);
      in.kr = kr.data_ptr<int8_t>() + b * kr.stride(0);
      in.kr_head = kr.stride(1);
      in.kr_row = kr.stride(2);
      in.kr_scale = kr_scale.data_ptr<c10::Half>() + b * kr_scale.stride(0);
      in.s_new = s_new.data_ptr<float>() + b * G * M * E;
      in.o_lat = o_lat.data_ptr<float>() + b * G * M * r;
      in.p = p.data_ptr<float>() + b * G * M * d.p_row();
      attend_row(d, in);
    }
  });
  return {o_lat, p};
}

int64_t mla_simd_tiles() { return simd_tiles.load(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pikv_kernels, m) {
  m.def("mla_decode" PIKV_OP_SUFFIX "(Tensor q_abs, Tensor q_rot, Tensor c, Tensor c_scale, Tensor kr, "
        "Tensor kr_scale, Tensor s_new, bool need_probs) -> (Tensor, Tensor)");
  m.impl("mla_decode" PIKV_OP_SUFFIX, c10::DispatchKey::CPU, TORCH_FN(mla_decode));
  m.def("mla_simd_tiles" PIKV_OP_SUFFIX "() -> int", &mla_simd_tiles);
}
