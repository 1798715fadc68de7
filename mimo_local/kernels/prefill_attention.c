/* Causal attention of a prefill chunk on a global layer, bfloat16 (included by cpu_linear.c).
 *
 * T queries at positions before..before+T-1 attend to keys 0..their own position (grouped-query,
 * a sink per head in the softmax denominator), the way flash attention does it: key blocks of
 * KEY_BLOCK positions, an online softmax per query row, nothing of size T x S ever stored.
 * With AVX512-BF16 the two products run on vdpbf16ps, which multiplies bfloat16 pairs into float32:
 * the keys are repacked (PACK_KEYS at a time) so that a pair of head dimensions of 16 keys is one vector
 * (scores: 16 keys per instruction), and the values so that a pair of keys of 16 value dimensions is
 * one (outputs: 16 dimensions per instruction), the probabilities rounded to bfloat16 for it as torch's
 * flash kernel does. Other builds run the same math in plain C (the caller prefers torch there).
 */

#define KEY_BLOCK 64   /* keys per softmax update: 4 vectors of scores per query row */
#define QUERY_BLOCK 64 /* query rows per work item (a head's rows share each key block while in cache) */
#define ROW_GROUP 4    /* query rows per register tile */
#define PACK_KEYS 2048 /* keys repacked at a time (a multiple of KEY_BLOCK) */

/* 1 where this build has the vectorized kernel (the caller uses torch's otherwise). */
int attention_prefill_vectorized(void) {
#if defined(MIMO_AVX512BF16)
    return 1;
#else
    return 0;
#endif
}

#if defined(MIMO_AVX512BF16)
#define BF_VEC(p) ((__m512bh)_mm512_loadu_si512(p))
#define BF_PAIR(p) ((__m512bh)_mm512_set1_epi32(*(const int32_t *)(p)))

/* 2^x for x >= -150 (clamped below: underflows to 0), about 1e-7 relative error. */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n); /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* keys [S, dim] of one head -> [S/16 blocks][dim/2 pairs][16 keys][2]; positions >= keys are 0 */
static void pack_keys(const uint16_t *k, int64_t keys, int64_t padded, int dim, uint16_t *out) {
    int pairs = dim / 2;
    for (int64_t block = 0; block < padded / 16; block++) {
        uint32_t *dst = (uint32_t *)(out + block * 16 * dim);
        for (int lane = 0; lane < 16; lane++) {
            int64_t key = block * 16 + lane;
            const uint32_t *src = (const uint32_t *)(k + key * dim);
            for (int p = 0; p < pairs; p++) dst[p * 16 + lane] = key < keys ? src[p] : 0;
        }
    }
}

/* values [S, v_dim] of one head -> [S/2 key pairs][v_dim][2] */
static void pack_values(const uint16_t *v, int64_t keys, int64_t padded, int v_dim, uint16_t *out) {
    for (int64_t pair = 0; pair < padded / 2; pair++) {
        uint16_t *dst = out + pair * 2 * v_dim;
        for (int half = 0; half < 2; half++) {
            int64_t key = 2 * pair + half;
            const uint16_t *src = v + key * v_dim;
            for (int d = 0; d < v_dim; d++) dst[2 * d + half] = key < keys ? src[d] : 0;
        }
    }
}

/* One work item over one span of keys: query rows [first, first + rows) of one head take the keys
 * span_begin..span_end-1 (packed from span_begin) into their running softmax state: acc [rows][v_dim]
 * (unnormalized outputs), row_max and row_sum (log2 units). */
static void attend_span(const uint16_t *q, int64_t q_row_stride, const uint16_t *packed_k, const uint16_t *packed_v,
                        int64_t span_begin, int64_t span_end, int64_t first, int rows, int64_t before, int dim,
                        int v_dim, float scale_log2, float *acc, float *row_max, float *row_sum, uint16_t *probs) {
    const int pairs = dim / 2;
    int64_t key_end = before + first + rows; /* keys the block's last row sees, exclusive */
    key_end = key_end < span_end ? key_end : span_end;
    for (int64_t k0 = span_begin; k0 < key_end; k0 += KEY_BLOCK) {
        const uint16_t *kb = packed_k + (k0 - span_begin) * dim;
        const uint16_t *vb = packed_v + (k0 - span_begin) * v_dim;
        for (int g = 0; g < rows; g += ROW_GROUP) {
            const int64_t last_key[ROW_GROUP] = {before + first + g, before + first + g + 1, before + first + g + 2,
                                                 before + first + g + 3};
            if (k0 > last_key[0] + (rows - g > 3 ? 3 : rows - g - 1)) continue; /* no row of the group sees it */
            const uint16_t *qr[ROW_GROUP];
            for (int i = 0; i < ROW_GROUP; i++) qr[i] = q + (first + (g + i < rows ? g + i : rows - 1)) * q_row_stride;
            __m512 s[ROW_GROUP][4];
            for (int i = 0; i < ROW_GROUP; i++)
                for (int j = 0; j < 4; j++) s[i][j] = _mm512_setzero_ps();
            for (int p = 0; p < pairs; p++) {
                __m512bh kv0 = BF_VEC(kb + (0 * pairs + p) * 32), kv1 = BF_VEC(kb + (1 * pairs + p) * 32);
                __m512bh kv2 = BF_VEC(kb + (2 * pairs + p) * 32), kv3 = BF_VEC(kb + (3 * pairs + p) * 32);
                for (int i = 0; i < ROW_GROUP; i++) {
                    __m512bh qp = BF_PAIR(qr[i] + 2 * p);
                    s[i][0] = _mm512_dpbf16_ps(s[i][0], kv0, qp);
                    s[i][1] = _mm512_dpbf16_ps(s[i][1], kv1, qp);
                    s[i][2] = _mm512_dpbf16_ps(s[i][2], kv2, qp);
                    s[i][3] = _mm512_dpbf16_ps(s[i][3], kv3, qp);
                }
            }
            float alpha[ROW_GROUP];
            for (int i = 0; i < ROW_GROUP; i++) {
                int r = g + i;
                uint16_t *prow = probs + i * KEY_BLOCK;
                __mmask16 seen[4];
                for (int j = 0; j < 4; j++) {
                    int64_t visible = last_key[i] - (k0 + 16 * j) + 1; /* keys of this vector the row sees */
                    seen[j] = visible >= 16 ? 0xffff : visible <= 0 ? 0 : (__mmask16)((1u << visible) - 1);
                    s[i][j] = _mm512_mul_ps(s[i][j], _mm512_set1_ps(scale_log2));
                }
                if (r >= rows || !(seen[0] | seen[1] | seen[2] | seen[3])) {
                    alpha[i] = 1.f;
                    memset(prow, 0, KEY_BLOCK * sizeof(uint16_t));
                    continue;
                }
                __m512 peak = _mm512_set1_ps(-INFINITY);
                for (int j = 0; j < 4; j++) peak = _mm512_mask_max_ps(peak, seen[j], peak, s[i][j]);
                float block_max = _mm512_reduce_max_ps(peak);
                float new_max = block_max > row_max[r] ? block_max : row_max[r];
                alpha[i] = exp2f(row_max[r] - new_max); /* 0 at the first block (-inf) */
                row_max[r] = new_max;
                __m512 total = _mm512_setzero_ps(), p[4];
                for (int j = 0; j < 4; j++) {
                    p[j] = _mm512_maskz_mov_ps(seen[j], exp2_ps(_mm512_sub_ps(s[i][j], _mm512_set1_ps(new_max))));
                    total = _mm512_add_ps(total, p[j]);
                }
                row_sum[r] = row_sum[r] * alpha[i] + _mm512_reduce_add_ps(total);
                _mm512_storeu_si512(prow, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
                _mm512_storeu_si512(prow + 32, (__m512i)_mm512_cvtne2ps_pbh(p[3], p[2]));
            }
            /* acc[rows of the group] = acc * alpha + P . V, 64 value dimensions (4 vectors) at a time */
            for (int d0 = 0; d0 < v_dim; d0 += 64) {
                int vectors = (v_dim - d0) >= 64 ? 4 : (v_dim - d0) / 16;
                __m512 o[ROW_GROUP][4];
                for (int i = 0; i < ROW_GROUP; i++)
                    for (int j = 0; j < 4; j++)
                        o[i][j] = j < vectors && g + i < rows
                                      ? _mm512_mul_ps(_mm512_loadu_ps(acc + (g + i) * v_dim + d0 + 16 * j),
                                                      _mm512_set1_ps(alpha[i]))
                                      : _mm512_setzero_ps();
                if (vectors == 4) {
                    for (int kp = 0; kp < KEY_BLOCK / 2; kp++) {
                        const uint16_t *vp = vb + (int64_t)kp * 2 * v_dim + 2 * d0;
                        __m512bh v0 = BF_VEC(vp), v1 = BF_VEC(vp + 32), v2 = BF_VEC(vp + 64), v3 = BF_VEC(vp + 96);
                        for (int i = 0; i < ROW_GROUP; i++) {
                            __m512bh pp = BF_PAIR(probs + i * KEY_BLOCK + 2 * kp);
                            o[i][0] = _mm512_dpbf16_ps(o[i][0], v0, pp);
                            o[i][1] = _mm512_dpbf16_ps(o[i][1], v1, pp);
                            o[i][2] = _mm512_dpbf16_ps(o[i][2], v2, pp);
                            o[i][3] = _mm512_dpbf16_ps(o[i][3], v3, pp);
                        }
                    }
                } else {
                    for (int kp = 0; kp < KEY_BLOCK / 2; kp++) {
                        const uint16_t *vp = vb + (int64_t)kp * 2 * v_dim + 2 * d0;
                        for (int i = 0; i < ROW_GROUP; i++) {
                            __m512bh pp = BF_PAIR(probs + i * KEY_BLOCK + 2 * kp);
                            for (int j = 0; j < vectors; j++) o[i][j] = _mm512_dpbf16_ps(o[i][j], BF_VEC(vp + 32 * j), pp);
                        }
                    }
                }
                for (int i = 0; i < ROW_GROUP && g + i < rows; i++)
                    for (int j = 0; j < vectors; j++) _mm512_storeu_ps(acc + (g + i) * v_dim + d0 + 16 * j, o[i][j]);
            }
        }
    }
}
#endif

/* q: [heads][T][dim] with strides q_head_stride / q_row_stride; k: [kv_heads][S][dim] and
 * v: [kv_heads][S][v_dim] with head strides k_head_stride / v_head_stride (rows contiguous),
 * S = before + T; out: [T][heads][v_dim]; sinks: [heads] or NULL. dim even, v_dim a multiple of 16.
 * Returns 0, having done nothing, where its buffers cannot be allocated. */
int attention_prefill_bf16(const uint16_t *q, int64_t q_head_stride, int64_t q_row_stride, const uint16_t *k,
                            int64_t k_head_stride, const uint16_t *v, int64_t v_head_stride, const float *sinks,
                            uint16_t *out, int heads, int kv_heads, int steps, int64_t before, int dim, int v_dim,
                            float scale) {
    const float log2e = 1.4426950408889634f;
    const int64_t keys = before + steps;
    const int group = heads / kv_heads;
#if defined(MIMO_AVX512BF16)
    /* keys are repacked PACK_KEYS at a time (memory bounded whatever the context); each (head, query
     * block) keeps its softmax state across the spans */
    const int blocks = (steps + QUERY_BLOCK - 1) / QUERY_BLOCK;
    const int64_t states = (int64_t)heads * steps;
    float *acc = malloc(sizeof(float) * states * (v_dim + 2) + sizeof(uint16_t) * kv_heads * PACK_KEYS * (dim + v_dim));
    if (!acc) return 0;
    float *row_max = acc + states * v_dim, *row_sum = row_max + states;
    uint16_t *packed_k = (uint16_t *)(row_sum + states), *packed_v = packed_k + (int64_t)kv_heads * PACK_KEYS * dim;
    memset(acc, 0, sizeof(float) * states * v_dim);
    for (int64_t i = 0; i < states; i++) {
        row_max[i] = -INFINITY;
        row_sum[i] = 0.f;
    }
    for (int64_t span = 0; span < keys; span += PACK_KEYS) {
        const int64_t span_end = keys - span < PACK_KEYS ? keys : span + PACK_KEYS;
        const int chunks = (int)((span_end - span + KEY_BLOCK - 1) / KEY_BLOCK);
#pragma omp parallel for schedule(static)
        for (int item = 0; item < kv_heads * chunks; item++) {
            int h = item / chunks;
            int64_t lo = span + (int64_t)(item % chunks) * KEY_BLOCK;
            int64_t valid = span_end - lo < KEY_BLOCK ? span_end - lo : KEY_BLOCK;
            pack_keys(k + h * k_head_stride + lo * dim, valid, KEY_BLOCK, dim,
                      packed_k + ((int64_t)h * PACK_KEYS + lo - span) * dim);
            pack_values(v + h * v_head_stride + lo * v_dim, valid, KEY_BLOCK, v_dim,
                        packed_v + ((int64_t)h * PACK_KEYS + lo - span) * v_dim);
        }
#pragma omp parallel
        {
            uint16_t probs[ROW_GROUP * KEY_BLOCK] __attribute__((aligned(64)));
            /* the last query blocks see the most keys: handed out first */
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < heads * blocks; item++) {
                int block = blocks - 1 - item / heads, h = item % heads, kv = h / group;
                int64_t first = (int64_t)block * QUERY_BLOCK, state = (int64_t)h * steps + first;
                int rows = steps - first < QUERY_BLOCK ? (int)(steps - first) : QUERY_BLOCK;
                attend_span(q + h * q_head_stride, q_row_stride, packed_k + (int64_t)kv * PACK_KEYS * dim,
                            packed_v + (int64_t)kv * PACK_KEYS * v_dim, span, span_end, first, rows, before, dim, v_dim,
                            scale * log2e, acc + state * v_dim, row_max + state, row_sum + state, probs);
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < states; i++) {
        int64_t h = i / steps, t = i % steps;
        float denominator = row_sum[i] + (sinks ? exp2f(sinks[h] * log2e - row_max[i]) : 0.f);
        uint16_t *o = out + (t * heads + h) * v_dim;
        for (int d = 0; d < v_dim; d++) o[d] = f32_to_bf16(acc[i * v_dim + d] / denominator);
    }
    free(acc);
#else
    float *scratch = malloc(sizeof(float) * omp_get_max_threads() * (keys + v_dim));
    if (!scratch) return 0;
#pragma omp parallel
    {
        float *scores = scratch + (int64_t)omp_get_thread_num() * (keys + v_dim), *acc = scores + keys;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)heads * steps; item++) {
            int h = (int)(item % heads);
            int64_t t = item / heads, seen = before + t + 1;
            const uint16_t *qr = q + h * q_head_stride + t * q_row_stride;
            const uint16_t *kh = k + (h / group) * k_head_stride, *vh = v + (h / group) * v_head_stride;
            float peak = sinks ? sinks[h] : -INFINITY;
            for (int64_t s = 0; s < seen; s++) {
                float dot = 0.f;
                for (int d = 0; d < dim; d++) dot += bf16_to_f32(qr[d]) * bf16_to_f32(kh[s * dim + d]);
                scores[s] = dot * scale;
                peak = scores[s] > peak ? scores[s] : peak;
            }
            float total = sinks ? expf(sinks[h] - peak) : 0.f;
            for (int d = 0; d < v_dim; d++) acc[d] = 0.f;
            for (int64_t s = 0; s < seen; s++) {
                float p = expf(scores[s] - peak);
                total += p;
                for (int d = 0; d < v_dim; d++) acc[d] += p * bf16_to_f32(vh[s * v_dim + d]);
            }
            uint16_t *o = out + t * heads * v_dim + (int64_t)h * v_dim;
            for (int d = 0; d < v_dim; d++) o[d] = f32_to_bf16(acc[d] / total);
        }
    }
    free(scratch);
#endif
    return 1;
}
