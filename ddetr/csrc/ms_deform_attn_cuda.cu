// Multi-scale deformable attention on the GPU: forward and backward.
//
// Work split: ONE THREAD PER OUTPUT CHANNEL, i.e. per (n, q, m, d).
//   * The D threads of one (n, q, m) are neighbours in a warp. They read the same
//     sampling location and weight (one broadcast load) and then the D contiguous
//     channels of the same pixel: value[n, s, m, 0..D) is one coalesced read.
//   * Each thread sums its own channel over the L*K points in a register and writes
//     it once: the output write is coalesced too, and needs no synchronisation.
//   * There are N*Lq*M*D threads: 2*20k*8*32 = 10M for the paper's encoder, plenty
//     to fill any GPU, so nothing is gained by giving a thread more work.
// The alternative, one thread per (n, q, m) looping over D, reads D-strided memory
// across a warp and leaves 32x fewer threads; one block per query wastes threads when
// D is small. The per-channel split is the simplest one that is also fast.
//
// The backward uses the same split. Per thread and sampling point:
//   grad_value[pixel, d]  += a * w_corner * grad_out[d]     scatter: atomicAdd, since
//                                                          other queries hit the same pixel
//   grad_weight, grad_x, grad_y: sums over the D channels of the group, so the D
//   threads add their shares. When D divides 32 the group lies inside one warp and
//   sums with warp shuffles; its first thread then adds the total with one atomic. For
//   other D every thread adds its share atomically (correct, just slower).
//
// Precision: float16 and bfloat16 are read and written in their own type, but every
// sum runs in float32 (at::opmath_type), and the gradients are accumulated in float32
// buffers (atomics on half values would round at every addition), cast at the end.
// float64 computes in float64.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace ddetr {
namespace {

constexpr int kThreads = 256;  // threads per block; a multiple of the warp size (32)

struct Sizes {
  int64_t N, S, M, D, Lq, L, K;
};

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights,
                               scalar_t* __restrict__ output, const Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.N * s.Lq * s.M * s.D) return;
  // idx enumerates (n, q, m, d) in row-major order: i is the (n, q, m) triple.
  const int64_t d = idx % s.D;
  const int64_t i = idx / s.D;
  const int64_t m = i % s.M;
  const int64_t n = i / (s.M * s.Lq);
  const int64_t points = s.L * s.K;
  const scalar_t* loc = locations + i * points * 2;
  const scalar_t* w = weights + i * points;

  acc_t acc = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    // channel d of value[n, starts[l] + pixel, m, :] is at level_value[pixel * M * D]
    const scalar_t* level_value = value + ((n * s.S + starts[l]) * s.M + m) * s.D + d;
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t p = l * s.K + k;
      const auto c = bilinear_corners<acc_t>(static_cast<acc_t>(loc[2 * p]),
                                             static_cast<acc_t>(loc[2 * p + 1]), H, W);
      const acc_t a = static_cast<acc_t>(w[p]);
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (c.pixel[corner] < 0) continue;  // outside the map: reads zero
        acc += a * c.weight[corner] *
               static_cast<acc_t>(level_value[c.pixel[corner] * s.M * s.D]);
      }
    }
  }
  output[idx] = static_cast<scalar_t>(acc);
}

// Sum x over aligned groups of `width` lanes of a warp (width a power of two <= 32);
// the first lane of each group gets the total. Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset, width);
  }
  return x;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights,
                                acc_t* __restrict__ grad_value,      // zero-initialised
                                acc_t* __restrict__ grad_locations,  // zero-initialised
                                acc_t* __restrict__ grad_weights,    // zero-initialised
                                const Sizes s, const bool reduce_in_warp) {
  const int64_t total = s.N * s.Lq * s.M * s.D;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // With the warp reduction every lane must reach every shuffle, so threads past the
  // end do not return: they redo the last thread's reads and contribute zero.
  const bool active = idx < total;
  if (!active && !reduce_in_warp) return;
  const int64_t t = active ? idx : total - 1;
  const int64_t d = t % s.D;
  const int64_t i = t / s.D;
  const int64_t m = i % s.M;
  const int64_t n = i / (s.M * s.Lq);
  const int64_t points = s.L * s.K;
  const scalar_t* loc = locations + i * points * 2;
  const scalar_t* w = weights + i * points;
  const acc_t go = active ? static_cast<acc_t>(grad_output[t]) : acc_t(0);
  const bool group_leader = active && (idx % s.D == 0);

  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t level_offset = ((n * s.S + starts[l]) * s.M + m) * s.D + d;
    for (int64_t k = 0; k < s.K; ++k) {
      const int64_t p = l * s.K + k;
      const auto c = bilinear_corners<acc_t>(static_cast<acc_t>(loc[2 * p]),
                                             static_cast<acc_t>(loc[2 * p + 1]), H, W);
      const acc_t a = static_cast<acc_t>(w[p]);
      // This channel's share of grad_output . V[pixel], weighted three ways.
      acc_t g_weight = 0, g_x = 0, g_y = 0;
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (c.pixel[corner] < 0) continue;
        const int64_t offset = level_offset + c.pixel[corner] * s.M * s.D;
        const acc_t dot = go * static_cast<acc_t>(value[offset]);
        g_weight += c.weight[corner] * dot;
        g_x += c.dweight_dx[corner] * dot;
        g_y += c.dweight_dy[corner] * dot;
        if (active) atomicAdd(grad_value + offset, a * c.weight[corner] * go);
      }
      g_x *= a * static_cast<acc_t>(W);  // d u / d x = W
      g_y *= a * static_cast<acc_t>(H);  // d v / d y = H
      acc_t* gl = grad_locations + (i * points + p) * 2;
      if (reduce_in_warp) {
        g_weight = group_sum(g_weight, static_cast<int>(s.D));
        g_x = group_sum(g_x, static_cast<int>(s.D));
        g_y = group_sum(g_y, static_cast<int>(s.D));
        if (group_leader) {  // the group's one writer; atomics as the buffers are shared
          atomicAdd(grad_weights + i * points + p, g_weight);
          atomicAdd(gl, g_x);
          atomicAdd(gl + 1, g_y);
        }
      } else if (active) {
        atomicAdd(grad_weights + i * points + p, g_weight);
        atomicAdd(gl, g_x);
        atomicAdd(gl + 1, g_y);
      }
    }
  }
}

void check_cuda_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights,
                       const at::Tensor* grad_output = nullptr) {
  TORCH_CHECK_VALUE(value.is_cuda(), op, ": value must be a CUDA tensor, got device ", value.device());
  check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights, grad_output);
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  check_cuda_inputs("ddetr::ms_deform_attn (CUDA)", value, spatial_shapes, level_start_index,
                    sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes s = sizes_of(value, sampling_locations);
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  const int64_t threads = s.N * s.Lq * s.M * s.D;
  if (threads == 0) return output.zero_();  // empty batch, no queries or D = 0
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
        forward_kernel<scalar_t><<<blocks_for(threads), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
            attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_cuda_inputs("ddetr::ms_deform_attn_backward (CUDA)", value, spatial_shapes,
                    level_start_index, sampling_locations, attention_weights, &grad_output);
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes s = sizes_of(value, sampling_locations);
  // float32 accumulators for half types (float64 for float64); atomics add into them
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_locations = at::zeros(sampling_locations.sizes(), value.options().dtype(acc_type));
  auto grad_weights = at::zeros(attention_weights.sizes(), value.options().dtype(acc_type));
  const int64_t threads = s.N * s.Lq * s.M * s.D;
  if (threads > 0) {
    const bool reduce_in_warp = s.D <= 32 && 32 % s.D == 0;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, acc_t><<<blocks_for(threads), kThreads, 0, stream>>>(
              grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
              spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
              sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
              grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
              grad_weights.data_ptr<acc_t>(), s, reduce_in_warp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  const auto dtype = value.scalar_type();  // .to() is a no-op when the types agree
  return {grad_value.to(dtype), grad_locations.to(dtype), grad_weights.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace ddetr
