/* The AVX-512 intrinsics that dapeng/layers/cpu_matmul.c uses, in portable C (GCC vector
 * extensions), so that its avx512f and avx512bf16 paths run on CPUs without AVX-512.
 *
 * Force-included after <immintrin.h> by tests/unit/test_cpu_matmul.py: the macros below
 * rename the intrinsics and types in the kernel's source to these, and drop its
 * `target` attributes, so the build contains no AVX-512 instruction. Each follows the
 * operation Intel's manual gives (lane order, rounding), not a faster equivalent.
 */
#include <stdint.h>

typedef float emu_ps __attribute__((vector_size(64)));
typedef int32_t emu_epi32 __attribute__((vector_size(64)));
typedef uint32_t emu_epu32 __attribute__((vector_size(64)));
typedef uint16_t emu_bh __attribute__((vector_size(64)));

static inline emu_ps emu_setzero_ps(void) { return (emu_ps){0}; }

static inline emu_ps emu_add_ps(emu_ps a, emu_ps b) { return a + b; }

/* halves added pairwise down to one lane, as the intrinsic's sequence does */
static inline float emu_reduce_add_ps(emu_ps v) {
    for (int width = 8; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) v[i] += v[i + width];
    return v[0];
}

static inline emu_ps emu_loadu_ps(const void* p) {
    emu_ps v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline emu_epi32 emu_loadu_si512(const void* p) {
    emu_epi32 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline emu_epi32 emu_cvtepu16_epi32(__m256i half) {
    uint16_t h[16];
    __builtin_memcpy(h, &half, sizeof h);
    emu_epi32 v;
    for (int i = 0; i < 16; i++) v[i] = h[i];
    return v;
}

/* vpmovsxbd: 16 int8 (one 128-bit vector) sign-extended to 16 int32 lanes */
static inline emu_epi32 emu_cvtepi8_epi32(__m128i bytes) {
    int8_t b[16];
    __builtin_memcpy(b, &bytes, sizeof b);
    emu_epi32 v;
    for (int i = 0; i < 16; i++) v[i] = b[i];
    return v;
}

static inline emu_ps emu_cvtepi32_ps(emu_epi32 v) {
    emu_ps f;
    for (int i = 0; i < 16; i++) f[i] = (float)v[i];
    return f;
}

static inline emu_epi32 emu_slli_epi32(emu_epi32 v, unsigned n) { return (emu_epi32)((emu_epu32)v << n); }

static inline emu_ps emu_castsi512_ps(emu_epi32 v) { return (emu_ps)v; }

static inline emu_ps emu_fmadd_ps(emu_ps a, emu_ps b, emu_ps c) {
    for (int i = 0; i < 16; i++) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return c;
}

static inline float emu_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

/* vdpbf16ps: lane i adds the odd pair's product, then the even one's (exact products, each
 * sum rounded to fp32); the test data hold no denormals, which it would treat as zero */
static inline emu_ps emu_dpbf16_ps(emu_ps acc, emu_bh a, emu_bh b) {
    for (int i = 0; i < 16; i++) {
        acc[i] += emu_bf16_to_f32(a[2 * i + 1]) * emu_bf16_to_f32(b[2 * i + 1]);
        acc[i] += emu_bf16_to_f32(a[2 * i]) * emu_bf16_to_f32(b[2 * i]);
    }
    return acc;
}

#define __m512 emu_ps
#define __m512i emu_epi32
#define __m512bh emu_bh
#define _mm512_setzero_ps emu_setzero_ps
#define _mm512_add_ps emu_add_ps
#define _mm512_reduce_add_ps emu_reduce_add_ps
#define _mm512_loadu_ps emu_loadu_ps
#define _mm512_loadu_si512 emu_loadu_si512
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define _mm512_cvtepi8_epi32 emu_cvtepi8_epi32
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
#define _mm512_slli_epi32 emu_slli_epi32
#define _mm512_castsi512_ps emu_castsi512_ps
#define _mm512_fmadd_ps emu_fmadd_ps
#define _mm512_dpbf16_ps emu_dpbf16_ps
#define __attribute__(attributes)
