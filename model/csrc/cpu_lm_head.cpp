// The LM head's weight gradient on CPUs with a bf16 dot product (AVX-512-BF16): dW = (acc + g^T h) * scale in fp32
// (V x d), from the loss's logit gradient g (rows x V bf16, row-major: as the loss kernel writes it in place) and the
// final hidden states h (rows x d bf16), rows that are not `valid` left out (model/loss_eager.py).
//
// Why not torch.mm: oneDNN's bf16 GEMM multiplies fastest with g^T contiguous (vocab x rows), which the step does not
// have; both forms it can call on a row-major g (g^T as a view, or h^T g) repack the whole 206 MB gradient inside
// the GEMM (config S, Zen 5: 1.1-1.2x the contiguous form's time), and h^T g then needs a pass turning its d x V
// bf16 output into the fp32 V x d gradient. Here each task takes 64 vocab columns: packs them into pairs of rows
// (the B operand vdpbf16ps reads) in a buffer that stays in the core's L2, multiplies every row of h^T by it (h
// packed once per call), and transposes the fp32 block into the gradient in registers, scaled: g read once from
// memory, the gradient written once, and its sums fp32 throughout (h^T g's rounded them to bf16). bench/README.md,
// sixteenth pass.
#include "bf16_gemm.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)

constexpr int64_t PANEL = 64;  // vocab columns per task: gemm's widest tile

// hp[c][k] = pair (h[2k][c], h[2k+1][c]), 0 for a row that is not valid and for an odd last row's missing partner:
// h^T as the A operand, a row of pairs per column of h. By columns of 32 (a 64-byte line of a row of h) at a time.
static void pack_h(const bf16 *h, int64_t ldh, const uint8_t *valid, int64_t rows, int64_t d, uint32_t *hp,
                   int threads) {
    const int64_t kp = (rows + 1) / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c0 = 0; c0 < d; c0 += 32)
        for (int64_t k = 0; k < kp; k++) {
            const bf16 *r0 = h + 2 * k * ldh, *r1 = r0 + ldh;
            const bool v0 = valid[2 * k], v1 = 2 * k + 1 < rows && valid[2 * k + 1];
            for (int64_t c = c0; c < std::min(c0 + 32, d); c++)
                hp[c * kp + k] = (v0 ? (uint32_t)r0[c] : 0u) | (v1 ? (uint32_t)r1[c] : 0u) << 16;
        }
}

// ldg, ldh: row strides of g and h in elements; V and d multiples of 16; acc: add into out's values (else write).
extern "C" void lm_head_dw_bf16(const bf16 *g, int64_t ldg, const bf16 *h, int64_t ldh, const uint8_t *valid,
                                float *out, int64_t rows, int64_t V, int64_t d, int acc, float scale, int threads) {
    static const bf16 zeros[PANEL] = {};  // the partner of an odd last row
    const int64_t kp = (rows + 1) / 2;
    uint32_t *hp = static_cast<uint32_t *>(malloc(d * kp * 4 + 64));
    pack_h(h, ldh, valid, rows, d, hp, threads);
    const __m512 s = _mm512_set1_ps(scale);
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *pb = static_cast<uint32_t *>(aligned_alloc(64, kp * PANEL * 4 + 64));  // B: (kp, 64) pairs
        float *cb = static_cast<float *>(aligned_alloc(64, d * PANEL * 4));             // (d, 64) fp32 sums
        #pragma omp for schedule(static)
        for (int64_t v0 = 0; v0 < V; v0 += PANEL) {
            const int64_t n = std::min(PANEL, V - v0);
            for (int64_t k = 0; k < kp; k++) {
                const bf16 *r0 = g + 2 * k * ldg + v0, *r1 = 2 * k + 1 < rows ? r0 + ldg : zeros;
                for (int64_t j = 0; j < n; j += 16) {
                    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r0 + j)));
                    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r1 + j)));
                    _mm512_store_si512(pb + k * PANEL + j, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
                }
            }
            gemm({reinterpret_cast<const bf16 *>(hp), 2 * kp, false}, pb, PANEL, cb, PANEL, d, n, kp, 1.0f, false);
            for (int64_t c0 = 0; c0 < d; c0 += 16)
                for (int64_t j = 0; j < n; j += 16) {
                    __m512 r[16];
                    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(cb + (c0 + i) * PANEL + j);
                    store_transposed16(r, out + (v0 + j) * d + c0, d, acc, s);
                }
        }
        free(pb);
        free(cb);
    }
    free(hp);
}

#endif
