/* The decode kernels against naive references, as a plain C program: the check that runs where
 * Python cannot (an aarch64 build under qemu-user) and natively for the host's builds
 * (tests/test_kernel_harness.py). Prints the build's ISA level, one line per check, then "ALL OK";
 * exits 1 on the first failure. Small shapes: qemu is slow. */
#include "../mimo_local/kernels/cpu_quant.c"

#include <stdio.h>
#include <stdlib.h>

static uint32_t state = 12345;
static float uniform(void) { /* -1 .. 1 */
    state = state * 1664525u + 1013904223u;
    return (float)((state >> 8) & 0xFFFF) / 32768.f - 1.f;
}
static uint16_t to_bf16(float f) { return f32_to_bf16(f); }

static int failures = 0;
static void check(int ok, const char *what) {
    printf("%s %s\n", ok ? "ok" : "FAIL", what);
    if (!ok) failures++;
}

#define M 3
#define N 40
#define K 256
#define GROUP 128

int main(void) {
    printf("isa %s\n", kernel_isa());
    static float xf[M * K], wf[N * K], bias[N], y[M * N], y1[M * N], expected[M * N];
    static uint16_t xb[M * K], wb[N * K], yb[M * N];
    static int8_t w8[N * K];
    static uint8_t w4[N * K / 2];
    static float scales8[N], scales4[N * K / GROUP], zeros4[N * K / GROUP];
    for (int i = 0; i < M * K; i++) { xb[i] = to_bf16(uniform() * 3.f); xf[i] = bf16_to_f32(xb[i]); }
    for (int i = 0; i < N * K; i++) { wb[i] = to_bf16(uniform() / 16.f); wf[i] = bf16_to_f32(wb[i]); }
    for (int i = 0; i < N; i++) { bias[i] = uniform(); scales8[i] = (uniform() + 1.5f) / 256.f; }
    for (int i = 0; i < N * K; i++) w8[i] = (int8_t)(uniform() * 127.f);
    for (int i = 0; i < N * K / 2; i++) w4[i] = (uint8_t)((uniform() + 1.f) * 127.99f);
    for (int i = 0; i < N * K / GROUP; i++) { scales4[i] = (uniform() + 1.5f) / 64.f; zeros4[i] = (uniform() + 1.f) * 7.5f; }

    /* float32 and bfloat16 GEMV rows */
    linear_f32(xf, wf, bias, NULL, y, M, N, K);
    int ok = 1;
    for (int i = 0; i < M; i++)
        for (int r = 0; r < N; r++) {
            double sum = bias[r];
            for (int j = 0; j < K; j++) sum += (double)xf[i * K + j] * wf[r * K + j];
            expected[i * N + r] = (float)sum;
            ok &= fabs(y[i * N + r] - sum) <= 1e-4 * (1 + fabs(sum));
        }
    check(ok, "linear_f32 matches the reference");
    linear_bf16(xb, wb, NULL, y, NULL, M, N, K);
    ok = 1;
    for (int i = 0; i < M * N; i++) {
        int r = i % N;
        ok &= fabsf(y[i] - (expected[i] - bias[r])) <= 1e-4f * (1 + fabsf(expected[i]));
    }
    check(ok, "linear_bf16 (float32 out) matches the reference");
    linear_bf16(xb, wb, NULL, NULL, yb, M, N, K);
    ok = 1;
    for (int i = 0; i < M * N; i++) ok &= yb[i] == to_bf16(y[i]);
    check(ok, "linear_bf16 rounds once to bfloat16");

    /* int8 rows on int16-quantized activations */
    ok = linear_int8_bf16(xb, w8, scales8, bias, y, M, N, K, 0);
    for (int i = 0; i < M; i++)
        for (int r = 0; r < N; r++) {
            double sum = bias[r], size = 0;
            for (int j = 0; j < K; j++) {
                sum += (double)xf[i * K + j] * w8[r * K + j] * scales8[r];
                size += fabs((double)w8[r * K + j] * scales8[r]) * 3.0 / 32767;
            }
            ok &= fabs(y[i * N + r] - sum) <= size + 1e-4 * (1 + fabs(sum));
        }
    check(ok, "linear_int8_bf16 matches the reference within the int16 quantization of x");

    /* int4 groups on int8-quantized activations */
    ok = linear_int4_bf16(xb, w4, scales4, zeros4, bias, y, M, N, K, GROUP, 0);
    for (int i = 0; i < M; i++)
        for (int r = 0; r < N; r++) {
            double sum = bias[r], size = 0;
            for (int j = 0; j < K; j++) {
                int q = j % 2 ? w4[r * K / 2 + j / 2] >> 4 : w4[r * K / 2 + j / 2] & 0x0F;
                int g = r * (K / GROUP) + j / GROUP;
                double w = (q - zeros4[g]) * scales4[g];
                sum += xf[i * K + j] * w;
                size += fabs(w) * 3.0 / 254;
            }
            ok &= fabs(y[i * N + r] - sum) <= size * 1.01 + 1e-4 * (1 + fabs(sum));
        }
    check(ok, "linear_int4_bf16 matches the reference within the int8 quantization of x");

    /* The integer sums of both against the same quantized x summed exactly in int64 (only their
     * conversion to float rounds), on the random rows and on rows at the int32 lane bound: 4096
     * inputs of -32767 against weights of -128 (int8 wraps there if a lane holds more than 512
     * products) or 15 (int4) */
    ok = 1;
    {
        enum { LONG_K = 4096 };
        static uint16_t x_long[LONG_K];
        static int8_t w8_long[2 * LONG_K];
        static uint8_t w4_long[2 * LONG_K / 2];
        static int16_t xq[M * LONG_K];
        static int8_t xq_even[M * LONG_K / 2], xq_odd[M * LONG_K / 2];
        static float x_scales[M * LONG_K / GROUP], x_sums[M * LONG_K / GROUP];
        static const float ones[2] = {1.f, 1.f}, none[2 * LONG_K / GROUP] = {0.f};
        static float unit[2 * LONG_K / GROUP];
        for (int i = 0; i < LONG_K; i++) x_long[i] = to_bf16(-1.f);
        for (int i = 0; i < 2 * LONG_K; i++) w8_long[i] = i < LONG_K ? -128 : 127;
        for (int i = 0; i < LONG_K; i++) w4_long[i] = i < LONG_K / 2 ? 0xFF : 0x0F;
        for (int i = 0; i < 2 * LONG_K / GROUP; i++) unit[i] = 1.f;
        for (int pass = 0; pass < 2; pass++) {
            int m = pass ? 1 : M, n = pass ? 2 : N, k = pass ? LONG_K : K;
            const uint16_t *xs = pass ? x_long : xb;
            const int8_t *w8s = pass ? w8_long : w8;
            const uint8_t *w4s = pass ? w4_long : w4;
            const float *s8 = pass ? ones : scales8, *s4 = pass ? unit : scales4, *z4 = pass ? none : zeros4;
            quantize_x_int16(xs, xq, x_scales, m, k);
            linear_int8_bf16(xs, w8s, s8, NULL, y, m, n, k, 0);
            for (int i = 0; i < m; i++)
                for (int r = 0; r < n; r++) {
                    int64_t exact = 0, size = 0;
                    for (int j = 0; j < k; j++) {
                        exact += (int64_t)w8s[(int64_t)r * k + j] * xq[(int64_t)i * k + j];
                        size += llabs((int64_t)w8s[(int64_t)r * k + j] * xq[(int64_t)i * k + j]);
                    }
                    double expected = (double)exact * x_scales[i] * s8[r];
                    ok &= fabs(y[i * n + r] - expected) <= 4e-6 * (double)size * x_scales[i] * s8[r];
                }
            int groups = k / GROUP;
            quantize_rows_int8(xs, m, k, GROUP, xq_even, xq_odd, x_scales, x_sums);
            linear_int4_bf16(xs, w4s, s4, z4, NULL, y, m, n, k, GROUP, 0);
            for (int i = 0; i < m; i++)
                for (int r = 0; r < n; r++) {
                    double expected = 0, size = 0;
                    for (int g = 0; g < groups; g++) {
                        int64_t exact = 0;
                        for (int j = g * GROUP / 2; j < (g + 1) * GROUP / 2; j++) {
                            uint8_t byte = w4s[(int64_t)r * k / 2 + j];
                            exact += (byte & 0x0F) * xq_even[i * k / 2 + j] + (byte >> 4) * xq_odd[i * k / 2 + j];
                        }
                        float step = s4[r * groups + g] * x_scales[i * groups + g];
                        float offset = s4[r * groups + g] * z4[r * groups + g] * x_sums[i * groups + g];
                        expected += (double)exact * step - offset;
                        size += fabs((double)exact * step) + fabs(offset);
                    }
                    ok &= fabs(y[i * n + r] - expected) <= 4e-6 * size;
                }
        }
    }
    check(ok, "int8 and int4 integer dot products are exact, at the int32 lane bound too");

    /* the prefill GEMM: 13 tokens (tiles padded), int8 and int4 weights, against the same float32
     * steps in order after exact integer sums (fmaf: one rounding, as the vector builds' FMAs) */
    ok = 1;
    {
        enum { ROWS = 13 };
        static uint16_t xg[ROWS * K];
        static float yg[ROWS * N];
        static uint16_t ygb[ROWS * N];
        for (int i = 0; i < ROWS * K; i++) xg[i] = to_bf16(uniform() * (i < 64 ? 40.f : 3.f));
        for (int format = 8; format >= 4; format -= 4) {
            const void *weights = format == 8 ? (const void *)w8 : (const void *)w4;
            const float *scales = format == 8 ? scales8 : scales4;
            ok &= gemm_quant_bf16(xg, format, weights, scales, zeros4, bias, NULL, ygb, ROWS, N, K, GROUP);
            ok &= gemm_quant_bf16(xg, format, weights, scales, zeros4, bias, yg, NULL, ROWS, N, K, GROUP);
            for (int i = 0; i < ROWS * N; i++) ok &= ygb[i] == to_bf16(yg[i]);
            for (int i = 0; i < ROWS; i++)
                for (int r = 0; r < N; r++) {
                    float acc = 0.f;
                    for (int g = 0; g < K / GROUP; g++) {
                        float peak = 0.f;
                        for (int j = g * GROUP; j < (g + 1) * GROUP; j++) {
                            float v = fabsf(bf16_to_f32(xg[i * K + j]));
                            peak = v > peak ? v : peak;
                        }
                        float x_scale = peak > 0.f ? peak / 127.f : 1.f, inverse = 1.f / x_scale;
                        int32_t exact = 0, codes = 0; /* at most 128 * 255 * 127 */
                        for (int j = g * GROUP; j < (g + 1) * GROUP; j++) {
                            int32_t q = (int32_t)lrintf(bf16_to_f32(xg[i * K + j]) * inverse);
                            int w = format == 8 ? w8[r * K + j] + 128
                                                : (j % 2 ? w4[r * K / 2 + j / 2] >> 4 : w4[r * K / 2 + j / 2] & 0x0F);
                            exact += w * q;
                            codes += q;
                        }
                        float scale = format == 8 ? scales8[r] : scales4[r * K / GROUP + g];
                        float offset = format == 8 ? scale * 128.f : scale * zeros4[r * K / GROUP + g];
                        acc = fmaf((float)exact, scale * x_scale, acc);
                        acc = fmaf(-offset, x_scale * (float)codes, acc);
                    }
                    ok &= yg[i * N + r] == acc + bias[r];
                }
        }
    }
    check(ok, "gemm_quant_bf16 (int8, int4) equals its float32 steps after exact integer sums, and rounds them once");

    /* MXFP4 rows (e2m1 pairs, an E8M0 scale per 32 inputs) on x quantized to int8 per block of 32
     * (scale max|x| / 127): each block's integer dot product exact, then the sum of its products
     * with 2^(e - 127) * x_scale / 2 within the float32 summation-order bound gamma(K/8 + 2) * sum |terms| */
    static uint8_t wmx[N * K / 2], smx[N * K / 32];
    static const int twice_e2m1[8] = {0, 1, 2, 3, 4, 6, 8, 12};
    for (int i = 0; i < N * K / 2; i++) wmx[i] = (uint8_t)((uniform() + 1.f) * 127.99f);
    for (int i = 0; i < N * K / 32; i++) smx[i] = (uint8_t)(118 + (uniform() + 1.f) * 4.99f);
    ok = linear_mxfp4(xf, wmx, smx, bias, y, M, N, K);
    for (int i = 0; i < M; i++)
        for (int r = 0; r < N; r++) {
            double sum = bias[r], size = fabs(bias[r]);
            for (int b = 0; b < K / 32; b++) {
                float peak = 0.f;
                for (int j = 32 * b; j < 32 * b + 32; j++) peak = fmaxf(peak, fabsf(xf[i * K + j]));
                float x_scale = peak > 0.f ? peak / 127.f : 1.f, inverse = 1.f / x_scale;
                float step = (float)ldexp(1.0, smx[r * K / 32 + b] - 127) * (round_to_half(x_scale) * .5f);
                long exact = 0, magnitude = 0;
                for (int j = 32 * b; j < 32 * b + 32; j++) {
                    int q = j % 2 ? wmx[r * K / 2 + j / 2] >> 4 : wmx[r * K / 2 + j / 2] & 0x0F;
                    long product = (q & 8 ? -1 : 1) * twice_e2m1[q & 7] * lrintf(xf[i * K + j] * inverse);
                    exact += product;
                    magnitude += labs(product);
                }
                sum += (double)exact * step;
                size += (double)magnitude * step;
            }
            double gamma = (K / 8 + 2) * 0x1p-24 / (1 - (K / 8 + 2) * 0x1p-24);
            ok &= fabs(y[i * N + r] - sum) <= gamma * size;
        }
    check(ok, "linear_mxfp4 matches its int8-activation arithmetic within float32 summation order");

    /* a token gets the same bits alone and among others (MTP verify steps) */
    ok = 1;
    for (int kind = 0; kind < 4; kind++) {
        for (int i = 0; i < M; i++) {
            float alone[N];
            if (kind == 0) linear_bf16(xb + i * K, wb, NULL, alone, NULL, 1, N, K);
            if (kind == 1) linear_int8_bf16(xb + i * K, w8, scales8, bias, alone, 1, N, K, 0);
            if (kind == 2) linear_int4_bf16(xb + i * K, w4, scales4, zeros4, bias, alone, 1, N, K, GROUP, 0);
            if (kind == 3) linear_mxfp4(xf + i * K, wmx, smx, bias, alone, 1, N, K);
            if (i == 0) {
                if (kind == 0) linear_bf16(xb, wb, NULL, y1, NULL, M, N, K);
                if (kind == 1) linear_int8_bf16(xb, w8, scales8, bias, y1, M, N, K, 0);
                if (kind == 2) linear_int4_bf16(xb, w4, scales4, zeros4, bias, y1, M, N, K, GROUP, 0);
                if (kind == 3) linear_mxfp4(xf, wmx, smx, bias, y1, M, N, K);
            }
            ok &= memcmp(alone, y1 + i * N, sizeof alone) == 0;
        }
    }
    check(ok, "one token alone and in a 3-token call: the same bits");

    /* argmax: the first of the largest, as torch.argmax picks it */
    static float logits[1001];
    int64_t best;
    ok = 1;
    for (int trial = 0; trial < 20; trial++) {
        int64_t n = 1 + trial * 50, naive = 0;
        for (int64_t j = 0; j < n; j++) logits[j] = trial % 2 ? roundf(uniform() * 4.f) : uniform();
        if (trial % 5 == 0) for (int64_t j = n / 2; j < n; j++) logits[j] = -INFINITY;
        for (int64_t j = 1; j < n; j++) if (logits[j] > logits[naive]) naive = j;
        argmax_rows_f32(logits, 1, n, &best);
        ok &= best == naive;
    }
    check(ok, "argmax_rows_f32 picks the first largest");

    if (failures) return 1;
    printf("ALL OK\n");
    return 0;
}
