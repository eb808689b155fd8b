// The attention path of a decoder layer over the paged KV cache.
//
// Activations: one fused q|k|v row per token, `row_stride` elements apart:
// `heads` query heads, then `kv_heads` key heads, then `kv_heads` value heads,
// each `head_dim` wide.
//
// Cache, per layer: keys then values, each [blocks][kv_heads][block_size]
// [head_dim], so one head's positions within a block are contiguous.
#include "common.cuh"

// Rotary embedding in place on the first `rotated` heads of every row (the
// query and key heads), row r at position positions[r]. `table` is f32
// [positions][2][half]: cosines then sines. Pairs are (i, i + half), or
// (2i, 2i + 1) when `interleaved` (GGUF's permuted weights).
template <typename T>
__device__ void rope_rows(T *__restrict__ x, const uint32_t *__restrict__ positions,
                          const float *__restrict__ table, int rows, int rotated, int head_dim,
                          int row_stride, int interleaved) {
    const int half = head_dim / 2;
    const size_t n = (size_t)rows * rotated * half;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < n;
         t += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(t % half);
        const size_t rh = t / half;
        const int head = (int)(rh % rotated);
        const size_t row = rh / rotated;
        const float *cs = table + (size_t)positions[row] * 2 * half;
        const float c = cs[i], s = cs[half + i];
        T *h = x + row * row_stride + (size_t)head * head_dim;
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = to_f32(h[a]), x1 = to_f32(h[b]);
        h[a] = from_f32<T>(x0 * c - x1 * s);
        h[b] = from_f32<T>(x1 * c + x0 * s);
    }
}

#define ROPE(T, NAME)                                                                          \
    extern "C" __global__ void rope_##NAME(T *x, const uint32_t *positions, const float *table, \
                                           int rows, int rotated, int head_dim,                 \
                                           int row_stride, int interleaved) {                   \
        rope_rows<T>(x, positions, table, rows, rotated, head_dim, row_stride, interleaved);    \
    }
KINDLING_FOR_EACH_TYPE(ROPE)

// Writes every row's key and value heads into its cache slot; slots[r] is
// block * block_size + position-in-block.
template <typename T>
__device__ void cache_write_rows(T *__restrict__ cache, const T *__restrict__ qkv,
                                 const uint32_t *__restrict__ slots, int rows, int heads,
                                 int kv_heads, int head_dim, int row_stride, int block_size,
                                 size_t values_offset) {
    const size_t n = (size_t)rows * kv_heads * head_dim;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < n;
         t += (size_t)gridDim.x * blockDim.x) {
        const int d = (int)(t % head_dim);
        const int kh = (int)((t / head_dim) % kv_heads);
        const size_t row = t / ((size_t)head_dim * kv_heads);
        const uint32_t slot = slots[row];
        const size_t block = slot / block_size, in_block = slot % block_size;
        const size_t at = ((block * kv_heads + kh) * block_size + in_block) * head_dim + d;
        const T *src = qkv + row * row_stride;
        cache[at] = src[(size_t)(heads + kh) * head_dim + d];
        cache[values_offset + at] = src[(size_t)(heads + kv_heads + kh) * head_dim + d];
    }
}

#define CACHE_WRITE(T, NAME)                                                                   \
    extern "C" __global__ void cache_write_##NAME(                                             \
        T *cache, const T *qkv, const uint32_t *slots, int rows, int heads, int kv_heads,       \
        int head_dim, int row_stride, int block_size, unsigned long long values_offset) {       \
        cache_write_rows<T>(cache, qkv, slots, rows, heads, kv_heads, head_dim, row_stride,     \
                            block_size, (size_t)values_offset);                                 \
    }
KINDLING_FOR_EACH_TYPE(CACHE_WRITE)

// Attention for one (row, query head) per block, reading keys and values
// straight from the cache blocks. `meta` is u32 [rows][meta_stride]: the
// positions the row sees (causal: its own position + 1), then its block
// table. Each warp takes every WARPS-th position with an online softmax
// (running max, sum and weighted values); the warps' partial results are
// merged at the end. A lane holds head_dim / 32 elements (head_dim <= 256).
#define WARPS 8
#define MAX_PER_LANE 8

template <typename T>
__device__ void paged_attention_rows(T *__restrict__ out, const T *__restrict__ qkv,
                                     const T *__restrict__ cache,
                                     const uint32_t *__restrict__ meta, int heads, int kv_heads,
                                     int head_dim, int row_stride, int block_size,
                                     int meta_stride, size_t values_offset, float scale) {
    __shared__ float part_m[WARPS], part_l[WARPS];
    __shared__ float part_acc[WARPS][MAX_PER_LANE * 32];
    const int head = blockIdx.x, row = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kh = head / (heads / kv_heads);
    const uint32_t *m = meta + (size_t)row * meta_stride;
    const int seen = (int)m[0];
    const uint32_t *table = m + 1;
    const T *q = qkv + (size_t)row * row_stride + (size_t)head * head_dim;

    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        qv[j] = d < head_dim ? to_f32(q[d]) * scale : 0.f;
        acc[j] = 0.f;
    }
    float run_max = -INFINITY, run_sum = 0.f;
    for (int p = warp; p < seen; p += WARPS) {
        const size_t block = table[p / block_size];
        const size_t at = ((block * kv_heads + kh) * block_size + p % block_size) * head_dim;
        const T *k = cache + at;
        const T *v = cache + values_offset + at;
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) dot += qv[j] * to_f32(k[d]);
        }
        const float score = warp_sum(dot);
        const float next_max = fmaxf(run_max, score);
        const float fix = __expf(run_max - next_max);  // 0 on the first position
        const float w = __expf(score - next_max);
        run_sum = run_sum * fix + w;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) acc[j] = acc[j] * fix + w * to_f32(v[d]);
        }
        run_max = next_max;
    }
    if (lane == 0) {
        part_m[warp] = run_max;
        part_l[warp] = run_sum;
    }
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j) part_acc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float top = -INFINITY;
    for (int w = 0; w < WARPS; ++w) top = fmaxf(top, part_m[w]);
    float total = 0.f;
    for (int w = 0; w < WARPS; ++w)
        if (part_m[w] > -INFINITY) total += part_l[w] * __expf(part_m[w] - top);
    T *o = out + ((size_t)row * heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float y = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (part_m[w] > -INFINITY) y += part_acc[w][d] * __expf(part_m[w] - top);
        o[d] = from_f32<T>(total > 0.f ? y / total : 0.f);
    }
}

#define PAGED_ATTENTION(T, NAME)                                                               \
    extern "C" __global__ void paged_attention_##NAME(                                         \
        T *out, const T *qkv, const T *cache, const uint32_t *meta, int heads, int kv_heads,    \
        int head_dim, int row_stride, int block_size, int meta_stride,                          \
        unsigned long long values_offset, float scale) {                                        \
        paged_attention_rows<T>(out, qkv, cache, meta, heads, kv_heads, head_dim, row_stride,   \
                                block_size, meta_stride, (size_t)values_offset, scale);         \
    }
KINDLING_FOR_EACH_TYPE(PAGED_ATTENTION)
