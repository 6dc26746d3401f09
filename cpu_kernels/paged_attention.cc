// Attention over the paged KV cache for XLA:CPU, behind jax.ffi ("xlaserve_paged_attention").
//
//   q    f32 [B, T, H, G, D]   queries: B rows of T tokens, H kv heads of G query heads each
//   k, v f32 [L, N, P, H, D]   the cache of every layer: N pages of P tokens
//   layer, window s32 []; page_table s32 [B, W]; q_pos s32 [B, T]; kv_len s32 [B]
//   out  f32 [B, T, H, G, D]
//
// The query at position p of row b sees key j iff j <= p, j < kv_len[b] and p - j < window (the
// rule of runtime/attention.py's XLA path): out = softmax(softcap(q . k * scale)) v over those
// keys, zeros where it sees none. Keys and values are read where they lie in their pages: nothing
// is gathered into a contiguous copy (XLA's path gathers [B, S, H, D] per layer, then multiplies
// small batched matrices, ~4 GB/s on two cores), and the K and V rows of a kv head are read once
// for its G query heads.
//
// One query's softmax is exact in two passes (scores, then their max, exponentials and sum, then
// the weighted values in key order); every (row, token, head) is computed alone, in the same order
// whatever B, T or the thread: batch-invariant and deterministic. Tasks are (row, up to 16 tokens),
// all heads (or one query head each when there are few), on XLA's intra-op pool (parallel.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTokensPerTask = 16;

struct Args {
  const float *q, *k, *v;
  const int32_t *pages, *q_pos, *kv_len;
  float* out;
  int64_t t, h, g, d, p, w, n;
  int64_t window;
  float scale, softcap;
};

// The scores of 8 keys for one query: lane j of the result is q . keys[j] over d floats, each key's
// 8 lanes of FMAs over d / 8 steps summed by the same tree ((0+1)+(2+3))+((4+5)+(6+7)), then its
// tail in order: a key's score does not depend on the keys beside it.
inline __m256 Dot8(const float* q, const float* const keys[8], int64_t d) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 8 <= d; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[j] + e), acc[j]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // halves of keys 0-3, 4-7
  __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  if (e < d) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, sum);
    for (int j = 0; j < 8; ++j)
      for (int64_t r = e; r < d; ++r) lanes[j] += q[r] * keys[j][r];
    sum = _mm256_load_ps(lanes);
  }
  return sum;
}

// y += a * x over d floats
inline void Axpy(float a, const float* x, float* y, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += a * x[i];
}

// Token ti of row b, query heads [i0, i1) of its H x G (query head i reads kv head i / G). s:
// scratch of (i1 - i0) x (visible keys) scores, then a softmax denominator per query head.
// rec: scratch for the visible keys' record offsets.
void Query(const Args& a, int64_t b, int64_t ti, int64_t i0, int64_t i1, std::vector<float>& s,
           std::vector<int64_t>& rec) {
  const int64_t row = b * a.t + ti;
  const float* q = a.q + row * a.h * a.g * a.d;
  float* out = a.out + row * a.h * a.g * a.d;
  std::fill(out + i0 * a.d, out + i1 * a.d, 0.0f);
  const int64_t pos = a.q_pos[row];
  const int64_t hi = std::min<int64_t>({pos + 1, a.kv_len[b], a.w * a.p});
  const int64_t lo = std::max<int64_t>(0, pos - a.window + 1);
  if (hi <= lo) return;
  const int64_t n = hi - lo, heads = i1 - i0;
  s.resize(heads * (n + 1));
  // Offsets of keys lo .. hi-1's records [H, D] within a layer's cache, page by page: no division
  // per key (a division for each key and head was 13-28% of a 64-row decode call).
  rec.resize(n);
  const int32_t* table = a.pages + b * a.w;
  for (int64_t j = lo; j < hi;) {
    const int64_t page = std::clamp<int64_t>(table[j / a.p], 0, a.n - 1), end = std::min(hi, (j / a.p + 1) * a.p);
    for (int64_t at = (page * a.p + j % a.p) * a.h * a.d; j < end; ++j, at += a.h * a.d) rec[j - lo] = at;
  }
  auto at = [&](const float* cache, int64_t j) { return cache + rec[j - lo]; };  // token j's record
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t off = i / a.g * a.d;  // its kv head's row within a token's record
    float* si = s.data() + (i - i0) * n;
    for (int64_t j0 = lo; j0 < hi; j0 += 8) {
      const float* keys[8];
      for (int j = 0; j < 8; ++j) keys[j] = at(a.k, std::min(j0 + j, hi - 1)) + off;  // past hi: unused
      const __m256 x = _mm256_mul_ps(Dot8(q + i * a.d, keys, a.d), scale);
      if (j0 + 8 <= hi) {
        _mm256_storeu_ps(si + j0 - lo, x);
      } else {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, x);
        std::copy(lanes, lanes + (hi - j0), si + j0 - lo);
      }
    }
    if (a.softcap > 0.0f)
      for (int64_t j = 0; j < n; ++j) si[j] = a.softcap * std::tanh(si[j] / a.softcap);
  }
  float* total = s.data() + heads * n;  // softmax denominators, per query head of the task
  for (int64_t i = 0; i < heads; ++i) {
    float* si = s.data() + i * n;
    const float peak = *std::max_element(si, si + n);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (si[j] = std::exp(si[j] - peak));
    total[i] = sum;
  }
  // out_i = sum_j p_ij v_j in key order, 64 elements at a time held in registers across the keys
  // (the same FMAs in the same order per element as a pass over the keys updating out in memory).
  for (int64_t i = i0; i < i1; ++i) {
    const float* p = s.data() + (i - i0) * n;
    const int64_t off = i / a.g * a.d;
    float* y = out + i * a.d;
    int64_t e = 0;
    for (; e + 64 <= a.d; e += 64) {
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_loadu_ps(y + e + 8 * r);
      for (int64_t j = lo; j < hi; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j - lo]);
        const float* x = at(a.v, j) + off + e;
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(x + 8 * r), acc[r]);
      }
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(y + e + 8 * r, acc[r]);
    }
    if (e < a.d)
      for (int64_t j = lo; j < hi; ++j) Axpy(p[j - lo], at(a.v, j) + off + e, y + e, a.d - e);
    for (int64_t e2 = 0; e2 < a.d; ++e2) y[e2] /= total[i - i0];
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::S32> window,
                          ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = page_table.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 5 || kd.size() != 5 || td.size() != 2 || vd.size() != 5 || !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument("paged_attention: q must be [B, T, H, G, D], k and v [L, N, P, H, D]");
  const int64_t bs = qd[0], l = *layer.typed_data();
  if (kd[3] != qd[2] || kd[4] != qd[4] || td[0] != bs || q_pos.element_count() != bs * qd[1] ||
      kv_len.element_count() != bs)
    return ffi::Error::InvalidArgument("paged_attention: shapes do not match");
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("paged_attention: layer out of range");
  Args a;
  a.t = qd[1], a.h = qd[2], a.g = qd[3], a.d = qd[4], a.n = kd[1], a.p = kd[2], a.w = td[1];
  const int64_t layer_size = a.n * a.p * a.h * a.d;
  a.q = q.typed_data(), a.k = k.typed_data() + l * layer_size, a.v = v.typed_data() + l * layer_size;
  a.pages = page_table.typed_data(), a.q_pos = q_pos.typed_data(), a.kv_len = kv_len.typed_data();
  a.out = out->typed_data();
  a.window = *window.typed_data(), a.scale = scale, a.softcap = softcap;
  // Tasks of (row, up to 16 tokens) over all heads; with fewer such tasks than 4, one per query
  // head (a batch-1 decode step: 9 tasks for SmolLM2's 3 kv heads, not 3 for 2 threads).
  const int64_t chunks = (a.t + kTokensPerTask - 1) / kTokensPerTask, heads = a.h * a.g;
  const int64_t split = bs * chunks < 4 ? heads : 1;
  xlaserve::ParallelFor(pool, bs * chunks * split, [&](int64_t i) {
    thread_local std::vector<float> scores;
    thread_local std::vector<int64_t> rec;
    const int64_t b = i / (chunks * split), c = i / split % chunks, part = i % split;
    const int64_t i0 = part * heads / split, i1 = (part + 1) * heads / split;
    for (int64_t ti = c * kTokensPerTask; ti < std::min(a.t, (c + 1) * kTokensPerTask); ++ti)
      Query(a, b, ti, i0, i1, scores, rec);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
