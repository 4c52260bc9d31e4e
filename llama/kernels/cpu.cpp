// CPU kernels for decoding, built and loaded by cpu.py; the declarations after `extern "C"` are the only ones: cpu.py
// reads them to declare each entry point and struct to ctypes.
//
// - Matmuls y (M, N) = x (M, K) @ W (N, K)^T for a few rows M (the batch of one decode step), with W in bf16, in
//   int8 with one scale per output row, or in int4 with a scale and a zero per group of a row (see Nibbles; int4
//   shares the int8 path's int16 activations). Each weight is read from memory once and widened in registers, so
//   the loop runs at memory bandwidth; oneDNN instead emulates bf16 on CPUs without native bf16 math, and PyTorch's
//   int8 kernel streams well below bandwidth. With int8 weights (on AVX-512) the activations are rounded to int16,
//   with one fp32 scale per QBLOCK of each row, and multiplied by the weights as exact integer dot products
//   (vpdpwssd): a third of the instructions of widening every weight to fp32. The rounding is at most 2^-16 of the
//   block's largest activation, far below the int8 weights' own (2^-8 of the row's largest weight).
// - RMSNorm and a decode step's attention, which PyTorch spreads over a dozen ops whose dispatch costs more than the
//   arithmetic. Attention runs the query heads that share a KV head together, so each reads the cache once; on
//   AVX-512 it scores 16 positions per pass and takes exp in vectors. Every sequence has its own position and its
//   own row of the caches.
// - A whole decode step through all Transformer blocks in one call, on one process (the CPU decode engine): the
//   Python around each of these ops costs as much as the ops themselves for small models.
//
// Activations are bf16 or fp32 (`act_bf16`; every activation, norm weight and int8 or int4 scale of a call has that
// dtype); all sums are fp32 (or exact int32 within a QBLOCK or an int4 group). Entry points that can fail return
// an error message, or null.

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
#endif

namespace {

constexpr long MAX_ROWS = 8;
constexpr long QBLOCK = 256;  // activations per int16 scale: each int32 lane sums 16 products, far from overflow

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

inline float widen(uint16_t w) { return bf16_to_float(w); }
inline float widen(int8_t w) { return float(w); }

// int4 weights: each row's K codes (0..15) two to a byte, in runs of 64 codes stored in 32 bytes, byte i holding
// code i of the run in its low nibble and code 32 + i in its high nibble (so that one 32-byte load widens to two
// vectors of consecutive codes). Each `group` of a row has a scale and a zero: weight = (code - 8) * scale + zero.
struct Nibbles {
    uint8_t pair;
};

// A matmul's activations, converted once per call: fp32, and for int8 and int4 weights on AVX-512 also int16 with
// one scale per QBLOCK elements of each row (x[m, k] ~= q[m, k] * scale[m, k / QBLOCK]); for int4 weights, the sums
// of each `group` of a row's elements (of x, and of q where there is q).
struct Activations {
    std::vector<float> x;
    std::vector<int16_t> q;
    std::vector<float> scale;
    long blocks = 0;
    long group = 0;
    std::vector<float> sums;
    std::vector<int32_t> q_sums;
};

#ifdef LLAMA_AVX512
constexpr bool INT16_ACTIVATIONS = true;

inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// The next block's rows, one line each time this block's rows cross a line: short rows (K < ~2048) end before the
// hardware prefetcher has ramped up, so without this each block starts with cache misses.
template <long R, typename T>
inline void prefetch_next(const T* w, long K, long k, long n0) {
    if (k % (64 / long(sizeof(T))) == 0)
        for (long r = 0; r < R; r++) _mm_prefetch((const char*)(w + (n0 + R + r) * K + k), _MM_HINT_T0);
}

// Dot products of M rows of x with R consecutive bf16 rows of W, n0.., over k in [0, k_end), k_end a multiple of 16.
template <long M, long R>
inline void dot_block(const Activations& a, const uint16_t* w, const void*, bool, long K, long k_end, long n0,
                      float out[M][R]) {
    __m512 acc[M][R];
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    for (long k = 0; k < k_end; k += 16) {
        prefetch_next<R>(w, K, k, n0);
        __m512 wv[R];
        for (long r = 0; r < R; r++) wv[r] = load16(w + (n0 + r) * K + k);
        for (long m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(a.x.data() + m * K + k);
            for (long r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

inline __m512i dot_pairs(__m512i acc, __m512i x, __m512i w) {  // acc + x[2i] w[2i] + x[2i+1] w[2i+1], in int32
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, x, w);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}

// The same for int8 rows against the int16 activations, k_end a multiple of 32: exact int32 sums per QBLOCK, then
// scaled into fp32.
template <long M, long R>
inline void dot_block(const Activations& a, const int8_t* w, const void*, bool, long K, long k_end, long n0,
                      float out[M][R]) {
    __m512 acc[M][R];
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    for (long k0 = 0; k0 < k_end; k0 += QBLOCK) {
        __m512i dots[M][R];
        for (long m = 0; m < M; m++)
            for (long r = 0; r < R; r++) dots[m][r] = _mm512_setzero_si512();
        for (long k = k0; k < std::min(k0 + QBLOCK, k_end); k += 32) {
            prefetch_next<R>(w, K, k, n0);
            __m512i wv[R];
            for (long r = 0; r < R; r++)
                wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + (n0 + r) * K + k)));
            for (long m = 0; m < M; m++) {
                __m512i xv = _mm512_loadu_si512(a.q.data() + m * K + k);
                for (long r = 0; r < R; r++) dots[m][r] = dot_pairs(dots[m][r], xv, wv[r]);
            }
        }
        for (long m = 0; m < M; m++) {
            const __m512 scale = _mm512_set1_ps(a.scale[m * a.blocks + k0 / QBLOCK]);
            for (long r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[m][r]), scale, acc[m][r]);
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

// The same for int4 rows (K a multiple of 64 and of the group, the group of QBLOCK): exact int32 sums per group of
// q (code - 8), as q code less 8 q, each scaled by its scale and the activations', plus the zeros' share.
template <long M, long R>
inline void dot_block(const Activations& a, const Nibbles* w, const void* scales_zeros, bool act_bf16, long K, long,
                      long n0, float out[M][R]) {
    const long groups = K / a.group;
    __m512 acc[M][R];
    float zeros[M][R] = {};
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        __m512i dots[M][R];
        for (long m = 0; m < M; m++)
            for (long r = 0; r < R; r++) dots[m][r] = _mm512_setzero_si512();
        for (long k = g * a.group; k < (g + 1) * a.group; k += 64) {
            prefetch_next<R>(w, K / 2, k / 2, n0);
            for (long r = 0; r < R; r++) {
                const __m512i pairs = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + (n0 + r) * K / 2 + k / 2)));
                const __m512i low = _mm512_and_si512(pairs, _mm512_set1_epi16(15)), high = _mm512_srli_epi16(pairs, 4);
                for (long m = 0; m < M; m++) {
                    const int16_t* x = a.q.data() + m * K + k;
                    dots[m][r] = dot_pairs(dot_pairs(dots[m][r], _mm512_loadu_si512(x), low), _mm512_loadu_si512(x + 32), high);
                }
            }
        }
        for (long r = 0; r < R; r++) {  // the scaled dot in vector lanes, the zeros' share in a scalar
            const long at = 2 * ((n0 + r) * groups + g);
            const float scale = load_act(scales_zeros, act_bf16, at), zero = load_act(scales_zeros, act_bf16, at + 1);
            for (long m = 0; m < M; m++) {
                const long mg = m * groups + g;
                const __m512i eight_q = _mm512_maskz_set1_epi32(1, 8 * a.q_sums[mg]);  // in lane 0
                const float x_scale = a.scale[m * a.blocks + g * a.group / QBLOCK];
                acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots[m][r], eight_q)),
                                            _mm512_set1_ps(scale * x_scale), acc[m][r]);
                zeros[m][r] += zero * a.sums[mg];
            }
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]) + zeros[m][r];
}

template <typename T>
constexpr long vector_width() {
    return std::is_same<T, Nibbles>::value ? 64 : std::is_same<T, int8_t>::value ? 32 : 16;
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
            __m512 most = _mm512_setzero_ps();
            for (long k = 0; k < len; k += 16) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
            const float largest = _mm512_reduce_max_ps(most);
            a.scale[m * a.blocks + b] = largest / 32767.0f;
            const __m512 inverse = _mm512_set1_ps(largest > 0 ? 32767.0f / largest : 0.0f);
            for (long k = 0; k < len; k += 16)  // to nearest, ties to even
                _mm256_storeu_si256((__m256i*)(q + k),
                                    _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inverse))));
        }
}
#else
constexpr bool INT16_ACTIVATIONS = false;

// Portable fallback: the compiler vectorizes the inner loop for whatever -march it was given.
template <long M, long R, typename T>
inline void dot_block(const Activations& a, const T* w, const void*, bool, long K, long k_end, long n0,
                      float out[M][R]) {
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) {
            const T* row = w + (n0 + r) * K;
            const float* xm = a.x.data() + m * K;
            float sum = 0;
#pragma omp simd reduction(+ : sum)
            for (long k = 0; k < k_end; k++) sum += xm[k] * widen(row[k]);
            out[m][r] = sum;
        }
}

inline float centered_int4(const Nibbles* row, long k) {  // code k of a row, minus 8
    const uint8_t pair = row[k / 64 * 32 + k % 32].pair;
    return float(k % 64 < 32 ? pair & 15 : pair >> 4) - 8;
}

// int4 rows: each group's sum of x times the centered codes (code - 8), scaled, plus the zeros' share (zero times x's
// group sum); centering keeps the two from cancelling.
template <long M, long R>
inline void dot_block(const Activations& a, const Nibbles* w, const void* scales_zeros, bool act_bf16, long K, long,
                      long n0, float out[M][R]) {
    const long groups = K / a.group;
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) {
            const Nibbles* row = w + (n0 + r) * K / 2;
            float sum = 0;
            for (long g = 0; g < groups; g++) {
                float dot = 0;
                for (long k = g * a.group; k < (g + 1) * a.group; k++) dot += a.x[m * K + k] * centered_int4(row, k);
                const long at = 2 * ((n0 + r) * groups + g);
                sum += dot * load_act(scales_zeros, act_bf16, at) + load_act(scales_zeros, act_bf16, at + 1) * a.sums[m * groups + g];
            }
            out[m][r] = sum;
        }
}

template <typename T>
constexpr long vector_width() { return 1; }

inline void round_to_int16(Activations&, long, long, long) {}  // portable builds keep fp32 activations
#endif

// Whether int8 and int4 weights meet int16 activations (else every weight is widened to fp32).
template <typename T>
constexpr bool int16_activations() {
    return INT16_ACTIVATIONS && (std::is_same<T, int8_t>::value || std::is_same<T, Nibbles>::value);
}

// Rows n0..n0+R of y: the vector part of each dot product, the K % vector_width tail (in fp32), the scale, the store.
// (int4 rows have no tail, and their scales are applied group by group.)
template <long M, long R, typename T>
inline void rows(const Activations& a, const T* w, const void* scales, void* y, bool act_bf16, long N, long K,
                 long n0) {
    const long k_end = K - K % vector_width<T>();
    float out[M][R];
    dot_block<M, R>(a, w, scales, act_bf16, K, k_end, n0, out);
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) {
            const long n = n0 + r;
            float sum = out[m][r];
            if constexpr (!std::is_same<T, Nibbles>::value) {
                for (long k = k_end; k < K; k++) sum += a.x[m * K + k] * widen(w[n * K + k]);
                if (scales != nullptr) sum *= load_act(scales, act_bf16, n);
            }
            store_act(y, act_bf16, m * N + n, sum);
        }
}

// Output rows per block: enough to give the hardware prefetcher R streams, few enough that the M * R accumulators
// (twice that with int16 activations) fit in the 32 vector registers.
template <long M, typename T>
constexpr long block_rows() {
    if (int16_activations<T>()) return M == 1 ? 8 : M <= 3 ? 4 : M <= 6 ? 2 : 1;
    return M == 1 ? 8 : M <= 4 ? 4 : 2;
}

// Blocks of rows are shared out among the OpenMP threads (PyTorch's own pool: same libgomp).
template <long M, typename T>
void matmul_rows(const Activations& a, const T* w, const void* scales, void* y, bool act_bf16, long N, long K) {
    constexpr long R = block_rows<M, T>();
    const long blocks = N / R;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++) rows<M, R, T>(a, w, scales, y, act_bf16, N, K, b * R);
    for (long n = blocks * R; n < N; n++) rows<M, 1, T>(a, w, scales, y, act_bf16, N, K, n);
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
    if (std::is_same<T, Nibbles>::value) {
        a.group = group;
        a.sums.assign(M * K / group, 0.0f);
        a.q_sums.assign(int16_activations<T>() ? M * K / group : 0, 0);
        for (long g = 0; g < M * K / group; g++) {  // rows are whole groups
            for (long k = g * group; k < (g + 1) * group; k++) a.sums[g] += a.x[k];
            if (int16_activations<T>())
                for (long k = g * group; k < (g + 1) * group; k++) a.q_sums[g] += a.q[k];
        }
    }
}

// y (M, N) = x (M, K) W^T for the weight type T (int4: with K a multiple of 64 and of `group`, a divisor of QBLOCK),
// M in 1..MAX_ROWS.
template <typename T>
void matmul(const void* x, const T* w, const void* scales, void* y, int act_bf16, long M, long N, long K,
           long group = 0) {
    thread_local Activations a;  // kept between calls: allocating and zeroing it each time costs as much as filling it
    convert_activations<T>(x, act_bf16, M, K, group, a);
    switch (M) {
        case 1: matmul_rows<1, T>(a, w, scales, y, act_bf16, N, K); break;
        case 2: matmul_rows<2, T>(a, w, scales, y, act_bf16, N, K); break;
        case 3: matmul_rows<3, T>(a, w, scales, y, act_bf16, N, K); break;
        case 4: matmul_rows<4, T>(a, w, scales, y, act_bf16, N, K); break;
        case 5: matmul_rows<5, T>(a, w, scales, y, act_bf16, N, K); break;
        case 6: matmul_rows<6, T>(a, w, scales, y, act_bf16, N, K); break;
        case 7: matmul_rows<7, T>(a, w, scales, y, act_bf16, N, K); break;
        default: matmul_rows<8, T>(a, w, scales, y, act_bf16, N, K); break;
    }
}

// A layer's linear: weight (N, K) bf16 when scales is null; else int8 with scales (N,) when int4_group is 0, else
// int4 (Nibbles) with scales and zeros (N, K / int4_group, 2).
void linear(const void* x, const void* w, const void* scales, long int4_group, void* y, int act_bf16, long M, long N,
            long K) {
    if (scales == nullptr) return matmul(x, static_cast<const uint16_t*>(w), nullptr, y, act_bf16, M, N, K);
    if (int4_group == 0) return matmul(x, static_cast<const int8_t*>(w), scales, y, act_bf16, M, N, K);
    return matmul(x, static_cast<const Nibbles*>(w), scales, y, act_bf16, M, N, K, int4_group);
}

inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(float v) { return v; }

#ifdef LLAMA_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// e^x for x <= 0, within ~2 ulp: 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor series
// to r^6 (the next term is below 2^-23). ln 2 is split in two so that r is exact; scalef flushes to 0 below 2^-149.
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// Lane j of the result is the sum of v[j]'s lanes: halves of pairs of vectors are added until each 128-bit lane
// holds four sums, 46 instructions where 16 separate reductions take ~130.
inline __m512 sum_lanes16(const __m512 v[16]) {
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

// attend() for D = 16 CHUNKS. The cache is read 16 positions at a time into a block of fp32 rows that stays in L1
// while each of the heads uses it, so heads sharing a KV head read it from L2 or memory once, not once each. Scores
// for a block's 16 positions come out of one transpose (sum_lanes16) and exp runs in vectors.
template <long CHUNKS, typename A>
void attend_vectors(const float* queries, long heads, const A* keys, const A* values, long pos, float* scores,
                    float* out) {
    constexpr long D = 16 * CHUNKS;
    const long length = pos + 1;
    alignas(64) float block[16 * D];
    auto load_block = [&](const A* rows, long t0) {  // rows past pos repeat row pos; their results are masked off
        for (long j = 0; j < 16; j++)
            for (long c = 0; c < CHUNKS; c++)
                _mm512_store_ps(block + j * D + 16 * c, load16(rows + std::min(t0 + j, pos) * D + 16 * c));
    };
    auto valid = [&](long t0) { return __mmask16((1u << std::min(16L, length - t0)) - 1); };
    const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(float(D)));
    for (long t0 = 0; t0 < length; t0 += 16) {
        load_block(keys, t0);
        for (long h = 0; h < heads; h++) {
            __m512 dots[16];
            for (long j = 0; j < 16; j++) {
                dots[j] = _mm512_mul_ps(_mm512_loadu_ps(queries + h * D), _mm512_load_ps(block + j * D));
                for (long c = 1; c < CHUNKS; c++)
                    dots[j] = _mm512_fmadd_ps(_mm512_loadu_ps(queries + h * D + 16 * c), _mm512_load_ps(block + j * D + 16 * c), dots[j]);
            }
            _mm512_mask_storeu_ps(scores + h * length + t0, valid(t0), _mm512_mul_ps(sum_lanes16(dots), scale));
        }
    }
    for (long h = 0; h < heads; h++) {  // scores -> e^(score - largest), out -> 0
        float* row = scores + h * length;
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (long t0 = 0; t0 < length; t0 += 16) best = _mm512_max_ps(best, _mm512_mask_loadu_ps(best, valid(t0), row + t0));
        const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        for (long t0 = 0; t0 < length; t0 += 16)
            _mm512_mask_storeu_ps(row + t0, valid(t0), exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid(t0), row + t0), largest)));
        std::fill(out + h * D, out + (h + 1) * D, 0.0f);
    }
    for (long t0 = 0; t0 < length; t0 += 16) {
        load_block(values, t0);
        const long n = std::min(16L, length - t0);
        for (long h = 0; h < heads; h++) {
            __m512 sums[CHUNKS];
            for (long c = 0; c < CHUNKS; c++) sums[c] = _mm512_loadu_ps(out + h * D + 16 * c);
            for (long j = 0; j < n; j++) {
                const __m512 p = _mm512_set1_ps(scores[h * length + t0 + j]);
                for (long c = 0; c < CHUNKS; c++) sums[c] = _mm512_fmadd_ps(p, _mm512_load_ps(block + j * D + 16 * c), sums[c]);
            }
            for (long c = 0; c < CHUNKS; c++) _mm512_storeu_ps(out + h * D + 16 * c, sums[c]);
        }
    }
    for (long h = 0; h < heads; h++) {  // divided by the softmax's total
        __m512 total = _mm512_setzero_ps();
        for (long t0 = 0; t0 < length; t0 += 16) total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(valid(t0), scores + h * length + t0));
        const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        for (long c = 0; c < CHUNKS; c++) _mm512_storeu_ps(out + h * D + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(out + h * D + 16 * c), inverse));
    }
}
#endif

// Attention of `heads` query heads that share one KV head: queries (heads, D) fp32 over keys and values (pos + 1, D)
// in the activation dtype A, softmax of query . key / sqrt(D) -> out (heads, D) fp32; scores holds heads (pos + 1)
// floats.
template <typename A>
void attend(const float* queries, long heads, const A* keys, const A* values, long pos, long D, float* scores,
            float* out) {
#ifdef LLAMA_AVX512
    switch (D) {  // the head sizes of Llama 2 (128), TinyLlama (64) and smaller test models
        case 16: return attend_vectors<1>(queries, heads, keys, values, pos, scores, out);
        case 32: return attend_vectors<2>(queries, heads, keys, values, pos, scores, out);
        case 64: return attend_vectors<4>(queries, heads, keys, values, pos, scores, out);
        case 128: return attend_vectors<8>(queries, heads, keys, values, pos, scores, out);
    }
#endif
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

// The sizes shared by every block of a model (on this process).
struct ModelShape {
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

long llama_max_rows() { return MAX_ROWS; }

// Whether the int4 kernel takes K input features in groups of `group`.
int llama_int4_fits(long K, long group) {
    return group >= 64 && QBLOCK % group == 0 && K % group == 0 && K % 64 == 0;
}

int llama_vectorized() { return vector_width<uint16_t>() > 1; }

const char* llama_matmul_bf16(const void* x, const uint16_t* w, void* y, int act_bf16, long M, long N, long K) {
    if (M < 1 || M > MAX_ROWS) return "matmul: the kernel takes 1 to 8 rows";
    matmul<uint16_t>(x, w, nullptr, y, act_bf16, M, N, K);
    return nullptr;
}

const char* llama_matmul_int8(const void* x, const int8_t* w, const void* scales, void* y, int act_bf16, long M,
                              long N, long K) {
    if (M < 1 || M > MAX_ROWS) return "matmul: the kernel takes 1 to 8 rows";
    matmul<int8_t>(x, w, scales, y, act_bf16, M, N, K);
    return nullptr;
}

// int4 weights as Nibbles describes.
const char* llama_matmul_int4(const void* x, const uint8_t* w, const void* scales_zeros, void* y, int act_bf16,
                              long M, long N, long K, long group) {
    if (M < 1 || M > MAX_ROWS) return "matmul: the kernel takes 1 to 8 rows";
    if (!llama_int4_fits(K, group))
        return "matmul: int4 groups must be 64, 128 or 256 wide, over a multiple of 64 input features";
    matmul(x, reinterpret_cast<const Nibbles*>(w), scales_zeros, y, act_bf16, M, N, K, group);
    return nullptr;
}

// y (M, K) = x / sqrt(mean(x^2) + eps) * weight, row by row, rounded once.
void llama_rms_norm(const void* x, const void* weight, void* y, int act_bf16, long M, long K, float eps) {
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (long m = 0; m < M; m++) {
        float squares = 0;
        for (long k = 0; k < K; k++) {
            const float v = load_act(x, act_bf16, m * K + k);
            squares += v * v;
        }
        const float inv_rms = 1.0f / std::sqrt(squares / K + eps);
        for (long k = 0; k < K; k++)
            store_act(y, act_bf16, m * K + k, load_act(x, act_bf16, m * K + k) * inv_rms * load_act(weight, act_bf16, k));
    }
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
        std::vector<float> queries(group * D), scores(group * longest), acc(group * D);
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

// One decode step through all of a model's blocks on one process, h (B, dim) updated in place: for each block,
// h += wo(attention(rms_norm(h))), then h += w2(silu(w1 x) * w3 x) with x = rms_norm(h), rounding where PyTorch's
// ops would (each op's output in the activation dtype). Sequences, positions, rows and rotation are as
// llama_decode_attention takes them; int4 weights are in groups of shape->int4_group.
const char* llama_decode_layers(const LayerTensors* layers, const ModelShape* shape, void* h, const float* rotation,
                                const long* positions, const long* rows, long B) {
    if (B < 1 || B > MAX_ROWS) return "decode step: the kernel takes 1 to 8 sequences";
    const ModelShape& m = *shape;
    const bool act_bf16 = m.act_bf16;
    const long size = act_bf16 ? 2 : 4, H = m.n_heads, D = m.head_dim, qkv_features = (H + 2 * m.n_kv_heads) * D;
    std::vector<char> normed(B * m.dim * size), qkv(B * qkv_features * size), attended(B * H * D * size),
        projected(B * m.dim * size), up(B * 2 * m.hidden * size), gated(B * m.hidden * size);
    auto add_to_h = [&]() {  // the residual connection
        for (long i = 0; i < B * m.dim; i++)
            store_act(h, act_bf16, i, load_act(h, act_bf16, i) + load_act(projected.data(), act_bf16, i));
    };
    auto round_act = [&](float v) { return act_bf16 ? bf16_to_float(float_to_bf16(v)) : v; };
    for (long l = 0; l < m.n_layers; l++) {
        const LayerTensors& t = layers[l];
        llama_rms_norm(h, t.attention_norm, normed.data(), act_bf16, B, m.dim, m.eps);
        linear(normed.data(), t.wqkv, t.wqkv_scales, m.int4_group, qkv.data(), act_bf16, B, qkv_features, m.dim);
        const char* error = llama_decode_attention(qkv.data(), t.cache_k, t.cache_v, rotation, positions, rows,
                                                   attended.data(), act_bf16, B, H, m.n_kv_heads, D, m.max_batch,
                                                   m.max_seq_len);
        if (error != nullptr) return error;
        linear(attended.data(), t.wo, t.wo_scales, m.int4_group, projected.data(), act_bf16, B, m.dim, H * D);
        add_to_h();
        llama_rms_norm(h, t.ffn_norm, normed.data(), act_bf16, B, m.dim, m.eps);
        linear(normed.data(), t.w13, t.w13_scales, m.int4_group, up.data(), act_bf16, B, 2 * m.hidden, m.dim);
        for (long b = 0; b < B; b++)
            for (long i = 0; i < m.hidden; i++) {
                const float gate = load_act(up.data(), act_bf16, b * 2 * m.hidden + i);
                const float silu = round_act(gate / (1.0f + std::exp(-gate)));
                store_act(gated.data(), act_bf16, b * m.hidden + i,
                          silu * load_act(up.data(), act_bf16, b * 2 * m.hidden + m.hidden + i));
            }
        linear(gated.data(), t.w2, t.w2_scales, m.int4_group, projected.data(), act_bf16, B, m.dim, m.hidden);
        add_to_h();
    }
    return nullptr;
}
}
