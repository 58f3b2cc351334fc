// Test build only: the stack switch under the CUDA emulation's fibers
// (csrc/emulated/emulation.h). A switch saves the callee-saved registers and the
// floating-point control words on the current stack and loads another stack, with no
// system call, where swapcontext makes one for the signal mask on every switch.
#define ATTENTION_EXT_CUDA_EMULATION 1

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "emulation.h"

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

// attention_ext_emu_switch_stack(void** save, void* load), System V x86-64. The saved
// frame, from the stack pointer up: MXCSR (4 bytes), x87 control word (4 bytes), r15, r14,
// r13, r12, rbx, rbp, return address.
// attention_ext_emu_fiber_start: where a new stack's first switch returns; r12 holds the
// entry function and r13 its argument (new_stack puts them there).
asm(R"(
  .pushsection .text
  .globl attention_ext_emu_switch_stack
  .type attention_ext_emu_switch_stack, @function
attention_ext_emu_switch_stack:
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
  .size attention_ext_emu_switch_stack, .-attention_ext_emu_switch_stack

  .globl attention_ext_emu_fiber_start
  .type attention_ext_emu_fiber_start, @function
attention_ext_emu_fiber_start:
  movq %r13, %rdi
  andq $-16, %rsp
  callq *%r12
  ud2
  .size attention_ext_emu_fiber_start, .-attention_ext_emu_fiber_start
  .popsection
)");

extern "C" void attention_ext_emu_fiber_start();

namespace attention_ext::emu {

void* new_stack(char* base, std::size_t size, void (*entry)(void*), void* arg) {
  // The frame attention_ext_emu_switch_stack pops, at the 16-byte aligned top of the stack.
  auto top = reinterpret_cast<std::uintptr_t>(base + size) & ~std::uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(&frame[0], control, sizeof(control));
  frame[1] = 0;                                              // r15
  frame[2] = 0;                                              // r14
  frame[3] = reinterpret_cast<uint64_t>(arg);                // r13
  frame[4] = reinterpret_cast<uint64_t>(entry);              // r12
  frame[5] = 0;                                              // rbx
  frame[6] = 0;                                              // rbp
  frame[7] = reinterpret_cast<uint64_t>(&attention_ext_emu_fiber_start);  // return address
  return frame;
}

}  // namespace attention_ext::emu
