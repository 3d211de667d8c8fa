// Fused CPU kernels for the eager bf16/fp32 training step (issue 23.1); model/cpu_kernels.py builds and calls them.
//
// Each kernel does in one pass over a row what torch's eager form does in several (each op its own pass and, for
// bf16, a conversion copy around fp32 arithmetic): the loss's softmax cross-entropy and logit gradient, SwiGLU
// forward and backward, and the rotary embedding. The arithmetic is the eager form's (fp32, rounded once to the
// output dtype, round to nearest even); exp is a Cephes-style polynomial (within 2 ulp of expf) where torch uses
// Sleef's, so a bf16 output can differ from the eager one by one bf16 ulp where the fp32 value sits on a rounding
// boundary (~1 in 10^5 values). Written with GCC vector extensions, so one source compiles to each host's widest
// vectors (-march=native); row lengths are multiples of 16 (the Python side checks and otherwise keeps torch's ops).
#include "simd.h"

// The largest of a row's first nv values (full of them a whole number of vectors).
template <typename T>
static float row_max(const T *x, int64_t full, int64_t nv) {
    float top = -INFINITY;
    if (full) {
        vf m = io<T>::load(x);
        for (int64_t j = W; j < full; j += W) { vf v = io<T>::load(x + j); m = v > m ? v : m; }
        top = hmax(m);
    }
    for (int64_t j = full; j < nv; j++) top = fmaxf(top, io<T>::scalar(x[j]));
    return top;
}

// Softmax cross-entropy of each row of `logits` (n rows of stride ld, the first nv of V columns predictable, V a
// multiple of 16), written to ce (0 where !valid); with want_grad each row is overwritten by softmax - onehot(target)
// (softmax alone where !valid: the caller masks those rows), columns >= nv by 0. ce = max + log(sum exp(x - max)) -
// x[target]: no probability that could underflow enters it.
template <typename T>
static void ce_grad(T *logits, int64_t n, int64_t V, int64_t ld, int64_t nv, const int64_t *target,
                    const uint8_t *valid, int want_grad, float *ce, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *e = static_cast<float *>(aligned_alloc(64, V * sizeof(float)));  // a row's exps, in L2
        // Each thread's rows in one run, so the exp pass over a row (compute bound, in cache) also takes the next
        // row's max: its first read from memory overlaps the exps (config S, 1 thread: 37 against 41 ms).
        const int nt = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t first = n * me / nt, last = n * (me + 1) / nt, full = nv / W * W;
        float top = first < last ? row_max(logits + first * ld, full, nv) : 0.0f;
        for (int64_t i = first; i < last; i++) {
            T *x = logits + i * ld;
            const T *next = i + 1 < last ? x + ld : x;  // the last row reads itself again: the same max, unused
            // Two sums and maxes: one chain each would hold the loop to an add's latency per vector.
            vf s = {0}, s1 = {0}, m = io<T>::load(next), m1 = m;
            int64_t j = 0;
            for (; j + 2 * W <= full; j += 2 * W) {
                vf v = exp_nonpos(io<T>::load(x + j) - top), v1 = exp_nonpos(io<T>::load(x + j + W) - top);
                vf w = io<T>::load(next + j), w1 = io<T>::load(next + j + W);
                memcpy(e + j, &v, sizeof v);
                memcpy(e + j + W, &v1, sizeof v1);
                s += v;
                s1 += v1;
                m = w > m ? w : m;
                m1 = w1 > m1 ? w1 : m1;
            }
            for (; j < full; j += W) {
                vf v = exp_nonpos(io<T>::load(x + j) - top), w = io<T>::load(next + j);
                memcpy(e + j, &v, sizeof v);
                s += v;
                m = w > m ? w : m;
            }
            float sum = hsum(s + s1), next_top = full ? hmax(m > m1 ? m : m1) : -INFINITY;
            for (int64_t j = full; j < nv; j++) {
                sum += (e[j] = expf(io<T>::scalar(x[j]) - top));
                next_top = fmaxf(next_top, io<T>::scalar(next[j]));
            }
            const int64_t t = target[i];
            ce[i] = valid[i] ? (top + logf(sum)) - io<T>::scalar(x[t]) : 0.0f;
            top = next_top;
            if (!want_grad) continue;
            const float inv = 1.0f / sum;
            for (int64_t j = 0; j < full; j += W) { vf v; memcpy(&v, e + j, sizeof v); io<T>::store(x + j, v * inv); }
            for (int64_t j = full; j < nv; j++) x[j] = io<T>::from(e[j] * inv);
            for (int64_t j = nv; j < V; j++) x[j] = io<T>::from(0.0f);
            if (valid[i]) x[t] = io<T>::from(e[t] * inv - 1.0f);
        }
        free(e);
    }
}

// SwiGLU of rows [gate | up] (2f wide, f a multiple of 16): out = round(silu(gate)) * up, as torch's
// F.silu(gate) * up rounds the activation to T before the product.
template <typename T>
static void swiglu_fwd(const T *gate_up, T *out, int64_t rows, int64_t f, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const T *g = gate_up + i * 2 * f, *u = g + f;
        T *o = out + i * f;
        for (int64_t j = 0; j < f; j += W) {
            vf x = io<T>::load(g + j);
            io<T>::store(o + j, io<T>::round(x / (1.0f + exp_(-x))) * io<T>::load(u + j));
        }
    }
}

// Its backward into one (rows, 2f) gradient: d_up = dh * round(silu(gate)); d_gate = silu'(gate) * round(dh * up),
// silu' = s (1 + x (1 - s)) with s = sigmoid(x), as torch's silu_backward.
template <typename T>
static void swiglu_bwd(const T *gate_up, const T *dh, T *grad, int64_t rows, int64_t f, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const T *g = gate_up + i * 2 * f, *u = g + f, *d = dh + i * f;
        T *dg = grad + i * 2 * f, *du = dg + f;
        for (int64_t j = 0; j < f; j += W) {
            vf x = io<T>::load(g + j), dy = io<T>::load(d + j);
            vf s = 1.0f / (1.0f + exp_(-x));
            io<T>::store(du + j, dy * io<T>::round(x * s));
            io<T>::store(dg + j, io<T>::round(dy * io<T>::load(u + j)) * (s * (1.0f + x * (1.0f - s))));
        }
    }
}

// Rotate-half RoPE of x (n0 x n1 x T rows of dim 2h, strides s0, s1, st in elements, each row contiguous) by the
// fp32 angles' cos/sin (T, h), times `sign` (+1 forward, -1 its backward), into out (the same rows, strides
// os0, os1, ost).
template <typename T>
static void rotate(const T *x, T *out, int64_t n0, int64_t n1, int64_t t, int64_t h, int64_t s0, int64_t s1,
                   int64_t st, int64_t os0, int64_t os1, int64_t ost, const float *cos, const float *sin, float sign,
                   int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t a = 0; a < n0; a++)
        for (int64_t b = 0; b < n1; b++)
            for (int64_t p = 0; p < t; p++) {
                const T *x1 = x + a * s0 + b * s1 + p * st, *x2 = x1 + h;
                T *o1 = out + a * os0 + b * os1 + p * ost, *o2 = o1 + h;
                for (int64_t j = 0; j < h; j += W) {
                    vf c = io<float>::load(cos + p * h + j), s = io<float>::load(sin + p * h + j) * sign;
                    vf v1 = io<T>::load(x1 + j), v2 = io<T>::load(x2 + j);
                    io<T>::store(o1 + j, v1 * c - v2 * s);
                    io<T>::store(o2 + j, v2 * c + v1 * s);
                }
            }
}

// RMSNorm of rows of x (d a multiple of 16): r = 1/sqrt(mean(x^2) + eps) in fp32 (saved for the backward), y = n w
// with n = x r and w rounded to X first, as torch's ops in X's dtype do (model/fused.py _RMSNorm), written as Y.
template <typename X, typename Y>
static void rms_norm_fwd(const X *x, const float *w, Y *y, float *rstd, int64_t rows, int64_t d, float eps,
                         int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const X *xi = x + i * d;
        vf acc = {0};
        for (int64_t j = 0; j < d; j += W) { vf v = io<X>::load(xi + j); acc += v * v; }
        const float r = 1.0f / sqrtf(hsum(acc) / d + eps);
        rstd[i] = r;
        for (int64_t j = 0; j < d; j += W)
            io<Y>::store(y + i * d + j, io<X>::round(io<X>::round(io<X>::load(xi + j) * r) * io<X>::round(io<float>::load(w + j))));
    }
}

// Its backward, with g = dy in fp32: dx = r g w - x r^3 (g x . w) / d per row, in X; dw = sum over rows of g x r,
// each thread's rows summed into its own row of dw_parts (threads x d fp32, zeroed by the caller, summed by it).
template <typename X, typename Y>
static void rms_norm_bwd(const X *x, const float *w, const Y *dy, const float *rstd, X *dx, float *dw_parts,
                         int64_t rows, int64_t d, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *dw = dw_parts + (int64_t)omp_get_thread_num() * d;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const X *xi = x + i * d;
            const Y *gi = dy + i * d;
            const float r = rstd[i];
            vf acc = {0};
            for (int64_t j = 0; j < d; j += W) {
                vf gx = io<Y>::load(gi + j) * io<X>::load(xi + j);
                acc += gx * io<float>::load(w + j);
                io<float>::store(dw + j, io<float>::load(dw + j) + gx * r);
            }
            const float c = -hsum(acc) * r * r * r / d;
            for (int64_t j = 0; j < d; j += W)
                io<X>::store(dx + i * d + j, io<Y>::load(gi + j) * io<float>::load(w + j) * r + io<X>::load(xi + j) * c);
        }
    }
}

// out = x + y for fp32 x and bf16 y (n a multiple of 16): a block's residual add of its branch's output, in one pass
// (torch's mixed-dtype add first converts y into an fp32 temporary: two passes and a third of the traffic more).
extern "C" void add_f32_bf16(const float *x, const bf16 *y, float *out, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i += W) io<float>::store(out + i, io<float>::load(x + i) + io<bf16>::load(y + i));
}

// The sum of squares of `count` arrays (xs[t], ns[t] values each), in fp64: the gradient clip's norm
// (pretrain/train/grad_clip.py), whose fp32 sum in torch drifts with the array's size; each square is exact in fp64.
// The arrays are cut into blocks of SQ_BLOCK values, each summed alone and then added in array and block order: the
// same bits whatever the thread count.
constexpr int64_t SQ_BLOCK = 1 << 16;
typedef double vd __attribute__((vector_size(8 * W)));
template <typename T>
static double sum_squares(const T *const *xs, const int64_t *ns, int64_t count, int threads) {
    int64_t blocks = 0;
    for (int64_t t = 0; t < count; t++) blocks += (ns[t] + SQ_BLOCK - 1) / SQ_BLOCK;
    double *part = static_cast<double *>(malloc((blocks ? blocks : 1) * sizeof(double)));
    #pragma omp parallel num_threads(threads)
    {
        int64_t t = 0, first = 0;  // the array of this thread's block b, and that array's first block
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            while (b >= first + (ns[t] + SQ_BLOCK - 1) / SQ_BLOCK) first += (ns[t++] + SQ_BLOCK - 1) / SQ_BLOCK;
            const T *x = xs[t] + (b - first) * SQ_BLOCK;
            const int64_t left = ns[t] - (b - first) * SQ_BLOCK, n = left < SQ_BLOCK ? left : SQ_BLOCK;
            vd a = {0}, a1 = {0}, a2 = {0}, a3 = {0};  // four chains: fewer would hold the loop to an add's latency
            int64_t j = 0;
            for (; j + 4 * W <= n; j += 4 * W) {
                vd v = __builtin_convertvector(io<T>::load(x + j), vd);
                vd v1 = __builtin_convertvector(io<T>::load(x + j + W), vd);
                vd v2 = __builtin_convertvector(io<T>::load(x + j + 2 * W), vd);
                vd v3 = __builtin_convertvector(io<T>::load(x + j + 3 * W), vd);
                a += v * v;
                a1 += v1 * v1;
                a2 += v2 * v2;
                a3 += v3 * v3;
            }
            a += a1 + (a2 + a3);
            double s = 0;
            for (int q = 0; q < W; q++) s += a[q];
            for (; j < n; j++) { const double v = io<T>::scalar(x[j]); s += v * v; }
            part[b] = s;
        }
    }
    double total = 0;
    for (int64_t b = 0; b < blocks; b++) total += part[b];
    free(part);
    return total;
}

#if defined(__AVX512F__)
// dst (n x d fp32, rows contiguous) = src^T * scale, or (dst + src^T) * scale with acc, for src (d x n bf16, row
// stride lds; n and d multiples of 16): the LM head's weight gradient, whose GEMM writes it transposed where the
// library has no GEMM of its own for it (model/loss_eager.py cpu_weight_grad), in 16 x 16 tiles transposed in
// registers, scaled by the loss's
// backward in the same pass (the sum rounded, then the product: a separate scaling pass's values). torch's strided
// copy took ~2x as long.
extern "C" void transpose_to_f32_bf16(const bf16 *src, int64_t lds, float *dst, int64_t n, int64_t d, int acc,
                                      float scale, int threads) {
    const __m512 s = _mm512_set1_ps(scale);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t v0 = 0; v0 < n; v0 += 16)
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = (__m512)io<bf16>::load(src + (c0 + i) * lds + v0);
            store_transposed16(r, dst + v0 * d + c0, d, acc, s);
        }
}
#endif

#define NORM(X, Y, NAME)                                                                                          \
    extern "C" void rms_norm_fwd_##NAME(const X *x, const float *w, Y *y, float *r, int64_t n, int64_t d, float e, \
                                        int th) { rms_norm_fwd(x, w, y, r, n, d, e, th); }                        \
    extern "C" void rms_norm_bwd_##NAME(const X *x, const float *w, const Y *dy, const float *r, X *dx, float *dw, \
                                        int64_t n, int64_t d, int th) { rms_norm_bwd(x, w, dy, r, dx, dw, n, d, th); }
NORM(float, float, f32_f32)
NORM(float, bf16, f32_bf16)
NORM(bf16, bf16, bf16_bf16)

#define BOTH(X) X(float, f32) X(bf16, bf16)
#define EXPORT(T, NAME)                                                                                          \
    extern "C" double sum_squares_##NAME(const T *const *x, const int64_t *n, int64_t c, int th) {           \
        return sum_squares(x, n, c, th); }                                                                    \
    extern "C" void ce_grad_##NAME(T *l, int64_t n, int64_t V, int64_t ld, int64_t nv, const int64_t *t,        \
                                   const uint8_t *v, int g, float *ce, int th) { ce_grad(l, n, V, ld, nv, t, v, g, ce, th); } \
    extern "C" void swiglu_fwd_##NAME(const T *gu, T *o, int64_t r, int64_t f, int th) { swiglu_fwd(gu, o, r, f, th); } \
    extern "C" void swiglu_bwd_##NAME(const T *gu, const T *d, T *g, int64_t r, int64_t f, int th) {           \
        swiglu_bwd(gu, d, g, r, f, th); }                                                                      \
    extern "C" void rotate_##NAME(const T *x, T *o, int64_t n0, int64_t n1, int64_t t, int64_t h, int64_t s0,  \
                                  int64_t s1, int64_t st, int64_t o0, int64_t o1, int64_t ot, const float *c,  \
                                  const float *s, float sign, int th) {                                        \
        rotate(x, o, n0, n1, t, h, s0, s1, st, o0, o1, ot, c, s, sign, th); }
BOTH(EXPORT)
