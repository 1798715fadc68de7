/* Memory-bound CPU matmuls for decoding: y[M,N] = x[M,K] . W[N,K]^T (+ bias), M small (1..16).
 *
 * Decode reads every weight once per token, so speed is memory bandwidth: each thread streams a
 * contiguous block of rows of W once and applies it to all M rows of x held in cache.
 * Compiled on first use once per ISA level (build.py: AVX-512, AVX2+FMA, NEON with i8mm, NEON with
 * dot products, NEON, generic), the level the CPU runs picked at load time; within one build the
 * paths are picked at compile time (MIMO_AVX512F, MIMO_AVX2, MIMO_NEON below), with plain C loops
 * (auto-vectorized) otherwise.
 * OpenMP resolves to the libgomp torch already loaded, so torch's ops and these share one thread
 * pool.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP (Apple's clang): the same kernels, on one thread */
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

/* The paths this build takes, from the target the compiler was given. The `generic` build
 * defines MIMO_PLAIN_C and keeps to plain C (which the compiler still vectorizes where it can),
 * whatever the compiler's default target. NEON is baseline on aarch64. */
#if defined(__x86_64__) && !defined(MIMO_PLAIN_C)
#include <immintrin.h>
#if defined(__AVX512F__)
#define MIMO_AVX512F 1
#endif
#if defined(__AVX512BF16__)
#define MIMO_AVX512BF16 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MIMO_AVX512VNNI 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define MIMO_AVX2 1
#endif
#if defined(__AVXVNNI__) && defined(__AVX2__)
#define MIMO_AVXVNNI 1 /* the 256-bit VNNI of AVX2-class CPUs (Alder Lake, Zen 5 without AVX-512...) */
#endif
#endif
#if defined(__aarch64__) && defined(__ARM_NEON) && !defined(MIMO_PLAIN_C)
#define MIMO_NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define MIMO_NEON_DOTPROD 1 /* sdot: 16 byte multiply-adds into 4 int32 lanes (Cortex-A76, Neoverse N1...) */
#endif
#if defined(__ARM_FEATURE_MATMUL_INT8) && defined(MIMO_NEON_DOTPROD)
#define MIMO_NEON_I8MM 1 /* usdot: unsigned by signed bytes (Neoverse V1/N2, Apple M2...) */
#endif
#endif

#if defined(MIMO_AVX2)
static inline float hsum256(__m256 v) { /* the sum of 8 float lanes */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* The vector width every float loop below is written in: 16 lanes (AVX-512), 8 (AVX2 with FMA),
 * 4 (NEON), or none (scalar loops only). vload_bf16 widens bfloat16 to float32 by a 16-bit shift. */
#if defined(MIMO_AVX512F)
#define VLANES 16
typedef __m512 vfloat;
#define vzero _mm512_setzero_ps
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vset1 _mm512_set1_ps
#define vfmadd _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vsum _mm512_reduce_add_ps
static inline vfloat vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* 2 * VLANES bfloat16 as two float32 vectors in an order of their own (the same for every
 * pointer: enough for a dot product of two such loads), cheaper than two vload_bf16. */
static inline void vload_bf16_pair(const uint16_t *p, vfloat *first, vfloat *second) {
    __m512i v = _mm512_loadu_si512(p), zero = _mm512_setzero_si512();
    *first = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
    *second = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
}
#elif defined(MIMO_AVX2)
#define VLANES 8
typedef __m256 vfloat;
#define vzero _mm256_setzero_ps
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vset1 _mm256_set1_ps
#define vfmadd _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vsum hsum256
static inline vfloat vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void vload_bf16_pair(const uint16_t *p, vfloat *first, vfloat *second) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p), zero = _mm256_setzero_si256();
    *first = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    *second = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}
#elif defined(MIMO_NEON)
#define VLANES 4
typedef float32x4_t vfloat;
#define vzero() vdupq_n_f32(0.f)
#define vload vld1q_f32
#define vstore vst1q_f32
#define vset1 vdupq_n_f32
#define vfmadd(a, b, c) vfmaq_f32((c), (a), (b))
#define vadd vaddq_f32
#define vsum vaddvq_f32
static inline vfloat vload_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline void vload_bf16_pair(const uint16_t *p, vfloat *first, vfloat *second) {
    uint16x8_t v = vld1q_u16(p);
    *first = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
    *second = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
}
#endif

/* The ISA level this object was built for, so the loader can check it got what it asked for. */
const char *kernel_isa(void) {
#if defined(MIMO_AVX512F)
    return "avx512";
#elif defined(MIMO_AVX2)
    return "avx2";
#elif defined(MIMO_NEON_I8MM)
    return "neon_i8mm";
#elif defined(MIMO_NEON_DOTPROD)
    return "neon_dotprod";
#elif defined(MIMO_NEON)
    return "neon";
#else
    return "generic";
#endif
}


static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = ((uint32_t)v) << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static inline float identity_f32(float v) { return v; }

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* Each weight row is read as one sequential stream (four accumulators along k); the hardware
 * prefetcher follows that far better than several interleaved rows (4-row tiles measured ~25%
 * slower here, software prefetching slower too). Rows of x come from L1. Rows are handed out
 * guided: each thread first takes a long contiguous run (a long stream for the prefetcher:
 * chunks of 64 rows restarted it every 32-64 KiB and cost 10-35% on int4 projections), then
 * ever smaller chunks as threads free up, since on a shared machine one core is often slower. */

/* ---------------------------------------------------------------- float32 weights, float32 x */
static float dot_f32(const float *w, const float *x, int64_t k) {
    int64_t j = 0;
    float s = 0.f;
#if defined(VLANES)
    const int L = VLANES;
    vfloat a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (; j + 4 * L <= k; j += 4 * L) {
        a0 = vfmadd(vload(w + j), vload(x + j), a0);
        a1 = vfmadd(vload(w + j + L), vload(x + j + L), a1);
        a2 = vfmadd(vload(w + j + 2 * L), vload(x + j + 2 * L), a2);
        a3 = vfmadd(vload(w + j + 3 * L), vload(x + j + 3 * L), a3);
    }
    for (; j + L <= k; j += L) a0 = vfmadd(vload(w + j), vload(x + j), a0);
    s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
#endif
    for (; j < k; j++) s += w[j] * x[j];
    return s;
}

/* ---------------------------------------------------------------- bfloat16 weights, bfloat16 x */
#if defined(VLANES) && !defined(MIMO_AVX512BF16)
/* acc_a += wa * x's first VLANES, acc_b += wb * x's second, x's 2 * VLANES bfloat16 widened in
 * vload_bf16_pair's order (wa, wb: the weight's, widened the same way). dot_bf16 and dot_bf16_rows
 * both go through this: a row's sums are the same alone and in a pair of rows. */
static inline void fma_bf16_pair(const uint16_t *x, vfloat wa, vfloat wb, vfloat *acc_a, vfloat *acc_b) {
    vfloat first, second;
    vload_bf16_pair(x, &first, &second);
    *acc_a = vfmadd(wa, first, *acc_a);
    *acc_b = vfmadd(wb, second, *acc_b);
}
#endif

static float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t k) {
    int64_t j = 0;
    float s = 0.f;
#if defined(MIMO_AVX512BF16)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
#define BF(p) ((__m512bh)_mm512_loadu_si512(p))
    for (; j + 128 <= k; j += 128) {
        a0 = _mm512_dpbf16_ps(a0, BF(w + j), BF(x + j));
        a1 = _mm512_dpbf16_ps(a1, BF(w + j + 32), BF(x + j + 32));
        a2 = _mm512_dpbf16_ps(a2, BF(w + j + 64), BF(x + j + 64));
        a3 = _mm512_dpbf16_ps(a3, BF(w + j + 96), BF(x + j + 96));
    }
    for (; j + 32 <= k; j += 32) a0 = _mm512_dpbf16_ps(a0, BF(w + j), BF(x + j));
#undef BF
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(VLANES) /* widen by a shift, then float32 FMAs (AVX2, or AVX-512 without BF16) */
    const int L = VLANES;
    vfloat a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero(), w0, w1;
    for (; j + 4 * L <= k; j += 4 * L) {
        vload_bf16_pair(w + j, &w0, &w1);
        fma_bf16_pair(x + j, w0, w1, &a0, &a1);
        vload_bf16_pair(w + j + 2 * L, &w0, &w1);
        fma_bf16_pair(x + j + 2 * L, w0, w1, &a2, &a3);
    }
    for (; j + 2 * L <= k; j += 2 * L) {
        vload_bf16_pair(w + j, &w0, &w1);
        fma_bf16_pair(x + j, w0, w1, &a0, &a1);
    }
    s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
#endif
    for (; j < k; j++) s += bf16_to_f32(w[j]) * bf16_to_f32(x[j]);
    return s;
}

/* out[i] = dot_bf16(w, x + i * k, k) for the m rows of x. With AVX512-BF16 each 32-element piece of
 * the weight row is loaded once for four rows of x (a batch's decode rows) instead of once per row:
 * one load per dot-product instruction instead of two, the limit once there are several rows. Each
 * row's lanes are summed and reduced as in dot_bf16. */
static void dot_bf16_rows(const uint16_t *w, const uint16_t *x, int m, int64_t k, float *out) {
    int i = 0;
#if defined(MIMO_AVX512BF16)
#define BF(p) ((__m512bh)_mm512_loadu_si512(p))
    for (; i + 4 <= m && k % 128 == 0; i += 4) {
        const uint16_t *xr[4] = {x + i * k, x + (i + 1) * k, x + (i + 2) * k, x + (i + 3) * k};
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int a = 0; a < 4; a++) acc[r][a] = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; j += 128) {
            for (int a = 0; a < 4; a++) {
                __m512bh wv = BF(w + j + 32 * a);
                for (int r = 0; r < 4; r++) acc[r][a] = _mm512_dpbf16_ps(acc[r][a], wv, BF(xr[r] + j + 32 * a));
            }
        }
        for (int r = 0; r < 4; r++)
            out[i + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                            _mm512_add_ps(acc[r][2], acc[r][3])));
    }
#undef BF
#elif defined(VLANES)
    /* Two rows at a time: each piece of w is widened once for both, each row's accumulators fed as
     * in dot_bf16 (fma_bf16_pair), so its sums are dot_bf16's. */
    const int L = VLANES;
    for (; i + 2 <= m; i += 2) {
        const uint16_t *x0 = x + i * k, *x1 = x0 + k;
        vfloat a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
        vfloat b0 = vzero(), b1 = vzero(), b2 = vzero(), b3 = vzero();
        vfloat w0, w1, w2, w3;
        int64_t j = 0;
        for (; j + 4 * L <= k; j += 4 * L) {
            vload_bf16_pair(w + j, &w0, &w1);
            vload_bf16_pair(w + j + 2 * L, &w2, &w3);
            fma_bf16_pair(x0 + j, w0, w1, &a0, &a1);
            fma_bf16_pair(x0 + j + 2 * L, w2, w3, &a2, &a3);
            fma_bf16_pair(x1 + j, w0, w1, &b0, &b1);
            fma_bf16_pair(x1 + j + 2 * L, w2, w3, &b2, &b3);
        }
        for (; j + 2 * L <= k; j += 2 * L) {
            vload_bf16_pair(w + j, &w0, &w1);
            fma_bf16_pair(x0 + j, w0, w1, &a0, &a1);
            fma_bf16_pair(x1 + j, w0, w1, &b0, &b1);
        }
        float s0 = vsum(vadd(vadd(a0, a1), vadd(a2, a3))), s1 = vsum(vadd(vadd(b0, b1), vadd(b2, b3)));
        for (; j < k; j++) {
            float wj = bf16_to_f32(w[j]);
            s0 += wj * bf16_to_f32(x0[j]);
            s1 += wj * bf16_to_f32(x1[j]);
        }
        out[i] = s0;
        out[i + 1] = s1;
    }
#endif
    for (; i < m; i++) out[i] = dot_bf16(w, x + i * k, k);
}

static void dot_f32_rows(const float *w, const float *x, int m, int64_t k, float *out) {
    for (int i = 0; i < m; i++) out[i] = dot_f32(w, x + i * k, k);
}

/* ---------------------------------------------------------------- routed SwiGLU experts
 * out[t] += w * down_e(silu(gate_e(x_t)) * up_e(x_t)) for each (token t, expert e, weight w)
 * assignment. gate_up is [E, 2I, H] (gate rows first), down is [E, H, I]; out is float32 [M, H].
 * Experts are small, so threads split the assignments (each streams whole experts, one parallel
 * region per layer) and add into their own partial output; the partials are summed at the end.
 * scratch: moe_scratch_floats(H, I) floats per thread; partial: threads * M * H floats. */
static inline void prefetch_span(const void *p, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch((const char *)p + at, 0, 3);
}

/* Expert rows are short streams (a V2-shape bfloat16 expert: 1.5 MB in 2 KB and 512 B rows), too short
 * for the hardware prefetcher to ramp up on: the next 2 KB ahead of the row being read are prefetched
 * (here and for cpu_quant.c's packed experts). */
#define MOE_PREFETCH_BYTES 2048
/* Consecutive assignments of one expert (a batch step's tokens that chose it) go through its rows
 * together, up to MOE_GROUP tokens: each weight row is read once for all of them (dot_*_rows gives
 * every token the bits dot_* gives it alone, and each token's output gets its additions in the
 * same order as one assignment at a time). */
#define MOE_GROUP 4

/* A thread's scratch for the experts' kernel: MOE_GROUP tokens' gate|up outputs (2I floats each),
 * activations (I) and inputs (H) of up to float32 each. */
int64_t moe_scratch_floats(int64_t hidden, int64_t inter) { return MOE_GROUP * (3 * inter + hidden); }

#define MOE_KERNEL(NAME, T, DOT, TO_F32, FROM_F32)                                                      \
    void NAME(const T *x, const T *gate_up, const T *down, const int64_t *experts, const int64_t *tokens,  \
              const float *weights, int assignments, int m, float *out, float *partial, float *scratch,    \
              int64_t hidden, int64_t inter) {                                                            \
        int threads = 1;                                                                                  \
        _Pragma("omp parallel")                                                                           \
        {                                                                                                 \
            _Pragma("omp single") threads = omp_get_num_threads();                                        \
            int id = omp_get_thread_num();                                                                \
            float *mine = partial + (int64_t)id * m * hidden;                                             \
            float *gate_up_out = scratch + (int64_t)id * moe_scratch_floats(hidden, inter);              \
            T *act = (T *)(gate_up_out + MOE_GROUP * 2 * inter);                                          \
            T *xs = act + MOE_GROUP * inter; /* the group's inputs, one row after the other */            \
            for (int64_t j = 0; j < (int64_t)m * hidden; j++) mine[j] = 0.f;                              \
            int first = (int)((int64_t)assignments * id / threads);                                       \
            int last = (int)((int64_t)assignments * (id + 1) / threads);                                  \
            for (int a = first; a < last;) {                                                              \
                int count = 1;                                                                            \
                while (count < MOE_GROUP && a + count < last && experts[a + count] == experts[a]) count++;\
                const T *gu = gate_up + experts[a] * 2 * inter * hidden;                                  \
                const T *dn = down + experts[a] * hidden * inter;                                         \
                const T *xt = x + tokens[a] * hidden;                                                     \
                if (count > 1) {                                                                          \
                    for (int t = 0; t < count; t++)                                                       \
                        memcpy(xs + t * hidden, x + tokens[a + t] * hidden, sizeof(T) * hidden);          \
                    xt = xs;                                                                              \
                }                                                                                         \
                const int64_t gu_ahead = MOE_PREFETCH_BYTES / (hidden * (int64_t)sizeof(T)) + 1;          \
                const int64_t dn_ahead = MOE_PREFETCH_BYTES / (inter * (int64_t)sizeof(T)) + 1;           \
                float sums[MOE_GROUP];                                                                    \
                for (int64_t r = 0; r < 2 * inter; r++) {                                                 \
                    if (r + gu_ahead < 2 * inter) prefetch_span(gu + (r + gu_ahead) * hidden, hidden * sizeof(T)); \
                    DOT##_rows(gu + r * hidden, xt, count, hidden, sums);                                 \
                    for (int t = 0; t < count; t++) gate_up_out[t * 2 * inter + r] = TO_F32(FROM_F32(sums[t])); \
                }                                                                                         \
                prefetch_span(dn, (dn_ahead < hidden ? dn_ahead : hidden) * inter * sizeof(T));           \
                for (int t = 0; t < count; t++)                                                           \
                    for (int64_t i = 0; i < inter; i++) {                                                 \
                        float g = gate_up_out[t * 2 * inter + i];                                         \
                        act[t * inter + i] =                                                              \
                            FROM_F32(TO_F32(FROM_F32(g / (1.f + expf(-g)))) * gate_up_out[t * 2 * inter + inter + i]); \
                    }                                                                                     \
                for (int64_t r = 0; r < hidden; r++) {                                                    \
                    if (r + dn_ahead < hidden) prefetch_span(dn + (r + dn_ahead) * inter, inter * sizeof(T));  \
                    DOT##_rows(dn + r * inter, act, count, inter, sums);                                  \
                    for (int t = 0; t < count; t++)                                                       \
                        mine[tokens[a + t] * hidden + r] += weights[a + t] * TO_F32(FROM_F32(sums[t]));   \
                }                                                                                         \
                a += count;                                                                               \
            }                                                                                             \
        }                                                                                                 \
        for (int64_t j = 0; j < (int64_t)m * hidden; j++) {                                               \
            float sum = 0.f;                                                                              \
            for (int t = 0; t < threads; t++) sum += partial[(int64_t)t * m * hidden + j];                \
            out[j] = sum;                                                                                 \
        }                                                                                                 \
    }

MOE_KERNEL(moe_f32, float, dot_f32, identity_f32, identity_f32)
MOE_KERNEL(moe_bf16, uint16_t, dot_bf16, bf16_to_f32, f32_to_bf16)

/* q . k and acc += p * v over one head, q/acc float32, k/v float32 or bfloat16: vectorized (gcc
 * does not vectorize a float reduction by itself), VLANES lanes at a time. */
#if defined(VLANES)
#define HEAD_VECTOR_LOOPS(LOADV)                                                                          \
    vfloat a = vzero();                                                                                   \
    for (; d + VLANES <= dim; d += VLANES) a = vfmadd(vload(q + d), LOADV(k + d), a);                     \
    s = vsum(a);
#define HEAD_AXPY_LOOP(LOADV)                                                                             \
    vfloat scale = vset1(p);                                                                              \
    for (; d + VLANES <= dim; d += VLANES) vstore(acc + d, vfmadd(scale, LOADV(v + d), vload(acc + d)));
#else
#define HEAD_VECTOR_LOOPS(LOAD16)
#define HEAD_AXPY_LOOP(LOAD16)
#endif

#define HEAD_KERNELS(SUFFIX, T, LOAD16, TO_F32)                                                           \
    static inline float head_dot_##SUFFIX(const float *q, const T *k, int dim) {                         \
        int d = 0;                                                                                        \
        float s = 0.f;                                                                                    \
        HEAD_VECTOR_LOOPS(LOAD16)                                                                         \
        for (; d < dim; d++) s += q[d] * TO_F32(k[d]);                                                    \
        return s;                                                                                         \
    }                                                                                                     \
    static inline void head_axpy_##SUFFIX(float *acc, float p, const T *v, int dim) {                    \
        int d = 0;                                                                                        \
        HEAD_AXPY_LOOP(LOAD16)                                                                            \
        for (; d < dim; d++) acc[d] += p * TO_F32(v[d]);                                                  \
    }
HEAD_KERNELS(f32, float, vload, identity_f32)
HEAD_KERNELS(bf16, uint16_t, vload_bf16, bf16_to_f32)

/* ---------------------------------------------------------------- per-type decode kernels
 * DECODE_KERNELS(SUFFIX, T, ...) defines, for activations and weights of type T, the steps of a
 * decoder layer as functions with orphaned `omp for` loops: called inside a parallel region they
 * share its threads (one region for a whole layer), called outside one they run on one thread.
 * Every step rounds to T where the separate torch ops it replaces round, so a fused layer gives
 * the same numbers as the step-by-step path.
 *
 * linear: y = x . W^T (+ bias); y_f32 (optional) takes unrounded float32 outputs (logits), and
 * add_to_y adds the rounded outputs to y instead (a residual connection).
 * rmsnorm: out = weight * cast(x * rsqrt(mean(x^2) + eps)), the cast to T before the weight
 * multiply as in the reference implementations.
 * swiglu: out[i, j] = silu(gate[i, j]) * up[i, j] for rows [gate | up] of 2 * inter.
 * attention, for M new tokens at positions start..start+M-1 from the fused qkv rows: rotate q and
 * k (rotate-half on the first rope_dim dims), scale v, store k/v in the cache (attention_store,
 * one thread), then attend (attention_heads). Cache: keys [Hkv, capacity, D], values [Hkv,
 * capacity, Dv]. Global layers (slot_pos NULL) store position p in slot p; sliding layers store it
 * in slot p % capacity, record it in slot_pos, and a query at p sees stored positions
 * p - window .. p. Sinks (per head, optional) join the softmax denominator only. q is kept in
 * float32 scratch; out is [M, H * Dv]. */
typedef struct {
    int64_t qkv_stride, start, capacity, window;
    const float *cos, *sin, *sinks;
    int64_t *slot_pos;
    int heads, kv_heads, dim, v_dim, rope_dim;
    float scale, value_scale;
    float *q_scratch, *score_scratch;
} attention_args;

/* Short weight rows (hidden 1024: 2 KB of bfloat16) are prefetched two rows ahead: measured 1.07-1.21x
 * on a 152576x1024 lm_head, 1 thread. Long rows (MiMo-7B: 8-22 KB) measured 0.8x with it: the
 * hardware prefetcher follows them. */
#define LINEAR_PREFETCH_ROWS 2
#define LINEAR_PREFETCH_MAX_ROW_BYTES 4096
#define LINEAR_ROW_BLOCK 16 /* rows of x whose dot products with a weight row are made together */
#define DECODE_KERNELS(SUFFIX, T, DOT, HEAD_DOT, HEAD_AXPY, TO_F32, FROM_F32)                             \
    static void linear_rows_##SUFFIX(const T *x, const T *w, const T *bias, float *y_f32, T *y, int add_to_y, \
                                     int m, int64_t n, int64_t k) {                                        \
        const int short_rows = k * (int64_t)sizeof(T) <= LINEAR_PREFETCH_MAX_ROW_BYTES;                   \
        _Pragma("omp for schedule(guided, 32)")                                                          \
        for (int64_t row = 0; row < n; row++) {                                                           \
            const T *wr = w + row * k;                                                                    \
            if (short_rows && row + LINEAR_PREFETCH_ROWS < n)                                              \
                prefetch_span(wr + LINEAR_PREFETCH_ROWS * k, k * sizeof(T));                              \
            float b = bias ? TO_F32(bias[row]) : 0.f;                                                     \
            float sums[LINEAR_ROW_BLOCK];                                                                 \
            for (int i = 0; i < m; i++) {                                                                 \
                if (i % LINEAR_ROW_BLOCK == 0)                                                            \
                    DOT##_rows(wr, x + i * k, m - i < LINEAR_ROW_BLOCK ? m - i : LINEAR_ROW_BLOCK, k, sums);\
                float v = sums[i % LINEAR_ROW_BLOCK] + b;                                                 \
                if (y_f32) y_f32[i * n + row] = v;                                                        \
                else if (add_to_y) y[i * n + row] = FROM_F32(TO_F32(y[i * n + row]) + TO_F32(FROM_F32(v))); \
                else y[i * n + row] = FROM_F32(v);                                                        \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    void linear_##SUFFIX(const T *x, const T *w, const T *bias, float *y_f32, T *y, int m, int64_t n, int64_t k) { \
        _Pragma("omp parallel") linear_rows_##SUFFIX(x, w, bias, y_f32, y, 0, m, n, k);                   \
    }                                                                                                     \
                                                                                                          \
    static void rmsnorm_rows_##SUFFIX(const T *x, const T *weight, T *out, int m, int64_t size, float eps) { \
        _Pragma("omp for schedule(static)")                                                               \
        for (int i = 0; i < m; i++) {                                                                     \
            const T *xi = x + i * size;                                                                   \
            double sum = 0.0;                                                                             \
            for (int64_t j = 0; j < size; j++) { float v = TO_F32(xi[j]); sum += (double)v * v; }         \
            float inv = 1.f / sqrtf((float)(sum / size) + eps);                                           \
            for (int64_t j = 0; j < size; j++)                                                            \
                out[i * size + j] = FROM_F32(TO_F32(weight[j]) * TO_F32(FROM_F32(TO_F32(xi[j]) * inv)));  \
        }                                                                                                 \
    }                                                                                                     \
    void rmsnorm_##SUFFIX(const T *x, const T *weight, T *out, int m, int64_t size, float eps) {          \
        _Pragma("omp parallel if (m > 16)") rmsnorm_rows_##SUFFIX(x, weight, out, m, size, eps);          \
    }                                                                                                     \
                                                                                                          \
    static void swiglu_rows_##SUFFIX(const T *gate_up, T *out, int m, int64_t inter) {                    \
        _Pragma("omp for schedule(static)")                                                               \
        for (int64_t index = 0; index < (int64_t)m * inter; index++) {                                    \
            int64_t i = index / inter, j = index % inter;                                                 \
            float g = TO_F32(gate_up[i * 2 * inter + j]);                                                 \
            out[index] = FROM_F32(TO_F32(FROM_F32(g / (1.f + expf(-g)))) * TO_F32(gate_up[i * 2 * inter + inter + j])); \
        }                                                                                                 \
    }                                                                                                     \
    void swiglu_##SUFFIX(const T *gate_up, T *out, int m, int64_t inter) {                                \
        _Pragma("omp parallel") swiglu_rows_##SUFFIX(gate_up, out, m, inter);                             \
    }                                                                                                     \
                                                                                                          \
    /* out = down(swiglu(gate_up(x))), or out += that with add_to_out; gate_up_out: m * 2I of T. */     \
    static void mlp_rows_##SUFFIX(const T *x, const T *gate_up, const T *down, T *out, int add_to_out,   \
                                  T *gate_up_out, T *act, int m, int64_t hidden, int64_t inter) {         \
        linear_rows_##SUFFIX(x, gate_up, NULL, NULL, gate_up_out, 0, m, 2 * inter, hidden);               \
        swiglu_rows_##SUFFIX(gate_up_out, act, m, inter);                                                 \
        linear_rows_##SUFFIX(act, down, NULL, NULL, out, add_to_out, m, hidden, inter);                   \
    }                                                                                                     \
    void mlp_##SUFFIX(const T *x, const T *gate_up, const T *down, T *out, T *gate_up_out, T *act, int m, \
                      int64_t hidden, int64_t inter) {                                                    \
        _Pragma("omp parallel") mlp_rows_##SUFFIX(x, gate_up, down, out, 0, gate_up_out, act, m, hidden, inter); \
    }                                                                                                     \
                                                                                                          \
    static void attention_store_##SUFFIX(const T *qkv, int m, T *keys, T *values, const attention_args *a) { \
        int half = a->rope_dim / 2, heads = a->heads, dim = a->dim, v_dim = a->v_dim;                     \
        int64_t v_offset = (int64_t)(heads + a->kv_heads) * dim;                                          \
        for (int i = 0; i < m; i++) {                                                                     \
            const T *row = qkv + i * a->qkv_stride;                                                       \
            const float *c = a->cos + i * a->rope_dim, *s = a->sin + i * a->rope_dim;                     \
            int64_t pos = a->start + i, slot = a->slot_pos ? pos % a->capacity : pos;                     \
            for (int h = 0; h < heads + a->kv_heads; h++) {                                               \
                const T *src = row + (int64_t)h * dim;                                                    \
                float rotated[1024];                                                                      \
                for (int d = 0; d < dim; d++) rotated[d] = TO_F32(src[d]);                                \
                for (int d = 0; d < half; d++) {                                                          \
                    float x0 = rotated[d], x1 = rotated[d + half];                                        \
                    rotated[d] = x0 * c[d] - x1 * s[d];                                                   \
                    rotated[d + half] = x1 * c[d + half] + x0 * s[d + half];                              \
                }                                                                                         \
                if (h < heads) {                                                                          \
                    float *q = a->q_scratch + ((int64_t)i * heads + h) * dim;                             \
                    for (int d = 0; d < dim; d++) q[d] = TO_F32(FROM_F32(rotated[d]));                    \
                } else {                                                                                  \
                    T *k = keys + ((int64_t)(h - heads) * a->capacity + slot) * dim;                      \
                    for (int d = 0; d < dim; d++) k[d] = FROM_F32(rotated[d]);                            \
                }                                                                                         \
            }                                                                                             \
            for (int g = 0; g < a->kv_heads; g++) {                                                       \
                const T *src = row + v_offset + (int64_t)g * v_dim;                                       \
                T *v = values + ((int64_t)g * a->capacity + slot) * v_dim;                                \
                for (int d = 0; d < v_dim; d++)                                                           \
                    v[d] = a->value_scale == 1.f ? src[d] : FROM_F32(TO_F32(src[d]) * a->value_scale);    \
            }                                                                                             \
            if (a->slot_pos) a->slot_pos[slot] = pos;                                                     \
        }                                                                                                 \
    }                                                                                                     \
    /* one (token, head) task of attention_heads: task = i * heads + h for token i of the m new ones */   \
    static inline void attention_task_##SUFFIX(int64_t task, int m, const T *keys, const T *values, T *out,\
                                               const attention_args *a) {                                 \
        int heads = a->heads, dim = a->dim, v_dim = a->v_dim, group = a->heads / a->kv_heads;             \
        const int64_t *slot_pos = a->slot_pos;                                                            \
        int64_t slots = slot_pos ? a->capacity : a->start + m, window = a->window;                        \
        int i = (int)(task / heads), h = (int)(task % heads), g = h / group;                              \
        int64_t pos = a->start + i;                                                                       \
        const float *q = a->q_scratch + task * dim;                                                       \
        float *score = a->score_scratch + task * slots;                                                   \
        float top = a->sinks ? a->sinks[h] : -INFINITY;                                                   \
        for (int64_t j = 0; j < slots; j++) {                                                             \
            int64_t key_pos = slot_pos ? slot_pos[j] : j;                                                 \
            if (key_pos > pos || key_pos < 0 || (window >= 0 && key_pos < pos - window)) {                \
                score[j] = -INFINITY;                                                                     \
                continue;                                                                                 \
            }                                                                                             \
            score[j] = HEAD_DOT(q, keys + ((int64_t)g * a->capacity + j) * dim, dim) * a->scale;          \
            if (score[j] > top) top = score[j];                                                           \
        }                                                                                                 \
        float total = a->sinks ? expf(a->sinks[h] - top) : 0.f;                                           \
        for (int64_t j = 0; j < slots; j++) {                                                             \
            score[j] = score[j] == -INFINITY ? 0.f : expf(score[j] - top);                                \
            total += score[j];                                                                            \
        }                                                                                                 \
        float acc[1024];                                                                                  \
        for (int d = 0; d < v_dim; d++) acc[d] = 0.f;                                                     \
        for (int64_t j = 0; j < slots; j++)                                                               \
            if (score[j] != 0.f) HEAD_AXPY(acc, score[j] / total, values + ((int64_t)g * a->capacity + j) * v_dim, v_dim);\
        T *o = out + ((int64_t)i * heads + h) * v_dim;                                                    \
        for (int d = 0; d < v_dim; d++) o[d] = FROM_F32(acc[d]);                                          \
    }                                                                                                     \
    /* RoPE, cache write and attention of one or more sequences (a decode or verify step, or a batch's), \
     * orphaned as the steps above are: sequence b has rows[b] consecutive rows of qkv (all with the      \
     * stride of args[0]) and out, its own cache (keys[b], values[b]) and arguments args[b] (same head    \
     * counts and sizes for all). One thread stores every sequence's keys and values, then the (row,     \
     * head) tasks of all of them are shared out; each sequence gets the numbers it gets alone. */        \
    static void attention_all_##SUFFIX(const T *qkv, int sequences, const int *rows, T *const *keys,      \
                                       T *const *values, T *out, const attention_args *args) {            \
        int heads = args[0].heads, total = 0;                                                             \
        int64_t out_row = (int64_t)heads * args[0].v_dim;                                                 \
        for (int b = 0; b < sequences; b++) total += rows[b];                                             \
        _Pragma("omp single")                                                                             \
        for (int b = 0, r = 0; b < sequences; r += rows[b], b++)                                          \
            attention_store_##SUFFIX(qkv + r * args[0].qkv_stride, rows[b], keys[b], values[b], &args[b]);\
        _Pragma("omp for schedule(static)")                                                               \
        for (int64_t task = 0; task < (int64_t)total * heads; task++) {                                   \
            int r = (int)(task / heads), b = 0, begin = 0;                                                \
            while (r >= begin + rows[b]) begin += rows[b++];                                              \
            attention_task_##SUFFIX(task - (int64_t)begin * heads, rows[b], keys[b], values[b], out + begin * out_row,\
                                    &args[b]);                                                            \
        }                                                                                                 \
    }                                                                                                     \
    void attention_batch_##SUFFIX(const T *qkv, int sequences, const int *rows, T *const *keys, T *const *values,\
                                  T *out, const attention_args *args) {                                   \
        _Pragma("omp parallel") attention_all_##SUFFIX(qkv, sequences, rows, keys, values, out, args);    \
    }                                                                                                     \
    /* A whole pre-norm decoder layer for M tokens in one parallel region, x [M, H] updated in place:     \
     * x += o_proj(attention(qkv_proj(norm1(x)))); normed = norm2(x); then, with gate_up given,           \
     * x += down(swiglu(gate_up(normed))) (without it the caller runs its own FFN, e.g. MoE, on           \
     * normed). Scratch: qkv [M, qkv_out], attn [M, H * Dv], gate_up_out [M, 2I], act [M, I] of T.        \
     * The M rows are those of `sequences` sequences, rows[b] each, with caches and attention             \
     * arguments as attention_all takes them (a batch step, or one sequence's decode or verify step). */ \
    void decoder_layer_batch_##SUFFIX(T *x, int sequences, const int *rows, int64_t hidden, float eps,    \
                                      const T *norm1, const T *qkv_w, const T *qkv_b, int64_t qkv_out, const T *o_w,\
                                      const T *norm2, const T *gate_up, const T *down, int64_t inter,     \
                                      T *const *keys, T *const *values, const attention_args *args, T *normed,\
                                      T *qkv, T *attn, T *gate_up_out, T *act) {                          \
        int m = 0;                                                                                        \
        for (int b = 0; b < sequences; b++) m += rows[b];                                                 \
        _Pragma("omp parallel")                                                                           \
        {                                                                                                 \
            rmsnorm_rows_##SUFFIX(x, norm1, normed, m, hidden, eps);                                      \
            linear_rows_##SUFFIX(normed, qkv_w, qkv_b, NULL, qkv, 0, m, qkv_out, hidden);                 \
            attention_all_##SUFFIX(qkv, sequences, rows, keys, values, attn, args);                       \
            linear_rows_##SUFFIX(attn, o_w, NULL, NULL, x, 1, m, hidden, (int64_t)args[0].heads * args[0].v_dim);\
            rmsnorm_rows_##SUFFIX(x, norm2, normed, m, hidden, eps);                                      \
            if (gate_up) mlp_rows_##SUFFIX(normed, gate_up, down, x, 1, gate_up_out, act, m, hidden, inter);\
        }                                                                                                 \
    }

DECODE_KERNELS(f32, float, dot_f32, head_dot_f32, head_axpy_f32, identity_f32, identity_f32)
DECODE_KERNELS(bf16, uint16_t, dot_bf16, head_dot_bf16, head_axpy_bf16, bf16_to_f32, f32_to_bf16)

/* ---------------------------------------------------------------- argmax of float32 logits */
/* out[r] = the index of the first largest value of row r of x [rows, n], as torch.argmax picks
 * it (for finite and -inf values), in one vectorized pass: torch's CPU argmax over a 150k
 * vocabulary takes 140 us, a tenth of that here. */
void argmax_rows_f32(const float *x, int rows, int64_t n, int64_t *out) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (int64_t)r * n;
        int64_t best = 0, j = 0;
        float top = row[0];
#if defined(MIMO_AVX512F)
        if (n >= 16 && n < ((int64_t)1 << 31)) {
            __m512 peak = _mm512_loadu_ps(row);
            __m512i where = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            __m512i index = where;
            const __m512i step = _mm512_set1_epi32(16);
            for (j = 16; j + 16 <= n; j += 16) {
                index = _mm512_add_epi32(index, step);
                __m512 v = _mm512_loadu_ps(row + j);
                __mmask16 greater = _mm512_cmp_ps_mask(v, peak, _CMP_GT_OQ);
                peak = _mm512_mask_mov_ps(peak, greater, v);
                where = _mm512_mask_mov_epi32(where, greater, index);
            }
            top = _mm512_reduce_max_ps(peak);
            best = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(peak, _mm512_set1_ps(top), _CMP_EQ_OQ), where);
        }
#elif defined(MIMO_AVX2)
        if (n >= 8 && n < ((int64_t)1 << 31)) {
            __m256 peak = _mm256_loadu_ps(row);
            __m256i where = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            __m256i index = where;
            const __m256i step = _mm256_set1_epi32(8);
            for (j = 8; j + 8 <= n; j += 8) {
                index = _mm256_add_epi32(index, step);
                __m256 v = _mm256_loadu_ps(row + j);
                __m256 greater = _mm256_cmp_ps(v, peak, _CMP_GT_OQ);
                peak = _mm256_blendv_ps(peak, v, greater);
                where = _mm256_castps_si256(
                    _mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(index), greater));
            }
            float peaks[8];
            int32_t wheres[8];
            _mm256_storeu_ps(peaks, peak);
            _mm256_storeu_si256((__m256i *)wheres, where);
            top = peaks[0];
            for (int lane = 1; lane < 8; lane++) top = peaks[lane] > top ? peaks[lane] : top;
            best = n; /* each lane holds the first index of its own peak: the smallest of the tied lanes */
            for (int lane = 0; lane < 8; lane++)
                if (peaks[lane] == top && wheres[lane] < best) best = wheres[lane];
        }
#endif
        for (; j < n; j++)
            if (row[j] > top) { top = row[j]; best = j; }
        out[r] = best;
    }
}

/* ---------------------------------------------------------------- prefill attention (global layers) */
#include "prefill_attention.c"
