/* Decode matmuls on packed integer weights: y[M,N] = x[M,K] . dequant(W)[N,K]^T, M small (1..16).
 *
 * Same plan as cpu_linear.c: threads take chunks of output rows, each row of W is streamed once
 * and applied to every row of x (float32, from L1). Each block of weights is dequantized once in
 * registers and used for all M rows of x; the result equals dequantize-then-matmul up to float
 * rounding. Layouts are documented in quant.py. Built once per ISA level as cpu_linear.c is: the
 * AVX-512 paths (VNNI where the CPU has it), AVX2+FMA paths, NEON byte dot products (dotprod, i8mm),
 * or plain C.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
/* decoder_layer_batch_bf16 and its per-step functions, the vector helpers (vsum...) and the ISA macros
 * (MIMO_AVX2...): one compilation unit with the kernels below. */
#include "cpu_linear.c"

/* Integer dot products for bfloat16 activations quantized once per call: 512 (AVX512-VNNI), 256
 * (AVX2: AVX-VNNI's vpdpbusd / vpdpwssd where the CPU has it, else vpmaddubsw / vpmaddwd, the same
 * integer sums in more instructions), 128 (NEON sdot, with usdot where the CPU has i8mm) or 1
 * (plain C, which the compiler vectorizes for the target it has, e.g. baseline NEON). */
#if defined(MIMO_AVX512VNNI)
#define INT_DOT 512
#elif defined(MIMO_AVX2)
#define INT_DOT 256
#elif defined(MIMO_NEON_DOTPROD)
#define INT_DOT 128
#else
#define INT_DOT 1
#endif

#define TOKENS_PER_PASS 4
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* For each pass over up to TOKENS_PER_PASS rows of x (from row `first`): ROW(T) with the pass's
 * token count T as a compile-time constant (so the accumulators stay in registers), which fills
 * sums[0..T); then STORE for each t < tokens. */
#define EACH_TOKEN_PASS(m, ROW, STORE)                                                          \
    for (int first = 0; first < (m); first += TOKENS_PER_PASS) {                                \
        int tokens = (m) - first < TOKENS_PER_PASS ? (m) - first : TOKENS_PER_PASS;             \
        switch (tokens) {                                                                       \
            case 1: ROW(1); break;                                                              \
            case 2: ROW(2); break;                                                              \
            case 3: ROW(3); break;                                                              \
            default: ROW(4); break;                                                             \
        }                                                                                       \
        for (int t = 0; t < tokens; t++) STORE;                                                 \
    }

static inline float bf16_value(uint16_t v) {
    uint32_t bits = ((uint32_t)v) << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* ---------------------------------------------------------------- int8, one scale per row */
ALWAYS_INLINE void int8_row(const int8_t *w, const float *x, int64_t k, int tokens, float *sums) {
    int64_t j = 0;
#if defined(MIMO_AVX512F)
    __m512 acc[TOKENS_PER_PASS][2];
    for (int t = 0; t < tokens; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (; j + 32 <= k; j += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j + 16))));
        for (int t = 0; t < tokens; t++) {
            acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * k + j), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * k + j + 16), acc[t][1]);
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
#elif defined(MIMO_AVX2)
    __m256 acc[TOKENS_PER_PASS][2];
    for (int t = 0; t < tokens; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + j))));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + j + 8))));
        for (int t = 0; t < tokens; t++) {
            acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * k + j), acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * k + j + 8), acc[t][1]);
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = hsum256(_mm256_add_ps(acc[t][0], acc[t][1]));
#else
    for (int t = 0; t < tokens; t++) sums[t] = 0.f;
#endif
    for (; j < k; j++)
        for (int t = 0; t < tokens; t++) sums[t] += (float)w[j] * x[t * k + j];
}

/* int8 weights with bfloat16 x, on 16-bit integer dot products (AVX512-VNNI vpdpwssd, or AVX2
 * vpmaddwd): x is quantized once per call to int16 with one scale per token (absolute error <=
 * max|x| / 65534, far below bfloat16's own rounding of all but the smallest elements), weights
 * widen to int16, and each instruction does 32 (16) multiply-adds into int32 lanes. The int32 sums
 * move to float32 every 2048 inputs, before they could overflow (128 products of at most
 * 127 * 32767 per lane). Needs k % 64 == 0. */
/* One float32 row x [K] -> int16 xq (max |x| maps to 32767); returns the row's scale. */
static float quantize_row_int16(const float *x, int16_t *xq, int64_t k) {
    float peak = 0.f;
    for (int64_t j = 0; j < k; j++) { float v = fabsf(x[j]); peak = v > peak ? v : peak; }
    float scale = peak > 0.f ? peak / 32767.f : 1.f, inverse = 1.f / scale;
    for (int64_t j = 0; j < k; j++) xq[j] = (int16_t)lrintf(x[j] * inverse);
    return scale;
}

/* bfloat16 rows x [M, K] -> int16 xq with one scale per row (max |x| maps to 32767). */
static void quantize_x_int16(const uint16_t *x, int16_t *xq, float *x_scale, int m, int64_t k) {
    for (int t = 0; t < m; t++) {
        float peak = 0.f;
        for (int64_t j = 0; j < k; j++) { float v = fabsf(bf16_value(x[t * k + j])); peak = v > peak ? v : peak; }
        x_scale[t] = peak > 0.f ? peak / 32767.f : 1.f;
        float inverse = 1.f / x_scale[t];
        for (int64_t j = 0; j < k; j++) xq[t * k + j] = (int16_t)lrintf(bf16_value(x[t * k + j]) * inverse);
    }
}

#define INT8_FLUSH 2048
/* Independent accumulators per token: few tokens need four chains to hide the dot product's
 * latency; more tokens have enough chains between them (and four each would spill registers). */
#define INT8_CHAINS(tokens) ((tokens) <= 2 ? 4 : 2)
#if INT_DOT == 256
ALWAYS_INLINE void int8_row_int16(const int8_t *w, const int16_t *x, int64_t k, int tokens, float *sums) {
    const int chains = INT8_CHAINS(tokens);
    __m256 acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t chunk = 0; chunk < k; chunk += INT8_FLUSH) {
        int64_t end = chunk + INT8_FLUSH < k ? chunk + INT8_FLUSH : k;
        __m256i exact[TOKENS_PER_PASS][4];
        for (int t = 0; t < tokens; t++)
            for (int c = 0; c < chains; c++) exact[t][c] = _mm256_setzero_si256();
        for (int64_t j = chunk; j < end; j += 64) {
            __m256i wv[4];
            for (int c = 0; c < 4; c++) wv[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j + 16 * c)));
            for (int t = 0; t < tokens; t++) {
                const __m256i *xt = (const __m256i *)(x + t * k + j);
                for (int c = 0; c < 4; c++) {
                    __m256i *e = &exact[t][c % chains];
#if defined(MIMO_AVXVNNI)
                    *e = _mm256_dpwssd_avx_epi32(*e, wv[c], _mm256_loadu_si256(xt + c));
#else
                    *e = _mm256_add_epi32(*e, _mm256_madd_epi16(wv[c], _mm256_loadu_si256(xt + c)));
#endif
                }
            }
        }
        for (int t = 0; t < tokens; t++) {
            __m256i total = exact[t][0];
            for (int c = 1; c < chains; c++) total = _mm256_add_epi32(total, exact[t][c]);
            acc[t] = _mm256_add_ps(acc[t], _mm256_cvtepi32_ps(total));
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = hsum256(acc[t]);
}
#elif INT_DOT == 512
ALWAYS_INLINE void int8_row_int16(const int8_t *w, const int16_t *x, int64_t k, int tokens, float *sums) {
    const int chains = INT8_CHAINS(tokens);
    __m512 acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t chunk = 0; chunk < k; chunk += INT8_FLUSH) {
        int64_t end = chunk + INT8_FLUSH < k ? chunk + INT8_FLUSH : k;
        __m512i exact[TOKENS_PER_PASS][4];
        for (int t = 0; t < tokens; t++)
            for (int c = 0; c < chains; c++) exact[t][c] = _mm512_setzero_si512();
        int64_t j = chunk;
        for (; j + 128 <= end; j += 128) {
            __m512i wv[4];
            for (int c = 0; c < 4; c++) wv[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j + 32 * c)));
            for (int t = 0; t < tokens; t++)
                for (int c = 0; c < 4; c++)
                    exact[t][c % chains] = _mm512_dpwssd_epi32(exact[t][c % chains], wv[c],
                                                               _mm512_loadu_si512(x + t * k + j + 32 * c));
        }
        for (; j < end; j += 64) { /* k is a multiple of 64 */
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j + 32)));
            for (int t = 0; t < tokens; t++) {
                exact[t][0] = _mm512_dpwssd_epi32(exact[t][0], w0, _mm512_loadu_si512(x + t * k + j));
                exact[t][1] = _mm512_dpwssd_epi32(exact[t][1], w1, _mm512_loadu_si512(x + t * k + j + 32));
            }
        }
        for (int t = 0; t < tokens; t++) {
            __m512i total = exact[t][0];
            for (int c = 1; c < chains; c++) total = _mm512_add_epi32(total, exact[t][c]);
            acc[t] = _mm512_add_ps(acc[t], _mm512_cvtepi32_ps(total));
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(acc[t]);
}
#elif INT_DOT == 128
/* NEON has byte dot products only: each int16 input is 256 * hi + lo, hi its signed high byte and lo
 * its unsigned low byte (vld2q_s8 splits 16 inputs so), and w . x = 256 * (w . hi) + w . lo. usdot
 * (i8mm) takes lo as it is; sdot takes lo - 128 (its top bit flipped) and 128 * sum(w), the same for
 * every token, is added back. A lane's exact sum over INT8_FLUSH inputs (512 products of at most
 * 128 * 32767) fits int32; its parts wrap modulo 2^32 and add up to it. */
ALWAYS_INLINE void int8_row_int16(const int8_t *w, const int16_t *x, int64_t k, int tokens, float *sums) {
    float32x4_t acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = vdupq_n_f32(0.f);
    for (int64_t chunk = 0; chunk < k; chunk += INT8_FLUSH) {
        int64_t end = chunk + INT8_FLUSH < k ? chunk + INT8_FLUSH : k;
        int32x4_t high[TOKENS_PER_PASS], low[TOKENS_PER_PASS];
        for (int t = 0; t < tokens; t++) high[t] = low[t] = vdupq_n_s32(0);
#if !defined(MIMO_NEON_I8MM)
        const int8x16_t ones = vdupq_n_s8(1), top_bit = vdupq_n_s8(-128);
        int32x4_t weight_sum = vdupq_n_s32(0);
#endif
        for (int64_t j = chunk; j < end; j += 16) {
            int8x16_t wv = vld1q_s8(w + j);
#if !defined(MIMO_NEON_I8MM)
            weight_sum = vdotq_s32(weight_sum, wv, ones);
#endif
            for (int t = 0; t < tokens; t++) {
                int8x16x2_t bytes = vld2q_s8((const int8_t *)(x + t * k + j)); /* [0]: low bytes, [1]: high */
                high[t] = vdotq_s32(high[t], wv, bytes.val[1]);
#if defined(MIMO_NEON_I8MM)
                low[t] = vusdotq_s32(low[t], vreinterpretq_u8_s8(bytes.val[0]), wv);
#else
                low[t] = vdotq_s32(low[t], wv, veorq_s8(bytes.val[0], top_bit));
#endif
            }
        }
        for (int t = 0; t < tokens; t++) {
            int32x4_t exact = vaddq_s32(vshlq_n_s32(high[t], 8), low[t]);
#if !defined(MIMO_NEON_I8MM)
            exact = vaddq_s32(exact, vshlq_n_s32(weight_sum, 7));
#endif
            acc[t] = vaddq_f32(acc[t], vcvtq_f32_s32(exact));
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = vaddvq_f32(acc[t]);
}
#else
ALWAYS_INLINE void int8_row_int16(const int8_t *w, const int16_t *x, int64_t k, int tokens, float *sums) {
    for (int t = 0; t < tokens; t++) {
        int64_t exact = 0; /* exact: at most k * 127 * 32767 */
        for (int64_t j = 0; j < k; j++) exact += (int32_t)w[j] * x[t * k + j];
        sums[t] = (float)exact;
    }
}
#endif

/* y[index] = value, as float32 or (y_bf16) rounded to bfloat16 as torch rounds */
static inline void store_out(void *y, int y_bf16, int64_t index, float value) {
    if (y_bf16) ((uint16_t *)y)[index] = f32_to_bf16(value);
    else ((float *)y)[index] = value;
}

int linear_int8_bf16(const uint16_t *x, const int8_t *w, const float *scales, const float *bias, void *y, int m,
                     int64_t n, int64_t k, int y_bf16) {
    if (k % 64) return 0;
    int16_t *xq = malloc(sizeof(int16_t) * m * k);
    float *x_scale = malloc(sizeof(float) * m);
    if (!xq || !x_scale) { free(xq); free(x_scale); return 0; }
    quantize_x_int16(x, xq, x_scale, m, k);
#pragma omp parallel for schedule(guided, 32)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *wr = w + row * k;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
#define ROW(T) int8_row_int16(wr, xq + (int64_t)first * k, k, T, sums)
        EACH_TOKEN_PASS(m, ROW, store_out(y, y_bf16, (int64_t)(first + t) * n + row,
                                          sums[t] * x_scale[first + t] * scales[row] + b))
#undef ROW
    }
    free(xq);
    free(x_scale);
    return 1;
}

void linear_int8(const float *x, const int8_t *w, const float *scales, const float *bias, float *y, int m,
                 int64_t n, int64_t k) {
#pragma omp parallel for schedule(guided, 32)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *wr = w + row * k;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
#define ROW(T) int8_row(wr, x + (int64_t)first * k, k, T, sums)
        EACH_TOKEN_PASS(m, ROW, y[(int64_t)(first + t) * n + row] = sums[t] * scales[row] + b)
#undef ROW
    }
}

/* ---------------------------------------------------------------- int4, groups with scale and zero
 * Byte j of a row holds inputs 2j (low nibble) and 2j+1 (high nibble). The caller passes x split
 * into its even inputs (x_even [M, K/2]) and odd inputs (x_odd [M, K/2]) so that a 16-byte block
 * of weights meets two contiguous 16-float vectors. Within a group, w = q * s - z * s: one fused
 * multiply-add dequantizes 16 weights. */
ALWAYS_INLINE void int4_row(const uint8_t *w, const float *scales, const float *zeros, const float *x_even,
                            const float *x_odd, int64_t k, int64_t group, int tokens, float *sums) {
    int64_t half = k / 2;
#if defined(MIMO_AVX512F)
    if (group % 32 == 0) {
        const __m512i low_mask = _mm512_set1_epi32(0x0F);
        __m512 acc[TOKENS_PER_PASS][2];
        for (int t = 0; t < tokens; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (int64_t g = 0; g < k / group; g++) {
            __m512 scale = _mm512_set1_ps(scales[g]);
            __m512 offset = _mm512_set1_ps(-zeros[g] * scales[g]);
            for (int64_t j = g * group / 2; j < (g + 1) * group / 2; j += 16) {
                __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + j)));
                __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low_mask)), scale, offset);
                __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), scale, offset);
                for (int t = 0; t < tokens; t++) {
                    acc[t][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x_even + t * half + j), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x_odd + t * half + j), acc[t][1]);
                }
            }
        }
        for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
        return;
    }
#elif defined(MIMO_AVX2)
    if (group % 16 == 0) {
        const __m256i low_mask = _mm256_set1_epi32(0x0F);
        __m256 acc[TOKENS_PER_PASS][2];
        for (int t = 0; t < tokens; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int64_t g = 0; g < k / group; g++) {
            __m256 scale = _mm256_set1_ps(scales[g]);
            __m256 offset = _mm256_set1_ps(-zeros[g] * scales[g]);
            for (int64_t j = g * group / 2; j < (g + 1) * group / 2; j += 8) {
                __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + j)));
                __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low_mask)), scale, offset);
                __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), scale, offset);
                for (int t = 0; t < tokens; t++) {
                    acc[t][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x_even + t * half + j), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x_odd + t * half + j), acc[t][1]);
                }
            }
        }
        for (int t = 0; t < tokens; t++) sums[t] = hsum256(_mm256_add_ps(acc[t][0], acc[t][1]));
        return;
    }
#endif
    for (int t = 0; t < tokens; t++) sums[t] = 0.f;
    for (int64_t j = 0; j < half; j++) {
        int64_t g = 2 * j / group;
        float lo = ((float)(w[j] & 0x0F) - zeros[g]) * scales[g];
        float hi = ((float)(w[j] >> 4) - zeros[g]) * scales[g];
        for (int t = 0; t < tokens; t++) sums[t] += lo * x_even[t * half + j] + hi * x_odd[t * half + j];
    }
}

/* The same for bfloat16 x, on byte dot products (AVX512-VNNI vpdpbusd: 64 multiply-adds of
 * unsigned bytes by signed bytes per instruction; AVX2: vpmaddubsw then vpmaddwd, exact here since
 * a pair of products is at most 2 * 15 * 127 in int16). The nibbles are the unsigned bytes as they are;
 * x is quantized once per call to int8 with one scale per group of inputs (as llama.cpp quantizes
 * activations for its k-quants; the error is at most half a step, max|x_group| / 254, per input),
 * split into its even inputs (meeting the low nibbles) and odd inputs (the high nibbles).
 * Per group: s * (sx * (xq . q) - z * sx * sum(xq)). Needs group % 128 == 0. */
static void quantize_x_int8(const float *x, int8_t *even, int8_t *odd, float *x_scales, float *x_sums, int64_t k,
                            int64_t group) {
    for (int64_t g = 0; g < k / group; g++) {
        float peak = 0.f;
        for (int64_t j = g * group; j < (g + 1) * group; j++) {
            float v = fabsf(x[j]);
            peak = v > peak ? v : peak;
        }
        float scale = peak > 0.f ? peak / 127.f : 1.f, inverse = 1.f / scale;
        int sum = 0;
        for (int64_t j = g * group; j < (g + 1) * group; j++) {
            int q = (int)lrintf(x[j] * inverse);
            (j % 2 ? odd : even)[j / 2] = (int8_t)q;
            sum += q;
        }
        x_scales[g] = scale;
        x_sums[g] = scale * (float)sum;
    }
}

/* quantize_x_int8 for bfloat16 rows x [M, K]: halves x_even/x_odd [M, K/2], x_scales/x_sums [M, K/group]. */
static void quantize_rows_int8(const uint16_t *x, int m, int64_t k, int64_t group, int8_t *x_even, int8_t *x_odd,
                               float *x_scales, float *x_sums) {
    const int64_t groups = k / group, half = k / 2;
    float row[k];
    for (int t = 0; t < m; t++) {
        for (int64_t j = 0; j < k; j++) row[j] = bf16_value(x[(int64_t)t * k + j]);
        quantize_x_int8(row, x_even + t * half, x_odd + t * half, x_scales + t * groups, x_sums + t * groups, k, group);
    }
}

/* Each token's arithmetic is the same whatever the pass's token count, so a row gives one token
 * the same bits in a 1-token decode step and in a k-token verify step (MTP stays exact). */
#if INT_DOT == 256
ALWAYS_INLINE void int4_row_vnni(const uint8_t *w, const float *scales, const float *zeros, const int8_t *x_even,
                                 const int8_t *x_odd, const float *x_scales, const float *x_sums, int64_t k,
                                 int64_t groups, int64_t blocks_per_group, int tokens, float *sums) {
    const int64_t half = k / 2;
    const __m256i low_mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[TOKENS_PER_PASS];
    float offset[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) { acc[t] = _mm256_setzero_ps(); offset[t] = 0.f; }
    for (int64_t g = 0; g < groups; g++) {
        __m256i exact[TOKENS_PER_PASS];
        for (int t = 0; t < tokens; t++) exact[t] = _mm256_setzero_si256();
        for (int64_t j = g * blocks_per_group * 64; j < (g + 1) * blocks_per_group * 64; j += 32) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + j));
            __m256i lo = _mm256_and_si256(bytes, low_mask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
            for (int t = 0; t < tokens; t++) {
                __m256i even = _mm256_loadu_si256((const __m256i *)(x_even + t * half + j));
                __m256i odd = _mm256_loadu_si256((const __m256i *)(x_odd + t * half + j));
#if defined(MIMO_AVXVNNI)
                exact[t] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(exact[t], lo, even), hi, odd);
#else /* no int16 overflow: |15 * 128| * 4 < 2^15 */
                __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
                exact[t] = _mm256_add_epi32(exact[t], _mm256_madd_epi16(pairs, ones));
#endif
            }
        }
        for (int t = 0; t < tokens; t++) {
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact[t]), _mm256_set1_ps(scales[g] * x_scales[t * groups + g]),
                                     acc[t]);
            offset[t] += scales[g] * zeros[g] * x_sums[t * groups + g];
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = hsum256(acc[t]) - offset[t];
}
#elif INT_DOT == 512
ALWAYS_INLINE void int4_row_vnni(const uint8_t *w, const float *scales, const float *zeros, const int8_t *x_even,
                                 const int8_t *x_odd, const float *x_scales, const float *x_sums, int64_t k,
                                 int64_t groups, int64_t blocks_per_group, int tokens, float *sums) {
    const int64_t half = k / 2;
    const __m512i low_mask = _mm512_set1_epi8(0x0F);
    __m512 acc[TOKENS_PER_PASS];
    float offset[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) { acc[t] = _mm512_setzero_ps(); offset[t] = 0.f; }
    for (int64_t g = 0; g < groups; g++) {
        __m512i exact[TOKENS_PER_PASS];
        for (int t = 0; t < tokens; t++) exact[t] = _mm512_setzero_si512();
        for (int64_t j = g * blocks_per_group * 64; j < (g + 1) * blocks_per_group * 64; j += 64) {
            __m512i bytes = _mm512_loadu_si512(w + j);
            __m512i lo = _mm512_and_si512(bytes, low_mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask);
            for (int t = 0; t < tokens; t++) {
                exact[t] = _mm512_dpbusd_epi32(exact[t], lo, _mm512_loadu_si512(x_even + t * half + j));
                exact[t] = _mm512_dpbusd_epi32(exact[t], hi, _mm512_loadu_si512(x_odd + t * half + j));
            }
        }
        for (int t = 0; t < tokens; t++) {
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact[t]), _mm512_set1_ps(scales[g] * x_scales[t * groups + g]),
                                     acc[t]);
            offset[t] += scales[g] * zeros[g] * x_sums[t * groups + g];
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(acc[t]) - offset[t];
}
#elif INT_DOT == 128
/* sdot: the nibbles (0..15) are signed bytes as they are; low and high nibbles in two int32 chains. */
ALWAYS_INLINE void int4_row_vnni(const uint8_t *w, const float *scales, const float *zeros, const int8_t *x_even,
                                 const int8_t *x_odd, const float *x_scales, const float *x_sums, int64_t k,
                                 int64_t groups, int64_t blocks_per_group, int tokens, float *sums) {
    const int64_t half = k / 2;
    const uint8x16_t low_mask = vdupq_n_u8(0x0F);
    float32x4_t acc[TOKENS_PER_PASS];
    float offset[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) { acc[t] = vdupq_n_f32(0.f); offset[t] = 0.f; }
    for (int64_t g = 0; g < groups; g++) {
        int32x4_t exact_lo[TOKENS_PER_PASS], exact_hi[TOKENS_PER_PASS];
        for (int t = 0; t < tokens; t++) exact_lo[t] = exact_hi[t] = vdupq_n_s32(0);
        for (int64_t j = g * blocks_per_group * 64; j < (g + 1) * blocks_per_group * 64; j += 16) {
            uint8x16_t bytes = vld1q_u8(w + j);
            int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(bytes, low_mask));
            int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4));
            for (int t = 0; t < tokens; t++) {
                exact_lo[t] = vdotq_s32(exact_lo[t], lo, vld1q_s8(x_even + t * half + j));
                exact_hi[t] = vdotq_s32(exact_hi[t], hi, vld1q_s8(x_odd + t * half + j));
            }
        }
        for (int t = 0; t < tokens; t++) {
            acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(vaddq_s32(exact_lo[t], exact_hi[t])),
                               vdupq_n_f32(scales[g] * x_scales[t * groups + g]));
            offset[t] += scales[g] * zeros[g] * x_sums[t * groups + g];
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = vaddvq_f32(acc[t]) - offset[t];
}
#else
ALWAYS_INLINE void int4_row_vnni(const uint8_t *w, const float *scales, const float *zeros, const int8_t *x_even,
                                 const int8_t *x_odd, const float *x_scales, const float *x_sums, int64_t k,
                                 int64_t groups, int64_t blocks_per_group, int tokens, float *sums) {
    const int64_t half = k / 2, group_bytes = blocks_per_group * 64;
    for (int t = 0; t < tokens; t++) {
        float acc = 0.f, offset = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            int32_t exact = 0;
            for (int64_t j = g * group_bytes; j < (g + 1) * group_bytes; j++)
                exact += (w[j] & 0x0F) * x_even[t * half + j] + (w[j] >> 4) * x_odd[t * half + j];
            acc += (float)exact * (scales[g] * x_scales[t * groups + g]);
            offset += scales[g] * zeros[g] * x_sums[t * groups + g];
        }
        sums[t] = acc - offset;
    }
}
#endif

int linear_int4_bf16(const uint16_t *x, const uint8_t *w, const float *scales, const float *zeros,
                     const float *bias, void *y, int m, int64_t n, int64_t k, int64_t group, int y_bf16) {
    if (group % 128) return 0;
    const int64_t groups = k / group, half = k / 2, blocks_per_group = group / 128;
    int8_t *x_even = malloc((size_t)m * k);
    float *x_scales = malloc(sizeof(float) * m * groups * 2);
    if (!x_even || !x_scales) { free(x_even); free(x_scales); return 0; }
    int8_t *x_odd = x_even + (int64_t)m * half;
    float *x_sums = x_scales + (int64_t)m * groups;
    quantize_rows_int8(x, m, k, group, x_even, x_odd, x_scales, x_sums);
#pragma omp parallel for schedule(guided, 32)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *wr = w + row * half;
        const float *sr = scales + row * groups, *zr = zeros + row * groups;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
#define ROW(T)                                                                                    \
    int4_row_vnni(wr, sr, zr, x_even + (int64_t)first * half, x_odd + (int64_t)first * half,             \
                  x_scales + (int64_t)first * groups, x_sums + (int64_t)first * groups, k, groups,       \
                  blocks_per_group, T, sums)
        EACH_TOKEN_PASS(m, ROW, store_out(y, y_bf16, (int64_t)(first + t) * n + row, sums[t] + b))
#undef ROW
    }
    free(x_even);
    free(x_scales);
    return 1;
}

void linear_int4(const float *x_even, const float *x_odd, const uint8_t *w, const float *scales,
                 const float *zeros, const float *bias, float *y, int m, int64_t n, int64_t k, int64_t group) {
    int64_t groups = k / group, half = k / 2;
#pragma omp parallel for schedule(guided, 32)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *wr = w + row * half;
        const float *sr = scales + row * groups, *zr = zeros + row * groups;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
#define ROW(T) int4_row(wr, sr, zr, x_even + (int64_t)first * half, x_odd + (int64_t)first * half, k, group, T, sums)
        EACH_TOKEN_PASS(m, ROW, y[(int64_t)(first + t) * n + row] = sums[t] + b)
#undef ROW
    }
}

/* ---------------------------------------------------------------- prefill GEMM on integer dot products
 * y[M, N] = x . W^T (+ bias) for many rows of bfloat16 x (a prefill chunk) and int8 (format 8) or
 * int4 (format 4) weights, the way llama.cpp multiplies its k-quants: x is quantized to int8 with one
 * scale per group of inputs (int4: the weights' groups, so each token's codes are those of
 * quantize_x_int8, as decode has them; int8: groups of 128), and blocks of GEMM_TOKENS tokens by
 * GEMM_COLUMNS output columns are summed in int32 lanes (AVX512-VNNI vpdpbusd, AVX-VNNI, AVX2
 * vpmaddubsw + vpmaddwd for int4, else plain C), one lane per output column, 4 inputs per lane.
 *
 * Each column block of W is first repacked by one thread into `words` [K/4][GEMM_COLUMNS] (4 unsigned
 * weight codes per uint32 word), then reused by every token: int4 words are the low (high) nibbles
 * of 4 packed bytes, i.e. inputs 0,2,4,6 (1,3,5,7) of each 8, so x's codes are stored in that order;
 * int8 words are 4 weights plus 128 (unsigned), the 128 * sum(x codes) taken off with the zeros.
 * Per group g, token t and column c, with x = x_scale * codes and W = scale * (code - zero):
 *   acc = fma(exact, scale * x_scale, acc); acc = fma(-scale * zero, x_scale * sum(codes), acc)
 * in this order in every build (lanes never mix columns), so every build gives the same bits, and
 * reference_gemm in quant.py reproduces them. */
#if INT_DOT == 512
#define GEMM_COLUMNS 32
#define GEMM_TOKENS 12 /* 24 int32 accumulators, 2 weight vectors, of 32 registers */
#else
#define GEMM_COLUMNS 16
#define GEMM_TOKENS 6 /* 12 accumulators, 2 weight vectors, of 16 */
#endif
#define GEMM_INT8_GROUP 128

/* One group of bfloat16 inputs -> int8 codes (int4: each 8 inputs reordered 0,2,4,6,1,3,5,7), as
 * quantize_x_int8 makes them (the vector conversions round to nearest even, as lrintf does);
 * returns the sum of the codes. */
static int gemm_quantize_group(const uint16_t *x, int64_t group, int interleave, float inverse, int8_t *out) {
    int sum = 0;
    int64_t j = 0;
#if defined(MIMO_AVX512F)
    const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    __m512i sums = _mm512_setzero_si512();
    for (; j + 16 <= group; j += 16) {
        __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + j))), 16);
        __m512 v = _mm512_castsi512_ps(bits);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inverse)));
        sums = _mm512_add_epi32(sums, q);
        if (interleave) q = _mm512_permutexvar_epi32(order, q);
        _mm_storeu_si128((__m128i *)(out + j), _mm512_cvtsepi32_epi8(q));
    }
    sum = _mm512_reduce_add_epi32(sums);
#elif defined(MIMO_AVX2)
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    __m256i sums = _mm256_setzero_si256();
    for (; j + 8 <= group; j += 8) {
        __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + j))), 16);
        __m256 v = _mm256_castsi256_ps(bits);
        __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v, _mm256_set1_ps(inverse)));
        sums = _mm256_add_epi32(sums, q);
        if (interleave) q = _mm256_permutevar8x32_epi32(q, order);
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256()); /* 4 codes per lane */
        _mm_storel_epi64((__m128i *)(out + j),
                         _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)));
    }
    __m128i half = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4E));
    sum = _mm_cvtsi128_si32(_mm_add_epi32(half, _mm_shuffle_epi32(half, 0xB1)));
#endif
    for (; j < group; j++) {
        int q = (int)lrintf(bf16_value(x[j]) * inverse);
        out[interleave ? (j & ~7) + (j & 1) * 4 + (j & 7) / 2 : j] = (int8_t)q;
        sum += q;
    }
    return sum;
}

/* bfloat16 x [M, K] -> int8 codes [M, K] (gemm_quantize_group), x_scales and x_sums [M, K/group] as
 * quantize_x_int8 makes them. */
static void gemm_quantize_x(const uint16_t *x, int m, int64_t k, int64_t group, int interleave, int8_t *codes,
                            float *x_scales, float *x_sums) {
    const int64_t groups = k / group;
#pragma omp for schedule(static)
    for (int t = 0; t < m; t++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xg = x + (int64_t)t * k + g * group;
            uint16_t peak_bits = 0; /* |x| as bfloat16 bits: ordered as the values are */
            for (int64_t j = 0; j < group; j++) {
                uint16_t v = xg[j] & 0x7FFF;
                peak_bits = v > peak_bits ? v : peak_bits;
            }
            float peak = bf16_value(peak_bits);
            float scale = peak > 0.f ? peak / 127.f : 1.f;
            int sum = gemm_quantize_group(xg, group, interleave, 1.f / scale, codes + (int64_t)t * k + g * group);
            x_scales[t * groups + g] = scale;
            x_sums[t * groups + g] = scale * (float)sum;
        }
    }
}

/* Columns [first, first + GEMM_COLUMNS) of W into words, scales and offsets ([groups][GEMM_COLUMNS]:
 * scale, scale * zero); columns past n get zero weights and scales. */
static void gemm_pack(int format, const void *w, const float *scales, const float *zeros, int64_t n, int64_t k,
                      int64_t group, int64_t first, uint32_t *words, float *col_scales, float *col_offsets) {
    const int64_t groups = k / group;
    for (int c = 0; c < GEMM_COLUMNS; c++) {
        int64_t row = first + c;
        if (row >= n) {
            for (int64_t s = 0; s < k / 4; s++) words[s * GEMM_COLUMNS + c] = 0;
            for (int64_t g = 0; g < groups; g++)
                col_scales[g * GEMM_COLUMNS + c] = col_offsets[g * GEMM_COLUMNS + c] = 0.f;
            continue;
        }
        if (format == 8) {
            const uint8_t *wr = (const uint8_t *)w + row * k;
            for (int64_t s = 0; s < k / 4; s++) {
                uint32_t p;
                memcpy(&p, wr + 4 * s, 4);
                words[s * GEMM_COLUMNS + c] = p ^ 0x80808080u;
            }
            for (int64_t g = 0; g < groups; g++) {
                col_scales[g * GEMM_COLUMNS + c] = scales[row];
                col_offsets[g * GEMM_COLUMNS + c] = scales[row] * 128.f;
            }
        } else {
            const uint8_t *wr = (const uint8_t *)w + row * (k / 2);
            for (int64_t s = 0; s < k / 8; s++) {
                uint32_t p;
                memcpy(&p, wr + 4 * s, 4);
                words[2 * s * GEMM_COLUMNS + c] = p & 0x0F0F0F0Fu;
                words[(2 * s + 1) * GEMM_COLUMNS + c] = (p >> 4) & 0x0F0F0F0Fu;
            }
            for (int64_t g = 0; g < groups; g++) {
                float s = scales[row * groups + g];
                col_scales[g * GEMM_COLUMNS + c] = s;
                col_offsets[g * GEMM_COLUMNS + c] = s * zeros[row * groups + g];
            }
        }
    }
}

/* tile[t][c] for GEMM_TOKENS tokens (codes, scales, sums from token 0) against a packed column block.
 * `wide_products`: whether a pair of products may exceed int16 (int8 weights), which the AVX2 path
 * without AVX-VNNI cannot sum (it then takes the plain C loop). The vector paths name each
 * accumulator (EACH_GEMM_TOKEN) so that the compiler keeps them all in registers. */
#if GEMM_TOKENS == 12
#define EACH_GEMM_TOKEN(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#else
#define EACH_GEMM_TOKEN(M) M(0) M(1) M(2) M(3) M(4) M(5)
#endif
#if INT_DOT == 512
#define GEMM_VEC __m512i
#define GEMM_LANES 16
#define GEMM_ZERO() _mm512_setzero_si512()
#define GEMM_LOAD(p) _mm512_loadu_si512(p)
#define GEMM_BROADCAST(v) _mm512_set1_epi32(v)
#define GEMM_DOT(acc, w, x) _mm512_dpbusd_epi32(acc, w, x)
#define GEMM_ACCUMULATE(out, exact, scale, offset, x_scale, x_sum)                                             \
    _mm512_storeu_ps(out, _mm512_fnmadd_ps(offset, _mm512_set1_ps(x_sum),                                     \
                                           _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact),                         \
                                                           _mm512_mul_ps(scale, _mm512_set1_ps(x_scale)),     \
                                                           _mm512_loadu_ps(out))))
#define GEMM_FLOATS(p) _mm512_loadu_ps(p)
#define GEMM_STORE(p, v) _mm512_storeu_si512(p, v)
#elif INT_DOT == 256
#define GEMM_VEC __m256i
#define GEMM_LANES 8
#define GEMM_ZERO() _mm256_setzero_si256()
#define GEMM_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define GEMM_BROADCAST(v) _mm256_set1_epi32(v)
#if defined(MIMO_AVXVNNI)
#define GEMM_DOT(acc, w, x) _mm256_dpbusd_avx_epi32(acc, w, x)
#else /* nibbles only: a pair's products are at most 2 * 15 * 127, no int16 saturation */
#define GEMM_DOT(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)))
#endif
#define GEMM_ACCUMULATE(out, exact, scale, offset, x_scale, x_sum)                                             \
    _mm256_storeu_ps(out, _mm256_fnmadd_ps(offset, _mm256_set1_ps(x_sum),                                     \
                                           _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact),                         \
                                                           _mm256_mul_ps(scale, _mm256_set1_ps(x_scale)),     \
                                                           _mm256_loadu_ps(out))))
#define GEMM_FLOATS(p) _mm256_loadu_ps(p)
#define GEMM_STORE(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#endif

static inline int32_t load_four(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(GEMM_VEC)
/* exact[t][c] = the integer sums of inputs [4 * s, 4 * end) of GEMM_TOKENS tokens against a packed
 * column block (its own function: the compiler then keeps every accumulator in a register). */
static __attribute__((noinline)) void gemm_dots(const uint32_t *words, const int8_t *codes, int64_t k, int64_t s,
                                                int64_t end, int32_t *exact) {
#define GEMM_ZEROS(t) GEMM_VEC e##t##a = GEMM_ZERO(), e##t##b = GEMM_ZERO();
    EACH_GEMM_TOKEN(GEMM_ZEROS)
#undef GEMM_ZEROS
    for (; s < end; s++) {
        GEMM_VEC w0 = GEMM_LOAD(words + s * GEMM_COLUMNS), w1 = GEMM_LOAD(words + s * GEMM_COLUMNS + GEMM_LANES);
#define GEMM_DOTS(t)                                                                                           \
    {                                                                                                          \
        GEMM_VEC xv = GEMM_BROADCAST(load_four(codes + (t) * k + 4 * s));                                      \
        e##t##a = GEMM_DOT(e##t##a, w0, xv);                                                                   \
        e##t##b = GEMM_DOT(e##t##b, w1, xv);                                                                   \
    }
        EACH_GEMM_TOKEN(GEMM_DOTS)
#undef GEMM_DOTS
    }
#define GEMM_STORES(t)                                                                                         \
    GEMM_STORE(exact + (t) * GEMM_COLUMNS, e##t##a);                                                           \
    GEMM_STORE(exact + (t) * GEMM_COLUMNS + GEMM_LANES, e##t##b);
    EACH_GEMM_TOKEN(GEMM_STORES)
#undef GEMM_STORES
}
#endif

static void gemm_tile(const uint32_t *words, const float *col_scales, const float *col_offsets,
                      const int8_t *codes, const float *x_scales, const float *x_sums, int64_t k, int64_t group,
                      int wide_products, float *tile) {
    const int64_t groups = k / group;
    for (int t = 0; t < GEMM_TOKENS * GEMM_COLUMNS; t++) tile[t] = 0.f;
#if defined(GEMM_VEC)
#if INT_DOT == 256 && !defined(MIMO_AVXVNNI)
    if (!wide_products) {
#else
    (void)wide_products;
    {
#endif
        int32_t exact[GEMM_TOKENS * GEMM_COLUMNS] __attribute__((aligned(64)));
        for (int64_t g = 0; g < groups; g++) {
            gemm_dots(words, codes, k, g * group / 4, (g + 1) * group / 4, exact);
            const float *sg = col_scales + g * GEMM_COLUMNS, *og = col_offsets + g * GEMM_COLUMNS;
            for (int t = 0; t < GEMM_TOKENS; t++)
                for (int h = 0; h < GEMM_COLUMNS; h += GEMM_LANES)
                    GEMM_ACCUMULATE(tile + t * GEMM_COLUMNS + h, GEMM_LOAD(exact + t * GEMM_COLUMNS + h),
                                    GEMM_FLOATS(sg + h), GEMM_FLOATS(og + h), x_scales[t * groups + g],
                                    x_sums[t * groups + g]);
        }
        return;
    }
#else
    (void)wide_products;
#endif
    for (int t = 0; t < GEMM_TOKENS; t++) {
        float *acc = tile + t * GEMM_COLUMNS;
        for (int64_t g = 0; g < groups; g++) {
            int32_t exact[GEMM_COLUMNS] = {0};
            for (int64_t s = g * group / 4; s < (g + 1) * group / 4; s++)
                for (int c = 0; c < GEMM_COLUMNS; c++) {
                    uint32_t word = words[s * GEMM_COLUMNS + c];
                    for (int b = 0; b < 4; b++)
                        exact[c] += (int32_t)((word >> (8 * b)) & 0xFF) * codes[t * k + 4 * s + b];
                }
            for (int c = 0; c < GEMM_COLUMNS; c++) {
                float both = col_scales[g * GEMM_COLUMNS + c] * x_scales[t * groups + g];
                acc[c] = fmaf((float)exact[c], both, acc[c]);
                acc[c] = fmaf(-col_offsets[g * GEMM_COLUMNS + c], x_sums[t * groups + g], acc[c]);
            }
        }
    }
}

/* The GEMM for format 8 (int8 w [N, K], scales [N]) or 4 (packed int4 w [N, K/2], scales and zeros
 * [N, K/group]), into float32 y_f32 where it is not NULL, else into bfloat16 y (rounded once).
 * Returns 0, having done nothing, where the layout does not allow it (int8: K % 128, int4:
 * group % 128) or memory is short. */
int gemm_quant_bf16(const uint16_t *x, int format, const void *w, const float *scales, const float *zeros,
                    const float *bias, float *y_f32, uint16_t *y, int m, int64_t n, int64_t k, int64_t group) {
    if (format == 8) group = GEMM_INT8_GROUP;
    if ((format != 8 && format != 4) || group % 128 || k % group) return 0;
    const int64_t groups = k / group, blocks = (n + GEMM_COLUMNS - 1) / GEMM_COLUMNS;
    /* rows padded to whole tiles: codes 0, scale 1, sum 0 (their sums stay 0; they are not stored) */
    const int64_t rows = (m + GEMM_TOKENS - 1) / GEMM_TOKENS * GEMM_TOKENS;
    int8_t *codes = malloc((size_t)rows * k);
    float *x_scales = malloc(sizeof(float) * 2 * rows * groups);
    if (!codes || !x_scales) { free(codes); free(x_scales); return 0; }
    float *x_sums = x_scales + rows * groups;
    memset(codes + (int64_t)m * k, 0, (size_t)(rows - m) * k);
    for (int64_t j = (int64_t)m * groups; j < rows * groups; j++) { x_scales[j] = 1.f; x_sums[j] = 0.f; }
    int failed = 0;
#pragma omp parallel
    {
        gemm_quantize_x(x, m, k, group, format == 4, codes, x_scales, x_sums);
        uint32_t *words = malloc(sizeof(uint32_t) * GEMM_COLUMNS * k / 4);
        float *col_scales = malloc(sizeof(float) * 2 * GEMM_COLUMNS * groups);
        float tile[GEMM_TOKENS * GEMM_COLUMNS];
        if (!words || !col_scales) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (int64_t block = 0; block < (failed ? 0 : blocks); block++) {
            const int64_t first = block * GEMM_COLUMNS;
            float *col_offsets = col_scales + GEMM_COLUMNS * groups;
            gemm_pack(format, w, scales, zeros, n, k, group, first, words, col_scales, col_offsets);
            const int columns = n - first < GEMM_COLUMNS ? (int)(n - first) : GEMM_COLUMNS;
            for (int t0 = 0; t0 < m; t0 += GEMM_TOKENS) {
                gemm_tile(words, col_scales, col_offsets, codes + (int64_t)t0 * k, x_scales + (int64_t)t0 * groups,
                          x_sums + (int64_t)t0 * groups, k, group, format == 8, tile);
                for (int t = 0; t < GEMM_TOKENS && t0 + t < m; t++)
                    for (int c = 0; c < columns; c++) {
                        float value = tile[t * GEMM_COLUMNS + c] + (bias ? bias[first + c] : 0.f);
                        int64_t index = (int64_t)(t0 + t) * n + first + c;
                        if (y_f32) y_f32[index] = value;
                        else y[index] = f32_to_bf16(value);
                    }
            }
        }
        free(words);
        free(col_scales);
    }
    free(codes);
    free(x_scales);
    return !failed;
}

/* ---------------------------------------------------------------- MXFP4: e2m1 pairs, E8M0 scale per 32
 * Byte j of a row holds inputs 2j (low nibble) and 2j+1 (high nibble), as for int4; one E8M0 scale
 * byte per block of 32 inputs (2^(e - 127), 255 NaN). As llama.cpp runs MXFP4 on the CPU
 * (ggml_vec_dot_mxfp4_q8_0), x is quantized once per call to int8 per block of 32 inputs (scale
 * max|x_block| / 127, kept at float16's precision: Q8_0's rounding), split into even and odd inputs, and a
 * nibble becomes twice its e2m1 value, an integer in -12..12, by a 16-byte table lookup (pshufb,
 * tbl): a block's dot product is exact in int32, a few byte dot products (vpdpbusd, vpmaddubsw,
 * sdot) instead of 32 float multiply-adds. Per block: sum += (q . xq) * (2^(e - 127) * x_scale / 2).
 * The weights are decoded exactly; the result differs from dequantize-then-matmul by the rounding
 * of x (at most x_scale / 2 per input) and the float32 summation order. Needs k % 32 == 0.
 *
 * Lanes: an int32 lane of a byte dot product covers 4 consecutive bytes, so a block's 16 bytes are
 * 4 lanes on every ISA, each converted to float and scaled on its own. Per token and lane the
 * quantizer stores the lane's x_scale / 2 and -12 * (the sum of the lane's 8 xq): x86's vpdpbusd and
 * vpmaddubsw take unsigned weight bytes, so their table holds 2 * e2m1 + 12 (0..24) and each lane
 * starts from that offset. */
#define MXFP4_BLOCK 32
#define MXFP4_LANES_PER_BLOCK 4
#define E2M1_OFFSET 12
static const int8_t E2M1_TWICE[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static float E8M0_VALUE[256]; /* 2^(e - 127); e = 0 the subnormal 2^-127, 255 NaN */

__attribute__((constructor)) static void make_e8m0_values(void) {
    for (int e = 0; e < 256; e++) {
        uint32_t bits = e == 0 ? 0x00400000u : e == 255 ? 0x7FC00000u : (uint32_t)e << 23;
        memcpy(&E8M0_VALUE[e], &bits, 4);
    }
}

/* x [k] float32 -> xq even/odd halves [k/2] int8, lane_scales and lane_offsets [k/8] */
/* f rounded to float16's precision (to nearest, ties to even), as ggml stores a Q8_0 block's scale:
 * the activations of llama.cpp's MXFP4 x Q8_0 dot product. Precision only: beyond float16's range
 * (|x| over 8e6, where ggml's scale would be inf) the result stays finite. */
static inline float round_to_half(float f) {
    if (fabsf(f) < 6.103515625e-05f) return nearbyintf(f * 16777216.f) / 16777216.f; /* subnormal: k * 2^-24 */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits = (bits + 0xFFFu + ((bits >> 13) & 1u)) & ~0x1FFFu;
    memcpy(&f, &bits, 4);
    return f;
}

static void quantize_x_mxfp4(const float *x, int64_t k, int8_t *even, int8_t *odd, float *lane_scales,
                             int32_t *lane_offsets) {
    for (int64_t b = 0; b < k / MXFP4_BLOCK; b++) {
        const float *xb = x + b * MXFP4_BLOCK;
        float peak = 0.f;
        for (int j = 0; j < MXFP4_BLOCK; j++) { float v = fabsf(xb[j]); peak = v > peak ? v : peak; }
        float scale = peak > 0.f ? peak / 127.f : 1.f, inverse = 1.f / scale, lane_scale = round_to_half(scale) * .5f;
        int8_t *e = even + b * 16, *o = odd + b * 16;
        for (int j = 0; j < 16; j++) {
            e[j] = (int8_t)lrintf(xb[2 * j] * inverse);
            o[j] = (int8_t)lrintf(xb[2 * j + 1] * inverse);
        }
        for (int lane = 0; lane < MXFP4_LANES_PER_BLOCK; lane++) {
            int sum = 0;
            for (int j = 4 * lane; j < 4 * lane + 4; j++) sum += e[j] + o[j];
            lane_scales[4 * b + lane] = lane_scale;
            lane_offsets[4 * b + lane] = -E2M1_OFFSET * sum;
        }
    }
}

/* Whether one of the 4 scale bytes is 0 or 255, the two whose value is not the float bits e << 23 */
static inline int special_exponent(uint32_t bytes) {
    return (((bytes - 0x01010101u) & ~bytes) | ((~bytes - 0x01010101u) & bytes)) & 0x80808080u;
}

#if INT_DOT == 512
/* Blocks b..b+count-1 (count <= 4: 64 bytes, 16 lanes) into acc[t]. Loads are plain for a full
 * group of 4 blocks (masked ones there measured 2-3x slower, the weight stream stalling) and
 * masked for the last, shorter group. */
ALWAYS_INLINE void mxfp4_blocks_512(const uint8_t *w, const uint8_t *scales, const int8_t *x_even,
                                    const int8_t *x_odd, const float *lane_scales, const int32_t *lane_offsets,
                                    int64_t half, int64_t lanes, int64_t b, int count, int tokens, __m512 *acc) {
    const __m512i low_mask = _mm512_set1_epi8(0x0F);
    const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int full = count == 4;
    const __mmask64 byte_mask = full ? ~0ULL : (1ULL << (16 * count)) - 1;
    const __mmask16 lane_mask = (__mmask16)((1u << (4 * count)) - 1);
#define BYTES(p) (full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(byte_mask, p))
    uint32_t exponents = 0x7F7F7F7Fu; /* scale 1 for absent blocks (their lanes are zero) */
    if (full) memcpy(&exponents, scales + b, 4);
    else for (int i = 0; i < count; i++) exponents = (exponents & ~(0xFFu << 8 * i)) | (uint32_t)scales[b + i] << 8 * i;
    __m512i e = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)exponents), spread));
    __m512 ws = special_exponent(exponents) ? _mm512_i32gather_ps(e, E8M0_VALUE, 4)
                                            : _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    __m512i bytes = BYTES(w + b * 16);
    __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(bytes, low_mask));
    __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask));
    for (int t = 0; t < tokens; t++) {
        const int64_t at = t * half + b * 16, lane = t * lanes + b * 4;
        __m512i exact = BYTES(lane_offsets + lane);
        exact = _mm512_dpbusd_epi32(exact, lo, BYTES(x_even + at));
        exact = _mm512_dpbusd_epi32(exact, hi, BYTES(x_odd + at));
        __m512 lane_scale = full ? _mm512_loadu_ps(lane_scales + lane) : _mm512_maskz_loadu_ps(lane_mask, lane_scales + lane);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(ws, lane_scale), acc[t]);
    }
#undef BYTES
}
#elif INT_DOT == 256
/* Blocks b..b+count-1 (count 1 or 2: 32 bytes, 8 lanes; a single block zero-extended) into acc[t]. */
ALWAYS_INLINE void mxfp4_blocks_256(const uint8_t *w, const uint8_t *scales, const int8_t *x_even,
                                    const int8_t *x_odd, const float *lane_scales, const int32_t *lane_offsets,
                                    int64_t half, int64_t lanes, int64_t b, int count, int tokens, __m256 *acc) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const int pair = count == 2;
#if !defined(MIMO_AVXVNNI)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
#define BYTES(p) (pair ? _mm256_loadu_si256((const __m256i *)(p))                                       \
                       : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i *)(p)), 0))
    /* absent second block: scale byte 127 (1), its lanes are zero */
    uint32_t exponents = scales[b] | (uint32_t)(pair ? scales[b + 1] : 0x7F) << 8 | 0x7F7F0000u;
    __m256i e = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)exponents), spread));
    __m256 ws = special_exponent(exponents) ? _mm256_i32gather_ps(E8M0_VALUE, e, 4)
                                            : _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
    __m256i bytes = BYTES(w + b * 16);
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(bytes, low_mask));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask));
    for (int t = 0; t < tokens; t++) {
        const int64_t at = t * half + b * 16, lane = t * lanes + b * 4;
        __m256i exact = BYTES(lane_offsets + lane), even = BYTES(x_even + at), odd = BYTES(x_odd + at);
        __m256 lane_scale = pair ? _mm256_loadu_ps(lane_scales + lane)
                                 : _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(lane_scales + lane), 0);
#if defined(MIMO_AVXVNNI)
        exact = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(exact, lo, even), hi, odd);
#else /* no int16 overflow: 2 * (24 * 127) * 2 < 2^15 */
        __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
        exact = _mm256_add_epi32(exact, _mm256_madd_epi16(pairs, ones));
#endif
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(ws, lane_scale), acc[t]);
    }
#undef BYTES
}
#endif

/* sums[t] for the tokens of a pass: xq halves of token t at x_even/x_odd + t * k/2, its lane scales
 * and offsets at + t * k/8. Each token's arithmetic is the same whatever the pass's token count. */
ALWAYS_INLINE void mxfp4_row(const uint8_t *w, const uint8_t *scales, const int8_t *x_even, const int8_t *x_odd,
                             const float *lane_scales, const int32_t *lane_offsets, int64_t k, int tokens,
                             float *sums) {
    const int64_t half = k / 2, lanes = k / 8, blocks = k / MXFP4_BLOCK;
#if INT_DOT == 512
    __m512 acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4)
        mxfp4_blocks_512(w, scales, x_even, x_odd, lane_scales, lane_offsets, half, lanes, b, 4, tokens, acc);
    if (b < blocks)
        mxfp4_blocks_512(w, scales, x_even, x_odd, lane_scales, lane_offsets, half, lanes, b, (int)(blocks - b), tokens,
                         acc);
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(acc[t]);
#elif INT_DOT == 256
    __m256 acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2)
        mxfp4_blocks_256(w, scales, x_even, x_odd, lane_scales, lane_offsets, half, lanes, b, 2, tokens, acc);
    if (b < blocks) mxfp4_blocks_256(w, scales, x_even, x_odd, lane_scales, lane_offsets, half, lanes, b, 1, tokens, acc);
    for (int t = 0; t < tokens; t++) sums[t] = hsum256(acc[t]);
#elif INT_DOT == 128
    const int8x16_t table = vld1q_s8(E2M1_TWICE);
    const uint8x16_t low_mask = vdupq_n_u8(0x0F);
    float32x4_t acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < blocks; b++) {
        uint8x16_t bytes = vld1q_u8(w + b * 16);
        int8x16_t lo = vqtbl1q_s8(table, vandq_u8(bytes, low_mask)), hi = vqtbl1q_s8(table, vshrq_n_u8(bytes, 4));
        const float ws = E8M0_VALUE[scales[b]];
        for (int t = 0; t < tokens; t++) {
            const int64_t at = t * half + b * 16, lane = t * lanes + b * 4;
            int32x4_t exact = vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(x_even + at)), hi, vld1q_s8(x_odd + at));
            acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(exact), vmulq_n_f32(vld1q_f32(lane_scales + lane), ws));
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = vaddvq_f32(acc[t]);
#else
    (void)lane_offsets; /* signed products here: no offset to take back */
    for (int t = 0; t < tokens; t++) {
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            const float ws = E8M0_VALUE[scales[b]];
            for (int lane = 0; lane < MXFP4_LANES_PER_BLOCK; lane++) {
                int32_t exact = 0;
                for (int64_t j = b * 16 + 4 * lane; j < b * 16 + 4 * lane + 4; j++)
                    exact += E2M1_TWICE[w[j] & 0x0F] * x_even[t * half + j] + E2M1_TWICE[w[j] >> 4] * x_odd[t * half + j];
                acc += (float)exact * (ws * lane_scales[t * lanes + 4 * b + lane]);
            }
        }
        sums[t] = acc;
    }
#endif
}

/* y[M, N] = x . W^T (+ bias) for float32 x [M, K] and MXFP4 rows w [N, K/2] with scales [N, K/32].
 * Returns 0 (having done nothing) if its buffers cannot be allocated. */
int linear_mxfp4(const float *x, const uint8_t *w, const uint8_t *scales, const float *bias, float *y, int m,
                 int64_t n, int64_t k) {
    const int64_t half = k / 2, lanes = k / 8, blocks = k / MXFP4_BLOCK;
    int8_t *x_even = malloc((size_t)m * k);
    float *lane_scales = malloc(sizeof(float) * m * lanes);
    int32_t *lane_offsets = malloc(sizeof(int32_t) * m * lanes);
    if (!x_even || !lane_scales || !lane_offsets) { free(x_even); free(lane_scales); free(lane_offsets); return 0; }
    int8_t *x_odd = x_even + (int64_t)m * half;
    for (int t = 0; t < m; t++)
        quantize_x_mxfp4(x + t * k, k, x_even + t * half, x_odd + t * half, lane_scales + t * lanes,
                         lane_offsets + t * lanes);
#pragma omp parallel for schedule(guided, 32)
    for (int64_t row = 0; row < n; row++) {
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
#define ROW(T)                                                                                          \
    mxfp4_row(w + row * half, scales + row * blocks, x_even + (int64_t)first * half, x_odd + (int64_t)first * half, \
              lane_scales + (int64_t)first * lanes, lane_offsets + (int64_t)first * lanes, k, T, sums)
        EACH_TOKEN_PASS(m, ROW, y[(int64_t)(first + t) * n + row] = sums[t] + b)
#undef ROW
    }
    free(x_even);
    free(lane_scales);
    free(lane_offsets);
    return 1;
}

/* ---------------------------------------------------------------- routed SwiGLU experts, quantized
 * out[t] += w * down_e(silu(gate_e(x_t)) * up_e(x_t)) for each (expert e, token t, weight w)
 * assignment, with gate_up [E, 2I, H] and down [E, H, I] stacks in the int8 (format 8), int4
 * (format 4) or MXFP4 (format 1: packed bytes, uint8 E8M0 scales) layout; zeros are used by int4
 * only, group by int4 only. x is float32 [M, H]; out float32 [M, H].
 * Threads split the assignments (each streams whole experts) into their own partial output.
 * scratch per thread: 3H + 5I floats. partial: threads * M * H floats. */
enum { FORMAT_MXFP4 = 1, FORMAT_INT4 = 4, FORMAT_INT8 = 8, FORMAT_BF16 = 16 };

typedef struct {
    const void *weights; /* int8_t or uint8_t (packed) */
    const void *scales;  /* float, or uint8_t E8M0 for MXFP4 */
    const float *zeros;
} QuantStack;

/* One token's input to a stack of rows, prepared once for all the rows it meets: float32 even/odd
 * halves for the exact int4 kernel, int8 halves with per-group scales and sums for the VNNI int4
 * one, or with per-lane scales and offsets (in the sums' place) for MXFP4, or for int8 weights int16
 * with one scale (the dense int8 kernel's integer dot product; inputs a multiple of 64) or float32
 * as it is. */
typedef struct {
    const float *x;
    float *even, *odd;
    int8_t *q_even, *q_odd;
    float *q_scales, *q_sums;
    int quantized; /* the integer-dot-product form above is used */
    int16_t *x16;
    float x16_scale;
} PreparedInput;

#define MOE_VNNI(group) ((group) % 128 == 0)

static void prepare_input(PreparedInput *in, const float *x, int format, int64_t k, int64_t group) {
    in->x = x;
    if (format == FORMAT_INT8) {
        in->quantized = k % 64 == 0;
        if (in->quantized) in->x16_scale = quantize_row_int16(x, in->x16, k);
        return;
    }
    if (format == FORMAT_MXFP4) {
        quantize_x_mxfp4(x, k, in->q_even, in->q_odd, in->q_scales, (int32_t *)in->q_sums);
        return;
    }
    in->quantized = format == FORMAT_INT4 && MOE_VNNI(group);
    if (in->quantized) {
        quantize_x_int8(x, in->q_even, in->q_odd, in->q_scales, in->q_sums, k, group);
        return;
    }
    for (int64_t j = 0; j < k / 2; j++) { in->even[j] = x[2 * j]; in->odd[j] = x[2 * j + 1]; }
}

/* inlined: as a call it took a third of the MXFP4 experts' time on V2-shape rows (128-512 bytes) */
ALWAYS_INLINE float quant_row(int format, QuantStack s, int64_t expert, int64_t rows, int64_t row,
                              const PreparedInput *in, int64_t k, int64_t group) {
    float sum;
    int64_t r = expert * rows + row;
    if (format == FORMAT_INT8) {
        if (in->quantized) {
            int8_row_int16((const int8_t *)s.weights + r * k, in->x16, k, 1, &sum);
            return sum * in->x16_scale * ((const float *)s.scales)[r];
        }
        int8_row((const int8_t *)s.weights + r * k, in->x, k, 1, &sum);
        return sum * ((const float *)s.scales)[r];
    }
    const uint8_t *w = (const uint8_t *)s.weights + r * (k / 2);
    if (format == FORMAT_MXFP4) {
        mxfp4_row(w, (const uint8_t *)s.scales + r * (k / MXFP4_BLOCK), in->q_even, in->q_odd, in->q_scales,
                  (const int32_t *)in->q_sums, k, 1, &sum);
        return sum;
    }
    const float *scales = (const float *)s.scales + r * (k / group), *zeros = s.zeros + r * (k / group);
    if (in->quantized) {
        int4_row_vnni(w, scales, zeros, in->q_even, in->q_odd, in->q_scales, in->q_sums, k, k / group, group / 128, 1,
                      &sum);
        return sum;
    }
    int4_row(w, scales, zeros, in->even, in->odd, k, group, 1, &sum);
    return sum;
}

/* Expert rows are prefetched MOE_PREFETCH_BYTES ahead (cpu_linear.c), as the float experts are:
 * measured 1.1x on the V2-shape MXFP4 experts of 12 layers (out of cache), 1 thread. */
static inline int64_t row_bytes(int format, int64_t k) { return format == FORMAT_INT8 ? k : k / 2; }

static inline int64_t rows_ahead(int format, int64_t k) { return MOE_PREFETCH_BYTES / row_bytes(format, k); }

/* The packed bytes of rows [first, first + count) of an expert's stack (clipped to the stack) */
static inline void prefetch_rows(int format, QuantStack s, int64_t expert, int64_t rows, int64_t first,
                                 int64_t count, int64_t k) {
    if (first >= rows) return;
    if (first + count > rows) count = rows - first;
    const int64_t bytes = row_bytes(format, k);
    prefetch_span((const char *)s.weights + (expert * rows + first) * bytes, count * bytes);
}

/* moe_quant's assignments first..last-1 on int4 stacks in groups of a multiple of 128 (the VNNI
 * path), the consecutive ones of one expert (assignments come sorted by expert) up to
 * TOKENS_PER_PASS at a time: each weight row is unpacked once for all of their tokens. Every token
 * gets the sums the one-token path gives it (int4_row_vnni keeps each token's accumulation apart)
 * and `mine` receives them in the same order. Returns 0, having done nothing, where it cannot
 * allocate its scratch. */
static int moe_int4_grouped(QuantStack gu, QuantStack dn, const float *x, const int64_t *experts,
                            const int64_t *tokens, const float *weights, int first, int last, float *mine,
                            int64_t hidden, int64_t inter, int64_t group) {
    const int T = TOKENS_PER_PASS;
    const int64_t x_groups = hidden / group, act_groups = inter / group;
    float *gate_up_out = malloc(sizeof(float) * T * (3 * inter + 2 * (x_groups + act_groups)) + (size_t)T * (hidden + inter));
    if (!gate_up_out) return 0;
    float *act = gate_up_out + (int64_t)T * 2 * inter;
    float *x_scales = act + (int64_t)T * inter, *x_sums = x_scales + T * x_groups;
    float *act_scales = x_sums + T * x_groups, *act_sums = act_scales + T * act_groups;
    int8_t *x_even = (int8_t *)(act_sums + T * act_groups), *x_odd = x_even + (int64_t)T * hidden / 2;
    int8_t *act_even = x_odd + (int64_t)T * hidden / 2, *act_odd = act_even + (int64_t)T * inter / 2;
    int64_t held[TOKENS_PER_PASS]; /* the tokens whose quantized x the buffers hold (one token's run of experts) */
    int held_count = 0;
    for (int a = first; a < last;) {
        int count = 1;
        while (count < T && a + count < last && experts[a + count] == experts[a]) count++;
        int same = count == held_count;
        for (int t = 0; t < count && same; t++) same = tokens[a + t] == held[t];
        held_count = count;
        for (int t = 0; t < count; t++) held[t] = tokens[a + t];
        for (int t = 0; t < count && !same; t++)
            quantize_x_int8(x + tokens[a + t] * hidden, x_even + t * hidden / 2, x_odd + t * hidden / 2,
                            x_scales + t * x_groups, x_sums + t * x_groups, hidden, group);
        float sums[TOKENS_PER_PASS];
        for (int64_t r = 0; r < 2 * inter; r++) {
            int64_t row = experts[a] * 2 * inter + r;
            const uint8_t *w = (const uint8_t *)gu.weights + row * (hidden / 2);
            const float *sc = (const float *)gu.scales + row * x_groups, *zr = gu.zeros + row * x_groups;
#define ROW(TOKENS) int4_row_vnni(w, sc, zr, x_even, x_odd, x_scales, x_sums, hidden, x_groups, group / 128, TOKENS, sums)
            switch (count) { case 1: ROW(1); break; case 2: ROW(2); break; case 3: ROW(3); break; default: ROW(4); }
#undef ROW
            for (int t = 0; t < count; t++) gate_up_out[t * 2 * inter + r] = sums[t];
        }
        for (int t = 0; t < count; t++) {
            const float *gt = gate_up_out + t * 2 * inter;
            float *at = act + t * inter;
            for (int64_t i = 0; i < inter; i++) {
                float g = gt[i];
                at[i] = g / (1.f + expf(-g)) * gt[inter + i];
            }
            quantize_x_int8(at, act_even + t * inter / 2, act_odd + t * inter / 2, act_scales + t * act_groups,
                            act_sums + t * act_groups, inter, group);
        }
        for (int64_t r = 0; r < hidden; r++) {
            int64_t row = experts[a] * hidden + r;
            const uint8_t *w = (const uint8_t *)dn.weights + row * (inter / 2);
            const float *sc = (const float *)dn.scales + row * act_groups, *zr = dn.zeros + row * act_groups;
#define ROW(TOKENS) int4_row_vnni(w, sc, zr, act_even, act_odd, act_scales, act_sums, inter, act_groups, group / 128, TOKENS, sums)
            switch (count) { case 1: ROW(1); break; case 2: ROW(2); break; case 3: ROW(3); break; default: ROW(4); }
#undef ROW
            for (int t = 0; t < count; t++) mine[tokens[a + t] * hidden + r] += weights[a + t] * sums[t];
        }
        a += count;
    }
    free(gate_up_out);
    return 1;
}

void moe_quant(int format, const float *x, const void *gate_up, const void *gate_up_scales,
               const float *gate_up_zeros, const void *down, const void *down_scales, const float *down_zeros,
               const int64_t *experts, const int64_t *tokens, const float *weights, int assignments, int m,
               float *out, float *partial, float *scratch, int64_t hidden, int64_t inter, int64_t group) {
    QuantStack gu = {gate_up, gate_up_scales, gate_up_zeros}, dn = {down, down_scales, down_zeros};
    int threads = 1;
#pragma omp parallel
    {
#pragma omp single
        threads = omp_get_num_threads();
        int id = omp_get_thread_num();
        float *mine = partial + (int64_t)id * m * hidden;
        float *mine_scratch = scratch + (int64_t)id * (3 * hidden + 5 * inter);
        float *gate_up_out = mine_scratch, *act = gate_up_out + 2 * inter;
        float *x_halves = act + inter, *act_halves = x_halves + hidden; /* float32 even|odd halves */
        int8_t *x_q = (int8_t *)(act_halves + inter), *act_q = x_q + hidden; /* int8 even|odd halves */
        float *x_q_stats = (float *)(act_q + inter), *act_q_stats = x_q_stats + hidden / 2;
        /* int16 inputs (int8 weights only) share the float32 halves' room */
        PreparedInput x_in = {0, x_halves, x_halves + hidden / 2, x_q, x_q + hidden / 2, x_q_stats,
                              x_q_stats + hidden / 4, 0, (int16_t *)x_halves, 0.f};
        PreparedInput act_in = {0, act_halves, act_halves + inter / 2, act_q, act_q + inter / 2, act_q_stats,
                                act_q_stats + inter / 4, 0, (int16_t *)act_halves, 0.f};
        for (int64_t j = 0; j < (int64_t)m * hidden; j++) mine[j] = 0.f;
        int first = (int)((int64_t)assignments * id / threads);
        int last = (int)((int64_t)assignments * (id + 1) / threads);
        if (format == FORMAT_INT4 && MOE_VNNI(group) && moe_int4_grouped(gu, dn, x, experts, tokens, weights, first,
                                                                          last, mine, hidden, inter, group))
            first = last; /* done: the tokens sharing an expert went through its weights together */
        if (first < last) prefetch_rows(format, gu, experts[first], 2 * inter, 0, rows_ahead(format, hidden), hidden);
        for (int a = first; a < last; a++) {
            if (a == first || tokens[a] != tokens[a - 1])
                prepare_input(&x_in, x + tokens[a] * hidden, format, hidden, group);
            for (int64_t r = 0; r < 2 * inter; r++) {
                prefetch_rows(format, gu, experts[a], 2 * inter, r + rows_ahead(format, hidden), 1, hidden);
                gate_up_out[r] = quant_row(format, gu, experts[a], 2 * inter, r, &x_in, hidden, group);
            }
            prefetch_rows(format, dn, experts[a], hidden, 0, rows_ahead(format, inter), inter);
            for (int64_t i = 0; i < inter; i++) {
                float g = gate_up_out[i];
                act[i] = g / (1.f + expf(-g)) * gate_up_out[inter + i];
            }
            prepare_input(&act_in, act, format, inter, group);
            float *ot = mine + tokens[a] * hidden;
            for (int64_t r = 0; r < hidden; r++) {
                prefetch_rows(format, dn, experts[a], hidden, r + rows_ahead(format, inter), 1, inter);
                ot[r] += weights[a] * quant_row(format, dn, experts[a], hidden, r, &act_in, inter, group);
            }
            if (a + 1 < last) prefetch_rows(format, gu, experts[a + 1], 2 * inter, 0, rows_ahead(format, hidden), hidden);
        }
#pragma omp barrier
#pragma omp for
        for (int64_t j = 0; j < (int64_t)m * hidden; j++) {
            float sum = 0.f;
            for (int t = 0; t < threads; t++) sum += partial[(int64_t)t * m * hidden + j];
            out[j] = sum;
        }
    }
}

/* ---------------------------------------------------------------- a decoder layer, quantized
 * decoder_layer_batch_bf16 of cpu_linear.c (included below: one compilation unit, so its per-step
 * functions serve here too) with projections in any of the runtime layouts: bfloat16, int8 (one
 * scale per row) or int4 (groups). Activations are bfloat16; each projection's input is quantized
 * once per call for all its rows (int16 per token for int8 weights, int8 per group for int4) by one
 * thread, then the rows are shared out. Outputs are rounded to bfloat16 as the step-by-step path
 * rounds them. Needs int8 inputs a multiple of 64, int4 groups a multiple of 128; returns 0
 * (having done nothing) otherwise. */

typedef struct {
    int bits;            /* 16: bfloat16 weights, 8: int8, 4: int4 */
    const void *weight;  /* uint16_t, int8_t or packed uint8_t rows */
    const float *scales, *zeros;
    const void *bias;    /* bfloat16 for bits 16, float32 otherwise; may be NULL */
    int64_t group;
} Projection;

static inline void store_bf16(uint16_t *y, int add_to_y, int64_t index, float value) {
    y[index] = add_to_y ? f32_to_bf16(bf16_to_f32(y[index]) + bf16_to_f32(f32_to_bf16(value))) : f32_to_bf16(value);
}

static int projection_supported(const Projection *p, int64_t k) {
    return p->bits == 16 || (p->bits == 8 && k % 64 == 0) || (p->bits == 4 && p->group % 128 == 0 && k % p->group == 0);
}

/* y[M, N] (=, or += with add_to_y) x[M, K] . W^T. scratch: M * K int16 + 4 * M * K / 64 floats. */
static void projection_rows(const Projection *p, const uint16_t *x, uint16_t *y, int add_to_y, int m, int64_t n,
                            int64_t k, void *scratch) {
    if (p->bits == 16) {
        linear_rows_bf16(x, (const uint16_t *)p->weight, (const uint16_t *)p->bias, NULL, y, add_to_y, m, n, k);
        return;
    }
    const float *bias = (const float *)p->bias;
    int16_t *x16 = (int16_t *)scratch;
    int8_t *x_even = (int8_t *)scratch, *x_odd = x_even + (int64_t)m * k / 2;
    float *stats = (float *)((char *)scratch + (int64_t)m * k * 2);
    const int64_t groups = p->bits == 4 ? k / p->group : 1, half = k / 2;
    float *x_scales = stats, *x_sums = stats + (int64_t)m * groups;
#pragma omp single
    {
        if (p->bits == 8) quantize_x_int16(x, x16, x_scales, m, k);
        else quantize_rows_int8(x, m, k, p->group, x_even, x_odd, x_scales, x_sums);
    }
#pragma omp for schedule(guided, 32)
    for (int64_t row = 0; row < n; row++) {
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
        if (p->bits == 8) {
            const int8_t *wr = (const int8_t *)p->weight + row * k;
#define ROW(T) int8_row_int16(wr, x16 + (int64_t)first * k, k, T, sums)
            EACH_TOKEN_PASS(m, ROW, store_bf16(y, add_to_y, (int64_t)(first + t) * n + row,
                                               sums[t] * x_scales[first + t] * p->scales[row] + b))
#undef ROW
        } else {
            const uint8_t *wr = (const uint8_t *)p->weight + row * half;
            const float *sr = p->scales + row * groups, *zr = p->zeros + row * groups;
#define ROW(T)                                                                                          \
    int4_row_vnni(wr, sr, zr, x_even + (int64_t)first * half, x_odd + (int64_t)first * half,             \
                  x_scales + (int64_t)first * groups, x_sums + (int64_t)first * groups, k, groups,       \
                  p->group / 128, T, sums)
            EACH_TOKEN_PASS(m, ROW, store_bf16(y, add_to_y, (int64_t)(first + t) * n + row, sums[t] + b))
#undef ROW
        }
    }
}

/* The M rows are those of `sequences` sequences, rows[b] each, with caches and attention arguments
 * as attention_all_bf16 takes them (a batch step, or one sequence's decode or verify step). */
int decoder_layer_quant_batch_bf16(uint16_t *x, int sequences, const int *rows, int64_t hidden, float eps,
                                   const uint16_t *norm1, const Projection *qkv_p, int64_t qkv_out,
                                   const Projection *o_p, const uint16_t *norm2, const Projection *gate_up_p,
                                   const Projection *down_p, int64_t inter, uint16_t *const *keys,
                                   uint16_t *const *values, const attention_args *args, uint16_t *normed,
                                   uint16_t *qkv, uint16_t *attn, uint16_t *gate_up_out, uint16_t *act) {
    int64_t attn_width = (int64_t)args[0].heads * args[0].v_dim;
    if (!projection_supported(qkv_p, hidden) || !projection_supported(o_p, attn_width) ||
        (gate_up_p && (!projection_supported(gate_up_p, hidden) || !projection_supported(down_p, inter))))
        return 0;
    int m = 0;
    for (int b = 0; b < sequences; b++) m += rows[b];
    int64_t widest = hidden > attn_width ? hidden : attn_width;
    widest = widest > inter ? widest : inter;
    void *scratch = malloc((size_t)m * widest * 2 + sizeof(float) * 4 * ((size_t)m * widest / 64 + m));
    if (!scratch) return 0;
#pragma omp parallel
    {
        rmsnorm_rows_bf16(x, norm1, normed, m, hidden, eps);
        projection_rows(qkv_p, normed, qkv, 0, m, qkv_out, hidden, scratch);
        attention_all_bf16(qkv, sequences, rows, keys, values, attn, args);
        projection_rows(o_p, attn, x, 1, m, hidden, attn_width, scratch);
        rmsnorm_rows_bf16(x, norm2, normed, m, hidden, eps);
        if (gate_up_p) {
            projection_rows(gate_up_p, normed, gate_up_out, 0, m, 2 * inter, hidden, scratch);
            swiglu_rows_bf16(gate_up_out, act, m, inter);
            projection_rows(down_p, act, x, 1, m, hidden, inter, scratch);
        }
    }
    free(scratch);
    return 1;
}

/* ---------------------------------------------------------------- MoE routing
 * The sigmoid router of a MiMo-V2 MoE layer for m tokens x float32 [m, H] (weight float32 [E, H],
 * correction bias [E] or NULL): score = sigmoid(x . w_e), experts chosen on score + bias (with
 * n_group > 1 only within the topk_group groups whose two best such values sum highest), each
 * weighted by its score (divided by the chosen scores' sum + 1e-20 with `norm`) times `scaling`.
 * chosen [m, top_k]: experts in descending order of choice (ties: the lower index); chosen_weights
 * [m, top_k]. The logits are linear_f32's dot products (the same bits as the kernel's linear). */
static int better(const float *value, int a, int b) { /* whether expert a ranks before expert b */
    return value[a] > value[b] || (value[a] == value[b] && a < b);
}

static void route_token(const float *x, const float *weight, const float *bias, int64_t hidden, int experts,
                        int top_k, int n_group, int topk_group, int norm, float scaling, int64_t *chosen,
                        float *chosen_weights) {
    float score[experts], choice[experts];
    for (int e = 0; e < experts; e++) {
        score[e] = 1.f / (1.f + expf(-dot_f32(weight + e * hidden, x, hidden)));
        choice[e] = score[e] + (bias ? bias[e] : 0.f);
    }
    if (n_group > 1) {
        const int size = experts / n_group;
        float group_score[n_group];
        for (int g = 0; g < n_group; g++) {
            int first = g * size, second = -1;
            for (int e = g * size + 1; e < (g + 1) * size; e++) {
                if (better(choice, e, first)) { second = first; first = e; }
                else if (second < 0 || better(choice, e, second)) second = e;
            }
            group_score[g] = choice[first] + (second < 0 ? 0.f : choice[second]);
        }
        unsigned char kept[n_group];
        memset(kept, 0, sizeof kept);
        for (int i = 0; i < topk_group && i < n_group; i++) {
            int best = -1;
            for (int g = 0; g < n_group; g++)
                if (!kept[g] && (best < 0 || better(group_score, g, best))) best = g;
            kept[best] = 1;
        }
        for (int e = 0; e < experts; e++)
            if (!kept[e / size]) choice[e] = -INFINITY;
    }
    unsigned char taken[experts];
    memset(taken, 0, sizeof taken);
    float total = 0.f;
    for (int i = 0; i < top_k; i++) {
        int best = -1;
        for (int e = 0; e < experts; e++)
            if (!taken[e] && (best < 0 || better(choice, e, best))) best = e;
        taken[best] = 1;
        chosen[i] = best;
        chosen_weights[i] = score[best];
        total += score[best];
    }
    for (int i = 0; i < top_k; i++) {
        if (norm) chosen_weights[i] = chosen_weights[i] / (total + 1e-20f);
        chosen_weights[i] *= scaling;
    }
}

void moe_route(const float *x, const float *weight, const float *bias, int m, int64_t hidden, int experts,
               int top_k, int n_group, int topk_group, int norm, float scaling, int64_t *chosen,
               float *chosen_weights) {
#pragma omp parallel for schedule(static) if (m > 4)
    for (int t = 0; t < m; t++)
        route_token(x + t * hidden, weight, bias, hidden, experts, top_k, n_group, topk_group, norm, scaling,
                    chosen + (int64_t)t * top_k, chosen_weights + (int64_t)t * top_k);
}

/* A decode or verify step's routed experts, routing included, added to the layer's output:
 * h [m, H] bfloat16 += bfloat16(sum over the chosen experts of w * expert(normed)), rounded as the
 * step-by-step path rounds (the MoE's output to bfloat16, then the sum). normed: the bfloat16 input
 * of the MoE [m, H]. The stacks: quantized ones as moe_quant takes them, or with FORMAT_BF16
 * bfloat16 gate_up [E, 2I, H] and down [E, H, I] (moe_bf16; scales and zeros unused). The
 * assignments are ordered by expert, then by token (MoE's grouped order), so the sums are those of
 * moe_quant / moe_bf16 for the same routing. chosen_out (or NULL) receives the chosen experts
 * [m, top_k] (router statistics). Returns 0 (having done nothing) if its buffers cannot be
 * allocated. */
int moe_routed(int format, uint16_t *h, const uint16_t *normed, int m, const float *router,
               const float *router_bias, int experts, int top_k, int n_group, int topk_group, int norm,
               float scaling, const void *gate_up, const void *gate_up_scales, const float *gate_up_zeros,
               const void *down, const void *down_scales, const float *down_zeros, int64_t hidden,
               int64_t inter, int64_t group, int64_t *chosen_out) {
    const int threads = omp_get_max_threads(), assignments = m * top_k;
    /* a thread's scratch: moe_quant's 3H + 5I floats, or moe_bf16's */
    const int64_t per_thread = format == FORMAT_BF16 ? moe_scratch_floats(hidden, inter) : 3 * hidden + 5 * inter;
    const size_t floats = (size_t)m * hidden * (2 + threads) + (size_t)threads * per_thread +
                          2 * (size_t)assignments;
    float *x = malloc(sizeof(float) * floats);
    int64_t *ids = malloc(sizeof(int64_t) * 4 * (size_t)assignments);
    if (!x || !ids) { free(x); free(ids); return 0; }
    float *out = x + (int64_t)m * hidden, *partial = out + (int64_t)m * hidden;
    float *scratch = partial + (int64_t)threads * m * hidden, *chosen_weights = scratch + (int64_t)threads * per_thread;
    float *pair_weights = chosen_weights + assignments;
    int64_t *chosen = ids, *pair_experts = ids + assignments, *pair_tokens = ids + 2 * assignments;
    for (int64_t j = 0; j < (int64_t)m * hidden; j++) x[j] = bf16_to_f32(normed[j]);
    moe_route(x, router, router_bias, m, hidden, experts, top_k, n_group, topk_group, norm, scaling, chosen,
              chosen_weights);
    if (chosen_out) memcpy(chosen_out, chosen, sizeof(int64_t) * assignments);
    int count = 0; /* ordered by expert, each expert's assignments in token order (a stable sort) */
    for (int e = 0; e < experts; e++)
        for (int a = 0; a < assignments; a++)
            if (chosen[a] == e) {
                pair_experts[count] = e;
                pair_tokens[count] = a / top_k;
                pair_weights[count++] = chosen_weights[a];
            }
    if (format == FORMAT_BF16)
        moe_bf16(normed, gate_up, down, pair_experts, pair_tokens, pair_weights, assignments, m, out, partial, scratch,
                 hidden, inter);
    else
        moe_quant(format, x, gate_up, gate_up_scales, gate_up_zeros, down, down_scales, down_zeros, pair_experts,
                  pair_tokens, pair_weights, assignments, m, out, partial, scratch, hidden, inter, group);
    for (int64_t j = 0; j < (int64_t)m * hidden; j++) store_bf16(h, 1, j, out[j]);
    free(x);
    free(ids);
    return 1;
}
