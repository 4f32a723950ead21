/* Entry stub and interrupt stubs of the built-in guest.
 *
 * Every vCPU enters _start in 64-bit long mode (CS=0x08, data 0x10,
 * identity-mapped paging over 0..4 GiB, RFLAGS=0x2), with RSI = the
 * guest-physical address of the Linux boot_params zero page. RSP is
 * undefined: pick this vCPU's stack from its LAPIC ID first.
 */

#define LAPIC_ID_REG   0xFEE00020
#define STACK_SIZE     4096
#define NR_STACKS      256

    .section .text.entry, "ax", @progbits
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    movl    $LAPIC_ID_REG, %eax         /* zero-extends: 0x00000000FEE00020 */
    movl    (%rax), %eax
    shrl    $24, %eax                   /* eax = LAPIC ID (0..255) */
    movl    %eax, %edi                  /* arg0: vCPU id */
    incl    %eax
    shll    $12, %eax                   /* (id + 1) * STACK_SIZE */
    addq    $guest_stacks, %rax
    movq    %rax, %rsp
    xorl    %ebp, %ebp
    /* arg1 (RSI) already holds the zero-page address */
    call    guest_main
1:  cli
    hlt
    jmp     1b
    .size _start, . - _start

/* spin_forever: a busy loop that never exits to the VMM (no memory,
 * no port I/O, no pause). */
    .section .text
    .globl spin_forever
    .type spin_forever, @function
spin_forever:
1:  jmp     1b
    .size spin_forever, . - spin_forever

/* Interrupt stubs: 256 entries of 16 bytes each, isr_stubs + 16 * vector.
 * Vectors without a CPU-pushed error code push a dummy 0, then every stub
 * pushes its vector number and jumps to isr_common. */
#define ERRCODE_MASK 0x60227D00 /* 8, 10-14, 17, 21, 29, 30 */

    .section .text
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if vec < 32
    .if ((ERRCODE_MASK >> vec) & 1) == 0
    pushq   $0
    .endif
    .else
    pushq   $0
    .endif
    pushq   $vec
    jmp     isr_common
    .set vec, vec + 1
    .endr

/* Frame on entry to isr_common (from low to high addresses):
 *   vector, error code, RIP, CS, RFLAGS, RSP, SS
 * Save all caller-saved registers, call isr_dispatch(frame), restore,
 * drop vector + error code, iretq. RSP is 16-byte aligned at the call:
 * the CPU aligns RSP to 16 before pushing its 5-qword frame, the stub
 * adds 2 qwords (error code + vector) and we add 9 more. */
    .type isr_common, @function
isr_common:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    cld
    leaq    72(%rsp), %rdi              /* -> vector, error code, RIP, ... */
    call    isr_dispatch
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    addq    $16, %rsp
    iretq
    .size isr_common, . - isr_common

/* Per-vCPU stacks (not loaded from the file; contents undefined). */
    .section .bss
    .balign 4096
    .globl guest_stacks
guest_stacks:
    .skip   STACK_SIZE * NR_STACKS
    .size guest_stacks, . - guest_stacks

    .section .note.GNU-stack, "", @progbits
