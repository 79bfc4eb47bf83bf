// Multi-scale deformable attention: what the CPU and the CUDA kernels share.
//
// The operator (Zhu et al. 2021, eq. 3), for batch n, query q and head m:
//
//     out[n, q, m, :] = sum_l sum_k  A[n, q, m, l, k] * V_l[n, :, m, :](p[n, q, m, l, k])
//
// V_l(p) reads level l of the value map at the fractional location p with bilinear
// interpolation. This header holds the two things both kernels need:
//
//   1. `bilinear_corners`: where a point lands on a level, i.e. its four neighbouring
//      pixels, their bilinear weights and the derivatives of those weights. Forward
//      and backward, CPU and CUDA, all call this one function, so they cannot
//      disagree about the sampling convention.
//   2. `check_inputs`: the argument checks every entry point runs first.
//
// Tensor layouts (all contiguous, row-major):
//   value               (N, S, M, D)         S = sum_l H_l * W_l, levels one after another
//   spatial_shapes      (L, 2) int64         (H_l, W_l)
//   level_start_index   (L,)   int64         where level l starts in S
//   sampling_locations  (N, Lq, M, L, K, 2)  (x, y) normalised to [0, 1] of the level
//   attention_weights   (N, Lq, M, L, K)
//   output              (N, Lq, M * D)       the same memory as (N, Lq, M, D)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <string>

// The helper below is compiled twice: as a plain C++ function for the CPU kernel and
// as a __device__ function for the CUDA kernel.
#ifdef __CUDACC__
#define DDETR_HOST_DEVICE __host__ __device__ __forceinline__
#define DDETR_UNROLL _Pragma("unroll")
#else
#define DDETR_HOST_DEVICE inline
#define DDETR_UNROLL
#endif

namespace ddetr {

// Where one sampling point lands on a level: its four neighbouring pixels, which of
// them lie inside the map, their bilinear weights and the derivatives of the weights.
// Corner order:
//   0: top-left (row0, col0)         1: top-right (row0, col0 + 1)
//   2: bottom-left (row0 + 1, col0)  3: bottom-right (row0 + 1, col0 + 1)
// index_t is int64_t on the CPU and int32_t on the GPU when the sizes fit.
template <typename acc_t, typename index_t>
struct Corners {
  index_t pixel[4];     // row * W + col inside the level (only meaningful where inside)
  bool inside[4];       // the pixel lies in the map; a pixel outside reads zero
  acc_t weight[4];      // bilinear weight of each pixel
  acc_t dweight_dx[4];  // d weight / d u, u being the column in pixel units
  acc_t dweight_dy[4];  // d weight / d v, v being the row in pixel units
  bool finite;          // false when x or y is NaN or +-Inf (then weights are NaN)
};

// Locate the normalised point (x, y) on a level of size H x W.
//
// Convention (the one of grid_sample with align_corners=False): pixel j covers
// [j, j + 1) / W, so its centre is at (j + 0.5) / W. In pixel units the point is at
// column u = x * W - 0.5 and row v = y * H - 0.5, and its neighbours are the pixels
// floor(u), floor(u) + 1 (and the same for rows). A neighbour outside the map reads
// zero ("zero padding").
//
// The bilinear weights are the areas of the opposite rectangles:
//     w_tl = (1 - fy)(1 - fx)   w_tr = (1 - fy) fx   w_bl = fy (1 - fx)   w_br = fy fx
// with fx = u - floor(u), fy = v - floor(v); the derivatives with respect to u and v
// are what the backward pass needs for the gradient of the sampling locations.
//
// Non-finite points, as grid_sample computes them: fx and fy are computed in floating
// point for every point, so a NaN or +-Inf coordinate gives NaN fractions (Inf - Inf),
// hence NaN weights, and no corner inside. d weight / d u depends on fy only and
// d weight / d v on fx only, so a NaN x leaves the d/du factors finite. Finite points
// far outside keep finite weights and have no corner inside. Integers are made from
// floor(u), floor(v) only when the point is near the map, so nothing overflows.
template <typename acc_t, typename index_t>
DDETR_HOST_DEVICE Corners<acc_t, index_t> bilinear_corners(acc_t x, acc_t y, index_t H,
                                                           index_t W, acc_t Hf, acc_t Wf) {
  Corners<acc_t, index_t> c;
  const acc_t u = x * Wf - acc_t(0.5);
  const acc_t v = y * Hf - acc_t(0.5);
  const acc_t col0f = std::floor(u), row0f = std::floor(v);
  const acc_t fx = u - col0f;  // in [0, 1) for a finite u: how far right of col0
  const acc_t fy = v - row0f;  // in [0, 1) for a finite v: how far below row0
  c.finite = (fx == fx) && (fy == fy);  // NaN != NaN
  // the integer corner, only where at least one neighbour can be inside (NaN fails)
  const bool near = col0f >= acc_t(-1) && col0f < Wf && row0f >= acc_t(-1) && row0f < Hf;
  const index_t col0 = near ? static_cast<index_t>(col0f) : index_t(-2);
  const index_t row0 = near ? static_cast<index_t>(row0f) : index_t(-2);
  const bool col_in[2] = {col0 >= 0 && col0 < W, col0 + 1 >= 0 && col0 + 1 < W};
  const bool row_in[2] = {row0 >= 0 && row0 < H, row0 + 1 >= 0 && row0 + 1 < H};
  const acc_t wx[2] = {acc_t(1) - fx, fx};  // horizontal factor of column 0, 1
  const acc_t wy[2] = {acc_t(1) - fy, fy};  // vertical factor of row 0, 1
DDETR_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int r = i >> 1, k = i & 1;  // row 0/1, column 0/1 of corner i
    c.inside[i] = row_in[r] && col_in[k];
    c.pixel[i] = (row0 + r) * W + (col0 + k);
    c.weight[i] = wy[r] * wx[k];
    c.dweight_dx[i] = k ? wy[r] : -wy[r];  // d wx / d fx = -1, +1
    c.dweight_dy[i] = r ? wx[k] : -wx[k];  // d wy / d fy = -1, +1
  }
  return c;
}

// A level's entry of the table as the kernels use it. A table that does not describe
// `value` must never reach a kernel (the host checks it first); this per-level guard
// makes a kernel skip a level that would still read or write outside `value`.
template <typename index_t>
DDETR_HOST_DEVICE bool level_in_bounds(index_t start, index_t H, index_t W, index_t S) {
  // H * W in 64 bits: with 32-bit offsets two sides <= S can still overflow their product
  return start >= 0 && H > 0 && W > 0 && H <= S && W <= S &&
         static_cast<int64_t>(start) <= static_cast<int64_t>(S) - static_cast<int64_t>(H) * W;
}

// ---- one sampling point exactly as the reference computes it ---------------------------
//
// The reference (grid_sample, zero padding) computes, for a point with weight a:
//     sample[d] = sum_c w_c * Vm_c[d]      Vm_c = V at corner c if inside, else 0
//     out[d]   += a * sample[d]
// and its gradients, with gs[d] = a * grad_out[d]:
//     grad_V_c[d] += w_c * gs[d]                        (corners inside only)
//     grad_a       = sum_d grad_out[d] * sample[d]
//     grad_x       = W * sum_d gs[d] * sum_c (d w_c / d u) * Vm_c[d]   (y: H, d/dv)
// The kernels' fast paths group these sums differently (a * w_c first, dot products
// per corner): identical for finite a and finite points, up to rounding. When the
// point is not finite or a is +-Inf or NaN, NaN and Inf come out of the grouping, so
// the kernels call these functions, which follow the reference's grouping term by
// term: the same entries become NaN or +-Inf as in the reference.
//
// `corner[c]` points at channel 0 of this lane's channels of corner c (any pointer
// where not inside); `count` channels, contiguous.
template <typename scalar_t, typename acc_t, typename index_t>
DDETR_HOST_DEVICE void exact_point_forward(const Corners<acc_t, index_t>& c,
                                           const scalar_t* const corner[4], acc_t a,
                                           acc_t* acc, int count) {
  DDETR_UNROLL  // count is a constant on the GPU: acc stays in registers
  for (int d = 0; d < count; ++d) {
    acc_t sample = 0;
DDETR_UNROLL
    for (int i = 0; i < 4; ++i) {
      const acc_t vm = c.inside[i] ? static_cast<acc_t>(corner[i][d]) : acc_t(0);
      sample += c.weight[i] * vm;
    }
    acc[d] += a * sample;
  }
}

// Returns (grad_a, sum_d gs*t_x, sum_d gs*t_y) over these channels through g_*; the
// caller multiplies the last two by W and H. add_grad_value(i, d, x) adds x into the
// gradient of corner i, channel d.
template <typename scalar_t, typename acc_t, typename index_t, typename AddGradValue>
DDETR_HOST_DEVICE void exact_point_backward(const Corners<acc_t, index_t>& c,
                                            const scalar_t* const corner[4],
                                            const scalar_t* grad_out, acc_t a, int count,
                                            acc_t& g_weight, acc_t& g_x, acc_t& g_y,
                                            AddGradValue add_grad_value) {
  DDETR_UNROLL
  for (int d = 0; d < count; ++d) {
    const acc_t go = static_cast<acc_t>(grad_out[d]);
    const acc_t gs = a * go;
    acc_t sample = 0, t_x = 0, t_y = 0;
DDETR_UNROLL
    for (int i = 0; i < 4; ++i) {
      const acc_t vm = c.inside[i] ? static_cast<acc_t>(corner[i][d]) : acc_t(0);
      sample += c.weight[i] * vm;
      t_x += c.dweight_dx[i] * vm;
      t_y += c.dweight_dy[i] * vm;
      if (c.inside[i]) add_grad_value(i, d, c.weight[i] * gs);
    }
    g_weight += go * sample;
    g_x += gs * t_x;
    g_y += gs * t_y;
  }
}

// Checks run by every entry point before a kernel touches memory. Errors name the
// argument, what was expected and what was given, and reach Python as TypeError (a
// wrong dtype: TORCH_CHECK_TYPE) or ValueError (anything else: TORCH_CHECK_VALUE),
// like the library's Python checks. (The Python wrapper in
// ddetr/ops/kernel.py runs the full shape checks first and makes tensors contiguous;
// these are the guard rails for a direct call of torch.ops.ddetr.*.)
inline void check_inputs(const char* op, const at::Tensor& value,
                         const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights,
                         const at::Tensor* grad_output = nullptr,
                         bool reduced_value = false, bool host_levels_ok = false) {
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"value", &value},
      {"spatial_shapes", &spatial_shapes},
      {"level_start_index", &level_start_index},
      {"sampling_locations", &sampling_locations},
      {"attention_weights", &attention_weights},
      {"grad_output", grad_output}};
  for (const auto& named : all) {
    if (named.second == nullptr) continue;
    const at::Tensor& t = *named.second;
    // the level tables may live on the host (host_levels_ok: the CUDA kernel reads them
    // there and passes them to the kernel by value)
    const bool table = &t == &spatial_shapes || &t == &level_start_index;
    TORCH_CHECK_VALUE(t.device() == value.device() || (table && host_levels_ok && t.is_cpu()),
                op, ": all inputs must be on one device", host_levels_ok ?
                " (spatial_shapes and level_start_index may also be on the CPU)" : "",
                "; value is on ", value.device(), " but ", named.first, " is on ", t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", named.first,
                " must be contiguous (call .contiguous() on it), got strides ", t.strides(),
                " for shape ", t.sizes());
  }
  TORCH_CHECK_VALUE(spatial_shapes.device() == level_start_index.device(), op,
              ": spatial_shapes and level_start_index must be on one device, got ",
              spatial_shapes.device(), " and ", level_start_index.device());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, op,
              ": spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong, op,
              ": level_start_index must be int64, got ", level_start_index.scalar_type());
  // locations and weights share one dtype, the one sums run in; value has that dtype,
  // or (CUDA only, `reduced_value`) float16/bfloat16 with float32 locations and weights.
  const auto loc_type = sampling_locations.scalar_type();
  const bool value_ok = value.scalar_type() == loc_type ||
                        (reduced_value && loc_type == at::kFloat &&
                         (value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16));
  TORCH_CHECK_TYPE(attention_weights.scalar_type() == loc_type && value_ok &&
                  (grad_output == nullptr || grad_output->scalar_type() == value.scalar_type()),
              op, ": sampling_locations and attention_weights must share one dtype, and value "
              "(and grad_output) must have it too", reduced_value ? " or be float16/bfloat16 with "
              "float32 locations and weights" : "", "; got value ", value.scalar_type(),
              ", sampling_locations ", loc_type, ", attention_weights ",
              attention_weights.scalar_type(),
              grad_output == nullptr ? std::string() : c10::str(", grad_output ",
                                                                 grad_output->scalar_type()));
  TORCH_CHECK_VALUE(value.dim() == 4, op, ": value must be (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  const int64_t N = value.size(0), M = value.size(2), L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == L, op,
              ": level_start_index must be (L,) with L = ", L, ", got shape ",
              level_start_index.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(0) == N &&
                  sampling_locations.size(2) == M && sampling_locations.size(3) == L &&
                  sampling_locations.size(5) == 2,
              op, ": sampling_locations must be (N, Lq, M, L, K, 2) with N=", N, ", M=", M,
              ", L=", L, ", got shape ", sampling_locations.sizes());
  const int64_t Lq = sampling_locations.size(1), K = sampling_locations.size(4);
  TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef({N, Lq, M, L, K}), op,
              ": attention_weights must be (N, Lq, M, L, K) = (", N, ", ", Lq, ", ", M, ", ", L,
              ", ", K, "), got shape ", attention_weights.sizes());
  if (grad_output != nullptr) {
    TORCH_CHECK_VALUE(grad_output->sizes() == at::IntArrayRef({N, Lq, M * value.size(3)}), op,
                ": grad_output must be (N, Lq, M*D) = (", N, ", ", Lq, ", ", M * value.size(3),
                "), got shape ", grad_output->sizes());
  }
}


// The level tables, read on the host, against value's S: positive sizes, each level
// starting where the previous one ends, the last one ending at S. Run by every entry
// point before a kernel starts (a wrong table would read and write out of bounds).
inline void check_levels(const char* op, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, int64_t S) {
  TORCH_CHECK_VALUE(spatial_shapes.is_cpu() && level_start_index.is_cpu(), op,
              ": check_levels reads host tables");  // callers copy them first
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    TORCH_CHECK_VALUE(H > 0 && W > 0 && H <= S && W <= S, op,
                ": spatial_shapes must hold positive (H, W) that fit in S=", S, ", level ", l,
                " is (", H, ", ", W, ")");
    TORCH_CHECK_VALUE(starts[l] == total, op, ": level_start_index[", l, "] must be ", total,
                " (the sum of H*W of the levels before), got ", starts[l]);
    TORCH_CHECK_VALUE(H * W <= S - total, op, ": value has S=", S,
                " keys but spatial_shapes sum to more (level ", l, " ends at ", total + H * W, ")");
    total += H * W;
  }
  TORCH_CHECK_VALUE(total == S, op, ": value has S=", S, " keys but spatial_shapes sum to ",
              total);
}

}  // namespace ddetr
