// Multi-scale deformable attention on the CPU: forward and backward.
//
// Plain loops, one sampling point at a time, reading the D channels of each of the
// four neighbouring pixels straight from `value`: no im2col buffer, no intermediate
// (N, Lq, M, L, K, D) tensor of samples, which is what makes the grid_sample
// reference slow and memory hungry. The D-long inner loops are contiguous in memory,
// so the compiler vectorises them (-O3).
//
// Parallelism (at::parallel_for, i.e. PyTorch's own OpenMP thread pool):
//   forward:  over (batch, query, head) triples; every triple writes its own D outputs.
//   backward: over (batch, head) pairs, each running through all queries. The
//             gradient of `value` is a scatter: many queries add into the same pixel,
//             and splitting queries across threads would make them race. A (batch,
//             head) pair owns its slice value[n, :, m, :] and so its slice of
//             grad_value: no atomics, no locks, and the sum order (hence the result)
//             is the same on every run. The gradients of the locations and weights
//             belong to one (n, q, m) each and need no care.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"

namespace ddetr {
namespace {

// Sizes of one call, read once from the tensors.
struct Sizes {
  int64_t N, S, M, D, Lq, L, K;
};

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// The NaN/Inf path (ms_deform_attn.h: exact_point_*), out of line: it is rare, and kept
// apart it leaves the hot loops below as the compiler would make them without it. Its
// arguments are passed by value and its results returned: a reference to a local of
// the hot loop would make the compiler keep that local in memory on every point.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void exact_forward(const Corners<acc_t, int64_t> c,
                                             const scalar_t* level_value, int64_t MD, acc_t a,
                                             acc_t* acc, int64_t D) {
  const scalar_t* corner[4];
  for (int j = 0; j < 4; ++j) corner[j] = level_value + c.pixel[j] * MD;
  exact_point_forward(c, corner, a, acc, static_cast<int>(D));
}

template <typename acc_t>
struct PointGrads {
  acc_t weight, x, y;  // sums over d of the reference's terms (ms_deform_attn.h)
};

template <typename scalar_t, typename acc_t>
__attribute__((noinline)) PointGrads<acc_t> exact_backward(
    const Corners<acc_t, int64_t> c, const scalar_t* value, scalar_t* grad_value,
    int64_t level_offset, int64_t MD, const scalar_t* go, acc_t a, int64_t D) {
  const scalar_t* corner[4];
  scalar_t* grad_corner[4];
  for (int j = 0; j < 4; ++j) {
    corner[j] = value + level_offset + c.pixel[j] * MD;
    grad_corner[j] = grad_value + level_offset + c.pixel[j] * MD;
  }
  PointGrads<acc_t> g{0, 0, 0};
  exact_point_backward(c, corner, go, a, static_cast<int>(D), g.weight, g.x, g.y,
                       [&](int j, int d, acc_t x) {
                         grad_corner[j][d] += static_cast<scalar_t>(x);
                       });
  return g;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* output,
                    const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t points = s.L * s.K;  // sampling points per (n, q, m)
  // A grain of work: enough triples that handing them to a thread is worth it.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, points * s.D));
  at::parallel_for(0, s.N * s.Lq * s.M, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.D);  // the D channels of one output, summed in acc_t
    for (int64_t i = begin; i < end; ++i) {
      // i enumerates (n, q, m) in the row-major order of the (N, Lq, M) axes.
      const int64_t m = i % s.M;
      const int64_t n = i / (s.M * s.Lq);
      const scalar_t* loc = locations + i * points * 2;  // (L, K, 2) of this triple
      const scalar_t* w = weights + i * points;          // (L, K)
      std::fill(acc.begin(), acc.end(), acc_t(0));
      bool special = false;  // a point with a NaN/Inf location or weight was skipped
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        if (!level_in_bounds<int64_t>(starts[l], H, W, s.S)) continue;  // never, once checked
        const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
        // value[n, starts[l] + pixel, m, :] is at level_value + pixel * M * D
        const scalar_t* level_value = value + ((n * s.S + starts[l]) * s.M + m) * s.D;
        for (int64_t k = 0; k < s.K; ++k) {
          const int64_t p = l * s.K + k;
          const auto c = bilinear_corners<acc_t, int64_t>(loc[2 * p], loc[2 * p + 1], H, W, Hf, Wf);
          const acc_t a = w[p];
          if (!(c.finite && a - a == acc_t(0))) {  // NaN/Inf point or weight: see below
            special = true;
            continue;
          }
          for (int corner = 0; corner < 4; ++corner) {
            if (!c.inside[corner]) continue;  // outside the map: reads zero
            const acc_t aw = a * c.weight[corner];
            const scalar_t* v = level_value + c.pixel[corner] * s.M * s.D;
            acc_t* sum = acc.data();
#pragma omp simd  // the D channels are independent: vectorise without alias checks
            for (int64_t d = 0; d < s.D; ++d) sum[d] += aw * static_cast<acc_t>(v[d]);
          }
        }
      }
      // The skipped points, the reference's way (ms_deform_attn.h): after the others, so
      // that the hot loop above has no call in it (same NaN/Inf entries, other rounding).
      if (special) {
        for (int64_t p = 0; p < points; ++p) {
          const int64_t l = p / s.K, H = shapes[2 * l], W = shapes[2 * l + 1];
          if (!level_in_bounds<int64_t>(starts[l], H, W, s.S)) continue;
          const auto c = bilinear_corners<acc_t, int64_t>(loc[2 * p], loc[2 * p + 1], H, W,
                                                          acc_t(H), acc_t(W));
          if (c.finite && w[p] - w[p] == acc_t(0)) continue;
          exact_forward(c, value + ((n * s.S + starts[l]) * s.M + m) * s.D, s.M * s.D,
                        static_cast<acc_t>(w[p]), acc.data(), s.D);
        }
      }
      scalar_t* out = output + i * s.D;  // output[n, q, m*D : (m+1)*D]
      for (int64_t d = 0; d < s.D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// The gradients, from out = sum_p a_p * sum_c w_c(u_p, v_p) * V[pixel_c]:
//   d out / d V[pixel_c]  = a_p * w_c                       -> scatter into grad_value
//   d out / d a_p         = sum_c w_c * V[pixel_c]          (the bilinear sample)
//   d out / d x_p         = a_p * W * sum_c (d w_c / d u) * V[pixel_c]   since u = x W - 1/2
//   d out / d y_p         = a_p * H * sum_c (d w_c / d v) * V[pixel_c]
// each contracted with grad_output over the D channels.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                     scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights,
                     const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t points = s.L * s.K;
  at::parallel_for(0, s.N * s.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / s.M, m = nm % s.M;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t i = (n * s.Lq + q) * s.M + m;  // the (n, q, m) triple, as in forward
        const scalar_t* go = grad_output + i * s.D;
        const scalar_t* loc = locations + i * points * 2;
        const scalar_t* w = weights + i * points;
        for (int64_t l = 0; l < s.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          if (!level_in_bounds<int64_t>(starts[l], H, W, s.S)) {  // never, once checked
            for (int64_t p = l * s.K; p < (l + 1) * s.K; ++p) {
              grad_weights[i * points + p] = 0;
              grad_locations[(i * points + p) * 2] = grad_locations[(i * points + p) * 2 + 1] = 0;
            }
            continue;
          }
          const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
          const int64_t level_offset = ((n * s.S + starts[l]) * s.M + m) * s.D;
          for (int64_t k = 0; k < s.K; ++k) {
            const int64_t p = l * s.K + k;
            const auto c = bilinear_corners<acc_t, int64_t>(loc[2 * p], loc[2 * p + 1], H, W, Hf, Wf);
            const acc_t a = w[p];
            acc_t g_weight = 0, g_x = 0, g_y = 0;
            if (!(c.finite && a - a == acc_t(0))) {  // NaN/Inf point or weight: as the reference
              const auto g = exact_backward(c, value, grad_value, level_offset, s.M * s.D, go,
                                            a, s.D);
              grad_weights[i * points + p] = static_cast<scalar_t>(g.weight);
              grad_locations[(i * points + p) * 2] = static_cast<scalar_t>(Wf * g.x);
              grad_locations[(i * points + p) * 2 + 1] = static_cast<scalar_t>(Hf * g.y);
              continue;
            }
            for (int corner = 0; corner < 4; ++corner) {
              if (!c.inside[corner]) continue;
              const int64_t offset = level_offset + c.pixel[corner] * s.M * s.D;
              const scalar_t* v = value + offset;
              scalar_t* gv = grad_value + offset;
              const acc_t aw = a * c.weight[corner];
              acc_t dot = 0;  // grad_output . V[pixel]
              // A sum over d is a loop-carried dependency that the compiler may not
              // reorder on its own (float addition is not associative); this pragma
              // allows it, so the loop runs in SIMD lanes. grad_value, value and
              // grad_output are distinct tensors, so gv does not alias v or go.
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < s.D; ++d) {
                dot += static_cast<acc_t>(go[d]) * static_cast<acc_t>(v[d]);
                gv[d] += static_cast<scalar_t>(aw * static_cast<acc_t>(go[d]));
              }
              g_weight += c.weight[corner] * dot;
              g_x += c.dweight_dx[corner] * dot;
              g_y += c.dweight_dy[corner] * dot;
            }
            grad_weights[i * points + p] = static_cast<scalar_t>(g_weight);
            grad_locations[(i * points + p) * 2] = static_cast<scalar_t>(a * Wf * g_x);
            grad_locations[(i * points + p) * 2 + 1] = static_cast<scalar_t>(a * Hf * g_y);
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const char* op = "ddetr::ms_deform_attn (CPU)";
  check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights);
  check_levels(op, spatial_shapes, level_start_index, value.size(1));
  const Sizes s = sizes_of(value, sampling_locations);
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                             level_start_index.data_ptr<int64_t>(),
                             sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                             s);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op = "ddetr::ms_deform_attn_backward (CPU)";
  check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights, &grad_output);
  check_levels(op, spatial_shapes, level_start_index, value.size(1));
  const Sizes s = sizes_of(value, sampling_locations);
  auto grad_value = at::zeros_like(value);  // a scatter target: must start at zero
  auto grad_locations = at::empty_like(sampling_locations);  // every entry is written
  auto grad_weights = at::empty_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
        spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>(), s);
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace ddetr
