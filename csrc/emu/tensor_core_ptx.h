#pragma once
// Host versions of the PTX instructions of csrc/cuda/tensor_core_ptx.cuh:
// mma.sync (m16n8k16 bf16/fp16, m16n8k8 tf32), ldmatrix.x4 (and .trans) and
// cp.async.cg with its commit and wait groups.
//
// mma and ldmatrix are warp collectives: every lane of the warp must arrive,
// and each lane gets exactly the elements the PTX ISA's fragment layouts give
// it (shared/fused-kernel-facts.md §3), so a fragment built for the wrong lane
// is a wrong answer here as on the GPU. Products are exact; each output sums
// them in fp32 in k order under schedule seed 0, otherwise from a rotation of
// its own (tensor cores round sums in an unspecified order).
//
// cp.async reads its source at issue and lands in shared memory later: under
// schedule seed 0 only at the wait_group that covers it (as late as allowed),
// under other seeds at a random one of the issuing thread's later
// synchronisation points. A missing wait_group or barrier reads the poisoned
// (0xff) or stale bytes. ldmatrix rows and cp.async destinations must lie in
// the block's dynamic shared memory, 16-byte aligned, as on the GPU.
#include <cstdint>

namespace ssl_emu {

enum class MmaOperand : int { kBf16, kFp16, kTf32 };

// d (4 fp32 per lane) += A (16 x 16, 4 registers) * B (16 x 8, 2 registers).
void mma_m16n8k16(MmaOperand type, float* d, const uint32_t* a, const uint32_t* b);
// d += A (16 x 8 tf32, 4 registers) * B (8 x 8, 2 registers).
void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b);
// Four 8 x 8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
void ldmatrix_x4(uint32_t* r, const void* row, bool transposed);

// A 32-bit load of shared memory: 4-byte aligned, inside the block's dynamic shared memory.
uint32_t ld_shared_b32(const void* p);

void cp_async_16(void* shared_dst, const void* global_src, unsigned src_bytes);
void cp_async_commit();
// Lands every committed group but the `pending` most recent ones.
void cp_async_wait(int pending);

}  // namespace ssl_emu
