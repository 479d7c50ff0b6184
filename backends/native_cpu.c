#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

static inline __m256 cvt8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* one output row, ONE activation row: four independent accumulators hide the FMA latency (decode) */
static inline void row1_q4(const uint8_t *wr, const float *sc, const float *zs, const float *x,
                           const float *xs, float *y, int64_t gs, int64_t G) {
    const __m128i m0f = _mm_set1_epi8(0x0F);
    __m256 tot = _mm256_setzero_ps();
    float zterm = 0.f;
    for (int64_t g = 0; g < G; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(wr + k / 2));
            __m128i lo = _mm_and_si128(b, m0f);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);
            a0 = _mm256_fmadd_ps(cvt8(lo), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(cvt8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(cvt8(hi), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(cvt8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + k + 24), a3);
        }
        __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        tot = _mm256_fmadd_ps(acc, _mm256_set1_ps(sc[g]), tot);
        zterm += zs[g] * xs[g];
    }
    *y = hsum(tot) - zterm;
}

static inline void row1_q8(const uint8_t *wr, const float *sc, const float *zs, const float *x,
                           const float *xs, float *y, int64_t gs, int64_t G) {
    __m256 tot = _mm256_setzero_ps();
    float zterm = 0.f;
    for (int64_t g = 0; g < G; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
            a0 = _mm256_fmadd_ps(cvt8(_mm_loadl_epi64((const __m128i *)(wr + k))), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(cvt8(_mm_loadl_epi64((const __m128i *)(wr + k + 8))), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(cvt8(_mm_loadl_epi64((const __m128i *)(wr + k + 16))), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(cvt8(_mm_loadl_epi64((const __m128i *)(wr + k + 24))), _mm256_loadu_ps(x + k + 24), a3);
        }
        __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        tot = _mm256_fmadd_ps(acc, _mm256_set1_ps(sc[g]), tot);
        zterm += zs[g] * xs[g];
    }
    *y = hsum(tot) - zterm;
}

/* one output row n, MB activation rows starting at x (row stride kp); nibble layout */
static inline void row_q4(const uint8_t *wr, const float *sc, const float *zs, const float *x,
                          const float *xs, float *y, int64_t n_out, int64_t kp, int64_t gs, int64_t G,
                          const int MB) {
    const __m128i m0f = _mm_set1_epi8(0x0F);
    __m256 tot[4];
    float zterm[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < MB; i++) tot[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 acc[4];
        for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(wr + k / 2));
            __m128i lo = _mm_and_si128(b, m0f);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);
            __m256 w0 = cvt8(lo), w1 = cvt8(_mm_srli_si128(lo, 8));
            __m256 w2 = cvt8(hi), w3 = cvt8(_mm_srli_si128(hi, 8));
            for (int i = 0; i < MB; i++) {
                const float *xr = x + i * kp + k;
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[i]);
                acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[i]);
                acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[i]);
                acc[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[i]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int i = 0; i < MB; i++) {
            tot[i] = _mm256_fmadd_ps(acc[i], s, tot[i]);
            zterm[i] += zs[g] * xs[i * G + g];
        }
    }
    for (int i = 0; i < MB; i++) y[i * n_out] = hsum(tot[i]) - zterm[i];
}

/* byte layout (8-bit) */
static inline void row_q8(const uint8_t *wr, const float *sc, const float *zs, const float *x,
                          const float *xs, float *y, int64_t n_out, int64_t kp, int64_t gs, int64_t G,
                          const int MB) {
    __m256 tot[4];
    float zterm[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < MB; i++) tot[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 acc[4];
        for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(wr + k));
            __m256 w0 = cvt8(b), w1 = cvt8(_mm_srli_si128(b, 8));
            for (int i = 0; i < MB; i++) {
                const float *xr = x + i * kp + k;
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[i]);
                acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[i]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int i = 0; i < MB; i++) {
            tot[i] = _mm256_fmadd_ps(acc[i], s, tot[i]);
            zterm[i] += zs[g] * xs[i * G + g];
        }
    }
    for (int i = 0; i < MB; i++) y[i * n_out] = hsum(tot[i]) - zterm[i];
}

#define DISPATCH(FN)                                                                              \
    switch (mb) {                                                                                 \
    case 1:                                                                                       \
        if (nibbles) row1_q4(wr, scr, zsr, xm, xsm, ym, gs, G); else row1_q8(wr, scr, zsr, xm, xsm, ym, gs, G); \
        break;                                                                                    \
    case 4: FN(wr, scr, zsr, xm, xsm, ym, N, kp, gs, G, 4); break;                                \
    case 3: FN(wr, scr, zsr, xm, xsm, ym, N, kp, gs, G, 3); break;                                \
    default: FN(wr, scr, zsr, xm, xsm, ym, N, kp, gs, G, 2); break;                               \
    }

/* y[M, N] = x[M, kp] (.) W; w: [N, kp/2] (nibbles) or [N, kp] (bytes); sc, zs: [N, G];
   xs: scratch [M, G] that receives the per-group sums of x */
void ar_gemv(const uint8_t *w, const float *sc, const float *zs, const float *x, float *xs,
             float *y, int64_t M, int64_t N, int64_t kp, int64_t gs, int64_t nibbles, int64_t nthreads) {
    const int64_t G = kp / gs, row_bytes = nibbles ? kp / 2 : kp;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + m * kp + k));
            xs[m * G + g] = hsum(acc);
        }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * row_bytes;
        const float *scr = sc + n * G, *zsr = zs + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = (int)(M - m0 < 4 ? M - m0 : 4);
            const float *xm = x + m0 * kp, *xsm = xs + m0 * G;
            float *ym = y + m0 * N + n;
            if (nibbles) { DISPATCH(row_q4) } else { DISPATCH(row_q8) }
        }
    }
}

/* the per-layer constants, filled once after loading, so a call passes five arguments instead of twelve */
typedef struct {
    const uint8_t *w;
    const float *sc, *zs;
    int64_t N, kp, gs, nibbles;
} ar_layer;

/* y[M, N] = x[M, kp] @ W^T for one layer; the per-group sums of x live in a scratch buffer; returns 0, or -1
   when that buffer cannot be allocated */
int ar_gemv_layer(const ar_layer *L, const float *x, float *y, int64_t M, int64_t nthreads) {
    const int64_t G = L->kp / L->gs;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * G));
    if (!xs) return -1;
    ar_gemv(L->w, L->sc, L->zs, x, xs, y, M, L->N, L->kp, L->gs, L->nibbles, nthreads);
    free(xs);
    return 0;
}

/* out[N, kp] = (q - zp) * scale in fp32 */
void ar_dequant(const uint8_t *w, const float *sc, const float *zs, float *out, int64_t N, int64_t kp,
                int64_t gs, int64_t nibbles, int64_t nthreads) {
    const int64_t G = kp / gs, row_bytes = nibbles ? kp / 2 : kp;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * row_bytes;
        float *o = out + n * kp;
        for (int64_t g = 0; g < G; g++) {
            const __m256 s = _mm256_set1_ps(sc[n * G + g]), z = _mm256_set1_ps(zs[n * G + g]);
            if (nibbles) {
                const __m128i m0f = _mm_set1_epi8(0x0F);
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(wr + k / 2));
                    __m128i lo = _mm_and_si128(b, m0f), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);
                    _mm256_storeu_ps(o + k, _mm256_fmsub_ps(cvt8(lo), s, z));
                    _mm256_storeu_ps(o + k + 8, _mm256_fmsub_ps(cvt8(_mm_srli_si128(lo, 8)), s, z));
                    _mm256_storeu_ps(o + k + 16, _mm256_fmsub_ps(cvt8(hi), s, z));
                    _mm256_storeu_ps(o + k + 24, _mm256_fmsub_ps(cvt8(_mm_srli_si128(hi, 8)), s, z));
                }
            } else {
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
                    __m128i b = _mm_loadl_epi64((const __m128i *)(wr + k));
                    _mm256_storeu_ps(o + k, _mm256_fmsub_ps(cvt8(b), s, z));
                }
            }
        }
    }
}
