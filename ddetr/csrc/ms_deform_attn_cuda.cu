// Multi-scale deformable attention on the GPU: forward and backward.
//
// Work split: a GROUP of `lanes` neighbouring threads per (n, q, m) triple, each thread
// owning VEC channels (8 float32, float16 or bfloat16 channels) as chunks of 16 bytes
// (backward: 4 channels):
//
//     thread t:  group i = t / lanes,  lane = t % lanes,
//                forward:  channels [lane * VEC, lane * VEC + VEC)
//                backward: chunk j at channels [c, c + 4), c = (j * lanes + lane) * 4
//
// lanes is the largest power of two <= min(D / VEC, 32): D = 32 float32 channels make
// groups of 4 threads. In the backward the chunks of a group's lanes lie side by side,
// so a warp-wide 16-byte atomic covers whole 32-byte sectors (chunk_channel). Groups are
// numbered in (n, m, q) order: neighbouring groups serve neighbouring queries of one
// head (triple_of).
// Per sampling point a thread does the bilinear setup once (where the point lands,
// which corners are inside, 4 weights) and then reads VEC channels of each corner: the
// setup is shared by VEC channels instead of repeated per channel (the first version of
// this kernel ran one thread per channel, so every channel paid the whole setup: about
// 211 SASS instructions per point and channel, against 20 or fewer here;
// benchmarks/kernel_cost.md).
//
// SPLIT (L = 4, K = 4 only): four groups per triple, one per level, side by side in a
// warp; the forward adds their sums with shuffles. The backward always splits (shorter
// threads, more atomics in flight); the forward only when the grid would otherwise fill
// less than a quarter of the GPU (the decoder's 300 queries). The choices of this file
// were timed on an H200 (benchmarks/kernel_variants.md).
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
// float at a time; in the backward a chunk is 4 channels for every dtype (8-byte loads
// of half types) so that each atomic is one whole float4. (Summing a bfloat16 value's
// gradient in bfloat16 with Hopper's 16-byte bfloat16 atomics halves their traffic and
// was timed at 0.6x the encoder's backward, but rounds at every addition: its relative
// error rose from 1.7e-3 to 2e-2, and increments below half a bfloat16 step of a large
// sum are lost, biased toward zero. The float32 buffer keeps the sums exact to
// float32; benchmarks/kernel_variants.md.) Atomics make the
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
  int lanes_log2;   // log2 of the channel lanes per triple (per level with SPLIT)
  int split_log2;   // log2 of the level lanes per triple (SPLIT kernels only)
};

// ---- which (n, q, m) a thread group serves -------------------------------------------------

// A triple's indices; row = (n * Lq + q) * M + m is its row in locations, weights and
// output. Groups are numbered in (n, m, q) order: neighbouring groups take neighbouring
// queries of one head, which (in the encoder, where queries are pixels) sample the
// same pixels of the coarse levels: the forward finds more of them in L1.
template <typename index_t>
struct Triple {
  index_t n, m, row;
};

template <typename index_t>
__device__ __forceinline__ Triple<index_t> triple_of(index_t i, const Sizes<index_t>& s) {
  Triple<index_t> t;
  const index_t q = i % s.Lq, nm = i / s.Lq;
  t.m = nm % s.M;
  t.n = nm / s.M;
  t.row = (t.n * s.Lq + q) * s.M + t.m;
  return t;
}

// ---- channel chunks: CH channels of scalar_t <-> CH acc_t in registers ----------------------
//
// A thread owns VEC channels as VEC / CH chunks of CH contiguous channels (16 bytes of
// float32 or 8-16 bytes of half types: one load instruction each).

template <int CH, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* p, acc_t (&out)[CH]) {
  if constexpr (CH == 4 && std::is_same<scalar_t, float>::value) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  } else if constexpr ((CH == 4 || CH == 8) && (std::is_same<scalar_t, at::Half>::value ||
                                                std::is_same<scalar_t, at::BFloat16>::value)) {
    using pair_t = std::conditional_t<std::is_same<scalar_t, at::Half>::value, __half2,
                                      __nv_bfloat162>;
    using raw_t = std::conditional_t<CH == 8, uint4, uint2>;
    const raw_t raw = *reinterpret_cast<const raw_t*>(p);
    const pair_t* h = reinterpret_cast<const pair_t*>(&raw);
#pragma unroll
    for (int j = 0; j < CH / 2; ++j) {
      float2 f;
      if constexpr (std::is_same<pair_t, __half2>::value) f = __half22float2(h[j]);
      else f = __bfloat1622float2(h[j]);
      out[2 * j] = f.x; out[2 * j + 1] = f.y;
    }
  } else {
    static_assert(CH == 1, "chunk loads are written for 4 float or 4/8 half/bfloat16 channels");
    out[0] = static_cast<acc_t>(p[0]);
  }
}

template <int CH, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* p, const acc_t* in) {
  if constexpr (CH == 4 && std::is_same<scalar_t, float>::value) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else if constexpr ((CH == 4 || CH == 8) && (std::is_same<scalar_t, at::Half>::value ||
                                                std::is_same<scalar_t, at::BFloat16>::value)) {
    using raw_t = std::conditional_t<CH == 8, uint4, uint2>;
    raw_t raw;
    if constexpr (std::is_same<scalar_t, at::Half>::value) {
      __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
      for (int j = 0; j < CH / 2; ++j) h[j] = __floats2half2_rn(in[2 * j], in[2 * j + 1]);
    } else {
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < CH / 2; ++j) h[j] = __floats2bfloat162_rn(in[2 * j], in[2 * j + 1]);
    }
    *reinterpret_cast<raw_t*>(p) = raw;
  } else {
    static_assert(CH == 1, "chunk stores are written for 4 float or 4/8 half/bfloat16 channels");
    p[0] = static_cast<scalar_t>(in[0]);
  }
}

// grad[p .. p + CH) += scale * g[0 .. CH) into a float32 (float64) buffer: one 16-byte
// vector atomic per 4 float32 channels on sm_90, else one number at a time.
template <int CH, typename acc_t>
__device__ __forceinline__ void atomic_add_chunk(acc_t* p, acc_t scale, const acc_t* g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool vector = CH % 4 == 0 && std::is_same<acc_t, float>::value;
#else
  constexpr bool vector = false;
#endif
  if constexpr (vector) {
#pragma unroll
    for (int j = 0; j < CH; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + j),
                make_float4(scale * g[j], scale * g[j + 1], scale * g[j + 2], scale * g[j + 3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < CH; ++j) atomicAdd(p + j, scale * g[j]);
  }
}

// The backward's channels: where chunk j of this lane starts, in round r of the channel
// loop. Chunk j of the lanes of a group lie side by side, so that one warp-wide 16-byte
// atomic covers whole 32-byte sectors. (A lane owning VEC neighbouring channels, as in
// the forward, made each atomic half a sector: the L2 did twice the sector operations,
// and the encoder's backward took 1.5x as long; benchmarks/kernel_variants.md. The
// forward keeps neighbouring channels: its loads gain nothing from side-by-side chunks,
// and the second chunk then sits at an immediate offset, fewer instructions.)
template <int VEC, int CH, typename index_t>
__device__ __forceinline__ index_t chunk_channel(index_t r, int j, int lane,
                                                 const Sizes<index_t>& s) {
  return ((r * VEC) << s.lanes_log2) + ((j << s.lanes_log2) + lane) * CH;
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

// The thread's place: its triple, its channel lane, and (SPLIT) the level it runs.
template <bool SPLIT, typename index_t>
struct Place {
  index_t i;   // the triple
  int lane;    // channel lane inside the group
  int lsub;    // SPLIT: this thread's level; else 0
  int lstep;   // SPLIT: levels are lsub, lsub + lstep, ...; else 1
};

template <bool SPLIT, typename index_t>
__device__ __forceinline__ Place<SPLIT, index_t> place_of(const Sizes<index_t>& s) {
  const index_t t = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int split_log2 = SPLIT ? s.split_log2 : 0;
  Place<SPLIT, index_t> p;
  p.i = t >> (s.lanes_log2 + split_log2);
  p.lane = static_cast<int>(t & ((index_t(1) << s.lanes_log2) - 1));
  p.lsub = SPLIT ? static_cast<int>((t >> s.lanes_log2) & ((index_t(1) << split_log2) - 1)) : 0;
  p.lstep = 1 << split_log2;
  return p;
}

// The cold pass of the forward: the exceptional points of this thread's levels, the
// reference's way (rare: NaN or +-Inf in a location or weight), into the VEC channels
// from channel c.
template <typename scalar_t, int VEC, typename index_t, typename acc_t>
__device__ __forceinline__ void forward_cold_pass(const scalar_t* head, const acc_t* loc,
                                                  const acc_t* w, const Levels<index_t>& lv,
                                                  const Sizes<index_t>& s, int L, int K,
                                                  int lsub, int lstep, index_t c,
                                                  acc_t (&acc)[VEC]) {
  const index_t MD = s.M * s.D;
#pragma unroll 1
  for (int p = 0; p < L * K; ++p) {
    const int l = p / K;
    if (l % lstep != lsub) continue;  // SPLIT: this thread's level only
    const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
    if (!level_in_bounds<index_t>(start, H, W, s.S)) continue;
    const auto cr = bilinear_corners<acc_t, index_t>(loc[2 * p], loc[2 * p + 1], H, W,
                                                     static_cast<acc_t>(H), static_cast<acc_t>(W));
    if (!exceptional(w[p], cr.finite)) continue;
    const scalar_t* corner[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) corner[q] = head + start * MD + cr.pixel[q] * MD + c;
    exact_point_forward(cr, corner, w[p], acc, VEC);
  }
}

// ---- forward -------------------------------------------------------------------------------

template <typename scalar_t, int VEC, int L_, int K_, bool SPLIT, typename index_t>
__global__ void __launch_bounds__(kThreads, 2)
forward_kernel(const scalar_t* __restrict__ value,
               const at::opmath_type<scalar_t>* __restrict__ locations,
               const at::opmath_type<scalar_t>* __restrict__ weights,
               scalar_t* __restrict__ output, const Levels<index_t> lv, const Sizes<index_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CH = VEC == 1 ? 1 : 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int NCH = VEC / CH;
  const auto pl = place_of<SPLIT>(s);
  // SPLIT: the level lanes of a triple add their sums with shuffles: whole groups
  const unsigned mask = SPLIT ? __ballot_sync(0xffffffffu, pl.i < s.triples) : 0u;
  if (pl.i >= s.triples) return;
  const int L = L_ > 0 ? L_ : lv.L;
  const int K = K_ > 0 ? K_ : s.K;
  const Triple<index_t> tr = triple_of(pl.i, s);
  const index_t MD = s.M * s.D;  // distance between two pixels in value
  const acc_t* loc = locations + tr.row * (L * K * 2);
  const acc_t* w = weights + tr.row * (L * K);
  const scalar_t* head = value + (tr.n * s.S * s.M + tr.m) * s.D;  // value[n, 0, m, 0]
  const index_t step = static_cast<index_t>(VEC) << s.lanes_log2;
  for (index_t r = 0; r * step < s.D; ++r) {  // usually one round
    // this lane's VEC neighbouring channels (its chunks at immediate offsets); a lane
    // past D reads channel 0 instead and stores nothing: no test in the hot loop, and
    // every lane runs every round (SPLIT's shuffles need them all)
    const index_t first = r * step + static_cast<index_t>(pl.lane) * VEC;
    const bool ok = first < s.D;
    const index_t c = ok ? first : 0;
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0;
    unsigned special = 0;  // an exceptional point was skipped (an int: predicates are few)
    const int levels_here = SPLIT ? (pl.lsub < L ? 1 : 0) : L;
#pragma unroll
    for (int li = 0; li < levels_here; ++li) {
      const int l = SPLIT ? pl.lsub : li;
      const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
      if (!level_in_bounds<index_t>(start, H, W, s.S)) continue;  // never, once checked
      const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
      const scalar_t* level = head + start * MD + c;
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
          for (int q = 0; q < 4; ++q) {
            if (!cr.inside[q]) continue;  // outside the map: reads zero
            const scalar_t* px = level + cr.pixel[q] * MD;
            const acc_t aw = a * cr.weight[q];
#pragma unroll
            for (int j = 0; j < NCH; ++j) {
              acc_t v[CH];
              load_chunk<CH>(px + j * CH, v);
#pragma unroll
              for (int e = 0; e < CH; ++e) acc[j * CH + e] += aw * v[e];
            }
          }
        }
      }
    }
    if (special != 0 && ok) {
      forward_cold_pass<scalar_t, VEC>(head, loc, w, lv, s, L, K, pl.lsub, pl.lstep, c, acc);
    }
    if constexpr (SPLIT) {  // add the level lanes' sums
      for (int off = 1 << s.lanes_log2; off < (1 << (s.lanes_log2 + s.split_log2)); off <<= 1) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += __shfl_xor_sync(mask, acc[e], off);
      }
      if (pl.lsub != 0) continue;
    }
    if (ok) {
#pragma unroll
      for (int j = 0; j < NCH; ++j) store_chunk<CH>(output + tr.row * s.D + c + j * CH, acc + j * CH);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------

// Sum x over the channel lanes of a group (lanes a power of two <= 32, aligned inside
// the warp): every lane gets the total. `mask`: the lanes that take part (whole groups).
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int lanes, unsigned mask) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset);
  return x;
}

// One finite point's share of the backward, over this thread's channel chunks: its
// gradient scattered into grad_value, and (returned through g_*) this thread's part of
// the sums the weight and location gradients need (ms_deform_attn.h, exact_point_*).
template <typename scalar_t, int VEC, int CH, typename index_t, typename acc_t>
__device__ __forceinline__ void point_backward(const Corners<acc_t, index_t>& cr, acc_t a,
                                               const scalar_t* value, acc_t* grad_value,
                                               index_t level, index_t MD,
                                               const index_t (&ch)[VEC / CH],
                                               const bool (&ok)[VEC / CH], const acc_t (&go)[VEC],
                                               acc_t& g_weight, acc_t& g_x, acc_t& g_y) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if (!cr.inside[c]) continue;
    const index_t offset = level + cr.pixel[c] * MD;
    acc_t dot = 0;  // this thread's share of grad_out . V[corner]
#pragma unroll
    for (int j = 0; j < VEC / CH; ++j) {
      if (!ok[j]) continue;
      acc_t v[CH];
      load_chunk<CH>(value + offset + ch[j], v);
#pragma unroll
      for (int e = 0; e < CH; ++e) dot += go[j * CH + e] * v[e];
      atomic_add_chunk<CH>(grad_value + offset + ch[j], a * cr.weight[c], go + j * CH);
    }
    g_weight += cr.weight[c] * dot;
    g_x += cr.dweight_dx[c] * dot;
    g_y += cr.dweight_dy[c] * dot;
  }
}

// The cold pass of the backward: the exceptional points of this thread's levels, the
// reference's way, added to what the hot loop wrote (0 for these points).
template <typename scalar_t, int VEC, int CH, typename index_t, typename acc_t, typename P>
__device__ __forceinline__ void backward_cold_pass(
    const scalar_t* grad_out, const scalar_t* value, acc_t* grad_value, index_t head,
    const acc_t* loc, const acc_t* w, acc_t* g_loc, acc_t* g_w, const Levels<index_t>& lv,
    const Sizes<index_t>& s, int L, int K, const P& pl, const index_t (&ch)[VEC / CH],
    const bool (&ok)[VEC / CH], unsigned cold) {
  const index_t MD = s.M * s.D;
  const int lanes = 1 << s.lanes_log2;
#pragma unroll 1
  for (int p = 0; p < L * K; ++p) {
    const int l = p / K;
    if (l % pl.lstep != pl.lsub) continue;  // SPLIT: this thread's level only
    const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
    const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
    const auto cr = bilinear_corners<acc_t, index_t>(loc[2 * p], loc[2 * p + 1], H, W, Hf, Wf);
    const bool mine = exceptional(w[p], cr.finite);
    acc_t g_weight = 0, g_x = 0, g_y = 0;
    if (mine && level_in_bounds<index_t>(start, H, W, s.S)) {
      const index_t level = head + start * MD;
#pragma unroll
      for (int j = 0; j < VEC / CH; ++j) {
        if (!ok[j]) continue;
        const scalar_t* corner[4];
        acc_t* grad_corner[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          corner[c] = value + level + cr.pixel[c] * MD + ch[j];
          grad_corner[c] = grad_value + level + cr.pixel[c] * MD + ch[j];
        }
        exact_point_backward(cr, corner, grad_out + ch[j], w[p], CH, g_weight, g_x, g_y,
                             [=](int c, int e, acc_t x) {
                               atomic_add_chunk<1>(grad_corner[c] + e, acc_t(1), &x);
                             });
      }
      g_x *= Wf;  // the weight is inside exact_point_backward's sums already
      g_y *= Hf;
    }
    g_weight = group_sum(g_weight, lanes, cold);
    g_x = group_sum(g_x, lanes, cold);
    g_y = group_sum(g_y, lanes, cold);
    if (pl.lane == 0 && mine) {
      g_w[p] += g_weight;
      g_loc[2 * p] += g_x;
      g_loc[2 * p + 1] += g_y;
    }
  }
}

template <typename scalar_t, int VEC, int L_, int K_, bool SPLIT, typename index_t>
__global__ void __launch_bounds__(kThreads, 2)
backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                const at::opmath_type<scalar_t>* __restrict__ locations,
                const at::opmath_type<scalar_t>* __restrict__ weights,
                at::opmath_type<scalar_t>* __restrict__ grad_value,  // zero-filled, atomics
                at::opmath_type<scalar_t>* __restrict__ grad_locations,  // written once
                at::opmath_type<scalar_t>* __restrict__ grad_weights,    // written once
                const Levels<index_t> lv, const Sizes<index_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  // 4 channels a chunk (one float4 atomic of grad_value; 8-byte loads of half types)
  constexpr int CH = VEC == 1 ? 1 : 4;
  constexpr int NCH = VEC / CH;
  const auto pl = place_of<SPLIT>(s);
  // The group sums with shuffles among the threads that have a triple; a whole group
  // has one or not, so a lane's xor partner is always in the mask.
  const unsigned mask = __ballot_sync(0xffffffffu, pl.i < s.triples);
  if (pl.i >= s.triples) return;
  const int lanes = 1 << s.lanes_log2;
  const int L = L_ > 0 ? L_ : lv.L;
  const int K = K_ > 0 ? K_ : s.K;
  const Triple<index_t> tr = triple_of(pl.i, s);
  const index_t MD = s.M * s.D;
  const acc_t* loc = locations + tr.row * (L * K * 2);
  const acc_t* w = weights + tr.row * (L * K);
  acc_t* g_loc = grad_locations + tr.row * (L * K * 2);
  acc_t* g_w = grad_weights + tr.row * (L * K);
  const index_t head = (tr.n * s.S * s.M + tr.m) * s.D;  // offset of value[n, 0, m, 0]
  const index_t step = static_cast<index_t>(VEC) << s.lanes_log2;
  // every lane of a group runs the same number of rounds (the shuffles need them all);
  // a chunk past D takes part with zeros
  for (index_t r = 0; r * step < s.D; ++r) {
    index_t ch[NCH];
    bool ok[NCH];
    acc_t go[VEC];
#pragma unroll
    for (int j = 0; j < NCH; ++j) {
      ch[j] = chunk_channel<VEC, CH>(r, j, pl.lane, s);
      ok[j] = ch[j] < s.D;
      acc_t* part = go + j * CH;
      if (ok[j]) {
        acc_t v[CH];
        load_chunk<CH>(grad_output + tr.row * s.D + ch[j], v);
#pragma unroll
        for (int e = 0; e < CH; ++e) part[e] = v[e];
      } else {
#pragma unroll
        for (int e = 0; e < CH; ++e) part[e] = 0;
      }
    }
    unsigned special = 0;  // an int: predicates are few
    const int levels_here = SPLIT ? (pl.lsub < L ? 1 : 0) : L;
#pragma unroll
    for (int li = 0; li < levels_here; ++li) {
      const int l = SPLIT ? pl.lsub : li;
      const index_t H = lv.H[l], W = lv.W[l], start = lv.start[l];
      const bool level_ok = level_in_bounds<index_t>(start, H, W, s.S);
      const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
      // one point at a time: the atomics dominate the backward, and unrolling the
      // points only made the compiler hold (and spill) the addresses of all of them
#pragma unroll 1
      for (int k = 0; k < K; ++k) {
        const int p = l * K + k;
        const acc_t a = w[p];
        const auto cr = bilinear_corners<acc_t, index_t>(loc[2 * p], loc[2 * p + 1], H, W,
                                                         Hf, Wf);
        acc_t g_weight = 0, g_x = 0, g_y = 0;
        if (exceptional(a, cr.finite)) {
          special = 1;  // the cold pass adds it; 0 here
        } else if (level_ok) {
          point_backward<scalar_t, VEC, CH>(cr, a, value, grad_value,
                                                    head + start * MD, MD, ch, ok, go,
                                                    g_weight, g_x, g_y);
          g_x *= a * Wf;  // d u / d x = W
          g_y *= a * Hf;  // d v / d y = H
        }
        g_weight = group_sum(g_weight, lanes, mask);
        g_x = group_sum(g_x, lanes, mask);
        g_y = group_sum(g_y, lanes, mask);
        if (pl.lane == 0) {  // one writer per entry: plain stores, no atomics
          g_w[p] = (r == 0 ? acc_t(0) : g_w[p]) + g_weight;
          g_loc[2 * p] = (r == 0 ? acc_t(0) : g_loc[2 * p]) + g_x;
          g_loc[2 * p + 1] = (r == 0 ? acc_t(0) : g_loc[2 * p + 1]) + g_y;
        }
      }
    }
    // the cold pass over the exceptional points; every lane of a group that has one
    // runs it whole (the shuffles), contributing where its point is exceptional
    const unsigned cold = __ballot_sync(mask, special != 0);
    if (special != 0) {
      backward_cold_pass<scalar_t, VEC, CH>(grad_output + tr.row * s.D, value,
                                                    grad_value, head, loc, w, g_loc, g_w,
                                                    lv, s, L, K, pl, ch, ok, cold);
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
  int lanes_log2;  // channel lanes per triple (per level when split)
  int split_log2;  // level lanes per triple: 2 (four levels side by side) or 0
  int64_t threads;
};

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Whether the levels run side by side (SPLIT): always in the backward, in the forward
// only when the grid would fill less than a quarter of the GPU.
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
  const int64_t unsplit = (N * Lq * M) << lanes_log2;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t gpu_threads =
      int64_t(props->multiProcessorCount) * props->maxThreadsPerMultiProcessor;
  if (plan.lk == 44 && (grad_output != nullptr || 4 * unsplit < gpu_threads)) {
    plan.split_log2 = 2;                      // 4 level lanes
    lanes_log2 = std::min(lanes_log2, 3);     // a group stays inside a warp
  }
  plan.lanes_log2 = lanes_log2;
  plan.threads = (N * Lq * M) << (lanes_log2 + plan.split_log2);
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
  s.split_log2 = plan.split_log2;
  return s;
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

template <int V>
using Int = std::integral_constant<int, V>;
template <bool V>
using Bool = std::integral_constant<bool, V>;

// Calls f with the instantiation's compile-time (VEC, L_, K_, SPLIT, index_t) for a plan.
template <typename scalar_t, typename F>
void with_instantiation(const Plan& plan, F f) {
  constexpr bool vectorised = !std::is_same<scalar_t, double>::value;
  if constexpr (vectorised) {
    if (plan.fast && plan.lk == 44 && plan.split_log2 > 0) return f(Int<8>(), Int<4>(), Int<4>(), Bool<true>(), int32_t());
    if (plan.fast && plan.lk == 44) return f(Int<8>(), Int<4>(), Int<4>(), Bool<false>(), int32_t());
    if (plan.fast && plan.lk == 14) return f(Int<8>(), Int<1>(), Int<4>(), Bool<false>(), int32_t());
    if (plan.fast) return f(Int<8>(), Int<0>(), Int<0>(), Bool<false>(), int32_t());
  }
  f(Int<1>(), Int<0>(), Int<0>(), Bool<false>(), int64_t());
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
    with_instantiation<scalar_t>(plan, [&](auto vec, auto l_, auto k_, auto split, auto index) {
      using index_t = decltype(index);
      const Levels<index_t> lv = as_index<index_t>(levels);
      forward_kernel<scalar_t, decltype(vec)::value, decltype(l_)::value, decltype(k_)::value,
                     decltype(split)::value, index_t>
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
  const Plan plan = plan_for(value, loc, w, &grad_output);
  // grad_value: an atomic scatter target, zero-filled, float32 for half types;
  // the location and weight gradients get exactly one store per entry
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_w = at::empty(w.sizes(), w.options());
  const auto levels = host_levels<int64_t>(op, spatial_shapes, level_start_index, value.size(1));
  // D = 0: no channels, so no rounds of the channel loop and nothing to write; the
  // location and weight gradients are then zero (set below)
  if (plan.threads > 0 && value.size(3) > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_instantiation<scalar_t>(plan, [&](auto vec, auto l_, auto k_, auto split, auto index) {
        using index_t = decltype(index);
        const Levels<index_t> lv = as_index<index_t>(levels);
        backward_kernel<scalar_t, decltype(vec)::value, decltype(l_)::value, decltype(k_)::value,
                        decltype(split)::value, index_t>
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
