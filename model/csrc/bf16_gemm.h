// A bf16 GEMM on AVX-512-BF16 (vdpbf16ps: bf16 pairs multiplied exactly, summed in fp32) over operands packed in
// pairs: rows of MR x 16*NV fp32 accumulators, B read as rows of 16*NV pairs, A broadcast a pair at a time. Shared by
// causal attention (cpu_attention.cpp) and the LM head's weight gradient (cpu_lm_head.cpp).
#pragma once

#include <algorithm>

#include "causal_softmax.h"  // round16
#include "simd.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)

// Two bf16 at p (p[0] in the low half): one lane of a pair operand.
static inline uint32_t pair_at(const bf16 *p) { uint32_t u; memcpy(&u, p, 4); return u; }

// An A operand: the bf16 pair A(r, k) at a + r*lda + 2k (rows of pairs: q, dO, P or dS as they lie), or with
// by_k the pair at ((uint32_t *)a)[k*lda + r] (pairs packed k-major: a transposed operand, pack_by_rows).
struct Lhs {
    const bf16 *a;
    int64_t lda;
    bool by_k;
    Lhs rows_from(int64_t i) const { return {by_k ? a + 2 * i : a + i * lda, lda, by_k}; }
};

// c (m x 16*NV, row stride ldc) = alpha * (a b) or, with acc, c + a b: b's pair row k at b + k*ldb (16*NV lanes),
// over kp pairs. Rows MR at a time (rows past m repeat row 0, not stored): MR x NV accumulators, NV vectors of b.
constexpr int MR = 6;

// Each row's pair k is at rows[r] + k * step (elements): the layout decided at compile time, so the loop reads A
// with one broadcast a row and no address arithmetic of its own.
template <int NV, bool BY_K>
static void gemm_tile(const Lhs &a, const uint32_t *b, int64_t ldb, float *c, int64_t ldc, int m, int64_t kp,
                      float alpha, bool acc) {
    __m512 s[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) s[r][v] = acc && r < m ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
    const bf16 *rows[MR];
    for (int r = 0; r < MR; r++) rows[r] = BY_K ? a.a + 2 * (r < m ? r : 0) : a.a + (r < m ? r : 0) * a.lda;
    const int64_t step = BY_K ? 2 * a.lda : 2;
    for (int64_t k = 0; k < kp; k++) {
        __m512bh bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + k * ldb + 16 * v);
        for (int r = 0; r < MR; r++) {
            const __m512bh av = (__m512bh)_mm512_set1_epi32((int)pair_at(rows[r] + k * step));
            for (int v = 0; v < NV; v++) s[r][v] = _mm512_dpbf16_ps(s[r][v], av, bv[v]);
        }
    }
    for (int r = 0; r < m; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(c + r * ldc + 16 * v, acc ? s[r][v] : s[r][v] * alpha);
}

// The products a causal block's GEMM skips, per tile of rows (each all zero, or masked by the softmax): with COLS
// and KEYS the rows are queries first + i.. and what is skipped is the keys past the tile's last query, as output
// columns (scores, dP: rounded up to 16) or as pairs of the sum (P v, dS k); with QUERIES the rows are keys i.. and
// what is skipped is the pairs of query rows (queries first + 2k, first + 2k + 1) before the tile's first key
// (dS^T q, P^T dO: accumulating, so C keeps its values). Skipped products add exact zeros: the sums are the same.
enum class Skip { NONE, COLS, KEYS, QUERIES };

// c (m x n) = alpha a b (or c + a b with acc); n a multiple of 16; `skip` with `first` as above.
static void gemm(const Lhs &a, const uint32_t *b, int64_t ldb, float *c, int64_t ldc, int64_t m, int64_t n, int64_t kp,
                 float alpha, bool acc, Skip skip = Skip::NONE, int64_t first = 0) {
    for (int64_t j = 0; j < n; j += 64) {
        for (int64_t i = 0; i < m; i += MR) {
            const int rows = (int)(m - i < MR ? m - i : MR);
            const int64_t n_i = skip == Skip::COLS ? std::min(n, round16(first + i + rows)) : n;
            if (j >= n_i) continue;
            const int64_t k0 = skip == Skip::QUERIES ? std::max<int64_t>(0, i - first) / 2 : 0;
            const int64_t k1 = skip == Skip::KEYS ? std::min(kp, (first + i + rows + 1) / 2) : kp;
            const int64_t nv = (n_i - j) >= 64 ? 4 : (n_i - j) / 16;
            Lhs ai = a.rows_from(i);
            ai.a += 2 * k0 * (a.by_k ? a.lda : 1);
            const uint32_t *bj = b + k0 * ldb + j;
            float *ci = c + i * ldc + j;
            const int64_t kn = k1 - k0;
            switch (nv * 2 + a.by_k) {
                case 9: gemm_tile<4, true>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                case 8: gemm_tile<4, false>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                case 7: gemm_tile<3, true>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                case 6: gemm_tile<3, false>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                case 5: gemm_tile<2, true>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                case 4: gemm_tile<2, false>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                case 3: gemm_tile<1, true>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
                default: gemm_tile<1, false>(ai, bj, ldb, ci, ldc, rows, kn, alpha, acc); break;
            }
        }
    }
}

#endif
