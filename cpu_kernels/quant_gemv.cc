// Quantized matrix-vector products for XLA:CPU, behind jax.ffi ("xlaserve_quant_gemv").
//
//   y[m, n] = sum_k x[m, k] * W[layer][n, k]      x f32 [M, K], y f32 [M, N]
//
// W is one layer of a stacked QuantArray (runtime/quant.py): data [L, N, K] (one value per byte) or
// [L, N, K/2] (4-bit values of blocks of 32 packed in lane order, `packed`: see RowsR), scale and
// min f32 [L, N, K/block]. The layer is an operand, so a scan
// over layers hands the whole stack over and no layer is copied out of it.
//
// The stored integers and scales are used exactly (no requantization of weights or activations);
// the product is computed in a factored form (see RowsR) whose sums round differently from a dot
// with the dequantized weights. The sum for one (m, n) is the same whatever M, the thread count or
// the rows' split: batch-invariant and deterministic.
//
// Rows n are split into tasks on XLA's intra-op thread pool (parallel.h).

#include <algorithm>
#include <cstdint>
#include <immintrin.h>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kQ8 = 0, kQ4_0 = 1, kQ4_1 = 2 };
// Rows of x sharing each converted sub-block (more than 4 spill the 16 AVX2 registers, measured).
constexpr int kMaxRows = 4;

// AVX2 + FMA (8 float lanes); the Python side uses this kernel only where the CPU has both.
inline __m128i Load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256 Floats(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 FloatsSigned(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
// q4_0's q - 8 in the integers, converted exactly (so d * (q - 8) rounds as gguf's does)
inline __m256 FloatsLess8(__m128i v) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), _mm256_set1_epi32(8)));
}

struct Args {
  const float* x;
  const float* x_sums;  // [M, K / block]: each block's sum of x (for the mins), or null
  const uint8_t* data;
  const float* scale;
  const float* min;
  float* y;
  int64_t m, n, k, block, row_bytes;
};

// A weight is w = d * q + m (q4_0: d * (q - 8), q8_0: d * q, with or without m), d and m per block.
// Rather than dequantizing each weight, a row's product is computed in its factored form
//
//   sum_k x_k w_k = sum_blocks d_b * (sum_{k in b} x_k q_k) + sum_blocks m_b * (sum_{k in b} x_k)
//
// with the integers q converted exactly to float32: two float ops a weight instead of four. The
// stored values are used exactly; only the rounding of the sums differs from a dot with the
// dequantized weights (and for a one-hot x the result is exactly gguf's d * q + m).
//
// Sub-blocks of S = 8 * kParts values (one d each; a block may hold several): 32 (kParts 4; packed:
// 16 bytes in lane order) or 16 (kParts 2).
// For row r: t = x_0 q_0 + ... in lane order (vector FMAs over the sub-block's kParts vectors),
// acc = d * t + acc per sub-block in order, then the 8 lanes of acc summed in order, then the mins'
// sum over blocks in order. None of it depends on R, the thread or the task: batch-invariant.
template <int kKind, bool kPacked, bool kHasMin, int kParts, int R>
void RowsR(const Args& a, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int S = 8 * kParts;
  const int64_t subs = a.k / S, per_block = a.block / S, nb = a.k / a.block;
  const int64_t sub_bytes = kPacked ? S / 2 : S;
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  const __m256i shifts[4] = {_mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), _mm256_setr_epi32(8, 8, 8, 8, 12, 12, 12, 12),
                             _mm256_setr_epi32(16, 16, 16, 16, 20, 20, 20, 20),
                             _mm256_setr_epi32(24, 24, 24, 24, 28, 28, 28, 28)};
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.data + n * a.row_bytes;
    const float* d = a.scale + n * nb;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t s = 0, b = 0, left = per_block; s < subs; ++s) {
      const __m256 db = _mm256_set1_ps(d[b]);
      if (--left == 0) ++b, left = per_block;
      const uint8_t* qs = q + s * sub_bytes;
      __m256 v[kParts];
      if constexpr (kPacked) {
        // lane order (runtime/quant.py `to_lanes`): 32-bit word i (0-3) of the block's 16 bytes
        // holds values i + 8c (nibble 2c) and i + 8c + 4 (nibble 2c + 1), c = 0..3. Both halves of
        // a register get the 4 words; per-lane shifts then give values 8h..8h+7 for part h with
        // no shuffle (the shuffle port bounded the GGUF order's unpacking, measured).
        static_assert(kParts == 4);
        const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        for (int h = 0; h < 4; ++h) {
          const __m256i q4 = _mm256_and_si256(_mm256_srlv_epi32(raw, shifts[h]), nibble);
          v[h] = _mm256_cvtepi32_ps(kKind == kQ4_0 ? _mm256_sub_epi32(q4, _mm256_set1_epi32(8)) : q4);
        }
      } else {
        for (int h = 0; h < kParts; ++h) {
          const __m128i raw = Load8(qs + 8 * h);
          v[h] = kKind == kQ8 ? FloatsSigned(raw) : kKind == kQ4_0 ? FloatsLess8(raw) : Floats(raw);
        }
      }
      const float* xs = a.x + m0 * a.k + s * S;
      for (int r = 0; r < R; ++r) {
        __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xs + r * a.k), v[0]);
        for (int h = 1; h < kParts; ++h) t = _mm256_fmadd_ps(_mm256_loadu_ps(xs + r * a.k + 8 * h), v[h], t);
        acc[r] = _mm256_fmadd_ps(db, t, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[r]);
      float sum = 0.0f;
      for (int j = 0; j < 8; ++j) sum += lanes[j];
      if constexpr (kHasMin) {
        const float* mn = a.min + n * nb;
        const float* sx = a.x_sums + (m0 + r) * nb;
        float mins = 0.0f;
        for (int64_t i = 0; i < nb; ++i) mins += mn[i] * sx[i];
        sum += mins;
      }
      a.y[(m0 + r) * a.n + n] = sum;
    }
  }
}

template <int kKind, bool kPacked, bool kHasMin, int kParts>
void Rows(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kMaxRows) {
    static_assert(kMaxRows == 4);
    switch (std::min<int64_t>(kMaxRows, a.m - m0)) {
      case 1: RowsR<kKind, kPacked, kHasMin, kParts, 1>(a, n0, n1, m0); break;
      case 2: RowsR<kKind, kPacked, kHasMin, kParts, 2>(a, n0, n1, m0); break;
      case 3: RowsR<kKind, kPacked, kHasMin, kParts, 3>(a, n0, n1, m0); break;
      default: RowsR<kKind, kPacked, kHasMin, kParts, 4>(a, n0, n1, m0); break;
    }
  }
}

using RowsFn = void (*)(const Args&, int64_t, int64_t);

template <int kKind, bool kPacked, bool kHasMin>
RowsFn PickS(int64_t s) {
  if constexpr (kPacked) return Rows<kKind, true, kHasMin, 4>;
  return s == 32 ? Rows<kKind, false, kHasMin, 4> : Rows<kKind, false, kHasMin, 2>;
}

RowsFn Pick(int64_t kind, bool packed, bool has_min, int64_t s) {
  if (kind == kQ8) return has_min ? PickS<kQ8, false, true>(s) : PickS<kQ8, false, false>(s);
  if (kind == kQ4_0) return packed ? PickS<kQ4_0, true, false>(s) : PickS<kQ4_0, false, false>(s);
  return packed ? PickS<kQ4_1, true, true>(s) : PickS<kQ4_1, false, true>(s);
}

ffi::Error QuantGemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> min, ffi::Buffer<ffi::S32> layer,
                     ffi::ResultBuffer<ffi::F32> y, int64_t kind, int64_t block, bool packed, bool has_min) {
  auto xd = x.dimensions(), dd = data.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || dd.size() != 3 || sd.size() != 3)
    return ffi::Error::InvalidArgument("quant_gemv: x must be [M, K], data and scale [L, N, *]");
  const int64_t m = xd[0], k = xd[1], layers = dd[0], n = dd[1];
  const int64_t s = std::min<int64_t>(block, 32);
  const bool four_bit = kind != kQ8;
  if (kind < 0 || kind > 2 || block % s || (s != 16 && s != 32) || k % block || (packed && (!four_bit || block != 32)))
    return ffi::Error::InvalidArgument("quant_gemv: unsupported kind/block/packing");
  if (dd[2] != (packed ? k / 2 : k) || sd[2] != k / block || sd[1] != n)
    return ffi::Error::InvalidArgument("quant_gemv: data/scale shapes do not match x");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("quant_gemv: layer out of range");

  Args a{};
  std::vector<float> x_sums;
  if (has_min) {  // each block's sum of x, in order, once for all rows n
    const int64_t nb = k / block;
    x_sums.resize(m * nb);
    for (int64_t i = 0; i < m * nb; ++i) {
      const float* xb = x.typed_data() + i * block;
      float t = 0.0f;
      for (int64_t j = 0; j < block; ++j) t += xb[j];
      x_sums[i] = t;
    }
    a.x_sums = x_sums.data();
  }
  a.row_bytes = dd[2];
  a.x = x.typed_data();
  a.data = static_cast<const uint8_t*>(data.untyped_data()) + l * n * a.row_bytes;
  a.scale = scale.typed_data() + l * n * (k / block);
  a.min = has_min ? min.typed_data() + l * n * (k / block) : nullptr;
  a.y = y->typed_data();
  a.m = m, a.n = n, a.k = k, a.block = block;
  const RowsFn fn = Pick(kind, packed, has_min, s);
  // ~64 Ki weights a task: enough tasks to balance, few enough to keep the counter cold.
  const int64_t per_task = std::max<int64_t>(1, (int64_t{1} << 16) / k);
  xlaserve::ParallelFor(pool, (n + per_task - 1) / per_task, [&](int64_t t) {
    fn(a, t * per_task, std::min(n, (t + 1) * per_task));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveQuantGemv, QuantGemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("packed")
                                  .Attr<bool>("has_min"));
