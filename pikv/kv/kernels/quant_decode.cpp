// Fused decode attention over PiKV's quantized KV stores (pikv/kv/quant.py), CPU.
//
// One query token per sequence. For each (batch row, kv head) one pass over the stored tokens in
// tiles: unpack the tile's packed key codes once, score the kv head's M = N/G query heads with the
// scales/zero points folded (as the torch path: quant.py's module docstring), online softmax
// (flash attention's running max and sum, once per tile), unpack the tile's value codes once and
// accumulate; then the exactly stored tokens (KIVI's fp16 residual, passed as fp32). Everything is
// fp32; only the order of the sums differs from the torch path.
//
// Layouts (all codes planar-packed: byte k of a row of rb bytes holds codes k, k + rb, k + 2 rb, ...
// from the low bits up; pikv.kv.quant.pack):
//   keys "token":   kc [B,G,S,n*rb] (n groups of kgroup channels, each packed alone), ks/kz [B,G,S,n]
//   keys "channel": kc [B,G,S/g,D*rb] (KIVI: per block of g = kgroup tokens, channel d's g codes in
//                   bytes d*rb..), ks/kz [B,G,S/g,D]
//   values:         always "token" (vc [B,G,S,n*rb], vs/vz [B,G,S,n])
//   exact:          k_exact/v_exact [B,G,R,D] fp32, attended after the S quantized tokens
// Per-token codes of a width that does not divide a byte come as bit slices (pikv/kv/bitslice.py):
// one codes tensor per slice, top first, each packed as above at its own width, sharing the scales.
// A tile unpacks them into one tile of whole codes (code = (top << w1 | s1) << w2 | s2, w the lower
// slices' widths), which the loops below read as they read unsliced ones: one more unpack per slice
// and tile, where summing each slice's scores and values as the torch path does (attention is linear
// in the code) would repeat every query head's dot products per slice.
// Shapes: B batch, G kv heads, N query heads, M = N/G, D head dim, S quantized tokens, R exact ones.
//
// Threads: at::parallel_for over B*G, i.e. torch's own intra-op setting (1 thread in the benches).
//
// Two builds of this file (decode_math.h): the default one takes the AVX-512 loops of
// quant_decode_avx512.h; the one compiled with -DPIKV_NO_SIMD (op quant_decode_portable) keeps the
// portable, auto-vectorised loops below.
#include "decode_math.h"  // PIKV_SIMD / PIKV_OP_SUFFIX, exp_nonpos, half_to_float, online_softmax_step, exp_shifted
#ifdef PIKV_SIMD
#include <atomic>
#endif
#ifdef PIKV_NO_SIMD
// Out of line, as before the AVX-512 loops came: GCC 12 otherwise inlines the KIVI scores into
// attend_row and compiles them ~1.4x slower (measured), which would flatter the SIMD build.
#define PIKV_PORTABLE_NOINLINE [[gnu::noinline]]
#else
#define PIKV_PORTABLE_NOINLINE
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTileTokens = 64;  // tokens per online-softmax step (a tile's floats stay in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// `count` consecutive packed bytes -> 8/BITS planes of `count` floats: out[i*count + x] is the
// code in bits i*BITS.. of byte x.
template <int BITS>
inline void unpack_planes_t(const uint8_t* bytes, int64_t count, float* out) {
  constexpr int kPer = 8 / BITS;
  constexpr unsigned kMask = (1u << BITS) - 1;
  for (int i = 0; i < kPer; ++i) {
    float* o = out + i * count;
#pragma omp simd
    for (int64_t x = 0; x < count; ++x) o[x] = static_cast<float>((bytes[x] >> (i * BITS)) & kMask);
  }
}

inline void unpack_planes(int bits, const uint8_t* bytes, int64_t count, float* out) {
  switch (bits) {
    case 1: unpack_planes_t<1>(bytes, count, out); break;
    case 2: unpack_planes_t<2>(bytes, count, out); break;
    case 4: unpack_planes_t<4>(bytes, count, out); break;
    default: unpack_planes_t<8>(bytes, count, out); break;
  }
}

// One quantized tensor of one (batch row, kv head): codes rows and their fp16 scales/zero points.
// Bit slices: this is the top slice and `low` the others, each with its own codes, row and bits.
struct Codes {
  const uint8_t* codes = nullptr;
  const c10::Half* scale = nullptr;
  const c10::Half* zero = nullptr;
  int64_t row = 0;   // bytes per row (a token, or a KIVI block)
  int64_t n = 0;     // scales per row
  int bits = 0;
  int64_t group = 0; // channels per scale ("token"), tokens per block ("channel" keys)
  std::vector<Codes> low;          // the lower bit slices, highest first (empty: unsliced codes)
  std::vector<int64_t> positions;  // a lower slice's planar positions in the top slice's planar order

  int64_t bytes_per_group() const { return row / n; }
};

// Planar order of a "token" row: entry (plane i, byte x = j*rbg + k) holds channel j*group + i*rbg + k.
std::vector<int64_t> token_channel_order(const Codes& c) {
  const int per = 8 / c.bits;
  const int64_t rbg = c.bytes_per_group();
  std::vector<int64_t> order(per * c.row);
  for (int i = 0; i < per; ++i)
    for (int64_t j = 0; j < c.n; ++j)
      for (int64_t k = 0; k < rbg; ++k) order[i * c.row + j * rbg + k] = j * c.group + i * rbg + k;
  return order;
}

struct Problem {
  int64_t M, D, S, R;
  bool channel_keys;
  float scale;
  bool need_probs;
};

// The online softmax state of the M query heads of one (batch row, kv head).
struct Heads {
  int64_t M, D;
  std::vector<float> max, sum, acc_planar, acc_exact, zero_sum;  // acc_planar in the values' planar order
  Heads(int64_t M_, int64_t D_, int64_t value_groups)
      : M(M_), D(D_), max(M_, -1e30f), sum(M_, 0.0f), acc_planar(M_ * D_, 0.0f), acc_exact(M_ * D_, 0.0f),
        zero_sum(M_ * value_groups, 0.0f) {}

  // Scores s[h*T + t] (fp32, -inf = masked) -> unnormalised weights in place; rescales the state.
  // -1e30, not -inf, as the running max's floor: a head whose keys so far are all masked keeps
  // weight 0 without a special case (as pikv.kv.attention.OnlineSoftmax).
  void weights(float* s, int64_t T, int64_t value_groups);
};

// The fp16 scales/zero points of tokens t0..t0+T-1 -> fp32 [n, T].
void token_scales(const Codes& c, int64_t t0, int64_t T, float* scale, float* zero) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < c.n; ++j) {
      scale[j * T + t] = half_to_float(c.scale[(t0 + t) * c.n + j]);
      zero[j * T + t] = half_to_float(c.zero[(t0 + t) * c.n + j]);
    }
}

// Rows t0..t0+T-1 of c, transposed: bytes_t[x*T + t] is byte x of token t.
void transpose_rows(const Codes& c, int64_t t0, int64_t T, uint8_t* bytes_t) {
  const uint8_t* src = c.codes + t0 * c.row;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t x = 0; x < c.row; ++x) bytes_t[x * T + t] = src[t * c.row + x];
}

// A lower bit slice's transposed bytes folded into a tile of the slices above: each code moves up
// by the slice's width and takes the slice's bits, at its channel's position in the top slice's
// planar order (the slices' planar orders differ when a row holds several groups).
void add_slice(const Codes& s, const uint8_t* bytes_t, int64_t T, float* out) {
  const unsigned mask = (1u << s.bits) - 1;
  const float up = static_cast<float>(1 << s.bits);
  for (int i = 0; i < 8 / s.bits; ++i)
    for (int64_t x = 0; x < s.row; ++x) {
      float* o = out + s.positions[i * s.row + x] * T;
      const uint8_t* b = bytes_t + x * T;
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) o[t] = o[t] * up + static_cast<float>((b[t] >> (i * s.bits)) & mask);
    }
}

// A tile of T per-token rows -> their codes with the tokens innermost: out[(i*row + x)*T + t] is the
// code in bits i*bits.. of byte x of token t (the bytes transposed first, then unpacked whole), so
// the score and value loops below run over the tile's tokens (one long vector loop) instead of a
// row's 8-16 bytes (measured: short per-row loops cost ~3x more per token); lower bit slices are
// added in. scale/zero -> fp32 [n, T] the same way.
void unpack_token_tile(const Codes& c, int64_t t0, int64_t T, uint8_t* bytes_t, float* out, float* scale,
                       float* zero) {
  transpose_rows(c, t0, T, bytes_t);
  unpack_planes(c.bits, bytes_t, c.row * T, out);
  for (const Codes& s : c.low) {
    transpose_rows(s, t0, T, bytes_t);
    add_slice(s, bytes_t, T, out);
  }
  token_scales(c, t0, T, scale, zero);
}

struct TokenTile {  // scratch of one unpacked tile of per-token codes (the AVX-512 loops write whole
                   // vectors of 16 tokens: sizes rounded up)
  std::vector<uint8_t> bytes;
  std::vector<float> codes, scale, zero, tmp;
  TokenTile(int64_t tile, int64_t D, int64_t n, int64_t M)
      : bytes(tile * D), codes(round16(tile) * D), scale(round16(tile) * n), zero(round16(tile) * n),
        tmp(round16(tile) * M) {}
  static int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }
};

}  // namespace

#ifdef PIKV_SIMD
#include "quant_decode_avx512.h"  // at global scope: its namespace simd extends decode_math.h's
#endif

namespace {

void Heads::weights(float* s, int64_t T, int64_t value_groups) {
  for (int64_t h = 0; h < M; ++h) {
    float* sh = s + h * T;
    const float alpha = online_softmax_step(sh, T, max[h], sum[h]);
    if (alpha != 1.0f) {
      for (int64_t d = 0; d < D; ++d) {
        acc_planar[h * D + d] *= alpha;
        acc_exact[h * D + d] *= alpha;
      }
      for (int64_t j = 0; j < value_groups; ++j) zero_sum[h * value_groups + j] *= alpha;
    }
  }
}

// Scores of tokens t0..t0+T-1 with per-token keys: s = sum_j scale_tj (q_j . code_tj) + zero_tj sum(q_j).
void token_scores(const Codes& k, const float* q_planar, const float* q_group_sum, int64_t M, int64_t D,
                  int64_t t0, int64_t T, TokenTile& tt, float* s) {
#ifdef PIKV_SIMD
  if (simd::token_keys_ok(k, D)) return simd::token_scores(k, q_planar, q_group_sum, M, D, t0, T, tt, s);
#endif
  const int per = 8 / k.bits;
  const int64_t rbg = k.bytes_per_group();
  unpack_token_tile(k, t0, T, tt.bytes.data(), tt.codes.data(), tt.scale.data(), tt.zero.data());
  float* dot = tt.tmp.data();
  for (int64_t h = 0; h < M; ++h) {
    float* sh = s + h * T;
    std::fill(sh, sh + T, 0.0f);
    for (int64_t j = 0; j < k.n; ++j) {
      std::fill(dot, dot + T, 0.0f);
      for (int i = 0; i < per; ++i)
        for (int64_t x = j * rbg; x < (j + 1) * rbg; ++x) {
          const float qv = q_planar[h * D + i * k.row + x];
          const float* u = tt.codes.data() + (i * k.row + x) * T;
#pragma omp simd
          for (int64_t t = 0; t < T; ++t) dot[t] += qv * u[t];
        }
      const float qs = q_group_sum[h * k.n + j];
      const float* sc = tt.scale.data() + j * T;
      const float* zr = tt.zero.data() + j * T;
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) sh[t] += sc[t] * dot[t] + zr[t] * qs;
    }
  }
}

// One KIVI block's scores for one head, PER planes of RB tokens: a compile-time size, so the g
// scores stay in registers across the channel loop (a loop through memory chained every update
// on the previous store: ~3x slower, measured).
template <int PER, int RB>
inline void channel_block(const float* u, int64_t count, int64_t D, const float* qs, float* sv) {
  float acc[PER * RB];
  for (int x = 0; x < PER * RB; ++x) acc[x] = sv[x];
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qs[d];
    for (int i = 0; i < PER; ++i)
      for (int x = 0; x < RB; ++x) acc[i * RB + x] += qd * u[i * count + d * RB + x];
  }
  for (int x = 0; x < PER * RB; ++x) sv[x] = acc[x];
}

// Scores of KIVI blocks b0..b0+nb-1 (per-channel keys over g tokens): the block's scale folded into
// the query, its zero point one dot product: s_t = sum_d (q_d scale_d) code_td + q . zero.
PIKV_PORTABLE_NOINLINE void channel_scores(const Codes& k, const float* q, int64_t M, int64_t D, int64_t b0, int64_t nb,
                    float* planes, float* q_scaled, float* s) {
#ifdef PIKV_SIMD
  if (simd::kivi_keys_ok(k, D)) return simd::channel_scores(k, q, M, D, b0, nb, planes, q_scaled, s);
#endif
  const int per = 8 / k.bits;
  const int64_t g = k.group, rb = g / per, count = nb * k.row, T = nb * g;
  unpack_planes(k.bits, k.codes + b0 * k.row, count, planes);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const c10::Half* sc = k.scale + (b0 + blk) * D;
    const c10::Half* zr = k.zero + (b0 + blk) * D;
    for (int64_t h = 0; h < M; ++h) {
      const float* qh = q + h * D;
      float base = 0.0f;
#pragma omp simd reduction(+ : base)
      for (int64_t d = 0; d < D; ++d) {
        q_scaled[h * D + d] = qh[d] * half_to_float(sc[d]);
        base += qh[d] * half_to_float(zr[d]);
      }
      std::fill(s + h * T + blk * g, s + h * T + (blk + 1) * g, base);
    }
    const float* u = planes + blk * D * rb;
    for (int64_t h = 0; h < M; ++h) {
      float* sv = s + h * T + blk * g;
      const float* qs = q_scaled + h * D;
      if (k.bits == 2 && g == 32) channel_block<4, 8>(u, count, D, qs, sv);
      else if (k.bits == 4 && g == 32) channel_block<2, 16>(u, count, D, qs, sv);
      else if (k.bits == 8 && g == 32) channel_block<1, 32>(u, count, D, qs, sv);
      else
        for (int64_t d = 0; d < D; ++d)
          for (int i = 0; i < per; ++i)
            for (int64_t x = 0; x < rb; ++x) sv[i * rb + x] += qs[d] * u[i * count + d * rb + x];
    }
  }
}

// Weights x per-token values of tokens t0..t0+T-1: acc += sum_t (p_t scale_tj) code_t per group j,
// in the values' planar order; the zero points' share sum_t p_t zero_tj is added once at the end.
void token_values(const Codes& v, const float* p, Heads& st, int64_t t0, int64_t T, TokenTile& tt) {
#ifdef PIKV_SIMD
  if (simd::values_ok(v, st.D)) return simd::token_values(v, p, st, t0, T, tt);
#endif
  const int per = 8 / v.bits;
  const int64_t rbg = v.bytes_per_group(), D = st.D;
  unpack_token_tile(v, t0, T, tt.bytes.data(), tt.codes.data(), tt.scale.data(), tt.zero.data());
  float* ps = tt.tmp.data();
  for (int64_t h = 0; h < st.M; ++h) {
    const float* ph = p + h * T;
    for (int64_t j = 0; j < v.n; ++j) {
      const float* sc = tt.scale.data() + j * T;
      const float* zr = tt.zero.data() + j * T;
      float zsum = 0.0f;
#pragma omp simd reduction(+ : zsum)
      for (int64_t t = 0; t < T; ++t) {
        ps[t] = ph[t] * sc[t];
        zsum += ph[t] * zr[t];
      }
      st.zero_sum[h * v.n + j] += zsum;
      for (int i = 0; i < per; ++i)
        for (int64_t x = j * rbg; x < (j + 1) * rbg; x += 4) {  // 4 independent sums (rbg % 4 == 0)
          const float* u = tt.codes.data() + (i * v.row + x) * T;
          float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t t = 0; t < T; ++t) {
            a0 += ps[t] * u[t];
            a1 += ps[t] * u[T + t];
            a2 += ps[t] * u[2 * T + t];
            a3 += ps[t] * u[3 * T + t];
          }
          float* acc = st.acc_planar.data() + h * D + i * v.row + x;
          acc[0] += a0, acc[1] += a1, acc[2] += a2, acc[3] += a3;
        }
    }
  }
}

void exact_scores(const float* k, const float* q, int64_t M, int64_t D, int64_t t0, int64_t T, float* s) {
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = k + (t0 + t) * D;
    for (int64_t h = 0; h < M; ++h) {
      const float* qh = q + h * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * kt[d];
      s[h * T + t] = dot;
    }
  }
}

void exact_values(const float* v, const float* p, Heads& st, int64_t t0, int64_t T) {
  const int64_t D = st.D;
  for (int64_t t = 0; t < T; ++t) {
    const float* vt = v + (t0 + t) * D;
    for (int64_t h = 0; h < st.M; ++h) {
      const float pt = p[h * T + t];
      float* acc = st.acc_exact.data() + h * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += pt * vt[d];
    }
  }
}

// Masked scores -> -inf and, when the probabilities are asked for, a copy of the scores into them.
void mask_and_keep(float* s, int64_t M, int64_t T, const bool* keep, int64_t keep_stride, float* probs,
                   int64_t probs_stride) {
  if (keep != nullptr)
    for (int64_t t = 0; t < T; ++t)
      if (!keep[t * keep_stride])
        for (int64_t h = 0; h < M; ++h) s[h * T + t] = kNegInf;
  if (probs != nullptr)
    for (int64_t h = 0; h < M; ++h) std::memcpy(probs + h * probs_stride, s + h * T, T * sizeof(float));
}

struct Row {  // the inputs of one (batch row, kv head)
  const float* q;  // [M, D], not yet scaled
  Codes k, v;
  const float* k_exact;
  const float* v_exact;  // [R, D]
  const bool* keep;  // [S + R] with stride keep_stride, or nullptr
  int64_t keep_stride;
  float* out;    // [M, D]
  float* probs;  // [M, S + R] with row stride probs_stride, or nullptr
  int64_t probs_stride;
};

void attend_row(const Problem& pb, const Row& r) {
  const int64_t M = pb.M, D = pb.D;
  const int64_t tile = pb.channel_keys ? std::max<int64_t>(1, kTileTokens / r.k.group) * r.k.group : kTileTokens;
  Heads st(M, D, r.v.n);
  std::vector<float> q(M * D);  // the query scaled by 1/sqrt(D)
  for (int64_t x = 0; x < M * D; ++x) q[x] = r.q[x] * pb.scale;
  // q_scaled: the query times each KIVI block's scales, for the blocks of one tile
  std::vector<float> s(M * tile), kplanes(tile * D), q_scaled(M * D * std::max<int64_t>(1, tile / r.k.group));
  TokenTile ktile(pb.channel_keys ? 0 : tile, D, r.k.n, M), vtile(tile, D, r.v.n, M);
  // per-token keys: the query in the codes' planar order, and its sum per channel group
  std::vector<float> q_planar, q_group_sum;
  if (!pb.channel_keys && pb.S) {
    const auto order = token_channel_order(r.k);
    q_planar.resize(M * D);
    q_group_sum.assign(M * r.k.n, 0.0f);
    for (int64_t h = 0; h < M; ++h)
      for (int64_t c = 0; c < D; ++c) {
        q_planar[h * D + c] = q[h * D + order[c]];
        q_group_sum[h * r.k.n + order[c] / r.k.group] += q[h * D + order[c]];
      }
  }
  for (int64_t t0 = 0; t0 < pb.S; t0 += tile) {
    const int64_t T = std::min(tile, pb.S - t0);
    if (pb.channel_keys)
      channel_scores(r.k, q.data(), M, D, t0 / r.k.group, T / r.k.group, kplanes.data(), q_scaled.data(), s.data());
    else
      token_scores(r.k, q_planar.data(), q_group_sum.data(), M, D, t0, T, ktile, s.data());
    mask_and_keep(s.data(), M, T, r.keep ? r.keep + t0 * r.keep_stride : nullptr, r.keep_stride,
                  r.probs ? r.probs + t0 : nullptr, r.probs_stride);
    st.weights(s.data(), T, r.v.n);
    token_values(r.v, s.data(), st, t0, T, vtile);
  }
  for (int64_t t0 = 0; t0 < pb.R; t0 += tile) {
    const int64_t T = std::min(tile, pb.R - t0);
    exact_scores(r.k_exact, q.data(), M, D, t0, T, s.data());
    mask_and_keep(s.data(), M, T, r.keep ? r.keep + (pb.S + t0) * r.keep_stride : nullptr, r.keep_stride,
                  r.probs ? r.probs + pb.S + t0 : nullptr, r.probs_stride);
    st.weights(s.data(), T, r.v.n);
    exact_values(r.v_exact, s.data(), st, t0, T);
  }
  const auto v_order = pb.S ? token_channel_order(r.v) : std::vector<int64_t>();
  for (int64_t h = 0; h < M; ++h) {
    const float inv = 1.0f / st.sum[h];  // 0 keys read: 0/0 = nan, as the torch path
    float* o = r.out + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = st.acc_exact[h * D + d];
    for (int64_t x = 0; x < static_cast<int64_t>(v_order.size()); ++x) {
      const int64_t c = v_order[x];
      o[c] += st.acc_planar[h * D + x] + st.zero_sum[h * r.v.n + c / r.v.group];
    }
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    if (r.probs != nullptr) {
      float* p = r.probs + h * r.probs_stride;
      exp_shifted(p, pb.S + pb.R, st.max[h], inv);
    }
  }
}

void check_codes(at::TensorList codes, at::IntArrayRef bits, const at::Tensor& scale, const at::Tensor& zero,
                 const char* what) {
  TORCH_CHECK(!codes.empty() && codes.size() == bits.size(), what, " codes: one tensor and one width per bit slice");
  int64_t total = 0;
  for (size_t j = 0; j < codes.size(); ++j) {
    const at::Tensor& c = codes[j];
    TORCH_CHECK(bits[j] == 1 || bits[j] == 2 || bits[j] == 4 || bits[j] == 8, "bits must be 1, 2, 4 or 8, got ",
                bits[j]);
    TORCH_CHECK(c.dim() == 4 && c.scalar_type() == at::kByte && c.stride(3) == 1 && c.stride(2) == c.size(3) &&
                    c.sizes().slice(0, 3) == codes[0].sizes().slice(0, 3) &&
                    c.size(3) * bits[0] == codes[0].size(3) * bits[j],
                what, " codes: uint8 [B, G, rows, row bytes] per bit slice, contiguous rows of as many codes");
    total += bits[j];
  }
  TORCH_CHECK(total <= 8, what, " bit slices: ", total, " bits, at most 8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf && scale.strides() == zero.strides() &&
                  scale.sizes() == zero.sizes() && scale.sizes().slice(0, 3) == codes[0].sizes().slice(0, 3) &&
                  scale.stride(3) == 1 && scale.stride(2) == scale.size(3),
              what, " scale/zero: fp16 [B, G, rows, n] with the codes' rows, equal strides and contiguous rows");
}

Codes codes_of(at::TensorList codes, const at::Tensor& scale, const at::Tensor& zero, at::IntArrayRef bits,
               int64_t group, int64_t b, int64_t g) {
  const auto slice = [&](size_t j) {
    Codes s;
    s.codes = codes[j].data_ptr<uint8_t>() + b * codes[j].stride(0) + g * codes[j].stride(1);
    s.scale = scale.data_ptr<c10::Half>() + b * scale.stride(0) + g * scale.stride(1);
    s.zero = zero.data_ptr<c10::Half>() + b * zero.stride(0) + g * zero.stride(1);
    s.row = codes[j].size(3);
    s.n = scale.size(3);
    s.bits = static_cast<int>(bits[j]);
    s.group = group;
    return s;
  };
  Codes out = slice(0);
  if (codes.size() > 1) {
    const auto order = token_channel_order(out);
    std::vector<int64_t> position(order.size());  // channel -> its position in the top slice's planar order
    for (size_t e = 0; e < order.size(); ++e) position[order[e]] = static_cast<int64_t>(e);
    for (size_t j = 1; j < codes.size(); ++j) {
      Codes s = slice(j);
      for (int64_t c : token_channel_order(s)) s.positions.push_back(position[c]);
      out.low.push_back(std::move(s));
    }
  }
  return out;
}

// q_BND fp32 contiguous. kc/vc: the codes of each bit slice, top first (one tensor: unsliced), kbits/
// vbits their widths. keep: bool [B, G, S + R] (any strides; numel 0 = every key). Returns (o_BND fp32,
// probs_BNS fp32 or an empty tensor).
std::tuple<at::Tensor, at::Tensor> quant_decode(const at::Tensor& q, double scale, bool channel_keys,
                                                at::TensorList kc, const at::Tensor& ks, const at::Tensor& kz,
                                                at::IntArrayRef kbits, int64_t kgroup, at::TensorList vc,
                                                const at::Tensor& vs, const at::Tensor& vz, at::IntArrayRef vbits,
                                                int64_t vgroup, const at::Tensor& k_exact, const at::Tensor& v_exact,
                                                const at::Tensor& keep, bool need_probs) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(),
              "q: contiguous fp32 [B, N, D] on the CPU");
  const int64_t B = q.size(0), N = q.size(1), D = q.size(2);
  check_codes(kc, kbits, ks, kz, "key");
  check_codes(vc, vbits, vs, vz, "value");
  TORCH_CHECK(!channel_keys || kc.size() == 1, "per-channel (KIVI) keys come in one slice");
  // the top slice's width: the value loops read a tile in its planar layout
  TORCH_CHECK(vgroup * vbits[0] % 32 == 0, "value groups must pack into a multiple of 4 bytes, got ", vgroup,
              " channels of ", vbits[0], " bits");
  const int64_t G = vs.size(1);
  TORCH_CHECK(N % G == 0, "query heads ", N, " not a multiple of kv heads ", G);
  const int64_t S = vs.size(2), R = k_exact.size(2);
  TORCH_CHECK(k_exact.scalar_type() == at::kFloat && v_exact.scalar_type() == at::kFloat && k_exact.stride(3) == 1 &&
                  k_exact.stride(2) == D && v_exact.stride(3) == 1 && v_exact.stride(2) == D,
              "exact keys/values: fp32 [B, G, R, D] with contiguous rows");
  TORCH_CHECK(vs.size(3) * vgroup == D && (channel_keys ? kc[0].size(2) * kgroup == S : ks.size(3) * kgroup == D),
              "groups do not match the head dim / tokens");
  const bool masked = keep.numel() > 0;
  TORCH_CHECK(!masked || (keep.scalar_type() == at::kBool && keep.dim() == 3 && keep.size(2) == S + R),
              "keep: bool [B, G, S + R]");
  const Problem pb{N / G, D, S, R, channel_keys, static_cast<float>(scale), need_probs};
  at::Tensor out = at::empty({B, N, D}, q.options());
  at::Tensor probs = at::empty({need_probs ? B : 0, N, S + R}, q.options());
  at::parallel_for(0, B * G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      Row r;
      r.q = q.data_ptr<float>() + (b * N + g * pb.M) * D;
      r.k = codes_of(kc, ks, kz, kbits, kgroup, b, g);
      r.v = codes_of(vc, vs, vz, vbits, vgroup, b, g);
      r.k_exact = k_exact.data_ptr<float>() + b * k_exact.stride(0) + g * k_exact.stride(1);
      r.v_exact = v_exact.data_ptr<float>() + b * v_exact.stride(0) + g * v_exact.stride(1);
      r.keep = masked ? keep.data_ptr<bool>() + b * keep.stride(0) + g * keep.stride(1) : nullptr;
      r.keep_stride = masked ? keep.stride(2) : 0;
      r.out = out.data_ptr<float>() + (b * N + g * pb.M) * D;
      r.probs = need_probs ? probs.data_ptr<float>() + (b * N + g * pb.M) * (S + R) : nullptr;
      r.probs_stride = S + R;
      attend_row(pb, r);
    }
  });
  return {out, probs};
}

}  // namespace

// Both builds register into one namespace (fragments), under their own names: quant_decode and
// quant_decode_portable; simd_tiles* counts the tiles the AVX-512 loops took (all 0 without them).
static std::vector<int64_t> simd_tiles() {
#ifdef PIKV_SIMD
  return {simd::tiles[0].load(), simd::tiles[1].load(), simd::tiles[2].load()};
#else
  return {0, 0, 0};
#endif
}

TORCH_LIBRARY_FRAGMENT(pikv_kernels, m) {
  m.def("quant_decode" PIKV_OP_SUFFIX "(Tensor q, float scale, bool channel_keys, Tensor[] kc, Tensor ks, Tensor kz, "
        "int[] kbits, int kgroup, Tensor[] vc, Tensor vs, Tensor vz, int[] vbits, int vgroup, Tensor k_exact, "
        "Tensor v_exact, Tensor keep, bool need_probs) -> (Tensor, Tensor)");
  m.impl("quant_decode" PIKV_OP_SUFFIX, c10::DispatchKey::CPU, TORCH_FN(quant_decode));
  m.def("simd_tiles" PIKV_OP_SUFFIX "() -> int[]", &simd_tiles);
}
