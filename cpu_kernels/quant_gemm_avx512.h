// Many rows of x (M > gemv_rows, quant_gemv.py MAX_ROWS) on AVX-512, for quant_gemv.cc (included there after
// quant_gemv_avx512.h): batched decode and prefill, where the GEMV rows (which convert each block
// again for every 4 rows of x) run at about half the FMA ports' bound and XLA's own path writes a
// dequantized copy of every matrix each call.
//
// Per task (kTileN-multiple rows of W, ~64 Ki weights): each row is dequantized once into a
// thread-local float32 buffer (~256 KiB, stays in L2), to the exact values gguf's arithmetic gives
// (d * q, then + m: two roundings, as dequantize_row_*); then, for each block of kTileM rows of x,
// kTileN rows of W at a time, a register tile of kTileN x kTileM sums (24 accumulators):
//
//   acc[i][m] = fma(w[n_i, k], x[m, k], acc[i][m])   for k = 0, 1, ..., K - 1 in order
//
// x comes packed per block as xp[k][kTileM] (zeros past M), so a step loads two vectors of x and
// broadcasts kTileN weights. Each (m, n) is one fma chain over k in order: the same whatever M, the
// block or tile it falls in, or the thread (batch-invariant among calls of this path). It is not the
// GEMV rows' factored order, so results differ in the last bits from a call of <= gemv_rows rows.

#pragma once

constexpr int kTileN = 12;        // rows of W per register tile
constexpr int kTileM = 32;        // rows of x per block: two 16-lane vectors

// Row n of W as float32 into out[0, K): w = d * q (+ m), q the stored integer (q4_0: q - 8).
template <typename Sc, int kKind, bool kPacked, bool kHasMin>
XLASERVE_AVX512 void DequantRow512(const Args& a, int64_t n, float* out) {
  const int64_t nb = a.k / a.block;
  const uint8_t* q = a.data + n * a.row_bytes;
  const Sc* d = static_cast<const Sc*>(a.scale) + n * nb;
  const Sc* mn = kHasMin ? static_cast<const Sc*>(a.min) + n * nb : nullptr;
  // packed (lane order): lane j of the low half keeps value j at bit Position512(j) of word j % 4,
  // of the high half value 16 + j; shifted down and masked, both come out in k order
  const __m512i shift_lo = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  const __m512i shift_hi = _mm512_add_epi32(shift_lo, _mm512_set1_epi32(16));
  static_assert(Position512(4) == 4 && Position512(12) == 12 && Position512(16 + 15) == 16 + 12);
  const __m512i fifteen = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  for (int64_t k = 0; k < a.k; k += 16) {
    const int64_t b = k / a.block;
    __m512 v;
    if constexpr (kPacked) {
      const __m512i raw =
          _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k / 32) * 16)));
      __m512i qi = _mm512_and_si512(_mm512_srlv_epi32(raw, k % 32 ? shift_hi : shift_lo), fifteen);
      if constexpr (kKind == kQ4_0) qi = _mm512_sub_epi32(qi, eight);
      v = _mm512_cvtepi32_ps(qi);
    } else {
      v = Floats16<kKind>(q + k);
    }
    // a block of 16 values holds one (d, m); blocks of 32+ span whole 16-value steps
    v = _mm512_mul_ps(v, _mm512_set1_ps(ToFloat(d[b])));
    if constexpr (kHasMin) v = _mm512_add_ps(v, _mm512_set1_ps(ToFloat(mn[b])));
    _mm512_storeu_ps(out + k, v);
  }
}

// out[i][0, 16 * V) = sums for kTileN rows of W (wd, rows of K) and a block of x (xp [K][kTileM]):
// V = 2 vectors of x rows (a full block), or 1 (a last block of <= 16 rows).
template <int V>
XLASERVE_AVX512 void Tile512(const float* wd, const float* xp, int64_t k_len, float* out) {
  __m512 acc[kTileN][V];
  for (int i = 0; i < kTileN; ++i)
    for (int h = 0; h < V; ++h) acc[i][h] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    __m512 xv[V];
    for (int h = 0; h < V; ++h) xv[h] = _mm512_loadu_ps(xp + k * kTileM + 16 * h);
    for (int i = 0; i < kTileN; ++i) {
      const __m512 w = _mm512_set1_ps(wd[i * k_len + k]);
      for (int h = 0; h < V; ++h) acc[i][h] = _mm512_fmadd_ps(w, xv[h], acc[i][h]);
    }
  }
  for (int i = 0; i < kTileN; ++i)
    for (int h = 0; h < V; ++h) _mm512_storeu_ps(out + i * kTileM + 16 * h, acc[i][h]);
}

// x [M, K] as blocks xp[block][k][kTileM], rows past M zero. Block `b` only.
XLASERVE_AVX512 inline void PackBlock512(const float* x, int64_t m, int64_t k_len, int64_t b, float* xp) {
  float* out = xp + b * k_len * kTileM;
  const int64_t m0 = b * kTileM, rows = std::min<int64_t>(kTileM, m - m0);
  for (int64_t k = 0; k < k_len; ++k) {
    for (int64_t r = 0; r < rows; ++r) out[k * kTileM + r] = x[(m0 + r) * k_len + k];
    for (int64_t r = rows; r < kTileM; ++r) out[k * kTileM + r] = 0.0f;
  }
}

// Rows [n0, n1) of W times all of x (packed as `xp`): y[m, n] for every m.
template <typename Sc, int kKind, bool kPacked, bool kHasMin>
XLASERVE_AVX512 void Gemm512(const Args& a, const float* xp, int64_t n0, int64_t n1) {
  thread_local std::vector<float> wd;
  const int64_t rows = n1 - n0, tiles = (rows + kTileN - 1) / kTileN;
  wd.resize(tiles * kTileN * a.k);
  for (int64_t i = 0; i < rows; ++i) DequantRow512<Sc, kKind, kPacked, kHasMin>(a, n0 + i, wd.data() + i * a.k);
  std::fill(wd.begin() + rows * a.k, wd.end(), 0.0f);
  alignas(64) float out[kTileN * kTileM];
  const int64_t blocks = (a.m + kTileM - 1) / kTileM;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t m0 = b * kTileM, ms = std::min<int64_t>(kTileM, a.m - m0);
    const float* xb = xp + b * a.k * kTileM;
    for (int64_t t = 0; t < tiles; ++t) {
      const float* w = wd.data() + t * kTileN * a.k;
      if (ms > 16) Tile512<2>(w, xb, a.k, out);
      else Tile512<1>(w, xb, a.k, out);
      const int64_t n = n0 + t * kTileN, ns = std::min<int64_t>(kTileN, n1 - n);
      for (int64_t r = 0; r < ms; ++r)
        for (int64_t i = 0; i < ns; ++i) a.y[(m0 + r) * a.n + n + i] = out[i * kTileM + r];
    }
  }
}

using GemmFn = void (*)(const Args&, const float*, int64_t, int64_t);

template <typename Sc>
GemmFn PickGemmKind(int64_t kind, bool packed, bool has_min) {
  if (kind == kQ8) return has_min ? Gemm512<Sc, kQ8, false, true> : Gemm512<Sc, kQ8, false, false>;
  if (kind == kQ4_0) return packed ? Gemm512<Sc, kQ4_0, true, false> : Gemm512<Sc, kQ4_0, false, false>;
  return packed ? Gemm512<Sc, kQ4_1, true, true> : Gemm512<Sc, kQ4_1, false, true>;
}

inline GemmFn PickGemm(bool half, int64_t kind, bool packed, bool has_min) {
  return half ? PickGemmKind<uint16_t>(kind, packed, has_min) : PickGemmKind<float>(kind, packed, has_min);
}
