// Fused Double Sparsity decode step for the CPU: label scores -> top-k -> attention over the selected rows, one
// pass per (batch, KV head), nothing materialised beyond a few per-thread rows of scratch.
//
// Why native: the torch path (cpu.py) spends more per step on fixed costs than on memory traffic (a bmm with G rows,
// a sorted topk over every row, two gathers into fresh rows, SDPA, Python glue); here the labels are read once, the
// selection is a linear-time select on the group score, and each selected K/V row is read once for the G heads.
//
// The contract is the op's (DESIGN.md, `dsc::ds_decode`), for the case the fast path takes: one query position,
// every row valid on the prefix [0, n) (n = lengths[b] or S), no bias. Called through ctypes (dsc/kernels/native.py),
// which validates the arguments; nothing here checks them again.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define DSC_AVX2 1  // the vector paths below; scalar loops finish every one of them (and stand alone without it)
#include <immintrin.h>
#endif

namespace {

enum Kind { F32 = 0, BF16 = 1, F16 = 2, U8 = 3, U4 = 4 };

inline float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t x) {
  _Float16 h;
  std::memcpy(&h, &x, 2);
  return static_cast<float>(h);
}

// A row of `n` 16-bit values (BF16 or F16) as fp32 into `dst` (fp32 rows are read in place by the callers).
inline void load_row(const void* src, int kind, int64_t n, float* dst) {
  if (kind == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

inline int elem_size(int kind) { return kind == F32 ? 4 : (kind == U8 || kind == U4) ? 1 : 2; }

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// A float's rank as an unsigned key: larger float -> larger key; every NaN above +inf (NaN ranks first).
inline uint32_t rank_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;  // negative: all bits
  return f != f ? 0xFFFFFFFFu : u ^ flip;
}

struct Labels {
  const uint8_t* data;
  int kind;  // F32 / BF16 / F16 (16-bit labels) or U8 / U4 (codes)
  int64_t sb, sh, ss;  // strides of data in elements (batch, head, token); the channel stride is 1
  const float* scale;
  const float* zero;
  int64_t zb, zh;  // strides of scale/zero (batch, head); the token stride is 1
};

// Each head's score of one token from its r label values (fp32): R > 0 fixes r at compile time (fully unrolled).
template <int R>
inline void score_token(const float* lab, const float* qc, const float* qsum, int64_t g_rows, int64_t r_rt,
                        float scale, float zero, bool quantized, float* scores, int64_t n, int64_t t) {
  const int64_t r = R > 0 ? R : r_rt;
  for (int64_t g = 0; g < g_rows; ++g) {
    const float* qg = qc + g * r;
    float s = 0.f;
    for (int64_t c = 0; c < r; ++c) s += qg[c] * lab[c];
    if (quantized) s = s * scale + zero * qsum[g];
    scores[g * n + t] = s;
  }
}

// Token t's r label values as fp32: a pointer into the data for fp32 labels, else converted into `lab`. 4-bit
// codes come out even channels first, then odd ones (low nibbles, then high nibbles: no interleaving), the order
// of the query channels `qc` for 4-bit labels (dsc_ds_decode).
template <int R, int K>
inline const float* label_row(const uint8_t* row, int64_t r_rt, float* lab) {
  const int64_t r = R > 0 ? R : r_rt;
  if constexpr (K == F32) return reinterpret_cast<const float*>(row);
  int64_t c = 0;
  if constexpr (K == U8) {
#ifdef DSC_AVX2
    for (; c + 8 <= r; c += 8)
      _mm256_storeu_ps(lab + c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c)))));
#endif
    for (; c < r; ++c) lab[c] = static_cast<float>(row[c]);
  } else if constexpr (K == U4) {
    const int64_t even = (r + 1) / 2, odd = r / 2;
#ifdef DSC_AVX2
    if (odd == even) {
      const __m128i low4 = _mm_set1_epi8(15);
      for (; c + 8 <= odd; c += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c));
        _mm256_storeu_ps(lab + c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(bytes, low4))));
        _mm256_storeu_ps(lab + even + c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                             _mm_and_si128(_mm_srli_epi16(bytes, 4), low4))));
      }
    }
#endif
    for (int64_t j = c; j < even; ++j) lab[j] = static_cast<float>(row[j] & 15);
    for (int64_t j = c; j < odd; ++j) lab[even + j] = static_cast<float>(row[j] >> 4);
  } else {
    load_row(row, K, r, lab);
  }
  return lab;
}

#ifdef DSC_AVX2
// Lane i of the result: the sum of v[i]'s eight lanes.
inline __m256 transpose_sum8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// Scores of 8 consecutive tokens (rows[i]: token i's R fp32 labels) for each head, into scores[g * n + t0 ..]:
// one 8-lane product per (token, head), then a transpose-add, instead of a horizontal sum per dot product.
template <int R>
inline void score8(const float* const* rows, const float* qc, const float* qsum, int64_t g_rows, const float* sc,
                   const float* zp, float* scores, int64_t n, int64_t t0) {
  static_assert(R % 8 == 0, "whole 8-lane vectors");
  for (int64_t g = 0; g < g_rows; ++g) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) {
      acc[i] = _mm256_mul_ps(_mm256_loadu_ps(rows[i]), _mm256_loadu_ps(qc + g * R));
      for (int c = 8; c < R; c += 8)
        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[i] + c), _mm256_loadu_ps(qc + g * R + c), acc[i]);
    }
    __m256 s = transpose_sum8(acc);
    if (sc) s = _mm256_fmadd_ps(_mm256_loadu_ps(zp + t0), _mm256_set1_ps(qsum[g]),
                                _mm256_mul_ps(s, _mm256_loadu_ps(sc + t0)));
    _mm256_storeu_ps(scores + g * n + t0, s);
  }
}

// Token `row`'s R label values as R/8 fp32 vectors, kept in registers (no store and reload), in label_row's
// channel order.
template <int R, int K>
inline void label_vectors(const uint8_t* row, __m256* x) {
  static_assert(R % 8 == 0 && (K != U4 || R % 16 == 0), "whole 8-lane vectors");
  for (int j = 0; j < R / 8; ++j) {
    if constexpr (K == F32) {
      x[j] = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * j);
    } else if constexpr (K == BF16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row) + j);
      x[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else if constexpr (K == F16) {
      x[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row) + j));
    } else if constexpr (K == U8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j));
      x[j] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    } else if (j < R / 16) {  // 4-bit: vector j holds the low nibbles of bytes [8j, 8j + 8), vector R/16 + j the high
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * j));
      const __m128i low4 = _mm_set1_epi8(15);
      x[j] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, low4)));
      x[R / 16 + j] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low4)));
    }
  }
}

// Scores of the 8 tokens t0.. for 4 heads (rows of `qc`, R each), into scores[g * n + t0 ..] for g < g_store.
// Tokens t0 + i and t0 + 4 + i make the 8 products of one transpose_sum8 (lanes: token t0 + i's 4 heads, then
// t0 + 4 + i's), and four such vectors transpose into one vector per head: each token's labels are converted
// once, in registers, for all 4 heads.
template <int R, int K>
inline void score8_heads4(const uint8_t* base, int64_t row_bytes, int64_t t0, const float* qc, const float* qsum,
                          int64_t g_store, const float* sc, const float* zp, float* scores, int64_t n) {
  __m256 y[4];
  for (int i = 0; i < 4; ++i) {
    __m256 acc[8];
    for (int half = 0; half < 2; ++half) {
      __m256 x[R / 8];
      label_vectors<R, K>(base + (t0 + i + 4 * half) * row_bytes, x);
      for (int g = 0; g < 4; ++g) {
        __m256 a = _mm256_mul_ps(x[0], _mm256_loadu_ps(qc + g * R));
        for (int j = 1; j < R / 8; ++j) a = _mm256_fmadd_ps(x[j], _mm256_loadu_ps(qc + g * R + 8 * j), a);
        acc[4 * half + g] = a;
      }
    }
    y[i] = transpose_sum8(acc);
  }
  const __m256 lo01 = _mm256_unpacklo_ps(y[0], y[1]), hi01 = _mm256_unpackhi_ps(y[0], y[1]);
  const __m256 lo23 = _mm256_unpacklo_ps(y[2], y[3]), hi23 = _mm256_unpackhi_ps(y[2], y[3]);
  const __m256 head[4] = {_mm256_shuffle_ps(lo01, lo23, 0x44), _mm256_shuffle_ps(lo01, lo23, 0xEE),
                          _mm256_shuffle_ps(hi01, hi23, 0x44), _mm256_shuffle_ps(hi01, hi23, 0xEE)};
  for (int64_t g = 0; g < g_store; ++g) {
    __m256 s = head[g];
    if (sc) s = _mm256_fmadd_ps(_mm256_loadu_ps(zp + t0), _mm256_set1_ps(qsum[g]),
                                _mm256_mul_ps(s, _mm256_loadu_ps(sc + t0)));
    _mm256_storeu_ps(scores + g * n + t0, s);
  }
}
#endif

#ifdef __AVX512F__
// Quantized labels on AVX-512: 16 tokens per block, one token per lane ("vertical"), so no dot product is summed
// across lanes. A token's codes are NW 32-bit words (4 codes, or 8 nibbles); the block's 16 x NW words are
// transposed in registers (log2 NW rounds of two-source permutes, each swapping one bit of the register index with
// one of the lane index) into NW vectors, vector w holding word w of the 16 tokens; each code is then a shift and
// mask of its word, converted once and multiplied into up to 4 heads. The FMAs per token are the dot products' own; the
// horizontal sums and their shuffles, which bound score8_heads4 on codes, are gone.

// Round k of the transpose: the permute indices for the new register with bit k clear (pick[0]) and set (pick[1]).
// Adding the two instead gives a round of sum_lanes16 below.
struct TransposeIndex {
  int32_t pick[4][2][16];
  constexpr TransposeIndex() : pick() {
    for (int k = 0; k < 4; ++k)
      for (int lane = 0; lane < 16; ++lane) {
        const int from_b = lane >> k & 1 ? 16 : 0;  // lane bit k set: the register with bit k set
        pick[k][0][lane] = from_b + (lane & ~(1 << k));
        pick[k][1][lane] = from_b + (lane | (1 << k));
      }
  }
};
constexpr TransposeIndex kTranspose;

// PackedIndex<NW>::pick[w]: lane t takes dword NW t + w (mod 32) of a pair of vectors.
template <int NW>
struct PackedIndex {
  int32_t pick[NW][16];
  constexpr PackedIndex() : pick() {
    for (int w = 0; w < NW; ++w)
      for (int lane = 0; lane < 16; ++lane) pick[w][lane] = (NW * lane + w) & 31;
  }
};
template <int NW>
constexpr PackedIndex<NW> kPacked{};

// code_words16 for rows packed back to back (the label cache's own layout, row_bytes = 4 NW): the block is NW whole
// vectors, word w of token t at dword NW t + w; x[w] is one two-source permute of vectors 0 and 1 (NW = 2), or of
// 0-1 for tokens 0-7 and 2-3 for tokens 8-15, blended (NW = 4). Against the strided gather below it saves 12
// inserts (NW = 4) or 16 scalar loads (NW = 2) a block: 4-bit labels of 16 channels scored in 16-19% fewer cycles
// (scripts/native_phases.py, 9x3x64, batch 4, 64K); 8-bit ones, bound by their bytes, about the same.
template <int NW>
inline void packed_code_words16(const uint8_t* base, int64_t t0, __m512i* x) {
  static_assert(NW == 2 || NW == 4, "64- or 128-bit rows");
  const uint8_t* block = base + t0 * 4 * NW;
  __m512i v[NW];
  for (int i = 0; i < NW; ++i) v[i] = _mm512_loadu_si512(block + 64 * i);
  for (int w = 0; w < NW; ++w) {
    const __m512i pick = _mm512_loadu_si512(kPacked<NW>.pick[w]);
    x[w] = _mm512_permutex2var_epi32(v[0], pick, v[1]);
    if constexpr (NW == 4) x[w] = _mm512_mask_blend_epi32(0xFF00, x[w], _mm512_permutex2var_epi32(v[2], pick, v[3]));
  }
}

// x[w] = word w of tokens t0 .. t0 + 15 (lane = token), for rows of NW words `row_bytes` apart.
template <int NW>
inline void code_words16(const uint8_t* base, int64_t row_bytes, int64_t t0, __m512i* x) {
  static_assert(NW == 2 || NW == 4 || NW == 8, "whole 64-, 128- or 256-bit rows");
  if constexpr (NW <= 4) {
    if (row_bytes == 4 * NW) return packed_code_words16<NW>(base, t0, x);
  }
  // Register p, slot e holds token e * NW + p: after the rounds, lane L of every register is token L.
  for (int p = 0; p < NW; ++p) {
    const uint8_t* row = base + (t0 + p) * row_bytes;
    if constexpr (NW == 2) {
      int64_t slot[8];
      for (int e = 0; e < 8; ++e) std::memcpy(&slot[e], row + 2 * e * row_bytes, 8);
      x[p] = _mm512_set_epi64(slot[7], slot[6], slot[5], slot[4], slot[3], slot[2], slot[1], slot[0]);
    } else if constexpr (NW == 8) {
      x[p] = _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * row_bytes)), 1);
    } else {
      __m512i v = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 4 * row_bytes)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8 * row_bytes)), 2);
      x[p] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 12 * row_bytes)), 3);
    }
  }
  for (int k = 0; (1 << k) < NW; ++k) {
    const __m512i lo = _mm512_loadu_si512(kTranspose.pick[k][0]), hi = _mm512_loadu_si512(kTranspose.pick[k][1]);
    for (int p = 0; p < NW; ++p) {
      if (p >> k & 1) continue;
      const __m512i a = x[p], b = x[p | 1 << k];
      x[p] = _mm512_permutex2var_epi32(a, lo, b);
      x[p | 1 << k] = _mm512_permutex2var_epi32(a, hi, b);
    }
  }
}

// Scores of the 16 tokens t0.. for GH (1-4) heads (rows of `qc`, R each, in label_row's order), into
// scores[g * n + t0 ..]: 8- or 4-bit codes, R = 16 or 32.
template <int R, int K, int GH>
inline void score16_codes(const uint8_t* base, int64_t row_bytes, int64_t t0, const float* qc, const float* qsum,
                          const float* sc, const float* zp, float* scores, int64_t n) {
  constexpr int NW = K == U8 ? R / 4 : R / 8;
  constexpr int kCodeBits = K == U8 ? 8 : 4, kPerWord = 32 / kCodeBits;
  __m512i words[NW];
  code_words16<NW>(base, row_bytes, t0, words);
  const __m512i mask = _mm512_set1_epi32((1 << kCodeBits) - 1);
  const __m512 nibbles = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[GH];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int w = 0; w < NW; ++w)
    for (int i = 0; i < kPerWord; ++i) {
      // code i of word w: byte i (8-bit codes), or the low (i even) / high (i odd) nibble of byte i / 2, whose
      // query channels sit at slots 4w + i / 2 and R/2 + 4w + i / 2 (label_row's order)
      const int shift = K == U8 ? 8 * i : 8 * (i / 2) + 4 * (i % 2);
      const int slot = K == U8 ? 4 * w + i : (i % 2 ? R / 2 : 0) + 4 * w + i / 2;
      // a 4-bit code as a float: a permute of 0..15 by the shifted word (it reads an index's low 4 bits only), in
      // place of a mask and a conversion: 4-bit scoring 5-15% fewer cycles (scripts/native_phases.py)
      const __m512i shifted = shift ? _mm512_srli_epi32(words[w], shift) : words[w];
      const __m512 code = K == U4 ? _mm512_permutexvar_ps(shifted, nibbles)
                                  : _mm512_cvtepi32_ps(_mm512_and_si512(shifted, mask));
      for (int g = 0; g < GH; ++g) acc[g] = _mm512_fmadd_ps(code, _mm512_set1_ps(qc[g * R + slot]), acc[g]);
    }
  for (int g = 0; g < GH; ++g) {
    const __m512 s = _mm512_fmadd_ps(_mm512_loadu_ps(zp + t0), _mm512_set1_ps(qsum[g]),
                                     _mm512_mul_ps(acc[g], _mm512_loadu_ps(sc + t0)));
    _mm512_storeu_ps(scores + g * n + t0, s);
  }
}
#endif

// Labels are read in order, but the hardware prefetcher stops at each 4 KB page (a TLB miss on this kind of VM
// costs a nested page walk): ask for the bytes 2 KB ahead (measured against 0.5-4 KB, interleaved: 7-22% faster).
constexpr int64_t kLabelAhead = 2048;

// Ask for the labels (and scale/zero, when quantized) kLabelAhead bytes past the 8-token block at t.
inline void prefetch_labels(const uint8_t* base, int64_t row_bytes, int64_t t, const float* sc, const float* zp) {
  const uint8_t* ahead = base + (t + 8) * row_bytes + kLabelAhead;
  for (int64_t off = 0; off < 8 * row_bytes; off += 64) __builtin_prefetch(ahead + off);
  if (sc) {
    __builtin_prefetch(sc + t + kLabelAhead / 4);
    __builtin_prefetch(zp + t + kLabelAhead / 4);
  }
}

// Whether score8_heads4 serves labels of format K and width R.
template <int R, int K>
constexpr bool heads4_path() {
#ifdef __F16C__
  constexpr bool f16 = true;
#else
  constexpr bool f16 = false;
#endif
  return R > 0 && R % 8 == 0 && (K != U4 || R % 16 == 0) && (K != F16 || f16);
}

// scores[g * n + t] = q_g . label_t for t in [t_begin, t_end): the score identity on codes (scale * (q . code) +
// zero * sum q).
template <int R, int K>
void label_scores_r(const Labels& L, int64_t b, int64_t h, const float* qc, const float* qsum, int64_t g_rows,
                    int64_t r_rt, int64_t t_begin, int64_t t_end, int64_t n, float* scores, float* lab) {
  const int64_t r = R > 0 ? R : r_rt;
  const int64_t es = elem_size(K);
  const uint8_t* base = L.data + (b * L.sb + h * L.sh) * es;
  const int64_t row_bytes = L.ss * es;
  constexpr bool quantized = K == U8 || K == U4;
  const float* sc = quantized ? L.scale + b * L.zb + h * L.zh : nullptr;
  const float* zp = quantized ? L.zero + b * L.zb + h * L.zh : nullptr;
  int64_t t = t_begin;
#ifdef __AVX512F__
  if constexpr ((K == U8 || K == U4) && (R == 16 || R == 32)) {
    for (; t + 16 <= t_end; t += 16) {
      prefetch_labels(base, row_bytes, t, sc, zp);
      prefetch_labels(base, row_bytes, t + 8, sc, zp);
      for (int64_t g = 0; g < g_rows; g += 4) {  // a group of 3 heads computes 3, not 4 padded ones
        const float *qg = qc + g * R, *sg = qsum + g;
        float* out = scores + g * n;
        switch (std::min<int64_t>(4, g_rows - g)) {
          case 4: score16_codes<R, K, 4>(base, row_bytes, t, qg, sg, sc, zp, out, n); break;
          case 3: score16_codes<R, K, 3>(base, row_bytes, t, qg, sg, sc, zp, out, n); break;
          case 2: score16_codes<R, K, 2>(base, row_bytes, t, qg, sg, sc, zp, out, n); break;
          default: score16_codes<R, K, 1>(base, row_bytes, t, qg, sg, sc, zp, out, n);
        }
      }
    }
  }
#endif
#ifdef DSC_AVX2
  if constexpr (heads4_path<R, K>()) {
    if (g_rows >= 3) {  // blocks of 4 heads (qc and qsum are zero-padded to whole blocks)
      for (; t + 8 <= t_end; t += 8) {
        prefetch_labels(base, row_bytes, t, sc, zp);
        for (int64_t g = 0; g < g_rows; g += 4)
          score8_heads4<R, K>(base, row_bytes, t, qc + g * R, qsum + g, std::min<int64_t>(4, g_rows - g), sc, zp,
                              scores + g * n, n);
      }
    }
  }
  if constexpr (R > 0 && R % 8 == 0) {
    const float* rows[8];
    for (; t + 8 <= t_end; t += 8) {
      prefetch_labels(base, row_bytes, t, sc, zp);
      for (int i = 0; i < 8; ++i) rows[i] = label_row<R, K>(base + (t + i) * row_bytes, r, lab + i * R);
      score8<R>(rows, qc, qsum, g_rows, sc, zp, scores, n, t);
    }
  }
#endif
  for (; t < t_end; ++t) {
    const float* l = label_row<R, K>(base + t * row_bytes, r, lab);
    score_token<R>(l, qc, qsum, g_rows, r, quantized ? sc[t] : 0.f, quantized ? zp[t] : 0.f, quantized, scores,
                   n, t);
  }
}

// label_scores_r for the label format K, with r fixed at compile time for the common widths.
template <int K>
void label_scores_k(const Labels& L, int64_t b, int64_t h, const float* qc, const float* qsum, int64_t g_rows,
                    int64_t r, int64_t t_begin, int64_t t_end, int64_t n, float* scores, float* lab) {
  if (r == 16) return label_scores_r<16, K>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
  if (r == 32) return label_scores_r<32, K>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
  if (r == 8) return label_scores_r<8, K>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
  return label_scores_r<0, K>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
}

void label_scores(const Labels& L, int64_t b, int64_t h, const float* qc, const float* qsum, int64_t g_rows,
                  int64_t r, int64_t t_begin, int64_t t_end, int64_t n, float* scores, float* lab) {
  switch (L.kind) {
    case F32: return label_scores_k<F32>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
    case BF16: return label_scores_k<BF16>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
    case F16: return label_scores_k<F16>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
    case U8: return label_scores_k<U8>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
    default: return label_scores_k<U4>(L, b, h, qc, qsum, g_rows, r, t_begin, t_end, n, scores, lab);
  }
}

// The largest of x[0, n), or NaN when one is NaN.
inline float max_or_nan(const float* x, int64_t n) {
  int64_t t = 0;
  float top = -INFINITY;
  bool nan = false;
#ifdef __AVX512F__
  __m512 m4[4];  // four running maxima: with one, each step would wait on the last max (latency 4)
  for (auto& m : m4) m = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered16 = 0;
  for (; t + 64 <= n; t += 64)
    for (int i = 0; i < 4; ++i) {
      const __m512 v = _mm512_loadu_ps(x + t + 16 * i);
      m4[i] = _mm512_max_ps(m4[i], v);
      unordered16 |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
  top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m4[0], m4[1]), _mm512_max_ps(m4[2], m4[3])));
  nan = unordered16 != 0;
#endif
#ifdef DSC_AVX2
  __m256 m = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 v = _mm256_loadu_ps(x + t);
    m = _mm256_max_ps(m, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  for (float l : lanes) top = std::max(top, l);
  nan |= _mm256_movemask_ps(unordered) != 0;
#endif
  for (; t < n; ++t) {
    nan |= std::isnan(x[t]);
    top = std::max(top, x[t]);
  }
  return nan ? NAN : top;
}

// Which positions of a row valid on [0, n) are forced: the n_sink oldest, and the n_recent newest; `m` of the
// others, [lo, hi), are chosen by score.
struct Split {
  int64_t lo, hi, m;
};

inline Split split_row(int64_t n, int64_t keep, int64_t sink, int64_t recent) {
  const int64_t n_recent = std::min(keep, recent);
  const int64_t n_sink = std::min(keep - n_recent, sink);
  return {n_sink, n - n_recent, keep - n_sink - n_recent};
}

inline bool needs_ranking(const Split& sp) { return sp.m > 0 && sp.m < sp.hi - sp.lo; }

struct Scratch {  // per thread, grown on demand and kept: no allocation (and no page faults) per step
  std::vector<float> tops, lab, krow, logits, part;
  std::vector<uint32_t> keys;  // select_row's room
};

thread_local Scratch scratch;

#ifdef DSC_AVX2
// rank_key of 8 floats.
inline __m256i rank_key8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i flip = _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32(INT32_MIN));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // all ones: above every key
  return _mm256_or_si256(_mm256_xor_si256(u, flip), nan);
}
#endif

// What one selection ranks: `g_rows` score rows (n apart) and each one's best score. Token t's key is the rank_key
// of the largest over the rows of (score - best), NaN when one is NaN: the group score (reference.group_scores);
// with one row and best 0, that row's own score.
struct Ranked {
  const float* scores;
  int64_t g_rows, n;
  const float* tops;
};

inline uint32_t token_key(const Ranked& rk, int64_t t) {
  float best = -INFINITY;
  bool nan = false;
  for (int64_t g = 0; g < rk.g_rows; ++g) {
    const float v = rk.scores[g * rk.n + t] - rk.tops[g];
    nan |= std::isnan(v);
    best = std::max(best, v);
  }
  return nan ? 0xFFFFFFFFu : rank_key(best);
}

#ifdef DSC_AVX2
// token_key of tokens t .. t + 7.
inline __m256i token_keys8(const Ranked& rk, int64_t t) {
  __m256 best = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  for (int64_t g = 0; g < rk.g_rows; ++g) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(rk.scores + g * rk.n + t), _mm256_set1_ps(rk.tops[g]));
    best = _mm256_max_ps(best, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  return _mm256_or_si256(rank_key8(best), _mm256_castps_si256(unordered));
}
#endif

#ifdef __AVX512F__
// token_key of tokens t .. t + 15; GR > 0: rk.g_rows, fixed at compile time.
template <int GR>
inline __m512i token_keys16(const Ranked& rk, int64_t t) {
  const int64_t rows = GR > 0 ? GR : rk.g_rows;
  __m512 best = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (int64_t g = 0; g < rows; ++g) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(rk.scores + g * rk.n + t), _mm512_set1_ps(rk.tops[g]));
    best = _mm512_max_ps(best, v);
    unordered = _kor_mask16(unordered, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
  }
  const __m512i u = _mm512_castps_si512(best);
  const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(INT32_MIN)));
  return _mm512_mask_mov_epi32(key, unordered, _mm512_set1_epi32(-1));  // NaN: above every key
}

// candidates' 16-token loop for GR score rows (0: any); returns where it stopped. With the row count fixed at
// compile time the NaN mask stays in a mask register (the runtime loop moved it through a general one every row):
// the select phase 13-15% fewer cycles (9x3x64 and 32x8x128, 64K, scripts/native_phases.py).
template <int GR>
int64_t candidates16(const Ranked& rk, int64_t lo, int64_t hi, uint32_t floor, uint32_t* keys, uint32_t* offsets,
                     int64_t* count) {
  const __m512i fl16 = _mm512_set1_epi32(static_cast<int32_t>(floor));
  __m512i offset = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0, t = lo;
  for (; t + 16 <= hi; t += 16) {
    const __m512i k = token_keys16<GR>(rk, t);
    const __mmask16 above = _mm512_cmp_epu32_mask(k, fl16, _MM_CMPINT_NLT);
    _mm512_storeu_si512(keys + c, _mm512_maskz_compress_epi32(above, k));
    _mm512_storeu_si512(offsets + c, _mm512_maskz_compress_epi32(above, offset));
    offset = _mm512_add_epi32(offset, _mm512_set1_epi32(16));
    c += __builtin_popcount(above);
  }
  *count = c;
  return t;
}
#endif

// keys[t - lo] = token_key(t) for t in [lo, hi).
void row_keys(const Ranked& rk, int64_t lo, int64_t hi, uint32_t* keys) {
  int64_t t = lo;
#ifdef DSC_AVX2
  for (; t + 8 <= hi; t += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + t - lo), token_keys8(rk, t));
#endif
  for (; t < hi; ++t) keys[t - lo] = token_key(rk, t);
}

#ifdef DSC_AVX2
// kCompress.lanes[mask]: the set lanes of an 8-bit mask, in order, then zeros: a permutation that packs them.
struct CompressTable {
  uint32_t lanes[256][8];
  constexpr CompressTable() : lanes() {
    for (int m = 0; m < 256; ++m)
      for (int i = 0, j = 0; i < 8; ++i)
        if (m >> i & 1) lanes[m][j++] = static_cast<uint32_t>(i);
  }
};
constexpr CompressTable kCompress;
#endif

constexpr int64_t kSlack = 16;  // words past the candidates' count that a whole-block store may write

// The tokens of [lo, hi) whose key is at least `floor`, in order: their keys and offsets from lo (each array has
// room for kSlack words past the count). Returns how many. No branch per token: each block of 16 (or 8) is packed
// and stored whole, and the count moves by how many it held.
int64_t candidates(const Ranked& rk, int64_t lo, int64_t hi, uint32_t floor, uint32_t* keys, uint32_t* offsets) {
  int64_t c = 0, t = lo;
#ifdef __AVX512F__
  switch (rk.g_rows) {
    case 1: t = candidates16<1>(rk, lo, hi, floor, keys, offsets, &c); break;
    case 2: t = candidates16<2>(rk, lo, hi, floor, keys, offsets, &c); break;
    case 3: t = candidates16<3>(rk, lo, hi, floor, keys, offsets, &c); break;
    case 4: t = candidates16<4>(rk, lo, hi, floor, keys, offsets, &c); break;
    default: t = candidates16<0>(rk, lo, hi, floor, keys, offsets, &c);
  }
#endif
#ifdef DSC_AVX2
  const __m256i fl = _mm256_set1_epi32(static_cast<int32_t>(floor));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; t + 8 <= hi; t += 8) {
    const __m256i k = token_keys8(rk, t);
    const int above = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(k, fl), k)));
    const __m256i pack = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[above]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + c), _mm256_permutevar8x32_epi32(k, pack));
    const __m256i offset = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(t - lo)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + c), _mm256_permutevar8x32_epi32(offset, pack));
    c += __builtin_popcount(above);
  }
#endif
  for (; t < hi; ++t) {
    keys[c] = token_key(rk, t);
    offsets[c] = static_cast<uint32_t>(t - lo);
    c += keys[c] >= floor;
  }
  return c;
}

// The key T of the m-th largest of `keys` (1 <= m <= n) by radix select (11, 11, 10 bits; after each pass only the
// keys in the chosen bucket are kept, in `spare`): count(> T) < m <= count(>= T). Sets `*ties` to how many keys
// equal to T belong in the top m. Linear time, no sort, no branch per key.
uint32_t radix_threshold(const uint32_t* keys, int64_t n, int64_t m, int64_t* ties, uint32_t* spare) {
  static const int kShift[3] = {21, 10, 0}, kBits[3] = {11, 11, 10};
  uint32_t prefix = 0;
  int64_t need = m;
  int64_t hist[1 << 11];
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = kShift[pass], width = 1 << kBits[pass];
    std::fill(hist, hist + width, 0);
    for (int64_t i = 0; i < n; ++i) ++hist[(keys[i] >> shift) & (width - 1)];
    int bin = width - 1;
    for (; bin > 0 && hist[bin] < need; --bin) need -= hist[bin];
    prefix |= static_cast<uint32_t>(bin) << shift;
    if (pass == 2) break;
    int64_t kept = 0;  // the chosen bucket's keys (in place once keys == spare: kept <= i)
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512i mask = _mm512_set1_epi32(width - 1), chosen = _mm512_set1_epi32(bin);
    for (; i + 16 <= n; i += 16) {  // a whole block stored: spare has kSlack words past n
      const __m512i key = _mm512_loadu_si512(keys + i);
      const __mmask16 in = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srli_epi32(key, shift), mask), chosen);
      _mm512_storeu_si512(spare + kept, _mm512_maskz_compress_epi32(in, key));
      kept += __builtin_popcount(in);
    }
#endif
    for (; i < n; ++i) {
      const uint32_t key = keys[i];
      spare[kept] = key;
      kept += static_cast<int>((key >> shift) & (width - 1)) == bin;
    }
    keys = spare;
    n = kept;
  }
  *ties = need;
  return prefix;
}

// Rows of kSampled tokens and more are ranked from a strided sample of kSample keys: a floor that at least m keys
// reach (very likely; checked) but not many more, so that the exact select runs on about 1.6 m candidates, not on
// every key, and no key is written for the others. From 4K: with sink 4 + recent 16 (the model's), the select phase
// took 16-33% fewer cycles at 5-8K than ranking every key, the same at 4.2K and 6K, and more below 4K (3K: +31%;
// 9x3x64, batch 4, scripts/native_phases.py); 8K rows with a sink and recent positions missed the old 8K threshold.
constexpr int64_t kSample = 1024, kSampled = 4 * kSample;

// A key that about m + 4 sd + 8 of the keys of [lo, hi) reach, estimated from the sample (in `sample`).
uint32_t sampled_floor(const Ranked& rk, int64_t lo, int64_t hi, int64_t m, uint32_t* sample) {
  const int64_t range = hi - lo;
  for (int64_t i = 0; i < kSample; ++i) sample[i] = token_key(rk, lo + i * range / kSample);
  const double mean = static_cast<double>(m) * kSample / range;
  const int64_t rank = std::min<int64_t>(kSample, static_cast<int64_t>(mean + 4.0 * std::sqrt(mean) + 8.0));
  std::nth_element(sample, sample + rank - 1, sample + kSample, std::greater<uint32_t>());
  return sample[rank - 1];
}

// Appends to `picked` the offsets (+ lo) of the m best of `count` keys (given in position order), ascending, and
// returns the new end: NaN first; among equal keys the older position. `offsets` null: key i is offset i.
int64_t pick_best(const uint32_t* keys, const uint32_t* offsets, int64_t count, int64_t m, int64_t lo,
                  int64_t* picked, int64_t out, uint32_t* spare) {
  int64_t ties;
  const uint32_t kth = radix_threshold(keys, count, m, &ties, spare);
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__BMI2__)
  // 16 keys a block: the keys above kth, and of those equal to it the first `ties`; their positions packed and
  // widened to int64, stored under a mask (picked has no room past its selection). With radix_threshold's bucket
  // filter also 16 keys a block, the select phase took 18-29% fewer cycles (9x3x64, batch 4, 2K and 64K).
  const __m512i k16 = _mm512_set1_epi32(static_cast<int32_t>(kth));
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i base = _mm512_set1_epi64(lo);
  for (; i + 16 <= count; i += 16) {
    const __m512i key = _mm512_loadu_si512(keys + i);
    __mmask16 keep = _mm512_cmp_epu32_mask(key, k16, _MM_CMPINT_NLE);
    const uint32_t eq = _mm512_cmpeq_epu32_mask(key, k16);
    if (eq != 0 && ties > 0) {
      const uint32_t take = __builtin_popcount(eq) <= ties ? eq : _pdep_u32((1u << ties) - 1, eq);
      keep = static_cast<__mmask16>(keep | take);
      ties -= __builtin_popcount(take);
    }
    const __m512i pos = _mm512_maskz_compress_epi32(keep, offsets ? _mm512_loadu_si512(offsets + i) : index);
    const int kept = __builtin_popcount(keep);
    _mm512_mask_storeu_epi64(picked + out, static_cast<__mmask8>((1u << std::min(kept, 8)) - 1),
                             _mm512_add_epi64(base, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(pos))));
    if (kept > 8)
      _mm512_mask_storeu_epi64(picked + out + 8, static_cast<__mmask8>((1u << (kept - 8)) - 1),
                               _mm512_add_epi64(base, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(pos, 1))));
    out += kept;
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
  }
#endif
  for (; i < count; ++i) {
    const uint32_t key = keys[i];
    const bool eq = key == kth;
    picked[out] = lo + (offsets ? offsets[i] : i);
    out += (key > kth) | (eq & (ties > 0));
    ties -= eq;
  }
  return out;
}

// The positions a row valid on [0, n) keeps, ascending, into `picked`: the forced ones, and the m best-ranked of
// [lo, hi). `room`: 3 (hi - lo + kSlack) words of scratch. `picked` has room for one more than that (each candidate is
// stored before the keep decision). Returns how many.
int64_t select_row(const Ranked& rk, const Split& sp, int64_t n, int64_t* picked, uint32_t* room) {
  int64_t out = 0;
  for (int64_t t = 0; t < sp.lo; ++t) picked[out++] = t;
  const int64_t range = sp.hi - sp.lo;
  if (sp.m >= range) {
    for (int64_t t = sp.lo; t < sp.hi; ++t) picked[out++] = t;
  } else if (sp.m > 0) {
    uint32_t* keys = room;  // each with kSlack words for candidates' whole-block stores
    uint32_t* offsets = room + range + kSlack;
    uint32_t* spare = room + 2 * (range + kSlack);
    int64_t count = 0;
    if (range >= kSampled)
      count = candidates(rk, sp.lo, sp.hi, sampled_floor(rk, sp.lo, sp.hi, sp.m, spare), keys, offsets);
    if (count >= sp.m) {
      out = pick_best(keys, offsets, count, sp.m, sp.lo, picked, out, spare);
    } else {  // a short row, or the sample misled: every key
      row_keys(rk, sp.lo, sp.hi, keys);
      out = pick_best(keys, nullptr, range, sp.m, sp.lo, picked, out, spare);
    }
  }
  for (int64_t t = sp.hi; t < n; ++t) picked[out++] = t;
  return out;
}

// Selected rows are scattered: ask for row j + kAhead while reading row j (memory latency, not bandwidth, bounds
// a gather of a few hundred bytes per row).
constexpr int64_t kAhead = 8;

// Rows are attended in blocks of kBlock: the block's V rows, asked for with its K rows, are still in L1 when the
// block's weights are known (one gather of each row, no second pass over the selection).
constexpr int64_t kBlock = 16;

inline void prefetch_row(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

struct KV {
  const uint8_t* k;
  const uint8_t* v;
  int kind;
  int64_t ksb, ksh, kss, vsb, vsh, vss;  // element strides (batch, head, token); the dim stride is 1
};

// dst[g * stride] = scale * q_g . k for the g_rows heads in q ([g_rows, d]): four heads per pass over k, their
// products in independent accumulators (one accumulator per dot product would wait on its own additions).
inline void head_dots(const float* q, int64_t g_rows, int64_t d, const float* k, float scale, float* dst,
                      int64_t stride) {
  int64_t g = 0;
#ifdef DSC_AVX2
  if (d % 8 == 0) {
    for (; g + 4 <= g_rows; g += 4) {
      const float* qg = q + g * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 x = _mm256_loadu_ps(k + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), x, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d + i), x, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 2 * d + i), x, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 3 * d + i), x, a3);
      }
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
      alignas(16) float four[4];
      _mm_store_ps(four, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)),
                                    _mm_set1_ps(scale)));
      for (int j = 0; j < 4; ++j) dst[(g + j) * stride] = four[j];
    }
  }
#endif
  for (; g < g_rows; ++g) dst[g * stride] = dot(q + g * d, k, d) * scale;
}

// out_g += sum_j w[g * kBlock + j] * rows[j] for the g_rows heads, over the nb rows of one block.
inline void add_weighted_rows(const float* const* rows, int64_t nb, const float* w, int64_t g_rows, int64_t dv,
                              float* out) {
  int64_t g = 0;
#ifdef DSC_AVX2
  if (dv % 8 == 0) {
    for (; g + 4 <= g_rows; g += 4) {
      const float* wg = w + g * kBlock;
      float* og = out + g * dv;
      for (int64_t i = 0; i < dv; i += 8) {
        __m256 a0 = _mm256_loadu_ps(og + i), a1 = _mm256_loadu_ps(og + dv + i);
        __m256 a2 = _mm256_loadu_ps(og + 2 * dv + i), a3 = _mm256_loadu_ps(og + 3 * dv + i);
        for (int64_t j = 0; j < nb; ++j) {
          const __m256 x = _mm256_loadu_ps(rows[j] + i);
          a0 = _mm256_fmadd_ps(_mm256_set1_ps(wg[j]), x, a0);
          a1 = _mm256_fmadd_ps(_mm256_set1_ps(wg[kBlock + j]), x, a1);
          a2 = _mm256_fmadd_ps(_mm256_set1_ps(wg[2 * kBlock + j]), x, a2);
          a3 = _mm256_fmadd_ps(_mm256_set1_ps(wg[3 * kBlock + j]), x, a3);
        }
        _mm256_storeu_ps(og + i, a0);
        _mm256_storeu_ps(og + dv + i, a1);
        _mm256_storeu_ps(og + 2 * dv + i, a2);
        _mm256_storeu_ps(og + 3 * dv + i, a3);
      }
    }
  }
#endif
  for (; g < g_rows; ++g)
    for (int64_t j = 0; j < nb; ++j) {
      const float wj = w[g * kBlock + j];
      for (int64_t i = 0; i < dv; ++i) out[g * dv + i] += wj * rows[j][i];
    }
}

// A softmax-weighted sum in progress for `g_rows` heads (an online softmax): out [g_rows, dv] = sum_j exp(l_j -
// max) V_j, not yet divided by sum = sum_j exp(l_j - max). Its memory: part_floats(g_rows, dv) floats.
struct Partial {
  float* out;
  float* max;
  float* sum;
  Partial(float* p, int64_t g_rows, int64_t dv) : out(p), max(p + g_rows * dv), sum(p + g_rows * dv + g_rows) {}
  void clear(int64_t g_rows, int64_t dv) const {  // const: the view, not the floats
    std::fill(out, out + g_rows * dv, 0.f);
    std::fill(max, max + g_rows, -INFINITY);
    std::fill(sum, sum + g_rows, 0.f);
  }
};

inline int64_t part_floats(int64_t g_rows, int64_t dv) { return g_rows * (dv + 2); }

// What exponents are taken against for a running max `top`: itself, or 0 while it is -inf (every logit so far
// -inf: weights exp(-inf) = 0, not exp(-inf + inf) = NaN).
inline float softmax_shift(float top) { return top == -INFINITY ? 0.f : top; }

#ifdef __AVX512F__
// The attention phase on AVX-512, a block of kBlock = 16 rows at a time: per head, the 16 logits in one vector
// (16 dot products, one accumulator each, summed across lanes together), the softmax step on that vector (no scalar
// exp), and the weighted V rows added up to four heads per pass. Rows in L2, this took 98 cycles a row where the
// per-row loops below took 176 (3 heads, D 64); cold, a whole call 13-21% less (DESIGN.md, "CPU decode step").
static_assert(kBlock == 16, "one logit per lane");

// Lane j: the sum of x[j]'s 16 lanes (x is clobbered). Four rounds of the transpose above, adding its two halves.
inline __m512 sum_lanes16(__m512* x) {
  for (int k = 0; k < 4; ++k) {
    const __m512i lo = _mm512_loadu_si512(kTranspose.pick[k][0]), hi = _mm512_loadu_si512(kTranspose.pick[k][1]);
    for (int p = 0; p < 16; p += 2 << k)
      x[p] = _mm512_add_ps(_mm512_permutex2var_ps(x[p], lo, x[p + (1 << k)]),
                           _mm512_permutex2var_ps(x[p], hi, x[p + (1 << k)]));
  }
  return x[0];
}

// exp(x) for x <= 0, -inf or NaN: 2^n e^r with |r| <= ln 2 / 2 and e^r to degree 7 (a few ulp); exactly 0 below
// -103 (past fp32's smallest subnormal), so -inf logits weigh nothing; NaN stays NaN.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})  // Taylor, Horner's order
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.f), _CMP_NLT_UQ);  // >= -103, or NaN
  return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(p, n));
}

// w[g * kBlock + j] = scale * q_g . rows[j] for the g_rows heads, j < 16 (d a multiple of 16).
inline void block_logits16(const float* q, int64_t g_rows, int64_t d, const float* const* rows, float scale,
                           float* w) {
  for (int64_t g = 0; g < g_rows; ++g) {
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 qv = _mm512_loadu_ps(q + g * d + i);
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows[j] + i), acc[j]);
    }
    _mm512_storeu_ps(w + g * kBlock, _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale)));
  }
}

// The online-softmax step of a block of nb rows: w's logits become weights under each head's updated max (what
// was accumulated is rescaled when the max grows), their sum added to the head's; lanes past nb weigh 0. A NaN
// logit is left out of the max and stays NaN in its weight, so the output is NaN, as in dense attention.
inline void block_weights16(float* w, int64_t nb, int64_t g_rows, int64_t dv, const Partial& acc) {
  const __mmask16 rows = static_cast<__mmask16>((1u << nb) - 1);
  const __m512 none = _mm512_set1_ps(-INFINITY);
  for (int64_t g = 0; g < g_rows; ++g) {
    const __m512 x = _mm512_mask_blend_ps(rows, none, _mm512_loadu_ps(w + g * kBlock));
    const __m512 ordered = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), none, x);
    const float top = std::max(acc.max[g], _mm512_reduce_max_ps(ordered));
    if (top > acc.max[g]) {
      const float c = std::exp(acc.max[g] - top);
      acc.sum[g] *= c;
      for (int64_t i = 0; i < dv; ++i) acc.out[g * dv + i] *= c;
      acc.max[g] = top;
    }
    const __m512 e = exp_nonpositive(_mm512_sub_ps(x, _mm512_set1_ps(softmax_shift(top))));
    acc.sum[g] += _mm512_reduce_add_ps(e);
    _mm512_storeu_ps(w + g * kBlock, e);
  }
}

// out_g[i0, i0 + 16 S) += sum_j w[g * kBlock + j] * rows[j][i0, i0 + 16 S), j < nb, for the GN heads of w and out:
// the GN x S slices held in registers through the rows, each row's 16 S floats read once and each weight
// broadcast once per head and row.
template <int GN, int S>
inline void add_weighted_slices(const float* const* rows, int64_t nb, const float* w, int64_t dv, float* out,
                                int64_t i0) {
  __m512 a[GN][S];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < S; ++c) a[g][c] = _mm512_loadu_ps(out + g * dv + i0 + 16 * c);
  for (int64_t j = 0; j < nb; ++j) {
    __m512 x[S];
    for (int c = 0; c < S; ++c) x[c] = _mm512_loadu_ps(rows[j] + i0 + 16 * c);
    for (int g = 0; g < GN; ++g) {
      const __m512 wj = _mm512_set1_ps(w[g * kBlock + j]);
      for (int c = 0; c < S; ++c) a[g][c] = _mm512_fmadd_ps(wj, x[c], a[g][c]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < S; ++c) _mm512_storeu_ps(out + g * dv + i0 + 16 * c, a[g][c]);
}

// out_g += sum_j w[g * kBlock + j] * rows[j], j < nb, for the GN heads of w and out (dv a multiple of 16), 64 floats
// of every head's output a pass (GN x 4 <= 16 independent sums), the last dv % 64 16 at a time. One 16-float slice
// a pass for all of dv left the GN sums each waiting on its own FMAs and broadcast every weight 4 times over: the
// attention phase took 4-7% more cycles (scripts/native_phases.py).
template <int GN>
inline void add_weighted16(const float* const* rows, int64_t nb, const float* w, int64_t dv, float* out) {
  int64_t i0 = 0;
  for (; i0 + 64 <= dv; i0 += 64) add_weighted_slices<GN, 4>(rows, nb, w, dv, out, i0);
  for (; i0 < dv; i0 += 16) add_weighted_slices<GN, 1>(rows, nb, w, dv, out, i0);
}

inline void add_weighted_rows16(const float* const* rows, int64_t nb, const float* w, int64_t g_rows, int64_t dv,
                                float* out) {
  int64_t g = 0;
  for (; g + 4 <= g_rows; g += 4) add_weighted16<4>(rows, nb, w + g * kBlock, dv, out + g * dv);
  switch (g_rows - g) {
    case 3: add_weighted16<3>(rows, nb, w + g * kBlock, dv, out + g * dv); break;
    case 2: add_weighted16<2>(rows, nb, w + g * kBlock, dv, out + g * dv); break;
    case 1: add_weighted16<1>(rows, nb, w + g * kBlock, dv, out + g * dv); break;
  }
}
#endif

// Adds the picked rows to `acc` for the `g_rows` heads in `qf` (logits sm_scale * q_g . K[p_j]): one pass over the
// rows in blocks, each head's output rescaled when its max grows.
void attend_rows(const KV& kv, int64_t b, int64_t h, const float* qf, int64_t g_rows, int64_t d, int64_t dv,
                 const int64_t* picked, int64_t np, float sm_scale, const Partial& acc, Scratch& s) {
  if (np == 0) return;
  const int64_t es = elem_size(kv.kind);
  const uint8_t* kb = kv.k + (b * kv.ksb + h * kv.ksh) * es;
  const uint8_t* vb = kv.v + (b * kv.vsb + h * kv.vsh) * es;
#ifdef __AVX512F__
  const bool blocks16 = d % 16 == 0 && dv % 16 == 0;
#else
  const bool blocks16 = false;
#endif
  s.logits.resize(g_rows * kBlock);
  s.krow.resize(kBlock * (d + dv));  // the block's converted K and V rows (16-bit K/V)
  float* w = s.logits.data();  // [g_rows, kBlock]: the block's logits, then its weights
  float* out = acc.out;
  float* run_max = acc.max;
  float* run_sum = acc.sum;
  float* kblock = s.krow.data();
  float* vblock = kblock + kBlock * d;
  const float* krows[kBlock];
  const float* vrows[kBlock];
  for (int64_t j0 = 0; j0 < np; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, np - j0);
    for (int64_t j = 0; j < nb; ++j) {
      if (j0 + j + kAhead < np) {
        prefetch_row(kb + picked[j0 + j + kAhead] * kv.kss * es, d * es);
        prefetch_row(vb + picked[j0 + j + kAhead] * kv.vss * es, dv * es);
      }
      const uint8_t* ksrc = kb + picked[j0 + j] * kv.kss * es;
      const uint8_t* vsrc = vb + picked[j0 + j] * kv.vss * es;
      krows[j] = reinterpret_cast<const float*>(ksrc);
      vrows[j] = reinterpret_cast<const float*>(vsrc);
      if (kv.kind != F32) {
        load_row(ksrc, kv.kind, d, kblock + j * d);
        krows[j] = kblock + j * d;
        load_row(vsrc, kv.kind, dv, vblock + j * dv);
        vrows[j] = vblock + j * dv;
      }
      if (!blocks16) head_dots(qf, g_rows, d, krows[j], sm_scale, w + j, kBlock);
    }
#ifdef __AVX512F__
    if (blocks16) {
      for (int64_t j = nb; j < kBlock; ++j) krows[j] = krows[0];  // lanes past the block: any row; weighed 0
      block_logits16(qf, g_rows, d, krows, sm_scale, w);
      block_weights16(w, nb, g_rows, dv, acc);
      add_weighted_rows16(vrows, nb, w, g_rows, dv, out);
      continue;
    }
#endif
    for (int64_t g = 0; g < g_rows; ++g) {
      float* wg = w + g * kBlock;
      float top = run_max[g];
      for (int64_t j = 0; j < nb; ++j) top = std::max(top, wg[j]);  // a NaN logit is skipped here, kept below
      if (top > run_max[g]) {  // rescale what was accumulated under the old max (nothing yet when it was -inf)
        const float c = std::exp(run_max[g] - top);
        run_sum[g] *= c;
        for (int64_t i = 0; i < dv; ++i) out[g * dv + i] *= c;
        run_max[g] = top;
      }
      const float shift = softmax_shift(top);
      float sum = 0.f;
      for (int64_t j = 0; j < nb; ++j) sum += wg[j] = std::exp(wg[j] - shift);
      run_sum[g] += sum;
    }
    add_weighted_rows(vrows, nb, w, g_rows, dv, out);
  }
}

// out [g_rows, dv] = the softmax-weighted sum over the `np` rows that `count` partials (part_floats apart) hold,
// each under its own max: 0 when np is 0 (nothing picked, by contract); 0 / 0 when every logit was -inf, as in a
// softmax over no finite logit.
void finish(float* parts, int64_t count, int64_t np, int64_t g_rows, int64_t dv, float* out) {
  if (np == 0) {
    std::fill(out, out + g_rows * dv, 0.f);
    return;
  }
  const int64_t stride = part_floats(g_rows, dv);
  for (int64_t g = 0; g < g_rows; ++g) {
    float top = -INFINITY;
    for (int64_t c = 0; c < count; ++c) top = std::max(top, Partial(parts + c * stride, g_rows, dv).max[g]);
    const float shift = softmax_shift(top);
    float sum = 0.f;
    float* o = out + g * dv;
    std::fill(o, o + dv, 0.f);
    for (int64_t c = 0; c < count; ++c) {
      const Partial p(parts + c * stride, g_rows, dv);
      const float weight = std::exp(p.max[g] - shift);
      sum += weight * p.sum[g];
      for (int64_t i = 0; i < dv; ++i) o[i] += weight * p.out[g * dv + i];
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < dv; ++i) o[i] *= inv;
  }
}

// out_g = softmax_j(sm_scale * q_g . K[p_j]) . V[p_j] over the picked rows, for the `g_rows` heads in `qf`.
void attend(const KV& kv, int64_t b, int64_t h, const float* qf, int64_t g_rows, int64_t d, int64_t dv,
            const int64_t* picked, int64_t np, float sm_scale, float* out, Scratch& s) {
  s.part.resize(part_floats(g_rows, dv));
  const Partial acc(s.part.data(), g_rows, dv);
  acc.clear(g_rows, dv);
  attend_rows(kv, b, h, qf, g_rows, d, dv, picked, np, sm_scale, acc, s);
  finish(s.part.data(), 1, np, g_rows, dv, out);
}

// A key element of kind F32 / BF16 / F16 as fp32.
inline float key_value(const uint8_t* base, int kind, int64_t i) {
  if (kind == F32) return reinterpret_cast<const float*>(base)[i];
  const uint16_t x = reinterpret_cast<const uint16_t*>(base)[i];
  return kind == BF16 ? bf16_to_f32(x) : f16_to_f32(x);
}

// One token's label quantized as the reference does it (kernels/reference.py quantize), bit for bit: scale =
// (max - min) / levels, code = clamp(floor((x - min) / scale + 0.5), 0, levels), all codes 0 when the scale is not
// > 0. Returns false for a non-finite value (its codes are whatever the reference's NaN casts give: the caller
// writes such rows with the torch path). No reassociation here, whatever the file's flags: the codes must match.
__attribute__((optimize("no-associative-math", "no-fast-math")))
bool quantize_row(const float* lab, int64_t r, int bits, uint8_t* codes, float* scale, float* zero) {
  float lo = lab[0], hi = lab[0];
  for (int64_t c = 0; c < r; ++c) {
    if (!std::isfinite(lab[c])) return false;
    lo = std::min(lo, lab[c]);
    hi = std::max(hi, lab[c]);
  }
  const float levels = static_cast<float>((1 << bits) - 1);
  const float sc = (hi - lo) / levels;
  if (!std::isfinite(sc)) return false;  // a range past fp32's: (x - min) may overflow too
  *scale = sc;
  *zero = lo;
  const int64_t width = bits == 4 ? (r + 1) / 2 : r;
  std::memset(codes, 0, width);
  if (!(sc > 0.f)) return true;
  for (int64_t c = 0; c < r; ++c) {
    const float code = std::min(std::max(std::floor((lab[c] - lo) / sc + 0.5f), 0.f), levels);
    const uint8_t u = static_cast<uint8_t>(code);
    if (bits == 8) codes[c] = u;
    else codes[c / 2] |= static_cast<uint8_t>(c % 2 ? u << 4 : u);  // channel 2j low nibble, 2j + 1 high
  }
  return true;
}

// The label dsc_label_write stores for one key row `src` (channels `ch`): into `dst` (a label row of kind
// `data_kind`), and for quantized labels its scale and zero. 16-bit labels are the values as they are (the keys'
// kind) or exactly in fp32; returns false for a quantized label with a non-finite value (as quantize_row). `lab`:
// r floats of scratch.
bool key_label(const uint8_t* src, int key_kind, const int64_t* ch, int64_t r, int bits, int data_kind,
               uint8_t* dst, float* scale, float* zero, float* lab) {
  const int ke = elem_size(key_kind);
  if (bits == 16 && data_kind == key_kind) {
    for (int64_t c = 0; c < r; ++c) std::memcpy(dst + c * ke, src + ch[c] * ke, ke);  // the value, as is
    return true;
  }
  for (int64_t c = 0; c < r; ++c) lab[c] = key_value(src, key_kind, ch[c]);
  if (bits == 16) {  // F32 labels of 16-bit keys: exact
    std::memcpy(dst, lab, r * sizeof(float));
    return true;
  }
  return quantize_row(lab, r, bits, dst, scale, zero);
}

}  // namespace

// One (batch, KV head) task of a call: its row's valid length n, how many positions it keeps, and their split.
struct Task {
  int64_t b, h, n, keep;
  Split sp;
};

Task make_task(int64_t task, int64_t Hkv, const int64_t* lengths, int64_t S, int64_t kk, int64_t budget, double frac,
               int64_t sink, int64_t recent) {
  const int64_t b = task / Hkv, h = task % Hkv;
  const int64_t n = lengths ? std::max<int64_t>(0, std::min<int64_t>(lengths[b], S)) : S;
  int64_t keep = std::min(n, kk);
  if (frac != 0.0) {
    const int64_t share = std::max<int64_t>(static_cast<int64_t>(std::ceil(static_cast<double>(n) * frac)), budget);
    keep = std::min(std::min(share, n), kk);
  }
  return {b, h, n, keep, split_row(n, keep, sink, recent)};
}

// A task and what it works on, kept between calls (grown, not reallocated): its G queries [G, D], their label
// channels `qc` (label_row's order, zero-padded to whole blocks of 4 heads for score8_heads4) and sums `qsum`, its
// scores [G, n], and its selections (keep + 1 slots each: select_row stores each candidate before deciding to keep
// it) with their sizes `np`.
struct TaskState {
  Task t;
  std::vector<float> queries, qc, qsum, scores;
  std::vector<int64_t> picked, np;
  int64_t* selection(int64_t sel) { return picked.data() + sel * (t.keep + 1); }
};

// `ts` for task `t` with `sels` selections; q: fp32 [B, Hkv*G, D] (strides qb, qh).
void prepare_task(TaskState& ts, const Task& t, int64_t sels, const float* q, int64_t qb, int64_t qh, int64_t G,
                  int64_t D, int64_t r, const int64_t* channels, int label_kind) {
  ts.t = t;
  ts.qc.assign((G + 3) / 4 * 4 * r, 0.f);
  ts.qsum.assign((G + 3) / 4 * 4, 0.f);
  ts.queries.resize(G * D);
  ts.scores.resize(std::max<int64_t>(1, G * t.n));
  ts.picked.resize(sels * (t.keep + 1));
  ts.np.resize(sels);
  const float* qrow = q + t.b * qb + t.h * G * qh;  // query head h * G + g
  for (int64_t g = 0; g < G; ++g) {
    std::memcpy(ts.queries.data() + g * D, qrow + g * qh, D * sizeof(float));
    float sum = 0.f;
    for (int64_t c = 0; c < r; ++c) {
      const int64_t slot = label_kind == U4 ? (c % 2 ? (r + 1) / 2 + c / 2 : c / 2) : c;  // label_row's order
      const float x = qrow[g * qh + channels[t.h * r + c]];
      ts.qc[g * r + slot] = x;
      sum += x;
    }
    ts.qsum[g] = sum;
  }
}

// The task's selections from its scores: one for the group (group selection) or one per query head.
void select_task(TaskState& ts, int64_t G, bool group, Scratch& s) {
  const Task& t = ts.t;
  const float* scores = ts.scores.data();
  s.keys.resize(3 * (t.n + kSlack));  // select_row's room
  if (group) {
    s.tops.resize(G);  // each head's best score: the group score's normalisation
    for (int64_t g = 0; g < G; ++g) {
      const float m = needs_ranking(t.sp) ? max_or_nan(scores + g * t.n, t.n) : 0.f;
      s.tops[g] = std::isfinite(m) ? m : 0.f;  // a NaN row, or nothing finite: not normalised
    }
    ts.np[0] = select_row({scores, G, t.n, s.tops.data()}, t.sp, t.n, ts.selection(0), s.keys.data());
    return;
  }
  const float zero = 0.f;
  for (int64_t g = 0; g < G; ++g)
    ts.np[g] = select_row({scores + g * t.n, 1, t.n, &zero}, t.sp, t.n, ts.selection(g), s.keys.data());
}

// Piece c of `pieces` of [0, n), its bounds multiples of `align` (but the last end).
inline int64_t piece_begin(int64_t n, int64_t pieces, int64_t c, int64_t align) {
  return c == pieces ? n : n * c / pieces / align * align;
}

// A thread's own task, when threads run whole tasks.
thread_local TaskState own_task;

// A task the calling thread's workers share when a call has fewer tasks than threads can balance: its scores are
// computed in pieces of its row, and its selection attended in pieces, each into its own Partial (`parts`).
struct SharedTask : TaskState {
  std::vector<float> parts;
};

thread_local std::vector<SharedTask> shared_tasks;

#ifdef DSC_PHASES  // a build that times its phases with the TSC (one thread): scripts/native_phases.py
#include <x86intrin.h>
static uint64_t phase_cycles[4], phase_mark;
#define PHASE_START() (phase_mark = __rdtsc())
#define PHASE_END(i) (phase_cycles[i] += __rdtsc() - phase_mark, phase_mark = __rdtsc())
extern "C" void dsc_phase_reset() { std::fill(phase_cycles, phase_cycles + 4, 0); }
extern "C" void dsc_phase_read(uint64_t* out) {
  std::copy(phase_cycles, phase_cycles + 3, out);
  out[3] = phase_cycles[0] + phase_cycles[1] + phase_cycles[2];
}
#else
#define PHASE_START()
#define PHASE_END(i)
#endif

extern "C" {

// The labels of T new keys written at positions[t] (shared by the batch) into the label cache: the r channels of
// each KV head, kept as they are (16-bit labels: data of the keys' kind or F32) or quantized (bits 8/4: uint8
// codes, fp32 scale/zero). keys: [B, Hkv, T, D] of kind key_kind (element strides kb, kh, kt; dim stride 1).
// channels: int64 [Hkv, r] contiguous. data strides (elements) db, dh, ds; scale/zero strides zb, zh (token stride
// 1). Returns 0, or 1 when a quantized label held a non-finite value (the caller rewrites every row with torch).
int dsc_label_write(const void* keys, int key_kind, int64_t kb, int64_t kh, int64_t kt, const int64_t* channels,
                    const int64_t* positions, void* data, int data_kind, int64_t db, int64_t dh, int64_t ds,
                    float* scale, float* zero, int64_t zb, int64_t zh, int64_t B, int64_t Hkv, int64_t T,
                    int64_t r, int bits) {
  const int ke = elem_size(key_kind), de = elem_size(data_kind);
  std::vector<float> lab(r);
  int status = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* src = static_cast<const uint8_t*>(keys) + (b * kb + h * kh + t * kt) * ke;
        const int64_t p = positions[t], z = b * zb + h * zh + p;
        uint8_t* dst = static_cast<uint8_t*>(data) + (b * db + h * dh + p * ds) * de;
        if (!key_label(src, key_kind, channels + h * r, r, bits, data_kind, dst, bits == 16 ? nullptr : scale + z,
                       bits == 16 ? nullptr : zero + z, lab.data()))
          status = 1;
      }
  return status;
}

// Whether the stored labels of position `row` are, bit for bit, what dsc_label_write writes for the keys' row
// `row` now, for every batch row and KV head: 1 yes, 0 no, -1 cannot tell (a quantized label with a non-finite
// value, whose codes the torch path defines). The check that a decode step continues the sequence its labels
// describe (a prompt prefilled outside the compiled model into a reused cache leaves them stale).
static int labels_match_row(const Labels& L, const KV& kv, const int64_t* channels, int64_t B, int64_t Hkv,
                            int64_t r, int64_t row) {
  const int ke = elem_size(kv.kind), le = elem_size(L.kind);
  const bool quantized = L.kind == U8 || L.kind == U4;
  const int bits = L.kind == U4 ? 4 : quantized ? 8 : 16;
  const int64_t bytes = L.kind == U4 ? (r + 1) / 2 : r * le;  // one label row
  std::vector<float> lab(r);
  std::vector<uint8_t> want(bytes);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const uint8_t* src = kv.k + (b * kv.ksb + h * kv.ksh + row * kv.kss) * ke;
      const uint8_t* have = L.data + (b * L.sb + h * L.sh + row * L.ss) * le;
      float sc, zp;
      if (!key_label(src, kv.kind, channels + h * r, r, bits, L.kind, want.data(), &sc, &zp, lab.data())) return -1;
      if (std::memcmp(have, want.data(), bytes) != 0) return 0;
      const int64_t z = b * L.zb + h * L.zh + row;
      if (quantized && (std::memcmp(L.scale + z, &sc, 4) != 0 || std::memcmp(L.zero + z, &zp, 4) != 0)) return 0;
    }
  return 1;
}

// One decode step of Double Sparsity attention. q: fp32 [B, Hkv*G, D] (strides qb, qh; dim stride 1). out: fp32
// [B, Hkv*G, Dv] contiguous. channels: int64 [Hkv, r] contiguous. lengths: int64 [B] or null (n = min(len, S)).
// kk = the op's slot count; keep per row from budget/frac (checks.keep_count). group: one selection per KV head
// (group score) else one per query head. With at least two tasks (batch x KV heads) per thread, each thread runs
// whole tasks; with fewer, every task's scoring and attention are split into pieces that all threads share.
// check_row >= 0: first check that the labels of that row still describe the keys (labels_match_row); returns 2
// (stale) or 3 (cannot tell) without decoding when they may not.
int dsc_ds_decode(const float* q, int64_t qb, int64_t qh, const void* k, const void* v, int kv_kind, int64_t ksb,
                  int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh, int64_t vss, const int64_t* channels,
                  const void* data, int label_kind, int64_t lsb, int64_t lsh, int64_t lss, const float* scale,
                  const float* zero, int64_t zb, int64_t zh, const int64_t* lengths, int64_t B, int64_t Hkv,
                  int64_t G, int64_t S, int64_t D, int64_t Dv, int64_t r, int64_t kk, int64_t budget, double frac,
                  int64_t sink, int64_t recent, int group, float sm_scale, float* out, int nthreads,
                  int64_t check_row) {
  const Labels L{static_cast<const uint8_t*>(data), label_kind, lsb, lsh, lss, scale, zero, zb, zh};
  const KV kv{static_cast<const uint8_t*>(k), static_cast<const uint8_t*>(v), kv_kind, ksb, ksh, kss, vsb, vsh, vss};
  if (check_row >= 0) {
    const int match = labels_match_row(L, kv, channels, B, Hkv, r, check_row);
    if (match != 1) return match == 0 ? 2 : 3;
  }
  const int64_t tasks = B * Hkv;
  const int64_t sels = group ? 1 : G, heads = group ? G : 1;  // selections per task, query heads per selection
  if (nthreads <= 1 || tasks >= 2 * nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t task = 0; task < tasks; ++task) {
      Scratch& s = scratch;
      TaskState& ts = own_task;
      prepare_task(ts, make_task(task, Hkv, lengths, S, kk, budget, frac, sink, recent), sels, q, qb, qh, G, D, r,
                   channels, label_kind);
      const Task& t = ts.t;
      s.lab.resize(8 * r);
      PHASE_START();
      if (t.n > 0) label_scores(L, t.b, t.h, ts.qc.data(), ts.qsum.data(), G, r, 0, t.n, t.n, ts.scores.data(),
                                s.lab.data());
      PHASE_END(0);
      select_task(ts, G, group, s);
      PHASE_END(1);
      float* o = out + (t.b * Hkv * G + t.h * G) * Dv;
      for (int64_t sel = 0; sel < sels; ++sel)
        attend(kv, t.b, t.h, ts.queries.data() + sel * heads * D, heads, D, Dv, ts.selection(sel), ts.np[sel],
               sm_scale, o + sel * heads * Dv, s);
      PHASE_END(2);
    }
    return 0;
  }
  const int64_t pieces = (2 * nthreads + tasks - 1) / tasks;  // per task: about two per thread in all
  const int64_t pf = part_floats(heads, Dv);
  std::vector<SharedTask>& shared = shared_tasks;  // the calling thread's, shared with its workers
  shared.resize(tasks);
#pragma omp parallel num_threads(nthreads)
  {
    Scratch& s = scratch;
    s.lab.resize(8 * r);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      SharedTask& sh = shared[task];
      prepare_task(sh, make_task(task, Hkv, lengths, S, kk, budget, frac, sink, recent), sels, q, qb, qh, G, D, r,
                   channels, label_kind);
      sh.parts.resize(sels * pieces * pf);
    }
#pragma omp for schedule(static)
    for (int64_t piece = 0; piece < tasks * pieces; ++piece) {
      SharedTask& sh = shared[piece / pieces];
      const int64_t c = piece % pieces, n = sh.t.n;
      const int64_t t0 = piece_begin(n, pieces, c, 16), t1 = piece_begin(n, pieces, c + 1, 16);
      if (t1 > t0) label_scores(L, sh.t.b, sh.t.h, sh.qc.data(), sh.qsum.data(), G, r, t0, t1, n, sh.scores.data(),
                                s.lab.data());
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) select_task(shared[task], G, group, s);
#pragma omp for schedule(static)
    for (int64_t piece = 0; piece < tasks * sels * pieces; ++piece) {
      SharedTask& sh = shared[piece / (sels * pieces)];
      const int64_t sel = piece / pieces % sels, c = piece % pieces, np = sh.np[sel];
      const int64_t j0 = piece_begin(np, pieces, c, 1), j1 = piece_begin(np, pieces, c + 1, 1);
      const Partial acc(sh.parts.data() + (sel * pieces + c) * pf, heads, Dv);
      acc.clear(heads, Dv);
      attend_rows(kv, sh.t.b, sh.t.h, sh.queries.data() + sel * heads * D, heads, D, Dv,
                  sh.selection(sel) + j0, j1 - j0, sm_scale, acc, s);
    }
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < tasks * sels; ++unit) {
      SharedTask& sh = shared[unit / sels];
      const int64_t sel = unit % sels;
      float* o = out + (sh.t.b * Hkv * G + sh.t.h * G + sel * heads) * Dv;
      finish(sh.parts.data() + sel * pieces * pf, pieces, sh.np[sel], heads, Dv, o);
    }
  }
  return 0;
}

}  // extern "C"
