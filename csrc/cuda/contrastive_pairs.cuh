#pragma once
// Symmetric NT-Xent / SupCon on CUDA: every tile pair (I, K) of z's row tiles
// formed once (host code: contrastive.cu). With Q = K = z the logits are
// symmetric, S_rc = S_cr, so one S tile serves rows I and rows K:
//
// sym_lse_pairs_kernel (unit rows, logit bound usable; contrastive_check.h):
//   every logit lies in [-bound, bound], so the softmax shift is the fixed
//   bound instead of a running max and partial sums from different blocks
//   simply add. For each pair: e_rc = exp(S_rc - bound) (self excluded) feeds
//   the row sums of I (registers) and the column sums of K (a shared-memory
//   reduction over the tile, then one atomicAdd per column); positives by
//   label likewise. lse_r = bound + log(sum_r), on the host side.
// sym_grad_pairs_kernel: with T_rc = w_r (exp(S_rc - lse_r) - P_rc / |P(r)|)
//   + w_c (exp(S_rc - lse_c) - P_rc / |P(c)|) = (G + G^T)_rc, symmetric too:
//     out_I += scale * T_IK  . zh_K    (registers, flushed once at the end)
//     out_K += scale * T_IK^T . zh_I   (atomicAdd per pair, skipped when I == K)
//   zh = z / denom is formed as each feature chunk is staged. 3 tile products
//   per pair instead of 4 for the two tiles (I, K) and (K, I).
//
// Schedule (PairSchedule): row tile b takes the pairs (b, b + j mod tiles),
// j = 0, 1, ..., tiles / 2 (with an even count the pair at distance tiles / 2
// only for b < tiles / 2): every unordered pair once, every row tile about
// half of them. blockIdx.y splits a row tile's list when there are too few
// row tiles to fill the GPU, since the results accumulate atomically anyway.
//
// Atomics make the summation order, and so the last bits, vary from run to
// run; contrastive.cu takes the row-tile kernels of contrastive_kernels.cuh
// instead when torch.use_deterministic_algorithms(True) is set.
//
// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads per block; 2026-11-28):
//   sym_lse_pairs_kernel   101-106 registers (fp16, bf16, exact fp32), 128
//                          (TF32), 80 (fp64); 17-18 KB shared memory; no spills.
//   sym_grad_pairs_kernel  kParts 1: 128 registers (fp16: 170, no spills),
//                          spilling 4-20 bytes; kParts 2: 128-255 (exact fp32
//                          and fp64 at 128 spill 40-60 bytes); kParts 4:
//                          221-255, no spills; 28-37 KB
//                          shared memory. With the row statistics in shared
//                          memory rather than registers ptxas keeps most
//                          kParts 1 variants at 128 (2 blocks per SM); the
//                          spills against the occupancy are to be measured on
//                          a GPU.
#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "contrastive_kernels.cuh"

namespace ssl_ops::cuda {

struct PairSchedule {
  int64_t tiles;           // row tiles of z
  int64_t pairs_per_block;

  __host__ __device__ int64_t pairs_of(int64_t tile) const {
    if (tiles % 2 == 1) return (tiles + 1) / 2;
    return tile < tiles / 2 ? tiles / 2 + 1 : tiles / 2;
  }
  __host__ __device__ int64_t most_pairs() const { return pairs_of(0); }
  // Blocks sharing one row tile's pairs (blockIdx.y).
  __host__ __device__ int64_t slices() const { return (most_pairs() + pairs_per_block - 1) / pairs_per_block; }
  // End of the slice of tile's pairs that starts at first.
  __host__ __device__ int64_t last_pair(int64_t tile, int64_t first) const {
    const int64_t end = first + pairs_per_block, count = pairs_of(tile);
    return end < count ? end : count;
  }
};

template <typename T>
struct SymPairLseParams {
  const T* z;
  const acc_t<T>* denom;
  int64_t n, features;
  acc_t<T> scale, bound;  // every logit lies in [-bound, bound]
  const int64_t* labels;
  PairSchedule schedule;
  acc_t<T>* exp_sum;  // n, zeroed: sum over candidates of exp(S_rc - bound)
  acc_t<T>* positive_sum;   // n, zeroed
  int64_t* positive_count;  // n, zeroed
};

template <typename T>
struct SymPairGradParams {
  const T* z;
  const acc_t<T>* denom;
  int64_t n, features;
  acc_t<T> scale;
  const int64_t* labels;
  const acc_t<T>* lse;
  const acc_t<T>* weight;         // w_r of the reduced loss (0: no gradient through row r's loss)
  const acc_t<T>* inv_positives;  // 1 / |P(r)| (0 without positives)
  PairSchedule schedule;
  acc_t<T>* out;  // n x features, zeroed: d of the normalised rows
};

__device__ __forceinline__ void add_to(int64_t* address, int64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
}

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kTileThreads) sym_lse_pairs_kernel(SymPairLseParams<T> p) {
  using A = acc_t<T>;
  constexpr int kTile = tile_size<T>(), R = kTile / 16;
  // The column partials of the 16 thread rows, reduced once the S tile's stages are dead.
  __shared__ union Smem {
    STileSmem<T> tile;
    struct {
      A exp[16][kTile];
      A positive_sum[16][kTile];
      int positive_count[16][kTile];
    } cols;
  } smem;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t row_tile = blockIdx.x, r0 = row_tile * kTile;
  const int64_t first = int64_t(blockIdx.y) * p.schedule.pairs_per_block;
  const int64_t last = p.schedule.last_pair(row_tile, first);
  if (first >= last) return;  // the whole block
  A row_exp[R], row_pos_sum[R], row_factor[R];
  int row_pos_count[R];
  int64_t row_label[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
    row_exp[i] = row_pos_sum[i] = 0;
    row_pos_count[i] = 0;
    row_factor[i] = r < p.n ? p.scale / p.denom[r] : A(0);
    row_label[i] = r < p.n ? p.labels[r] : 0;
  }
  for (int64_t pair = first; pair < last; ++pair) {
    const int64_t col_tile = (row_tile + pair) % p.schedule.tiles, c0 = col_tile * kTile;
    A s[R][R];
    s_tile<T, kTensorCores, kTile>(p.z, p.n, r0, p.z, p.n, c0, p.features, smem.tile, s);
    A col_exp[R], col_pos_sum[R];
    int col_pos_count[R];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int64_t c = c0 + tx * R + j;
      const bool col_valid = c < p.n;
      const A col_inv = col_valid ? A(1) / p.denom[c] : A(0);
      const int64_t col_label = col_valid ? p.labels[c] : 0;
      col_exp[j] = col_pos_sum[j] = 0;
      col_pos_count[j] = 0;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t r = r0 + ty * R + i;
        const bool candidate = col_valid && r < p.n && r != c;
        const A logit = s[i][j] * row_factor[i] * col_inv;
        const A e = candidate ? device_exp(logit - p.bound) : A(0);
        row_exp[i] += e;
        col_exp[j] += e;
        if (candidate && col_label == row_label[i]) {
          row_pos_sum[i] += logit;
          col_pos_sum[j] += logit;
          ++row_pos_count[i];
          ++col_pos_count[j];
        }
      }
    }
    if (col_tile == row_tile) continue;  // the tile holds both (r, c) and (c, r): rows only
    // s_tile ended on a barrier, so its stages may be overwritten.
#pragma unroll
    for (int j = 0; j < R; ++j) {
      smem.cols.exp[ty][tx * R + j] = col_exp[j];
      smem.cols.positive_sum[ty][tx * R + j] = col_pos_sum[j];
      smem.cols.positive_count[ty][tx * R + j] = col_pos_count[j];
    }
    __syncthreads();
    if (tid < kTile && c0 + tid < p.n) {
      A exp_total = 0, pos_total = 0;
      int count_total = 0;
      for (int part = 0; part < 16; ++part) {
        exp_total += smem.cols.exp[part][tid];
        pos_total += smem.cols.positive_sum[part][tid];
        count_total += smem.cols.positive_count[part][tid];
      }
      atomicAdd(p.exp_sum + c0 + tid, exp_total);
      if (count_total > 0) {
        atomicAdd(p.positive_sum + c0 + tid, pos_total);
        add_to(p.positive_count + c0 + tid, count_total);
      }
    }
    __syncthreads();  // before the next tile's stages overwrite the partials
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
    const A exp_total = row_sum16(row_exp[i]);
    const A pos_total = row_sum16(row_pos_sum[i]);
    const int count_total = row_sum16(row_pos_count[i]);
    if (tx == 0 && r < p.n) {
      atomicAdd(p.exp_sum + r, exp_total);
      if (count_total > 0) {
        atomicAdd(p.positive_sum + r, pos_total);
        add_to(p.positive_count + r, count_total);
      }
    }
  }
}

// Stages chunk[k][c] = z[row0 + k][d0 + c] / denom (0 outside z), then waits for it.
template <typename T, int kTile>
__device__ __forceinline__ void stage_unit_rows(const SymPairGradParams<T>& p, int64_t row0, int64_t d0,
                                                acc_t<T> (&chunk)[kTile][kChunk + 1]) {
  using A = acc_t<T>;
  for (int e = threadIdx.x; e < kTile * kChunk; e += kTileThreads) {
    const int k = e / kChunk, c = e % kChunk;
    const int64_t row = row0 + k, feature = d0 + c;
    chunk[k][c] = (row < p.n && feature < p.features)
        ? static_cast<A>(p.z[row * p.features + feature]) / p.denom[row] : A(0);
  }
  __syncthreads();
}

template <typename T, bool kTensorCores, int kParts>
__global__ void __launch_bounds__(kTileThreads) sym_grad_pairs_kernel(SymPairGradParams<T> p) {
  using A = acc_t<T>;
  constexpr int kTile = tile_size<T>(), R = kTile / 16, W = kChunk / 16;
  __shared__ GradSmem<T> smem;  // chunk: unit rows; coef: scale * T_rc
  auto& coef = smem.coef;
  // The block's row statistics, read once per pair: in registers they would
  // stay live through every product.
  __shared__ struct {
    A lse[kTile], weight[kTile], inv_positives[kTile], factor[kTile];
    int64_t label[kTile];
  } row_stats;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t row_tile = blockIdx.x, r0 = row_tile * kTile;
  const int64_t first = int64_t(blockIdx.y) * p.schedule.pairs_per_block;
  const int64_t last = p.schedule.last_pair(row_tile, first);
  const int64_t d0 = int64_t(blockIdx.z) * kChunk * kParts;
  if (first >= last) return;  // the whole block
  if (tid < kTile) {  // published by the first barrier of s_tile
    const int64_t r = r0 + tid;
    const bool valid = r < p.n;
    row_stats.lse[tid] = valid ? p.lse[r] : A(0);
    row_stats.weight[tid] = valid ? p.weight[r] : A(0);
    row_stats.inv_positives[tid] = valid ? p.inv_positives[r] : A(0);
    row_stats.factor[tid] = valid ? p.scale / p.denom[r] : A(0);
    row_stats.label[tid] = valid ? p.labels[r] : 0;
  }
  A out[R][W * kParts];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < W * kParts; ++j) out[i][j] = 0;

  for (int64_t pair = first; pair < last; ++pair) {
    const int64_t col_tile = (row_tile + pair) % p.schedule.tiles, c0 = col_tile * kTile;
    A s[R][R];
    s_tile<T, kTensorCores, kTile>(p.z, p.n, r0, p.z, p.n, c0, p.features, smem.tile, s);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int64_t c = c0 + tx * R + j;
      const bool col_valid = c < p.n;
      const A col_inv_denom = col_valid ? A(1) / p.denom[c] : A(0);
      const A col_lse = col_valid ? p.lse[c] : A(0);
      const A col_w = col_valid ? p.weight[c] : A(0);
      const A col_inv = col_valid ? p.inv_positives[c] : A(0);
      const int64_t col_label = col_valid ? p.labels[c] : 0;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int row = ty * R + i;
        const int64_t r = r0 + row;
        A t = 0;
        if (col_valid && r < p.n && r != c) {
          const A logit = s[i][j] * row_stats.factor[row] * col_inv_denom;
          const bool positive = col_label == row_stats.label[row];
          const A row_w = row_stats.weight[row];
          if (row_w != A(0)) {
            t += row_w * (device_exp(logit - row_stats.lse[row]) - (positive ? row_stats.inv_positives[row] : A(0)));
          }
          if (col_w != A(0) && !SSL_OPS_PLANTED(kDropTransposedTerm)) t += col_w * (device_exp(logit - col_lse) - (positive ? col_inv : A(0)));
          t *= p.scale;
        }
        coef[tx * R + j][ty * R + i] = t;
      }
    }
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const int64_t chunk_d0 = d0 + part * kChunk;
      // out_I += coef . zh_K (the barrier in stage_unit_rows also publishes coef)
      stage_unit_rows<T, kTile>(p, c0, chunk_d0, smem.chunk);
      add_chunk_product<true, R, W>(coef, smem.chunk, out, part * W);
      __syncthreads();
      if (col_tile == row_tile) continue;
      // out_K += coef^T . zh_I, flushed now: thread rows are the tile's columns.
      stage_unit_rows<T, kTile>(p, r0, chunk_d0, smem.chunk);
      A flush[R][W];
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < W; ++j) flush[i][j] = 0;
      add_chunk_product<false, R, W>(coef, smem.chunk, flush, 0);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t c = c0 + ty * R + i;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const int64_t feature = chunk_d0 + tx * W + j;
          if (c < p.n && feature < p.features) atomicAdd(p.out + c * p.features + feature, flush[i][j]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
#pragma unroll
    for (int j = 0; j < W * kParts; ++j) {
      const int64_t feature = d0 + (j / W) * kChunk + tx * W + j % W;
      if (r < p.n && feature < p.features) atomicAdd(p.out + r * p.features + feature, out[i][j]);
    }
  }
}

}  // namespace ssl_ops::cuda
