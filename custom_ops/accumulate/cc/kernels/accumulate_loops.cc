// The accumulating-matmul loops of one CPU variant (see accumulate_types.h).
//
// tfhfp8/ops/build.py compiles this file once per CPU variant of cpu_dispatch.h, like
// quantize_loops.cc, and without TensorFlow headers. The rounding to a format is
// rounding.h's QuantizeFloatElement: the one implementation of the C++ backend.
//
// Float accumulators: one output per SIMD lane; the columns of a tile are the lanes
// (GCC vectorizes the loops over them: the bodies are branch-free), k runs
// sequentially. One addition is acc <- Q(RO32(acc + p)): TwoSum gives the exact error
// of the float32 sum, which then becomes its round-to-odd neighbour, rounded once to
// the format (exact by the round-to-odd theorem for formats of <= 22 bits). The
// kernel runs with IEEE subnormals (TensorFlow's threads flush them; see
// accumulate_kernels.cc), which TwoSum needs.
//
// INT32: products of 16-bit mantissas added in pairs by one multiply-add instruction
// (pmaddwd); a block of terms whose running sums all stay in [-2^30, 2^30) cannot have
// overflowed, even between the two terms of a pair, and is exact; any other block is
// redone term by term (ExactBlock: a product of 16-bit values fits 32 bits, and an
// overflow shows in the signs), counting the overflows. Values beyond 16 bits take a
// plain 64-bit path.

#include <algorithm>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "accumulate_types.h"
#include "cpu_dispatch.h"
#include "rounding.h"

namespace tfhfp8 {
inline namespace TFHFP8_VARIANT {
namespace {

constexpr int kLanes = kTileRows * kTileCols;
constexpr uint32_t kMagnitude = 0x7FFFFFFFu;
constexpr uint32_t kInf = 0x7F800000u;

// The float32 round-to-odd of the exact acc + p, as bits. A finite sum beyond
// float32's range becomes +-FLT_MAX, its odd neighbour, except with kNearest: rounding
// to nearest overflows every format of <= 22 bits from FLT_MAX as from inf, so the
// fast path keeps the inf (and saves the test).
template <bool kNearest>
inline uint32_t RoundToOddSum(float acc, float p) {
  const float s = acc + p;
  const float pp = s - acc;  // TwoSum (Knuth): e = acc + p - s exactly
  const float e = (acc - (s - pp)) + (p - pp);
  const uint32_t sb = ToBits(s);
  // s even and inexact: the neighbour toward the exact sum, whose last bit is odd.
  // (Selects rather than bool arithmetic, which GCC does not vectorize.)
  const uint32_t step = 1u | static_cast<uint32_t>(static_cast<int32_t>(ToBits(e) ^ sb) >> 31);
  const uint32_t even_step = (sb & 1u) == 0 ? step : 0u;
  // e is NaN exactly when s is not finite: an ordered test leaves s as it is.
  const uint32_t odd = sb + (__builtin_islessgreater(e, 0.0f) ? even_step : 0u);
  if constexpr (kNearest) return odd;
  const uint32_t acc_abs = ToBits(acc) & kMagnitude, p_abs = ToBits(p) & kMagnitude;
  const uint32_t terms_abs = acc_abs > p_abs ? acc_abs : p_abs;
  const uint32_t overflow = (sb & 0x80000000u) | 0x7F7FFFFFu;
  return (sb & kMagnitude) < kInf ? odd : (terms_abs < kInf ? overflow : sb);
}

// The rounding of kernels' additions: quantize's, or its fast form for nearest even.
enum class Mode { kNearestEven, kStochastic, kTowardZero, kNearestEvenFast, kNearestEvenPlain };

constexpr Rounding RoundingOf(Mode mode) {
  return mode == Mode::kStochastic    ? Rounding::kStochastic
         : mode == Mode::kTowardZero ? Rounding::kTowardZero
                                      : Rounding::kNearestEven;
}

template <Mode kMode>
inline float AddRounded(float acc, float p, const FloatParams<float>& format, uint32_t rand) {
  if constexpr (kMode == Mode::kNearestEvenFast || kMode == Mode::kNearestEvenPlain) {
    return QuantizeFloatNearestEven<kMode == Mode::kNearestEvenPlain>(
        FromBits<float>(RoundToOddSum<true>(acc, p)), format);
  } else {
    return QuantizeFloatElement<float, RoundingOf(kMode)>(
        FromBits<float>(RoundToOddSum<false>(acc, p)), format, rand);
  }
}

// The random bits of flat index base + k (RandomBits<uint32_t> of rounding.h).
inline uint32_t RandomAt(uint64_t index, const Keys& keys) {
  return RandomBits<uint32_t>(index, keys);
}

template <bool kProducts, Mode kMode>
int64_t FloatTile(const float* a, const float* panel, float* c, int rows, int cols,
                  int64_t ldc, uint64_t first_index, const FloatAccumulation& acc) {
  constexpr Rounding R = RoundingOf(kMode);
  constexpr bool kStochastic = R == Rounding::kStochastic;
  const FloatParams<float> inner = acc.inner;
  const FloatParams<float> outer_format = acc.outer;
  const FloatParams<float> products = acc.products;
  const Keys inner_keys = acc.inner_keys, outer_keys = acc.outer_keys,
             product_keys = acc.product_keys;
  const int64_t k_total = acc.k;
  alignas(64) float sum[kLanes];
  alignas(64) float outer[kLanes];
  alignas(64) int32_t swamped[kLanes];
  alignas(64) uint64_t term_base[kLanes];   // o * K: index of term 0 of output o
  alignas(64) uint64_t chunk_base[kLanes];  // o * num_chunks
  const float* row[kTileRows];
  for (int r = 0; r < kTileRows; ++r) row[r] = a + (r < rows ? r : 0) * k_total;
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t o = first_index + static_cast<uint64_t>(l / kTileCols) * ldc + l % kTileCols;
    term_base[l] = o * static_cast<uint64_t>(k_total);
    chunk_base[l] = o * static_cast<uint64_t>(acc.num_chunks);
    sum[l] = 0.0f;  // the result of an empty sum (k == 0)
    outer[l] = 0.0f;
    swamped[l] = 0;
  }
  int64_t chunk_index = 0;
  for (int64_t begin = 0; begin < k_total; begin += acc.chunk, ++chunk_index) {
    const int64_t end = std::min(k_total, begin + acc.chunk);
    for (int l = 0; l < kLanes; ++l) sum[l] = 0.0f;
    for (int64_t k = begin; k < end; ++k) {
      const float* __restrict bk = panel + k * kTileCols;
      for (int r = 0; r < kTileRows; ++r) {
        const float ar = row[r][k];
        float* __restrict s = sum + r * kTileCols;
        int32_t* __restrict w = swamped + r * kTileCols;
        const uint64_t* __restrict base = term_base + r * kTileCols;
        for (int j = 0; j < kTileCols; ++j) {
          float p = ar * bk[j];
          uint32_t rand = 0;
          if constexpr (kStochastic) {
            rand = RandomAt(base[j] + static_cast<uint64_t>(k), inner_keys);
            if constexpr (kProducts) {
              p = QuantizeFloatElement<float, R>(
                  p, products, RandomAt(base[j] + static_cast<uint64_t>(k), product_keys));
            }
          } else if constexpr (kProducts) {
            p = QuantizeFloatElement<float, R>(p, products, 0u);
          }
          const float before = s[j];
          const float after = AddRounded<kMode>(before, p, inner, rand);
          w[j] += after == before ? (p != 0.0f ? 1 : 0) : 0;
          s[j] = after;
        }
      }
    }
    if (acc.num_chunks > 1) {
      for (int l = 0; l < kLanes; ++l) {
        const uint32_t rand =
            kStochastic ? RandomAt(chunk_base[l] + static_cast<uint64_t>(chunk_index), outer_keys)
                        : 0u;
        outer[l] = AddRounded<kMode>(outer[l], sum[l], outer_format, rand);
      }
    }
  }
  const float* result = acc.num_chunks > 1 ? outer : sum;
  int64_t total_swamped = 0;
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < cols; ++j) {
      c[r * ldc + j] = result[r * kTileCols + j];
      total_swamped += swamped[r * kTileCols + j];
    }
  }
  return total_swamped;
}

// IEEE binary16 to nearest even, the plain rounding (NaN: the default NaN), with the
// hardware conversion (F16C's vcvtps2ph, then vcvtph2ps back): rounding the
// round-to-odd float32 sum once to 11 bits is a correct rounding of the exact sum
// (round-to-odd theorem), and the instruction rounds every float32 exactly as
// QuantizeFloatNearestEven<true> does for float16 (subnormals, overflow to inf), except
// for NaNs, whose sign and payload it keeps: a NaN stays a NaN whatever is added to it,
// so each result is made the default NaN once, at the end of its chunk. About 20 vector
// instructions per multiply-add instead of about 38.
#if defined(__F16C__) && (defined(__AVX512F__) || defined(__AVX2__))
#define TFHFP8_HALF_TILE 1
#if defined(__AVX512F__)
struct HalfSimd {
  using V = __m512;
  using I = __m512i;
  static constexpr int kWidth = 16;
  static V Zero() { return _mm512_setzero_ps(); }
  static I ZeroI() { return _mm512_setzero_si512(); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // acc <- RNE16(RO32(acc + p)); `lost` += 1 where p != 0 and the result equals acc.
  static V Add(V acc, V p, I* lost) {
    const V s = _mm512_add_ps(acc, p);
    const V pp = _mm512_sub_ps(s, acc);
    const V e = _mm512_add_ps(_mm512_sub_ps(acc, _mm512_sub_ps(s, pp)), _mm512_sub_ps(p, pp));
    const I sb = _mm512_castps_si512(s);
    const I one = _mm512_set1_epi32(1);
    // s even and inexact (e != 0; e is NaN when s is not finite): one step toward e.
    const __mmask16 inexact = _mm512_cmp_ps_mask(e, Zero(), _CMP_NEQ_OQ);
    const __mmask16 move = _mm512_mask_testn_epi32_mask(inexact, sb, one);
    const I step =
        _mm512_or_si512(_mm512_srai_epi32(_mm512_xor_si512(_mm512_castps_si512(e), sb), 31), one);
    const V odd = _mm512_castsi512_ps(_mm512_mask_add_epi32(sb, move, sb, step));
    const V after =
        _mm512_cvtph_ps(_mm512_cvtps_ph(odd, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (lost != nullptr) {
      const __mmask16 nonzero = _mm512_cmp_ps_mask(p, Zero(), _CMP_NEQ_UQ);
      const __mmask16 same = _mm512_mask_cmp_ps_mask(nonzero, after, acc, _CMP_EQ_OQ);
      *lost = _mm512_mask_add_epi32(*lost, same, *lost, one);
    }
    return after;
  }
  static V DefaultNan(V x) {
    return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                              _mm512_castsi512_ps(_mm512_set1_epi32(QuietNanBits<float>())));
  }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void StoreI(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
};
#else
struct HalfSimd {
  using V = __m256;
  using I = __m256i;
  static constexpr int kWidth = 8;
  static V Zero() { return _mm256_setzero_ps(); }
  static I ZeroI() { return _mm256_setzero_si256(); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Add(V acc, V p, I* lost) {
    const V s = _mm256_add_ps(acc, p);
    const V pp = _mm256_sub_ps(s, acc);
    const V e = _mm256_add_ps(_mm256_sub_ps(acc, _mm256_sub_ps(s, pp)), _mm256_sub_ps(p, pp));
    const I sb = _mm256_castps_si256(s);
    const I one = _mm256_set1_epi32(1);
    const I inexact = _mm256_castps_si256(_mm256_cmp_ps(e, Zero(), _CMP_NEQ_OQ));
    const I even = _mm256_cmpeq_epi32(_mm256_and_si256(sb, one), ZeroI());
    const I step =
        _mm256_or_si256(_mm256_srai_epi32(_mm256_xor_si256(_mm256_castps_si256(e), sb), 31), one);
    const I move = _mm256_and_si256(_mm256_and_si256(inexact, even), step);
    const V odd = _mm256_castsi256_ps(_mm256_add_epi32(sb, move));
    const V after =
        _mm256_cvtph_ps(_mm256_cvtps_ph(odd, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (lost != nullptr) {
      const V same = _mm256_and_ps(_mm256_cmp_ps(after, acc, _CMP_EQ_OQ),
                                   _mm256_cmp_ps(p, Zero(), _CMP_NEQ_UQ));
      *lost = _mm256_sub_epi32(*lost, _mm256_castps_si256(same));
    }
    return after;
  }
  static V DefaultNan(V x) {
    return _mm256_blendv_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(QuietNanBits<float>())),
                            _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void StoreI(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }
};
#endif

int64_t HalfTile(const float* a, const float* panel, float* c, int rows, int cols, int64_t ldc,
                 uint64_t /*first_index*/, const FloatAccumulation& acc) {
  using V = HalfSimd::V;
  using I = HalfSimd::I;
  constexpr int kVectors = kTileCols / HalfSimd::kWidth;
  static_assert(kTileCols % HalfSimd::kWidth == 0, "a tile row must be whole vectors");
  const int64_t k_total = acc.k;
  V sum[kTileRows][kVectors], outer[kTileRows][kVectors];
  I lost[kTileRows][kVectors];
  const float* row[kTileRows];
  for (int r = 0; r < kTileRows; ++r) {
    row[r] = a + (r < rows ? r : 0) * k_total;
    for (int v = 0; v < kVectors; ++v) {
      sum[r][v] = outer[r][v] = HalfSimd::Zero();  // an empty sum (k == 0) is +0
      lost[r][v] = HalfSimd::ZeroI();
    }
  }
  const bool chunked = acc.num_chunks > 1;
  for (int64_t begin = 0; begin < k_total; begin += acc.chunk) {
    const int64_t end = std::min(k_total, begin + acc.chunk);
    for (int r = 0; r < kTileRows; ++r) {
      for (int v = 0; v < kVectors; ++v) sum[r][v] = HalfSimd::Zero();
    }
    for (int64_t k = begin; k < end; ++k) {
      V b[kVectors];
      for (int v = 0; v < kVectors; ++v) {
        b[v] = HalfSimd::Load(panel + k * kTileCols + v * HalfSimd::kWidth);
      }
      for (int r = 0; r < kTileRows; ++r) {
        const V ar = HalfSimd::Set1(row[r][k]);
        for (int v = 0; v < kVectors; ++v) {
          sum[r][v] = HalfSimd::Add(sum[r][v], HalfSimd::Mul(ar, b[v]), &lost[r][v]);
        }
      }
    }
    for (int r = 0; r < kTileRows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        sum[r][v] = HalfSimd::DefaultNan(sum[r][v]);
        if (chunked) {
          outer[r][v] = HalfSimd::DefaultNan(HalfSimd::Add(outer[r][v], sum[r][v], nullptr));
        }
      }
    }
  }
  alignas(64) float result[kLanes];
  alignas(64) int32_t swamped[kLanes];
  for (int r = 0; r < kTileRows; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      HalfSimd::Store(result + r * kTileCols + v * HalfSimd::kWidth,
                      chunked ? outer[r][v] : sum[r][v]);
      HalfSimd::StoreI(swamped + r * kTileCols + v * HalfSimd::kWidth, lost[r][v]);
    }
  }
  int64_t total_swamped = 0;
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < cols; ++j) {
      c[r * ldc + j] = result[r * kTileCols + j];
      total_swamped += swamped[r * kTileCols + j];
    }
  }
  return total_swamped;
}
#endif  // F16C

// ---------------------------------------------------------------------------------
// INT32

// One addition of the INT32 accumulator: returns 1 on overflow.
inline int Int32Add(int32_t* acc, int64_t product, bool saturate) {
  const int64_t t = static_cast<int64_t>(*acc) + product;
  const bool overflow = t < INT32_MIN || t > INT32_MAX;
  if (!overflow) {
    *acc = static_cast<int32_t>(t);
  } else if (saturate) {
    *acc = t < 0 ? INT32_MIN : INT32_MAX;
  } else {
    *acc = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(t)));
  }
  return overflow ? 1 : 0;
}

inline float AddChunk(float total, int32_t partial) {
  return total + static_cast<float>(partial);
}

// Any |value|: term by term in 64-bit arithmetic.
int64_t Int32TileExact(const int32_t* a, const int32_t* panel, float* c, int rows, int cols,
                       int64_t ldc, const Int32Accumulation& acc) {
  int64_t overflows = 0;
  for (int r = 0; r < rows; ++r) {
    const int32_t* ar = a + r * acc.k;
    for (int j = 0; j < cols; ++j) {
      int32_t sum = 0;
      float total = 0.0f;
      for (int64_t k = 0; k < acc.k; ++k) {
        overflows += Int32Add(&sum, static_cast<int64_t>(ar[k]) * panel[k * kTileCols + j],
                              acc.saturate);
        if (acc.chunk < acc.k && ((k + 1) % acc.chunk == 0 || k + 1 == acc.k)) {
          total = AddChunk(total, sum);
          sum = 0;
        }
      }
      c[r * ldc + j] = acc.chunk < acc.k ? total : static_cast<float>(sum);
    }
  }
  return overflows;
}

// 16-bit pairs: the SIMD primitives of each instruction set.
#if defined(__AVX512BW__) && defined(__AVX512DQ__)
struct Simd {
  using V = __m512i;
  static constexpr int kWidth = 16;
  static V Zero() { return _mm512_setzero_si512(); }
  static V Load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void Store(int32_t* p, V v) { _mm512_storeu_si512(p, v); }
  static V Set1(int32_t x) { return _mm512_set1_epi32(x); }
  static V PairProducts(V a, V b) { return _mm512_madd_epi16(a, b); }
  static V Add(V a, V b) { return _mm512_add_epi32(a, b); }
  // flag | (acc ^ (acc << 1)): sign bit set where acc is outside [-2^30, 2^30).
  static V Flag(V flag, V acc) {
    return _mm512_ternarylogic_epi32(flag, acc, _mm512_slli_epi32(acc, 1), 0xF6);
  }
  static V Or3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0xFE); }
  static bool AnySign(V v) { return _mm512_movepi32_mask(v) != 0; }
  static V And(V a, V b) { return _mm512_and_si512(a, b); }
  static V Xor(V a, V b) { return _mm512_xor_si512(a, b); }
  static V Sub(V a, V b) { return _mm512_sub_epi32(a, b); }
  static V SignMask(V a) { return _mm512_srai_epi32(a, 31); }
  // mask ? a : b, mask lanes all ones or all zeros.
  static V Select(V mask, V a, V b) { return _mm512_ternarylogic_epi32(mask, a, b, 0xCA); }
};
#elif defined(__AVX2__)
struct Simd {
  using V = __m256i;
  static constexpr int kWidth = 8;
  static V Zero() { return _mm256_setzero_si256(); }
  static V Load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const V*>(p)); }
  static void Store(int32_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<V*>(p), v); }
  static V Set1(int32_t x) { return _mm256_set1_epi32(x); }
  static V PairProducts(V a, V b) { return _mm256_madd_epi16(a, b); }
  static V Add(V a, V b) { return _mm256_add_epi32(a, b); }
  static V Flag(V flag, V acc) {
    return _mm256_or_si256(flag, _mm256_xor_si256(acc, _mm256_slli_epi32(acc, 1)));
  }
  static V Or3(V a, V b, V c) { return _mm256_or_si256(a, _mm256_or_si256(b, c)); }
  static bool AnySign(V v) { return _mm256_movemask_ps(_mm256_castsi256_ps(v)) != 0; }
  static V And(V a, V b) { return _mm256_and_si256(a, b); }
  static V Xor(V a, V b) { return _mm256_xor_si256(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_epi32(a, b); }
  static V SignMask(V a) { return _mm256_srai_epi32(a, 31); }
  static V Select(V mask, V a, V b) { return _mm256_blendv_epi8(b, a, mask); }
};
#elif defined(__SSE2__)
struct Simd {
  using V = __m128i;
  static constexpr int kWidth = 4;
  static V Zero() { return _mm_setzero_si128(); }
  static V Load(const int32_t* p) { return _mm_loadu_si128(reinterpret_cast<const V*>(p)); }
  static void Store(int32_t* p, V v) { _mm_storeu_si128(reinterpret_cast<V*>(p), v); }
  static V Set1(int32_t x) { return _mm_set1_epi32(x); }
  static V PairProducts(V a, V b) { return _mm_madd_epi16(a, b); }
  static V Add(V a, V b) { return _mm_add_epi32(a, b); }
  static V Flag(V flag, V acc) {
    return _mm_or_si128(flag, _mm_xor_si128(acc, _mm_slli_epi32(acc, 1)));
  }
  static V Or3(V a, V b, V c) { return _mm_or_si128(a, _mm_or_si128(b, c)); }
  static bool AnySign(V v) { return _mm_movemask_ps(_mm_castsi128_ps(v)) != 0; }
  static V And(V a, V b) { return _mm_and_si128(a, b); }
  static V Xor(V a, V b) { return _mm_xor_si128(a, b); }
  static V Sub(V a, V b) { return _mm_sub_epi32(a, b); }
  static V SignMask(V a) { return _mm_srai_epi32(a, 31); }
  static V Select(V mask, V a, V b) {
    return _mm_or_si128(_mm_and_si128(mask, a), _mm_andnot_si128(mask, b));
  }
};
#else  // portable: one lane, plain integers (wrapping arithmetic through uint32_t)
struct Simd {
  using V = int32_t;
  static constexpr int kWidth = 1;
  static V Zero() { return 0; }
  static V Load(const int32_t* p) { return *p; }
  static void Store(int32_t* p, V v) { *p = v; }
  static V Set1(int32_t x) { return x; }
  static V PairProducts(V a, V b) {
    const int32_t lo = static_cast<int16_t>(a) * static_cast<int16_t>(b);
    const int32_t hi = static_cast<int16_t>(a >> 16) * static_cast<int16_t>(b >> 16);
    return static_cast<int32_t>(static_cast<uint32_t>(lo) + static_cast<uint32_t>(hi));
  }
  static V Add(V a, V b) {
    return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
  }
  static V Flag(V flag, V acc) {
    return flag | (acc ^ static_cast<int32_t>(static_cast<uint32_t>(acc) << 1));
  }
  static V Or3(V a, V b, V c) { return a | b | c; }
  static bool AnySign(V v) { return v < 0; }
  static V And(V a, V b) { return a & b; }
  static V Xor(V a, V b) { return a ^ b; }
  static V Sub(V a, V b) {
    return static_cast<int32_t>(static_cast<uint32_t>(a) - static_cast<uint32_t>(b));
  }
  static V SignMask(V a) { return a < 0 ? -1 : 0; }
  static V Select(V mask, V a, V b) { return (mask & a) | (~mask & b); }
};
#endif

constexpr int kVectorsPerRow = kTileCols / Simd::kWidth;
static_assert(kTileCols % Simd::kWidth == 0, "a tile row must be whole vectors");
static_assert(kVectorsPerRow % 2 == 0, "the bound check takes the vectors in pairs");
// Pair words per block: the unit that is either exact as computed or redone.
constexpr int64_t kBlockWords = 32;

// One exact addition in every lane: sum + p (|p| < 2^30) in 32-bit two's complement;
// an overflow (the operands agree in sign, the result does not) adds 1 to `count` and,
// when saturating, clamps toward the operands' sign.
inline void AddExact(Simd::V* sum, Simd::V p, Simd::V* count, bool saturate) {
  using V = Simd::V;
  const V s = Simd::Add(*sum, p);
  const V overflow = Simd::SignMask(Simd::And(Simd::Xor(s, *sum), Simd::Xor(s, p)));
  *count = Simd::Sub(*count, overflow);
  if (saturate) {
    const V clamp = Simd::Xor(Simd::SignMask(*sum), Simd::Set1(INT32_MAX));
    *sum = Simd::Select(overflow, clamp, s);
  } else {
    *sum = s;
  }
}

// Words [begin, end) of the packed pairs, term by term with exact overflow handling.
// Returns the number of overflows (padding lanes add zeros and never overflow).
int64_t ExactBlock(const int32_t* a, const int32_t* panel, int64_t packed_k, int64_t begin,
                   int64_t end, bool saturate, Simd::V (*sum)[kVectorsPerRow]) {
  using V = Simd::V;
  V count[kTileRows][kVectorsPerRow];
  for (int r = 0; r < kTileRows; ++r) {
    for (int v = 0; v < kVectorsPerRow; ++v) count[r][v] = Simd::Zero();
  }
  const V low_half = Simd::Set1(0xFFFF);
  const V high_half = Simd::Set1(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t w = begin; w < end; ++w) {
    const int32_t* bw = panel + w * kTileCols;
    V b[kVectorsPerRow];
    for (int v = 0; v < kVectorsPerRow; ++v) b[v] = Simd::Load(bw + v * Simd::kWidth);
    for (int r = 0; r < kTileRows; ++r) {
      const V ar = Simd::Set1(a[r * packed_k + w]);
      const V first = Simd::And(ar, low_half), second = Simd::And(ar, high_half);
      for (int v = 0; v < kVectorsPerRow; ++v) {
        AddExact(&sum[r][v], Simd::PairProducts(first, b[v]), &count[r][v], saturate);
        AddExact(&sum[r][v], Simd::PairProducts(second, b[v]), &count[r][v], saturate);
      }
    }
  }
  alignas(64) int32_t lanes[kLanes];
  for (int r = 0; r < kTileRows; ++r) {
    for (int v = 0; v < kVectorsPerRow; ++v) {
      Simd::Store(lanes + r * kTileCols + v * Simd::kWidth, count[r][v]);
    }
  }
  int64_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

int64_t Int32TilePairs(const int32_t* a, const int32_t* panel, float* c, int rows, int cols,
                       int64_t ldc, const Int32Accumulation& acc) {
  using V = Simd::V;
  V sum[kTileRows][kVectorsPerRow];
  V saved[kTileRows][kVectorsPerRow];
  alignas(64) int32_t lanes[kLanes];
  alignas(64) float total[kLanes];
  for (int l = 0; l < kLanes; ++l) total[l] = 0.0f;
  const bool chunked = acc.chunk < acc.k;
  int64_t overflows = 0;
  int64_t word = 0;  // first packed word of the chunk
  for (int64_t begin = 0; begin < acc.k; begin += acc.chunk) {
    const int64_t words = (std::min(acc.k - begin, acc.chunk) + 1) / 2;
    for (int r = 0; r < kTileRows; ++r) {
      for (int v = 0; v < kVectorsPerRow; ++v) sum[r][v] = Simd::Zero();
    }
    for (int64_t block = word; block < word + words; block += kBlockWords) {
      const int64_t block_end = std::min(word + words, block + kBlockWords);
      // Sums already outside [-2^30, 2^30) (large, or saturated): term by term.
      V flag = Simd::Zero();
      for (int r = 0; r < kTileRows; ++r) {
        for (int v = 0; v < kVectorsPerRow; ++v) {
          saved[r][v] = sum[r][v];
          flag = Simd::Flag(flag, sum[r][v]);
        }
      }
      bool exact = Simd::AnySign(flag);
      if (!exact) {
        // The sums biased by 2^30 (the same wrapping additions): sum in [-2^30, 2^30)
        // exactly when sum + 2^30 has a clear sign bit, so the bound check is an OR,
        // one ternary-logic instruction for two sums.
        const V bias = Simd::Set1(1 << 30);
        for (int r = 0; r < kTileRows; ++r) {
          for (int v = 0; v < kVectorsPerRow; ++v) sum[r][v] = Simd::Add(sum[r][v], bias);
        }
        for (int64_t w = block; w < block_end; ++w) {
          const int32_t* bw = panel + w * kTileCols;
          V b[kVectorsPerRow];
          for (int v = 0; v < kVectorsPerRow; ++v) b[v] = Simd::Load(bw + v * Simd::kWidth);
          for (int r = 0; r < kTileRows; ++r) {
            const V ar = Simd::Set1(a[r * acc.packed_k + w]);
            for (int v = 0; v < kVectorsPerRow; v += 2) {
              sum[r][v] = Simd::Add(sum[r][v], Simd::PairProducts(ar, b[v]));
              sum[r][v + 1] = Simd::Add(sum[r][v + 1], Simd::PairProducts(ar, b[v + 1]));
              flag = Simd::Or3(flag, sum[r][v], sum[r][v + 1]);
            }
          }
        }
        for (int r = 0; r < kTileRows; ++r) {
          for (int v = 0; v < kVectorsPerRow; ++v) sum[r][v] = Simd::Sub(sum[r][v], bias);
        }
        exact = Simd::AnySign(flag);
        if (exact) {  // some sum left [-2^30, 2^30): redo the block term by term
          for (int r = 0; r < kTileRows; ++r) {
            for (int v = 0; v < kVectorsPerRow; ++v) sum[r][v] = saved[r][v];
          }
        }
      }
      if (exact) {
        overflows += ExactBlock(a, panel, acc.packed_k, block, block_end, acc.saturate, sum);
      }
    }
    word += words;
    if (chunked) {
      for (int r = 0; r < kTileRows; ++r) {
        for (int v = 0; v < kVectorsPerRow; ++v) {
          Simd::Store(lanes + r * kTileCols + v * Simd::kWidth, sum[r][v]);
        }
      }
      for (int l = 0; l < kLanes; ++l) total[l] = AddChunk(total[l], lanes[l]);
    }
  }
  if (!chunked) {
    for (int r = 0; r < kTileRows; ++r) {
      for (int v = 0; v < kVectorsPerRow; ++v) {
        Simd::Store(lanes + r * kTileCols + v * Simd::kWidth, sum[r][v]);
      }
    }
    for (int l = 0; l < kLanes; ++l) total[l] = static_cast<float>(lanes[l]);
  }
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < cols; ++j) c[r * ldc + j] = total[r * kTileCols + j];
  }
  return overflows;
}

int64_t Int32Tile(const int32_t* a, const int32_t* panel, float* c, int rows, int cols,
                  int64_t ldc, const Int32Accumulation& acc) {
  return acc.pairs ? Int32TilePairs(a, panel, c, rows, cols, ldc, acc)
                   : Int32TileExact(a, panel, c, rows, cols, ldc, acc);
}

// The IEEE binary16 slot: the hardware conversion where this variant has it (and no
// product rounding), else the plain tile, which gives the same bits.
#if defined(TFHFP8_HALF_TILE)
#define TFHFP8_HALF_TILE_OF(P) (P ? FloatTile<P, Mode::kNearestEvenPlain> : HalfTile)
#else
#define TFHFP8_HALF_TILE_OF(P) FloatTile<P, Mode::kNearestEvenPlain>
#endif

#define TFHFP8_FLOAT_TILES(P)                                                       \
  {                                                                                 \
    FloatTile<P, Mode::kNearestEven>, FloatTile<P, Mode::kStochastic>,              \
        FloatTile<P, Mode::kTowardZero>, FloatTile<P, Mode::kNearestEvenFast>,      \
        FloatTile<P, Mode::kNearestEvenPlain>, TFHFP8_HALF_TILE_OF(P)              \
  }

}  // namespace
}  // inline namespace TFHFP8_VARIANT

#define TFHFP8_STRINGIFY2(x) #x
#define TFHFP8_STRINGIFY(x) TFHFP8_STRINGIFY2(x)
#define TFHFP8_CONCAT2(a, b) a##b
#define TFHFP8_CONCAT(a, b) TFHFP8_CONCAT2(a, b)

inline namespace TFHFP8_VARIANT {  // fused_loops.cc
void FusedExponents(const double* x, int64_t count, int64_t stride, int min_exponent,
                    bool blocked, int block_emax, bool scale_only, int* out);
int64_t FusedRows(const double* a, const int* ea, int rows, int64_t stride, const double* b,
                  const int* eb, int64_t groups, int64_t n, const FusedArithmetic& f,
                  float* c);
}  // inline namespace TFHFP8_VARIANT

extern const AccumulateLoops TFHFP8_CONCAT(kAccumulateLoops_, TFHFP8_VARIANT) = {
    TFHFP8_STRINGIFY(TFHFP8_VARIANT),
    {TFHFP8_FLOAT_TILES(false), TFHFP8_FLOAT_TILES(true)},
    Int32Tile,
    FusedExponents,
    FusedRows,
};

}  // namespace tfhfp8
