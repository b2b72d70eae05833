#pragma once
// The emulator's context switch between fibers (runtime.cpp): a fiber is a
// stack and the saved stack pointer of its suspended state.
//
// On x86-64 the switch saves only what the System V ABI makes a callee keep
// (rbx, rbp, r12-r15, the MXCSR and x87 control words) on the stack being left.
// swapcontext also saves and restores the signal mask, a system call per switch,
// and the fibers never touch signals: a 40 x 32 NT-Xent call on the emulated
// GEMM route took 0.55 s with it, 0.07 s with this (2-core CPU, 2026-12-03). Elsewhere the fallback is ucontext.
// Included by runtime.cpp alone: it defines the switch function.
#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)

extern "C" void ssl_emu_switch_stack(void** save_sp, void* load_sp);

// save_sp: where the suspended side's stack pointer goes; load_sp: the side resumed.
asm(R"(
    .text
    .p2align 4
    .globl ssl_emu_switch_stack
    .hidden ssl_emu_switch_stack
    .type ssl_emu_switch_stack, @function
ssl_emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ssl_emu_switch_stack, .-ssl_emu_switch_stack
)");

namespace ssl_emu {

struct FiberContext {
  void* sp = nullptr;
};

// Lays out a first frame on the stack [stack, stack + bytes) as
// ssl_emu_switch_stack leaves one, whose return address is `entry`: the first
// switch to the fiber starts entry(), which must never return.
inline void start_context(FiberContext& f, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  // After the switch's ret, rsp = top - 8: 8 mod 16, as at any function entry.
  auto* frame = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  frame[0] = uint64_t(mxcsr) | (uint64_t(fpu_control) << 32);
  for (int r = 1; r <= 6; ++r) frame[r] = 0;  // r15, r14, r13, r12, rbx, rbp
  frame[7] = reinterpret_cast<uint64_t>(entry);
  frame[8] = 0;  // entry's return address: it never returns
  f.sp = frame;
}

inline void switch_context(FiberContext& from, FiberContext& to) { ssl_emu_switch_stack(&from.sp, to.sp); }

}  // namespace ssl_emu

#else  // not x86-64

#include <ucontext.h>

namespace ssl_emu {

struct FiberContext {
  ucontext_t uc{};
};

inline void start_context(FiberContext& f, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = bytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, entry, 0);
}

inline void switch_context(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace ssl_emu

#endif
