#pragma once
// Note [Launch limits]: every kernel's launch configuration, against the
// limits of every GPU we build for (sm_70-sm_90): grid.x <= 2^31 - 1, grid.y
// and grid.z <= 65535, 1024 threads per block, 48 KB of static shared memory,
// 4096 bytes of kernel parameters (32764 with CUDA 12.1+ and a 12.1+ driver).
// Each grid is built by checked_grid below, so no size is truncated into a
// dim3 and an oversized launch is an error that names the sizes; the rows
// below give each kernel's limit in the user's terms (tile = 64 rows, 32 for
// fp64; counts from the code at each launch).
//
//  kernel (file)                         grid                        user-facing limit / host check
//  row_denom, finish_rows, row_dot,      x = ceil(rows / 8)          rows <= 8 (2^31 - 1) = 1.7e10: row_grid
//    cosine_rows(_backward)
//  fused_row_stats, fused_grad          x = ceil(rows / 64);        rows <= 64 (2^31 - 1); splits <= 2 waves
//    (contrastive_fused.cuh)              y = column splits           of CTAs (~1056 on 132 SMs) < 65535
//  fused_sum_splits, fused_query_grad   x = ceil(rows d / 1024)     rows d <= 1024 (2^31 - 1)
//  gemm_row_stats / merge / coef         (chunk rows, splits)        chunk rows <= 2^31 - 1, splits <= 65535:
//    (contrastive_gemm.cu)                                              before the chunk buffer is allocated
//  siglip_rows (siglip.cu)               (chunk rows, splits)        as the GEMM route (siglip_chunks.h)
//  clip_row_stats, clip_coefficients     (chunk rows, splits)        as the GEMM route (clip_chunks.h)
//  clip_column_stats / _merge            (ceil(B / 256), slices)     B <= 256 (2^31 - 1); slices <= 8 waves
//    (contrastive_clip.cu)                                              of blocks (~1056 on 132 SMs)
//  cosine_matrix_kernel                  x = tiles (b = None: the    tiles <= 2^31 - 1, e.g. b = None needs
//                                          upper triangle)             M <= 4,194,240 (fp64 2,097,120):
//                                                                      checked before the output is allocated
//  ema_multi_tensor_kernel (ema.cu)      x <= 320 (3072) table rows  bounded by the table; parameters
//                                                                      static_assert'ed per table; the int32
//                                                                      chunk index: numel <= 2^31 chunk_size
// Threads per block are constants (256; 512 for the EMA), each kernel's
// __launch_bounds__. Static shared memory is checked at build time: ptxas
// refuses a kernel over 48 KB (each kernel's figure is in its file). Dynamic
// shared memory: the fused kernels only, at most 50 KB, opted in past 48 KB by
// launch_kernel (compat.cuh).
// The emulator checks every launch against the same limits (csrc/emu/runtime.cpp).
#include <c10/util/Exception.h>

#include <cstdint>

#include "../message.h"
#include "compat.cuh"

namespace ssl_ops::cuda {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

// A grid of (x, y, z) blocks for `what` (the kernel and what its dimensions
// count), or an error that names them.
inline dim3 checked_grid(const char* what, int64_t x, int64_t y = 1, int64_t z = 1) {
  TORCH_CHECK(x >= 1 && y >= 1 && z >= 1 && x <= kMaxGridX && y <= kMaxGridYZ && z <= kMaxGridYZ,
              ssl_ops::message("ssl_ops: ", what, " needs a grid of (", x, ", ", y, ", ", z,
                               ") blocks; CUDA launches take at most (", kMaxGridX, ", ", kMaxGridYZ, ", ",
                               kMaxGridYZ, ")"));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

}  // namespace ssl_ops::cuda
