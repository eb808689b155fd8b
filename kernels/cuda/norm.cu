// RMSNorm, optionally fused with the residual add that precedes it in every
// transformer block:
//   sum  = x + residual          (rounded to T, as an unfused add would be)
//   norm = sum / rms(sum) * weight
// One block per row. `out` holds `sum` rows then `norm` rows when there is a
// residual, only `norm` rows otherwise.
#include "common.cuh"

template <typename T>
__device__ void rms_norm_rows(const T *__restrict__ x, const T *__restrict__ residual,
                              const T *__restrict__ weight, T *__restrict__ out, int rows,
                              int hidden, int x_stride, int res_stride, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T *xr = x + (size_t)row * x_stride;
    T *sum_out = residual ? out + (size_t)row * hidden : nullptr;
    T *norm_out = out + (size_t)(residual ? rows + row : row) * hidden;
    float sq = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (residual) {
            const T s = from_f32<T>(v + to_f32(residual[(size_t)row * res_stride + i]));
            sum_out[i] = s;
            v = to_f32(s);
        }
        sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        // Each thread reads back only what it wrote above.
        const float v = residual ? to_f32(sum_out[i]) : to_f32(xr[i]);
        norm_out[i] = from_f32<T>(v * inv * to_f32(weight[i]));
    }
}

#define RMS_NORM(T, NAME)                                                                      \
    extern "C" __global__ void rms_norm_##NAME(const T *x, const T *residual, const T *weight,  \
                                               T *out, int rows, int hidden, int x_stride,      \
                                               int res_stride, float eps) {                     \
        rms_norm_rows<T>(x, residual, weight, out, rows, hidden, x_stride, res_stride, eps);    \
    }
KINDLING_FOR_EACH_TYPE(RMS_NORM)

// GroupNorm over [batch, channels, plane] activations, optionally followed
// by SiLU (each Stable Diffusion resnet starts with the pair). One block per
// (image, group); a group's channels are contiguous planes. Mean first, then
// the variance from deviations (two passes keep f32 accurate on large
// groups), then scale, shift and activation.
template <typename T>
__device__ void group_norm_groups(const T *__restrict__ x, const T *__restrict__ gamma,
                                  const T *__restrict__ beta, T *__restrict__ out, int channels,
                                  int plane, int groups, float eps, int apply_silu) {
    __shared__ float scratch[32];
    const int unit = blockIdx.x;  // image * groups + group
    const int g = unit % groups;
    const int per = channels / groups;
    const size_t len = (size_t)per * plane;
    const T *src = x + (size_t)unit * len;
    T *dst = out + (size_t)unit * len;
    float s = 0.f;
    for (size_t i = threadIdx.x; i < len; i += blockDim.x) s += to_f32(src[i]);
    const float mean = block_sum(s, scratch) / (float)len;
    float d2 = 0.f;
    for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
        const float d = to_f32(src[i]) - mean;
        d2 += d * d;
    }
    const float inv = rsqrtf(block_sum(d2, scratch) / (float)len + eps);
    for (size_t i = threadIdx.x; i < len; i += blockDim.x) {
        const int ch = g * per + (int)(i / plane);
        float y = (to_f32(src[i]) - mean) * inv * to_f32(gamma[ch]) + to_f32(beta[ch]);
        if (apply_silu) y = silu(y);
        dst[i] = from_f32<T>(y);
    }
}

#define GROUP_NORM(T, NAME)                                                                    \
    extern "C" __global__ void group_norm_##NAME(const T *x, const T *gamma, const T *beta,     \
                                                 T *out, int channels, int plane, int groups,   \
                                                 float eps, int apply_silu) {                   \
        group_norm_groups<T>(x, gamma, beta, out, channels, plane, groups, eps, apply_silu);    \
    }
KINDLING_FOR_EACH_TYPE(GROUP_NORM)
