// AVX-512 rows of quant_gemv.cc (included there, after Args, Position512, HorizontalSum and Dot):
// the same factored product, 16 float lanes a vector. Compiled for AVX-512F/DQ by a target attribute and run
// only where the CPU has both (`HasAvx512`), so the library still loads on AVX2-only hosts.
//
// Per block of 32 values: 2 integer ops and 2 exact conversions (AVX2's RowsR: 4 + 4 and a shift),
// then per row of x a mul and two FMAs at 16 lanes (AVX2: five at 8). On an Emerald Rapids core a
// Q4_1 block took 1.8-1.9 ns against 2.5 (SmolLM2's gate/up, one thread).
//
// Packed blocks (lane order, runtime/quant_layouts.py `to_lanes`): the 16 bytes are broadcast to the
// four 128-bit quarters; lane j of vector a keeps bits 4j..4j+3 of its word (values 0-15), lane j of
// b bits 16 + 4j' (values 16-31), so value v stays at bit Position512(v) = 4 * (v / 4) and converts
// exactly (b's top nibble as unsigned). x comes prescaled by 2^-Position512 (`Prescale`).
//
// Sums for row (m, n): t = x_lo * a + x_hi * b per block (16 lanes), acc = d * t + acc in block
// order, the 16 lanes summed (`HorizontalSum512`), then the mins (`Dot`): the same whatever R, the
// row pairing or the thread, but not the AVX2 path's order (results differ in the last bits).
#pragma once

#define XLASERVE_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma,f16c")))

inline bool HasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

XLASERVE_AVX512 inline float HorizontalSum512(__m512 v) {
  return HorizontalSum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

// A row's scales as float32: in place if stored so, else converted into buf (F16C, exact).
XLASERVE_AVX512 inline const float* RowScales(const float* d, int64_t, float*) { return d; }
XLASERVE_AVX512 inline const float* RowScales(const uint16_t* d, int64_t count, float* buf) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + i))));
  for (; i < count; ++i) buf[i] = _cvtsh_ss(d[i]);
  return buf;
}

// The 16 values of a one-per-byte run as floats: q8_0 signed, q4_0 as q - 8, q4_1 as stored.
template <int kKind>
XLASERVE_AVX512 inline __m512 Floats16(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (kKind == kQ8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  __m512i v = _mm512_cvtepu8_epi32(raw);
  if constexpr (kKind == kQ4_0) v = _mm512_sub_epi32(v, _mm512_set1_epi32(8));
  return _mm512_cvtepi32_ps(v);
}

// Rows [n0, n1) of W for rows m0..m0+R-1 of x, kN rows of W interleaved (independent chains for the
// out-of-order core; each row's arithmetic is the same as alone). Sub-blocks of S = 16 * kParts.
template <typename Sc, int kKind, bool kPacked, bool kHasMin, int kParts, int R, int kN>
XLASERVE_AVX512 void RowsR512(const Args& a, int64_t n0, int64_t n1, int64_t m0, float* dbuf) {
  constexpr int S = 16 * kParts;
  const int64_t subs = a.k / S, per_block = a.block / S, nb = a.k / a.block;
  const int64_t sub_bytes = kPacked ? S / 2 : S;
  __m512i mask[2], eights[2];
  for (int h = 0; h < 2; ++h) {
    alignas(64) int32_t m[16], e[16];
    for (int j = 0; j < 16; ++j) {  // lane j of part h holds value 16h + j, at Position512 of it
      const int bit = Position512(16 * h + j);
      m[j] = static_cast<int32_t>(15u << bit);
      e[j] = static_cast<int32_t>(8u << bit);
    }
    mask[h] = _mm512_load_si512(m), eights[h] = _mm512_load_si512(e);
  }
  const int64_t rows_ahead = std::max<int64_t>(1, kPrefetchBytes / a.row_bytes);
  for (int64_t n = n0; n < n1; n += kN) {
    const uint8_t* q[kN];
    const float* d[kN];
    __m512 acc[kN][R];
    for (int i = 0; i < kN; ++i) {
      q[i] = a.data + (n + i) * a.row_bytes;
      PrefetchRowScales(a.scale, kHasMin ? a.min : nullptr, n + i + rows_ahead, nb, sizeof(Sc));
      d[i] = RowScales(static_cast<const Sc*>(a.scale) + (n + i) * nb, nb, dbuf + i * nb);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < subs; ++s) {
      const int64_t b = s / per_block;
      __m512 v[kN][kParts], db[kN];
      for (int i = 0; i < kN; ++i) {
        const uint8_t* qs = q[i] + s * sub_bytes;
        _mm_prefetch(reinterpret_cast<const char*>(qs) + kPrefetchBytes, _MM_HINT_T0);
        db[i] = _mm512_set1_ps(d[i][b]);
        if constexpr (kPacked) {
          static_assert(kParts == 2);
          const __m512i raw = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
          __m512i lo = _mm512_and_si512(raw, mask[0]), hi = _mm512_and_si512(raw, mask[1]);
          if constexpr (kKind == kQ4_0) {  // (q - 8) * 2^p in two's complement: 8 << 28 wraps, exactly
            v[i][0] = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eights[0]));
            v[i][1] = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eights[1]));
          } else {
            v[i][0] = _mm512_cvtepi32_ps(lo);
            v[i][1] = _mm512_cvtepu32_ps(hi);  // bits 28-31: unsigned
          }
        } else {
          for (int h = 0; h < kParts; ++h) v[i][h] = Floats16<kKind>(qs + 16 * h);
        }
      }
      const float* xs = a.x + m0 * a.k + s * S;
      for (int r = 0; r < R; ++r) {
        __m512 xv[kParts];
        for (int h = 0; h < kParts; ++h) xv[h] = _mm512_loadu_ps(xs + r * a.k + 16 * h);
        for (int i = 0; i < kN; ++i) {
          __m512 t = _mm512_mul_ps(xv[0], v[i][0]);
          for (int h = 1; h < kParts; ++h) t = _mm512_fmadd_ps(xv[h], v[i][h], t);
          acc[i][r] = _mm512_fmadd_ps(db[i], t, acc[i][r]);
        }
      }
    }
    for (int i = 0; i < kN; ++i)
      for (int r = 0; r < R; ++r) {
        float sum = HorizontalSum512(acc[i][r]);
        if constexpr (kHasMin) sum += Dot(static_cast<const Sc*>(a.min) + (n + i) * nb, a.x_sums + (m0 + r) * nb, nb);
        a.y[(m0 + r) * a.n + n + i] = sum;
      }
  }
}

template <typename Sc, int kKind, bool kPacked, bool kHasMin, int kParts, int R>
XLASERVE_AVX512 void RowPairs512(const Args& a, int64_t n0, int64_t n1, int64_t m0, float* dbuf) {
  const int64_t pairs_end = n0 + (n1 - n0) / 2 * 2;
  RowsR512<Sc, kKind, kPacked, kHasMin, kParts, R, 2>(a, n0, pairs_end, m0, dbuf);
  RowsR512<Sc, kKind, kPacked, kHasMin, kParts, R, 1>(a, pairs_end, n1, m0, dbuf);
}

template <typename Sc, int kKind, bool kPacked, bool kHasMin, int kParts>
XLASERVE_AVX512 void Rows512(const Args& a, int64_t n0, int64_t n1) {
  std::vector<float> dbuf(2 * (a.k / a.block));
  for (int64_t m0 = 0; m0 < a.m; m0 += kMaxRows) {
    static_assert(kMaxRows == 4);
    switch (std::min<int64_t>(kMaxRows, a.m - m0)) {
      case 1: RowPairs512<Sc, kKind, kPacked, kHasMin, kParts, 1>(a, n0, n1, m0, dbuf.data()); break;
      case 2: RowPairs512<Sc, kKind, kPacked, kHasMin, kParts, 2>(a, n0, n1, m0, dbuf.data()); break;
      case 3: RowPairs512<Sc, kKind, kPacked, kHasMin, kParts, 3>(a, n0, n1, m0, dbuf.data()); break;
      default: RowPairs512<Sc, kKind, kPacked, kHasMin, kParts, 4>(a, n0, n1, m0, dbuf.data()); break;
    }
  }
}
