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

// The helper below is compiled twice: as a plain C++ function for the CPU kernel and
// as a __device__ function for the CUDA kernel.
#ifdef __CUDACC__
#define DDETR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DDETR_HOST_DEVICE inline
#endif

namespace ddetr {

// The four pixels around a sampling point, in the order
//   0: top-left (row0, col0)      1: top-right (row0, col0 + 1)
//   2: bottom-left (row0 + 1, col0)  3: bottom-right (row0 + 1, col0 + 1)
template <typename acc_t>
struct Corners {
  int64_t pixel[4];   // row * W + col inside the level, or -1 if the pixel is outside
  acc_t weight[4];    // bilinear weight of each pixel (0 for a pixel outside)
  acc_t dweight_dx[4];  // d weight / d x, x being the column in pixel units
  acc_t dweight_dy[4];  // d weight / d y, y being the row in pixel units
};

// Locate the normalised point (x, y) on a level of size H x W.
//
// Convention (the one of grid_sample with align_corners=False): pixel j covers
// [j, j + 1) / W, so its centre is at (j + 0.5) / W. In pixel units the point is at
// column u = x * W - 0.5 and row v = y * H - 0.5, and its neighbours are the pixels
// floor(u), floor(u) + 1 (and the same for rows). A neighbour outside the map
// reads zero ("zero padding"): we give it weight 0 and pixel index -1.
//
// The bilinear weights are the areas of the opposite rectangles:
//     w_tl = (1 - fy)(1 - fx)   w_tr = (1 - fy) fx   w_bl = fy (1 - fx)   w_br = fy fx
// with fx = u - floor(u), fy = v - floor(v). Their derivatives with respect to u and
// v are what the backward pass needs for the gradient of the sampling locations.
template <typename acc_t>
DDETR_HOST_DEVICE Corners<acc_t> bilinear_corners(acc_t x, acc_t y, int64_t H, int64_t W) {
  Corners<acc_t> c;
  for (int i = 0; i < 4; ++i) {
    c.pixel[i] = -1;
    c.weight[i] = c.dweight_dx[i] = c.dweight_dy[i] = acc_t(0);
  }
  const acc_t u = x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t v = y * static_cast<acc_t>(H) - acc_t(0.5);
  // At least one neighbour is inside only when -1 <= u < W and -1 <= v < H. Testing
  // this before converting to integers also keeps points far outside (or NaN: every
  // comparison with NaN is false) away from an overflowing float -> int conversion.
  if (!(u >= acc_t(-1) && u < static_cast<acc_t>(W) &&
        v >= acc_t(-1) && v < static_cast<acc_t>(H))) {
    return c;
  }
  const int64_t col0 = static_cast<int64_t>(floor(u));
  const int64_t row0 = static_cast<int64_t>(floor(v));
  const acc_t fx = u - static_cast<acc_t>(col0);  // in [0, 1): how far right of col0
  const acc_t fy = v - static_cast<acc_t>(row0);  // in [0, 1): how far below row0

  const int64_t rows[4] = {row0, row0, row0 + 1, row0 + 1};
  const int64_t cols[4] = {col0, col0 + 1, col0, col0 + 1};
  const acc_t wx[4] = {1 - fx, fx, 1 - fx, fx};       // horizontal factor
  const acc_t wy[4] = {1 - fy, 1 - fy, fy, fy};       // vertical factor
  const acc_t dwx[4] = {-1, 1, -1, 1};                // d wx / d fx
  const acc_t dwy[4] = {-1, -1, 1, 1};                // d wy / d fy
  for (int i = 0; i < 4; ++i) {
    // A pixel outside reads zero whatever its weight, so it keeps weight 0 and
    // derivatives 0: it moves neither the output nor the gradients.
    if (rows[i] >= 0 && rows[i] < H && cols[i] >= 0 && cols[i] < W) {
      c.pixel[i] = rows[i] * W + cols[i];
      c.weight[i] = wy[i] * wx[i];
      c.dweight_dx[i] = wy[i] * dwx[i];
      c.dweight_dy[i] = dwy[i] * wx[i];
    }
  }
  return c;
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
                         const at::Tensor* grad_output = nullptr) {
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
    TORCH_CHECK_VALUE(t.device() == value.device(), op, ": all inputs must be on one device; value is on ",
                value.device(), " but ", named.first, " is on ", t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", named.first,
                " must be contiguous (call .contiguous() on it), got strides ", t.strides(),
                " for shape ", t.sizes());
  }
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, op,
              ": spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong, op,
              ": level_start_index must be int64, got ", level_start_index.scalar_type());
  TORCH_CHECK_TYPE(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type() &&
                  (grad_output == nullptr || grad_output->scalar_type() == value.scalar_type()),
              op, ": value, sampling_locations, attention_weights (and grad_output) must share "
              "one dtype, got ", value.scalar_type(), ", ", sampling_locations.scalar_type(),
              ", ", attention_weights.scalar_type());
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

}  // namespace ddetr
