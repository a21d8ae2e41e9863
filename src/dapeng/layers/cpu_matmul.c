/* Products of a few rows with a weight matrix, for decoding on x86-64 CPUs with AVX2 and FMA.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k]   x: (M, K) fp32   w: (N, K) bf16 or fp32 (nn.Linear's layout)
 *                                     y: (M, N) fp32, M small (decoding: one row per sequence)
 *
 * A decoding step multiplies one or a few rows by every weight matrix once: a stream over the
 * weights, bound by memory bandwidth. PyTorch's bf16 kernels on CPUs without native bf16
 * convert and accumulate element by element (~7 GB/s of weights on one AVX2 core, ~1 GB/s
 * for 2-16 rows), MKL's fp32 matrix-vector product streams ~10 GB/s, and its GEMM for 2-16
 * rows is blocked for large matrices. Here each weight row is read once, widened to fp32 in
 * registers (bf16 is the upper half of an fp32: a 16-bit shift) and multiplied into the M rows
 * of x, which stay in L1, reading several distant rows at once (`DOT`): on SmolLM2's shapes,
 * one AVX2 core, 1.5-2x PyTorch for one bf16 row, 2-4x for 4-16 rows, 1.3-1.6x MKL for 1-24
 * fp32 rows. Accumulation is in fp32.
 *
 * Compiled on first use by dapeng/layers/cpu_matmul.py (gcc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

typedef uint16_t bf16;
typedef float f32;

static inline __m256 load_bf16(const bf16* p) {
    __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));
}

static inline __m256 load_f32(const f32* p) { return _mm256_loadu_ps(p); }

static inline float scalar_bf16(bf16 h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline float scalar_f32(f32 v) { return v; }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* S weight rows, one from each of S segments `seg` rows apart, against M rows of x:
 * y[s * seg + m * ldy] = x[m, :] . w[s * seg, :] for s < S, m < M.
 *
 * A single sequential stream over the weights reaches ~9 GB/s on one AVX2 core here; S
 * streams far apart (each segment is long and contiguous) keep more memory requests in
 * flight and reach ~15. AVX2 has 16 vector registers: S * M * U accumulators plus the M
 * rows of x must fit, so one row of x takes 4 segments with 2 accumulators each (two
 * independent FMA chains per segment), 2-3 rows take 4 with one, 4 rows take 2, and 5-8 rows
 * one segment, whose next weight row is fetched while this one is multiplied (there is
 * enough arithmetic per weight byte: 10-20% faster at 8 rows). */
#define DOT(T, S, M, U)                                                                          \
    static void dot_##T##_##S##_##M(const T* w, long seg, const float* x, float* y, long ldy, int K) { \
        __m256 acc[S][M][U];                                                                     \
        for (int s = 0; s < S; s++)                                                              \
            for (int m = 0; m < M; m++)                                                          \
                for (int u = 0; u < U; u++) acc[s][m][u] = _mm256_setzero_ps();                 \
        int k = 0;                                                                               \
        for (; k + 8 * U <= K; k += 8 * U) {                                                     \
            if (S == 1) _mm_prefetch((const char*)(w + K + k), _MM_HINT_T0);                      \
            for (int u = 0; u < U; u++)                                                          \
                for (int s = 0; s < S; s++) {                                                    \
                    __m256 v = load_##T(w + s * seg * K + k + 8 * u);                            \
                    for (int m = 0; m < M; m++)                                                  \
                        acc[s][m][u] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (long)m * K + k + 8 * u), acc[s][m][u]); \
                }                                                                                \
        }                                                                                        \
        for (; k + 8 <= K; k += 8)                                                               \
            for (int s = 0; s < S; s++) {                                                        \
                __m256 v = load_##T(w + s * seg * K + k);                                        \
                for (int m = 0; m < M; m++)                                                      \
                    acc[s][m][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (long)m * K + k), acc[s][m][0]); \
            }                                                                                    \
        for (int s = 0; s < S; s++)                                                              \
            for (int m = 0; m < M; m++) {                                                        \
                __m256 total = acc[s][m][0];                                                     \
                for (int u = 1; u < U; u++) total = _mm256_add_ps(total, acc[s][m][u]);          \
                float sum = hsum(total);                                                         \
                for (int j = k; j < K; j++) sum += scalar_##T(w[s * seg * K + j]) * x[(long)m * K + j]; \
                y[s * seg + m * ldy] = sum;                                                      \
            }                                                                                    \
    }

/* For each count of x rows (1-8): the segment-parallel kernel and the one-row fallback. */
#define KERNELS(T)                                                                               \
    DOT(T, 4, 1, 2) DOT(T, 1, 1, 4) DOT(T, 4, 2, 1) DOT(T, 1, 2, 2) DOT(T, 4, 3, 1) DOT(T, 1, 3, 2) \
    DOT(T, 2, 4, 1) DOT(T, 1, 4, 1) DOT(T, 1, 5, 1) DOT(T, 1, 6, 1) DOT(T, 1, 7, 1) DOT(T, 1, 8, 1) \
    typedef void (*dot_fn_##T)(const T*, long, const float*, float*, long, int);                 \
    static const int segments_##T[9] = {0, 4, 4, 4, 2, 1, 1, 1, 1};                               \
    static const dot_fn_##T wide_##T[9] = {0, dot_##T##_4_1, dot_##T##_4_2, dot_##T##_4_3,         \
        dot_##T##_2_4, dot_##T##_1_5, dot_##T##_1_6, dot_##T##_1_7, dot_##T##_1_8};               \
    static const dot_fn_##T single_##T[9] = {0, dot_##T##_1_1, dot_##T##_1_2, dot_##T##_1_3,       \
        dot_##T##_1_4, dot_##T##_1_5, dot_##T##_1_6, dot_##T##_1_7, dot_##T##_1_8};               \
                                                                                                 \
    /* weight rows [a, b) against all `rows` (<= 8) rows of x */                                \
    static void span_##T(const T* w, const float* x, float* y, int rows, int N, int K, int a, int b) { \
        int S = segments_##T[rows];                                                              \
        long seg = (b - a) / S;                                                                  \
        for (long n = a; n < a + seg; n++) wide_##T[rows](w + n * K, seg, x, y + n, N, K);      \
        for (long n = a + S * seg; n < b; n++) single_##T[rows](w + n * K, 0, x, y + n, N, K);  \
    }                                                                                            \
                                                                                                 \
    /* Threads take equal spans of weight rows. More than 8 rows of x go 8 at a time over      \
     * blocks of 16 weight rows, read from memory once and from cache by the other groups. */  \
    void matmul_##T(const T* w, const float* x, float* y, int M, int N, int K, int threads) {   \
        _Pragma("omp parallel num_threads(threads) if(threads > 1)")                             \
        {                                                                                        \
            int t = omp_get_thread_num(), nt = omp_get_num_threads();                            \
            int a = (int)((long)N * t / nt), b = (int)((long)N * (t + 1) / nt);                  \
            if (M <= 8) {                                                                        \
                span_##T(w, x, y, M, N, K, a, b);                                                \
            } else {                                                                             \
                for (int n0 = a; n0 < b; n0 += 16)                                               \
                    for (int m0 = 0; m0 < M; m0 += 8) {                                          \
                        int rows = M - m0 < 8 ? M - m0 : 8;                                      \
                        for (int n = n0; n < (n0 + 16 < b ? n0 + 16 : b); n++)                   \
                            single_##T[rows](w + (long)n * K, 0, x + (long)m0 * K, y + (long)m0 * N + n, N, K); \
                    }                                                                            \
            }                                                                                    \
        }                                                                                        \
    }

KERNELS(bf16)
KERNELS(f32)
