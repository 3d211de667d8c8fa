// Causal fp32 attention forward and backward as one kernel per call, for hosts whose native precision is fp32 (AVX2 +
// FMA; issue 23.1). torch's CPU flash kernel (what SDPA runs) spent 45-50 CPU-ms a layer call at config S (Zen 2, 1
// or 2 threads) against ~27 for its six GEMMs at full T x T at MKL's single-GEMM rate; this does the causal part of
// those GEMMs (~half at T 256) with the softmax between them while a block's scores are in cache: 28-30 CPU-ms with
// it all (bench/README.md, eighteenth pass). Compiled only where the compiler targets AVX2 and FMA without AVX-512:
// the hosts it was measured on. An AVX-512 host keeps SDPA (its flash kernel and GEMMs are other code) until a
// measurement there says otherwise: `ATEN_CPU_CAPABILITY=avx2 .venv/bin/python bench/attention_cpu.py --precisions
// fp32` builds and times this kernel, beside the same command uncapped for the host's own flash kernel.
//
// The arithmetic is the flash kernel's in fp32: scores q k^T * scale, softmax, P v; backward recomputes each block's
// P from q and k (the forward's code: the same values), dP = dO v^T * scale, dS = P (dP - sum(P dP)), dQ = dS k,
// dK = sum over query blocks and the group's heads of dS^T q, dV of P^T dO, every sum in fp32 with FMA. Per (batch,
// k/v head), one task: k (and in backward v) transposed once, then every query head of the group and every block of
// 64 queries (keys up to the block's last query; each tile of 6 rows stops at its own last query, the rest masked).
// The other operands are read where they lie (q, v, k and dO rows; P and dS transposed by index): no copies.
#include "causal_softmax.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>

namespace {

// Tiles of MR rows x NV vectors: 12 accumulators, 2 vectors of B and a broadcast: 15 of AVX2's 16 registers.
constexpr int MR = 6, NV = 2, NC = NV * W;
static_assert(NC == 16, "columns are computed 16 at a time (row_cols, round16)");

// c (m x 16, row stride ldc) = alpha (a b) or, with acc, c + a b, over kn terms: A(r, k) at a[r * lda + k], or with
// BY_K at a[k * lda + r] (a transposed operand read in place); B's row k at b + k * ldb. Rows past m repeat row 0
// and are not stored. AVX2 intrinsics, not simd.h's generic vectors: with those GCC kept the accumulators on the
// stack, a store each per term (~48 GFLOP/s a core on Zen 2; MKL's sgemm ~90).
template <bool BY_K>
void tile(const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc, int m, int64_t kn,
          float alpha, bool acc) {
    __m256 s[MR][NV];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) s[r][v] = _mm256_setzero_ps();
    const float *rows[MR];
    for (int r = 0; r < MR; r++) rows[r] = BY_K ? a + (r < m ? r : 0) : a + (r < m ? r : 0) * lda;
    const int64_t step = BY_K ? lda : 1;
    for (int64_t k = 0; k < kn; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + W);
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            const __m256 av = _mm256_broadcast_ss(rows[r] + k * step);  // from memory: no shuffle-port uop
            s[r][0] = _mm256_fmadd_ps(av, b0, s[r][0]);
            s[r][1] = _mm256_fmadd_ps(av, b1, s[r][1]);
        }
    }
    const __m256 al = _mm256_set1_ps(alpha);
#pragma GCC unroll 6  // constant indices only: a loop to m left s in memory, stored on every term
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) {
            float *o = c + r * ldc + W * v;
            if (r < m)
                _mm256_storeu_ps(o, acc ? _mm256_add_ps(_mm256_loadu_ps(o), s[r][v]) : _mm256_mul_ps(s[r][v], al));
        }
}

// The products a causal block's GEMM skips, per tile of rows: with COLS and KEYS the rows are queries first + i..
// and what is skipped is the keys past the tile's last query, as output columns (scores, dP: rounded up to 16) or
// as terms of the sum (P v, dS k); with QUERIES the rows are keys i.. and what is skipped is the query terms before
// the tile's first key (dS^T q, P^T dO: accumulating, so C keeps its values). Skipped terms are exact zeros.
enum class Skip { NONE, COLS, KEYS, QUERIES };

// B's layout: row k of its 16-column panel p at b + p * panel + k * ld (row-major: panel 16, ld the row stride;
// packed in panels: ld 16, panel 16 x rows, each panel's rows consecutive lines).
struct Rhs { const float *b; int64_t ld, panel; };

// c (m x n) = alpha a b (or c + a b with acc); n a multiple of 16; kn terms; `skip` with `first` as above.
void gemm(const float *a, int64_t lda, bool by_k, Rhs b, float *c, int64_t ldc, int64_t m,
          int64_t n, int64_t kn, float alpha, bool acc, Skip skip = Skip::NONE, int64_t first = 0) {
    for (int64_t j = 0; j < n; j += NC)
        for (int64_t i = 0; i < m; i += MR) {
            const int rows = (int)(m - i < MR ? m - i : MR);
            if (skip == Skip::COLS && j >= std::min(n, round16(first + i + rows))) continue;
            const int64_t k0 = skip == Skip::QUERIES ? std::max<int64_t>(0, i - first) : 0;
            const int64_t k1 = skip == Skip::KEYS ? std::min(kn, first + i + rows) : kn;
            const float *ai = by_k ? a + i + k0 * lda : a + i * lda + k0;
            const float *bj = b.b + j / NC * b.panel + k0 * b.ld;
            if (by_k)
                tile<true>(ai, lda, bj, b.ld, c + i * ldc + j, ldc, rows, k1 - k0, alpha, acc);
            else
                tile<false>(ai, lda, bj, b.ld, c + i * ldc + j, ldc, rows, k1 - k0, alpha, acc);
        }
}

// x (n rows of d, row stride ld; n and d multiples of 8) -> out (d, n; row stride ldo): a k^T or v^T the score
// GEMMs read as B, 8 x 8 at a time in registers (a scalar loop took ~7 % of the kernel's time, its loads and stores
// one float each).
void transpose(const float *x, int64_t ld, int64_t n, int64_t d, float *out, int64_t ldo) {
    for (int64_t j = 0; j < n; j += 8)
        for (int64_t c = 0; c < d; c += 8) {
            __m256 r[8], t[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(x + (j + i) * ld + c);
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
                r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
                r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
            }
            for (int i = 0; i < 4; i++) {  // row i of the tile's columns: lanes 0-3 from r[i], 4-7 from r[i + 4]
                _mm256_storeu_ps(out + (c + i) * ldo + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
                _mm256_storeu_ps(out + (c + i + 4) * ldo + j, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
            }
        }
}

// x (n rows of d, row stride ld) -> out in 16-column panels (Rhs: ld 16, panel 16 n): a k or v the GEMMs that sum
// over keys read as B. In place, their rows are a wide stride apart (1152 or 384 floats at config S), which maps a
// tile's 64-256 rows of one column to 8 of L1's 64 sets; a panel's rows are consecutive lines.
Rhs panels(const float *x, int64_t ld, int64_t n, int64_t d, float *out) {
    for (int64_t p = 0; p < d / NC; p++)
        for (int64_t j = 0; j < n; j++) memcpy(out + (p * n + j) * NC, x + j * ld + p * NC, NC * 4);
    return {out, NC, NC * n};
}

// The row stride of the T-wide buffers (k^T, v^T, P, dS): T + 16 floats. At T 256 a 1 KiB stride puts the 64 rows a
// tile reads down a column (k^T's, or P's and dS's read transposed) in 4 of L1's 64 sets; they evicted each other
// and the kernel ran at ~1/3 of its FMA rate (fwd + bwd ~50 CPU-ms a layer at config S, 1 thread, vs flash's ~45).
int64_t padded(int64_t T) { return T + 16; }

struct Shape {
    int64_t B, H, n_kv, T, hd, hdv;
    int64_t q[3], k[3], v[3];  // element strides of batch, head, position (the last dim is contiguous)
};

int64_t block_rows(int64_t T) { return T % 64 == 0 ? 64 : T; }

// out (B, T, H, hdv) = softmax(scale q k^T, causal) v.
void attn_fwd(const float *q, const float *k, const float *v, float *out, const Shape &z, float scale, int threads) {
    const int64_t T = z.T, R = block_rows(T), g = z.H / z.n_kv, L = padded(T);
    #pragma omp parallel num_threads(threads)
    {
        float *kt = static_cast<float *>(malloc(L * z.hd * 4));  // k^T (hd, T)
        float *vp = static_cast<float *>(malloc(T * z.hdv * 4));  // v in panels
        float *s = static_cast<float *>(malloc(R * L * 4));
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < z.B * z.n_kv; task++) {
            const int64_t b = task / z.n_kv, kv = task % z.n_kv;
            transpose(k + b * z.k[0] + kv * z.k[1], z.k[2], T, z.hd, kt, L);
            const Rhs vb = panels(v + b * z.v[0] + kv * z.v[1], z.v[2], T, z.hdv, vp);
            for (int64_t h = kv * g; h < (kv + 1) * g; h++)
                for (int64_t t0 = 0; t0 < T; t0 += R) {
                    const int64_t keys = t0 + R;
                    gemm(q + b * z.q[0] + h * z.q[1] + t0 * z.q[2], z.q[2], false, {kt, L, NC}, s, L, R, keys, z.hd,
                         scale, false, Skip::COLS, t0);
                    causal_softmax(s, L, s, L, t0, R, keys);
                    gemm(s, L, false, vb, out + ((b * T + t0) * z.H + h) * z.hdv, z.H * z.hdv, R, z.hdv, keys,
                         1.0f, false, Skip::KEYS, t0);
                }
        }
        free(kt); free(vp); free(s);
    }
}

// The backward of attn_fwd for its output gradient go (element strides gs of batch, head, position), into
// dq (B, T, H, hd), dk (B, T, n_kv, hd), dv (B, T, n_kv, hdv) laid out as the projections' outputs, whose head views
// (B, heads, T, dim) the gradients are: autograd's view backward then copies nothing.
void attn_bwd(const float *q, const float *k, const float *v, const float *go, const int64_t *gs, float *dq, float *dk,
              float *dv, const Shape &z, float scale, int threads) {
    const int64_t T = z.T, R = block_rows(T), g = z.H / z.n_kv, hd = z.hd, hdv = z.hdv;
    const int64_t ldk = z.n_kv * hd, ldv = z.n_kv * hdv, L = padded(T);
    #pragma omp parallel num_threads(threads)
    {
        float *kt = static_cast<float *>(malloc(L * hd * 4));   // k^T (hd, T): scores
        float *vt = static_cast<float *>(malloc(L * hdv * 4));  // v^T (hdv, T): dP
        float *kp = static_cast<float *>(malloc(T * hd * 4));   // k in panels: dQ
        float *s = static_cast<float *>(malloc(R * L * 4));     // P
        float *dp = static_cast<float *>(malloc(R * L * 4));    // dP, then dS in place
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < z.B * z.n_kv; task++) {
            const int64_t b = task / z.n_kv, kv = task % z.n_kv;
            const float *kb = k + b * z.k[0] + kv * z.k[1], *vb = v + b * z.v[0] + kv * z.v[1];
            float *dkb = dk + b * T * ldk + kv * hd, *dvb = dv + b * T * ldv + kv * hdv;
            transpose(kb, z.k[2], T, hd, kt, L);
            transpose(vb, z.v[2], T, hdv, vt, L);
            const Rhs kr = panels(kb, z.k[2], T, hd, kp);
            for (int64_t t = 0; t < T; t++) {
                memset(dkb + t * ldk, 0, hd * 4);
                memset(dvb + t * ldv, 0, hdv * 4);
            }
            for (int64_t h = kv * g; h < (kv + 1) * g; h++)
                for (int64_t t0 = 0; t0 < T; t0 += R) {
                    const int64_t keys = t0 + R;
                    const float *qb = q + b * z.q[0] + h * z.q[1] + t0 * z.q[2], *gb = go + b * gs[0] + h * gs[1] + t0 * gs[2];
                    gemm(qb, z.q[2], false, {kt, L, NC}, s, L, R, keys, hd, scale, false, Skip::COLS, t0);
                    causal_softmax(s, L, s, L, t0, R, keys);
                    gemm(gb, gs[2], false, {vt, L, NC}, dp, L, R, keys, hdv, scale, false, Skip::COLS, t0);
                    causal_softmax_backward(s, dp, L, dp, L, t0, R, keys);
                    gemm(dp, L, false, kr, dq + ((b * T + t0) * z.H + h) * hd, z.H * hd, R, hd, keys, 1.0f,  // dQ = dS k
                         false, Skip::KEYS, t0);
                    gemm(dp, L, true, {qb, z.q[2], NC}, dkb, ldk, keys, hd, R, 1.0f, true, Skip::QUERIES, t0);   // dK += dS^T q
                    gemm(s, L, true, {gb, gs[2], NC}, dvb, ldv, keys, hdv, R, 1.0f, true, Skip::QUERIES, t0);   // dV += P^T dO
                }
        }
        free(kt); free(vt); free(kp); free(s); free(dp);
    }
}

Shape shape(const int64_t *sizes, const int64_t *strides) {
    Shape z{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], {}, {}, {}};
    for (int i = 0; i < 3; i++) { z.q[i] = strides[i]; z.k[i] = strides[3 + i]; z.v[i] = strides[6 + i]; }
    return z;
}

}  // namespace

// sizes: B, H, n_kv, T, hd, hdv; strides: q's, k's, v's (batch, head, position) in elements (then go's, backward).
extern "C" void attn_fwd_f32(const float *q, const float *k, const float *v, float *out, const int64_t *sizes,
                             const int64_t *strides, float scale, int threads) {
    attn_fwd(q, k, v, out, shape(sizes, strides), scale, threads);
}

extern "C" void attn_bwd_f32(const float *q, const float *k, const float *v, const float *go, float *dq, float *dk,
                             float *dv, const int64_t *sizes, const int64_t *strides, float scale, int threads) {
    attn_bwd(q, k, v, go, strides + 9, dq, dk, dv, shape(sizes, strides), scale, threads);
}

#endif
