"""C source of the native CPU kernels (``cpu_kernels`` builds and loads it); kept apart so that the
Python side stays readable. Portable C with GCC vector extensions, plus AVX512-BF16 dot products where
the compiler targets them (``-march=native``). Every exported function exists for bf16 (``_bf16``,
``uint16_t`` bit patterns) and float32 (``_f32``) and takes the OpenMP thread count last:

- ``aurora_gemv``: y = x @ W.T over a packed weight (``cpu_kernels.pack``), float32 accumulation.
- ``aurora_attn`` (+ ``aurora_attn_bf16_dp``): attention of a few queries per row over the slot cache.
- ``aurora_add_rmsnorm``, ``aurora_silu_mul``, ``aurora_rope_write``: the elementwise steps.
- ``aurora_layer``: one decoder layer made of the above; ``aurora_draft_layer``: the EAGLE3 draft's.
- ``aurora_argmax_lse``: the index of each row's largest value (torch.argmax's rule, ~30x faster on
  bf16) and/or log sum exp(scale * x) of each row (the served distribution's normaliser), in one call.
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
#define INLINE static inline __attribute__((always_inline))

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

INLINE void store_bf16(uint16_t *p, v16f v, int64_t n) {  /* round to nearest even, NaN stays NaN */
    v16u u = (v16u)v;
    v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    v16u nan = (v16u)(v != v);
    r = (r & ~nan) | (nan & 0x7fc0u);
    v16h h = __builtin_convertvector(r, v16h);
    memcpy(p, &h, (size_t)n * 2);
}

/* One block of 16 outputs for MB rows of x. w: [K/2][16][2] bf16, x: [MB, ldx] bf16, K even. */
INLINE void block_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t K, int64_t ldx,
                       int64_t ldy, int64_t nv, const int MB) {
    v16f acc[8], acc2[8];
    for (int i = 0; i < MB; i++) { acc[i] = (v16f){0}; acc2[i] = (v16f){0}; }
    const int64_t K2 = K / 2;
    for (int64_t k = 0; k < K2; k++) {
        v16u pair; memcpy(&pair, w + k * 32, 64);
#if defined(__AVX512BF16__)
        for (int i = 0; i < MB; i++) {
            uint32_t p; memcpy(&p, x + i * ldx + 2 * k, 4);
            /* one row alternates accumulators: a single dependency chain would cap the stream rate */
            if (MB == 1 && (k & 1))
                acc2[i] = (v16f)_mm512_dpbf16_ps((__m512)acc2[i], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)p));
            else
                acc[i] = (v16f)_mm512_dpbf16_ps((__m512)acc[i], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)p));
        }
#else
        v16f even = (v16f)(pair << 16), odd = (v16f)(pair & 0xffff0000u);
        for (int i = 0; i < MB; i++) {
            acc[i] += even * bf16_to_f32(x[i * ldx + 2 * k]);
            acc2[i] += odd * bf16_to_f32(x[i * ldx + 2 * k + 1]);
        }
#endif
    }
    for (int i = 0; i < MB; i++) store_bf16(y + i * ldy, acc[i] + acc2[i], nv);
}

/* One block of 16 outputs for MB rows of x. w: [K][16] float, x: [MB, ldx] float. */
INLINE void block_f32(const float *w, const float *x, float *y, int64_t K, int64_t ldx, int64_t ldy,
                      int64_t nv, const int MB) {
#if defined(__AVX512F__)
    v16f acc[8], acc2[8];
    for (int i = 0; i < MB; i++) { acc[i] = (v16f){0}; acc2[i] = (v16f){0}; }
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        v16f w0, w1; memcpy(&w0, w + k * 16, 64); memcpy(&w1, w + k * 16 + 16, 64);
        for (int i = 0; i < MB; i++) { acc[i] += w0 * x[i * ldx + k]; acc2[i] += w1 * x[i * ldx + k + 1]; }
    }
    if (k < K) {
        v16f w0; memcpy(&w0, w + k * 16, 64);
        for (int i = 0; i < MB; i++) acc[i] += w0 * x[i * ldx + k];
    }
    for (int i = 0; i < MB; i++) { v16f s = acc[i] + acc2[i]; memcpy(y + i * ldy, &s, (size_t)nv * 4); }
#elif defined(__AVX2__) && defined(__FMA__)
    /* 16 vector registers: one accumulator per row (two registers each), at most F32_ROWS rows per call.
       Two per row, as above, would spill past 2 rows and make the kernel compute bound. The accumulators
       are named locals, not an array: GCC keeps an array's registers but also stores them back to the
       stack on every k, and those stores (one per cycle) made a 5-row pass ~2.5x slower than its FMAs. */
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0,
           l4 = l0, h4 = l0, l5 = l0, h5 = l0;
#define F32_ROW(i)                                                                                    \
    if (MB > i) {                                                                                     \
        const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);                                       \
        l##i = _mm256_fmadd_ps(w0, xv, l##i);                                                         \
        h##i = _mm256_fmadd_ps(w1, xv, h##i);                                                         \
    }
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(w + k * 16), w1 = _mm256_loadu_ps(w + k * 16 + 8);
        F32_ROW(0) F32_ROW(1) F32_ROW(2) F32_ROW(3) F32_ROW(4) F32_ROW(5)
    }
#undef F32_ROW
    const __m256 lo[6] = {l0, l1, l2, l3, l4, l5}, hi[6] = {h0, h1, h2, h3, h4, h5};
    for (int i = 0; i < MB && i < 6; i++) {
        float out[16];
        _mm256_storeu_ps(out, lo[i]); _mm256_storeu_ps(out + 8, hi[i]);
        memcpy(y + i * ldy, out, (size_t)nv * 4);
    }
    for (int i = 6; i < MB; i++)  /* never taken: the dispatch passes at most F32_ROWS (6) rows here */
        for (int64_t n = 0; n < nv; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += w[k * 16 + n] * x[i * ldx + k];
            y[i * ldy + n] = acc;
        }
#else
    v16f acc[8];
    for (int i = 0; i < MB; i++) acc[i] = (v16f){0};
    for (int64_t k = 0; k < K; k++) {
        v16f w0; memcpy(&w0, w + k * 16, 64);
        for (int i = 0; i < MB; i++) acc[i] += w0 * x[i * ldx + k];
    }
    for (int i = 0; i < MB; i++) memcpy(y + i * ldy, &acc[i], (size_t)nv * 4);
#endif
}

#if defined(__AVX512F__) || !(defined(__AVX2__) && defined(__FMA__))
#define F32_ROWS 8
#else
#define F32_ROWS 6  /* rows per pass over a weight block (two ymm accumulators a row, 12 of 16 registers); the block (16 x K floats) stays
                      in cache between passes. 6 rows ran verify passes of 5-6 tokens ~10% faster than 4 */
#endif

#define DISPATCH(BLOCKFN, T, R)                                                                       \
    const int64_t nblk = (N + 15) / 16;                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (int64_t b = 0; b < nblk; b++) {                                                              \
        const T *wb = w + b * K * 16;                                                                 \
        const int64_t nv = (N - b * 16) < 16 ? (N - b * 16) : 16;                                     \
        int64_t m = 0;                                                                                \
        for (; m + R <= M; m += R) BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, R); \
        switch (M - m) {                                                                              \
            case 1: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 1); break;          \
            case 2: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 2); break;          \
            case 3: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 3); break;          \
            case 4: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 4); break;          \
            case 5: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 5); break;          \
            case 6: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 6); break;          \
            case 7: BLOCKFN(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv, 7); break;          \
            default: break;                                                                           \
        }                                                                                             \
    }

#if defined(__AVX512BF16__)
/* Two adjacent blocks (32 outputs) for MB rows: each broadcast of x feeds two dot products, which
   matters once several rows make the kernel compute bound (measured: 8 rows 25% faster). */
INLINE void block2_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t K, int64_t ldx,
                        int64_t ldy, int64_t nv0, int64_t nv1, const int MB) {
    __m512 a0[8], a1[8];
    for (int i = 0; i < MB; i++) { a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps(); }
    const uint16_t *w1 = w + K * 16;
    for (int64_t k = 0; k < K / 2; k++) {
        const __m512bh p0 = (__m512bh)_mm512_loadu_si512(w + k * 32), p1 = (__m512bh)_mm512_loadu_si512(w1 + k * 32);
        for (int i = 0; i < MB; i++) {
            uint32_t p; memcpy(&p, x + i * ldx + 2 * k, 4);
            const __m512bh bx = (__m512bh)_mm512_set1_epi32((int)p);
            a0[i] = _mm512_dpbf16_ps(a0[i], p0, bx);
            a1[i] = _mm512_dpbf16_ps(a1[i], p1, bx);
        }
    }
    for (int i = 0; i < MB; i++) {
        store_bf16(y + i * ldy, (v16f)a0[i], nv0);
        store_bf16(y + i * ldy + 16, (v16f)a1[i], nv1);
    }
}
#define PAIR_ROWS(MB) block2_bf16(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv0, nv1, MB)
#endif

/* y[M, ldy] = x[M, ldx] @ W.T; w packed [ceil(N/16)][K/2][16][2] bf16 (K even). */
void aurora_gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K,
                      int64_t ldx, int64_t ldy, int threads) {
#if defined(__AVX512BF16__)
    if (M >= 4) {
        const int64_t nblk = (N + 15) / 16;
        _Pragma("omp parallel for schedule(static) num_threads(threads)")
        for (int64_t bp = 0; bp < (nblk + 1) / 2; bp++) {
            const int64_t b = 2 * bp;
            const uint16_t *wb = w + b * K * 16;
            const int64_t nv0 = (N - b * 16) < 16 ? (N - b * 16) : 16;
            if (b + 1 == nblk) {  /* odd block count: the last block alone */
                for (int64_t m = 0; m < M; m++) block_bf16(wb, x + m * ldx, y + m * ldy + b * 16, K, ldx, ldy, nv0, 1);
                continue;
            }
            const int64_t nv1 = (N - b * 16 - 16) < 16 ? (N - b * 16 - 16) : 16;
            int64_t m = 0;
            for (; m + 8 <= M; m += 8) PAIR_ROWS(8);
            switch (M - m) {
                case 1: PAIR_ROWS(1); break;
                case 2: PAIR_ROWS(2); break;
                case 3: PAIR_ROWS(3); break;
                case 4: PAIR_ROWS(4); break;
                case 5: PAIR_ROWS(5); break;
                case 6: PAIR_ROWS(6); break;
                case 7: PAIR_ROWS(7); break;
                default: break;
            }
        }
        return;
    }
#endif
    DISPATCH(block_bf16, uint16_t, 8)
}

/* y[M, ldy] = x[M, ldx] @ W.T; w packed [ceil(N/16)][K][16] float. */
void aurora_gemv_f32(const float *w, const float *x, float *y, int64_t M, int64_t N, int64_t K,
                     int64_t ldx, int64_t ldy, int threads) { DISPATCH(block_f32, float, F32_ROWS) }

/* ---- attention for a few new tokens per row, straight from the slot KV cache ---------------------- */

INLINE v16f load16_bf16(const uint16_t *p) {
    v16h h; memcpy(&h, p, 32);
    return (v16f)(__builtin_convertvector(h, v16u) << 16);
}
INLINE v16f load16_f32(const float *p) { v16f v; memcpy(&v, p, 64); return v; }
INLINE void store16_f32(float *p, v16f v, int64_t n) { memcpy(p, &v, (size_t)n * 4); }

INLINE float hsum(v16f v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

INLINE v16f vselect(v16u m, v16f a, v16f b) { return (v16f)(((v16u)a & m) | ((v16u)b & ~m)); }

/* Tree attention: a query whose cache index is n - 1 carries a mask tm over the 64 keys n-64..n-1 (bit
   i = key n-1-i visible); keys before those are always visible. ~0 (no mask given) is plain causal. */
#define NO_TREE (~(uint64_t)0)
#define TREE_HIDDEN(tm, n, j) ((tm) != NO_TREE && (j) < (n) && (j) + 64 >= (n) && !(((tm) >> ((n) - 1 - (j))) & 1u))

/* exp for x <= 0 (Cephes polynomial, relative error ~1e-7); inputs below -87 give ~1e-38. */
INLINE v16f vexp(v16f x) {
    const v16f lo = (v16f){0} - 87.3f;
    x = vselect((v16u)(x < lo), lo, x);
    v16f n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round to nearest */
    v16f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16f p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    v16u scale = (v16u)((__builtin_convertvector(n, v16i) + 127) << 23);
    return p * (v16f)scale;
}

/* One query head: softmax(q k^T * scale) v over keys 0..n-1 of one KV head. hd % 16 == 0, hd <= 256. */
#define ATTN_QUERY(T, LOAD)                                                                           \
    v16f qv[16], acc[16];                                                                             \
    const int64_t nv = hd / 16;                                                                       \
    for (int64_t d = 0; d < nv; d++) { qv[d] = LOAD(qp + d * 16) * scale; acc[d] = (v16f){0}; }      \
    float mx = -3.0e38f;                                                                              \
    for (int64_t j = 0; j < n; j++) {                                                                 \
        const T *kr = kp + j * hd;                                                                    \
        v16f a = qv[0] * LOAD(kr);                                                                    \
        for (int64_t d = 1; d < nv; d++) a += qv[d] * LOAD(kr + d * 16);                               \
        float s = TREE_HIDDEN(tm, n, j) ? -1.0e30f : hsum(a);                                         \
        buf[j] = s; mx = s > mx ? s : mx;                                                             \
    }                                                                                                 \
    const int64_t npad = (n + 15) & ~(int64_t)15;                                                     \
    for (int64_t j = n; j < npad; j++) buf[j] = mx - 1000.f;                                          \
    v16f total = (v16f){0};                                                                           \
    for (int64_t j = 0; j < npad; j += 16) {                                                          \
        v16f e = vexp(load16_f32(buf + j) - mx);                                                      \
        if (j + 16 > n) for (int64_t i = n - j; i < 16; i++) e[i] = 0.f;                              \
        if (tm != NO_TREE) for (int i = 0; i < 16; i++) if (TREE_HIDDEN(tm, n, j + i)) e[i] = 0.f;     \
        store16_f32(buf + j, e, 16); total += e;                                                      \
    }                                                                                                 \
    for (int64_t j = 0; j < n; j++) {                                                                 \
        const T *vr = vp + j * hd; const float pj = buf[j];                                           \
        for (int64_t d = 0; d < nv; d++) acc[d] += LOAD(vr + d * 16) * pj;                              \
    }                                                                                                 \
    const float inv = 1.f / hsum(total);

#define ATTN_KERNEL(NAME, T, LOAD, STORE)                                                             \
void NAME(const T *q, int64_t sqb, int64_t sqt, int64_t sqh, const T *kc, const T *vc, int64_t s_slot, \
          int64_t s_head, const int64_t *slots, const int64_t *pos, const uint64_t *tmask, T *out,      \
          int64_t B, int64_t Tq, int64_t nh, int64_t nkv, int64_t hd, int64_t max_keys, float scale,   \
          int threads) {                                                                              \
    const int64_t g = nh / nkv;                                                                       \
    _Pragma("omp parallel num_threads(threads)")                                                      \
    {                                                                                                 \
        float *buf = (float *)malloc((size_t)(max_keys + 16) * sizeof(float));                        \
        _Pragma("omp for schedule(static)")                                                           \
        for (int64_t task = 0; task < B * Tq * nh; task++) {                                          \
            const int64_t h = task % nh, t = (task / nh) % Tq, b = task / (nh * Tq);                  \
            const int64_t n = pos[b * Tq + t] + 1;                                                    \
            const uint64_t tm = tmask ? tmask[b * Tq + t] : NO_TREE;                                  \
            const T *qp = q + b * sqb + t * sqt + h * sqh;                                            \
            const T *kp = kc + slots[b] * s_slot + (h / g) * s_head;                                  \
            const T *vp = vc + slots[b] * s_slot + (h / g) * s_head;                                  \
            ATTN_QUERY(T, LOAD)                                                                       \
            T *op = out + ((b * Tq + t) * nh + h) * hd;                                               \
            for (int64_t d = 0; d < nv; d++) STORE(op + d * 16, acc[d] * inv, 16);                    \
        }                                                                                             \
        free(buf);                                                                                    \
    }                                                                                                 \
}

/* out [B, T, nh, hd] = attention of q [B, T, nh, hd] (strides sqb, sqt, sqh) over the cache rows
   slots[b] (k/v caches [slots, nkv, max_len, hd]), query (b, t) seeing keys 0..pos[b, t] (pos: the
   query's own cache index), less those its tree mask tmask[b, t] hides (tmask may be NULL). */
ATTN_KERNEL(aurora_attn_bf16, uint16_t, load16_bf16, store_bf16)

typedef float v8f __attribute__((vector_size(32)));
INLINE v8f load8_f32(const float *p) { v8f v; memcpy(&v, p, 32); return v; }

/* Lane k = the sum of a[k]'s lanes, for 8 vectors: a tree of horizontal adds instead of 8 scalar sums. */
INLINE v8f reduce8(const v8f *a) {
#if defined(__AVX__)
    const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
    const __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
    v8f r;
    for (int k = 0; k < 8; k++) { float s = 0.f; for (int l = 0; l < 8; l++) s += a[k][l]; r[k] = s; }
    return r;
#endif
}

/* QC (at most 4) float32 queries that share one KV head, in one pass over its keys and values: a block of 8
   keys is scored for every query while it is in L1, and each value row is read once for all of them.
   Query i sees keys 0..n[i]-1. hd % 16 == 0. */
INLINE void attn_chunk_f32(const float **qp, const int64_t *n, const uint64_t *tm, float **op, const float *kp,
                           const float *vp, int64_t hd, float scale, float *buf, int64_t stride, const int QC) {
    const int64_t nc = hd / 8, nv = hd / 16;
    int64_t nmax = 0;
    for (int i = 0; i < QC; i++) nmax = n[i] > nmax ? n[i] : nmax;
    const int64_t npad = (nmax + 15) & ~(int64_t)15;
    for (int64_t j0 = 0; j0 < npad; j0 += 8) {
        const int keys = nmax - j0 < 8 ? (int)(nmax - j0) : 8;  /* never read past the row's written keys */
        for (int i = 0; i < QC; i++) {
            v8f a[8] = {{0}};
            for (int64_t c0 = 0; c0 < nc; c0 += 4) {  /* 32 dims at a time: the query's slice stays in registers */
                const int cn = nc - c0 < 4 ? (int)(nc - c0) : 4;
                v8f qv[4];
                for (int c = 0; c < cn; c++) qv[c] = load8_f32(qp[i] + (c0 + c) * 8);
                if (keys == 8 && cn == 4) {
                    for (int jj = 0; jj < 8; jj++)
                        for (int c = 0; c < 4; c++) a[jj] += qv[c] * load8_f32(kp + (j0 + jj) * hd + (c0 + c) * 8);
                } else {
                    for (int jj = 0; jj < keys; jj++)
                        for (int c = 0; c < cn; c++) a[jj] += qv[c] * load8_f32(kp + (j0 + jj) * hd + (c0 + c) * 8);
                }
            }
            v8f sc = reduce8(a) * scale;
            const int64_t valid = n[i] - j0;  /* causal: keys past this query's position are masked */
            if (valid < 8) for (int jj = valid < 0 ? 0 : (int)valid; jj < 8; jj++) sc[jj] = -1.0e30f;
            if (tm[i] != NO_TREE) for (int jj = 0; jj < 8; jj++) if (TREE_HIDDEN(tm[i], n[i], j0 + jj)) sc[jj] = -1.0e30f;
            memcpy(buf + i * stride + j0, &sc, 32);
        }
    }
    for (int i = 0; i < QC; i++) {
        float *bi = buf + i * stride;
        v16f mv = load16_f32(bi);
        for (int64_t j0 = 16; j0 < npad; j0 += 16) { v16f b = load16_f32(bi + j0); mv = vselect((v16u)(b > mv), b, mv); }
        float mx = mv[0];
        for (int l = 1; l < 16; l++) mx = mv[l] > mx ? mv[l] : mx;
        v16f total = (v16f){0};
        for (int64_t j0 = 0; j0 < npad; j0 += 16) {
            v16f e = vexp(load16_f32(bi + j0) - mx);
            if (j0 + 16 > n[i]) for (int l = 0; l < 16; l++) if (j0 + l >= n[i]) e[l] = 0.f;
            if (tm[i] != NO_TREE) for (int l = 0; l < 16; l++) if (TREE_HIDDEN(tm[i], n[i], j0 + l)) e[l] = 0.f;
            store16_f32(bi + j0, e, 16);
            total += e;
        }
        bi[npad] = 1.f / hsum(total);  /* the normaliser rides after the probabilities */
    }
    for (int i = 0; i < QC; i++) {
        const float *p = buf + i * stride;
        for (int64_t c0 = 0; c0 < nc; c0 += 8) {  /* 64 dims at a time in registers */
            const int cn = nc - c0 < 8 ? (int)(nc - c0) : 8;
            v8f acc[8] = {{0}};
            if (cn == 8) {
                for (int64_t j = 0; j < n[i]; j++)
                    for (int c = 0; c < 8; c++) acc[c] += load8_f32(vp + j * hd + (c0 + c) * 8) * p[j];
            } else {
                for (int64_t j = 0; j < n[i]; j++)
                    for (int c = 0; c < cn; c++) acc[c] += load8_f32(vp + j * hd + (c0 + c) * 8) * p[j];
            }
            for (int c = 0; c < cn; c++) { v8f o = acc[c] * p[npad]; memcpy(op[i] + (c0 + c) * 8, &o, 32); }
        }
    }
}

/* The body of a chunked attention driver: tasks of up to 4 queries that share one KV head (CHUNKFN
   takes them in one pass over its keys and values), as many per row as its tokens times the group. */
#define ATTN_CHUNKED(T, CHUNKFN)                                                                      \
    const int64_t g = nh / nkv, per_head = g * Tq;                                                    \
    /* Up to 4 queries share each pass over a KV head; fewer when that leaves threads idle. */       \
    int qc = 4;                                                                                       \
    while (qc > 1 && B * nkv * ((per_head + qc - 1) / qc) < 2 * threads) qc /= 2;                     \
    const int64_t chunks = (per_head + qc - 1) / qc, stride = max_keys + 32;                          \
    _Pragma("omp parallel num_threads(threads)")                                                      \
    {                                                                                                 \
        float *buf = (float *)malloc((size_t)(4 * stride) * sizeof(float));                           \
        _Pragma("omp for schedule(static)")                                                           \
        for (int64_t task = 0; task < B * nkv * chunks; task++) {                                     \
            const int64_t c = task % chunks, kvh = (task / chunks) % nkv, b = task / (chunks * nkv);  \
            const T *qp[4]; T *op[4]; int64_t n[4]; uint64_t tm[4];                                   \
            const int64_t first = c * qc, count = (per_head - first) < qc ? (per_head - first) : qc;  \
            for (int64_t i = 0; i < count; i++) {                                                     \
                const int64_t t = (first + i) / g, h = kvh * g + (first + i) % g;                     \
                qp[i] = q + b * sqb + t * sqt + h * sqh;                                              \
                op[i] = out + ((b * Tq + t) * nh + h) * hd;                                           \
                n[i] = pos[b * Tq + t] + 1;                                                           \
                tm[i] = tmask ? tmask[b * Tq + t] : NO_TREE;                                          \
            }                                                                                         \
            const T *kp = kc + slots[b] * s_slot + kvh * s_head, *vp = vc + slots[b] * s_slot + kvh * s_head; \
            switch (count) {                                                                          \
                case 1: CHUNKFN(qp, n, tm, op, kp, vp, hd, scale, buf, stride, 1); break;                 \
                case 2: CHUNKFN(qp, n, tm, op, kp, vp, hd, scale, buf, stride, 2); break;                 \
                case 3: CHUNKFN(qp, n, tm, op, kp, vp, hd, scale, buf, stride, 3); break;                 \
                default: CHUNKFN(qp, n, tm, op, kp, vp, hd, scale, buf, stride, 4); break;                \
            }                                                                                         \
        }                                                                                             \
        free(buf);                                                                                    \
    }

/* As aurora_attn_bf16 (same arguments) for float32, with the queries of one KV head taken together. */
void aurora_attn_f32(const float *q, int64_t sqb, int64_t sqt, int64_t sqh, const float *kc, const float *vc,
                     int64_t s_slot, int64_t s_head, const int64_t *slots, const int64_t *pos,
                     const uint64_t *tmask, float *out,
                     int64_t B, int64_t Tq, int64_t nh, int64_t nkv, int64_t hd, int64_t max_keys, float scale,
                     int threads) {
    ATTN_CHUNKED(float, attn_chunk_f32)
}

#if defined(__AVX512BF16__)
/* Sums of 16 vectors in one vector (lane k = sum of a[k]): a transpose-and-add tree, ~3 ops per key. */
INLINE __m512 reduce16(__m512 *a) {
    __m512 s[8], t[4], u[2];
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[i], s[i + 4], 0x88), _mm512_shuffle_f32x4(s[i], s[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[i], t[i + 2], 0x44), _mm512_shuffle_ps(t[i], t[i + 2], 0xEE));
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(order, r);
}

/* QC queries sharing one KV head. Scores with bf16 dot products (exact products, fp32 sums), softmax
   and the weighted sum of values in fp32. hd % 32 == 0, hd <= 256. HD is hd as a compile-time constant
   where the caller can give one (64, 128: the loops unroll and the accumulators stay in registers), else
   0. Each query's result takes the same operations in the same order whatever QC, HD or the other
   queries (a verify pass gives what one-token steps give). A tree mask only hides keys among a query's
   last 64, so only blocks reaching into that window are checked. */
INLINE void attn_chunk_dp_hd(const uint16_t **qp, const int64_t *n, const uint64_t *tm, uint16_t **op,
                             const uint16_t *kp, const uint16_t *vp, int64_t hd_rt, float scale, float *buf,
                             int64_t stride, const int QC, const int HD) {
    const int64_t hd = HD ? HD : hd_rt, nc = hd / 32, nv = hd / 16;
    int64_t nmax = 0;
    for (int i = 0; i < QC; i++) nmax = n[i] > nmax ? n[i] : nmax;
    const int64_t npad = (nmax + 15) & ~(int64_t)15;
    const int64_t full = nmax & ~(int64_t)15;  /* blocks of 16 keys that are all written */
    for (int i = 0; i < QC; i++) {
        __m512bh qv[8];
        for (int64_t c = 0; c < nc; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qp[i] + c * 32);
        float *bi = buf + i * stride;
        const int64_t window = n[i] - 64;  /* keys before this one are never hidden by the tree */
        for (int64_t j0 = 0; j0 < npad; j0 += 16) {
            __m512 a[16];
            if (j0 < full) {
                for (int jj = 0; jj < 16; jj++) {
                    const uint16_t *kr = kp + (j0 + jj) * hd;
                    a[jj] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(kr), qv[0]);
                    for (int64_t c = 1; c < nc; c++)
                        a[jj] = _mm512_dpbf16_ps(a[jj], (__m512bh)_mm512_loadu_si512(kr + c * 32), qv[c]);
                }
            } else {
                for (int jj = 0; jj < 16; jj++) {
                    a[jj] = _mm512_setzero_ps();
                    if (j0 + jj < nmax) {  /* never read past the row's written keys */
                        const uint16_t *kr = kp + (j0 + jj) * hd;
                        for (int64_t c = 0; c < nc; c++)
                            a[jj] = _mm512_dpbf16_ps(a[jj], (__m512bh)_mm512_loadu_si512(kr + c * 32), qv[c]);
                    }
                }
            }
            __m512 sc = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
            const int64_t valid = n[i] - j0;  /* causal: keys past this query's position are masked */
            if (valid < 16) {
                __mmask16 keep = valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1);
                sc = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-1.0e30f), sc);
            }
            if (tm[i] != NO_TREE && j0 + 16 > window) {
                __mmask16 hide = 0;
                for (int jj = 0; jj < 16; jj++) if (TREE_HIDDEN(tm[i], n[i], j0 + jj)) hide |= (__mmask16)(1u << jj);
                sc = _mm512_mask_blend_ps(hide, sc, _mm512_set1_ps(-1.0e30f));
            }
            _mm512_storeu_ps(bi + j0, sc);
        }
        __m512 mx = _mm512_set1_ps(-1.0e30f);
        for (int64_t j0 = 0; j0 < npad; j0 += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(bi + j0));
        const float m = _mm512_reduce_max_ps(mx);
        v16f total = (v16f){0};
        for (int64_t j0 = 0; j0 < npad; j0 += 16) {
            v16f e = vexp((v16f)_mm512_loadu_ps(bi + j0) - m);
            const int64_t valid = n[i] - j0;
            if (valid < 16) e = (v16f)_mm512_maskz_mov_ps(valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1), (__m512)e);
            if (tm[i] != NO_TREE && j0 + 16 > window)
                for (int l = 0; l < 16; l++) if (TREE_HIDDEN(tm[i], n[i], j0 + l)) e[l] = 0.f;
            _mm512_storeu_ps(bi + j0, (__m512)e);
            total += e;
        }
        bi[npad] = 1.f / hsum(total);  /* the normaliser rides after the probabilities */
    }
    /* Values 64 dims at a time: QC x 4 accumulators in registers, each value row read once for all queries. */
    for (int64_t d0 = 0; d0 < nv; d0 += 4) {
        const int dn = nv - d0 < 4 ? (int)(nv - d0) : 4;
        v16f acc[4][4];
        for (int i = 0; i < QC; i++) for (int d = 0; d < 4; d++) acc[i][d] = (v16f){0};
        if (dn == 4) {
            for (int64_t j = 0; j < nmax; j++) {
                const uint16_t *vr = vp + j * hd + d0 * 16;
                const v16f v0 = load16_bf16(vr), v1 = load16_bf16(vr + 16), v2 = load16_bf16(vr + 32),
                           v3 = load16_bf16(vr + 48);
                for (int i = 0; i < QC; i++) {
                    const float p = buf[i * stride + j];
                    acc[i][0] += v0 * p; acc[i][1] += v1 * p; acc[i][2] += v2 * p; acc[i][3] += v3 * p;
                }
            }
        } else {
            for (int64_t j = 0; j < nmax; j++)
                for (int d = 0; d < dn; d++) {
                    const v16f v = load16_bf16(vp + j * hd + (d0 + d) * 16);
                    for (int i = 0; i < QC; i++) acc[i][d] += v * buf[i * stride + j];
                }
        }
        for (int i = 0; i < QC; i++)
            for (int d = 0; d < dn; d++)
                store_bf16(op[i] + (d0 + d) * 16, acc[i][d] * buf[i * stride + npad], 16);
    }
}

INLINE void attn_chunk_dp(const uint16_t **qp, const int64_t *n, const uint64_t *tm, uint16_t **op, const uint16_t *kp,
                          const uint16_t *vp, int64_t hd, float scale, float *buf, int64_t stride, const int QC) {
    if (hd == 64) attn_chunk_dp_hd(qp, n, tm, op, kp, vp, hd, scale, buf, stride, QC, 64);
    else if (hd == 128) attn_chunk_dp_hd(qp, n, tm, op, kp, vp, hd, scale, buf, stride, QC, 128);
    else attn_chunk_dp_hd(qp, n, tm, op, kp, vp, hd, scale, buf, stride, QC, 0);
}
#endif

/* As aurora_attn_bf16 (same arguments) with AVX512-BF16 dot products; hd % 32 == 0. Returns 0 when
   built without AVX512-BF16 (then nothing is computed). */
int aurora_attn_bf16_dp(const uint16_t *q, int64_t sqb, int64_t sqt, int64_t sqh, const uint16_t *kc,
                        const uint16_t *vc, int64_t s_slot, int64_t s_head, const int64_t *slots,
                        const int64_t *pos, const uint64_t *tmask, uint16_t *out, int64_t B, int64_t Tq,
                        int64_t nh, int64_t nkv, int64_t hd, int64_t max_keys, float scale, int threads) {
#if defined(__AVX512BF16__)
    ATTN_CHUNKED(uint16_t, attn_chunk_dp)
    return 1;
#else
    return 0;
#endif
}


/* ---- elementwise pieces of a decoder layer, rounding where transformers rounds ------------------- */

INLINE v16f round_bf16(v16f v) {  /* the float value of v rounded to bf16 (NaN kept) */
    v16u u = (v16u)v;
    v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    v16u nan = (v16u)(v != v);
    return (v16f)((r & ~nan) | (u & nan));
}
INLINE v16f keep_f32(v16f v) { return v; }

/* resid = x + a (when a is given), out = w * rmsnorm(resid): normalised in fp32, rounded to the dtype,
   then scaled by the weight (transformers' LlamaRMSNorm). dim % 16 == 0. */
#define NORM_KERNEL(NAME, T, LOAD, STORE, ROUND)                                                      \
void NAME(const T *x, const T *a, T *resid, T *out, const T *w, int64_t rows, int64_t dim, float eps,  \
          int threads) {                                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows * dim >= 65536)")         \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *xr = x + r * dim;                                                                    \
        v16f sq = (v16f){0};                                                                          \
        for (int64_t d = 0; d < dim; d += 16) {                                                       \
            v16f v = LOAD(xr + d);                                                                    \
            if (a) { v = ROUND(v + LOAD(a + r * dim + d)); STORE(resid + r * dim + d, v, 16); }       \
            sq += v * v;                                                                              \
        }                                                                                             \
        float ss = 0.f;                                                                               \
        for (int i = 0; i < 16; i++) ss += sq[i];                                                     \
        const float inv = 1.f / __builtin_sqrtf(ss / (float)dim + eps);                               \
        const T *src = a ? resid + r * dim : xr;                                                      \
        for (int64_t d = 0; d < dim; d += 16)                                                         \
            STORE(out + r * dim + d, LOAD(w + d) * ROUND(LOAD(src + d) * inv), 16);                   \
    }                                                                                                 \
}
NORM_KERNEL(aurora_add_rmsnorm_bf16, uint16_t, load16_bf16, store_bf16, round_bf16)
NORM_KERNEL(aurora_add_rmsnorm_f32, float, load16_f32, store16_f32, keep_f32)

/* out = silu(gate) * up for x = [gate | up] rows of 2 * inter; silu rounded before the product. */
#define SILU_KERNEL(NAME, T, LOAD, STORE, ROUND)                                                      \
void NAME(const T *x, T *out, int64_t rows, int64_t inter, int threads) {                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows * inter >= 65536)")       \
    for (int64_t r = 0; r < rows; r++)                                                                \
        for (int64_t d = 0; d < inter; d += 16) {                                                     \
            v16f g = LOAD(x + r * 2 * inter + d), u = LOAD(x + r * 2 * inter + inter + d);            \
            v16f ng = (v16f){0} - g;                                                                  \
            const v16f hi = (v16f){0} + 88.f;                                                         \
            ng = vselect((v16u)(ng > hi), hi, ng);                                                    \
            STORE(out + r * inter + d, ROUND(g / (1.f + vexp(ng))) * u, 16);                          \
        }                                                                                             \
}
SILU_KERNEL(aurora_silu_mul_bf16, uint16_t, load16_bf16, store_bf16, round_bf16)
SILU_KERNEL(aurora_silu_mul_f32, float, load16_f32, store16_f32, keep_f32)

/* RoPE on the q and k heads of qkv rows [rows, (nh + 2 nkv) * hd] (row r = batch r / T, position
   pos[r]): q goes to q_out [rows, nh, hd], rotated k and v into the slot cache at (slots[r / T], head,
   cidx[r], which is pos[r] when cidx is NULL; a tree's nodes share positions, not cache entries).
   Products and the sum are rounded as transformers' q * cos + rotate_half(q) * sin. */
#define ROPE_KERNEL(NAME, T, TOF, FROMF)                                                              \
void NAME(const T *qkv, const T *cos, const T *sin, const int64_t *pos, const int64_t *cidx,          \
          const int64_t *slots, T *q_out, T *kc, T *vc, int64_t s_slot, int64_t s_head, int64_t rows,  \
          int64_t Tq,                                                                                 \
          int64_t nh, int64_t nkv, int64_t hd, int threads) {                                         \
    const int64_t width = (nh + 2 * nkv) * hd, half = hd / 2;                                         \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows >= 64)")                  \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const int64_t slot = slots[r / Tq], w = cidx ? cidx[r] : pos[r];                              \
        const T *c = cos + pos[r] * hd, *s = sin + pos[r] * hd;                                       \
        for (int64_t h = 0; h < nh + nkv; h++) {                                                      \
            const T *x = qkv + r * width + h * hd;                                                    \
            T *dst = h < nh ? q_out + (r * nh + h) * hd : kc + slot * s_slot + (h - nh) * s_head + w * hd; \
            for (int64_t d = 0; d < hd; d++) {                                                        \
                const float rot = d < half ? -TOF(x[d + half]) : TOF(x[d - half]);                    \
                const float t1 = TOF(FROMF(TOF(x[d]) * TOF(c[d]))), t2 = TOF(FROMF(rot * TOF(s[d])));  \
                dst[d] = FROMF(t1 + t2);                                                              \
            }                                                                                         \
        }                                                                                             \
        for (int64_t h = 0; h < nkv; h++)                                                             \
            memcpy(vc + slot * s_slot + h * s_head + w * hd, qkv + r * width + (nh + nkv + h) * hd,   \
                   (size_t)hd * sizeof(T));                                                           \
    }                                                                                                 \
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float same_f32(float f) { return f; }
ROPE_KERNEL(aurora_rope_write_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
ROPE_KERNEL(aurora_rope_write_f32, float, same_f32, same_f32)

/* ---- one decoder layer (Llama / Qwen2) for a few tokens per row, in one call ------------------------
   The same steps as the kernels above called one by one from Python, without ~9 Python round trips
   and allocations per layer: resid = x + pending (the previous layer's MLP output), h = norm(resid),
   qkv (+ bias), RoPE and cache write, attention, resid += o(attn), h = post_norm(resid),
   mlp_out = down(silu(gate) * up). Scratch lives in ``work`` (see ``layer_workspace`` in Python). */
static void attn_any_bf16(const uint16_t *q, int64_t sqb, int64_t sqt, int64_t sqh, const uint16_t *kc,
                          const uint16_t *vc, int64_t s_slot, int64_t s_head, const int64_t *slots,
                          const int64_t *pos, const uint64_t *tmask, uint16_t *out, int64_t B, int64_t Tq,
                          int64_t nh, int64_t nkv, int64_t hd, int64_t max_keys, float scale, int threads) {
    if (hd % 32 != 0 || !aurora_attn_bf16_dp(q, sqb, sqt, sqh, kc, vc, s_slot, s_head, slots, pos, tmask, out, B,
                                             Tq, nh, nkv, hd, max_keys, scale, threads))
        aurora_attn_bf16(q, sqb, sqt, sqh, kc, vc, s_slot, s_head, slots, pos, tmask, out, B, Tq, nh, nkv, hd,
                         max_keys, scale, threads);
}
static inline void add_bias_bf16(uint16_t *y, const uint16_t *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(b[i]));
}
static inline void add_bias_f32(float *y, const float *b, int64_t n) { for (int64_t i = 0; i < n; i++) y[i] += b[i]; }

/* From h [M, QW] (the normalised input of qkv) and resid [M, H] (the residual stream before attention)
   on: qkv (+ bias), RoPE and cache write, attention, resid += o(attn), h = post_norm(resid),
   mlp_out = down(silu(gate) * up). Declares the scratch pointers into work. */
#define LAYER_TAIL(SUFFIX, ATTN, QW)                                                                  \
    aurora_gemv##SUFFIX(w_qkv, h, qkv, M, W, QW, QW, W, threads);                                     \
    if (b_qkv) for (int64_t r = 0; r < M; r++) add_bias##SUFFIX(qkv + r * W, b_qkv, W);                \
    aurora_rope_write##SUFFIX(qkv, cos, sin, pos, cidx, slots, q, kc, vc, s_slot, s_head, M, Tq, nh, nkv, \
                              hd, threads);                                                           \
    ATTN(q, Tq * A, A, hd, kc, vc, s_slot, s_head, slots, cidx ? cidx : pos, tmask, att, B, Tq, nh, nkv, \
         hd, kv_len,                                                                                  \
         (float)(1.0 / __builtin_sqrt((double)hd)), threads);                                         \
    aurora_gemv##SUFFIX(w_o, att, o, M, H, A, A, H, threads);                                         \
    aurora_add_rmsnorm##SUFFIX(resid, o, resid, h, post_w, M, H, eps, threads);                       \
    aurora_gemv##SUFFIX(w_gu, h, gu, M, 2 * I, H, H, 2 * I, threads);                                 \
    aurora_silu_mul##SUFFIX(gu, act, M, I, threads);                                                  \
    aurora_gemv##SUFFIX(w_down, act, mlp_out, M, H, I, I, H, threads);

#define LAYER_SCRATCH(T, QW)                                                                          \
    const int64_t M = B * Tq, W = (nh + 2 * nkv) * hd, A = nh * hd;                                   \
    T *h = work, *qkv = h + M * (QW), *q = qkv + M * W, *att = q + M * A, *o = att + M * A;           \
    T *gu = o + M * H, *act = gu + M * 2 * I;

/* A layer's input: resid = x + pending (rounded to T, as transformers adds the residual stream), h its
   norm. With ``sum_out`` the sum (the previous layer's output, an EAGLE3 tap) is also copied there, row r
   at sum_out + r * ld_sum: the taps come out of the pass with no extra add. */
#define LAYER_INPUT_SUM(SUFFIX, T)                                                                    \
    if (pending) aurora_add_rmsnorm##SUFFIX(x, pending, resid, h, in_w, M, H, eps, threads);          \
    else { memcpy(resid, x, (size_t)(M * H) * sizeof(T));                                             \
           aurora_add_rmsnorm##SUFFIX(resid, NULL, NULL, h, in_w, M, H, eps, threads); }              \
    if (sum_out)                                                                                      \
        for (int64_t r = 0; r < M; r++) memcpy(sum_out + r * ld_sum, resid + r * H, (size_t)H * sizeof(T));

#define LAYER_KERNEL(SUFFIX, T, ATTN)                                                                 \
void aurora_layer##SUFFIX(const T *x, const T *pending, T *resid, T *mlp_out, const T *in_w,          \
                          const T *post_w, const T *w_qkv, const T *b_qkv, const T *w_o, const T *w_gu, \
                          const T *w_down, const T *cos, const T *sin, const int64_t *pos,            \
                          const int64_t *cidx, const uint64_t *tmask, const int64_t *slots,          \
                          T *kc, T *vc, T *work, T *sum_out, int64_t s_slot, int64_t s_head,         \
                          int64_t B, int64_t Tq, int64_t nh, int64_t nkv, int64_t hd, int64_t H,      \
                          int64_t I, int64_t kv_len, int64_t ld_sum, float eps, int threads) {        \
    LAYER_SCRATCH(T, H)                                                                               \
    LAYER_INPUT_SUM(SUFFIX, T)                                                                        \
    LAYER_TAIL(SUFFIX, ATTN, H)                                                                       \
}                                                                                                     \
/* The EAGLE3 draft's layer: qkv reads [emb_norm(emb) | hid_norm(hid)] (2H wide); the residual stream \
   starts from hid. */                                                                                \
void aurora_draft_layer##SUFFIX(const T *emb, const T *hid, T *resid, T *mlp_out, const T *emb_w,     \
                                const T *hid_w, const T *post_w, const T *w_qkv, const T *w_o,        \
                                const T *w_gu, const T *w_down, const T *cos, const T *sin,           \
                                const int64_t *pos, const int64_t *cidx, const uint64_t *tmask,       \
                                const int64_t *slots, T *kc, T *vc, T *work,                          \
                                int64_t s_slot, int64_t s_head, int64_t B, int64_t Tq, int64_t nh,    \
                                int64_t nkv, int64_t hd, int64_t H, int64_t I, int64_t kv_len,        \
                                float eps, int threads) {                                             \
    const T *b_qkv = NULL;                                                                            \
    LAYER_SCRATCH(T, 2 * H)                                                                           \
    for (int64_t r = 0; r < M; r++) {  /* each half normalised on its own, straight into its place */  \
        aurora_add_rmsnorm##SUFFIX(emb + r * H, NULL, NULL, h + r * 2 * H, emb_w, 1, H, eps, 1);     \
        aurora_add_rmsnorm##SUFFIX(hid + r * H, NULL, NULL, h + r * 2 * H + H, hid_w, 1, H, eps, 1); \
    }                                                                                                 \
    memcpy(resid, hid, (size_t)(M * H) * sizeof(T));                                                  \
    LAYER_TAIL(SUFFIX, ATTN, 2 * H)                                                                   \
}
LAYER_KERNEL(_bf16, uint16_t, attn_any_bf16)
LAYER_KERNEL(_f32, float, aurora_attn_f32)

int aurora_has_avx512bf16(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* ---- argmax and logsumexp over the vocabulary, in one call -----------------------------------------
   For each row r of x [rows, n]: idx[r] = the index of the first largest value, a NaN counting as larger
   than any number (the first NaN wins), as torch.argmax; lse[r] = log sum_j exp(scale * x[r, j]) for
   scale > 0, as torch.logsumexp (NaN if the row holds a NaN, m when its maximum m is infinite: +inf, or
   -inf for a row of -inf). Either output may be NULL. Pass one keeps each lane's first maximum and its
   index (the lowest index among the lanes holding the row's maximum wins); pass two, only for lse, sums
   exp(scale * (x - m)) in float32 while the row is still in cache. A served step needs both (the greedy
   token, its trace's normaliser): one call reads the logits once. (torch's argmax takes ~4 ns a bf16
   element here, its logsumexp ~90 us a row of 49152.) Rows go to threads from two rows on, each row whole
   to one thread, so results do not depend on the thread count: a batch-8 step's logits took 190-250 us on
   one thread and 120-180 us on two (AMD EPYC, AVX512-BF16), which is about 0.7% of that step. */
#define ARGMAX_LSE_KERNEL(NAME, T, LOAD, TOF)                                                         \
void NAME(const T *x, int64_t *idx, float *lse, int64_t rows, int64_t n, float scale, int threads) {  \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(rows > 1 && rows * n >= (1 << 16))") \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T *xr = x + r * n;                                                                      \
        const int64_t nb = n < ((int64_t)1 << 31) ? (n & ~(int64_t)15) : 0;  /* int32 lane indices */ \
        v16f mv = (v16f){0} - __builtin_inff();                                                       \
        v16i iv = (v16i){0}, jv = (v16i){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};          \
        v16u nan = (v16u){0};                                                                         \
        for (int64_t j = 0; j < nb; j += 16, jv += 16) {                                              \
            const v16f v = LOAD(xr + j);                                                              \
            const v16i gt = (v16i)(v > mv);                                                           \
            nan |= (v16u)(v != v);                                                                    \
            mv = vselect((v16u)gt, v, mv);                                                            \
            iv = (gt & jv) | (~gt & iv);                                                              \
        }                                                                                             \
        float m = -__builtin_inff();                                                                  \
        int64_t best = 0;                                                                             \
        int any_nan = 0;                                                                              \
        if (nb) { m = mv[0]; best = iv[0]; }                                                          \
        for (int l = 0; l < 16; l++) {                                                                \
            any_nan |= nan[l] != 0;                                                                   \
            if (nb && (mv[l] > m || (mv[l] == m && iv[l] < best))) { m = mv[l]; best = iv[l]; }       \
        }                                                                                             \
        for (int64_t j = nb; j < n; j++) {                                                            \
            const float v = TOF(xr[j]);                                                               \
            if (v != v) any_nan = 1;                                                                  \
            else if (v > m || (j == 0)) { m = v; best = j; }                                          \
        }                                                                                             \
        if (idx) {                                                                                    \
            if (any_nan) { best = 0; while (TOF(xr[best]) == TOF(xr[best])) best++; }                 \
            idx[r] = best;                                                                            \
        }                                                                                             \
        if (!lse) continue;                                                                           \
        if (any_nan) { lse[r] = __builtin_nanf(""); continue; }                                       \
        if (m == __builtin_inff() || m == -__builtin_inff()) { lse[r] = m; continue; }                \
        const float sm = scale * m;                                                                   \
        const int64_t ne = n & ~(int64_t)15;                                                          \
        v16f acc = (v16f){0};                                                                         \
        for (int64_t j = 0; j < ne; j += 16) acc += vexp(LOAD(xr + j) * scale - sm);                  \
        float s = hsum(acc);                                                                          \
        for (int64_t j = ne; j < n; j++) {                                                            \
            v16f t = (v16f){0} - 100.f;                                                               \
            t[0] = TOF(xr[j]) * scale - sm;                                                           \
            s += vexp(t)[0];                                                                          \
        }                                                                                             \
        lse[r] = sm + __builtin_logf(s);                                                              \
    }                                                                                                 \
}
ARGMAX_LSE_KERNEL(aurora_argmax_lse_bf16, uint16_t, load16_bf16, bf16_to_f32)
ARGMAX_LSE_KERNEL(aurora_argmax_lse_f32, float, load16_f32, same_f32)
"""
