// The warp-collective PTX instructions of tensor_core_ptx.h. The first lane to
// leave the collective computes the whole warp's result while the other lanes
// are still parked inside it, so their operand registers are intact, and
// writes each lane's outputs into its registers.
#include "tensor_core_ptx.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "cuda_emu.h"

namespace ssl_emu {
namespace {

float operand_value(MmaOperand type, uint32_t bits) {
  switch (type) {
    case MmaOperand::kBf16:
      return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
    case MmaOperand::kFp16:
      return c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits());
    case MmaOperand::kTf32: {
      const uint32_t truncated = bits & 0xffffe000u;  // the tensor cores read 10 mantissa bits
      float v;
      std::memcpy(&v, &truncated, 4);
      return v;
    }
  }
  return 0.0f;
}

struct MmaLane {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
};

// Gathers every lane's MmaLane; true for the lane that must compute for all.
const MmaLane* const* gather_lanes(const MmaLane* mine, const char* op, bool* first) {
  if (warp_existing_lanes() != 0xffffffffu) fail("a tensor-core instruction needs all 32 lanes of a warp");
  const uint64_t* slots = warp_gather(0xffffffffu, reinterpret_cast<uintptr_t>(mine), op);
  *first = warp_first_reader();
  return reinterpret_cast<const MmaLane* const*>(slots);
}

// K-element dot products into the 16 x 8 accumulator, in a seeded order per element.
template <int K, typename GetA, typename GetB>
void multiply(const MmaLane* const* lanes, GetA get_a, GetB get_b) {
  float a[16][K], b[K][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    get_a(lanes[lane]->a, g, t, a);
    get_b(lanes[lane]->b, g, t, b);
    for (int i = 0; i < 4; ++i) c[g + 8 * (i >> 1)][2 * t + (i & 1)] = lanes[lane]->d[i];
  }
  const uint64_t seed = schedule_seed();
  for (int row = 0; row < 16; ++row) {
    for (int col = 0; col < 8; ++col) {
      float sum = c[row][col];
      const int start = seed == 0 ? 0 : static_cast<int>((seed * 0x9E3779B97F4A7C15ull + row * 131 + col * 7) % K);
      for (int step = 0; step < K; ++step) {
        const int k = (start + step) % K;
        sum += a[row][k] * b[k][col];
      }
      c[row][col] = sum;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) lanes[lane]->d[i] = c[g + 8 * (i >> 1)][2 * t + (i & 1)];
  }
  count_mma();
}

}  // namespace

void mma_m16n8k16(MmaOperand type, float* d, const uint32_t* a, const uint32_t* b) {
  const MmaLane mine{d, a, b};
  bool first = false;
  const MmaLane* const* lanes = gather_lanes(&mine, "mma.sync.m16n8k16", &first);
  if (first) {
    // PTX ISA, m16n8k16 fragments: register j holds two elements, low half first.
    multiply<16>(
        lanes,
        [type](const uint32_t* regs, int g, int t, float (&out)[16][16]) {
          for (int j = 0; j < 4; ++j) {
            for (int h = 0; h < 2; ++h) {
              out[g + 8 * (j & 1)][2 * t + h + 8 * (j >> 1)] = operand_value(type, regs[j] >> (16 * h) & 0xffffu);
            }
          }
        },
        [type](const uint32_t* regs, int g, int t, float (&out)[16][8]) {
          for (int j = 0; j < 2; ++j) {
            for (int h = 0; h < 2; ++h) out[2 * t + h + 8 * j][g] = operand_value(type, regs[j] >> (16 * h) & 0xffffu);
          }
        });
  }
  warp_release();
}

void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b) {
  const MmaLane mine{d, a, b};
  bool first = false;
  const MmaLane* const* lanes = gather_lanes(&mine, "mma.sync.m16n8k8.tf32", &first);
  if (first) {
    multiply<8>(
        lanes,
        [](const uint32_t* regs, int g, int t, float (&out)[16][8]) {
          for (int i = 0; i < 4; ++i) out[g + 8 * (i & 1)][t + 4 * (i >> 1)] = operand_value(MmaOperand::kTf32, regs[i]);
        },
        [](const uint32_t* regs, int g, int t, float (&out)[8][8]) {
          for (int i = 0; i < 2; ++i) out[t + 4 * i][g] = operand_value(MmaOperand::kTf32, regs[i]);
        });
  }
  warp_release();
}

namespace {
struct LdmatrixLane {
  uint32_t* r;
  const unsigned char* row;
};

uint16_t load_b16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
}  // namespace

uint32_t ld_shared_b32(const void* p) {
  const auto* bytes = static_cast<const unsigned char*>(p);
  const auto* smem = static_cast<const unsigned char*>(dynamic_smem());
  if (reinterpret_cast<uintptr_t>(bytes) % 4 != 0) fail("ld.shared.b32: the address is not 4-byte aligned");
  if (bytes < smem || bytes + 4 > smem + dynamic_smem_bytes()) {
    fail("ld.shared.b32: the address is outside the block's dynamic shared memory");
  }
  uint32_t v;
  std::memcpy(&v, bytes, 4);
  return v;
}

void ldmatrix_x4(uint32_t* r, const void* row, bool transposed) {
  const auto* bytes = static_cast<const unsigned char*>(row);
  const auto* smem = static_cast<const unsigned char*>(dynamic_smem());
  if (reinterpret_cast<uintptr_t>(bytes) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
  if (bytes < smem || bytes + 16 > smem + dynamic_smem_bytes()) {
    fail("ldmatrix: a row address is outside the block's dynamic shared memory");
  }
  if (warp_existing_lanes() != 0xffffffffu) fail("ldmatrix needs all 32 lanes of a warp");
  const LdmatrixLane mine{r, bytes};
  const uint64_t* slots = warp_gather(0xffffffffu, reinterpret_cast<uintptr_t>(&mine),
                                      transposed ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  if (warp_first_reader()) {
    const auto* const* lanes = reinterpret_cast<const LdmatrixLane* const*>(slots);
    uint32_t out[32][4];
    for (int lane = 0; lane < 32; ++lane) {
      for (int j = 0; j < 4; ++j) {
        if (!transposed) {
          // Row lane / 4 of matrix j, 16-bit columns 2 (lane % 4) and + 1.
          std::memcpy(&out[lane][j], lanes[8 * j + lane / 4]->row + 4 * (lane % 4), 4);
        } else {
          // Column lane / 4 of matrix j, rows 2 (lane % 4) (low half) and + 1.
          const uint32_t lo = load_b16(lanes[8 * j + 2 * (lane % 4)]->row + 2 * (lane / 4));
          const uint32_t hi = load_b16(lanes[8 * j + 2 * (lane % 4) + 1]->row + 2 * (lane / 4));
          out[lane][j] = lo | hi << 16;
        }
      }
    }
    for (int lane = 0; lane < 32; ++lane) std::memcpy(lanes[lane]->r, out[lane], sizeof(out[lane]));
  }
  warp_release();
}

}  // namespace ssl_emu
