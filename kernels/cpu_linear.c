/* Memory-bound CPU matmuls for decoding: y[M,N] = x[M,K] . W[N,K]^T (+ bias), M small (1..16).
 *
 * Decode reads every weight once per token, so speed is memory bandwidth: each thread streams a
 * contiguous block of rows of W once and applies it to all M rows of x held in cache.
 * Compiled on first use with -march=native; the AVX-512 paths are picked at compile time, with a
 * plain C loop (auto-vectorized) for other CPUs. OpenMP resolves to the libgomp torch already
 * loaded, so torch's ops and these share one thread pool.
 */
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif


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
 * slower here, software prefetching slower too). Rows of x come from L1. Rows are handed out in
 * chunks of 64 as threads free up: on a shared machine one core is often slower. */

/* ---------------------------------------------------------------- float32 weights, float32 x */
static float dot_f32(const float *w, const float *x, int64_t k) {
    int64_t j = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    for (; j + 16 <= k; j += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; j < k; j++) s += w[j] * x[j];
    return s;
}

void linear_f32(const float *x, const float *w, const float *bias, float *y, int m, int64_t n, int64_t k) {
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t row = 0; row < n; row++) {
        const float *wr = w + row * k;
        float b = bias ? bias[row] : 0.f;
        for (int i = 0; i < m; i++) y[i * n + row] = dot_f32(wr, x + i * k, k) + b;
    }
}

/* ---------------------------------------------------------------- bfloat16 weights, bfloat16 x */
static float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t k) {
    int64_t j = 0;
    float s = 0.f;
#if defined(__AVX512BF16__)
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
#endif
    for (; j < k; j++) s += bf16_to_f32(w[j]) * bf16_to_f32(x[j]);
    return s;
}

/* y is float32 when y_f32 is non-null, else bfloat16 in y_bf16. */
void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, float *y_f32, uint16_t *y_bf16,
                 int m, int64_t n, int64_t k) {
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t row = 0; row < n; row++) {
        const uint16_t *wr = w + row * k;
        float b = bias ? bf16_to_f32(bias[row]) : 0.f;
        for (int i = 0; i < m; i++) {
            float v = dot_bf16(wr, x + i * k, k) + b;
            if (y_f32) y_f32[i * n + row] = v;
            else y_bf16[i * n + row] = f32_to_bf16(v);
        }
    }
}

/* ---------------------------------------------------------------- routed SwiGLU experts
 * out[t] += w * down_e(silu(gate_e(x_t)) * up_e(x_t)) for each (token t, expert e, weight w)
 * assignment. gate_up is [E, 2I, H] (gate rows first), down is [E, H, I]; out is float32 [M, H].
 * Experts are small, so threads split the assignments (each streams whole experts, one parallel
 * region per layer) and add into their own partial output; the partials are summed at the end.
 * scratch: per thread, I activations (T) + 2I floats; partial: threads * M * H floats. */
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
            float *gate_up_out = scratch + (int64_t)id * 3 * inter;                                       \
            T *act = (T *)(gate_up_out + 2 * inter);                                                      \
            for (int64_t j = 0; j < (int64_t)m * hidden; j++) mine[j] = 0.f;                              \
            int first = (int)((int64_t)assignments * id / threads);                                       \
            int last = (int)((int64_t)assignments * (id + 1) / threads);                                  \
            for (int a = first; a < last; a++) {                                                          \
                const T *xt = x + tokens[a] * hidden;                                                     \
                const T *gu = gate_up + experts[a] * 2 * inter * hidden;                                  \
                const T *dn = down + experts[a] * hidden * inter;                                         \
                float *ot = mine + tokens[a] * hidden;                                                    \
                float w = weights[a];                                                                     \
                for (int64_t r = 0; r < 2 * inter; r++) {                                                 \
                    gate_up_out[r] = TO_F32(FROM_F32(DOT(gu + r * hidden, xt, hidden)));                  \
                }                                                                                         \
                for (int64_t i = 0; i < inter; i++) {                                                     \
                    float g = gate_up_out[i];                                                             \
                    act[i] = FROM_F32(TO_F32(FROM_F32(g / (1.f + expf(-g)))) * gate_up_out[inter + i]);   \
                }                                                                                         \
                for (int64_t r = 0; r < hidden; r++) {                                                    \
                    ot[r] += w * TO_F32(FROM_F32(DOT(dn + r * inter, act, inter)));                       \
                }                                                                                         \
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

/* ---------------------------------------------------------------- SwiGLU activation
 * out[i, j] = silu(gate[i, j]) * up[i, j] for rows [gate | up] of 2 * inter, rounded as torch does. */
#define SWIGLU_KERNEL(NAME, T, TO_F32, FROM_F32)                                                       \
    void NAME(const T *gate_up, T *out, int m, int64_t inter) {                                          \
        for (int i = 0; i < m; i++)                                                                      \
            for (int64_t j = 0; j < inter; j++) {                                                        \
                float g = TO_F32(gate_up[i * 2 * inter + j]);                                            \
                out[i * inter + j] = FROM_F32(TO_F32(FROM_F32(g / (1.f + expf(-g)))) *                  \
                                              TO_F32(gate_up[i * 2 * inter + inter + j]));               \
            }                                                                                            \
    }
SWIGLU_KERNEL(swiglu_f32, float, identity_f32, identity_f32)
SWIGLU_KERNEL(swiglu_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* ---------------------------------------------------------------- RMSNorm
 * out = weight * cast(x * rsqrt(mean(x^2) + eps)), the cast to the model dtype before the weight
 * multiply as in the reference implementations. */
#define RMSNORM_KERNEL(NAME, T, TO_F32, FROM_F32)                                                      \
    void NAME(const T *x, const T *weight, T *out, int m, int64_t size, float eps) {                     \
        for (int i = 0; i < m; i++) {                                                                    \
            const T *xi = x + i * size;                                                                  \
            double sum = 0.0;                                                                            \
            for (int64_t j = 0; j < size; j++) { float v = TO_F32(xi[j]); sum += (double)v * v; }        \
            float inv = 1.f / sqrtf((float)(sum / size) + eps);                                          \
            for (int64_t j = 0; j < size; j++)                                                           \
                out[i * size + j] = FROM_F32(TO_F32(weight[j]) * TO_F32(FROM_F32(TO_F32(xi[j]) * inv))); \
        }                                                                                                \
    }
RMSNORM_KERNEL(rmsnorm_f32, float, identity_f32, identity_f32)
RMSNORM_KERNEL(rmsnorm_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* ---------------------------------------------------------------- decode attention
 * For M new tokens at positions start..start+M-1, from the fused qkv rows: rotate q and k
 * (rotate-half on the first rope_dim dims), scale v, store k/v in the cache, and attend.
 * Cache: keys [Hkv, capacity, D], values [Hkv, capacity, Dv]. Global layers (slot_pos NULL) store
 * position p in slot p; sliding layers store it in slot p % capacity, record it in slot_pos, and a
 * query at p sees stored positions p - window .. p. Sinks (per head, optional) join the softmax
 * denominator only. q/k/v are taken in float32; out is [M, H * Dv]. */
#define ATTENTION_KERNEL(NAME, T, TO_F32, FROM_F32)                                                     \
    void NAME(const T *qkv, int64_t qkv_stride, int m, int64_t start, const float *cos, const float *sin, \
              T *keys, T *values, int64_t *slot_pos, int64_t capacity, int64_t window, const float *sinks, \
              int heads, int kv_heads, int dim, int v_dim, int rope_dim, float scale, float value_scale,   \
              float *q_scratch, float *score_scratch, T *out) {                                          \
        int half = rope_dim / 2, group = heads / kv_heads;                                               \
        int64_t k_offset = (int64_t)heads * dim, v_offset = k_offset + (int64_t)kv_heads * dim;          \
        for (int i = 0; i < m; i++) {                                                                    \
            const T *row = qkv + i * qkv_stride;                                                         \
            const float *c = cos + i * rope_dim, *s = sin + i * rope_dim;                                \
            int64_t pos = start + i, slot = slot_pos ? pos % capacity : pos;                             \
            for (int h = 0; h < heads + kv_heads; h++) {                                                 \
                const T *src = row + (int64_t)h * dim;                                                   \
                float rotated[1024];                                                                     \
                for (int d = 0; d < dim; d++) rotated[d] = TO_F32(src[d]);                               \
                for (int d = 0; d < half; d++) {                                                         \
                    float a = rotated[d], b = rotated[d + half];                                         \
                    rotated[d] = a * c[d] - b * s[d];                                                    \
                    rotated[d + half] = b * c[d + half] + a * s[d + half];                               \
                }                                                                                        \
                if (h < heads) {                                                                         \
                    float *q = q_scratch + ((int64_t)i * heads + h) * dim;                               \
                    for (int d = 0; d < dim; d++) q[d] = TO_F32(FROM_F32(rotated[d]));                   \
                } else {                                                                                 \
                    T *k = keys + ((int64_t)(h - heads) * capacity + slot) * dim;                        \
                    for (int d = 0; d < dim; d++) k[d] = FROM_F32(rotated[d]);                           \
                }                                                                                        \
            }                                                                                            \
            for (int g = 0; g < kv_heads; g++) {                                                         \
                const T *src = row + v_offset + (int64_t)g * v_dim;                                      \
                T *v = values + ((int64_t)g * capacity + slot) * v_dim;                                  \
                for (int d = 0; d < v_dim; d++)                                                          \
                    v[d] = value_scale == 1.f ? src[d] : FROM_F32(TO_F32(src[d]) * value_scale);         \
            }                                                                                            \
            if (slot_pos) slot_pos[slot] = pos;                                                          \
        }                                                                                                \
        int64_t slots = slot_pos ? capacity : start + m;                                                 \
        _Pragma("omp parallel for schedule(static)")                                                     \
        for (int64_t task = 0; task < (int64_t)m * heads; task++) {                                      \
            int i = (int)(task / heads), h = (int)(task % heads), g = h / group;                         \
            int64_t pos = start + i;                                                                     \
            const float *q = q_scratch + task * dim;                                                     \
            float *score = score_scratch + task * slots;                                                 \
            float top = sinks ? sinks[h] : -INFINITY;                                                    \
            for (int64_t j = 0; j < slots; j++) {                                                        \
                int64_t key_pos = slot_pos ? slot_pos[j] : j;                                            \
                if (key_pos > pos || key_pos < 0 || (window >= 0 && key_pos < pos - window)) {           \
                    score[j] = -INFINITY;                                                                \
                    continue;                                                                            \
                }                                                                                        \
                const T *k = keys + ((int64_t)g * capacity + j) * dim;                                   \
                float dot = 0.f;                                                                         \
                for (int d = 0; d < dim; d++) dot += q[d] * TO_F32(k[d]);                                \
                score[j] = dot * scale;                                                                  \
                if (score[j] > top) top = score[j];                                                      \
            }                                                                                            \
            float total = sinks ? expf(sinks[h] - top) : 0.f;                                            \
            for (int64_t j = 0; j < slots; j++) {                                                        \
                score[j] = score[j] == -INFINITY ? 0.f : expf(score[j] - top);                           \
                total += score[j];                                                                       \
            }                                                                                            \
            float acc[1024];                                                                             \
            for (int d = 0; d < v_dim; d++) acc[d] = 0.f;                                                \
            for (int64_t j = 0; j < slots; j++) {                                                        \
                if (score[j] == 0.f) continue;                                                           \
                const T *v = values + ((int64_t)g * capacity + j) * v_dim;                               \
                float p = score[j] / total;                                                              \
                for (int d = 0; d < v_dim; d++) acc[d] += p * TO_F32(v[d]);                              \
            }                                                                                            \
            T *o = out + ((int64_t)i * heads + h) * v_dim;                                               \
            for (int d = 0; d < v_dim; d++) o[d] = FROM_F32(acc[d]);                                     \
        }                                                                                                \
    }
ATTENTION_KERNEL(attention_f32, float, identity_f32, identity_f32)
ATTENTION_KERNEL(attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

