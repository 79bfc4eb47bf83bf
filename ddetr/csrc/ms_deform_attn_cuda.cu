// Multi-scale deformable attention on the GPU: forward and backward.
//
// Work split: a GROUP of `lanes` neighbouring threads per (n, q, m) triple, each thread
// owning a VECTOR of VEC channels (8 float32 channels = two 128-bit loads, 8 half or
// bfloat16 channels = one 128-bit load):
//
//     thread t:  triple i = t / lanes,  lane = t % lanes,
//                channels [c, c + VEC) with c = (r * lanes + lane) * VEC, r = 0, 1, ...
//
// lanes is the largest power of two <= min(D / VEC, 32): D = 32 float32 channels make
// groups of 4 threads, a warp serves 8 triples. Per sampling point a thread does the
// bilinear setup once (where the point lands, which corners are inside, 4 weights)
// and then reads VEC channels of each corner: the setup is shared by VEC channels
// instead of repeated per channel (the first version of this kernel ran one thread per
// channel, so every channel paid the whole setup: about 211 SASS instructions per
// point and channel, against 20 or fewer here; benchmarks/kernel_cost.md).
//
// What else makes the inner loop short:
//   * L and K are template parameters for the common cases (L=4, K=4: the encoder and
//     decoder of the paper; L=1, K=4: single scale), so the point loops unroll and the
//     level sizes are immediate offsets into the kernel's parameters; other L, K use the
//     generic instantiation (L_ = K_ = 0: read at run time).
//   * The level table is a small struct passed BY VALUE (kernel parameter space, a
//     constant bank): no loads from global memory, no 64-bit start offsets.
//   * 32-bit offsets (index_t = int32_t) whenever every tensor has < 2^31 elements;
//     int64_t otherwise (the generic instantiation).
//   * The locations and weights of a triple are read with 128-bit loads (K = 4: one
//     load for the 4 weights of a level, two for the 8 coordinates) at the same
//     addresses in every lane of the group: within a warp the memory system serves
//     identical addresses with one request, so they cross the memory system once per
//     triple. (Shuffling them from one lane to the others would cost more instructions
//     than the loads it replaces: 3 shuffles per point against 0.75 loads.)
//   * value may be float16/bfloat16 while locations and weights are float32; every sum
//     runs in float32 (float64 for float64 inputs).
//
// Backward, per point: the dot products grad_out . V[corner] over the thread's channels,
// then the group sums them with xor-shuffles (any D that is a multiple of the group:
// the group always lies inside one warp), and the group's first lane writes the point's
// gradients of the weight and the location with plain stores: one writer per entry, no
// atomics, no zero-fill. grad_value is a scatter (other queries hit the same pixels), so
// it is added with atomics into a float32 buffer (float64 for float64): on sm_90 as
// float4 vectors (atomicAdd(float4*): one instruction per 4 channels), elsewhere one
// float at a time. (half2/bfloat162 atomics on the value's own dtype would round at
// every addition: the float32 buffer keeps the sums exact to float32.) Atomics make the
// order of additions, hence the last bits of grad_value, vary between runs: the entry
// point tells torch.use_deterministic_algorithms so (alertNotDeterministic).
//
// NaN and Inf: see ms_deform_attn.h. The fast path (finite point and finite weight) and
// the exact path (anything else, the reference's grouping term by term) give the same
// NaN/Inf entries as the reference.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "ms_deform_attn.h"

namespace ddetr {
namespace {

constexpr int kThreads = 256;   // threads per block, a multiple of the warp size
constexpr int kMaxLevels = 16;  // levels the by-value table holds

// The level table, passed to the kernels by value.
template <typename index_t>
struct Levels {
  int L;
  index_t H[kMaxLevels], W[kMaxLevels], start[kMaxLevels];
};

template <typename index_t>
struct Sizes {
  index_t triples;  // N * Lq * M
  index_t S, M, D, Lq;
  int K;
  int lanes_log2;   // log2 of the threads per triple
};

// ---- channel vectors: VEC channels of scalar_t <-> VEC acc_t in registers --------------

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_channels(const scalar_t* p, acc_t (&out)[VEC]) {
  if constexpr (VEC == 8 && std::is_same<scalar_t, float>::value) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else if constexpr (VEC == 8 && std::is_same<scalar_t, at::Half>::value) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(h[j]);
      out[2 * j] = f.x; out[2 * j + 1] = f.y;
    }
  } else if constexpr (VEC == 8 && std::is_same<scalar_t, at::BFloat16>::value) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      out[2 * j] = f.x; out[2 * j + 1] = f.y;
    }
  } else {
    static_assert(VEC == 1, "vector loads are written for 8 float/half/bfloat16 channels");
    out[0] = static_cast<acc_t>(p[0]);
  }
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_channels(scalar_t* p, const acc_t (&in)[VEC]) {
  if constexpr (VEC == 8 && std::is_same<scalar_t, float>::value) {
    reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
  } else if constexpr (VEC == 8 && std::is_same<scalar_t, at::Half>::value) {
    uint4 raw;
    __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(in[2 * j], in[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else if constexpr (VEC == 8 && std::is_same<scalar_t, at::BFloat16>::value) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(in[2 * j], in[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    static_assert(VEC == 1, "vector stores are written for 8 float/half/bfloat16 channels");
    p[0] = static_cast<scalar_t>(in[0]);
  }
}

// grad_value[p .. p + VEC) += scale * g[0 .. VEC): float4 atomics where the arch has
// them (sm_90), one float at a time elsewhere.
template <int VEC, typename acc_t>
__device__ __forceinline__ void atomic_add_channels(acc_t* p, acc_t scale, const acc_t (&g)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool vector = VEC % 4 == 0 && std::is_same<acc_t, float>::value;
#else
  constexpr bool vector = false;
#endif
  if constexpr (vector) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + j),
                make_float4(scale * g[j], scale * g[j + 1], scale * g[j + 2], scale * g[j + 3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, scale * g[j]);
  }
}

// The K weights and 2K coordinates of one level of one triple. K = 4 float32: one 128-bit
// load for the weights and two for the coordinates (the entry point checks alignment).
template <int K_, typename acc_t>
struct LevelPoints {
  static constexpr int K = K_ > 0 ? K_ : 1;
  acc_t a[K], xy[2 * K];
  __device__ __forceinline__ void load(const acc_t* w, const acc_t* loc, int k0) {
    if constexpr (K_ == 4 && std::is_same<acc_t, float>::value) {
      const float4 wa = *reinterpret_cast<const float4*>(w);
      const float4 l0 = reinterpret_cast<const float4*>(loc)[0];
      const float4 l1 = reinterpret_cast<const float4*>(loc)[1];
      a[0] = wa.x; a[1] = wa.y; a[2] = wa.z; a[3] = wa.w;
      xy[0] = l0.x; xy[1] = l0.y; xy[2] = l0.z; xy[3] = l0.w;
      xy[4] = l1.x; xy[5] = l1.y; xy[6] = l1.z; xy[7] = l1.w;
    } else {  // one point (the run-time K loop), or compile-time K without vector loads
#pragma unroll
      for (int k = 0; k < K; ++k) {
        a[k] = w[k0 + k];
        xy[2 * k] = loc[2 * (k0 + k)];
        xy[2 * k + 1] = loc[2 * (k0 + k) + 1];
      }
    }
  }
};

// A sampling point is "exceptional" when its location or its weight is NaN or +-Inf.
// The hot loops skip such points and note that there were some; a second, cold pass
// then adds them the reference's way (exact_point_*, ms_deform_attn.h). The sums run in
// another order than the reference's, which changes rounding only: the NaN and Inf
// entries are the same. Keeping the rare path out of the hot loop keeps that loop short.
template <typename acc_t>
__device__ __forceinline__ bool exceptional(const acc_t a, bool finite_point) {
  return !(finite_point && a - a == acc_t(0));  // a - a is NaN for NaN and +-Inf
}

// ---- forward -------------------------------------------------------------------------------

template <typename scalar_t, int VEC, int L_, int K_, typename index_t>
__global__ void __launch_bounds__(kThreads, 2)
forward_kernel(const scalar_t* __restrict__ value,
               const at::opmath_type<scalar_t>* __restrict__ locations,
               const at::opmath_type<scalar_t>* __restrict__ weights,
               scalar_t* __restrict__ output, const Levels<index_t> lv, const Sizes<index_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t t = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  const index_t i = t >> s.lanes_log2;  // the (n, q, m) triple, row-major over (N, Lq, M)
  if (i >= s.triples) return;
  const int lane = static_cast<int>(t & ((index_t(1) << s.lanes_log2) - 1));
  const int L = L_ > 0 ? L_ : lv.L;  // L_ > 0: a constant, the level loop unrolls
  const int K = K_ > 0 ? K_ : s.K;
  const index_t m = i % s.M, n = i / (s.Lq * s.M);
  const index_t MD = s.M * s.D;  // distance between two pixels in value
  const acc_t* loc = locations + i * (L * K * 2);
  const acc_t* w = weights + i * (L * K);
  const index_t step = static_cast<index_t>(VEC) << s.lanes_log2;
  for (index_t c = lane * VEC; c < s.D; c += step) {  // usually one round
    const scalar_t* head = value + (n * s.S * s.M + m) * s.D + c;  // value[n, 0, m, c]
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0;
    unsigned special = 0;  // an exceptional point was skipped (an int: predicates are few)
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
      if (!level_in_bounds<index_t>(start, H, W, s.S)) continue;  // never, once checked
      const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
      const scalar_t* level = head + start * MD;
      constexpr int KK = LevelPoints<K_, acc_t>::K;  // points per pass: K_, or 1
#pragma unroll 1  // one point per iteration at run-time K
      for (int k0 = 0; k0 < K; k0 += KK) {           // one pass for compile-time K
        LevelPoints<K_, acc_t> pts;
        pts.load(w + l * K, loc + l * K * 2, k0);
#pragma unroll
        for (int k = 0; k < KK; ++k) {
          const acc_t a = pts.a[k];
          const auto cr = bilinear_corners<acc_t, index_t>(pts.xy[2 * k], pts.xy[2 * k + 1],
                                                           H, W, Hf, Wf);
          if (exceptional(a, cr.finite)) {
            special = 1;
            continue;
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (!cr.inside[j]) continue;  // outside the map: reads zero
            acc_t v[VEC];
            load_channels<VEC>(level + cr.pixel[j] * MD, v);
            const acc_t aw = a * cr.weight[j];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += aw * v[e];
          }
        }
      }
    }
    if (special != 0) {  // the cold pass
#pragma unroll 1
      for (int p = 0; p < L * K; ++p) {
        const int l = p / K;
        const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
        if (!level_in_bounds<index_t>(start, H, W, s.S)) continue;
        const auto cr = bilinear_corners<acc_t, index_t>(loc[2 * p], loc[2 * p + 1], H, W,
                                                         static_cast<acc_t>(H),
                                                         static_cast<acc_t>(W));
        if (!exceptional(w[p], cr.finite)) continue;
        const scalar_t* corner[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) corner[j] = head + start * MD + cr.pixel[j] * MD;
        exact_point_forward(cr, corner, w[p], acc, VEC);
      }
    }
    store_channels<VEC>(output + i * s.D + c, acc);
  }
}

// ---- backward ------------------------------------------------------------------------------

// Sum x over the group (lanes a power of two <= 32, aligned inside the warp): every
// lane of the group gets the total. `mask`: the lanes that take part (whole groups).
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int lanes, unsigned mask) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset);
  return x;
}

template <typename scalar_t, int VEC, int L_, int K_, typename index_t>
__global__ void __launch_bounds__(kThreads, 2)
backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                const at::opmath_type<scalar_t>* __restrict__ locations,
                const at::opmath_type<scalar_t>* __restrict__ weights,
                at::opmath_type<scalar_t>* __restrict__ grad_value,  // zero-filled, atomics
                at::opmath_type<scalar_t>* __restrict__ grad_locations,  // written once
                at::opmath_type<scalar_t>* __restrict__ grad_weights,    // written once
                const Levels<index_t> lv, const Sizes<index_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t t = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  const index_t i = t >> s.lanes_log2;
  // The group sums with shuffles among the threads that have a triple; a whole group
  // has one or not, so a lane's xor partner is always in the mask.
  const unsigned mask = __ballot_sync(0xffffffffu, i < s.triples);
  if (i >= s.triples) return;
  const int lanes = 1 << s.lanes_log2;
  const int lane = static_cast<int>(t & (lanes - 1));
  const int L = L_ > 0 ? L_ : lv.L;
  const int K = K_ > 0 ? K_ : s.K;
  const index_t m = i % s.M, n = i / (s.Lq * s.M);
  const index_t MD = s.M * s.D;
  const acc_t* loc = locations + i * (L * K * 2);
  const acc_t* w = weights + i * (L * K);
  acc_t* g_loc = grad_locations + i * (L * K * 2);
  acc_t* g_w = grad_weights + i * (L * K);
  const index_t step = static_cast<index_t>(VEC) << s.lanes_log2;
  // every lane of a group runs the same number of rounds (the shuffles need them all);
  // a lane past D takes part with zeros
  const index_t rounds = (s.D + step - 1) / step;
  for (index_t r = 0; r < rounds; ++r) {
    const index_t c = r * step + lane * VEC;
    const bool has = c < s.D;
    const index_t cc = has ? c : 0;
    acc_t go[VEC];
    if (has) {
      load_channels<VEC>(grad_output + i * s.D + cc, go);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) go[e] = 0;
    }
    const index_t head = (n * s.S * s.M + m) * s.D + cc;  // offset of value[n, 0, m, c]
    unsigned special = 0;  // an int: predicates are few
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
      const bool level_ok = has && level_in_bounds<index_t>(start, H, W, s.S);
      const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
      const index_t level = head + start * MD;
      // one point at a time: the atomics dominate the backward, and unrolling the
      // points only made the compiler hold (and spill) the addresses of all of them
#pragma unroll 1
      for (int k = 0; k < K; ++k) {
        {
          const int p = l * K + k;
          const acc_t a = w[p];
          const auto cr = bilinear_corners<acc_t, index_t>(loc[2 * p], loc[2 * p + 1], H, W,
                                                           Hf, Wf);
          acc_t g_weight = 0, g_x = 0, g_y = 0;
          if (exceptional(a, cr.finite)) {
            special = 1;  // the cold pass adds it; 0 here
          } else if (level_ok) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              if (!cr.inside[j]) continue;
              const index_t offset = level + cr.pixel[j] * MD;
              acc_t v[VEC];
              load_channels<VEC>(value + offset, v);
              acc_t dot = 0;  // this thread's share of grad_out . V[corner]
#pragma unroll
              for (int e = 0; e < VEC; ++e) dot += go[e] * v[e];
              atomic_add_channels<VEC>(grad_value + offset, a * cr.weight[j], go);
              g_weight += cr.weight[j] * dot;
              g_x += cr.dweight_dx[j] * dot;
              g_y += cr.dweight_dy[j] * dot;
            }
            g_x *= a * Wf;  // d u / d x = W
            g_y *= a * Hf;  // d v / d y = H
          }
          g_weight = group_sum(g_weight, lanes, mask);
          g_x = group_sum(g_x, lanes, mask);
          g_y = group_sum(g_y, lanes, mask);
          if (lane == 0) {  // one writer per entry: plain stores, no atomics
            g_w[p] = (r == 0 ? acc_t(0) : g_w[p]) + g_weight;
            g_loc[2 * p] = (r == 0 ? acc_t(0) : g_loc[2 * p]) + g_x;
            g_loc[2 * p + 1] = (r == 0 ? acc_t(0) : g_loc[2 * p + 1]) + g_y;
          }
        }
      }
    }
    // the cold pass over the exceptional points; every lane of a group that has one
    // runs it whole (the shuffles), contributing where its point is exceptional
    const unsigned cold = __ballot_sync(mask, special != 0);
    if (special != 0) {
#pragma unroll 1
      for (int p = 0; p < L * K; ++p) {
        const int l = p / K;
        const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
        const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
        const auto cr = bilinear_corners<acc_t, index_t>(loc[2 * p], loc[2 * p + 1], H, W,
                                                         Hf, Wf);
        const bool mine = exceptional(w[p], cr.finite);
        acc_t g_weight = 0, g_x = 0, g_y = 0;
        if (mine && has && level_in_bounds<index_t>(start, H, W, s.S)) {
          const index_t level = head + start * MD;
          const scalar_t* corner[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) corner[j] = value + level + cr.pixel[j] * MD;
          acc_t* grad_corner[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) grad_corner[j] = grad_value + level + cr.pixel[j] * MD;
          exact_point_backward(cr, corner, grad_output + i * s.D + cc, w[p], VEC, g_weight,
                               g_x, g_y, [=](int j, int e, acc_t x) {
                                 atomicAdd(grad_corner[j] + e, x);
                               });
          g_x *= Wf;  // the weight is inside exact_point_backward's sums already
          g_y *= Hf;
        }
        g_weight = group_sum(g_weight, lanes, cold);
        g_x = group_sum(g_x, lanes, cold);
        g_y = group_sum(g_y, lanes, cold);
        if (lane == 0 && mine) {
          g_w[p] += g_weight;
          g_loc[2 * p] += g_x;
          g_loc[2 * p + 1] += g_y;
        }
      }
    }
  }
}

// ---- entry points ----------------------------------------------------------------------------

// The level table, checked on the host, as the by-value struct. Tables on the host
// (what ddetr/ops/kernel.py passes) are read directly; tables on the GPU are copied
// to the host first, which waits for the GPU (documented in the wrapper).
template <typename index_t>
Levels<index_t> host_levels(const char* op, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, int64_t S) {
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(L <= kMaxLevels, op, ": the CUDA kernel takes at most ", kMaxLevels,
              " levels, got L=", L);
  const at::Tensor shapes = spatial_shapes.cpu(), starts = level_start_index.cpu();
  check_levels(op, shapes, starts, S);
  Levels<index_t> lv{};
  lv.L = static_cast<int>(L);
  for (int64_t l = 0; l < L; ++l) {
    lv.H[l] = static_cast<index_t>(shapes.data_ptr<int64_t>()[2 * l]);
    lv.W[l] = static_cast<index_t>(shapes.data_ptr<int64_t>()[2 * l + 1]);
    lv.start[l] = static_cast<index_t>(starts.data_ptr<int64_t>()[l]);
  }
  return lv;
}

template <typename index_t>
Levels<index_t> as_index(const Levels<int64_t>& lv) {
  Levels<index_t> out{};
  out.L = lv.L;
  for (int l = 0; l < lv.L; ++l) {
    out.H[l] = static_cast<index_t>(lv.H[l]);
    out.W[l] = static_cast<index_t>(lv.W[l]);
    out.start[l] = static_cast<index_t>(lv.start[l]);
  }
  return out;
}

// How a call is run: which instantiation, how many threads per triple.
struct Plan {
  bool fast;       // VEC = 8 channels per thread, 32-bit offsets
  int lk;          // 44: L = 4, K = 4; 14: L = 1, K = 4; 0: run time
  int lanes_log2;
  int64_t threads;
};

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

Plan plan_for(const at::Tensor& value, const at::Tensor& locations,
              const at::Tensor& weights, const at::Tensor* grad_output) {
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = locations.size(1), L = locations.size(3), K = locations.size(4);
  const auto type = value.scalar_type();
  const bool fits32 = value.numel() < INT_MAX / 2 && locations.numel() < INT_MAX / 2 &&
                      N * Lq * M * D < INT_MAX / 2 && N * S * M * D < INT_MAX / 2;
  Plan plan{};
  plan.fast = (type == at::kFloat || type == at::kHalf || type == at::kBFloat16) &&
              D % 8 == 0 && fits32 && aligned16(value) && aligned16(locations) &&
              aligned16(weights) && (grad_output == nullptr || aligned16(*grad_output));
  plan.lk = !plan.fast ? 0 : (L == 4 && K == 4) ? 44 : (L == 1 && K == 4) ? 14 : 0;
  const int64_t vectors = plan.fast ? D / 8 : D;  // channel vectors of a triple
  int lanes_log2 = 0;
  while (lanes_log2 < 5 && (int64_t(2) << lanes_log2) <= vectors) ++lanes_log2;
  plan.lanes_log2 = lanes_log2;
  plan.threads = (N * Lq * M) << lanes_log2;
  return plan;
}

template <typename index_t>
Sizes<index_t> sizes_for(const at::Tensor& value, const at::Tensor& locations, const Plan& plan) {
  Sizes<index_t> s;
  s.triples = static_cast<index_t>(value.size(0) * locations.size(1) * value.size(2));
  s.S = static_cast<index_t>(value.size(1));
  s.M = static_cast<index_t>(value.size(2));
  s.D = static_cast<index_t>(value.size(3));
  s.Lq = static_cast<index_t>(locations.size(1));
  s.K = static_cast<int>(locations.size(4));
  s.lanes_log2 = plan.lanes_log2;
  return s;
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

// Calls f with the instantiation's compile-time (VEC, L_, K_, index_t) for a plan.
template <typename scalar_t, typename F>
void with_instantiation(const Plan& plan, F f) {
  constexpr bool vectorised = !std::is_same<scalar_t, double>::value;
  if constexpr (vectorised) {
    if (plan.fast && plan.lk == 44) return f(std::integral_constant<int, 8>(), std::integral_constant<int, 4>(), std::integral_constant<int, 4>(), int32_t());
    if (plan.fast && plan.lk == 14) return f(std::integral_constant<int, 8>(), std::integral_constant<int, 1>(), std::integral_constant<int, 4>(), int32_t());
    if (plan.fast) return f(std::integral_constant<int, 8>(), std::integral_constant<int, 0>(), std::integral_constant<int, 0>(), int32_t());
  }
  f(std::integral_constant<int, 1>(), std::integral_constant<int, 0>(), std::integral_constant<int, 0>(), int64_t());
}

void check_cuda_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights,
                       const at::Tensor* grad_output = nullptr) {
  TORCH_CHECK_VALUE(value.is_cuda(), op, ": value must be a CUDA tensor, got device ", value.device());
  check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights, grad_output, /*reduced_value=*/true, /*host_levels_ok=*/true);
}

// Locations and weights in the type sums run in (float32 for half types): all-half
// calls are converted once here.
at::Tensor in_acc_type(const at::Tensor& t, const at::Tensor& value) {
  return t.to(at::toOpMathType(value.scalar_type()));
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const char* op = "ddetr::ms_deform_attn (CUDA)";
  check_cuda_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor loc = in_acc_type(sampling_locations, value);
  const at::Tensor w = in_acc_type(attention_weights, value);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3), Lq = loc.size(1);
  auto output = at::empty({N, Lq, M * D}, value.options());
  const Plan plan = plan_for(value, loc, w, nullptr);
  // the table is checked even when there is nothing to compute
  const auto levels = host_levels<int64_t>(op, spatial_shapes, level_start_index, value.size(1));
  if (plan.threads == 0) return output.zero_();  // empty batch, no queries or D = 0
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_instantiation<scalar_t>(plan, [&](auto vec, auto l_, auto k_, auto index) {
      using index_t = decltype(index);
      const Levels<index_t> lv = as_index<index_t>(levels);
      forward_kernel<scalar_t, decltype(vec)::value, decltype(l_)::value, decltype(k_)::value, index_t>
          <<<blocks_for(plan.threads), kThreads, 0, stream>>>(
              value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), w.data_ptr<acc_t>(),
              output.data_ptr<scalar_t>(), lv, sizes_for<index_t>(value, loc, plan));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op = "ddetr::ms_deform_attn_backward (CUDA)";
  check_cuda_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, &grad_output);
  // grad_value is summed with atomics: the order of the additions, hence the last bits,
  // change from run to run
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor loc = in_acc_type(sampling_locations, value);
  const at::Tensor w = in_acc_type(attention_weights, value);
  const auto acc_type = at::toOpMathType(value.scalar_type());
  // grad_value: an atomic scatter target, zero-filled, float32 for half types;
  // the location and weight gradients get exactly one store per entry
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_w = at::empty(w.sizes(), w.options());
  const Plan plan = plan_for(value, loc, w, &grad_output);
  const auto levels = host_levels<int64_t>(op, spatial_shapes, level_start_index, value.size(1));
  if (plan.threads > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_instantiation<scalar_t>(plan, [&](auto vec, auto l_, auto k_, auto index) {
        using index_t = decltype(index);
        const Levels<index_t> lv = as_index<index_t>(levels);
        backward_kernel<scalar_t, decltype(vec)::value, decltype(l_)::value, decltype(k_)::value, index_t>
            <<<blocks_for(plan.threads), kThreads, 0, stream>>>(
                grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(),
                w.data_ptr<acc_t>(), grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
                grad_w.data_ptr<acc_t>(), lv, sizes_for<index_t>(value, loc, plan));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    grad_loc.zero_();
    grad_w.zero_();
  }
  // back to the inputs' dtypes (.to() is a no-op where they agree)
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_w.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace ddetr
