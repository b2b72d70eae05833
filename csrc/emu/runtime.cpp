// The emulator's scheduler: runs each block's CUDA threads as fibers (fiber_context.h),
// switching only at synchronisation points, in an order drawn from the seed.
#include <atomic>
#include <c10/util/Exception.h>

#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"
#include "fiber_context.h"
#include "tensor_core_ptx.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SSL_EMU_ASAN 1
#endif

namespace ssl_emu {

ThreadContext* g_current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // an H100 block's opt-in maximum
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // without the opt-in
constexpr size_t kPortableParamBytes = 4096;    // portable kernel-parameter limit
constexpr size_t kLargeParamBytes = 32764;      // CUDA 12.1+ with a 12.1+ driver
constexpr size_t kSmemAlignment = 128;

// A cp.async in flight: its source bytes, read at issue, and its commit group
// (-1 until committed).
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
  int64_t group;
};

struct Fiber {
  ThreadContext ctx{};
  std::vector<AsyncCopy> copies;
  int64_t groups_committed = 0;
  FiberContext context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  const char* waiting_at = nullptr;  // for deadlock reports
#if defined(SSL_EMU_ASAN)
  void* fake_stack = nullptr;
  // Left mid-kernel (a fault or a deadlock): its frames' redzones are still
  // poisoned, and the next kernel on this stack would trip over them.
  // (ASan's swapcontext interceptor clears a stack it switches to; our switch
  // does not, so run_block clears such a stack before reusing it.)
  bool abandoned = false;
#endif
};

struct WarpState {
  unsigned existing = 0;  // lanes of this warp that exist in the block
  unsigned mask = 0;      // lanes taking part in the collective in progress
  unsigned arrived = 0;
  unsigned read = 0;
  bool reading = false;  // all arrived; lanes are reading the slots
  const char* op = nullptr;
  uint64_t slots[32] = {};
};

struct Emulator {
  std::mutex mutex;  // launches from several host threads run one at a time
  std::mt19937_64 rng{0};
  uint64_t seed = 0;
  uint64_t launches = 0;
  uint64_t block_tail = 0;  // set_block_tail; 0: every block
  std::string pending_error;
  std::unordered_map<const void*, size_t> smem_opt_in;  // allow_dynamic_smem, per kernel

  // The block being run.
  std::vector<Fiber> fibers;
  unsigned thread_count = 0;
  std::vector<WarpState> warps;
  unsigned barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  uint64_t events = 0;  // arrivals and exits: a scheduling pass without one is a deadlock
  std::string error;
  Fiber* running = nullptr;
  FiberContext scheduler;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
#if defined(SSL_EMU_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

Emulator& emu() {
  static Emulator instance;
  return instance;
}

void land(std::vector<AsyncCopy>& copies, size_t i) {
  std::memcpy(copies[i].dst, copies[i].bytes, 16);
  copies.erase(copies.begin() + static_cast<std::ptrdiff_t>(i));
}

// One of the running thread's synchronisation points: under a shuffled
// schedule each copy in flight lands here with probability 1/2 (in issue order
// or not: PTX orders none of them); under seed 0 none lands before its wait.
void async_copy_chance(Emulator& e, Fiber& f) {
  if (e.seed == 0) return;
  for (size_t i = f.copies.size(); i-- > 0;) {
    if (e.rng() & 1u) land(f.copies, i);
  }
}

// Copies never waited for still land (after the kernel needed them). Not
// inlined: fiber_main never returns, so a stack object of its own would leave
// its ASan redzones poisoned for the next thread started on that stack.
[[gnu::noinline]] void land_remaining_copies(Fiber& f) {
  while (!f.copies.empty()) land(f.copies, 0);
}

void enter_fiber(Emulator& e, Fiber& f) {
  e.running = &f;
  g_current = &f.ctx;
#if defined(SSL_EMU_ASAN)
  void* scheduler_fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, f.stack.get(), kStackBytes);
#endif
  switch_context(e.scheduler, f.context);
#if defined(SSL_EMU_ASAN)
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
  e.running = nullptr;
  g_current = nullptr;
}

// Back to the scheduler; `final` when this fiber will never be resumed.
void leave_fiber(Emulator& e, Fiber& f, bool final) {
#if defined(SSL_EMU_ASAN)
  __sanitizer_start_switch_fiber(
      final ? nullptr : &f.fake_stack, e.scheduler_stack_bottom, e.scheduler_stack_size);
#endif
  switch_context(f.context, e.scheduler);
#if defined(SSL_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &e.scheduler_stack_bottom, &e.scheduler_stack_size);
#endif
  (void)final;
}

void fiber_main() {
  Emulator& e = emu();
  Fiber& f = *e.running;
#if defined(SSL_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &e.scheduler_stack_bottom, &e.scheduler_stack_size);
#endif
  e.body(e.body_arg);
  land_remaining_copies(f);
  f.done = true;
  ++e.events;
  leave_fiber(e, f, /*final=*/true);
}

template <typename Pred>
void wait_until(Pred ready, const char* where) {
  Emulator& e = emu();
  Fiber& f = *e.running;
  while (!ready()) {
    f.waiting_at = where;
    leave_fiber(e, f, false);
  }
  f.waiting_at = nullptr;
}

std::string describe(const uint3& v) {
  std::ostringstream s;
  s << "(" << v.x << "," << v.y << "," << v.z << ")";
  return s.str();
}

std::string deadlock_report(const Emulator& e) {
  std::ostringstream s;
  s << "deadlock in block " << describe(e.fibers[0].ctx.block_idx) << ":";
  int shown = 0;
  for (unsigned i = 0; i < e.thread_count && shown < 6; ++i) {
    const Fiber& f = e.fibers[i];
    s << " thread " << describe(f.ctx.thread_idx)
      << (f.done ? " has exited;" : std::string(" waits at ") + f.waiting_at + ";");
    ++shown;
  }
  s << " (a barrier or warp collective that not every thread reaches)";
  return s.str();
}

void run_block(Emulator& e, uint3 block_idx, dim3 grid, dim3 block) {
  for (unsigned i = 0; i < e.thread_count; ++i) {
    Fiber& f = e.fibers[i];
    f.ctx.thread_idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.ctx.block_idx = block_idx;
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    f.ctx.lane = i % 32;
    f.ctx.warp = i / 32;
    f.done = false;
    f.waiting_at = nullptr;
    f.copies.clear();
    f.groups_committed = 0;
#if defined(SSL_EMU_ASAN)
    if (f.abandoned) ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);
    f.abandoned = false;
#endif
    start_context(f.context, f.stack.get(), kStackBytes, &fiber_main);
  }
  for (unsigned w = 0; w < e.warps.size(); ++w) {
    const unsigned lanes = std::min(32u, e.thread_count - 32 * w);
    e.warps[w] = WarpState{};
    e.warps[w].existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  }
  e.barrier_arrived = 0;
  // Uninitialised on the GPU: poison it so a read before a write shows.
  std::fill(e.smem, e.smem + e.smem_bytes, 0xff);

  std::vector<unsigned> order(e.thread_count);
  std::iota(order.begin(), order.end(), 0u);
  unsigned remaining = e.thread_count;
  while (remaining > 0) {
    if (e.seed != 0) std::shuffle(order.begin(), order.end(), e.rng);
    const uint64_t events_before = e.events;
    for (unsigned i : order) {
      Fiber& f = e.fibers[i];
      if (f.done) continue;
      enter_fiber(e, f);
      if (!e.error.empty()) return;
      if (f.done) --remaining;
    }
    if (remaining > 0 && e.events == events_before) {
      e.error = deadlock_report(e);
      return;
    }
  }
}

std::string check_config(dim3 grid, dim3 block, size_t smem, size_t opted_in, size_t param_bytes) {
  std::ostringstream s;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    s << "invalid block (" << block.x << "," << block.y << "," << block.z << ")";
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
             grid.y > 65535 || grid.z > 65535) {
    s << "invalid grid (" << grid.x << "," << grid.y << "," << grid.z << ")";
  } else if (smem > kMaxDynamicSmem) {
    s << "dynamic shared memory of " << smem << " bytes exceeds " << kMaxDynamicSmem;
  } else if (smem > kDefaultDynamicSmem && smem > opted_in) {
    s << "dynamic shared memory of " << smem << " bytes exceeds " << kDefaultDynamicSmem
      << " without cudaFuncAttributeMaxDynamicSharedMemorySize (allowed: " << opted_in << ")";
  } else if (const size_t limit = driver_version() >= 12010 ? kLargeParamBytes : kPortableParamBytes;
             param_bytes > limit) {
    s << "kernel parameters take " << param_bytes << " bytes, over the " << limit << "-byte limit";
  }
  return s.str();
}

}  // namespace

void syncthreads() {
  Emulator& e = emu();
  async_copy_chance(e, *e.running);
  const uint64_t generation = e.barrier_generation;
  ++e.events;
  if (++e.barrier_arrived == e.thread_count) {
    e.barrier_arrived = 0;
    ++e.barrier_generation;
  }
  // Always yield, so the threads leave the barrier in a freshly drawn order.
  Fiber& f = *e.running;
  f.waiting_at = "__syncthreads()";
  do {
    leave_fiber(e, f, false);
  } while (e.barrier_generation == generation);
  f.waiting_at = nullptr;
}

const uint64_t* warp_gather(unsigned mask, uint64_t value, const char* op) {
  Emulator& e = emu();
  async_copy_chance(e, *e.running);
  const ThreadContext& ctx = current();
  WarpState& w = e.warps[ctx.warp];
  const unsigned lane_bit = 1u << ctx.lane;
  mask &= w.existing;  // lanes past the end of a partial warp do not exist
  if (!(mask & lane_bit)) fail("a lane called a warp collective with a mask that excludes it");
  // Wait for the previous collective to be read; disjoint lane groups take turns.
  wait_until([&] { return !w.reading && (w.arrived == 0 || (w.mask & mask) != 0); }, op);
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
  } else if (w.mask != mask || std::strcmp(w.op, op) != 0) {
    fail("lanes of one warp reached different warp collectives or masks");
  }
  w.slots[ctx.lane] = value;
  w.arrived |= lane_bit;
  ++e.events;
  if (w.arrived == w.mask) w.reading = true;
  wait_until([&] { return w.reading; }, op);
  return w.slots;
}

void warp_release() {
  Emulator& e = emu();
  const ThreadContext& ctx = current();
  WarpState& w = e.warps[ctx.warp];
  w.read |= 1u << ctx.lane;
  ++e.events;
  if (w.read == w.mask) {
    w.reading = false;
    w.arrived = 0;
    w.read = 0;
  }
}

bool warp_first_reader() {
  const Emulator& e = emu();
  return e.warps[current().warp].read == 0;
}

void cp_async_16(void* shared_dst, const void* global_src, unsigned src_bytes) {
  Emulator& e = emu();
  auto* dst = static_cast<unsigned char*>(shared_dst);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(global_src) % 16 != 0) {
    fail("cp.async: a 16-byte copy's source or destination is not 16-byte aligned");
  }
  if (dst < e.smem || dst + 16 > e.smem + e.smem_bytes) {
    fail("cp.async: the destination is outside the block's dynamic shared memory");
  }
  if (src_bytes > 16) fail("cp.async: src-size is over the copy's 16 bytes");
  Fiber& f = *e.running;
  async_copy_chance(e, f);
  AsyncCopy copy{dst, {}, -1};
  // Only src_bytes are read (the rest is zero-filled), so ASan sees a short source.
  if (src_bytes > 0) std::memcpy(copy.bytes, global_src, src_bytes);
  f.copies.push_back(copy);
}

void cp_async_commit() {
  Emulator& e = emu();
  Fiber& f = *e.running;
  async_copy_chance(e, f);
  for (AsyncCopy& copy : f.copies) {
    if (copy.group < 0) copy.group = f.groups_committed;
  }
  ++f.groups_committed;
}

void cp_async_wait(int pending) {
  Emulator& e = emu();
  Fiber& f = *e.running;
  async_copy_chance(e, f);
  const int64_t complete_below = f.groups_committed - pending;
  for (size_t i = f.copies.size(); i-- > 0;) {
    if (f.copies[i].group >= 0 && f.copies[i].group < complete_below) land(f.copies, i);
  }
}

unsigned warp_existing_lanes() { return emu().warps[current().warp].existing; }

void fail(const char* what) {
  Emulator& e = emu();
  const ThreadContext& ctx = current();
  if (e.error.empty()) {
    e.error = std::string(what) + " (block " + describe(ctx.block_idx) + ", thread " +
        describe(ctx.thread_idx) + ")";
  }
  leave_fiber(e, *e.running, /*final=*/true);
  std::abort();  // never resumed
}

void* dynamic_smem() { return emu().smem; }
size_t dynamic_smem_bytes() { return emu().smem_bytes; }

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (bytes <= kMaxDynamicSmem) e.smem_opt_in[kernel] = bytes;  // past the maximum the GPU refuses it
}

void run_grid(
    const void* kernel, dim3 grid, dim3 block, size_t smem, size_t param_bytes, void (*body)(void*), void* arg) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  TORCH_CHECK(
      e.pending_error.empty(),
      "ssl_emu: a kernel launch was made while the error of the previous one was never checked: ",
      e.pending_error);
  ++e.launches;
  const auto opt_in = e.smem_opt_in.find(kernel);
  std::string config_error =
      check_config(grid, block, smem, opt_in == e.smem_opt_in.end() ? 0 : opt_in->second, param_bytes);
  if (!config_error.empty()) {
    e.pending_error = "invalid launch configuration: " + config_error;
    return;
  }
  e.thread_count = block.x * block.y * block.z;
  if (e.fibers.size() < e.thread_count) {
    const size_t old = e.fibers.size();
    e.fibers.resize(e.thread_count);
    for (size_t i = old; i < e.fibers.size(); ++i) {
      e.fibers[i].stack = std::make_unique<char[]>(kStackBytes);
    }
  }
  e.warps.assign((e.thread_count + 31) / 32, WarpState{});
  e.smem_storage.assign(smem + kSmemAlignment, 0);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(e.smem_storage.data());
  e.smem = reinterpret_cast<unsigned char*>((raw + kSmemAlignment - 1) & ~(kSmemAlignment - 1));
  e.smem_bytes = smem;
  e.body = body;
  e.body_arg = arg;
  e.error.clear();

  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t{0});
  if (e.seed != 0) std::shuffle(block_order.begin(), block_order.end(), e.rng);
  for (uint64_t b : block_order) {
    if (e.block_tail != 0 && b + e.block_tail < blocks) continue;
    const uint3 idx{
        unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    run_block(e, idx, grid, block);
    if (!e.error.empty()) {
#if defined(SSL_EMU_ASAN)
      for (unsigned i = 0; i < e.thread_count; ++i) e.fibers[i].abandoned = !e.fibers[i].done;
#endif
      e.pending_error = e.error;
      return;
    }
  }
}

void check_launch() {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  std::string error;
  std::swap(error, e.pending_error);
  TORCH_CHECK(error.empty(), "CUDA kernel failed (host emulation): ", error);
}

void set_schedule_seed(uint64_t seed) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.seed = seed;
  e.rng.seed(seed);
}

uint64_t launch_count() { return emu().launches; }
uint64_t schedule_seed() { return emu().seed; }

void set_block_tail(uint64_t count) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.block_tail = count;
}

namespace {
std::atomic<uint64_t> mma_calls{0};
}  // namespace
uint64_t mma_count() { return mma_calls.load(std::memory_order_relaxed); }
void count_mma() { mma_calls.fetch_add(1, std::memory_order_relaxed); }

namespace {
std::atomic<uint64_t> half_gemm_calls{0};
}  // namespace
uint64_t half_gemm_count() { return half_gemm_calls.load(std::memory_order_relaxed); }
void count_half_gemm() { half_gemm_calls.fetch_add(1, std::memory_order_relaxed); }

namespace {
std::atomic<int> planted{0};
}
namespace {
std::atomic<int> emulated_capability{90};
}  // namespace
int compute_capability() { return emulated_capability.load(std::memory_order_relaxed); }
void set_compute_capability(int capability) {
  TORCH_CHECK(capability == 70 || capability == 75 || capability == 80 || capability == 86 ||
                  capability == 89 || capability == 90,
              "the emulator pretends to be sm_70, 75, 80, 86, 89 or 90; got ", capability);
  emulated_capability.store(capability, std::memory_order_relaxed);
}

namespace {
std::atomic<int> emulated_driver{12000};
}  // namespace
int driver_version() { return emulated_driver.load(std::memory_order_relaxed); }
void set_driver_version(int version) {
  TORCH_CHECK(version >= 11000, "the emulated driver's CUDA version is major * 1000 + minor * 10, got ", version);
  emulated_driver.store(version, std::memory_order_relaxed);
}

PlantedBug planted_bug() { return static_cast<PlantedBug>(planted.load(std::memory_order_relaxed)); }
void set_planted_bug(int bug) {
  TORCH_CHECK(bug >= 0 && bug <= static_cast<int>(PlantedBug::kPlainTilesAddNothing), "unknown planted bug ", bug);
  planted.store(bug, std::memory_order_relaxed);
}

}  // namespace ssl_emu
