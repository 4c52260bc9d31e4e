// Decoding matmuls for the CPU: y (M, N) = x (M, K) @ W (N, K)^T for a few rows M (the batch of one decode step),
// with W in bf16, or in int8 with one scale per output row. Each weight is read from memory once and widened to
// fp32 in registers, so the loop runs at memory bandwidth; oneDNN instead emulates bf16 on CPUs without native bf16
// math, and PyTorch's int8 kernel streams well below bandwidth. Built and loaded by cpu_kernels.py.
//
// x and y are bf16 or fp32 (both the same, `act_bf16`); int8 scales have x's dtype. Sums are fp32.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LLAMA_AVX512 1
#endif

namespace {

constexpr long MAX_ROWS = 8;

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

inline float widen(uint16_t w) { return bf16_to_float(w); }
inline float widen(int8_t w) { return float(w); }

#ifdef LLAMA_AVX512
inline __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// Dot products of M rows of x with R consecutive rows of W, n0.., over k in [0, k_end), k_end a multiple of 16.
template <long M, long R, typename T>
inline void dot_block(const float* x, const T* w, long K, long k_end, long n0, float out[M][R]) {
    __m512 acc[M][R];
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    constexpr long LINE = 64 / sizeof(T);  // weights per cache line
    for (long k = 0; k < k_end; k += 16) {
        __m512 wv[R];
        // The next block's rows, one line each time this block's rows cross a line: short rows (K < ~2048) end
        // before the hardware prefetcher has ramped up, so without this each block starts with cache misses.
        if (k % LINE == 0)
            for (long r = 0; r < R; r++) _mm_prefetch((const char*)(w + (n0 + R + r) * K + k), _MM_HINT_T0);
        for (long r = 0; r < R; r++) wv[r] = load16(w + (n0 + r) * K + k);
        for (long m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * K + k);
            for (long r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}
constexpr long VECTOR = 16;
#else
// Portable fallback: the compiler vectorizes the inner loop for whatever -march it was given.
template <long M, long R, typename T>
inline void dot_block(const float* x, const T* w, long K, long k_end, long n0, float out[M][R]) {
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) {
            const T* row = w + (n0 + r) * K;
            const float* xm = x + m * K;
            float sum = 0;
#pragma omp simd reduction(+ : sum)
            for (long k = 0; k < k_end; k++) sum += xm[k] * widen(row[k]);
            out[m][r] = sum;
        }
}
constexpr long VECTOR = 1;
#endif

template <typename T>
inline float scale_of(const void* scales, bool act_bf16, long n) {
    if (scales == nullptr) return 1.0f;
    return act_bf16 ? bf16_to_float(static_cast<const uint16_t*>(scales)[n]) : static_cast<const float*>(scales)[n];
}

// Rows n0..n0+R of y: the vector part of each dot product, the K % VECTOR tail, the scale, the store.
template <long M, long R, typename T>
inline void rows(const float* x, const T* w, const void* scales, void* y, bool act_bf16, long N, long K, long n0) {
    const long k_end = K - K % VECTOR;
    float out[M][R];
    dot_block<M, R, T>(x, w, K, k_end, n0, out);
    for (long m = 0; m < M; m++)
        for (long r = 0; r < R; r++) {
            const long n = n0 + r;
            float sum = out[m][r];
            for (long k = k_end; k < K; k++) sum += x[m * K + k] * widen(w[n * K + k]);
            sum *= scale_of<T>(scales, act_bf16, n);
            if (act_bf16)
                static_cast<uint16_t*>(y)[m * N + n] = float_to_bf16(sum);
            else
                static_cast<float*>(y)[m * N + n] = sum;
        }
}

// Blocks of R output rows are shared out among the OpenMP threads (PyTorch's own pool: same libgomp); enough
// rows per block to give the hardware prefetcher R streams, few enough that M * R accumulators fit in registers.
template <long M, typename T>
void matmul_rows(const float* x, const T* w, const void* scales, void* y, bool act_bf16, long N, long K) {
    constexpr long R = M == 1 ? 8 : M <= 4 ? 4 : 2;
    const long blocks = N / R;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++) rows<M, R, T>(x, w, scales, y, act_bf16, N, K, b * R);
    for (long n = blocks * R; n < N; n++) rows<M, 1, T>(x, w, scales, y, act_bf16, N, K, n);
}

template <typename T>
int matmul(const void* x_in, const T* w, const void* scales, void* y, int act_bf16, long M, long N, long K) {
    if (M < 1 || M > MAX_ROWS) return 1;
    std::vector<float> x(M * K);  // the activations in fp32, read once per weight row
    for (long i = 0; i < M * K; i++)
        x[i] = act_bf16 ? bf16_to_float(static_cast<const uint16_t*>(x_in)[i]) : static_cast<const float*>(x_in)[i];
    switch (M) {
        case 1: matmul_rows<1, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        case 2: matmul_rows<2, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        case 3: matmul_rows<3, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        case 4: matmul_rows<4, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        case 5: matmul_rows<5, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        case 6: matmul_rows<6, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        case 7: matmul_rows<7, T>(x.data(), w, scales, y, act_bf16, N, K); break;
        default: matmul_rows<8, T>(x.data(), w, scales, y, act_bf16, N, K); break;
    }
    return 0;
}

}  // namespace

extern "C" {

long llama_max_rows() { return MAX_ROWS; }

int llama_vectorized() { return VECTOR > 1; }

// Returns 0, or 1 when M is outside 1..llama_max_rows().
int llama_matmul_bf16(const void* x, const uint16_t* w, void* y, int act_bf16, long M, long N, long K) {
    return matmul<uint16_t>(x, w, nullptr, y, act_bf16, M, N, K);
}

int llama_matmul_int8(const void* x, const int8_t* w, const void* scales, void* y, int act_bf16, long M, long N,
                      long K) {
    return matmul<int8_t>(x, w, scales, y, act_bf16, M, N, K);
}
}
