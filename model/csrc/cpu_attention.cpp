// Causal bf16 attention forward and backward as one kernel per call, for CPUs with a bf16 dot product (AVX-512-BF16):
// model/cpu_attention.py's blocked form (issue 23.1) without its ~100 torch ops per call, their fp32 operand copies
// and their fp32 <-> bf16 conversions. Compiled only where the compiler targets AVX512_BF16; elsewhere the library
// has no attn_* symbols and the Python side keeps its blocked form (model/cpu_kernels.py built).
//
// The arithmetic is the blocked form's: scores q k^T and dP = dO v^T are fp32 sums of exact bf16 products (vdpbf16ps
// multiplies bf16 pairs exactly and adds in fp32), the softmax and its backward are fp32, P and dS enter the GEMMs
// P v, dS k, q^T dS and dO^T P rounded to bf16, and dK, dV sum over query blocks in fp32. Per (batch, k/v head), one
// task: K and V packed once into the pair layouts the dot product reads, then every query head of the group and every
// block of 64 queries (keys up to the block's last query; in the diagonal square each tile of 6 rows stops at its own
// last query, the rest masked). Backward recomputes each block's P from q and k as the forward did (same code: the
// same values).
#include "bf16_gemm.h"
#include "causal_softmax.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)

// x (n rows of d, row stride ld, n a multiple of 16) -> out[k][j] = pair (x[j][2k], x[j][2k+1]): a B operand whose
// pair rows run along x's rows (for a k^T or v^T). The pairs are 32-bit words, so this is their transpose: 16 x 16
// of them at a time in registers (transpose16); the last d/2 % 16 pairs by one gather of 16 rows' pairs per store.
static void pack_by_columns(const bf16 *x, int64_t ld, int64_t n, int64_t d, uint32_t *out) {
    const int64_t kp = d / 2, tiled = kp / 16 * 16;
    for (int64_t j = 0; j < n; j += 16)
        for (int64_t k0 = 0; k0 < tiled; k0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(x + (j + i) * ld + 2 * k0));
            transpose16(r);
            for (int c = 0; c < 16; c++)
                _mm512_storeu_si512(out + (k0 + c) * n + j, _mm512_castps_si512(r[column16(c)]));
        }
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)ld));
    for (int64_t j = 0; j < n; j += 16)
        for (int64_t k = tiled; k < kp; k++)
            _mm512_storeu_si512(out + k * n + j, _mm512_i32gather_epi32(rows, x + j * ld + 2 * k, 2));
}

// x (n rows of d, row stride ld, n even) -> out[k][c] = pair (x[2k][c], x[2k+1][c]): a B operand whose pair rows run
// along x's columns (for a k or v), or with d, n swapped an A operand of x^T.
static void pack_by_rows(const bf16 *x, int64_t ld, int64_t n, int64_t d, uint32_t *out) {
    for (int64_t k = 0; k < n / 2; k++)
        for (int64_t c = 0; c < d; c++)
            out[k * d + c] = (uint32_t)x[2 * k * ld + c] | (uint32_t)x[(2 * k + 1) * ld + c] << 16;
}

struct Shape {
    int64_t B, H, n_kv, T, hd, hdv;
    int64_t q[3], k[3], v[3];  // element strides of batch, head, position (the last dim is contiguous)
};

static int64_t block_rows(int64_t T) { return T % 64 == 0 ? 64 : T; }

// out (B, T, H, hdv) bf16 = softmax(scale q k^T, causal) v.
static void attn_fwd(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, const Shape &z, float scale,
                     int threads) {
    const int64_t T = z.T, R = block_rows(T), g = z.H / z.n_kv;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *kp = static_cast<uint32_t *>(malloc(T * z.hd * 2));     // k^T pairs (hd/2, T)
        uint32_t *vp = static_cast<uint32_t *>(malloc(T * z.hdv * 2));    // v pairs (T/2, hdv)
        float *s = static_cast<float *>(malloc(R * T * 4));
        bf16 *p16 = static_cast<bf16 *>(malloc(R * T * 2));
        float *o = static_cast<float *>(malloc(R * z.hdv * 4));
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < z.B * z.n_kv; task++) {
            const int64_t b = task / z.n_kv, kv = task % z.n_kv;
            pack_by_columns(k + b * z.k[0] + kv * z.k[1], z.k[2], T, z.hd, kp);
            pack_by_rows(v + b * z.v[0] + kv * z.v[1], z.v[2], T, z.hdv, vp);
            for (int64_t h = kv * g; h < (kv + 1) * g; h++)
                for (int64_t t0 = 0; t0 < T; t0 += R) {
                    const int64_t keys = t0 + R;
                    gemm({q + b * z.q[0] + h * z.q[1] + t0 * z.q[2], z.q[2], false}, kp, T, s, T, R, keys, z.hd / 2, scale,
                         false, Skip::COLS, t0);
                    causal_softmax(s, T, p16, T, t0, R, keys);
                    gemm({p16, T, false}, vp, z.hdv, o, z.hdv, R, z.hdv, keys / 2, 1.0f, false, Skip::KEYS, t0);
                    for (int64_t r = 0; r < R; r++)
                        for (int64_t c = 0; c < z.hdv; c += W)
                            io<bf16>::store(out + ((b * T + t0 + r) * z.H + h) * z.hdv + c, io<float>::load(o + r * z.hdv + c));
                }
        }
        free(kp); free(vp); free(s); free(p16); free(o);
    }
}

// The backward of attn_fwd for its output gradient go (element strides gs of batch, head, position), into
// dq (B, T, H, hd), dk (B, T, n_kv, hd), dv (B, T, n_kv, hdv) laid out as the projections' outputs, whose head views
// (B, heads, T, dim) the gradients are: autograd's view backward then copies nothing.
static void attn_bwd(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *go, const int64_t *gs, bf16 *dq,
                     bf16 *dk, bf16 *dv, const Shape &z, float scale, int threads) {
    const int64_t T = z.T, R = block_rows(T), g = z.H / z.n_kv, hd = z.hd, hdv = z.hdv;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *kp = static_cast<uint32_t *>(malloc(T * hd * 2));    // k^T pairs (hd/2, T): scores
        uint32_t *vt = static_cast<uint32_t *>(malloc(T * hdv * 2));   // v^T pairs (hdv/2, T): dP
        uint32_t *kr = static_cast<uint32_t *>(malloc(T * hd * 2));    // k pairs (T/2, hd): dQ
        uint32_t *sp = static_cast<uint32_t *>(malloc(R * T * 2));     // dS pairs of query rows (R/2, T): dK
        uint32_t *pp = static_cast<uint32_t *>(malloc(R * T * 2));     // P pairs of query rows (R/2, T): dV
        uint32_t *qr = static_cast<uint32_t *>(malloc(R * hd * 2));    // the block's q pairs of rows (R/2, hd): dK
        uint32_t *gr = static_cast<uint32_t *>(malloc(R * hdv * 2));   // and dO's (R/2, hdv): dV
        float *s = static_cast<float *>(malloc(R * T * 4));
        float *dp = static_cast<float *>(malloc(R * T * 4));
        bf16 *p16 = static_cast<bf16 *>(malloc(R * T * 2));
        bf16 *ds16 = static_cast<bf16 *>(malloc(R * T * 2));
        float *dk32 = static_cast<float *>(malloc(T * hd * 4));         // dK (T, hd), summed over blocks and heads
        float *dv32 = static_cast<float *>(malloc(T * hdv * 4));
        float *o = static_cast<float *>(malloc(R * hd * 4));
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < z.B * z.n_kv; task++) {
            const int64_t b = task / z.n_kv, kv = task % z.n_kv;
            const bf16 *kb = k + b * z.k[0] + kv * z.k[1], *vb = v + b * z.v[0] + kv * z.v[1];
            pack_by_columns(kb, z.k[2], T, hd, kp);
            pack_by_columns(vb, z.v[2], T, hdv, vt);
            pack_by_rows(kb, z.k[2], T, hd, kr);
            memset(dk32, 0, T * hd * 4);
            memset(dv32, 0, T * hdv * 4);
            for (int64_t h = kv * g; h < (kv + 1) * g; h++)
                for (int64_t t0 = 0; t0 < T; t0 += R) {
                    const int64_t keys = t0 + R;
                    const bf16 *qb = q + b * z.q[0] + h * z.q[1] + t0 * z.q[2], *gb = go + b * gs[0] + h * gs[1] + t0 * gs[2];
                    gemm({qb, z.q[2], false}, kp, T, s, T, R, keys, hd / 2, scale, false, Skip::COLS, t0);
                    causal_softmax(s, T, p16, T, t0, R, keys);
                    gemm({gb, gs[2], false}, vt, T, dp, T, R, keys, hdv / 2, scale, false, Skip::COLS, t0);
                    causal_softmax_backward(s, dp, T, ds16, T, t0, R, keys);
                    gemm({ds16, T, false}, kr, hd, o, hd, R, hd, keys / 2, 1.0f, false, Skip::KEYS, t0);  // dQ = dS k
                    for (int64_t r = 0; r < R; r++)
                        for (int64_t c = 0; c < hd; c += W)
                            io<bf16>::store(dq + ((b * T + t0 + r) * z.H + h) * hd + c, io<float>::load(o + r * hd + c));
                    pack_by_rows(ds16, T, R, keys, sp);  // (R/2, keys): A operands read k-major
                    pack_by_rows(p16, T, R, keys, pp);
                    pack_by_rows(qb, z.q[2], R, hd, qr);
                    pack_by_rows(gb, gs[2], R, hdv, gr);
                    gemm({(const bf16 *)sp, keys, true}, qr, hd, dk32, hd, keys, hd, R / 2, 1.0f, true,  // dK += dS^T q
                         Skip::QUERIES, t0);
                    gemm({(const bf16 *)pp, keys, true}, gr, hdv, dv32, hdv, keys, hdv, R / 2, 1.0f, true,  // dV += P^T dO
                         Skip::QUERIES, t0);
                }
            for (int64_t t = 0; t < T; t++) {
                for (int64_t c = 0; c < hd; c += W)
                    io<bf16>::store(dk + ((b * T + t) * z.n_kv + kv) * hd + c, io<float>::load(dk32 + t * hd + c));
                for (int64_t c = 0; c < hdv; c += W)
                    io<bf16>::store(dv + ((b * T + t) * z.n_kv + kv) * hdv + c, io<float>::load(dv32 + t * hdv + c));
            }
        }
        free(kp); free(vt); free(kr); free(sp); free(pp); free(qr); free(gr);
        free(s); free(dp); free(p16); free(ds16); free(dk32); free(dv32); free(o);
    }
}

// sizes: B, H, n_kv, T, hd, hdv; strides: q's, k's, v's (batch, head, position) in elements.
extern "C" void attn_fwd_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, const int64_t *sizes,
                              const int64_t *strides, float scale, int threads) {
    Shape z{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], {}, {}, {}};
    for (int i = 0; i < 3; i++) { z.q[i] = strides[i]; z.k[i] = strides[3 + i]; z.v[i] = strides[6 + i]; }
    attn_fwd(q, k, v, out, z, scale, threads);
}

extern "C" void attn_bwd_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *go, bf16 *dq, bf16 *dk,
                              bf16 *dv, const int64_t *sizes, const int64_t *strides, float scale, int threads) {
    Shape z{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], {}, {}, {}};
    for (int i = 0; i < 3; i++) { z.q[i] = strides[i]; z.k[i] = strides[3 + i]; z.v[i] = strides[6 + i]; }
    attn_bwd(q, k, v, go, strides + 9, dq, dk, dv, z, scale, threads);
}

#endif
