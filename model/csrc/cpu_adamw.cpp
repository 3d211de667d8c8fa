// AdamW's update on CPU with the gradient clip's factor folded in: torch's fused AdamW bit for bit, one pass and one
// parallel region for all of a group's tensors (pretrain/train/cpu_adamw.py calls it, issue 23.1).
//
// torch's clip multiplies every gradient in place (a read and a write of each) before its fused AdamW reads them
// again; here the factor multiplies each gradient as it is read. The arithmetic is torch's CPU kernel
// (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, the vectorized body) as torch's build compiles it: the lerp of the
// first moment is an FMA (vec::fmadd), and the second moment's `v * beta2 + (c * g) * g` is contracted into
// fma(c * g, g, v * beta2) where the build has FMA (AVX2) and is not without it (torch's DEFAULT build, our
// x86-64-v2 one); every other product is rounded before it is added. `exact` keeps the compiler from contracting
// those (GCC contracts a * b + c into an FMA across statements by default). Tensors are whole numbers of 16 values,
// so torch's scalar tail never runs for them (the caller keeps torch's kernel for any other tensor).
#include "simd.h"
#include <immintrin.h>

template <typename V> static inline V exact(V x) { __asm__("" : "+v"(x)); return x; }  // rounded as written

static inline vf fma_(vf a, vf b, vf c) {
#if defined(__FMA__)
    vf r;
    for (int q = 0; q < W; q++) r[q] = __builtin_fmaf(a[q], b[q], c[q]);  // one vfmadd at -O3
    return r;
#else
    return exact(a * b) + c;
#endif
}

struct Adam {
    float decay, lerp, base_g, c2, beta2, bc2_sqrt, eps, neg_step, factor;
    bool scaled, decayed;

    // One vector of one tensor, in place: torch's order of operations (see the file's comment); with c_, the new
    // weight's bf16 cast too.
    inline void update(float *p_, const float *g_, float *m_, float *v_, bf16 *c_) const {
        vf p = io<float>::load(p_), g = io<float>::load(g_), m = io<float>::load(m_), v = io<float>::load(v_);
        if (scaled) g = exact(g * factor);  // clip_grads_with_norm_'s multiply
        if (decayed) p = exact(p * decay);
        // exp_avg.lerp_(g, 1 - beta1): m + w (g - m) for w < 0.5, else g + (w - 1)(g - m)
        m = fma_(vf{} + lerp, g - m, base_g != 0.0f ? g : m);
#if defined(__FMA__)
        v = fma_(exact(c2 * g), g, exact(v * beta2));
#else
        v = exact(v * beta2) + exact(exact(c2 * g) * g);
#endif
#if defined(__AVX512F__)
        const vf s = (vf)_mm512_sqrt_ps((__m512)v);
#elif defined(__AVX__)
        const vf s = (vf)_mm256_sqrt_ps((__m256)v);
#else
        const vf s = (vf)_mm_sqrt_ps((__m128)v);
#endif
        const vf denom = s / bc2_sqrt + eps;
        p = p + exact(neg_step * m) / denom;
        io<float>::store(p_, p);
        io<float>::store(m_, m);
        io<float>::store(v_, v);
        if (c_) {  // torch's vectorized fp32 -> bf16: round to nearest even, NaN to 0xFFFF
            const vu u = (vu)p, r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            const vh h = __builtin_convertvector(p == p ? r : 0xFFFFu, vh);
            memcpy(c_, &h, sizeof h);
        }
    }
};

// Each of the `count` tensors (n[t] values, a multiple of 16) updated with its own step count step[t], and its
// weight's bf16 cast written to cast[t] where that is not null; the total split across threads by whole vectors, so
// a thread's range may span tensors.
extern "C" void adamw_f32(float *const *p, const float *const *g, float *const *m, float *const *v,
                          bf16 *const *cast, const int64_t *n, const double *step, int64_t count, double lr,
                          double beta1, double beta2,
                          double weight_decay, double eps, float factor, int threads) {
    int64_t total = 0;
    for (int64_t t = 0; t < count; t++) total += n[t];
    #pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t vectors = total / W, lo = vectors * me / nt * W, hi = vectors * (me + 1) / nt * W;
        int64_t t = 0, start = 0;  // the tensor holding value lo, and its first value's index in the total
        while (t < count && start + n[t] <= lo) start += n[t++];
        for (int64_t i = lo; i < hi && t < count; t++) {
            // As torch computes them per tensor, in double, then rounded to fp32 where used.
            const double bc1 = 1 - std::pow(beta1, step[t]), bc2 = 1 - std::pow(beta2, step[t]);
            const double w = 1 - beta1;
            const bool small = std::fabs(float(w)) < 0.5f;
            const Adam a{float(1 - lr * weight_decay), small ? float(w) : float(w) - 1.0f, small ? 0.0f : 1.0f,
                         float(1 - beta2), float(beta2), float(std::sqrt(bc2)), float(eps), float(-(lr / bc1)),
                         factor, factor != 1.0f, weight_decay != 0.0};
            const int64_t end = start + n[t] < hi ? start + n[t] : hi;
            float *pt = p[t], *mt = m[t], *vt = v[t];
            const float *gt = g[t];
            bf16 *ct = cast[t];
            for (int64_t j = i - start; j < end - start; j += W)
                a.update(pt + j, gt + j, mt + j, vt + j, ct ? ct + j : nullptr);
            i = end;
            start += n[t];
        }
    }
}
