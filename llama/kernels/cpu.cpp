// CPU kernels for decoding, built and loaded by cpu.py; the declarations after `extern "C"` are the only ones: cpu.py
// reads them to declare each entry point and struct to ctypes.
//
// - Matmuls y (M, N) = x (M, K) @ W (N, K)^T for a few rows M (the batch of one decode step), with W in bf16, in
//   int8 with one scale per output row, or in int4 with a scale and a zero per group of a row (see Nibbles). Each
//   weight is read from memory once and widened in registers, so the loop runs at memory bandwidth; oneDNN instead
//   emulates bf16 on CPUs without native bf16 math, and PyTorch's int8 kernel streams well below bandwidth. (With
//   AVX512-BF16 or ARM's BF16 extension, bf16 weights meet bf16 activations as they are, in vdpbf16ps or bfdot: exact
//   products of pairs, summed in fp32, twice the products per instruction of widening to fp32 for the compute-bound
//   steps of 4-8 rows.) For int8 and int4 weights the activations are rounded to int16, with one fp32 scale per
//   QBLOCK of each row, and multiplied by the weights as exact integer dot products (vpmaddwd, vpdpwssd, smlal; sdot,
//   on ARM with the dot-product extension, of the activations split in three int8 planes): half the instructions of
//   widening every weight to fp32 or fewer. The rounding is at most 2^-16 of the block's largest activation, far
//   below the int8 weights' own (2^-8 of the row's largest weight). (int8 activations, as llama.cpp's q8_0 takes
//   them, would cost about as many instructions per weight on AVX2 (vpmaddubsw needs its operands' signs moved first)
//   for 128 times the rounding.)
// - RMSNorm and a decode step's attention, which PyTorch spreads over a dozen ops whose dispatch costs more than the
//   arithmetic. Attention runs the query heads that share a KV head together, so each reads the cache once; it
//   scores a vector's width of positions per pass and takes exp in vectors. Every sequence has its own position and
//   its own row of the caches.
// - A whole decode step through all Transformer blocks in one call, on one process (the CPU decode engine): the
//   Python around each of these ops costs as much as the ops themselves for small models.
//
// The kernels are written once over a few vector primitives (F: LANES floats; I16 and I32: 2 LANES int16 and LANES
// int32), defined below for each instruction set: AVX-512, AVX2 with FMA, ARM NEON, and portable loops for anything
// else, chosen by the flags the library is compiled with. Every build computes the same products; only the order of
// fp32 sums differs. Activations are bf16 or fp32 (`act_bf16`; every activation, norm weight and int8 or int4 scale
// of a call has that dtype); all sums are fp32 (or exact int32 within a QBLOCK or an int4 group). Entry points that
// can fail return an error message, or null.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LLAMA_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLAMA_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define LLAMA_NEON 1
#endif

namespace {

constexpr long MAX_ROWS = 8;  // of x in a decode step's matmul
constexpr long QBLOCK = 256;  // activations per int16 scale: each int32 lane sums at most 64 products, far from overflow

inline float bf16_to_float(uint16_t v) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as PyTorch does
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof f);
    if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc0;  // NaN
    bits += 0x7fff + ((bits >> 16) & 1);
    return uint16_t(bits >> 16);
}

inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(float v) { return v; }
inline void assign(uint16_t& to, float v) { to = float_to_bf16(v); }
inline void assign(float& to, float v) { to = v; }

inline float load_act(const void* p, bool act_bf16, long i) {
    return act_bf16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_act(void* p, bool act_bf16, long i, float v) {
    if (act_bf16)
        static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
    else
        static_cast<float*>(p)[i] = v;
}

inline long max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// ---- Vector primitives, one set per instruction set ----------------------------------------------------------------
// ISA (its name), LANES (floats per vector F), REGISTERS (vector registers, which size the matmuls' blocks);
// F: zeros, splat, load from float* or from bf16 (uint16_t*, widened), load_pair (2 LANES bf16 weights widened into
// two vectors, in the order of pair_column below), store to float* or to bf16 (rounded to nearest even, NaN kept),
// add, sub, mul, mul_add (a b + c), maximum, magnitude, sum_of and max_of (over the lanes), round_even, times_pow2
// (p 2^n for integral n <= 0; 0 where that is below 2^-126), sum_lanes (lane j = the sum of v[j]'s lanes, for LANES
// vectors v).
// I32 (int32 lanes), QX and QW (QSTEP activations and weights, as they meet in dot_pairs): int_zeros, load_q (QSTEP
// int16 activations, below), load from int8_t* (QSTEP weights), load_nibbles (QSTEP bytes: low and high nibbles),
// dot_pairs (acc + products of x and w, summed into int32 lanes two or four at a time: only the sum over all lanes
// is used), in_lane0, int_sub, to_float, store_rounded (LANES floats to int16, to nearest even). QX and QW are I16
// (2 LANES int16, QSTEP = 2 LANES) but where LLAMA_SPLIT_ACTIVATIONS splits the activations into int8 planes.
// With LLAMA_BF16_PAIRS (AVX512-BF16, ARM's BF16 extension): BF16Pairs (2 LANES bf16), load_pairs, and dot_pairs of
// two BF16Pairs (acc + the products of x and w, summed into fp32 lanes two at a time).

#if defined(LLAMA_AVX512)
#ifdef __AVX512BF16__
#define LLAMA_BF16_PAIRS 1
constexpr const char* ISA = "avx512-bf16";
#else
constexpr const char* ISA = "avx512";
#endif
constexpr long LANES = 16, REGISTERS = 32;
using F = __m512;
using I16 = __m512i;
using I32 = __m512i;

inline F zeros() { return _mm512_setzero_ps(); }
inline F splat(float v) { return _mm512_set1_ps(v); }
inline F load(const float* p) { return _mm512_loadu_ps(p); }
inline F load(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void load_pair(const uint16_t* p, F& first, F& second) {
    const __m512i w = _mm512_loadu_si512(p);
    first = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), w));
    second = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), w));
}
inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
inline void store(uint16_t* p, F v) {
    __m512i bits = _mm512_castps_si512(v);
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
    bits = _mm512_mask_mov_epi32(_mm512_srli_epi32(bits, 16), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(bits));
}
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F mul_add(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F maximum(F a, F b) { return _mm512_max_ps(a, b); }
inline F magnitude(F v) { return _mm512_abs_ps(v); }
inline float sum_of(F v) { return _mm512_reduce_add_ps(v); }
inline float max_of(F v) { return _mm512_reduce_max_ps(v); }
inline F round_even(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
inline F times_pow2(F p, F n) { return _mm512_scalef_ps(p, n); }

// Halves of pairs of vectors are added until each 128-bit lane holds four sums: 46 instructions where 16 separate
// reductions take ~130.
inline F sum_lanes(const F v[16]) {
    __m512 halves[8], quarters[4], eighths[2];
    for (int i = 0; i < 8; i++)  // 128-bit lanes 0, 1: v[i]'s two halves added; 2, 3: v[i + 8]'s
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)  // lanes: v[i], v[i + 8], v[i + 4], v[i + 12], four floats each
        quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[i], halves[i + 4], 0x88),
                                    _mm512_shuffle_f32x4(halves[i], halves[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)  // within lanes: floats 0 and 2 from quarters[i], 1 and 3 from quarters[i + 2]
        eighths[i] = _mm512_add_ps(_mm512_unpacklo_ps(quarters[i], quarters[i + 2]),
                                   _mm512_unpackhi_ps(quarters[i], quarters[i + 2]));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x44),
                                      _mm512_shuffle_ps(eighths[0], eighths[1], 0xEE));
    // lane by lane, sums holds v[0], v[2], v[1], v[3], then v[8], v[10], v[9], v[11], v[4] .. and v[12] ..
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), sums);
}

inline I32 int_zeros() { return _mm512_setzero_si512(); }
inline I16 load(const int16_t* p) { return _mm512_loadu_si512(p); }
inline I16 load(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
inline void load_nibbles(const uint8_t* p, I16& low, I16& high) {
    const __m512i pairs = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
    low = _mm512_and_si512(pairs, _mm512_set1_epi16(15));
    high = _mm512_srli_epi16(pairs, 4);
}
inline I32 dot_pairs(I32 acc, I16 x, I16 w) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, x, w);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}
inline I32 in_lane0(int32_t v) { return _mm512_maskz_set1_epi32(1, v); }
inline I32 int_sub(I32 a, I32 b) { return _mm512_sub_epi32(a, b); }
inline F to_float(I32 v) { return _mm512_cvtepi32_ps(v); }
inline void store_rounded(int16_t* q, F v) {
    _mm256_storeu_si256((__m256i*)q, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)));
}
#ifdef LLAMA_BF16_PAIRS
using BF16Pairs = __m512bh;
inline BF16Pairs load_pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline F dot_pairs(F acc, BF16Pairs x, BF16Pairs w) { return _mm512_dpbf16_ps(acc, x, w); }
#endif

#elif defined(LLAMA_AVX2)
constexpr const char* ISA = "avx2";
constexpr long LANES = 8, REGISTERS = 16;
using F = __m256;
using I16 = __m256i;
using I32 = __m256i;

inline __m128i low_half(__m256i v) { return _mm256_castsi256_si128(v); }
inline __m128i high_half(__m256i v) { return _mm256_extracti128_si256(v, 1); }

inline F zeros() { return _mm256_setzero_ps(); }
inline F splat(float v) { return _mm256_set1_ps(v); }
inline F load(const float* p) { return _mm256_loadu_ps(p); }
inline F load(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void load_pair(const uint16_t* p, F& first, F& second) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)p);
    first = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), w));
    second = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), w));
}
inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
inline void store(uint16_t* p, F v) {
    __m256i bits = _mm256_castps_si256(v);
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1))));
    bits = _mm256_blendv_epi8(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x7fc0),
                              _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(low_half(bits), high_half(bits)));
}
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F mul_add(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F maximum(F a, F b) { return _mm256_max_ps(a, b); }
inline F magnitude(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline float sum_of(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float max_of(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline F round_even(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F times_pow2(F p, F n) {  // 2^n built in the exponent bits; n = -127 gives the bits of 0
    const __m256i e = _mm256_max_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(-127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)));
}
inline F sum_lanes(const F v[8]) {  // horizontal adds of pairs, then the two 128-bit halves
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

inline I32 int_zeros() { return _mm256_setzero_si256(); }
inline I16 load(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline I16 load(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
inline void load_nibbles(const uint8_t* p, I16& low, I16& high) {
    const __m256i pairs = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
    low = _mm256_and_si256(pairs, _mm256_set1_epi16(15));
    high = _mm256_srli_epi16(pairs, 4);
}
inline I32 dot_pairs(I32 acc, I16 x, I16 w) {
#ifdef __AVXVNNI__
    return _mm256_dpwssd_avx_epi32(acc, x, w);
#else
    // The sum goes into acc's own register: from _mm256_add_epi32, GCC adds into the products' register and copies
    // the sum back to the accumulator's, one more instruction per accumulator per step of the int8 and int4 loops.
    const __m256i products = _mm256_madd_epi16(x, w);
    __asm__("vpaddd {%1, %0, %0|%0, %0, %1}" : "+x"(acc) : "x"(products));  // AT&T | Intel syntax
    return acc;
#endif
}
inline I32 in_lane0(int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }
inline I32 int_sub(I32 a, I32 b) { return _mm256_sub_epi32(a, b); }
inline F to_float(I32 v) { return _mm256_cvtepi32_ps(v); }
inline void store_rounded(int16_t* q, F v) {
    const __m256i rounded = _mm256_cvtps_epi32(v);
    _mm_storeu_si128((__m128i*)q, _mm_packs_epi32(low_half(rounded), high_half(rounded)));
}

#elif defined(LLAMA_NEON)
constexpr long LANES = 4, REGISTERS = 32;
using F = float32x4_t;

inline F zeros() { return vdupq_n_f32(0.0f); }
inline F splat(float v) { return vdupq_n_f32(v); }
inline F load(const float* p) { return vld1q_f32(p); }
inline F load(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
inline void load_pair(const uint16_t* p, F& first, F& second) {
    const uint16x8_t w = vld1q_u16(p);
    first = vreinterpretq_f32_u16(vzip1q_u16(vdupq_n_u16(0), w));
    second = vreinterpretq_f32_u16(vzip2q_u16(vdupq_n_u16(0), w));
}
inline void store(float* p, F v) { vst1q_f32(p, v); }
inline void store(uint16_t* p, F v) {
    uint32x4_t bits = vreinterpretq_u32_f32(v);
    bits = vaddq_u32(bits, vaddq_u32(vdupq_n_u32(0x7fff), vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1))));
    bits = vbslq_u32(vceqq_f32(v, v), vshrq_n_u32(bits, 16), vdupq_n_u32(0x7fc0));  // v == v: not NaN
    vst1_u16(p, vmovn_u32(bits));
}
inline F add(F a, F b) { return vaddq_f32(a, b); }
inline F sub(F a, F b) { return vsubq_f32(a, b); }
inline F mul(F a, F b) { return vmulq_f32(a, b); }
inline F mul_add(F a, F b, F c) { return vfmaq_f32(c, a, b); }
inline F maximum(F a, F b) { return vmaxq_f32(a, b); }
inline F magnitude(F v) { return vabsq_f32(v); }
inline float sum_of(F v) { return vaddvq_f32(v); }
inline float max_of(F v) { return vmaxvq_f32(v); }
inline F round_even(F v) { return vrndnq_f32(v); }
inline F times_pow2(F p, F n) {  // 2^n built in the exponent bits; n = -127 gives the bits of 0
    const int32x4_t e = vmaxq_s32(vcvtq_s32_f32(n), vdupq_n_s32(-127));
    return vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e, vdupq_n_s32(127)), 23)));
}
inline F sum_lanes(const F v[4]) { return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3])); }
inline void store_rounded(int16_t* q, F v) { vst1_s16(q, vqmovn_s32(vcvtnq_s32_f32(v))); }

#ifdef __ARM_FEATURE_DOTPROD
// With the dot-product extension, int8 and int4 weights meet the int16 activations through sdot (four int8 products
// summed into each int32 lane): each activation v = 16384 high + 128 middle + low, with high in -2..1 and middle and
// low in 0..127, is split once per call into three int8 planes that each meet the weights as loaded, in their own
// int32 lanes, joined exactly by to_float. Three sdot per 16 weights, against two widenings and four smlal.
#define LLAMA_SPLIT_ACTIVATIONS 1
#ifdef __ARM_FEATURE_BF16_VECTOR_ARITHMETIC
// With the BF16 extension too (Armv8.6-A: Graviton 3 and 4, Neoverse V1, V2 and N2, Apple M2 and later), bf16 weights
// meet bf16 activations in bfdot, as vdpbf16ps does in the avx512-bf16 build.
#define LLAMA_BF16_PAIRS 1
constexpr const char* ISA = "neon-bf16";
#else
constexpr const char* ISA = "neon-dotprod";
#endif
constexpr long QSTEP = 16;
struct I32 {
    int32x4_t high, middle, low;
};
struct QX {  // QSTEP activations' three planes
    int8x16_t high, middle, low;
};
using QW = int8x16_t;

inline I32 int_zeros() { return {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)}; }
inline QX load_split(const int8_t* p) { return {vld1q_s8(p), vld1q_s8(p + 16), vld1q_s8(p + 32)}; }
inline QW load(const int8_t* p) { return vld1q_s8(p); }
inline void load_nibbles(const uint8_t* p, QW& low, QW& high) {
    const uint8x16_t pairs = vld1q_u8(p);
    low = vreinterpretq_s8_u8(vandq_u8(pairs, vdupq_n_u8(15)));
    high = vreinterpretq_s8_u8(vshrq_n_u8(pairs, 4));
}
inline I32 dot_pairs(I32 acc, QX x, QW w) {
    return {vdotq_s32(acc.high, x.high, w), vdotq_s32(acc.middle, x.middle, w), vdotq_s32(acc.low, x.low, w)};
}
inline I32 in_lane0(int32_t v) { return {vdupq_n_s32(0), vdupq_n_s32(0), vsetq_lane_s32(v, vdupq_n_s32(0), 0)}; }
inline I32 int_sub(I32 a, I32 b) {
    return {vsubq_s32(a.high, b.high), vsubq_s32(a.middle, b.middle), vsubq_s32(a.low, b.low)};
}
inline F to_float(I32 v) {
    return vcvtq_f32_s32(vaddq_s32(vshlq_n_s32(v.high, 14), vaddq_s32(vshlq_n_s32(v.middle, 7), v.low)));
}
#ifdef LLAMA_BF16_PAIRS
using BF16Pairs = bfloat16x8_t;
inline BF16Pairs load_pairs(const uint16_t* p) { return vreinterpretq_bf16_u16(vld1q_u16(p)); }
inline F dot_pairs(F acc, BF16Pairs x, BF16Pairs w) { return vbfdotq_f32(acc, x, w); }
#endif
#else
constexpr const char* ISA = "neon";
using I16 = int16x8_t;
using I32 = int32x4_t;

inline I32 int_zeros() { return vdupq_n_s32(0); }
inline I16 load(const int16_t* p) { return vld1q_s16(p); }
inline I16 load(const int8_t* p) { return vmovl_s8(vld1_s8(p)); }
inline void load_nibbles(const uint8_t* p, I16& low, I16& high) {
    const uint8x8_t pairs = vld1_u8(p);
    low = vreinterpretq_s16_u16(vmovl_u8(vand_u8(pairs, vdup_n_u8(15))));
    high = vreinterpretq_s16_u16(vmovl_u8(vshr_n_u8(pairs, 4)));
}
inline I32 dot_pairs(I32 acc, I16 x, I16 w) {
    return vmlal_high_s16(vmlal_s16(acc, vget_low_s16(x), vget_low_s16(w)), x, w);
}
inline I32 in_lane0(int32_t v) { return vsetq_lane_s32(v, vdupq_n_s32(0), 0); }
inline I32 int_sub(I32 a, I32 b) { return vsubq_s32(a, b); }
inline F to_float(I32 v) { return vcvtq_f32_s32(v); }
#endif

#else
// Portable loops over GCC/Clang vector types, which the compiler maps to whatever vector unit -march names.
constexpr const char* ISA = "portable";
constexpr long LANES = 8, REGISTERS = 16;
typedef float F __attribute__((vector_size(32)));
typedef int16_t I16 __attribute__((vector_size(32)));
typedef int32_t I32 __attribute__((vector_size(32)));

inline F zeros() { return F{}; }
inline F splat(float v) {
    F s;
    for (int i = 0; i < 8; i++) s[i] = v;
    return s;
}
inline F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline F load(const uint16_t* p) {
    F v;
    for (int i = 0; i < 8; i++) v[i] = bf16_to_float(p[i]);
    return v;
}
inline void load_pair(const uint16_t* p, F& first, F& second) {
    for (int i = 0; i < 8; i++) {
        first[i] = bf16_to_float(p[i / 4 * 8 + i % 4]);
        second[i] = bf16_to_float(p[i / 4 * 8 + 4 + i % 4]);
    }
}
inline void store(float* p, F v) { std::memcpy(p, &v, sizeof v); }
inline void store(uint16_t* p, F v) {
    for (int i = 0; i < 8; i++) p[i] = float_to_bf16(v[i]);
}
inline F add(F a, F b) { return a + b; }
inline F sub(F a, F b) { return a - b; }
inline F mul(F a, F b) { return a * b; }
inline F mul_add(F a, F b, F c) { return a * b + c; }
inline F maximum(F a, F b) {
    for (int i = 0; i < 8; i++) a[i] = std::max(a[i], b[i]);
    return a;
}
inline F magnitude(F v) {
    for (int i = 0; i < 8; i++) v[i] = std::fabs(v[i]);
    return v;
}
inline float sum_of(F v) {
    float s = 0;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}
inline float max_of(F v) {
    float s = v[0];
    for (int i = 1; i < 8; i++) s = std::max(s, v[i]);
    return s;
}
inline F round_even(F v) {
    for (int i = 0; i < 8; i++) v[i] = std::nearbyint(v[i]);
    return v;
}
inline F times_pow2(F p, F n) {
    for (int i = 0; i < 8; i++) p[i] = n[i] < -126 ? 0.0f : std::ldexp(p[i], int(n[i]));
    return p;
}
inline F sum_lanes(const F v[8]) {
    F sums;
    for (int j = 0; j < 8; j++) sums[j] = sum_of(v[j]);
    return sums;
}

inline I32 int_zeros() { return I32{}; }
inline I16 load(const int16_t* p) {
    I16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline I16 load(const int8_t* p) {
    I16 v;
    for (int i = 0; i < 16; i++) v[i] = p[i];
    return v;
}
inline void load_nibbles(const uint8_t* p, I16& low, I16& high) {
    for (int i = 0; i < 16; i++) low[i] = p[i] & 15, high[i] = p[i] >> 4;
}
inline I32 dot_pairs(I32 acc, I16 x, I16 w) {
    for (int i = 0; i < 8; i++) acc[i] += int32_t(x[2 * i]) * w[2 * i] + int32_t(x[2 * i + 1]) * w[2 * i + 1];
    return acc;
}
inline I32 in_lane0(int32_t v) { return I32{v}; }
inline I32 int_sub(I32 a, I32 b) { return a - b; }
inline F to_float(I32 v) { return __builtin_convertvector(v, F); }
inline void store_rounded(int16_t* q, F v) {
    for (int i = 0; i < 8; i++) q[i] = int16_t(std::nearbyint(v[i]));
}
#endif

#ifndef LLAMA_SPLIT_ACTIVATIONS
constexpr long QSTEP = 2 * LANES;  // int8 or int4 weights per dot_pairs
using QX = I16;                    // as dot_pairs takes the activations
using QW = I16;                    // and the weights
#endif
// The column, within 2 LANES bf16 weights, that lane i of load_pair's two vectors holds (i < LANES: of the first):
// each run of 8 weights (a 128-bit lane) gives its first 4 to the first vector and its last 4 to the second, which
// widens each vector with one shuffle (interleaving with zeros) instead of two instructions.
constexpr long pair_column(long i) { return i % LANES / 4 * 8 + i / LANES * 4 + i % 4; }

// Whether the matmuls' blocks and tiles may take 8 rows of x: 32 vector registers, and int32 accumulators of one
// register each (not the three of split activations).
constexpr bool EIGHT_ROWS = REGISTERS >= 32 && sizeof(I32) == sizeof(F);

// ---- Matmuls ------------------------------------------------------------------------------------------------------

// int4 weights: each row's K codes (0..15) two to a byte, in runs of 64 codes stored in 32 bytes, byte i holding
// code i of the run in its low nibble and code 32 + i in its high nibble (so that a load of consecutive bytes widens
// to two vectors of consecutive codes). Each `group` of a row has a scale and a zero: weight = (code - 8) * scale +
// zero.
struct Nibbles {
    uint8_t pair;
};

// A matmul's activations, converted once per call: fp32, and for int8 and int4 weights also int16 with one scale per
// QBLOCK elements of each row (x[m, k] ~= q[m, k] * scale[m, k / QBLOCK]); for int4 weights, the sums of each `group`
// of a row's elements, of x and of q.
struct Activations {
    std::vector<float> x;
    std::vector<int16_t> q;
    std::vector<float> scale;
    std::vector<int8_t> planes;  // with LLAMA_SPLIT_ACTIVATIONS: q's high, middle and low planes, QSTEP of each in turn
    long blocks = 0;
    long group = 0;
    std::vector<float> sums;
    std::vector<int32_t> q_sums;
    std::vector<float> paired;  // for bf16 weights in a decode step: x, each 2 LANES columns in pair_column's order
    const uint16_t* x_bf16 = nullptr;  // with LLAMA_BF16_PAIRS, x itself where it is bf16 (during the call)
};

// Columns per step of each weight type's loop, the same in every build (a multiple of every build's step: 2 LANES for
// bf16, int8 and int4 weights, LANES for fp32), so that every build rounds the same columns: the K % vector_width
// tail is computed in fp32 from x itself.
template <typename T>
constexpr long vector_width() {
    return std::is_same<T, Nibbles>::value ? 64 : std::is_same<T, float>::value ? 16 : 32;
}

// The activations of QSTEP columns from element i of a.q on, as dot_pairs takes them.
inline QX load_q(const Activations& a, long i) {
#ifdef LLAMA_SPLIT_ACTIVATIONS
    return load_split(a.planes.data() + 3 * i);
#else
    return load(a.q.data() + i);
#endif
}

// Whether the weights meet int16 activations (int8 and int4) or fp32 ones (bf16, and bf16 widened to fp32).
template <typename T>
constexpr bool int16_activations() {
    return std::is_same<T, int8_t>::value || std::is_same<T, Nibbles>::value;
}

// Elements of T per row of W.
template <typename T>
constexpr long row_elems(long K) {
    return std::is_same<T, Nibbles>::value ? K / 2 : K;
}

// The R rows of W a block reads together: rows n0 + r apart (of W, and columns of y); the next block's first row is
// `next` rows after n0. Consecutive rows (apart 1, next R) suit weights that stay in cache; rows far apart (next 1)
// suit weights streamed from memory, since each row then continues the stream of the block before.
struct Block {
    long n0, apart, next;
};

// The next block's rows, one line each time this block's rows cross a line: short rows (K < ~2048) end before the
// hardware prefetcher has ramped up, so without this each block starts with cache misses.
template <long R, typename T>
inline void prefetch_next(const T* rows, const Block& b, long K, long k) {
    if (k % (64 / long(sizeof(T))) == 0)
        for (long r = 0; r < R; r++) __builtin_prefetch(rows + (r * b.apart + b.next) * row_elems<T>(K) + k, 0, 3);
}

// Dot products of M rows of x, m0.., with the R rows of W of block b, the first at `rows`, bf16, over k in
// [0, k_end), k_end a multiple of 2 LANES: 2 LANES weights of a row widened by load_pair meet x's columns in the same
// order (a.paired); or, with LLAMA_BF16_PAIRS and x in bf16, meet x as they are in dot_pairs.
template <long M, long R>
inline void dot_block(const Activations& a, long m0, const uint16_t* rows, const Block& b, const void*, bool, long K,
                      long k_end, float out[M][R]) {
    F acc[M][R];
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = zeros();
#ifdef LLAMA_BF16_PAIRS
    for (long k = 0; a.x_bf16 != nullptr && k < k_end; k += 2 * LANES) {
        prefetch_next<R>(rows, b, K, k);
        BF16Pairs w[R];
        for (long r = 0; r < R; r++) w[r] = load_pairs(rows + r * b.apart * K + k);
        for (long m = 0; m < M; m++) {
            const BF16Pairs x = load_pairs(a.x_bf16 + (m0 + m) * K + k);
            for (long r = 0; r < R; r++) acc[m][r] = dot_pairs(acc[m][r], x, w[r]);
        }
    }
#endif
    for (long k = 0; a.x_bf16 == nullptr && k < k_end; k += 2 * LANES) {
        prefetch_next<R>(rows, b, K, k);
        F first[R], second[R];
        for (long r = 0; r < R; r++) load_pair(rows + r * b.apart * K + k, first[r], second[r]);
        for (long m = 0; m < M; m++) {
            const float* x = a.paired.data() + (m0 + m) * K + k;
            const F x_first = load(x), x_second = load(x + LANES);
            for (long r = 0; r < R; r++)
                acc[m][r] = mul_add(x_second, second[r], mul_add(x_first, first[r], acc[m][r]));
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = sum_of(acc[m][r]);
}

// The same for fp32 rows (a prompt's bf16 weights, widened once per panel) against x itself, k_end a multiple of 16.
template <long M, long R>
inline void dot_block(const Activations& a, long m0, const float* rows, const Block& b, const void*, bool, long K,
                      long k_end, float out[M][R]) {
    F acc[M][R];
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = zeros();
    for (long k = 0; k < k_end; k += LANES) {
        prefetch_next<R>(rows, b, K, k);
        F wv[R];
        for (long r = 0; r < R; r++) wv[r] = load(rows + r * b.apart * K + k);
        for (long m = 0; m < M; m++) {
            const F xv = load(a.x.data() + (m0 + m) * K + k);
            for (long r = 0; r < R; r++) acc[m][r] = mul_add(xv, wv[r], acc[m][r]);
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = sum_of(acc[m][r]);
}

// The same for int8 rows against the int16 activations, k_end a multiple of 32: exact int32 sums per QBLOCK, then
// scaled into fp32.
template <long M, long R>
inline void dot_block(const Activations& a, long m0, const int8_t* rows, const Block& b, const void*, bool, long K,
                      long k_end, float out[M][R]) {
    F acc[M][R];
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = zeros();
    for (long k0 = 0; k0 < k_end; k0 += QBLOCK) {
        I32 dots[M][R];
        for (long m = 0; m < M; m++)
            for (long r = 0; r < R; r++) dots[m][r] = int_zeros();
        for (long k = k0; k < std::min(k0 + QBLOCK, k_end); k += QSTEP) {
            prefetch_next<R>(rows, b, K, k);
            QW wv[R];
            for (long r = 0; r < R; r++) wv[r] = load(rows + r * b.apart * K + k);
            for (long m = 0; m < M; m++) {
                const QX xv = load_q(a, (m0 + m) * K + k);
                for (long r = 0; r < R; r++) dots[m][r] = dot_pairs(dots[m][r], xv, wv[r]);
            }
        }
        for (long m = 0; m < M; m++) {
            const F scale = splat(a.scale[(m0 + m) * a.blocks + k0 / QBLOCK]);
            for (long r = 0; r < R; r++) acc[m][r] = mul_add(to_float(dots[m][r]), scale, acc[m][r]);
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = sum_of(acc[m][r]);
}

// The same for int4 rows (K a multiple of 64 and of the group, the group of QBLOCK): exact int32 sums per group of
// q (code - 8), as q code less 8 q, each scaled by its scale and the activations', plus the zeros' share (zero times
// x's group sum; centering the codes keeps the two from cancelling).
template <long M, long R>
inline void dot_block(const Activations& a, long m0, const Nibbles* rows, const Block& b, const void* scales_zeros,
                      bool act_bf16, long K, long, float out[M][R]) {
    const long groups = K / a.group;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(rows);
    F acc[M][R];
    float zeros_share[M][R] = {};
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = zeros();
    for (long g = 0; g < groups; g++) {
        I32 dots[M][R];
        for (long m = 0; m < M; m++)
            for (long r = 0; r < R; r++) dots[m][r] = int_zeros();
        for (long k = g * a.group; k < (g + 1) * a.group; k += 64) {
            prefetch_next<R>(rows, b, K, k / 2);
            for (long r = 0; r < R; r++)
                for (long j = 0; j < 32; j += QSTEP) {  // codes k + j.. in the low nibbles, k + 32 + j.. in the high
                    QW low, high;
                    load_nibbles(bytes + r * b.apart * K / 2 + k / 2 + j, low, high);
                    for (long m = 0; m < M; m++) {
                        const long x = (m0 + m) * K + k + j;
                        dots[m][r] = dot_pairs(dot_pairs(dots[m][r], load_q(a, x), low), load_q(a, x + 32), high);
                    }
                }
        }
        for (long r = 0; r < R; r++) {  // the scaled dot in vector lanes, the zeros' share in a scalar
            const long at = 2 * ((b.n0 + r * b.apart) * groups + g);
            const float scale = load_act(scales_zeros, act_bf16, at), zero = load_act(scales_zeros, act_bf16, at + 1);
            for (long m = 0; m < M; m++) {
                const long mg = (m0 + m) * groups + g;
                const float x_scale = a.scale[(m0 + m) * a.blocks + g * a.group / QBLOCK];
                acc[m][r] = mul_add(to_float(int_sub(dots[m][r], in_lane0(8 * a.q_sums[mg]))), splat(scale * x_scale),
                                    acc[m][r]);
                zeros_share[m][r] += zero * a.sums[mg];
            }
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = sum_of(acc[m][r]) + zeros_share[m][r];
}

// a.q and a.scale from a.x (M, K) over its first k_end columns (a multiple of 32), as Activations describes.
inline void round_to_int16(Activations& a, long M, long K, long k_end) {
    a.blocks = (k_end + QBLOCK - 1) / QBLOCK;
    a.q.resize(M * K);
    a.scale.resize(M * a.blocks);
    for (long m = 0; m < M; m++)
        for (long b = 0; b < a.blocks; b++) {
            const float* x = a.x.data() + m * K + b * QBLOCK;
            int16_t* q = a.q.data() + m * K + b * QBLOCK;
            const long len = std::min(QBLOCK, k_end - b * QBLOCK);
            F most = zeros();
            for (long k = 0; k < len; k += LANES) most = maximum(most, magnitude(load(x + k)));
            const float largest = max_of(most);
            a.scale[m * a.blocks + b] = largest / 32767.0f;
            const F inverse = splat(largest > 0 ? 32767.0f / largest : 0.0f);
            for (long k = 0; k < len; k += LANES) store_rounded(q + k, mul(load(x + k), inverse));
        }
#ifdef LLAMA_SPLIT_ACTIVATIONS
    a.planes.resize(3 * M * K);
    for (long m = 0; m < M; m++)
        for (long k0 = 0; k0 < k_end; k0 += QSTEP) {
            const int16_t* q = a.q.data() + m * K + k0;
            int8_t* plane = a.planes.data() + 3 * (m * K + k0);
            for (long i = 0; i < QSTEP; i++) {
                plane[i] = int8_t(q[i] >> 14);
                plane[QSTEP + i] = int8_t((q[i] >> 7) & 127);
                plane[2 * QSTEP + i] = int8_t(q[i] & 127);
            }
        }
#endif
}

inline float widen(uint16_t w) { return bf16_to_float(w); }
inline float widen(int8_t w) { return float(w); }
inline float widen(float w) { return w; }

// Rows m0..m0+M of y at block b's columns, from its R rows of W, the first at w_rows: the vector part of each dot
// product, the K % vector_width tail (in fp32), the scale, the store. (int4 rows have no tail, and their scales are
// applied group by group.)
template <long M, long R, typename T>
inline void rows(const Activations& a, long m0, const T* w_rows, const Block& b, const void* scales, void* y,
                 bool act_bf16, long N, long K) {
    const long k_end = K - K % vector_width<T>();
    float out[M][R];
    dot_block<M, R>(a, m0, w_rows, b, scales, act_bf16, K, k_end, out);
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) {
            const long n = b.n0 + r * b.apart;
            float sum = out[m][r];
            if constexpr (!std::is_same<T, Nibbles>::value) {
                for (long k = k_end; k < K; k++) sum += a.x[(m0 + m) * K + k] * widen(w_rows[r * b.apart * K + k]);
                if (scales != nullptr) sum *= load_act(scales, act_bf16, n);
            }
            store_act(y, act_bf16, (m0 + m) * N + n, sum);
        }
}

// Output rows per block for M rows of x: enough to give the hardware prefetcher R streams, few enough that the M R
// accumulators (twice that with int16 activations) and the R weight vectors fit in the vector registers. (On 16
// registers, 4 rows of x take 2 rows of int8 or int4 weights: the fp32 halves of the accumulators, touched once per
// QBLOCK, then wait in memory, and each activation loaded meets two weight rows.)
template <typename T>
constexpr long block_rows(long M) {
    if (REGISTERS >= 32) {
        if (int16_activations<T>() && EIGHT_ROWS) return M == 1 ? 8 : M <= 3 ? 4 : M <= 6 ? 2 : 1;
        if (int16_activations<T>()) return M == 1 ? 4 : M <= 3 ? 2 : 1;  // accumulators of three registers
        return M == 1 ? 8 : M <= 4 ? 4 : 2;
    }
    if (int16_activations<T>()) return M == 1 ? 4 : M <= 4 ? 2 : 1;
    return M <= 2 ? 4 : M <= 6 ? 2 : 1;
}

// Rows m0..m0+M of y over its columns [n_begin, n_end), from W's rows n_begin.. at w: blocks of R = block_rows(M)
// rows, consecutive or (`spread`) each row from its own stretch of the range, then single rows.
template <long M, typename T>
void panel(const Activations& a, long m0, const T* w, const void* scales, void* y, bool act_bf16, long N, long K,
           long n_begin, long n_end, bool spread) {
    constexpr long R = block_rows<T>(M);
    const long blocks = (n_end - n_begin) / R, apart = spread ? blocks : 1, next = spread ? 1 : R;
    for (long i = 0; i < blocks; i++) {
        const Block b{n_begin + i * next, apart, next};
        rows<M, R, T>(a, m0, w + (b.n0 - n_begin) * row_elems<T>(K), b, scales, y, act_bf16, N, K);
    }
    for (long n = n_begin + blocks * R; n < n_end; n++)
        rows<M, 1, T>(a, m0, w + (n - n_begin) * row_elems<T>(K), Block{n, 1, 1}, scales, y, act_bf16, N, K);
}

template <typename T>
void panel_of(long M, const Activations& a, long m0, const T* w, const void* scales, void* y, bool act_bf16, long N,
              long K, long n_begin, long n_end, bool spread = false) {
    switch (M) {
        case 1: return panel<1>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        case 2: return panel<2>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        case 3: return panel<3>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        case 4: return panel<4>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        case 5: return panel<5>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        case 6: return panel<6>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        case 7: return panel<7>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
        default: return panel<8>(a, m0, w, scales, y, act_bf16, N, K, n_begin, n_end, spread);
    }
}

// x (M, K) as the kernels read it: fp32, int16 in blocks where int8 and int4 weights take it, and sums over each
// `group` of a row's elements where int4 weights take them.
template <typename T>
void convert_activations(const void* x, bool act_bf16, long M, long K, long group, Activations& a) {
    a.x.resize(M * K);
    if (act_bf16)
        for (long i = 0; i < M * K; i++) a.x[i] = bf16_to_float(static_cast<const uint16_t*>(x)[i]);
    else
        std::memcpy(a.x.data(), x, M * K * sizeof(float));
    if (int16_activations<T>()) round_to_int16(a, M, K, K - K % vector_width<T>());
    a.x_bf16 = nullptr;
#ifdef LLAMA_BF16_PAIRS
    if (std::is_same<T, uint16_t>::value && M <= MAX_ROWS && act_bf16) a.x_bf16 = static_cast<const uint16_t*>(x);
#endif
    if (std::is_same<T, uint16_t>::value && M <= MAX_ROWS && a.x_bf16 == nullptr) {  // bf16 weights, not widened
        a.paired.resize(M * K);
        for (long m = 0; m < M; m++)
            for (long k = 0; k < K - K % vector_width<T>(); k += 2 * LANES)
                for (long i = 0; i < 2 * LANES; i++) a.paired[m * K + k + i] = a.x[m * K + k + pair_column(i)];
    }
    if (std::is_same<T, Nibbles>::value) {
        a.group = group;
        a.sums.assign(M * K / group, 0.0f);
        a.q_sums.assign(M * K / group, 0);
        for (long g = 0; g < M * K / group; g++)  // rows are whole groups
            for (long k = g * group; k < (g + 1) * group; k++) a.sums[g] += a.x[k], a.q_sums[g] += a.q[k];
    }
}

// Rows of x per tile when there are more than a decode step's (a prompt's), and the bytes of weights one thread keeps
// in its L2 cache while every tile passes over them: the weights are read from memory once, x from cache.
constexpr long TILE_ROWS = EIGHT_ROWS ? 8 : 6, PANEL_BYTES = 128 << 10;
// The most rows of a decode step taken at once; where 8 do not fit, 7 or 8 rows go in two halves, each over the
// same four blocks of weight rows in turn (the second half reads them from L1): fewer reads of x than one tile of 8
// rows with one weight row per block.
constexpr long DECODE_TILE = EIGHT_ROWS ? MAX_ROWS : 6;

// y (M, N) = x (M, K) W^T for the weight type T (int4: with K a multiple of 64 and of `group`, a divisor of QBLOCK).
// Up to MAX_ROWS rows (a decode step) take every row at once, so each weight is read once: up to DECODE_TILE rows with
// each OpenMP thread (PyTorch's own pool: same libgomp) streaming an equal share of W in spread blocks, whose R rows
// read R long runs of memory at once (blocks of consecutive rows read R runs of one row each, which with short rows
// leaves a third of the memory bandwidth unused); 7 or 8 rows in two halves over shared blocks. More rows go in tiles
// of TILE_ROWS over panels of weights that stay in cache, bf16 ones widened to fp32 once per panel, not per tile.
// Both of these are bound by the vector units, not memory: their panels go to the threads as they come free.
template <typename T>
void matmul(const void* x, const T* w, const void* scales, void* y, int act_bf16, long M, long N, long K,
           long group = 0) {
    thread_local Activations kept;  // between calls: allocating and zeroing it each time costs as much as filling it
    Activations& a = kept;  // the calling thread's, which the threads of the loop below share (not their own `kept`)
    convert_activations<T>(x, act_bf16, M, K, group, a);
    if (M <= DECODE_TILE) {  // a decode step in one tile: each thread streams an equal share of W in spread blocks
        const long shares = max_threads();
#pragma omp parallel for schedule(static)
        for (long s = 0; s < shares; s++) {
            const long n_begin = N * s / shares, n_end = N * (s + 1) / shares;
            panel_of(M, a, 0, w + n_begin * row_elems<T>(K), scales, y, act_bf16, N, K, n_begin, n_end, true);
        }
        return;
    }
    const bool decode = M <= MAX_ROWS;
    const long tile = decode ? (M + 1) / 2 : TILE_ROWS;
    const long step = decode ? 4 * block_rows<T>(tile)
                             : std::max(8L, PANEL_BYTES / (row_elems<T>(K) * long(sizeof(T))) / 8 * 8);
    auto run_panel = [&](long p) {  // W's rows p step.. for every row of x
        const long n_begin = p * step, n_end = std::min(N, n_begin + step);
        const T* panel_w = w + n_begin * row_elems<T>(K);
        if constexpr (std::is_same<T, uint16_t>::value) {
            if (!decode) {  // a prompt's bf16 weights, widened once per panel rather than once per tile
                thread_local std::vector<float> widened;
                widened.resize((n_end - n_begin) * K);
                for (long i = 0; i < (n_end - n_begin) * K; i++) widened[i] = bf16_to_float(panel_w[i]);
                for (long m0 = 0; m0 < M; m0 += tile)
                    panel_of(std::min(tile, M - m0), a, m0, widened.data(), scales, y, act_bf16, N, K, n_begin, n_end);
                return;
            }
        }
        for (long m0 = 0; m0 < M; m0 += tile)
            panel_of(std::min(tile, M - m0), a, m0, panel_w, scales, y, act_bf16, N, K, n_begin, n_end);
    };
    // Compute-bound, so each panel goes to the next free thread: a core slowed by other work holds none up. A decode
    // step's panels go four at a time, so that each thread still streams runs of consecutive weight rows.
    const long panels = (N + step - 1) / step, chunk = decode ? 4 : 1;
#pragma omp parallel for schedule(dynamic, chunk)
    for (long p = 0; p < panels; p++) run_panel(p);
}

// A layer's linear: weight (N, K) bf16 when scales is null; else int8 with scales (N,) when int4_group is 0, else
// int4 (Nibbles) with scales and zeros (N, K / int4_group, 2).
void linear(const void* x, const void* w, const void* scales, long int4_group, void* y, int act_bf16, long M, long N,
            long K) {
    if (scales == nullptr) return matmul(x, static_cast<const uint16_t*>(w), nullptr, y, act_bf16, M, N, K);
    if (int4_group == 0) return matmul(x, static_cast<const int8_t*>(w), scales, y, act_bf16, M, N, K);
    return matmul(x, static_cast<const Nibbles*>(w), scales, y, act_bf16, M, N, K, int4_group);
}

// ---- RMSNorm and attention ----------------------------------------------------------------------------------------

// y (M, K) = x / sqrt(mean(x^2) + eps) * weight, row by row, in the activation dtype A, rounded once.
template <typename A>
void rms_norm(const A* x, const A* weight, A* y, long M, long K, float eps) {
    const long k_end = K - K % LANES;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (long m = 0; m < M; m++) {
        const A* row = x + m * K;
        F squares = zeros();
        for (long k = 0; k < k_end; k += LANES) squares = mul_add(load(row + k), load(row + k), squares);
        float total = sum_of(squares);
        for (long k = k_end; k < K; k++) total += to_float(row[k]) * to_float(row[k]);
        const float inv_rms = 1.0f / std::sqrt(total / K + eps);
        for (long k = 0; k < k_end; k += LANES) store(y + m * K + k, mul(mul(load(row + k), splat(inv_rms)), load(weight + k)));
        for (long k = k_end; k < K; k++) assign(y[m * K + k], to_float(row[k]) * inv_rms * to_float(weight[k]));
    }
}

// e^x for x <= 0, within ~2 ulp: 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor series
// to r^6 (the next term is below 2^-23). ln 2 is split in two so that r is exact.
inline F exp_nonpositive(F x) {
    const F n = round_even(mul(x, splat(1.44269504f)));
    F r = mul_add(n, splat(-0.693145751953125f), x);
    r = mul_add(n, splat(-1.428606765330187e-6f), r);
    F p = splat(1.0f / 720);
    for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = mul_add(p, r, splat(c));
    return times_pow2(p, n);
}

// gated (B, hidden) = silu(gate) * up from w13's output (B, 2 hidden), each row's gates then its ups, in the
// activation dtype A with silu's output rounded to it, as F.silu's is: silu(g) = g / (1 + e^-g), or g e^g / (1 + e^g)
// for g < 0, so that exp only ever sees -|g|.
template <typename A>
void swiglu(const A* w13_out, A* gated, long B, long hidden) {
    thread_local std::vector<float> exps;  // e^-|g| for a row's gates
    exps.resize(hidden);
    const long k_end = hidden - hidden % LANES;
    for (long b = 0; b < B; b++) {
        const A* gates = w13_out + b * 2 * hidden;
        const A* ups = gates + hidden;
        for (long k = 0; k < k_end; k += LANES)
            store(exps.data() + k, exp_nonpositive(sub(zeros(), magnitude(load(gates + k)))));
        for (long k = k_end; k < hidden; k++) exps[k] = std::exp(-std::fabs(to_float(gates[k])));
        for (long k = 0; k < hidden; k++) {
            const float g = to_float(gates[k]), e = exps[k];
            A silu;
            assign(silu, (g >= 0 ? g : g * e) / (1.0f + e));
            assign(gated[b * hidden + k], to_float(silu) * to_float(ups[k]));
        }
    }
}

inline long round_up(long n, long multiple) { return (n + multiple - 1) / multiple * multiple; }

// attend() for a head size D that is a multiple of LANES. The cache is read LANES positions at a time into a block of
// fp32 rows that stays in L1 while each of the heads uses it, so heads sharing a KV head read it from L2 or memory
// once, not once each. Scores for a block's positions come out of one transpose (sum_lanes) and exp runs in vectors.
// Each head's scores take round_up(pos + 1, LANES) floats.
template <long D, typename A>
void attend_vectors(const float* queries, long heads, const A* keys, const A* values, long pos, float* scores,
                    float* out) {
    constexpr long CHUNKS = D / LANES;
    const long length = pos + 1, stride = round_up(length, LANES);
    alignas(64) float block[LANES * D];
    auto load_block = [&](const A* rows, long t0) {  // rows past pos repeat row pos
        for (long j = 0; j < LANES; j++)
            for (long c = 0; c < CHUNKS; c++) store(block + j * D + LANES * c, load(rows + std::min(t0 + j, pos) * D + LANES * c));
    };
    const F scale = splat(1.0f / std::sqrt(float(D)));
    for (long t0 = 0; t0 < length; t0 += LANES) {
        load_block(keys, t0);
        for (long h = 0; h < heads; h++) {
            F dots[LANES];
            for (long j = 0; j < LANES; j++) {
                dots[j] = mul(load(queries + h * D), load(block + j * D));
                for (long c = 1; c < CHUNKS; c++)
                    dots[j] = mul_add(load(queries + h * D + LANES * c), load(block + j * D + LANES * c), dots[j]);
            }
            store(scores + h * stride + t0, mul(sum_lanes(dots), scale));
        }
    }
    for (long h = 0; h < heads; h++) {  // scores -> e^(score - largest), out -> 0
        float* row = scores + h * stride;
        F best = load(row);  // the positions past pos repeat pos's score, so they leave the largest as it is
        for (long t0 = LANES; t0 < length; t0 += LANES) best = maximum(best, load(row + t0));
        const F largest = splat(max_of(best));
        for (long t0 = 0; t0 < length; t0 += LANES) store(row + t0, exp_nonpositive(sub(load(row + t0), largest)));
        std::fill(row + length, row + stride, 0.0f);  // and weigh nothing
        std::fill(out + h * D, out + (h + 1) * D, 0.0f);
    }
    for (long t0 = 0; t0 < length; t0 += LANES) {
        load_block(values, t0);
        const long n = std::min(LANES, length - t0);
        for (long h = 0; h < heads; h++) {
            F sums[CHUNKS];
            for (long c = 0; c < CHUNKS; c++) sums[c] = load(out + h * D + LANES * c);
            for (long j = 0; j < n; j++) {
                const F p = splat(scores[h * stride + t0 + j]);
                for (long c = 0; c < CHUNKS; c++) sums[c] = mul_add(p, load(block + j * D + LANES * c), sums[c]);
            }
            for (long c = 0; c < CHUNKS; c++) store(out + h * D + LANES * c, sums[c]);
        }
    }
    for (long h = 0; h < heads; h++) {  // divided by the softmax's total
        F total = zeros();
        for (long t0 = 0; t0 < length; t0 += LANES) total = add(total, load(scores + h * stride + t0));
        const F inverse = splat(1.0f / sum_of(total));
        for (long c = 0; c < CHUNKS; c++) store(out + h * D + LANES * c, mul(load(out + h * D + LANES * c), inverse));
    }
}

// Attention of `heads` query heads that share one KV head: queries (heads, D) fp32 over keys and values (pos + 1, D)
// in the activation dtype A, softmax of query . key / sqrt(D) -> out (heads, D) fp32; scores holds heads
// round_up(pos + 1, 16) floats.
template <typename A>
void attend(const float* queries, long heads, const A* keys, const A* values, long pos, long D, float* scores,
            float* out) {
    switch (D) {  // the head sizes of Llama 2 (128), TinyLlama (64) and smaller test models, all multiples of LANES
        case 16: return attend_vectors<16>(queries, heads, keys, values, pos, scores, out);
        case 32: return attend_vectors<32>(queries, heads, keys, values, pos, scores, out);
        case 64: return attend_vectors<64>(queries, heads, keys, values, pos, scores, out);
        case 128: return attend_vectors<128>(queries, heads, keys, values, pos, scores, out);
    }
    const float scale = 1.0f / std::sqrt(float(D));
    for (long h = 0; h < heads; h++) {  // head by head, with vector loops over D
        const float* query = queries + h * D;
        float* head_out = out + h * D;
        float best = -INFINITY;
        for (long t = 0; t <= pos; t++) {
            float dot = 0;
#pragma omp simd reduction(+ : dot)
            for (long d = 0; d < D; d++) dot += query[d] * to_float(keys[t * D + d]);
            scores[t] = dot * scale;
            best = std::max(best, scores[t]);
        }
        float total = 0;
        for (long t = 0; t <= pos; t++) total += scores[t] = std::exp(scores[t] - best);
        std::fill(head_out, head_out + D, 0.0f);
        for (long t = 0; t <= pos; t++) {
            const float p = scores[t] / total;
#pragma omp simd
            for (long d = 0; d < D; d++) head_out[d] += p * to_float(values[t * D + d]);
        }
    }
}

}  // namespace

extern "C" {

// One Transformer block's tensors as llama_decode_layers reads them; scales are null for bf16 weights. wqkv's rows
// are wq's, wk's, wv's; w13's are w1's (hidden of them), then w3's. Caches are (max_batch, n_kv_heads, max_seq_len,
// head_dim) in the activation dtype.
struct LayerTensors {
    const void* attention_norm;
    const void* wqkv;
    const void* wqkv_scales;
    const void* wo;
    const void* wo_scales;
    const void* ffn_norm;
    const void* w13;
    const void* w13_scales;
    const void* w2;
    const void* w2_scales;
    void* cache_k;
    void* cache_v;
};

// The tensors outside the blocks: the token embedding (vocab_size, dim); the rotary embedding's (cos, sin) for every
// position (max_seq_len, head_dim / 2, 2), fp32; the final norm's weight; the output linear (vocab_size, dim), of the
// blocks' linears' kind (scales null for bf16 weights). All but the rotations in the activation dtype.
struct ModelTensors {
    const LayerTensors* layers;
    const void* embedding;
    const float* rotations;
    const void* norm;
    const void* output;
    const void* output_scales;
};

// The sizes shared by every block of a model (on this process).
struct ModelShape {
    long vocab_size;
    long n_layers;
    long dim;
    long n_heads;
    long n_kv_heads;
    long head_dim;
    long hidden;
    long max_batch;
    long max_seq_len;
    long int4_group;
    float eps;
    int act_bf16;
};

// Whether the int4 kernel takes K input features in groups of `group`.
int llama_int4_fits(long K, long group) {
    return group >= 64 && QBLOCK % group == 0 && K % group == 0 && K % 64 == 0;
}

// The instruction set the kernels were built for: avx512, avx2, neon or portable.
const char* llama_isa() { return ISA; }

const char* llama_matmul_bf16(const void* x, const uint16_t* w, void* y, int act_bf16, long M, long N, long K) {
    if (M < 1) return "matmul: no rows";
    matmul<uint16_t>(x, w, nullptr, y, act_bf16, M, N, K);
    return nullptr;
}

const char* llama_matmul_int8(const void* x, const int8_t* w, const void* scales, void* y, int act_bf16, long M,
                              long N, long K) {
    if (M < 1) return "matmul: no rows";
    matmul<int8_t>(x, w, scales, y, act_bf16, M, N, K);
    return nullptr;
}

// int4 weights as Nibbles describes.
const char* llama_matmul_int4(const void* x, const uint8_t* w, const void* scales_zeros, void* y, int act_bf16,
                              long M, long N, long K, long group) {
    if (M < 1) return "matmul: no rows";
    if (!llama_int4_fits(K, group))
        return "matmul: int4 groups must be 64, 128 or 256 wide, over a multiple of 64 input features";
    matmul(x, reinterpret_cast<const Nibbles*>(w), scales_zeros, y, act_bf16, M, N, K, group);
    return nullptr;
}

// y (M, K) = x / sqrt(mean(x^2) + eps) * weight, row by row, rounded once.
void llama_rms_norm(const void* x, const void* weight, void* y, int act_bf16, long M, long K, float eps) {
    if (act_bf16)
        rms_norm(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(y), M, K, eps);
    else
        rms_norm(static_cast<const float*>(x), static_cast<const float*>(weight), static_cast<float*>(y), M, K, eps);
}

// One decode step of attention for B sequences, sequence b at position positions[b] in row rows[b] of the caches
// (row b when rows is null). qkv (B, (H + 2 H_kv) D) holds each sequence's query heads, then key heads, then value
// heads (wqkv's output); caches are (max_batch, H_kv, T_max, D). Rotates q and k by rotation (B, D / 2 pairs of cos,
// sin, fp32) as interleaved pairs, rounds them to the activation dtype as the model's tensors would be, writes k and
// v at the sequence's position, and attends each query head h over positions 0..position of KV head h / (H / H_kv),
// writing out (B, H D). Everything but the stored values is fp32.
const char* llama_decode_attention(const void* qkv, void* cache_k, void* cache_v, const float* rotation,
                                   const long* positions, const long* rows, void* out, int act_bf16, long B, long H,
                                   long H_kv, long D, long max_batch, long T_max) {
    for (long b = 0; b < B; b++) {  // the caches are written through these: check them first
        if (positions[b] < 0 || positions[b] >= T_max) return "decode attention: a position is outside the cache";
        if (rows != nullptr && (rows[b] < 0 || rows[b] >= max_batch)) return "decode attention: a cache row is out of range";
    }
    if (rows == nullptr && B > max_batch) return "decode attention: more sequences than cache rows";
    const long row = (H + 2 * H_kv) * D, group = H / H_kv;
    auto rotated = [&](long b, long offset, long d) {  // element d of the rotated head at qkv[offset..], rounded
        const float a = load_act(qkv, act_bf16, offset + (d & ~1L)), c2 = load_act(qkv, act_bf16, offset + (d | 1L));
        const float c = rotation[b * D + (d & ~1L)], s = rotation[b * D + (d | 1L)];
        const float v = (d & 1) ? a * s + c2 * c : a * c - c2 * s;
        return act_bf16 ? bf16_to_float(float_to_bf16(v)) : v;
    };
    auto cache_row = [&](long b) { return rows == nullptr ? b : rows[b]; };
    long longest = 0;
    for (long b = 0; b < B; b++) {
        longest = std::max(longest, positions[b] + 1);
        for (long h = 0; h < H_kv; h++) {
            const long slot = ((cache_row(b) * H_kv + h) * T_max + positions[b]) * D;
            for (long d = 0; d < D; d++) {
                store_act(cache_k, act_bf16, slot + d, rotated(b, b * row + (H + h) * D, d));
                store_act(cache_v, act_bf16, slot + d, load_act(qkv, act_bf16, b * row + (H + H_kv + h) * D + d));
            }
        }
    }
    // Work items: the query heads of one sequence's KV head, split in `parts` so that every thread has some.
    const long parts = std::min(group, std::max(1L, (max_threads() + B * H_kv - 1) / (B * H_kv)));
#pragma omp parallel if (B * H * longest * D >= (1 << 15))
    {
        std::vector<float> queries(group * D), scores(group * round_up(longest, 16)), acc(group * D);
#pragma omp for schedule(static)
        for (long item = 0; item < B * H_kv * parts; item++) {
            const long b = item / (H_kv * parts), kv = item / parts % H_kv, part = item % parts;
            const long h0 = kv * group + part * group / parts, heads = kv * group + (part + 1) * group / parts - h0;
            const long first = (cache_row(b) * H_kv + kv) * T_max * D;  // position 0 of this KV head
            for (long h = 0; h < heads; h++)
                for (long d = 0; d < D; d++) queries[h * D + d] = rotated(b, b * row + (h0 + h) * D, d);
            if (act_bf16)
                attend(queries.data(), heads, static_cast<const uint16_t*>(cache_k) + first,
                       static_cast<const uint16_t*>(cache_v) + first, positions[b], D, scores.data(), acc.data());
            else
                attend(queries.data(), heads, static_cast<const float*>(cache_k) + first,
                       static_cast<const float*>(cache_v) + first, positions[b], D, scores.data(), acc.data());
            for (long i = 0; i < heads * D; i++) store_act(out, act_bf16, (b * H + h0) * D + i, acc[i]);
        }
    }
    return nullptr;
}

// One decode step of a one-process model, as Transformer.forward computes it for tokens (B, 1): token b at position
// positions[b], in row rows[b] of the caches (row b when rows is null) -> fp32 logits (B, vocab_size). Between the
// embedding and the final norm and output linear, each block does h += wo(attention(rms_norm(h))), then
// h += w2(silu(w1 x) * w3 x) with x = rms_norm(h), rounding where PyTorch's ops would (each op's output in the
// activation dtype); int4 weights are in groups of shape->int4_group.
const char* llama_decode_step(const ModelTensors* model, const ModelShape* shape, const long* tokens,
                              const long* positions, const long* rows, long B, float* logits) {
    if (B < 1) return "decode step: no sequences";
    const ModelShape& m = *shape;
    for (long b = 0; b < B; b++) {  // before anything is read at them
        if (tokens[b] < 0 || tokens[b] >= m.vocab_size) return "decode step: a token id is outside the vocabulary";
        if (positions[b] < 0 || positions[b] >= m.max_seq_len) return "decode step: a position is outside the cache";
    }
    const bool act_bf16 = m.act_bf16;
    const long size = act_bf16 ? 2 : 4, H = m.n_heads, D = m.head_dim, qkv_features = (H + 2 * m.n_kv_heads) * D;
    std::vector<char> h(B * m.dim * size), normed(B * m.dim * size), qkv(B * qkv_features * size),
        attended(B * H * D * size), projected(B * m.dim * size), up(B * 2 * m.hidden * size),
        gated(B * m.hidden * size);
    std::vector<float> rotation(B * D);  // each sequence's row of the rotations
    for (long b = 0; b < B; b++) {
        std::memcpy(h.data() + b * m.dim * size, static_cast<const char*>(model->embedding) + tokens[b] * m.dim * size,
                    m.dim * size);
        std::memcpy(rotation.data() + b * D, model->rotations + positions[b] * D, D * sizeof(float));
    }
    auto add_to_h = [&]() {  // the residual connection
        for (long i = 0; i < B * m.dim; i++)
            store_act(h.data(), act_bf16, i, load_act(h.data(), act_bf16, i) + load_act(projected.data(), act_bf16, i));
    };
    for (long l = 0; l < m.n_layers; l++) {
        const LayerTensors& t = model->layers[l];
        llama_rms_norm(h.data(), t.attention_norm, normed.data(), act_bf16, B, m.dim, m.eps);
        linear(normed.data(), t.wqkv, t.wqkv_scales, m.int4_group, qkv.data(), act_bf16, B, qkv_features, m.dim);
        const char* error = llama_decode_attention(qkv.data(), t.cache_k, t.cache_v, rotation.data(), positions, rows,
                                                   attended.data(), act_bf16, B, H, m.n_kv_heads, D, m.max_batch,
                                                   m.max_seq_len);
        if (error != nullptr) return error;
        linear(attended.data(), t.wo, t.wo_scales, m.int4_group, projected.data(), act_bf16, B, m.dim, H * D);
        add_to_h();
        llama_rms_norm(h.data(), t.ffn_norm, normed.data(), act_bf16, B, m.dim, m.eps);
        linear(normed.data(), t.w13, t.w13_scales, m.int4_group, up.data(), act_bf16, B, 2 * m.hidden, m.dim);
        if (act_bf16)
            swiglu(reinterpret_cast<const uint16_t*>(up.data()), reinterpret_cast<uint16_t*>(gated.data()), B,
                   m.hidden);
        else
            swiglu(reinterpret_cast<const float*>(up.data()), reinterpret_cast<float*>(gated.data()), B, m.hidden);
        linear(gated.data(), t.w2, t.w2_scales, m.int4_group, projected.data(), act_bf16, B, m.dim, m.hidden);
        add_to_h();
    }
    llama_rms_norm(h.data(), model->norm, normed.data(), act_bf16, B, m.dim, m.eps);
    if (!act_bf16) {
        linear(normed.data(), model->output, model->output_scales, m.int4_group, logits, act_bf16, B, m.vocab_size,
               m.dim);
        return nullptr;
    }
    thread_local std::vector<uint16_t> out;  // kept: a batch's logits are too many to allocate and zero each step
    out.resize(B * m.vocab_size);
    linear(normed.data(), model->output, model->output_scales, m.int4_group, out.data(), act_bf16, B, m.vocab_size,
           m.dim);
    for (long i = 0; i < B * m.vocab_size; i++) logits[i] = bf16_to_float(out[i]);
    return nullptr;
}
}
