/* Decode matmuls on packed integer weights: y[M,N] = x[M,K] . dequant(W)[N,K]^T, M small (1..16).
 *
 * Same plan as cpu_linear.c: threads take chunks of output rows, each row of W is streamed once
 * and applied to every row of x (float32, from L1). Each block of weights is dequantized once in
 * registers and used for all M rows of x; the result equals dequantize-then-matmul up to float
 * rounding. Layouts are documented in quant.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define TOKENS_PER_PASS 4
#define ALWAYS_INLINE static inline __attribute__((always_inline))

static inline float bf16_value(uint16_t v) {
    uint32_t bits = ((uint32_t)v) << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* ---------------------------------------------------------------- int8, one scale per row */
ALWAYS_INLINE void int8_row(const int8_t *w, const float *x, int64_t k, int tokens, float *sums) {
    int64_t j = 0;
#if defined(__AVX512F__)
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
#else
    for (int t = 0; t < tokens; t++) sums[t] = 0.f;
#endif
    for (; j < k; j++)
        for (int t = 0; t < tokens; t++) sums[t] += (float)w[j] * x[t * k + j];
}

/* int8 weights with bfloat16 x, on the AVX512-VNNI 16-bit dot product: x is quantized once per
 * call to int16 with one scale per token (absolute error <= max|x| / 65534, far below bfloat16's
 * own rounding of all but the smallest elements), weights widen to int16, and each instruction
 * does 32 multiply-adds into int32 lanes. The int32 sums move to float32 every 2048 inputs, before
 * they could overflow (128 products of at most 127 * 32767 per lane). Needs k % 64 == 0. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT8_FLUSH 2048
ALWAYS_INLINE void int8_row_int16(const int8_t *w, const int16_t *x, int64_t k, int tokens, float *sums) {
    __m512 acc[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t chunk = 0; chunk < k; chunk += INT8_FLUSH) {
        int64_t end = chunk + INT8_FLUSH < k ? chunk + INT8_FLUSH : k;
        __m512i exact[TOKENS_PER_PASS][2];
        for (int t = 0; t < tokens; t++) exact[t][0] = exact[t][1] = _mm512_setzero_si512();
        for (int64_t j = chunk; j < end; j += 64) {
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j + 32)));
            for (int t = 0; t < tokens; t++) {
                exact[t][0] = _mm512_dpwssd_epi32(exact[t][0], w0, _mm512_loadu_si512(x + t * k + j));
                exact[t][1] = _mm512_dpwssd_epi32(exact[t][1], w1, _mm512_loadu_si512(x + t * k + j + 32));
            }
        }
        for (int t = 0; t < tokens; t++)
            acc[t] = _mm512_add_ps(acc[t], _mm512_cvtepi32_ps(_mm512_add_epi32(exact[t][0], exact[t][1])));
    }
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(acc[t]);
}
#endif

int linear_int8_bf16(const uint16_t *x, const int8_t *w, const float *scales, const float *bias, float *y, int m,
                     int64_t n, int64_t k) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (k % 64) return 0;
    int16_t *xq = malloc(sizeof(int16_t) * m * k);
    float *x_scale = malloc(sizeof(float) * m);
    if (!xq || !x_scale) { free(xq); free(x_scale); return 0; }
    for (int t = 0; t < m; t++) {
        float peak = 0.f;
        for (int64_t j = 0; j < k; j++) { float v = fabsf(bf16_value(x[t * k + j])); peak = v > peak ? v : peak; }
        x_scale[t] = peak > 0.f ? peak / 32767.f : 1.f;
        float inverse = 1.f / x_scale[t];
        for (int64_t j = 0; j < k; j++) xq[t * k + j] = (int16_t)lrintf(bf16_value(x[t * k + j]) * inverse);
    }
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *wr = w + row * k;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
        for (int first = 0; first < m; first += TOKENS_PER_PASS) {
            int tokens = m - first < TOKENS_PER_PASS ? m - first : TOKENS_PER_PASS;
            const int16_t *xs = xq + (int64_t)first * k;
            switch (tokens) {
                case 1: int8_row_int16(wr, xs, k, 1, sums); break;
                case 2: int8_row_int16(wr, xs, k, 2, sums); break;
                case 3: int8_row_int16(wr, xs, k, 3, sums); break;
                default: int8_row_int16(wr, xs, k, 4, sums); break;
            }
            for (int t = 0; t < tokens; t++)
                y[(int64_t)(first + t) * n + row] = sums[t] * x_scale[first + t] * scales[row] + b;
        }
    }
    free(xq);
    free(x_scale);
    return 1;
#else
    return 0; /* no 16-bit integer dot product on this CPU: the caller takes the float32 kernel */
#endif
}

void linear_int8(const float *x, const int8_t *w, const float *scales, const float *bias, float *y, int m,
                 int64_t n, int64_t k) {
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t row = 0; row < n; row++) {
        const int8_t *wr = w + row * k;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
        for (int first = 0; first < m; first += TOKENS_PER_PASS) {
            int tokens = m - first < TOKENS_PER_PASS ? m - first : TOKENS_PER_PASS;
            const float *xs = x + (int64_t)first * k;
            switch (tokens) { /* constant token counts let the compiler keep accumulators in registers */
                case 1: int8_row(wr, xs, k, 1, sums); break;
                case 2: int8_row(wr, xs, k, 2, sums); break;
                case 3: int8_row(wr, xs, k, 3, sums); break;
                default: int8_row(wr, xs, k, 4, sums); break;
            }
            for (int t = 0; t < tokens; t++) y[(int64_t)(first + t) * n + row] = sums[t] * scales[row] + b;
        }
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
#if defined(__AVX512F__)
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
#endif
    for (int t = 0; t < tokens; t++) sums[t] = 0.f;
    for (int64_t j = 0; j < half; j++) {
        int64_t g = 2 * j / group;
        float lo = ((float)(w[j] & 0x0F) - zeros[g]) * scales[g];
        float hi = ((float)(w[j] >> 4) - zeros[g]) * scales[g];
        for (int t = 0; t < tokens; t++) sums[t] += lo * x_even[t * half + j] + hi * x_odd[t * half + j];
    }
}

/* The same for bfloat16 x, on the AVX512-BF16 dot product. A nibble q becomes the bfloat16 number
 * 128 + q by pairing it with the byte 0x43 (bfloat16 0x43qq is 128 + q, exact), which the in-lane
 * byte unpacks do for free; 64 bytes of weights (128 inputs) become four vectors of 32 bfloat16 that
 * meet x with one dot product (32 multiply-adds) each. x is laid out once per call in the order the
 * unpacks produce (see arrange_bf16). Per group: s * (x . (128 + q) - (128 + z) * sum(x)).
 * Needs group % 128 == 0. */
#if defined(__AVX512BF16__)
static void arrange_bf16(const uint16_t *x, uint16_t *arranged, float *sums, int64_t k, int64_t group) {
    for (int64_t block = 0; block < k / 128; block++) {
        const uint16_t *in = x + block * 128;
        uint16_t *out = arranged + block * 128;
        for (int lane = 0; lane < 4; lane++)
            for (int i = 0; i < 8; i++) {
                int low = 16 * lane + i, high = 16 * lane + 8 + i; /* byte indices in the block */
                out[lane * 8 + i] = in[2 * low];
                out[32 + lane * 8 + i] = in[2 * high];
                out[64 + lane * 8 + i] = in[2 * low + 1];
                out[96 + lane * 8 + i] = in[2 * high + 1];
            }
    }
    for (int64_t g = 0; g < k / group; g++) {
        float sum = 0.f;
        for (int64_t j = g * group; j < (g + 1) * group; j++) sum += bf16_value(x[j]);
        sums[g] = sum;
    }
}

ALWAYS_INLINE void int4_row_bf16(const uint8_t *w, const float *scales, const float *zeros, const uint16_t *x,
                                 const float *x_sums, int64_t k, int64_t groups, int64_t blocks_per_group,
                                 int tokens, float *sums) {
    const __m512i low_mask = _mm512_set1_epi8(0x0F), exponent = _mm512_set1_epi8(0x43);
    __m512 acc[TOKENS_PER_PASS];
    float offset[TOKENS_PER_PASS];
    for (int t = 0; t < tokens; t++) { acc[t] = _mm512_setzero_ps(); offset[t] = 0.f; }
    for (int64_t g = 0; g < groups; g++) {
        __m512 partial[TOKENS_PER_PASS];
        for (int t = 0; t < tokens; t++) partial[t] = _mm512_setzero_ps();
        for (int64_t block = g * blocks_per_group; block < (g + 1) * blocks_per_group; block++) {
            __m512i bytes = _mm512_loadu_si512(w + block * 64);
            __m512i lo = _mm512_and_si512(bytes, low_mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_mask);
            __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, exponent), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, exponent);
            __m512bh w2 = (__m512bh)_mm512_unpacklo_epi8(hi, exponent), w3 = (__m512bh)_mm512_unpackhi_epi8(hi, exponent);
            for (int t = 0; t < tokens; t++) {
                const uint16_t *xb = x + t * k + block * 128;
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xb));
                __m512 b = _mm512_dpbf16_ps(_mm512_setzero_ps(), w1, (__m512bh)_mm512_loadu_si512(xb + 32));
                a = _mm512_dpbf16_ps(a, w2, (__m512bh)_mm512_loadu_si512(xb + 64));
                b = _mm512_dpbf16_ps(b, w3, (__m512bh)_mm512_loadu_si512(xb + 96));
                partial[t] = _mm512_add_ps(partial[t], _mm512_add_ps(a, b));
            }
        }
        __m512 scale = _mm512_set1_ps(scales[g]);
        for (int t = 0; t < tokens; t++) {
            acc[t] = _mm512_fmadd_ps(partial[t], scale, acc[t]);
            offset[t] += scales[g] * (128.f + zeros[g]) * x_sums[t * groups + g];
        }
    }
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_reduce_add_ps(acc[t]) - offset[t];
}
#endif

int linear_int4_bf16(const uint16_t *x, const uint8_t *w, const float *scales, const float *zeros,
                     const float *bias, float *y, int m, int64_t n, int64_t k, int64_t group) {
#if defined(__AVX512BF16__)
    if (group % 128) return 0;
    const int64_t groups = k / group, half = k / 2, blocks_per_group = group / 128;
    uint16_t *arranged = malloc(sizeof(uint16_t) * m * k);
    float *x_sums = malloc(sizeof(float) * m * groups);
    if (!arranged || !x_sums) { free(arranged); free(x_sums); return 0; }
    for (int t = 0; t < m; t++) arrange_bf16(x + (int64_t)t * k, arranged + (int64_t)t * k, x_sums + t * groups, k, group);
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *wr = w + row * half;
        const float *sr = scales + row * groups, *zr = zeros + row * groups;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
        for (int first = 0; first < m; first += TOKENS_PER_PASS) {
            int tokens = m - first < TOKENS_PER_PASS ? m - first : TOKENS_PER_PASS;
            const uint16_t *xa = arranged + (int64_t)first * k;
            const float *xs = x_sums + (int64_t)first * groups;
            switch (tokens) {
                case 1: int4_row_bf16(wr, sr, zr, xa, xs, k, groups, blocks_per_group, 1, sums); break;
                case 2: int4_row_bf16(wr, sr, zr, xa, xs, k, groups, blocks_per_group, 2, sums); break;
                case 3: int4_row_bf16(wr, sr, zr, xa, xs, k, groups, blocks_per_group, 3, sums); break;
                default: int4_row_bf16(wr, sr, zr, xa, xs, k, groups, blocks_per_group, 4, sums); break;
            }
            for (int t = 0; t < tokens; t++) y[(int64_t)(first + t) * n + row] = sums[t] + b;
        }
    }
    free(arranged);
    free(x_sums);
    return 1;
#else
    return 0; /* no bfloat16 dot product on this CPU: the caller takes the float32 kernel */
#endif
}

void linear_int4(const float *x_even, const float *x_odd, const uint8_t *w, const float *scales,
                 const float *zeros, const float *bias, float *y, int m, int64_t n, int64_t k, int64_t group) {
    int64_t groups = k / group, half = k / 2;
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *wr = w + row * half;
        const float *sr = scales + row * groups, *zr = zeros + row * groups;
        float b = bias ? bias[row] : 0.f;
        float sums[TOKENS_PER_PASS];
        for (int first = 0; first < m; first += TOKENS_PER_PASS) {
            int tokens = m - first < TOKENS_PER_PASS ? m - first : TOKENS_PER_PASS;
            const float *xe = x_even + (int64_t)first * half, *xo = x_odd + (int64_t)first * half;
            switch (tokens) {
                case 1: int4_row(wr, sr, zr, xe, xo, k, group, 1, sums); break;
                case 2: int4_row(wr, sr, zr, xe, xo, k, group, 2, sums); break;
                case 3: int4_row(wr, sr, zr, xe, xo, k, group, 3, sums); break;
                default: int4_row(wr, sr, zr, xe, xo, k, group, 4, sums); break;
            }
            for (int t = 0; t < tokens; t++) y[(int64_t)(first + t) * n + row] = sums[t] + b;
        }
    }
}

/* ---------------------------------------------------------------- routed SwiGLU experts, quantized
 * out[t] += w * down_e(silu(gate_e(x_t)) * up_e(x_t)) for each (expert e, token t, weight w)
 * assignment, with gate_up [E, 2I, H] and down [E, H, I] stacks in the int8 (bits 8) or int4
 * (bits 4) layout; zeros are unused for int8. x is float32 [M, H]; out float32 [M, H].
 * Threads split the assignments (each streams whole experts) into their own partial output.
 * scratch per thread: H + 3I floats. partial: threads * M * H floats. */
typedef struct {
    const void *weights; /* int8_t or uint8_t (packed) */
    const float *scales, *zeros;
} QuantStack;

static float quant_row(int bits, QuantStack s, int64_t expert, int64_t rows, int64_t row, const float *x,
                       const float *x_even, const float *x_odd, int64_t k, int64_t group) {
    float sum;
    int64_t r = expert * rows + row;
    if (bits == 8) {
        int8_row((const int8_t *)s.weights + r * k, x, k, 1, &sum);
        return sum * s.scales[r];
    }
    int4_row((const uint8_t *)s.weights + r * (k / 2), s.scales + r * (k / group), s.zeros + r * (k / group),
             x_even, x_odd, k, group, 1, &sum);
    return sum;
}

static void split_even_odd(const float *x, float *even, float *odd, int64_t k) {
    for (int64_t j = 0; j < k / 2; j++) { even[j] = x[2 * j]; odd[j] = x[2 * j + 1]; }
}

void moe_quant(int bits, const float *x, const void *gate_up, const float *gate_up_scales,
               const float *gate_up_zeros, const void *down, const float *down_scales, const float *down_zeros,
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
        float *x_split = scratch + (int64_t)id * (hidden + 3 * inter);
        float *gate_up_out = x_split + hidden;
        float *act = gate_up_out + 2 * inter;
        for (int64_t j = 0; j < (int64_t)m * hidden; j++) mine[j] = 0.f;
        int first = (int)((int64_t)assignments * id / threads);
        int last = (int)((int64_t)assignments * (id + 1) / threads);
        for (int a = first; a < last; a++) {
            const float *xt = x + tokens[a] * hidden;
            if (bits == 4) split_even_odd(xt, x_split, x_split + hidden / 2, hidden);
            for (int64_t r = 0; r < 2 * inter; r++)
                gate_up_out[r] = quant_row(bits, gu, experts[a], 2 * inter, r, xt, x_split, x_split + hidden / 2,
                                           hidden, group);
            float *act_even = act, *act_odd = act + inter / 2;
            for (int64_t i = 0; i < inter; i++) {
                float g = gate_up_out[i];
                float v = g / (1.f + expf(-g)) * gate_up_out[inter + i];
                if (bits == 4) (i % 2 ? act_odd : act_even)[i / 2] = v;
                else act[i] = v;
            }
            float *ot = mine + tokens[a] * hidden;
            for (int64_t r = 0; r < hidden; r++)
                ot[r] += weights[a] * quant_row(bits, dn, experts[a], hidden, r, act, act_even, act_odd, inter, group);
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
