/* Products of a few rows with a weight matrix, for decoding on x86-64 CPUs with AVX2 and FMA.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k]   x: (M, K) fp32   w: (N, K) bf16 or fp32 (nn.Linear's layout)
 *                                     y: (M, N) fp32, M small (decoding: one row per sequence)
 *
 * A decoding step multiplies one or a few rows by every weight matrix once: a stream over the
 * weights, bound by memory bandwidth. PyTorch's bf16 kernels on CPUs without native bf16
 * convert and accumulate element by element (~7 GB/s of weights on one AVX2 core, ~1 GB/s
 * for 2-16 rows), and MKL's fp32 GEMM for 2-16 rows is blocked for large matrices. Here each
 * weight row is read once, widened to fp32 in registers (bf16 is the upper half of an fp32:
 * a 16-bit shift) and multiplied into the M rows of x, which stay in L1: 1.3-1.5x PyTorch for
 * one bf16 row, 2-4x for 4-16 rows, 1.3-2x MKL for 2-16 fp32 rows. Accumulation is in fp32.
 *
 * Compiled on first use by dapeng/layers/cpu_matmul.py (gcc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
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

/* One weight row `wr` against M rows of x; writes y[m * ldy] for m < M.
 * AVX2 has 16 vector registers: U accumulators per row of x keep U * M + 1 of them busy,
 * so one row of x gets 4 (independent FMA chains hide the FMA latency), 2-3 rows get 2,
 * and 4-8 rows one each (the rows of x are the independent chains). With 4 or more rows of
 * x there is enough arithmetic per weight byte to fetch the next weight row while this one
 * is multiplied (15-20% faster at 8 rows; with fewer rows the hardware prefetcher does better
 * alone). */
#define DOT_ROWS(T, M, U)                                                                        \
    static void dot_##T##_##M(const T* wr, const float* x, float* y, long ldy, int K) {         \
        __m256 acc[U][M];                                                                        \
        for (int u = 0; u < U; u++)                                                              \
            for (int m = 0; m < M; m++) acc[u][m] = _mm256_setzero_ps();                        \
        int k = 0;                                                                               \
        for (; k + 8 * U <= K; k += 8 * U) {                                                     \
            if (U == 1) _mm_prefetch((const char*)(wr + K + k), _MM_HINT_T0);                     \
            for (int u = 0; u < U; u++) {                                                        \
                __m256 v = load_##T(wr + k + 8 * u);                                             \
                for (int m = 0; m < M; m++)                                                      \
                    acc[u][m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (long)m * K + k + 8 * u), acc[u][m]); \
            }                                                                                    \
        }                                                                                        \
        for (; k + 8 <= K; k += 8) {                                                             \
            __m256 v = load_##T(wr + k);                                                         \
            for (int m = 0; m < M; m++)                                                          \
                acc[0][m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (long)m * K + k), acc[0][m]); \
        }                                                                                        \
        for (int m = 0; m < M; m++) {                                                            \
            __m256 total = acc[0][m];                                                            \
            for (int u = 1; u < U; u++) total = _mm256_add_ps(total, acc[u][m]);                 \
            float s = hsum(total);                                                               \
            for (int j = k; j < K; j++) s += scalar_##T(wr[j]) * x[(long)m * K + j];             \
            y[m * ldy] = s;                                                                      \
        }                                                                                        \
    }

#define ALL_DOT_ROWS(T)                                                                          \
    DOT_ROWS(T, 1, 4) DOT_ROWS(T, 2, 2) DOT_ROWS(T, 3, 2) DOT_ROWS(T, 4, 1)                      \
    DOT_ROWS(T, 5, 1) DOT_ROWS(T, 6, 1) DOT_ROWS(T, 7, 1) DOT_ROWS(T, 8, 1)                      \
    typedef void (*dot_fn_##T)(const T*, const float*, float*, long, int);                      \
    static const dot_fn_##T dots_##T[9] = {0, dot_##T##_1, dot_##T##_2, dot_##T##_3, dot_##T##_4, \
                                           dot_##T##_5, dot_##T##_6, dot_##T##_7, dot_##T##_8};

ALL_DOT_ROWS(bf16)
ALL_DOT_ROWS(f32)

/* Blocks of BLOCK weight rows are shared out between threads; within a block, rows of x are
 * taken 8 at a time, so a block (at most 16 x 8 KB here) is read from memory once and from
 * cache by the next 8 rows of x. */
#define BLOCK 16
#define MATMUL(T)                                                                                \
    void matmul_##T(const T* w, const float* x, float* y, int M, int N, int K, int threads) {   \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1)")         \
        for (int n0 = 0; n0 < N; n0 += BLOCK) {                                                  \
            int n1 = n0 + BLOCK < N ? n0 + BLOCK : N;                                            \
            for (int m0 = 0; m0 < M; m0 += 8) {                                                  \
                int rows = M - m0 < 8 ? M - m0 : 8;                                              \
                for (int n = n0; n < n1; n++)                                                    \
                    dots_##T[rows](w + (long)n * K, x + (long)m0 * K, y + (long)m0 * N + n, N, K); \
            }                                                                                    \
        }                                                                                        \
    }

MATMUL(bf16)
MATMUL(f32)
