// Quantized matrix-vector products for XLA:CPU, behind jax.ffi ("xlaserve_quant_gemv").
//
//   y_g[m, n] = sum_k x[m, k] * W_g[layer][n, k]      x f32 [M, K], y_g f32 [M, N_g]
//
// for one or more matrices W_g of one layout (q, k and v of a layer in one call: `QuantGemv`). Each
// W is one layer of a stacked QuantArray (runtime/quant.py): data [L, N, K] (one value per byte) or
// [L, N, K/2] (4-bit values of blocks of 32 packed in lane order, `packed`: see RowsR), scale and
// min [L, N, K/block], float32 or float16. The layer is an operand, so a scan over layers hands the
// whole stack over and no layer is copied out of it.
//
// The stored integers and scales are used exactly (no requantization of weights or activations);
// the product is computed in a factored form (see RowsR) whose sums round differently from a dot
// with the dequantized weights. The sum for one (m, n) is the same whatever M (up to gemv_rows),
// the thread count or the rows' split: batch-invariant and deterministic. Calls of more rows run,
// on AVX-512, the GEMM path (quant_gemm_avx512.h): batch-invariant among themselves, rounded
// differently from the rows here.
//
// Rows n are split into tasks on XLA's intra-op thread pool (parallel.h). Where the CPU has AVX-512
// the rows run at 16 lanes (quant_gemv_avx512.h), else at 8 (RowsR here): each is deterministic and
// batch-invariant on its own, and the two round their sums in different orders.

#include <algorithm>
#include <cstdint>
#include <immintrin.h>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kQ8 = 0, kQ4_0 = 1, kQ4_1 = 2 };
// Which rows code runs (attribute isa): the best this CPU has, or one named (tests run both).
enum Isa : int64_t { kBestIsa = 0, kAvx2 = 1, kAvx512 = 2 };
// Rows of x sharing each converted sub-block (more than 4 spill the 16 AVX2 registers, measured).
constexpr int kMaxRows = 4;
// How far ahead of the block being read the rows code asks for W's bytes (and a row's scales and
// mins as many rows ahead as that is). On a VM core whose weights stream from DRAM (SmolLM2's
// layers, 24k rows of 576) the hardware prefetchers alone left a Q4_1 row loop at ~55% of a plain
// read's bandwidth; 8 KiB ahead ran it at the read's 9-10 GB/s (2 KiB: 7.2, 4 KiB: 7.1; measured on
// one core of an Emerald Rapids VM). A prefetch never faults, past the matrix's end included.
constexpr int64_t kPrefetchBytes = 8192;

inline void PrefetchRowScales(const void* scale, const void* min, int64_t row, int64_t nb, int64_t scale_bytes) {
  const int64_t at = row * nb * scale_bytes;
  _mm_prefetch(static_cast<const char*>(scale) + at, _MM_HINT_T0);
  if (min) _mm_prefetch(static_cast<const char*>(min) + at, _MM_HINT_T0);
}

// AVX2 + FMA (8 float lanes), F16C for float16 scales; the Python side uses this kernel only where
// the CPU has all three (build.REQUIRED_CPU_FLAGS).
inline __m128i Load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256 Floats(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 FloatsSigned(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
// q4_0's q - 8 in the integers, converted exactly (so d * (q - 8) rounds as gguf's does)
inline __m256 FloatsLess8(__m128i v) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), _mm256_set1_epi32(8)));
}

// Bit position of value v (0-31) of a lane-order block once RowsR's mask leaves it in place: part
// h = v / 8 takes nibble 2h (lanes 0-3) and 2h + 1 (lanes 4-7) of each 32-bit word, i.e. bits 8h
// and 8h + 4; part 3 is shifted right by 4 first (bits 28-31 would read as a negative int32).
constexpr int Position(int v) { return (v / 8 < 3 ? 8 * (v / 8) : 20) + 4 * (v % 8 >= 4); }

// The same for the AVX-512 rows (quant_gemv_avx512.h): value v kept in place at bit 4 * (v / 4).
constexpr int Position512(int v) { return 4 * (v / 4); }

// The x the packed path multiplies: x[k] * 2^-Position(k % 32) (wide: Position512), so that
// x' * (q * 2^p) is x * q exactly (both factors scaled by powers of two; only an |x| below 2^-98,
// whose products are below any sum's last bit, would lose bits as a subnormal).
void Prescale(const float* x, int64_t count, float* out, bool wide) {
  float scale[32];
  for (int v = 0; v < 32; ++v)
    scale[v] = 1.0f / static_cast<float>(int64_t{1} << (wide ? Position512(v) : Position(v)));
  for (int64_t i = 0; i < count; ++i) out[i] = x[i] * scale[i % 32];
}

// The 8 lanes summed: (0+4, 1+5, 2+6, 3+7), then pairs, then the last two.
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Scales and mins are float32 or float16 (GGUF's: kept as stored, 2 bytes a block fewer to read;
// F16C converts them exactly).
inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t h) { return _cvtsh_ss(h); }
inline __m256 Load8Floats(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8Floats(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// sum_i a[i] * b[i] over count values: 8 lanes of FMAs, then the lanes, then the tail in order.
template <typename Sc>
inline float Dot(const Sc* a, const float* b, int64_t count) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) acc = _mm256_fmadd_ps(Load8Floats(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = HorizontalSum(acc);
  for (; i < count; ++i) sum += ToFloat(a[i]) * b[i];
  return sum;
}

struct Args {
  const float* x;       // [M, K]; packed: x scaled per lane (`Prescale`)
  const float* x_sums;  // [M, K / block]: each block's sum of x (for the mins), or null
  const uint8_t* data;
  const void* scale;  // Sc [N, K / block] of the layer (RowsR's Sc: float or uint16_t, float16)
  const void* min;
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
// acc = d * t + acc per sub-block in order, then the 8 lanes of acc summed (`HorizontalSum`), then
// the mins' sum over blocks (`Dot`). None of it depends on R, the thread or the task:
// batch-invariant.
template <typename Sc, int kKind, bool kPacked, bool kHasMin, int kParts, int R>
void RowsR(const Args& a, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int S = 8 * kParts;
  const int64_t subs = a.k / S, per_block = a.block / S, nb = a.k / a.block;
  const int64_t sub_bytes = kPacked ? S / 2 : S;
  __m256i masks[4], eights[4];
  for (int h = 0; h < 4; ++h) {
    const int lo = Position(8 * h), hi = Position(8 * h + 4);
    masks[h] = _mm256_setr_epi32(15 << lo, 15 << lo, 15 << lo, 15 << lo, 15 << hi, 15 << hi, 15 << hi, 15 << hi);
    eights[h] = _mm256_setr_epi32(8 << lo, 8 << lo, 8 << lo, 8 << lo, 8 << hi, 8 << hi, 8 << hi, 8 << hi);
  }
  const int64_t rows_ahead = std::max<int64_t>(1, kPrefetchBytes / a.row_bytes);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.data + n * a.row_bytes;
    const Sc* d = static_cast<const Sc*>(a.scale) + n * nb;
    PrefetchRowScales(a.scale, kHasMin ? a.min : nullptr, n + rows_ahead, nb, sizeof(Sc));
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t s = 0, b = 0, left = per_block; s < subs; ++s) {
      const __m256 db = _mm256_set1_ps(ToFloat(d[b]));
      if (--left == 0) ++b, left = per_block;
      const uint8_t* qs = q + s * sub_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(qs) + kPrefetchBytes, _MM_HINT_T0);
      __m256 v[kParts];
      if constexpr (kPacked) {
        // lane order (runtime/quant.py `to_lanes`): 32-bit word i (0-3) of the block's 16 bytes
        // holds values i + 8c (nibble 2c) and i + 8c + 4 (nibble 2c + 1), c = 0..3. Both halves of
        // a register get the 4 words; a per-lane mask then leaves values 8h..8h+7 of part h in
        // place, q * 2^Position, converted exactly, and x comes prescaled (`Prescale`): one
        // integer op a part, no shift or shuffle (1.5x the old shift-and-mask loop on one core).
        static_assert(kParts == 4);
        const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        for (int h = 0; h < 4; ++h) {
          __m256i q4 = _mm256_and_si256(h < 3 ? raw : _mm256_srli_epi32(raw, 4), masks[h]);
          if constexpr (kKind == kQ4_0) q4 = _mm256_sub_epi32(q4, eights[h]);  // (q - 8) * 2^p
          v[h] = _mm256_cvtepi32_ps(q4);
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
      float sum = HorizontalSum(acc[r]);
      // the mins' sum in vector lanes too: a serial chain of nb scalar FMAs cost ~25% of a row
      if constexpr (kHasMin) sum += Dot(static_cast<const Sc*>(a.min) + n * nb, a.x_sums + (m0 + r) * nb, nb);
      a.y[(m0 + r) * a.n + n] = sum;
    }
  }
}

template <typename Sc, int kKind, bool kPacked, bool kHasMin, int kParts>
void Rows(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kMaxRows) {
    static_assert(kMaxRows == 4);
    switch (std::min<int64_t>(kMaxRows, a.m - m0)) {
      case 1: RowsR<Sc, kKind, kPacked, kHasMin, kParts, 1>(a, n0, n1, m0); break;
      case 2: RowsR<Sc, kKind, kPacked, kHasMin, kParts, 2>(a, n0, n1, m0); break;
      case 3: RowsR<Sc, kKind, kPacked, kHasMin, kParts, 3>(a, n0, n1, m0); break;
      default: RowsR<Sc, kKind, kPacked, kHasMin, kParts, 4>(a, n0, n1, m0); break;
    }
  }
}

#include "quant_gemv_avx512.h"
#include "quant_gemm_avx512.h"

using RowsFn = void (*)(const Args&, int64_t, int64_t);

// The rows function for a layout; wide: AVX-512's (sub-blocks of 16 * kParts values), else AVX2's.
template <typename Sc, int kKind, bool kPacked, bool kHasMin>
RowsFn PickS(int64_t s, bool wide) {
  if (wide) {
    if constexpr (kPacked) return Rows512<Sc, kKind, true, kHasMin, 2>;
    return s == 32 ? Rows512<Sc, kKind, false, kHasMin, 2> : Rows512<Sc, kKind, false, kHasMin, 1>;
  }
  if constexpr (kPacked) return Rows<Sc, kKind, true, kHasMin, 4>;
  return s == 32 ? Rows<Sc, kKind, false, kHasMin, 4> : Rows<Sc, kKind, false, kHasMin, 2>;
}

template <typename Sc>
RowsFn PickKind(int64_t kind, bool packed, bool has_min, int64_t s, bool wide) {
  if (kind == kQ8) return has_min ? PickS<Sc, kQ8, false, true>(s, wide) : PickS<Sc, kQ8, false, false>(s, wide);
  if (kind == kQ4_0) return packed ? PickS<Sc, kQ4_0, true, false>(s, wide) : PickS<Sc, kQ4_0, false, false>(s, wide);
  return packed ? PickS<Sc, kQ4_1, true, true>(s, wide) : PickS<Sc, kQ4_1, false, true>(s, wide);
}

RowsFn Pick(bool half, int64_t kind, bool packed, bool has_min, int64_t s, bool wide) {
  return half ? PickKind<uint16_t>(kind, packed, has_min, s, wide) : PickKind<float>(kind, packed, has_min, s, wide);
}

// One matrix's checks and Args (x, x_sums, m and k set by the caller).
ffi::Error Bind(const ffi::AnyBuffer& data, const ffi::AnyBuffer& scale, const ffi::AnyBuffer& min,
                ffi::Result<ffi::Buffer<ffi::F32>>& y, int64_t l, int64_t kind, int64_t block, bool packed,
                bool has_min, bool wide, Args& a, RowsFn& fn, GemmFn& gemm) {
  auto dd = data.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (dd.size() != 3 || sd.size() != 3 || yd.size() != 2)
    return ffi::Error::InvalidArgument("quant_gemv: data and scale must be [L, N, *], y [M, N]");
  const int64_t layers = dd[0], n = dd[1];
  if (dd[2] != (packed ? a.k / 2 : a.k) || sd[0] != layers || sd[1] != n || sd[2] != a.k / block ||
      yd[0] != a.m || yd[1] != n)
    return ffi::Error::InvalidArgument("quant_gemv: data/scale/y shapes do not match x");
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("quant_gemv: layer out of range");
  const ffi::DataType st = scale.element_type();
  if ((st != ffi::DataType::F32 && st != ffi::DataType::F16) || min.element_type() != st)
    return ffi::Error::InvalidArgument("quant_gemv: scale and min must both be float32 or both float16");
  const bool half = st == ffi::DataType::F16;
  const int64_t scale_bytes = half ? 2 : 4, nb = a.k / block;
  a.row_bytes = dd[2];
  a.data = static_cast<const uint8_t*>(data.untyped_data()) + l * n * a.row_bytes;
  a.scale = static_cast<const uint8_t*>(scale.untyped_data()) + l * n * nb * scale_bytes;
  a.min = has_min ? static_cast<const uint8_t*>(min.untyped_data()) + l * n * nb * scale_bytes : nullptr;
  a.y = y->typed_data();
  a.n = n, a.block = block;
  fn = Pick(half, kind, packed, has_min, std::min<int64_t>(block, 32), wide);
  gemm = PickGemm(half, kind, packed, has_min);
  return ffi::Error::Success();
}

// y_g = x @ W_g[layer]^T for each matrix g of the call (operands data_g, scale_g, min_g after x and
// layer; results y_g): the matrices' rows are tasks of one ParallelFor, so a layer's q/k/v (or
// gate/up) cost one wake of the pool's threads, not three, and x's prescaled copy and block sums
// are made once. Each y_g is what a call with W_g alone gives (the same RowsR per row).
ffi::Error QuantGemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                     ffi::RemainingArgs operands, ffi::RemainingRets results, int64_t kind, int64_t block,
                     bool packed, bool has_min, int64_t isa, int64_t gemv_rows) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("quant_gemv: x must be [M, K]");
  const int64_t m = xd[0], k = xd[1], count = static_cast<int64_t>(results.size());
  const int64_t s = std::min<int64_t>(block, 32);
  const bool four_bit = kind != kQ8;
  if (kind < 0 || kind > 2 || block % s || (s != 16 && s != 32) || k % block || (packed && (!four_bit || block != 32)))
    return ffi::Error::InvalidArgument("quant_gemv: unsupported kind/block/packing");
  if (count == 0 || static_cast<int64_t>(operands.size()) != 3 * count)
    return ffi::Error::InvalidArgument("quant_gemv: give data, scale and min for each result");
  static const bool has_avx512 = HasAvx512();
  if (isa < kBestIsa || isa > kAvx512) return ffi::Error::InvalidArgument("quant_gemv: isa must be 0, 1 or 2");
  if (isa == kAvx512 && !has_avx512)
    return ffi::Error::InvalidArgument("quant_gemv: isa=avx512 asked for, but this CPU lacks AVX-512F/DQ");
  const bool wide = isa == kAvx512 || (isa == kBestIsa && has_avx512);
  if (gemv_rows < 0) return ffi::Error::InvalidArgument("quant_gemv: gemv_rows must be >= 0");

  // More than gemv_rows rows on AVX-512: each weight dequantized once a call, then register
  // tiles (quant_gemm_avx512.h); x packed into blocks first, a task per block.
  const bool gemm = wide && m > gemv_rows;
  Args shared{};
  shared.m = m, shared.k = k;
  std::vector<float> x_sums, scaled, xp;
  shared.x = x.typed_data();
  if (gemm) {
    const int64_t blocks = (m + kTileM - 1) / kTileM;
    xp.resize(blocks * k * kTileM);
    xlaserve::ParallelFor(pool, blocks, [&](int64_t b) { PackBlock512(x.typed_data(), m, k, b, xp.data()); });
  } else {
    if (has_min) {  // each block's sum of x, in order, once for all rows n
      const int64_t nb = k / block;
      x_sums.resize(m * nb);
      for (int64_t i = 0; i < m * nb; ++i) {
        const float* xb = x.typed_data() + i * block;
        float t = 0.0f;
        for (int64_t j = 0; j < block; ++j) t += xb[j];
        x_sums[i] = t;
      }
      shared.x_sums = x_sums.data();
    }
    if (packed) {
      scaled.resize(m * k);
      Prescale(x.typed_data(), m * k, scaled.data(), wide);
      shared.x = scaled.data();
    }
  }
  const int64_t l = *layer.typed_data();
  // ~64 Ki weights a task: enough tasks to balance, few enough to keep the counter cold (the GEMM
  // path's a whole number of tiles: its dequantized rows, 256 KiB, stay in L2).
  int64_t per_task = std::max<int64_t>(1, (int64_t{1} << 16) / k);
  if (gemm) per_task = (per_task + kTileN - 1) / kTileN * kTileN;
  std::vector<Args> args(count, shared);
  std::vector<RowsFn> fns(count);
  std::vector<GemmFn> gemms(count);
  std::vector<int64_t> first(count + 1, 0);  // matrix g's tasks are [first[g], first[g + 1])
  for (int64_t g = 0; g < count; ++g) {
    auto data = operands.get<ffi::AnyBuffer>(3 * g), scale = operands.get<ffi::AnyBuffer>(3 * g + 1),
         min = operands.get<ffi::AnyBuffer>(3 * g + 2);
    auto y = results.get<ffi::Buffer<ffi::F32>>(g);
    if (!data.has_value() || !scale.has_value() || !min.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("quant_gemv: operands must be arrays, results float32 arrays");
    ffi::Error err =
        Bind(*data, *scale, *min, *y, l, kind, block, packed, has_min, wide, args[g], fns[g], gemms[g]);
    if (err.failure()) return err;
    first[g + 1] = first[g] + (args[g].n + per_task - 1) / per_task;
  }
  xlaserve::ParallelFor(pool, first[count], [&](int64_t t) {
    const int64_t g = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t n0 = (t - first[g]) * per_task, n1 = std::min(args[g].n, n0 + per_task);
    if (gemm) gemms[g](args[g], xp.data(), n0, n1);
    else fns[g](args[g], n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveQuantGemv, QuantGemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("packed")
                                  .Attr<bool>("has_min")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("gemv_rows"));
