// Shared by the CPU kernels' sources (model/csrc/*.cpp, built into one library by model/cpu_kernels.py): the
// vector type at the target's width, bf16 <-> fp32 conversion as torch rounds, and exp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>  // scalef; with AVX512_BF16 the native bf16 conversion (round to nearest even) and dot product
#endif

// Lanes per vector: the target's widest (a wider generic vector is expanded piecewise, ~10x slower); row lengths are
// multiples of 16, so of each.
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));
typedef uint16_t bf16;

// fp32 -> the bits of its nearest bf16 (ties to even, NaN kept NaN), in the high half of each lane.
static inline vu bf16_bits(vf f) {
    vu u = (vu)f;
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (u | 0x400000u) & 0xFFFF0000u : r;
}

static inline float hsum(vf v) { float s = 0; for (int q = 0; q < W; q++) s += v[q]; return s; }
static inline float hmax(vf v) { float m = v[0]; for (int q = 1; q < W; q++) m = v[q] > m ? v[q] : m; return m; }

template <typename T> struct io;
template <> struct io<float> {
    static vf load(const float *p) { vf f; memcpy(&f, p, sizeof f); return f; }
    static void store(float *p, vf f) { memcpy(p, &f, sizeof f); }
    static vf round(vf f) { return f; }  // the value an fp32 tensor would hold
    static float scalar(float x) { return x; }
    static float from(float f) { return f; }
};
template <> struct io<bf16> {
    static vf load(const bf16 *p) {
#if defined(__AVX512F__)  // one widening load: GCC builds the generic conversion from halves (~20 % of an exp pass)
        return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
        vh h; memcpy(&h, p, sizeof h); return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
    }
    static void store(bf16 *p, vf f) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
        __m256bh h = _mm512_cvtneps_pbh((__m512)f); memcpy(p, &h, sizeof h);
#else
        vh h = __builtin_convertvector(bf16_bits(f) >> 16, vh); memcpy(p, &h, sizeof h);
#endif
    }
    static vf round(vf f) {  // the value a bf16 tensor would hold
#if defined(__AVX512BF16__) && defined(__AVX512F__)
        return (vf)_mm512_cvtpbh_ps(_mm512_cvtneps_pbh((__m512)f));
#else
        return (vf)bf16_bits(f);
#endif
    }
    static float scalar(bf16 x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
    static bf16 from(float f) {  // bf16_bits for one value, in scalar registers
        uint32_t u;
        memcpy(&u, &f, 4);
        return (bf16)(((u & 0x7FFFFFFFu) > 0x7F800000u ? u | 0x400000u : u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
};

// exp(x) for x <= 88.7 (any softmax's x - max <= 0; -inf included: a masked score): range reduction by ln 2 (split
// in two for exactness), degree-6 polynomial, times 2^n (AVX-512's scalef, one instruction; elsewhere from the
// exponent bits). 0 below -87.3, where expf's result is a denormal or 0: no denormal ever enters the arithmetic after
// it (each costs ~100 cycles on some cores), and a softmax weight there is below fp32's ulp of 1.
static inline vf exp_nonpos(vf x_) {
#if defined(__AVX512F__)
    const vf x = x_;
    const vf n = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), 0);  // to nearest, one instruction
#else
    const vf x = x_ < -87.3f ? -87.3f : x_;
    const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
#endif
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + r + 1.0f;
#if defined(__AVX512F__)
    return x_ < -87.3f ? 0.0f : (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return x_ < -87.3f ? 0.0f : p * (vf)e;
#endif
}

// exp(x) for any x: capped at 88.7 first (exp(88.7) is below fp32's largest number).
static inline vf exp_(vf x) { return exp_nonpos(x > 88.7f ? 88.7f : x); }

#if defined(__AVX512F__)
// The 16 x 16 tile of 32-bit words r (row i: r[i]) transposed in registers: unpacks, then 128-bit lane shuffles.
// Column c of the tile ends in r[column16(c)] (the unpacks leave columns 1 and 2 of each four swapped).
static inline int column16(int c) { return c ^ ((c ^ c >> 1) & 1) * 3; }
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int j = 0; j < 2; j++) {
            const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + 2 + j]);
            r[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[i + 2 + j] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + 4 + j], 0x88);
            t[i + 4 + j] = _mm512_shuffle_f32x4(r[i + j], r[i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    }
}

// The fp32 tile r (row i: r[i]) stored transposed: column c into dst + c * ld, times s, or with acc (dst's values +
// the column) * s, the sum rounded, then the product. The LM head's fp32 weight gradient from sums laid out d x V
// (cpu_kernels.cpp transpose_to_f32, cpu_lm_head.cpp).
static inline void store_transposed16(__m512 r[16], float *dst, int64_t ld, bool acc, __m512 s) {
    transpose16(r);
    for (int c = 0; c < 16; c++) {
        float *o = dst + c * ld;
        const __m512 col = r[column16(c)];
        _mm512_storeu_ps(o, _mm512_mul_ps(acc ? _mm512_add_ps(_mm512_loadu_ps(o), col) : col, s));
    }
}
#endif
