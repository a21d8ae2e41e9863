/* Products of a few rows with a weight matrix, for decoding on x86-64 CPUs: AVX2 + FMA, AVX-512F, AVX-512-BF16.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k]   x: (M, K) fp32, or bf16 on the bf16-dot path
 *                                     w: (N, K) bf16, fp32 or int8 (nn.Linear's layout;
 *                                        int8 with per-row fp32 scales: y[m, n] *= scale[n])
 *                                     y: (M, N) fp32, M small (decoding: one row per sequence)
 *
 * A decoding step multiplies one or a few rows by every weight matrix once: a stream over the
 * weights, bound by memory bandwidth. PyTorch's bf16 kernels on CPUs without native bf16
 * convert and accumulate element by element (~7 GB/s of weights on one AVX2 core, ~1 GB/s
 * for 2-16 rows), MKL's fp32 matrix-vector product streams ~10 GB/s, and its GEMM for 2-16
 * rows is blocked for large matrices. Here each weight row is read once and multiplied into
 * the M rows of x, which stay in L1, reading several distant rows at once (`DOT`): on
 * SmolLM2's shapes, one AVX2 core, 1.5-2x PyTorch for one bf16 row, 2-4x for 4-16 rows,
 * 1.3-1.6x MKL for 1-24 fp32 rows. Accumulation is in fp32.
 *
 * The same loops are built for each kernel path, one per instruction set (`ISA` below):
 *   avx2        8 fp32 lanes; bf16 weights widened to fp32 in registers (bf16 is the upper
 *               half of an fp32: a 16-bit shift), fp32 x, FMA. The only path compiled with
 *               the file's flags; the others are `target` functions of the same build.
 *   avx512f     the same arithmetic on 16 lanes.
 *   avx512bf16  bf16 weights times bf16 x by `vdpbf16ps` (32 products per instruction, pairs
 *               summed into 16 fp32 lanes): no widening, half the x bytes. The products of
 *               bf16 values are exact in fp32, the accumulation is fp32; the instruction
 *               treats denormal inputs as zero and flushes denormal results.
 * `cpu_path` says which the CPU runs (cpuid, and the OS saving the AVX-512 registers), and
 * dapeng/layers/cpu_matmul.py calls only those. A path is an ISA's accumulator arithmetic
 * (`*_zero`, `*_add`, `*_hsum`, `*_madd`) plus one loader per weight type (`*_load_bf16`,
 * `*_load_f32`, `*_load_i8`) over the same `DOT`, `span` and threading. int8 weights are
 * widened to fp32 like bf16 ones; their per-row scales multiply each row's sums as they are stored.
 *
 * Compiled on first use by dapeng/layers/cpu_matmul.py (gcc -O3 -mavx2 -mfma -fopenmp).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

typedef uint16_t bf16;
typedef float f32;
typedef int8_t i8;

static inline float scalar_bf16(bf16 h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline float scalar_f32(f32 v) { return v; }

static inline float scalar_i8(i8 v) { return (float)v; }

/* avx2: the file's own flags */
#define avx2_TARGET
typedef __m256 avx2_acc;

static inline __m256 avx2_zero(void) { return _mm256_setzero_ps(); }

static inline __m256 avx2_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }

static inline float avx2_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256 avx2_load_bf16(const bf16* p) {
    __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));
}

static inline __m256 avx2_load_f32(const f32* p) { return _mm256_loadu_ps(p); }

/* 8 int8 weights widened to fp32 (exact): a quarter of fp32's bytes streamed */
static inline __m256 avx2_load_i8(const i8* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline __m256 avx2_madd(__m256 acc, __m256 w, const f32* x) {
    return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc);
}

/* avx512f */
#define avx512f_TARGET __attribute__((target("avx512f")))
typedef __m512 avx512f_acc;

static inline avx512f_TARGET __m512 avx512f_zero(void) { return _mm512_setzero_ps(); }

static inline avx512f_TARGET __m512 avx512f_add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }

static inline avx512f_TARGET float avx512f_hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline avx512f_TARGET __m512 avx512f_load_bf16(const bf16* p) {
    __m512i widened = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
}

static inline avx512f_TARGET __m512 avx512f_load_f32(const f32* p) { return _mm512_loadu_ps(p); }

static inline avx512f_TARGET __m512 avx512f_load_i8(const i8* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

static inline avx512f_TARGET __m512 avx512f_madd(__m512 acc, __m512 w, const f32* x) {
    return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc);
}

/* avx512bf16: avx512f's accumulators, bf16 pairs in */
#define avx512bf16_TARGET __attribute__((target("avx512f,avx512bf16")))
typedef __m512 avx512bf16_acc;
#define avx512bf16_zero avx512f_zero
#define avx512bf16_add avx512f_add
#define avx512bf16_hsum avx512f_hsum

static inline avx512bf16_TARGET __m512bh avx512bf16_load_bf16(const bf16* p) {
    return (__m512bh)_mm512_loadu_si512(p);
}

static inline avx512bf16_TARGET __m512 avx512bf16_madd(__m512 acc, __m512bh w, const bf16* x) {
    return _mm512_dpbf16_ps(acc, w, (__m512bh)_mm512_loadu_si512(x));
}

/* K elements of one row per vector step: 8 on avx2, 16 on avx512f, 32 bf16 pairs' halves on avx512bf16 */
#define LANES(ISA, X) ((int)(sizeof(ISA##_acc) / sizeof(X)))

/* S weight rows, one from each of S segments `seg` rows apart, against M rows of x:
 * y[s * seg + m * ldy] = x[m, :] . w[s * seg, :] for s < S, m < M.
 *
 * A single sequential stream over the weights reaches ~9 GB/s on one AVX2 core here; S
 * streams far apart (each segment is long and contiguous) keep more memory requests in
 * flight and reach ~15. AVX2 has 16 vector registers: S * M * U accumulators plus the M
 * rows of x must fit, so one row of x takes 4 segments with 2 accumulators each (two
 * independent FMA chains per segment), 2-3 rows take 4 with one, 4 rows take 2, and 5-8 rows
 * one segment, whose next weight row is fetched while this one is multiplied (there is
 * enough arithmetic per weight byte: 10-20% faster at 8 rows). AVX-512's 32 registers hold
 * the same blocking. */
#define DOT(ISA, W, X, S, M, U)                                                                  \
    static ISA##_TARGET void dot_##ISA##_##W##_##S##_##M(const W* w, const float* scale, long seg, const X* x, \
                                                         float* y, long ldy, int K) {            \
        const int L = LANES(ISA, X);                                                             \
        ISA##_acc acc[S][M][U];                                                                  \
        for (int s = 0; s < S; s++)                                                              \
            for (int m = 0; m < M; m++)                                                          \
                for (int u = 0; u < U; u++) acc[s][m][u] = ISA##_zero();                         \
        int k = 0;                                                                               \
        for (; k + L * U <= K; k += L * U) {                                                     \
            if (S == 1) _mm_prefetch((const char*)(w + K + k), _MM_HINT_T0);                      \
            for (int u = 0; u < U; u++)                                                          \
                for (int s = 0; s < S; s++) {                                                    \
                    __typeof__(ISA##_load_##W(w)) v = ISA##_load_##W(w + s * seg * K + k + L * u); \
                    for (int m = 0; m < M; m++)                                                  \
                        acc[s][m][u] = ISA##_madd(acc[s][m][u], v, x + (long)m * K + k + L * u); \
                }                                                                                \
        }                                                                                        \
        for (; k + L <= K; k += L)                                                               \
            for (int s = 0; s < S; s++) {                                                        \
                __typeof__(ISA##_load_##W(w)) v = ISA##_load_##W(w + s * seg * K + k);          \
                for (int m = 0; m < M; m++) acc[s][m][0] = ISA##_madd(acc[s][m][0], v, x + (long)m * K + k); \
            }                                                                                    \
        for (int s = 0; s < S; s++)                                                              \
            for (int m = 0; m < M; m++) {                                                        \
                ISA##_acc total = acc[s][m][0];                                                  \
                for (int u = 1; u < U; u++) total = ISA##_add(total, acc[s][m][u]);              \
                float sum = ISA##_hsum(total);                                                   \
                for (int j = k; j < K; j++) sum += scalar_##W(w[s * seg * K + j]) * scalar_##X(x[(long)m * K + j]); \
                y[s * seg + m * ldy] = scale ? sum * scale[s * seg] : sum;                       \
            }                                                                                    \
    }

/* segments per count of x rows (1-8), for every path */
static const int segments[9] = {0, 4, 4, 4, 2, 1, 1, 1, 1};

/* One path's kernels for one weight type: for each count of x rows (1-8) the segment-parallel
 * kernel and the one-row fallback, the span of weight rows one thread takes, and the exported
 * `matmul_<ISA>_<W>`. */
#define KERNELS(ISA, W, X)                                                                       \
    DOT(ISA, W, X, 4, 1, 2) DOT(ISA, W, X, 1, 1, 4) DOT(ISA, W, X, 4, 2, 1) DOT(ISA, W, X, 1, 2, 2) \
    DOT(ISA, W, X, 4, 3, 1) DOT(ISA, W, X, 1, 3, 2) DOT(ISA, W, X, 2, 4, 1) DOT(ISA, W, X, 1, 4, 1) \
    DOT(ISA, W, X, 1, 5, 1) DOT(ISA, W, X, 1, 6, 1) DOT(ISA, W, X, 1, 7, 1) DOT(ISA, W, X, 1, 8, 1) \
    typedef void (*dot_fn_##ISA##_##W)(const W*, const float*, long, const X*, float*, long, int); \
    static const dot_fn_##ISA##_##W wide_##ISA##_##W[9] = {0, dot_##ISA##_##W##_4_1,             \
        dot_##ISA##_##W##_4_2, dot_##ISA##_##W##_4_3, dot_##ISA##_##W##_2_4, dot_##ISA##_##W##_1_5, \
        dot_##ISA##_##W##_1_6, dot_##ISA##_##W##_1_7, dot_##ISA##_##W##_1_8};                     \
    static const dot_fn_##ISA##_##W single_##ISA##_##W[9] = {0, dot_##ISA##_##W##_1_1,           \
        dot_##ISA##_##W##_1_2, dot_##ISA##_##W##_1_3, dot_##ISA##_##W##_1_4, dot_##ISA##_##W##_1_5, \
        dot_##ISA##_##W##_1_6, dot_##ISA##_##W##_1_7, dot_##ISA##_##W##_1_8};                     \
                                                                                                 \
    /* weight rows [a, b) against all M rows of x. More than 8 rows go 8 at a time over blocks  \
     * of 16 weight rows, read from memory once and from cache by the other groups. */          \
    static ISA##_TARGET void span_##ISA##_##W(const W* w, const float* sc, const X* x, float* y, int M, int N, \
                                             int K, int a, int b) {                              \
        if (M <= 8) {                                                                            \
            int S = segments[M];                                                                 \
            long seg = (b - a) / S;                                                              \
            for (long n = a; n < a + seg; n++)                                                   \
                wide_##ISA##_##W[M](w + n * K, sc ? sc + n : 0, seg, x, y + n, N, K);            \
            for (long n = a + S * seg; n < b; n++)                                               \
                single_##ISA##_##W[M](w + n * K, sc ? sc + n : 0, 0, x, y + n, N, K);            \
            return;                                                                              \
        }                                                                                        \
        for (int n0 = a; n0 < b; n0 += 16)                                                       \
            for (int m0 = 0; m0 < M; m0 += 8) {                                                  \
                int rows = M - m0 < 8 ? M - m0 : 8;                                              \
                for (int n = n0; n < (n0 + 16 < b ? n0 + 16 : b); n++)                           \
                    single_##ISA##_##W[rows](w + (long)n * K, sc ? sc + n : 0, 0, x + (long)m0 * K, \
                                             y + (long)m0 * N + n, N, K);                        \
            }                                                                                    \
    }                                                                                            \
                                                                                                 \
    /* threads take equal spans of weight rows; `scale` (N,) multiplies each row's sums, or is NULL */ \
    void matmul_##ISA##_##W(const W* w, const float* scale, const X* x, float* y, int M, int N, int K, \
                            int threads) {                                                       \
        _Pragma("omp parallel num_threads(threads) if(threads > 1)")                             \
        {                                                                                        \
            int t = omp_get_thread_num(), nt = omp_get_num_threads();                            \
            span_##ISA##_##W(w, scale, x, y, M, N, K, (int)((long)N * t / nt), (int)((long)N * (t + 1) / nt)); \
        }                                                                                        \
    }

KERNELS(avx2, bf16, f32)
KERNELS(avx2, f32, f32)
KERNELS(avx2, i8, f32)
KERNELS(avx512f, bf16, f32)
KERNELS(avx512f, f32, f32)
KERNELS(avx512f, i8, f32)
KERNELS(avx512bf16, bf16, bf16)

/* Group-wise affine uint8 weights (avx2, used on every path's CPU): w[n, k] = scale[n, g] *
 * q[n, k] + zero[n, g] for the group g = k / 32, so
 *     y[m, n] = sum_g scale[n, g] * (q[n, g] . x[m, g]) + zero[n, g] * xsum[m, g]
 * with xsum[m, g] the sum of x[m, g] (the caller's, once per product). Each weight row is
 * streamed once: 32 bytes a group, widened to 4 vectors of fp32, against every row of x
 * (L1). K is a multiple of 32. */
static inline __m256 avx2_load_u8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

/* NW weight rows `seg` rows apart against R rows of x (both compile-time, so the accumulators
 * live in registers): as in `DOT`, distant rows keep several memory streams in flight; four
 * for one row of x, two for two, one for three or four (16 vector registers). */
#define GROUPWISE(R, NW)                                                                         \
    static void gw_##R##_##NW(const uint8_t* w, const float* scale, const float* zero, long seg, \
                              const f32* x, const float* xsum, float* y, long ldy, int K) {      \
        const int G = K / 32;                                                                    \
        __m256 acc[NW][R];                                                                       \
        float zacc[NW][R];                                                                       \
        for (int r = 0; r < NW; r++)                                                             \
            for (int m = 0; m < R; m++) { acc[r][m] = _mm256_setzero_ps(); zacc[r][m] = 0.0f; }  \
        for (int g = 0; g < G; g++)                                                              \
            for (int r = 0; r < NW; r++) {                                                       \
                const uint8_t* p = w + r * seg * K + g * 32;                                     \
                const __m256 w0 = avx2_load_u8(p), w1 = avx2_load_u8(p + 8);                     \
                const __m256 w2 = avx2_load_u8(p + 16), w3 = avx2_load_u8(p + 24);               \
                const __m256 sg = _mm256_set1_ps(scale[r * seg * G + g]);                        \
                const float zg = zero[r * seg * G + g];                                          \
                for (int m = 0; m < R; m++) {                                                    \
                    const f32* xp = x + (long)m * K + g * 32;                                    \
                    __m256 lo = _mm256_mul_ps(w0, _mm256_loadu_ps(xp));                          \
                    __m256 hi = _mm256_mul_ps(w1, _mm256_loadu_ps(xp + 8));                      \
                    lo = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), lo);                      \
                    hi = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), hi);                      \
                    acc[r][m] = _mm256_fmadd_ps(_mm256_add_ps(lo, hi), sg, acc[r][m]);           \
                    zacc[r][m] += zg * xsum[(long)m * G + g];                                    \
                }                                                                                \
            }                                                                                    \
        for (int r = 0; r < NW; r++)                                                             \
            for (int m = 0; m < R; m++) y[r * seg + m * ldy] = avx2_hsum(acc[r][m]) + zacc[r][m]; \
    }

GROUPWISE(1, 4) GROUPWISE(1, 1) GROUPWISE(2, 2) GROUPWISE(2, 1)
GROUPWISE(3, 1) GROUPWISE(4, 1)

typedef void (*gw_fn)(const uint8_t*, const float*, const float*, long, const f32*, const float*, float*, long, int);
static const int gw_segments[5] = {0, 4, 2, 1, 1};
static const gw_fn gw_wide[5] = {0, gw_1_4, gw_2_2, gw_3_1, gw_4_1};
static const gw_fn gw_single[5] = {0, gw_1_1, gw_2_1, gw_3_1, gw_4_1};

/* weight rows [a, b) against all M rows of x, four rows of x at a time */
static void span_avx2_u8g32(const uint8_t* w, const float* scale, const float* zero, const f32* x,
                            const float* xsum, float* y, int M, int N, int K, int a, int b) {
    const int G = K / 32;
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int rows = M - m0 < 4 ? M - m0 : 4;
        const f32* xm = x + (long)m0 * K;
        const float* sm = xsum + (long)m0 * G;
        float* ym = y + (long)m0 * N;
        const int S = gw_segments[rows];
        const long seg = (b - a) / S;
        for (long n = a; n < a + seg; n++)
            gw_wide[rows](w + n * K, scale + n * G, zero + n * G, seg, xm, sm, ym + n, N, K);
        long n = a + S * seg;
        for (; n < b; n++) gw_single[rows](w + n * K, scale + n * G, zero + n * G, 0, xm, sm, ym + n, N, K);
    }
}

/* threads take equal spans of weight rows */
void matmul_avx2_u8g32(const uint8_t* w, const float* scale, const float* zero, const f32* x, const float* xsum,
                       float* y, int M, int N, int K, int threads) {
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        span_avx2_u8g32(w, scale, zero, x, xsum, y, M, N, K, (int)((long)N * t / nt), (int)((long)N * (t + 1) / nt));
    }
}

/* The best path this CPU runs: -1 none, 0 avx2, 1 avx512f, 2 avx512bf16 (libgcc's cpuid
 * checks count the AVX-512 features only where the OS saves their registers). */
int cpu_path(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return -1;
    if (!__builtin_cpu_supports("avx512f")) return 0;
    return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
}
