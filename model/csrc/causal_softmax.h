// The causal softmax and its backward over a block of query rows, shared by the bf16 and fp32 attention kernels
// (cpu_attention.cpp, cpu_attention_f32.cpp): fp32 scores in place, the probabilities / score gradients also stored
// in the type the next GEMM reads (bf16 rounded, or fp32 where that is the scores' own buffer).
#pragma once

#include <algorithm>

#include "simd.h"

static inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// The columns of row r of a block whose first query is `first` that its GEMMs compute (Skip::COLS): the row's keys
// (0..first + r) rounded up to 16, at most `keys`. Past them a row's P and dS are zero.
static inline int64_t row_cols(int64_t first, int64_t r, int64_t keys) {
    return std::min(keys, round16(first + r + 1));
}

static inline vi lane_index() {
    vi iota;
    for (int q = 0; q < W; q++) iota[q] = q;
    return iota;
}

// Rows [first, first + rows) of the causal softmax of fp32 scores s (row stride lds, row r sees keys 0..first+r,
// computed up to row_cols), in place; each row also stored into p (row stride ldp, zero past the row's last key up
// to `keys`; p may be s itself).
template <typename P>
static void causal_softmax(float *s, int64_t lds, P *p, int64_t ldp, int64_t first, int64_t rows, int64_t keys) {
    const vi iota = lane_index();
    const bool apart = static_cast<const void *>(p) != static_cast<const void *>(s);  // else each value stored once
    for (int64_t r = 0; r < rows; r++) {
        float *x = s + r * lds;
        const int32_t n = (int32_t)(first + r + 1);
        const int64_t cols = row_cols(first, r, keys);
        vf m = vf{} - INFINITY;  // not x's first lanes: past the row's last key they are masked keys' scores
        for (int64_t j = 0; j < cols; j += W) {
            vf v = io<float>::load(x + j);
            v = (iota + (int32_t)j) < n ? v : -INFINITY;
            io<float>::store(x + j, v);
            m = v > m ? v : m;
        }
        const float top = hmax(m);
        vf acc = {0};
        for (int64_t j = 0; j < cols; j += W) {  // exp of -inf is 0: the masked keys' weights
            vf e = exp_nonpos(io<float>::load(x + j) - top);
            io<float>::store(x + j, e);
            acc += e;
        }
        const float inv = 1.0f / hsum(acc);
        for (int64_t j = 0; j < cols; j += W) {
            vf pr = io<float>::load(x + j) * inv;
            io<float>::store(x + j, pr);
            if (apart) io<P>::store(p + r * ldp + j, pr);
        }
        for (int64_t j = cols; j < keys; j += W) io<P>::store(p + r * ldp + j, vf{0});
    }
}

// dS = P (dP - sum(P dP)) per row, the softmax's backward, for rows [first, first + rows) of P (s) and dP (dp), both
// row stride lds: into ds (row stride ldd, zero past the row's computed columns up to `keys`; ds may be dp itself).
template <typename P>
static void causal_softmax_backward(const float *s, const float *dp, int64_t lds, P *ds, int64_t ldd, int64_t first,
                                    int64_t rows, int64_t keys) {
    for (int64_t r = 0; r < rows; r++) {
        const float *pr = s + r * lds, *dr = dp + r * lds;
        const int64_t cols = row_cols(first, r, keys);
        vf acc = {0};
        for (int64_t j = 0; j < cols; j += W) acc += io<float>::load(pr + j) * io<float>::load(dr + j);
        const float dot = hsum(acc);
        for (int64_t j = 0; j < cols; j += W)
            io<P>::store(ds + r * ldd + j, io<float>::load(pr + j) * (io<float>::load(dr + j) - dot));
        for (int64_t j = cols; j < keys; j += W) io<P>::store(ds + r * ldd + j, vf{0});
    }
}
