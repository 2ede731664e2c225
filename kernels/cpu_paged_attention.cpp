// llama_aot::paged_attention_cpu: kernels/paged_attention.py's op on the CPU, reading keys and
// values where they lie in the paged cache. kernels/cpu_kernels.py builds and loads this file and
// says why it exists; the arguments and the result are paged_attention_reference's.
//
// A decode step (one new token per sequence) streams each sequence's pages once per KV head:
// every page's keys are scored against the query heads that share the head, softmax runs online
// (running max and sum), and the values are accumulated in float32, so nothing is gathered or
// copied and the cost is the bytes of context read. Long contexts are split into pieces that
// threads take independently, then merged by their maxima and sums. Steps with several new tokens
// per sequence (prefill chunks) gather the context and use the matmuls, as the reference does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;         // query heads per KV head
constexpr int64_t kMaxBlock = 256;        // slots per cache block
constexpr int64_t kKeysPerSplit = 512;    // context a thread takes at a time in a long sequence

constexpr int kExp2Terms = 7;
constexpr float kExp2Poly[kExp2Terms] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f,
                                         2.4022651e-1f, 6.9314718e-1f, 1.0f};  // 2^f on [-0.5, 0.5], by Horner

// e^x for x <= 0 and -inf (softmax's arguments), written so that a loop of it vectorises: 2^(x log2 e)
// as a power of two times a degree-6 polynomial in the fraction (relative error ~2e-7). Arguments
// below -87 give ~1e-38 rather than 0, which every use multiplies by a value that is then 0 or
// negligible. libm's expf is a call per element and was a third of the decode loop.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504f;
  const float n = std::floor(t + 0.5f), f = t - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < kExp2Terms; ++i) p = p * f + kExp2Poly[i];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// One page of scores through the online softmax: `scores[0, count)` become their exponentials
// against the running maximum, which moves to include them, and their sum joins the running sum.
// Returns the factor the row's accumulated outputs must be rescaled by (~0 for the first page).
inline float softmax_page(float* scores, int64_t count, float& running_max, float& running_sum) {
  float page_max = running_max;
  for (int64_t j = 0; j < count; ++j) page_max = std::max(page_max, scores[j]);
  const float rescale = exp_nonpositive(running_max - page_max);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < count; ++j) {
    scores[j] = exp_nonpositive(scores[j] - page_max);
    sum += scores[j];
  }
  running_sum = running_sum * rescale + sum;
  running_max = page_max;
  return rescale;
}

// A cached row widened to float32. e4m3 goes through a 256-entry table, which vectorises as a
// gather; c10's conversion is a branchy function per element.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  }
};

template <typename T>
inline void widen_row(const T* src, float* dst, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
}

// bfloat16 is the top half of a float32: a shift, which vectorises, where c10's conversion per
// element did not (at context 8K the bfloat16 cache's widening was two thirds of the kernel).
inline void widen_row(const c10::BFloat16* src, float* dst, int64_t dim) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    const uint32_t wide = static_cast<uint32_t>(bits[d]) << 16;
    std::memcpy(dst + d, &wide, sizeof(float));  // not a cast through uint32_t*: that would alias dst
  }
}

inline void widen_row(const c10::Float8_e4m3fn* src, float* dst, int64_t dim) {
  static const Fp8Table table;
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(src);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) dst[d] = table.value[bits[d]];
}

// One piece of one (sequence, KV head): queries `q` [group][head_dim] already scaled, keys
// `[first, last)` of the sequence, a page at a time. Leaves the piece's maxima, sums and
// unnormalised outputs. `Dim` is head_dim where it is one of the usual sizes, so that the loops over
// it unroll into whole vectors; 0 reads it at run time.
template <typename Cache, int64_t Dim>
void attend_piece(const float* q, int64_t group, int64_t head_dim, const Cache* keys, const Cache* values,
                  const int32_t* table, int64_t block_size, int64_t block_stride, int64_t slot_stride,
                  int64_t first, int64_t last, float* max_out, float* sum_out, float* acc_out) {
  const int64_t D = Dim > 0 ? Dim : head_dim;
  alignas(64) float scores[kMaxGroup][kMaxBlock];
  alignas(64) float row[Dim > 0 ? Dim : kMaxHeadDim];
  for (int64_t g = 0; g < group; ++g) {
    max_out[g] = -std::numeric_limits<float>::infinity();
    sum_out[g] = 0.f;
  }
  std::fill(acc_out, acc_out + group * D, 0.f);
  for (int64_t start = first; start < last;) {
    const int64_t page = start / block_size, offset = start % block_size;
    const int64_t count = std::min(block_size - offset, last - start);
    const int64_t base = static_cast<int64_t>(table[page]) * block_stride + offset * slot_stride;
    for (int64_t j = 0; j < count; ++j) {
      widen_row(keys + base + j * slot_stride, row, D);
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * row[d];
        scores[g][j] = dot;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      const float rescale = softmax_page(scores[g], count, max_out[g], sum_out[g]);
      float* acc = acc_out + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] *= rescale;
    }
    for (int64_t j = 0; j < count; ++j) {
      widen_row(values + base + j * slot_stride, row, D);
      for (int64_t g = 0; g < group; ++g) {
        float* acc = acc_out + g * D;
        const float p = scores[g][j];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * row[d];
      }
    }
    start += count;
  }
}

#if defined(__AVX512F__)
constexpr int64_t kTile = 16;  // slots scored together: one per lane of a vector

// e^x for x <= 0 in every lane: exp_nonpositive's polynomial, with the power of two applied by scalef.
inline __m512 exp16_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}

// A cached row of D = 16 V values as V float32 vectors, in "lane order": a float32 row as it lies; a
// bfloat16 row as, per 32 values, the even-numbered ones then the odd ones, which a shift and a mask
// make out of one load (widening in order took two instructions per 16 values more, and widening was
// most of the loop). Queries are put into, and accumulated outputs taken out of, the same order.
template <int64_t V>
inline void load_row(const float* p, __m512* out) {
  for (int64_t v = 0; v < V; ++v) out[v] = _mm512_loadu_ps(p + 16 * v);
}

template <int64_t V>
inline void load_row(const c10::BFloat16* p, __m512* out) {
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t c = 0; c < V / 2; ++c) {
    const __m512i bits = _mm512_loadu_si512(p + 32 * c);
    out[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    out[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(bits, high));
  }
}

// The row element that lane i of vector v holds in load_row's order.
template <typename Cache>
constexpr int64_t lane_element(int64_t v, int64_t i) {
  return std::is_same_v<Cache, float> ? 16 * v + i : 32 * (v / 2) + 2 * i + v % 2;
}

// The sums of sixteen vectors in one, lane j holding the sum of d[j]: a transposing tree of 45
// shuffles and adds, where sixteen horizontal reductions took ~150 and were the scoring's bulk.
inline __m512 sum_each16(const __m512* d) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128 bits: d[2i]'s and d[2i+1]'s sums of lanes 0+2 and 1+3, alternating
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128 bits: d[4i .. 4i+3]'s sums over those 128 bits
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const auto fold = [](__m512 a, __m512 b) {  // 128-bit lanes 0+1 and 2+3 of a, then of b
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
  };
  return fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]));
}

// Up to kTile slots from `start` that lie before `last` and in start's page: where they begin in
// the cache (in elements) and how many. None (count 0) from `last` on.
struct Tile {
  int64_t base = 0, count = 0;

  Tile(int64_t start, int64_t last, const int32_t* table, int64_t block_size, int64_t block_stride,
       int64_t slot_stride) {
    if (start >= last) return;
    count = std::min({block_size - start % block_size, last - start, kTile});
    base = static_cast<int64_t>(table[start / block_size]) * block_stride + start % block_size * slot_stride;
  }
};

// Asks for a later tile's keys and values (every head's, in address order) a few cache lines at a
// time while the current tile is computed. The loops below read a tile one head at a time, a
// strided pattern that DRAM's own prefetching does not follow: without this, reading from DRAM
// and computing did not overlap at all. Spread out, the requests stay within the core's
// outstanding-miss limit, which one burst per tile exceeded.
constexpr int64_t kPrefetchAhead = 2 * kTile;  // slots

struct TilePrefetch {
  const char *keys = nullptr, *values = nullptr;
  int64_t lines = 0, issued = 0, per_call = 0;

  template <typename Cache>
  TilePrefetch(const Cache* k, const Cache* v, const Tile& tile, int64_t slot_stride, int64_t calls)
      : keys(reinterpret_cast<const char*>(k + tile.base)), values(reinterpret_cast<const char*>(v + tile.base)),
        lines((tile.count * slot_stride * static_cast<int64_t>(sizeof(Cache)) + 63) / 64),
        per_call((lines + calls - 1) / calls) {}

  void some() {
    for (const int64_t end = std::min(lines, issued + per_call); issued < end; ++issued) {
      _mm_prefetch(keys + 64 * issued, _MM_HINT_T0);
      _mm_prefetch(values + 64 * issued, _MM_HINT_T0);
    }
  }
};

// A piece of one sequence for all its KV heads at once, for float32 and bfloat16 caches with
// head_dim 64 or 128, in AVX-512 registers. A slot's keys (and values) for all heads are
// contiguous, so walking a page's slots for every head reads the page front to back: attend_piece,
// one head per work item, read a head's 128 bytes and skipped the other heads' in every slot, and at
// context 8K DRAM delivered ~7 GB/s to that pattern (docs/cpu.md). Sixteen slots at a time, for each
// head: each query head's sixteen scores come out as one vector (sum_each16), go through the online
// softmax as one, and the value rows are added into accumulators held in registers for as many query
// heads as fit. `q` holds every query head [heads * group][D], scaled and in lane order;
// `out + h * out_stride` is KV head h's [group] maxima, [group] sums and [group][D] unnormalised
// outputs, in natural order.
template <typename Cache, int64_t D>
void attend_slots_avx512(const float* q, int64_t heads, int64_t group, const Cache* keys, const Cache* values,
                         const int32_t* table, int64_t block_size, int64_t block_stride, int64_t slot_stride,
                         int64_t first, int64_t last, float* out, int64_t out_stride) {
  constexpr int64_t V = D / 16, kGroupTile = 16 / V;  // query heads whose outputs take 16 registers
  const auto row_max = [&](int64_t h, int64_t g) -> float& { return out[h * out_stride + g]; };
  const auto row_sum = [&](int64_t h, int64_t g) -> float& { return out[h * out_stride + group + g]; };
  const auto row_acc = [&](int64_t h, int64_t g) { return out + h * out_stride + 2 * group + g * D; };
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t g = 0; g < group; ++g) {
      row_max(h, g) = -std::numeric_limits<float>::infinity();
      row_sum(h, g) = 0.f;
      std::fill(row_acc(h, g), row_acc(h, g) + D, 0.f);
    }
  alignas(64) float probs[kMaxGroup][kTile];
  float rescale[kMaxGroup];
  for (int64_t start = first; start < last;) {
    const auto [base, count] = Tile(start, last, table, block_size, block_stride, slot_stride);
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    TilePrefetch ahead(keys, values, Tile(start + kPrefetchAhead, last, table, block_size, block_stride, slot_stride),
                       slot_stride, heads * (group + count));
    for (int64_t h = 0; h < heads; ++h) {
      const Cache* key0 = keys + base + h * D;
      for (int64_t g = 0; g < group; ++g) {
        ahead.some();
        __m512 qv[V], dots[kTile];
        for (int64_t v = 0; v < V; ++v) qv[v] = _mm512_loadu_ps(q + (h * group + g) * D + 16 * v);
        for (int64_t j = 0; j < kTile; ++j) {  // slots past `count` score slot 0 again; the mask drops them
          __m512 k[V];
          load_row<V>(key0 + std::min(j, count - 1) * slot_stride, k);
          dots[j] = _mm512_mul_ps(qv[0], k[0]);
          for (int64_t v = 1; v < V; ++v) dots[j] = _mm512_fmadd_ps(qv[v], k[v], dots[j]);
        }
        const __m512 scores =
            _mm512_mask_blend_ps(live, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sum_each16(dots));
        const float top = std::max(row_max(h, g), _mm512_reduce_max_ps(scores));
        const __m512 p = _mm512_maskz_mov_ps(live, exp16_nonpositive(_mm512_sub_ps(scores, _mm512_set1_ps(top))));
        rescale[g] = exp_nonpositive(row_max(h, g) - top);
        row_sum(h, g) = row_sum(h, g) * rescale[g] + _mm512_reduce_add_ps(p);
        row_max(h, g) = top;
        _mm512_store_ps(probs[g], p);
      }
      const Cache* value0 = values + base + h * D;
      for (int64_t g0 = 0; g0 < group; g0 += kGroupTile) {
        const int64_t heads_here = std::min(kGroupTile, group - g0);
        __m512 acc[kGroupTile][V];
        for (int64_t t = 0; t < kGroupTile; ++t)
          if (t < heads_here)
            for (int64_t v = 0; v < V; ++v)
              acc[t][v] = _mm512_mul_ps(_mm512_loadu_ps(row_acc(h, g0 + t) + 16 * v), _mm512_set1_ps(rescale[g0 + t]));
        for (int64_t j = 0; j < count; ++j) {
          ahead.some();
          __m512 x[V];
          load_row<V>(value0 + j * slot_stride, x);
          for (int64_t t = 0; t < kGroupTile; ++t)
            if (t < heads_here) {
              const __m512 p = _mm512_set1_ps(probs[g0 + t][j]);
              for (int64_t v = 0; v < V; ++v) acc[t][v] = _mm512_fmadd_ps(p, x[v], acc[t][v]);
            }
        }
        for (int64_t t = 0; t < kGroupTile; ++t)
          if (t < heads_here)
            for (int64_t v = 0; v < V; ++v) _mm512_storeu_ps(row_acc(h, g0 + t) + 16 * v, acc[t][v]);
      }
    }
    start += count;
  }
  alignas(64) float natural[D];  // the outputs back from lane order
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t g = 0; g < group; ++g) {
      float* acc = row_acc(h, g);
      for (int64_t v = 0; v < V; ++v)
        for (int64_t i = 0; i < 16; ++i) natural[lane_element<Cache>(v, i)] = acc[16 * v + i];
      std::copy(natural, natural + D, acc);
    }
}

template <typename Cache>
constexpr bool kVectorCache = std::is_same_v<Cache, float> || std::is_same_v<Cache, c10::BFloat16>;
#endif

// One call's arguments, and the sizes both paths read off them. `scale` has the K scale folded in.
struct Step {
  const at::Tensor &q, &kv_cache, &block_tables, &context_lens, &query_index, &positions;
  int64_t layer;
  double scale, v_scale;
  int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  int64_t num_kv_heads = kv_cache.size(4), block_size = kv_cache.size(3);
  int64_t batch = query_index.size(0), q_len = query_index.size(1), group = num_heads / num_kv_heads;
};

// Every (sequence, KV head)'s pieces merged by their maxima and sums into the attention output.
// `partial` is [batch * num_kv_heads * splits, group, head_dim + 2]: each piece's [group] maxima,
// [group] sums and [group][head_dim] unnormalised outputs.
template <typename Query>
at::Tensor merge_pieces(const Step& a, const std::vector<int64_t>& visible, int64_t splits, const at::Tensor& partial) {
  const float* part = partial.data_ptr<float>();
  const int64_t part_stride = a.group * (a.head_dim + 2);
  const int64_t* rows = a.query_index.data_ptr<int64_t>();
  at::Tensor result = at::zeros_like(a.q);
  Query* res = result.data_ptr<Query>();
  at::parallel_for(0, a.batch * a.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(a.head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.num_kv_heads, h = bh % a.num_kv_heads;
      if (visible[b] == 0) continue;
      for (int64_t g = 0; g < a.group; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, part[(bh * splits + s) * part_stride + g]);
        float total = 0.f;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t s = 0; s < splits; ++s) {
          const float* piece = part + (bh * splits + s) * part_stride;
          const float weight = std::exp(piece[g] - top);  // 0 for an empty piece
          total += weight * piece[a.group + g];
          const float* acc = piece + 2 * a.group + g * a.head_dim;
          for (int64_t d = 0; d < a.head_dim; ++d) merged[d] += weight * acc[d];
        }
        Query* dst = res + (rows[b] * a.num_heads + h * a.group + g) * a.head_dim;
        const float norm = static_cast<float>(a.v_scale) / total;
        for (int64_t d = 0; d < a.head_dim; ++d) dst[d] = static_cast<Query>(merged[d] * norm);
      }
    }
  });
  return result;
}

template <typename Query, typename Cache>
at::Tensor decode_attention(const Step& a) {
  const int64_t width = a.block_tables.size(1);
  TORCH_CHECK(a.group <= kMaxGroup && a.block_size <= kMaxBlock && a.head_dim <= kMaxHeadDim,
              "paged_attention_cpu: ", a.group, " query heads per KV head, blocks of ", a.block_size, " or head_dim ", a.head_dim,
              " beyond this kernel's limits");
  const auto attend = a.head_dim == 64 ? attend_piece<Cache, 64> : a.head_dim == 128 ? attend_piece<Cache, 128>
                                                                                 : attend_piece<Cache, 0>;
  // A block is [block_size, num_kv_heads, head_dim]: one slot's key for one head is head_dim
  // contiguous values, and the next slot's for that head lies num_kv_heads * head_dim further on.
  const int64_t slot_stride = a.num_kv_heads * a.head_dim, block_stride = a.block_size * slot_stride;
  const Cache* keys = a.kv_cache.select(0, a.layer).select(0, 0).data_ptr<Cache>();
  const Cache* values = a.kv_cache.select(0, a.layer).select(0, 1).data_ptr<Cache>();
  const Query* q_ptr = a.q.data_ptr<Query>();
  const int32_t* tables = a.block_tables.data_ptr<int32_t>();
  const int32_t* lens = a.context_lens.data_ptr<int32_t>();
  const int64_t* rows = a.query_index.data_ptr<int64_t>();
  const int64_t* pos = a.positions.data_ptr<int64_t>();

  // Keys each row attends to: causal (up to its position) and within its sequence's context.
  std::vector<int64_t> visible(a.batch, 0);
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    if (rows[b] < a.num_tokens) visible[b] = std::min<int64_t>(pos[rows[b]] + 1, lens[b]);
    longest = std::max(longest, visible[b]);
  }
  const int64_t splits = std::max<int64_t>(1, (longest + kKeysPerSplit - 1) / kKeysPerSplit);
  const int64_t items = a.batch * a.num_kv_heads * splits;
  at::Tensor partial = at::empty({items, a.group, a.head_dim + 2}, a.q.options().dtype(at::kFloat));
  float* part = partial.data_ptr<float>();
  const int64_t part_stride = a.group * (a.head_dim + 2);

  const auto empty_piece = [&](float* out) {
    std::fill(out, out + a.group, -std::numeric_limits<float>::infinity());
    std::fill(out + a.group, out + part_stride, 0.f);
  };
#if defined(__AVX512F__)
  if constexpr (kVectorCache<Cache>) {
    const auto slots = a.head_dim == 64 ? attend_slots_avx512<Cache, 64>
                     : a.head_dim == 128 ? attend_slots_avx512<Cache, 128> : nullptr;
    if (slots != nullptr) {  // one work item per (sequence, piece), all KV heads
      at::parallel_for(0, a.batch * splits, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> q_scaled(a.num_heads * a.head_dim);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t split = item % splits, b = item / splits;
          float* out = part + (b * a.num_kv_heads * splits + split) * part_stride;
          const int64_t first = split * kKeysPerSplit, last = std::min(visible[b], first + kKeysPerSplit);
          if (first >= last) {
            for (int64_t h = 0; h < a.num_kv_heads; ++h) empty_piece(out + h * splits * part_stride);
            continue;
          }
          const Query* qb = q_ptr + rows[b] * a.num_heads * a.head_dim;
          for (int64_t r = 0; r < a.num_heads; ++r)
            for (int64_t v = 0; v < a.head_dim / 16; ++v)
              for (int64_t i = 0; i < 16; ++i)
                q_scaled[(r * a.head_dim) + 16 * v + i] =
                    static_cast<float>(qb[r * a.head_dim + lane_element<Cache>(v, i)] * a.scale);
          slots(q_scaled.data(), a.num_kv_heads, a.group, keys, values, tables + b * width, a.block_size,
                block_stride, slot_stride, first, last, out, splits * part_stride);
        }
      });
      return merge_pieces<Query>(a, visible, splits, partial);
    }
  }
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    float q_scaled[kMaxGroup * kMaxHeadDim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits, h = (item / splits) % a.num_kv_heads;
      const int64_t b = item / (splits * a.num_kv_heads);
      float* out = part + item * part_stride;  // [group] maxima, [group] sums, [group][head_dim] outputs
      const int64_t first = split * kKeysPerSplit, last = std::min(visible[b], first + kKeysPerSplit);
      if (first >= last) {
        empty_piece(out);
        continue;
      }
      const Query* qh = q_ptr + (rows[b] * a.num_heads + h * a.group) * a.head_dim;
      for (int64_t i = 0; i < a.group * a.head_dim; ++i) q_scaled[i] = static_cast<float>(qh[i] * a.scale);
      attend(q_scaled, a.group, a.head_dim, keys + h * a.head_dim, values + h * a.head_dim, tables + b * width,
             a.block_size, block_stride, slot_stride, first, last, out, out + a.group, out + 2 * a.group);
    }
  });

  return merge_pieces<Query>(a, visible, splits, partial);
}

// Several new tokens per sequence: the reference's matmuls over a gathered context.
at::Tensor prefill_attention(const Step& a) {
  const int64_t ctx = a.block_tables.size(1) * a.block_size;
  const at::ScalarType dtype = a.kv_cache.element_size() == 1 ? a.q.scalar_type() : a.kv_cache.scalar_type();
  const at::Tensor tables = a.block_tables.to(at::kLong).reshape({-1});
  const at::Tensor k = a.kv_cache.select(0, a.layer).select(0, 0).index_select(0, tables).to(dtype)
                           .reshape({a.batch, ctx, a.num_kv_heads, a.head_dim}).permute({0, 2, 3, 1});
  const at::Tensor v = a.kv_cache.select(0, a.layer).select(0, 1).index_select(0, tables).to(dtype)
                           .reshape({a.batch, ctx, a.num_kv_heads, a.head_dim}).transpose(1, 2);
  const at::Tensor q_pad = at::cat({a.q, a.q.new_zeros({1, a.num_heads, a.head_dim})})
                               .index_select(0, a.query_index.reshape(-1))
                               .view({a.batch, a.q_len, a.num_kv_heads, a.group, a.head_dim}).permute({0, 2, 1, 3, 4})
                               .reshape({a.batch, a.num_kv_heads, a.q_len * a.group, a.head_dim}).to(dtype);
  at::Tensor scores =
      at::matmul(q_pad, k).to(at::kFloat).view({a.batch, a.num_kv_heads, a.q_len, a.group, ctx}) * a.scale;
  const at::Tensor q_pos = at::cat({a.positions, a.positions.new_zeros({1})})
                               .index_select(0, a.query_index.reshape(-1)).view({a.batch, a.q_len});
  const at::Tensor key_pos = at::arange(ctx, a.positions.options());
  const at::Tensor visible = key_pos.le(q_pos.unsqueeze(-1)).logical_and(
      key_pos.lt(a.context_lens.to(at::kLong).view({a.batch, 1, 1})));
  scores = scores.masked_fill(visible.logical_not().view({a.batch, 1, a.q_len, 1, ctx}),
                              -std::numeric_limits<float>::infinity());
  const at::Tensor probs = at::softmax(scores, -1).to(dtype).view({a.batch, a.num_kv_heads, a.q_len * a.group, ctx});
  at::Tensor out = at::matmul(probs, v);
  if (a.v_scale != 1.0) out = (out.to(at::kFloat) * a.v_scale).to(dtype);
  out = out.view({a.batch, a.num_kv_heads, a.q_len, a.group, a.head_dim}).permute({0, 2, 1, 3, 4})
            .reshape({a.batch * a.q_len, a.num_heads, a.head_dim}).to(a.q.scalar_type());
  return a.q.new_zeros({a.num_tokens + 1, a.num_heads, a.head_dim}).index_copy(0, a.query_index.reshape(-1), out)
      .narrow(0, 0, a.num_tokens);
}

double scalar_or_one(const std::optional<at::Tensor>& s) { return s.has_value() ? s->item<double>() : 1.0; }

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                               const at::Tensor& block_tables, const at::Tensor& context_lens,
                               const at::Tensor& query_index, const at::Tensor& positions, double scale,
                               const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(kv_cache.is_contiguous() && q.is_contiguous(), "paged_attention_cpu: q and the cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
              query_index.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "paged_attention_cpu: int32 block tables and context lengths, int64 query index and positions");
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const at::Tensor rows = query_index.contiguous(), pos = positions.contiguous();
  const Step step{q, kv_cache, tables, lens, rows, pos, layer, scale * scalar_or_one(k_scale), scalar_or_one(v_scale)};
  if (step.q_len != 1) return prefill_attention(step);
  const auto run = [&](auto query_tag, auto cache_tag) {
    using Query = decltype(query_tag);
    using Cache = decltype(cache_tag);
    return decode_attention<Query, Cache>(step);
  };
  const auto with_cache = [&](auto query_tag) {
    switch (kv_cache.scalar_type()) {
      case at::kFloat: return run(query_tag, float{});
      case at::kBFloat16: return run(query_tag, c10::BFloat16{});
      case at::kHalf: return run(query_tag, c10::Half{});
      case at::kFloat8_e4m3fn: return run(query_tag, c10::Float8_e4m3fn{});
      default: TORCH_CHECK(false, "paged_attention_cpu: unsupported cache dtype ", kv_cache.scalar_type());
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat: return with_cache(float{});
    case at::kBFloat16: return with_cache(c10::BFloat16{});
    case at::kHalf: return with_cache(c10::Half{});
    default: TORCH_CHECK(false, "paged_attention_cpu: unsupported query dtype ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_aot, CPU, m) { m.impl("paged_attention_cpu", &paged_attention_cpu); }
