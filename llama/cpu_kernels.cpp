// CPU kernels for decoding, built and loaded by cpu_kernels.py.
//
// - Matmuls y (M, N) = x (M, K) @ W (N, K)^T for a few rows M (the batch of one decode step), with W in bf16, or in
//   int8 with one scale per output row. Each weight is read from memory once and widened to fp32 in registers, so
//   the loop runs at memory bandwidth; oneDNN instead emulates bf16 on CPUs without native bf16 math, and PyTorch's
//   int8 kernel streams well below bandwidth.
// - RMSNorm and a decode step's attention: a few microseconds of work each, which PyTorch spreads over a dozen ops whose
//   dispatch costs more than the arithmetic.
//
// Activations are bf16 or fp32 (`act_bf16`; every activation, norm weight and int8 scale of a call has that
// dtype); all sums are fp32.

#include <algorithm>
#include <cmath>
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

inline float load_act(const void* p, bool act_bf16, long i) {
    return act_bf16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_act(void* p, bool act_bf16, long i, float v) {
    if (act_bf16)
        static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
    else
        static_cast<float*>(p)[i] = v;
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
            if (scales != nullptr) sum *= load_act(scales, act_bf16, n);
            store_act(y, act_bf16, m * N + n, sum);
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
    for (long i = 0; i < M * K; i++) x[i] = load_act(x_in, act_bf16, i);
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

// One decode step of attention at position `pos` for B sequences. qkv (B, (H + 2 H_kv) D) holds each row's query
// heads, then key heads, then value heads (wqkv's output); caches are (B_max, H_kv, T_max, D). Rotates q and k by
// rotation (D / 2 pairs of cos, sin, fp32) as interleaved pairs, rounds them to the activation dtype as the model's
// tensors would be, writes k and v at `pos`, and attends each query head h over positions 0..pos of KV head
// h / (H / H_kv), writing out (B, H D). Everything but the stored values is fp32.
void llama_decode_attention(const void* qkv, void* cache_k, void* cache_v, const float* rotation, void* out,
                            int act_bf16, long B, long H, long H_kv, long D, long T_max, long pos) {
    const long row = (H + 2 * H_kv) * D, group = H / H_kv;
    const float scale = 1.0f / std::sqrt(float(D));
    auto rotated = [&](long offset, long d) {  // element d of the rotated head at qkv[offset..], rounded
        const float a = load_act(qkv, act_bf16, offset + (d & ~1L)), b = load_act(qkv, act_bf16, offset + (d | 1L));
        const float c = rotation[d & ~1L], s = rotation[d | 1L];
        const float v = (d & 1) ? a * s + b * c : a * c - b * s;
        return act_bf16 ? bf16_to_float(float_to_bf16(v)) : v;
    };
    for (long b = 0; b < B; b++)
        for (long h = 0; h < H_kv; h++) {
            const long slot = ((b * H_kv + h) * T_max + pos) * D;
            for (long d = 0; d < D; d++) {
                store_act(cache_k, act_bf16, slot + d, rotated(b * row + (H + h) * D, d));
                store_act(cache_v, act_bf16, slot + d, load_act(qkv, act_bf16, b * row + (H + H_kv + h) * D + d));
            }
        }
#pragma omp parallel for schedule(static) if (B * H * (pos + 1) * D >= (1 << 15))
    for (long bh = 0; bh < B * H; bh++) {
        const long b = bh / H, h = bh % H;
        const long first = (b * H_kv + h / group) * T_max * D;  // position 0 of this head's KV head
        std::vector<float> query(D), scores(pos + 1), acc(D, 0.0f);
        for (long d = 0; d < D; d++) query[d] = rotated(b * row + h * D, d);
        float best = -INFINITY;
        for (long t = 0; t <= pos; t++) {
            float dot = 0;
            for (long d = 0; d < D; d++) dot += query[d] * load_act(cache_k, act_bf16, first + t * D + d);
            scores[t] = dot * scale;
            best = std::max(best, scores[t]);
        }
        float total = 0;
        for (long t = 0; t <= pos; t++) total += scores[t] = std::exp(scores[t] - best);
        for (long t = 0; t <= pos; t++) {
            const float p = scores[t] / total;
            for (long d = 0; d < D; d++) acc[d] += p * load_act(cache_v, act_bf16, first + t * D + d);
        }
        for (long d = 0; d < D; d++) store_act(out, act_bf16, bh * D + d, acc[d]);
    }
}
}
