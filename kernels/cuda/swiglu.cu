// SwiGLU's gate: out = silu(gate) * up, over [rows, cols] with any row
// strides, so gate and up may be the two halves of one fused projection.
#include "common.cuh"

template <typename T>
__device__ void silu_mul_rows(const T *__restrict__ gate, const T *__restrict__ up,
                              T *__restrict__ out, int rows, int cols, int gate_stride,
                              int up_stride) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / cols, c = i % cols;
        const float g = to_f32(gate[r * gate_stride + c]);
        const float u = to_f32(up[r * up_stride + c]);
        out[i] = from_f32<T>(silu(g) * u);
    }
}

#define SILU_MUL(T, NAME)                                                                      \
    extern "C" __global__ void silu_mul_##NAME(const T *gate, const T *up, T *out, int rows,    \
                                               int cols, int gate_stride, int up_stride) {      \
        silu_mul_rows<T>(gate, up, out, rows, cols, gate_stride, up_stride);                    \
    }
KINDLING_FOR_EACH_TYPE(SILU_MUL)
