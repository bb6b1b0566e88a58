"""C source of the quantized-weight kernels (``quant`` builds it appended to ``_cpu_kernels_src.SOURCE``,
so the quantized layer calls the same RoPE, attention and norm code as the float one).

Weights come in GGUF's two simple block formats, 32 weights a block along K, repacked per group of 16
output rows so that one 512-bit load holds 4 consecutive weights of each of the 16 rows (the operand
layout of the VNNI int8 dot product ``vpdpbusd``):

- q4_1 (kind 1): value = d * q + m, q in 0..15. Per (16-row group, K block): 4 x 64 bytes of nibbles,
  byte ``r * 4 + i`` of vector ``j`` = q[r][8j + i] | q[r][8j + 4 + i] << 4; then 16 fp16 d, 16 fp16 m
  (320 bytes: exactly GGUF's 20 bytes a block).
- q8_0 (kind 0): value = d * q, q in -127..127, stored as the unsigned byte q + 128 (``vpdpbusd`` takes
  unsigned x signed; the +128 is taken back with the activation block's sum). 8 x 64 bytes, byte
  ``r * 4 + i`` of vector ``j`` = q[r][4j + i] + 128; then 16 fp16 d (544 bytes, GGUF's 34 a block).

Activations are quantized per row to int8 blocks of 32 as llama.cpp quantizes them (d = max|x| / 127,
q = round-half-even(x / d) computed as x * (1 / d)), with each block's sum kept for the q4_1 offset and
the q8_0 +128. Each row's result is computed by the same sequence of operations whatever the number of
rows or threads (integer block sums are exact; blocks are accumulated in order), so a verify pass of
T tokens gives bit for bit what T decode steps give: speculation stays lossless against this target.

- ``aurora_qgemv_bf16`` / ``_f32``: y[M, N] = x[M, K] @ W.T, x and y in that dtype.
- ``aurora_qlayer_bf16`` / ``_f32``: ``aurora_layer`` with its four projections on quantized weights.
Bodies: AVX-512 VNNI; AVX2 (``maddubs`` / ``madd``, also used on AVX-512 without VNNI); plain C.
"""

QUANT_SOURCE = r"""
/* ==== quantized weights (appended to the float kernels' source) ==================================== */
#define QK 32
#define Q4_GROUP_BYTES 320
#define Q8_GROUP_BYTES 544

typedef struct { int8_t *q; float *d; float *ds; int32_t *s; } qact_t;

/* Row-wise int8 quantization of x [M, ldx] (first K columns) into blocks of 32. */
#define QUANT_ACT(NAME, T, TOF)                                                                       \
static void NAME(const T *x, int64_t M, int64_t K, int64_t ldx, qact_t a, int threads) {              \
    const int64_t nkb = K / QK;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(M * K >= 65536)")              \
    for (int64_t r = 0; r < M; r++)                                                                   \
        for (int64_t b = 0; b < nkb; b++) {                                                           \
            const T *xb = x + r * ldx + b * QK;                                                       \
            float v[QK], amax = 0.f;                                                                  \
            for (int i = 0; i < QK; i++) { v[i] = TOF(xb[i]); float av = v[i] < 0 ? -v[i] : v[i];     \
                                           amax = av > amax ? av : amax; }                            \
            const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;                              \
            int32_t s = 0;                                                                            \
            int8_t *q = a.q + r * K + b * QK;                                                         \
            for (int i = 0; i < QK; i++) { int qi = (int)__builtin_rintf(v[i] * id); q[i] = (int8_t)qi; s += qi; } \
            a.d[r * nkb + b] = d; a.s[r * nkb + b] = s; a.ds[r * nkb + b] = d * (float)s;             \
        }                                                                                             \
}
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same quantization 16 lanes at a time: NaN lanes count as 0 in the maximum (as the scalar "av >
   amax" skips them), x * (1 / d) rounded to float, then to the nearest integer, ties to even (rint);
   the same bits as the scalar form, which stays for AVX2 and plain C. */
INLINE __m512 qact_load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
INLINE __m512 qact_load_f32(const float *p) { return _mm512_loadu_ps(p); }
#define QUANT_ACT_AVX512(NAME, T, LOAD)                                                               \
static void NAME(const T *x, int64_t M, int64_t K, int64_t ldx, qact_t a, int threads) {              \
    const int64_t nkb = K / QK;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(M * K >= 65536)")              \
    for (int64_t r = 0; r < M; r++)                                                                   \
        for (int64_t b = 0; b < nkb; b++) {                                                           \
            const T *xb = x + r * ldx + b * QK;                                                       \
            const __m512 v0 = LOAD(xb), v1 = LOAD(xb + 16);                                           \
            __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);                                    \
            a0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a0, a0, _CMP_ORD_Q), a0);                     \
            a1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a1, a1, _CMP_ORD_Q), a1);                     \
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));                           \
            const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;                              \
            const __m512 vid = _mm512_set1_ps(id);                                                    \
            const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;                             \
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, vid), rn));  \
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, vid), rn));  \
            int8_t *q = a.q + r * K + b * QK;                                                         \
            _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));                                 \
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));                          \
            const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));                      \
            a.d[r * nkb + b] = d; a.s[r * nkb + b] = s; a.ds[r * nkb + b] = d * (float)s;             \
        }                                                                                             \
}
QUANT_ACT_AVX512(quant_act_bf16, uint16_t, qact_load_bf16)
QUANT_ACT_AVX512(quant_act_f32, float, qact_load_f32)
#else
QUANT_ACT(quant_act_bf16, uint16_t, bf16_to_f32)
QUANT_ACT(quant_act_f32, float, same_f32)
#endif

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { float f = (float)man * (1.0f / 16777216.0f); memcpy(&u, &f, 4); u |= sign; }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 112) << 23) | (man << 13);
    float f; memcpy(&f, &u, 4); return f;
}

/* One 16-row group for MB rows: out[i][0..15] (float) = sum over K blocks. */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define QBODY "avx512vnni"
INLINE void qgroup(const uint8_t *w, int kind, qact_t a, int64_t K, int64_t row0, const int MB, float out[][16]) {
    const int64_t nkb = K / QK;
    __m512 acc[8];
    for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t b = 0; b < nkb; b++) {
        __m512i sum[8];
        for (int i = 0; i < MB; i++) sum[i] = _mm512_setzero_si512();
        __m512 dw, mw = _mm512_setzero_ps();
        if (kind == 1) {
            const uint8_t *g = w + b * Q4_GROUP_BYTES;
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512(g + j * 64);
                const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                for (int i = 0; i < MB; i++) {
                    const int8_t *xq = a.q + (row0 + i) * K + b * QK + 8 * j;
                    int32_t x0, x1; memcpy(&x0, xq, 4); memcpy(&x1, xq + 4, 4);
                    sum[i] = _mm512_dpbusd_epi32(sum[i], lo, _mm512_set1_epi32(x0));
                    sum[i] = _mm512_dpbusd_epi32(sum[i], hi, _mm512_set1_epi32(x1));
                }
            }
            dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g + 256)));
            mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g + 288)));
        } else {
            const uint8_t *g = w + b * Q8_GROUP_BYTES;
            for (int j = 0; j < 8; j++) {
                const __m512i v = _mm512_loadu_si512(g + j * 64);
                for (int i = 0; i < MB; i++) {
                    int32_t x0; memcpy(&x0, a.q + (row0 + i) * K + b * QK + 4 * j, 4);
                    sum[i] = _mm512_dpbusd_epi32(sum[i], v, _mm512_set1_epi32(x0));
                }
            }
            dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g + 512)));
            for (int i = 0; i < MB; i++)  /* take back the +128 of the stored bytes */
                sum[i] = _mm512_sub_epi32(sum[i], _mm512_set1_epi32(128 * a.s[(row0 + i) * nkb + b]));
        }
        for (int i = 0; i < MB; i++) {
            const int64_t ab = (row0 + i) * nkb + b;
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i]), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[ab])), acc[i]);
            if (kind == 1) acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.ds[ab]), acc[i]);
        }
    }
    for (int i = 0; i < MB; i++) _mm512_storeu_ps(out[i], acc[i]);
}
#define QROWS 8
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QBODY "avx2"
/* u8 x s8 products summed by 4 into int32, as vpdpbusd without VNNI; exact while u * s pairs fit int16
   (q4: 15 * 127 * 2; q8 goes through the sign trick below, at most 128 * 127 * 2). */
INLINE __m256i dot4(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
INLINE void qgroup(const uint8_t *w, int kind, qact_t a, int64_t K, int64_t row0, const int MB, float out[][16]) {
    const int64_t nkb = K / QK;
    __m256 acc[8][2];
    for (int i = 0; i < MB; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nkb; b++) {
        const uint8_t *g = w + b * (kind == 1 ? Q4_GROUP_BYTES : Q8_GROUP_BYTES);
        for (int h = 0; h < 2; h++) {  /* rows 0-7, then 8-15 of the group */
            __m256i sum[8];
            for (int i = 0; i < MB; i++) sum[i] = _mm256_setzero_si256();
            __m256 dw, mw = _mm256_setzero_ps();
            if (kind == 1) {
                for (int j = 0; j < 4; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(g + j * 64 + h * 32));
                    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int i = 0; i < MB; i++) {
                        const int8_t *xq = a.q + (row0 + i) * K + b * QK + 8 * j;
                        int32_t x0, x1; memcpy(&x0, xq, 4); memcpy(&x1, xq + 4, 4);
                        sum[i] = _mm256_add_epi32(sum[i], dot4(lo, _mm256_set1_epi32(x0)));
                        sum[i] = _mm256_add_epi32(sum[i], dot4(hi, _mm256_set1_epi32(x1)));
                    }
                }
                dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 256 + h * 16)));
                mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 288 + h * 16)));
            } else {
                for (int j = 0; j < 8; j++) {
                    const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(g + j * 64 + h * 32)), flip);
                    const __m256i wabs = _mm256_abs_epi8(ws);
                    for (int i = 0; i < MB; i++) {
                        int32_t x0; memcpy(&x0, a.q + (row0 + i) * K + b * QK + 4 * j, 4);
                        sum[i] = _mm256_add_epi32(sum[i], dot4(wabs, _mm256_sign_epi8(_mm256_set1_epi32(x0), ws)));
                    }
                }
                dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 512 + h * 16)));
            }
            for (int i = 0; i < MB; i++) {
                const int64_t ab = (row0 + i) * nkb + b;
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), _mm256_mul_ps(dw, _mm256_set1_ps(a.d[ab])), acc[i][h]);
                if (kind == 1) acc[i][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.ds[ab]), acc[i][h]);
            }
        }
    }
    for (int i = 0; i < MB; i++) { _mm256_storeu_ps(out[i], acc[i][0]); _mm256_storeu_ps(out[i] + 8, acc[i][1]); }
}
#define QROWS 4
#else
#define QBODY "c"
INLINE void qgroup(const uint8_t *w, int kind, qact_t a, int64_t K, int64_t row0, const int MB, float out[][16]) {
    const int64_t nkb = K / QK;
    for (int i = 0; i < MB; i++) for (int n = 0; n < 16; n++) out[i][n] = 0.f;
    for (int64_t b = 0; b < nkb; b++) {
        const uint8_t *g = w + b * (kind == 1 ? Q4_GROUP_BYTES : Q8_GROUP_BYTES);
        const uint16_t *dh = (const uint16_t *)(g + (kind == 1 ? 256 : 512)), *mh = (const uint16_t *)(g + 288);
        for (int i = 0; i < MB; i++) {
            const int64_t ab = (row0 + i) * nkb + b;
            const int8_t *xq = a.q + (row0 + i) * K + b * QK;
            for (int n = 0; n < 16; n++) {
                int32_t s = 0;
                for (int k = 0; k < QK; k++) {
                    int q;
                    if (kind == 1) { const uint8_t byte = g[(k / 8) * 64 + n * 4 + (k % 4)]; q = (k % 8) < 4 ? byte & 15 : byte >> 4; }
                    else q = (int)g[(k / 4) * 64 + n * 4 + (k % 4)] - 128;
                    s += q * xq[k];
                }
                out[i][n] = __builtin_fmaf((float)s, f16_to_f32(dh[n]) * a.d[ab], out[i][n]);
                if (kind == 1) out[i][n] = __builtin_fmaf(f16_to_f32(mh[n]), a.ds[ab], out[i][n]);
            }
        }
    }
}
#define QROWS 4
#endif

const char *aurora_quant_body(void) { return QBODY; }

static inline void qstore_bf16(uint16_t *y, const float *v, int64_t n) { for (int64_t i = 0; i < n; i++) y[i] = f32_to_bf16(v[i]); }
static inline void qstore_f32(float *y, const float *v, int64_t n) { memcpy(y, v, (size_t)n * 4); }

#define QGEMV_KERNEL(SUFFIX, T)                                                                       \
void aurora_qgemv##SUFFIX(const uint8_t *w, int kind, const T *x, T *y, int64_t M, int64_t N, int64_t K, \
                          int64_t ldx, int64_t ldy, int threads) {                                    \
    const int64_t nkb = K / QK, ngrp = (N + 15) / 16;                                                 \
    const int64_t gbytes = nkb * (kind == 1 ? Q4_GROUP_BYTES : Q8_GROUP_BYTES);                       \
    char *mem = malloc((size_t)(M * K + M * nkb * 12 + 64));                                          \
    qact_t a = {(int8_t *)mem, (float *)(mem + M * K), (float *)(mem + M * K) + M * nkb,              \
                (int32_t *)((float *)(mem + M * K) + 2 * M * nkb)};                                   \
    quant_act##SUFFIX(x, M, K, ldx, a, threads);                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int64_t g = 0; g < ngrp; g++) {                                                              \
        const uint8_t *wg = w + g * gbytes;                                                           \
        const int64_t nv = (N - g * 16) < 16 ? (N - g * 16) : 16;                                     \
        float out[QROWS][16];                                                                         \
        int64_t m = 0;                                                                                \
        for (; m + QROWS <= M; m += QROWS) {                                                          \
            qgroup(wg, kind, a, K, m, QROWS, out);                                                    \
            for (int i = 0; i < QROWS; i++) qstore##SUFFIX(y + (m + i) * ldy + g * 16, out[i], nv);   \
        }                                                                                             \
        const int rest = (int)(M - m);                                                                \
        switch (rest) {  /* a constant row count for each tail, so the loops over rows unroll */       \
            case 1: qgroup(wg, kind, a, K, m, 1, out); break;                                         \
            case 2: qgroup(wg, kind, a, K, m, 2, out); break;                                         \
            case 3: qgroup(wg, kind, a, K, m, 3, out); break;                                         \
            case 4: qgroup(wg, kind, a, K, m, 4, out); break;                                         \
            case 5: qgroup(wg, kind, a, K, m, 5, out); break;                                         \
            case 6: qgroup(wg, kind, a, K, m, 6, out); break;                                         \
            case 7: qgroup(wg, kind, a, K, m, 7, out); break;                                         \
            default: break;                                                                           \
        }                                                                                             \
        for (int i = 0; i < rest; i++) qstore##SUFFIX(y + (m + i) * ldy + g * 16, out[i], nv);        \
    }                                                                                                 \
    free(mem);                                                                                        \
}
QGEMV_KERNEL(_bf16, uint16_t)
QGEMV_KERNEL(_f32, float)

/* aurora_layer with quantized projections: the same steps, rounding and scratch (``layer_workspace``). */
#define QLAYER_KERNEL(SUFFIX, T, ATTN)                                                                \
void aurora_qlayer##SUFFIX(const T *x, const T *pending, T *resid, T *mlp_out, const T *in_w,         \
                           const T *post_w, const uint8_t *w_qkv, const T *b_qkv, const uint8_t *w_o, \
                           const uint8_t *w_gu, const uint8_t *w_down, const int64_t *kinds,          \
                           const T *cos, const T *sin, const int64_t *pos, const int64_t *cidx,     \
                           const uint64_t *tmask, const int64_t *slots, T *kc, T *vc, T *work,         \
                           T *sum_out, int64_t s_slot, int64_t s_head, int64_t B, int64_t Tq,         \
                           int64_t nh, int64_t nkv, int64_t hd, int64_t H, int64_t I, int64_t kv_len, \
                           int64_t ld_sum, float eps, int threads) {                                  \
    LAYER_SCRATCH(T, H)                                                                               \
    LAYER_INPUT_SUM(SUFFIX, T)                                                                        \
    aurora_qgemv##SUFFIX(w_qkv, (int)kinds[0], h, qkv, M, W, H, H, W, threads);                       \
    if (b_qkv) for (int64_t r = 0; r < M; r++) add_bias##SUFFIX(qkv + r * W, b_qkv, W);                \
    aurora_rope_write##SUFFIX(qkv, cos, sin, pos, cidx, slots, q, kc, vc, s_slot, s_head, M, Tq, nh, nkv, \
                              hd, threads);                                                           \
    ATTN(q, Tq * A, A, hd, kc, vc, s_slot, s_head, slots, cidx ? cidx : pos, tmask, att, B, Tq, nh, nkv, \
         hd, kv_len,                                                                                  \
         (float)(1.0 / __builtin_sqrt((double)hd)), threads);                                         \
    aurora_qgemv##SUFFIX(w_o, (int)kinds[1], att, o, M, H, A, A, H, threads);                         \
    aurora_add_rmsnorm##SUFFIX(resid, o, resid, h, post_w, M, H, eps, threads);                       \
    aurora_qgemv##SUFFIX(w_gu, (int)kinds[2], h, gu, M, 2 * I, H, H, 2 * I, threads);                 \
    aurora_silu_mul##SUFFIX(gu, act, M, I, threads);                                                  \
    aurora_qgemv##SUFFIX(w_down, (int)kinds[3], act, mlp_out, M, H, I, I, H, threads);                \
}
QLAYER_KERNEL(_bf16, uint16_t, attn_any_bf16)
QLAYER_KERNEL(_f32, float, aurora_attn_f32)
"""
