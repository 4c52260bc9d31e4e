// A test driver for llama/kernels/cpu.cpp that needs no Python: each entry point against a scalar reference in
// double, for builds whose Python cannot run here (the NEON build, cross-compiled and run under qemu-aarch64 by
// tests/test_kernels.py). Prints one line per failure and then "<isa>: N checks, M failed"; exits 1 on a failure.

#include "../llama/kernels/cpu.cpp"

#include <cstdio>
#include <random>

namespace {

std::mt19937 rng(0);
int checks = 0, failures = 0;

std::vector<float> randn(long n) {
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (float& x : v) x = normal(rng);
    return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = float_to_bf16(v[i]);
    return out;
}

std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = bf16_to_float(v[i]);
    return out;
}

// got within tol of expected, relative to expected's largest magnitude.
void expect_close(const char* what, long case_id, const std::vector<double>& expected, const std::vector<float>& got,
                  double tol) {
    double largest = 0, worst = 0;
    for (size_t i = 0; i < expected.size(); i++) {
        largest = std::max(largest, std::fabs(expected[i]));
        worst = std::max(worst, std::fabs(expected[i] - got[i]));
    }
    checks++;
    if (!(worst <= tol * largest + 1e-30)) {
        failures++;
        std::printf("FAIL %s (case %ld): max error %.3g, %.3g of the largest value (allowed %.3g)\n", what, case_id,
                    worst, worst / largest, tol);
    }
}

// x as the int8 and int4 kernels multiply it: the first K - K % 32 columns of each row rounded to int16 steps of
// 1/32767 of the largest magnitude in each block of QBLOCK columns.
std::vector<double> as_int16_rounded(const std::vector<float>& x, long M, long K) {
    std::vector<double> out(x.begin(), x.end());
    const long k_end = K - K % 32;
    for (long m = 0; m < M; m++)
        for (long b = 0; b < k_end; b += QBLOCK) {
            const long end = std::min(b + QBLOCK, k_end);
            float largest = 0;
            for (long k = b; k < end; k++) largest = std::max(largest, std::fabs(x[m * K + k]));
            if (largest == 0) continue;
            const float inverse = 32767.0f / largest, scale = largest / 32767.0f;
            for (long k = b; k < end; k++) out[m * K + k] = double(std::nearbyint(x[m * K + k] * inverse)) * scale;
        }
    return out;
}

void check_matmuls() {
    for (const auto& [N, K] : {std::pair{37L, 70L}, {37L, 600L}, {300L, 600L}})  // 300 rows: three panels of weights
        for (long M : {1L, 2L, 3L, 4L, 5L, 6L, 7L, 8L, 9L, 13L}) {  // past 8: in tiles
            const std::vector<float> x = randn(M * K), w = from_bf16(to_bf16(randn(N * K)));
            const std::vector<uint16_t> w16 = to_bf16(w);
            std::vector<double> expected(M * N, 0.0), expected8(M * N, 0.0);
            std::vector<int8_t> w8(N * K);
            std::vector<float> scales = randn(N), y(M * N);
            for (long i = 0; i < N * K; i++) w8[i] = int8_t(long(rng() % 255) - 127);
            const std::vector<double> rounded = as_int16_rounded(x, M, K);
            for (long m = 0; m < M; m++)
                for (long n = 0; n < N; n++) {
                    for (long k = 0; k < K; k++) {
                        expected[m * N + n] += double(x[m * K + k]) * w[n * K + k];
                        expected8[m * N + n] += rounded[m * K + k] * w8[n * K + k];
                    }
                    expected8[m * N + n] *= scales[n];
                }
            llama_matmul_bf16(x.data(), w16.data(), y.data(), 0, M, N, K);
            expect_close("matmul bf16", M * 1000000 + N * 1000 + K, expected, y, 1e-5);
            llama_matmul_int8(x.data(), w8.data(), scales.data(), y.data(), 0, M, N, K);
            expect_close("matmul int8", M * 1000000 + N * 1000 + K, expected8, y, 1e-5);
            std::vector<uint16_t> y16(M * N);  // bf16 activations: x rounded to bf16 in, y rounded out
            const std::vector<uint16_t> x16 = to_bf16(x);
            const std::vector<float> xr = from_bf16(x16);
            std::vector<double> expected16(M * N, 0.0);
            for (long m = 0; m < M; m++)
                for (long n = 0; n < N; n++)
                    for (long k = 0; k < K; k++) expected16[m * N + n] += double(xr[m * K + k]) * w[n * K + k];
            llama_matmul_bf16(x16.data(), w16.data(), y16.data(), 1, M, N, K);
            expect_close("matmul bf16, bf16 activations", M * 1000000 + N * 1000 + K, expected16, from_bf16(y16), 1.0 / 128);
        }
}

void check_int4() {
    const long N = 37;
    for (long K : {128L, 640L})
        for (long group : {64L, 128L})
            for (long M : {1L, 2L, 3L, 4L, 5L, 6L, 7L, 8L, 9L, 13L}) {  // past 8: in tiles
                if (K % group) continue;
                const long groups = K / group;
                std::vector<uint8_t> codes(N * K), packed(N * K / 2);
                for (uint8_t& c : codes) c = uint8_t(rng() % 16);
                for (long n = 0; n < N; n++)  // byte i of a run of 64 codes: code i low, code 32 + i high
                    for (long k = 0; k < K; k += 64)
                        for (long i = 0; i < 32; i++)
                            packed[(n * K + k) / 2 + i] = uint8_t(codes[n * K + k + i] | codes[n * K + k + 32 + i] << 4);
                const std::vector<float> x = randn(M * K), scales_zeros = randn(N * groups * 2);
                const std::vector<double> rounded = as_int16_rounded(x, M, K);
                std::vector<double> expected(M * N, 0.0);
                for (long m = 0; m < M; m++)
                    for (long n = 0; n < N; n++)
                        for (long k = 0; k < K; k++) {
                            const long at = 2 * (n * groups + k / group);
                            expected[m * N + n] += rounded[m * K + k] * (codes[n * K + k] - 8.0) * scales_zeros[at] +
                                                   double(x[m * K + k]) * scales_zeros[at + 1];
                        }
                std::vector<float> y(M * N);
                llama_matmul_int4(x.data(), packed.data(), scales_zeros.data(), y.data(), 0, M, N, K, group);
                expect_close("matmul int4", M * 10000 + K * 10 + group / 64, expected, y, 1e-5);
            }
}

void check_rms_norm() {
    const long M = 3;
    for (long K : {83L, 2048L}) {
        const std::vector<float> x = randn(M * K), weight = randn(K);
        std::vector<double> expected(M * K);
        for (long m = 0; m < M; m++) {
            double squares = 0;
            for (long k = 0; k < K; k++) squares += double(x[m * K + k]) * x[m * K + k];
            const double inv_rms = 1 / std::sqrt(squares / K + 1e-5);
            for (long k = 0; k < K; k++) expected[m * K + k] = x[m * K + k] * inv_rms * weight[k];
        }
        std::vector<float> y(M * K);
        llama_rms_norm(x.data(), weight.data(), y.data(), 0, M, K, 1e-5f);
        expect_close("rms_norm", K, expected, y, 1e-6);
        const std::vector<uint16_t> x16 = to_bf16(x), w16 = to_bf16(weight);
        std::vector<uint16_t> y16(M * K);
        llama_rms_norm(x16.data(), w16.data(), y16.data(), 1, M, K, 1e-5f);
        expect_close("rms_norm, bf16", K, expected, from_bf16(y16), 1.0 / 64);  // inputs and output rounded
    }
}

// Decode attention of two sequences at their own positions, without rotation (cos 1, sin 0: rotation is scalar
// code, the same in every build), fp32.
void check_attention() {
    const long B = 2, H = 4, H_kv = 2, group = H / H_kv;
    for (long D : {16L, 32L, 64L, 128L, 24L})
        for (long pos : {0L, 9L, 37L}) {
            const long T_max = pos + 2, positions[B] = {pos, pos / 2};
            std::vector<float> cache_k = randn(B * H_kv * T_max * D), cache_v = randn(B * H_kv * T_max * D);
            const std::vector<float> qkv = randn(B * (H + 2 * H_kv) * D);
            std::vector<float> rotation(B * D), out(B * H * D);
            for (long i = 0; i < B * D; i++) rotation[i] = i % 2 ? 0.0f : 1.0f;
            std::vector<float> keys = cache_k, values = cache_v;  // the reference's caches, with the new k and v
            std::vector<double> expected(B * H * D, 0.0);
            for (long b = 0; b < B; b++) {
                const float* row = qkv.data() + b * (H + 2 * H_kv) * D;
                for (long kv = 0; kv < H_kv; kv++)
                    for (long d = 0; d < D; d++) {
                        keys[((b * H_kv + kv) * T_max + positions[b]) * D + d] = row[(H + kv) * D + d];
                        values[((b * H_kv + kv) * T_max + positions[b]) * D + d] = row[(H + H_kv + kv) * D + d];
                    }
                for (long h = 0; h < H; h++) {
                    const long first = (b * H_kv + h / group) * T_max * D;
                    std::vector<double> scores(positions[b] + 1);
                    double largest = -INFINITY, total = 0;
                    for (long t = 0; t <= positions[b]; t++) {
                        double dot = 0;
                        for (long d = 0; d < D; d++) dot += double(row[h * D + d]) * keys[first + t * D + d];
                        scores[t] = dot / std::sqrt(double(D));
                        largest = std::max(largest, scores[t]);
                    }
                    for (double& s : scores) total += s = std::exp(s - largest);
                    for (long t = 0; t <= positions[b]; t++)
                        for (long d = 0; d < D; d++) expected[(b * H + h) * D + d] += scores[t] / total * values[first + t * D + d];
                }
            }
            const char* error = llama_decode_attention(qkv.data(), cache_k.data(), cache_v.data(), rotation.data(),
                                                       positions, nullptr, out.data(), 0, B, H, H_kv, D, B, T_max);
            checks++;
            if (error != nullptr || cache_k != keys || cache_v != values) {
                failures++;
                std::printf("FAIL attention (D %ld, pos %ld): %s\n", D, pos, error ? error : "caches not written");
            }
            expect_close("attention", D * 1000 + pos, expected, out, 1e-5);
        }
}

}  // namespace

int main() {
    check_matmuls();
    check_int4();
    check_rms_norm();
    check_attention();
    std::printf("%s: %d checks, %d failed\n", llama_isa(), checks, failures);
    return failures ? 1 : 0;
}
