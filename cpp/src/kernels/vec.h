// The vector abstraction for one ISA, selected by QKV_ISA_<NAME> (see Note [per-ISA
// kernels] in CMakeLists.txt). Everything here has internal linkage (anonymous
// namespace inside qkv::<isa>), so no inline function is shared between variants.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(QKV_ISA_AVX512)
#define QKV_NS avx512
#include <immintrin.h>
#elif defined(QKV_ISA_AVX2)
#define QKV_NS avx2
#include <immintrin.h>
#elif defined(QKV_ISA_SCALAR)
#define QKV_NS scalar
#else
#error "define one of QKV_ISA_SCALAR, QKV_ISA_AVX2, QKV_ISA_AVX512"
#endif

namespace qkv {
namespace QKV_NS {
namespace {

#if defined(QKV_ISA_AVX512)
// 16 lanes of fp32; a tail of n < 16 lanes uses a mask register.
struct Vec {
  static constexpr int W = 16;
  using reg = __m512;
  using tail = __mmask16;
  static tail tail_mask(int n) { return (__mmask16)((1u << n) - 1u); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const float* p, tail t) { return _mm512_maskz_loadu_ps(t, p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, reg v, tail t) { _mm512_mask_storeu_ps(p, t, v); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg fnmadd(reg a, reg b, reg c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a·b
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg sqrt(reg a) { return _mm512_sqrt_ps(a); }
  static reg abs(reg a) { return _mm512_abs_ps(a); }
  // x < lo ? a : b, lane by lane
  static reg select_lt(reg x, float lo, reg a, reg b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_LT_OQ), b, a);
  }
  static float reduce_add(reg a) { return _mm512_reduce_add_ps(a); }
  static float reduce_max(reg a) { return _mm512_reduce_max_ps(a); }
  // Lanes whose x < lo are set to `v`.
  static reg replace_below(reg x, float lo, reg r, float v) {
    __mmask16 k = _mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(k, r, _mm512_set1_ps(v));
  }
  // Lanes whose index (base + lane) >= lim are set to -inf.
  static reg mask_from(reg x, int base, int lim) {
    __m512i idxv = _mm512_add_epi32(_mm512_set1_epi32(base),
                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __mmask16 k = _mm512_cmpge_epi32_mask(idxv, _mm512_set1_epi32(lim));
    return _mm512_mask_blend_ps(k, x, _mm512_set1_ps(-__builtin_inff()));
  }
  // Lanes q whose lim[q] <= j are set to -inf (key j masked for query q).
  static reg mask_keys(reg x, const int* lim, int j) {
    __mmask16 k = _mm512_cmple_epi32_mask(_mm512_loadu_si512(lim), _mm512_set1_epi32(j));
    return _mm512_mask_blend_ps(k, x, _mm512_set1_ps(-__builtin_inff()));
  }
  // 2^n for integral-valued n in [-126, 127].
  static reg pow2i(reg n) {
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
  }
  static reg round(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};
#elif defined(QKV_ISA_AVX2)
// 8 lanes of fp32; a tail of n < 8 lanes uses maskload/maskstore.
struct Vec {
  static constexpr int W = 8;
  using reg = __m256;
  using tail = __m256i;
  static tail tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const float* p, tail t) { return _mm256_maskload_ps(p, t); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, reg v, tail t) { _mm256_maskstore_ps(p, t, v); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg fnmadd(reg a, reg b, reg c) { return _mm256_fnmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg sqrt(reg a) { return _mm256_sqrt_ps(a); }
  static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static reg select_lt(reg x, float lo, reg a, reg b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_LT_OQ));
  }
  static float reduce_add(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float reduce_max(reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg replace_below(reg x, float lo, reg r, float v) {
    __m256 k = _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_LT_OQ);
    return _mm256_blendv_ps(r, _mm256_set1_ps(v), k);
  }
  static reg mask_from(reg x, int base, int lim) {
    __m256i idxv = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 k = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idxv, _mm256_set1_epi32(lim - 1)));
    return _mm256_blendv_ps(x, _mm256_set1_ps(-__builtin_inff()), k);
  }
  static reg mask_keys(reg x, const int* lim, int j) {
    __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lim));
    __m256 k = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(j + 1), l));
    return _mm256_blendv_ps(x, _mm256_set1_ps(-__builtin_inff()), k);
  }
  static reg pow2i(reg n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  static reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
};
#else
// The portable baseline: one lane. The compiler may still vectorise the loops (SSE2).
struct Vec {
  static constexpr int W = 1;
  using reg = float;
  using tail = int;
  static tail tail_mask(int n) { return n; }
  static reg zero() { return 0.0f; }
  static reg set1(float x) { return x; }
  static reg load(const float* p) { return *p; }
  static reg load(const float* p, tail t) { return t > 0 ? *p : 0.0f; }
  static void store(float* p, reg v) { *p = v; }
  static void store(float* p, reg v, tail t) { if (t > 0) *p = v; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg fnmadd(reg a, reg b, reg c) { return c - a * b; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg max(reg a, reg b) { return a > b ? a : b; }  // b if either is NaN, as x86 maxps
  static reg min(reg a, reg b) { return a < b ? a : b; }
  static reg div(reg a, reg b) { return a / b; }
  static reg sqrt(reg a) { return __builtin_sqrtf(a); }
  static reg abs(reg a) { return __builtin_fabsf(a); }
  static reg select_lt(reg x, float lo, reg a, reg b) { return x < lo ? a : b; }
  static float reduce_add(reg a) { return a; }
  static float reduce_max(reg a) { return a; }
  static reg replace_below(reg x, float lo, reg r, float v) { return x < lo ? v : r; }
  static reg mask_from(reg x, int base, int lim) { return base >= lim ? -__builtin_inff() : x; }
  static reg mask_keys(reg x, const int* lim, int j) { return lim[0] <= j ? -__builtin_inff() : x; }
  static reg pow2i(reg n) {
    if (!(n == n)) return n;  // NaN: the int conversion below would be undefined
    std::int32_t e = (static_cast<std::int32_t>(n) + 127) << 23;
    float f;
    std::memcpy(&f, &e, sizeof f);
    return f;
  }
  static reg round(reg x) { return __builtin_rintf(x); }
};
#endif

}  // namespace
}  // namespace QKV_NS
}  // namespace qkv
