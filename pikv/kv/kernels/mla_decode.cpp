// Fused decode attention over the decoupled learned latent with int8 codes (pikv/kv/mla.py,
// MLAStore.absorbed: MLA's absorbed attention, DeepSeek-V2 arXiv:2405.04434 section 2.1), CPU.
//
// One query token per sequence. For each batch row one pass over the latent tokens in tiles of 64:
// the tile's int8 latent codes (shared by every kv head) and each kv head's int8 rotated key dims
// are converted to fp32 ONCE, into L1, with the tokens innermost; every query row then scores
// them, s_j = kr_scale_j (q_rot . kr_j) + c_scale_j (q_abs . c_j), an online softmax (flash
// attention's running max and sum) turns the scores into weights, and the weighted codes
// accumulate into the latent output sum_j p_j c_scale_j c_j (r numbers per row): the same tile's
// fp32 codes serve the scores and the values. The latent tokens come in two segments: the
// store's buffers, then this step's tokens that left the exact window (their codes, not yet in the
// buffers). Then the exact window's X tokens join the softmax, and o = o_lat @ Uv_g^T + p_x v_x.
// The small per-step matmuls (q_abs = q[P:] @ Uk_g, the exact tokens, Uv) run here too: in torch
// they were ~20 dispatched ops per layer-step, more than the attention itself at 2k tokens.
// Everything is fp32; only the order of the sums differs from the torch path.
//
// Shapes: B batch, G kv heads, M = N/G query rows per kv head, D head dim, P rotated dims, r rank,
// S latent tokens (both segments), X exact tokens. Codes and scales are views of the store's
// capacity buffers (any batch / head / token strides; a token's codes contiguous), read in place.
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
#include <utility>
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
  int64_t G, M, D, r, P, X;  // X: exact tokens
  int64_t S;                 // latent tokens of both segments
  bool probs_all;            // p holds the latent tokens' probabilities before the exact ones'
  int64_t rows() const { return G * M; }
  int64_t p_row() const { return (probs_all ? S : 0) + X; }
};

struct Segment {  // latent tokens of one batch row: int8 codes and rotated key dims, fp16 scales
  const int8_t* c;  // token t's codes at c + t * c_row
  int64_t c_row;
  const c10::Half* c_scale;  // [n]
  const int8_t* kr;  // kv head g, token t at kr + g * kr_head + t * kr_row
  int64_t kr_head, kr_row;
  const c10::Half* kr_scale;  // [n]
  int64_t n;
};

}  // namespace

#ifdef PIKV_SIMD
#include "mla_decode_avx512.h"  // at global scope: namespace simd, as decode_math.h's
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
  std::vector<float> tiles;  // the running max of each row after each tile (probabilities asked for)
  std::vector<std::pair<int64_t, int64_t>> tile_at;  // (first token, tokens) of each such tile
  int64_t width;  // accumulator floats per row
  Softmax(int64_t rows, int64_t r) : max(rows, -1e30f), sum(rows, 0.0f), acc(rows * r * kLanes, 0.0f), width(r * kLanes) {}

  // Scores s[h * kTile + t], t < T -> unnormalised weights in place (0 past T); rescales the
  // running sums. -1e30, not -inf, as the running max's floor (as quant_decode.cpp): no special
  // case at the start.
  void weights(float* s, int64_t rows, int64_t T) {
    for (int64_t h = 0; h < rows; ++h) {
      float* sh = s + h * kTile;
      const float alpha = online_softmax_step(sh, T, max[h], sum[h]);
      std::fill(sh + T, sh + kTile, 0.0f);
      if (alpha != 1.0f)
        for (int64_t x = 0; x < width; ++x) acc[h * width + x] *= alpha;
    }
  }
};

// The latent tokens of one segment, tile by tile, into st; their raw scores into p (row stride
// p_row) when asked. q_abs [rows, r], q_rot [rows, P]: the scaled queries.
void latent_tokens(const Dims& d, const Segment& in, const float* q_abs, const float* q_rot, Softmax& st, float* p,
                   int64_t offset) {
  std::vector<float> cf(d.r * kTile), kf(d.P * kTile), csc(kTile), ksc(kTile), s(d.rows() * kTile),
      w(d.rows() * kTile);
  for (int64_t t0 = 0; t0 < in.n; t0 += kTile) {
    const int64_t T = std::min(kTile, in.n - t0);
    unpack_transposed(in.c + t0 * in.c_row, in.c_row, d.r, T, cf.data());
    unpack_scales(in.c_scale + t0, T, csc.data());
    unpack_scales(in.kr_scale + t0, T, ksc.data());
    scaled_dots(cf.data(), d.r, q_abs, d.r, csc.data(), 0, d.rows(), false, s.data());
    for (int64_t g = 0; g < d.G; ++g) {
      unpack_transposed(in.kr + g * in.kr_head + t0 * in.kr_row, in.kr_row, d.P, T, kf.data());
      scaled_dots(kf.data(), d.P, q_rot, d.P, ksc.data(), g * d.M, (g + 1) * d.M, true, s.data());
    }
    st.weights(s.data(), d.rows(), T);
    if (d.probs_all) {  // the weights relative to the running max, rescaled once at the end (attend_row)
      st.tile_at.emplace_back(offset + t0, T);
      for (int64_t h = 0; h < d.rows(); ++h) {
        std::memcpy(p + h * d.p_row() + offset + t0, &s[h * kTile], T * sizeof(float));
        st.tiles.push_back(st.max[h]);
      }
    }
    tile_values(d, cf.data(), csc.data(), s.data(), st.acc.data(), w.data());
#ifdef PIKV_SIMD
    simd_tiles.fetch_add(1, std::memory_order_relaxed);
#endif
  }
}

struct Row {  // one batch row
  const float* q;  // [rows, D], not yet scaled
  Segment seg[2];
  const float* k_exact;  // kv head g, token x at k_exact + g * head + x * D (v_exact alike)
  const float* v_exact;
  int64_t k_head, v_head;
  float* o;  // [rows, D]
  float* p;  // [rows, p_row]
};

// The queries scaled by 1/sqrt(D): rotated dims q_rot [rows, P], and q_abs [rows, r] = q[P:] @ Uk_g
// (up: the up-projection [C, up_row], key rows g * (D - P) + i of kv head g).
void absorbed_queries(const Dims& d, const float* q_in, const float* up, int64_t up_row, std::vector<float>& q,
                      std::vector<float>& q_rot, std::vector<float>& q_abs) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  const int64_t Dk = d.D - d.P;
  for (int64_t h = 0; h < d.rows(); ++h) {
    const int64_t g = h / d.M;
    for (int64_t i = 0; i < d.D; ++i) q[h * d.D + i] = q_in[h * d.D + i] * scale;
    for (int64_t i = 0; i < d.P; ++i) q_rot[h * d.P + i] = q[h * d.D + i];
    for (int64_t j = 0; j < d.r; ++j) q_abs[h * d.r + j] = 0.0f;
    for (int64_t i = 0; i < Dk; ++i) {
      const float qi = q[h * d.D + d.P + i];
      const float* u = up + (g * Dk + i) * up_row;
      for (int64_t j = 0; j < d.r; ++j) q_abs[h * d.r + j] += qi * u[j];
    }
  }
}

// Both latent segments, then the X exact tokens join the softmax; o = (p c_scale c) @ Uv_g^T + p_x v_x,
// normalised over all S + X (up: value rows C_k + g * D + d).
void attend_row(const Dims& d, const Row& in, const float* up, int64_t up_row) {
  std::vector<float> q(d.rows() * d.D), q_rot(d.rows() * d.P), q_abs(d.rows() * d.r), sx(d.X), o_lat(d.r);
  absorbed_queries(d, in.q, up, up_row, q, q_rot, q_abs);
  Softmax st(d.rows(), d.r);
  latent_tokens(d, in.seg[0], q_abs.data(), q_rot.data(), st, in.p, 0);
  latent_tokens(d, in.seg[1], q_abs.data(), q_rot.data(), st, in.p, in.seg[0].n);
  const float* up_v = up + d.G * (d.D - d.P) * up_row;
  for (int64_t h = 0; h < d.rows(); ++h) {
    const int64_t g = h / d.M;
    const float* qh = &q[h * d.D];
    for (int64_t x = 0; x < d.X; ++x) {
      const float* k = in.k_exact + g * in.k_head + x * d.D;
      float dot = 0.0f;
      for (int64_t i = 0; i < d.D; ++i) dot += qh[i] * k[i];
      sx[x] = dot;
    }
    const float m = max_of(sx.data(), d.X, st.max[h]);
    const float alpha = exp_nonpos(st.max[h] - m);
    const float inv = 1.0f / (st.sum[h] * alpha + exp_shifted(sx.data(), d.X, m, 1.0f));
    float* p = in.p + h * d.p_row();
    for (int64_t x = 0; x < d.X; ++x) p[d.p_row() - d.X + x] = sx[x] * inv;
    for (size_t k = 0; k < st.tile_at.size(); ++k) {  // tile k: weights exp(s - its running max)
      const float scale = exp_nonpos(st.tiles[k * d.rows() + h] - m) * inv;
      float* pk = p + st.tile_at[k].first;
#pragma omp simd
      for (int64_t t = 0; t < st.tile_at[k].second; ++t) pk[t] *= scale;
    }
    for (int64_t e = 0; e < d.r; ++e) {
      const float* a = &st.acc[(h * d.r + e) * kLanes];
      float total = 0.0f;
      for (int64_t lane = 0; lane < kLanes; ++lane) total += a[lane];
      o_lat[e] = total * alpha;
    }
    for (int64_t i = 0; i < d.D; ++i) {
      const float* u = up_v + (g * d.D + i) * up_row;
      float out = 0.0f;
      for (int64_t e = 0; e < d.r; ++e) out += o_lat[e] * u[e];
      for (int64_t x = 0; x < d.X; ++x) out += sx[x] * in.v_exact[g * in.v_head + x * d.D + i];
      in.o[h * d.D + i] = out * inv;
    }
  }
}

// A [B, tokens, width] tensor (or [B, tokens]: width 1) whose tokens' entries are contiguous.
void check_tokens(const at::Tensor& x, at::ScalarType type, int64_t dim, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == type && x.dim() == dim, what, ": ", c10::toString(type),
              " with ", dim, " dims on the CPU, got ", x.scalar_type(), " ", x.sizes());
  const int64_t last = x.size(dim - 1);
  TORCH_CHECK(x.numel() == 0 || last <= 1 || x.stride(dim - 1) == 1, what, ": a token's entries must be contiguous");
}

Segment segment_of(const at::Tensor& c, const at::Tensor& c_scale, const at::Tensor& kr, const at::Tensor& kr_scale,
                   int64_t b) {
  check_tokens(c, at::kChar, 3, "c [B, S, r]");
  check_tokens(kr, at::kChar, 4, "kr [B, G, S, P]");
  check_tokens(c_scale, at::kHalf, 2, "c_scale [B, S]");
  check_tokens(kr_scale, at::kHalf, 2, "kr_scale [B, S]");
  const int64_t n = c.size(1);
  TORCH_CHECK(kr.size(2) == n && c_scale.size(1) == n && kr_scale.size(1) == n && c.size(0) == kr.size(0) &&
                  c.size(0) == c_scale.size(0) && c.size(0) == kr_scale.size(0),
              "c [B, S, r], kr [B, G, S, P], c_scale / kr_scale [B, S]: the same B and S");
  return {c.data_ptr<int8_t>() + b * c.stride(0), c.stride(1), c_scale.data_ptr<c10::Half>() + b * c_scale.stride(0),
          kr.data_ptr<int8_t>() + b * kr.stride(0), kr.stride(1), kr.stride(2),
          kr_scale.data_ptr<c10::Half>() + b * kr_scale.stride(0), n};
}

// q [B, G, M, D] fp32 contiguous; up [C, R] fp32 (rows contiguous), rank <= R; two latent segments
// (the buffers' tokens, then this step's tokens that left the exact window); k_exact / v_exact
// [B, G, X, D] fp32 (rows contiguous). Returns (o [B, G, M, D], p [B, G, M, S + X] or [B, G, M, X]).
std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q, const at::Tensor& up, int64_t rank,
                                              const at::Tensor& c, const at::Tensor& c_scale, const at::Tensor& kr,
                                              const at::Tensor& kr_scale, const at::Tensor& c2,
                                              const at::Tensor& c2_scale, const at::Tensor& kr2,
                                              const at::Tensor& kr2_scale, const at::Tensor& k_exact,
                                              const at::Tensor& v_exact, bool need_probs) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.is_contiguous(),
              "q: contiguous fp32 [B, G, M, D] on the CPU");
  const int64_t B = q.size(0), G = q.size(1), M = q.size(2), D = q.size(3), P = kr.size(3), X = k_exact.size(2);
  TORCH_CHECK(up.scalar_type() == at::kFloat && up.dim() == 2 && up.stride(1) == 1 && 0 < rank && rank <= up.size(1) &&
                  up.size(0) == G * (2 * D - P),
              "up: fp32 [G * (2 D - P), R] with contiguous rows and 0 < rank <= R");
  for (const auto* x : {&k_exact, &v_exact})
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->dim() == 4 && x->size(0) == B && x->size(1) == G &&
                    x->size(2) == X && x->size(3) == D && x->stride(3) == 1 && (X <= 1 || x->stride(2) == D),
                "k_exact / v_exact: fp32 [B, G, X, D] with contiguous rows");
  TORCH_CHECK(c.size(0) == B && c.size(2) == rank && c2.size(0) == B && c2.size(2) == rank && kr.size(1) == G &&
                  kr2.size(1) == G && kr2.size(3) == P && P < D,
              "c / c2 [B, S, rank], kr / kr2 [B, G, S, P < D] do not match the queries");
  const Dims d{G, M, D, rank, P, X, c.size(1) + c2.size(1), need_probs};
  at::Tensor o = at::empty({B, G, M, D}, q.options());
  at::Tensor p = at::empty({B, G, M, d.p_row()}, q.options());
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      Row in;
      in.q = q.data_ptr<float>() + b * G * M * D;
      in.seg[0] = segment_of(c, c_scale, kr, kr_scale, b);
      in.seg[1] = segment_of(c2, c2_scale, kr2, kr2_scale, b);
      in.k_exact = k_exact.data_ptr<float>() + b * k_exact.stride(0);
      in.v_exact = v_exact.data_ptr<float>() + b * v_exact.stride(0);
      in.k_head = k_exact.stride(1);
      in.v_head = v_exact.stride(1);
      in.o = o.data_ptr<float>() + b * G * M * D;
      in.p = p.data_ptr<float>() + b * G * M * d.p_row();
      attend_row(d, in, up.data_ptr<float>(), up.stride(0));
    }
  });
  return {o, p};
}

int64_t mla_simd_tiles() { return simd_tiles.load(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pikv_kernels, m) {
  m.def("mla_decode" PIKV_OP_SUFFIX "(Tensor q, Tensor up, int rank, Tensor c, Tensor c_scale, Tensor kr, "
        "Tensor kr_scale, Tensor c2, Tensor c2_scale, Tensor kr2, Tensor kr2_scale, Tensor k_exact, Tensor v_exact, "
        "bool need_probs) -> (Tensor, Tensor)");
  m.impl("mla_decode" PIKV_OP_SUFFIX, c10::DispatchKey::CPU, TORCH_FN(mla_decode));
  m.def("mla_simd_tiles" PIKV_OP_SUFFIX "() -> int", &mla_simd_tiles);
}
