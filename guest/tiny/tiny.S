/* tiny.elf: a minimal guest for start-up benchmarks.
 *
 * It prints "tiny guest up\n" to the 16550 at port 0x3f8, asks the i8042
 * to pulse the reset line (port 0x64 <- 0xFE) and, if that returns (QEMU
 * microvm has no i8042), triple-faults: an IDT with limit 0, then ud2.
 *
 * QEMU boots it via the Xen PVH note in 32-bit protected mode; vmm-fleet
 * enters it at e_entry in 64-bit long mode. Every instruction below is
 * chosen so that its bytes decode to the same operation in both modes
 * (32-bit operand size, no REX, no stack, no 16/64-bit address forms):
 *   fa cli | fc cld | be imm32 mov $imm32,%esi | 66 ba imm16 mov $imm16,%dx
 *   ac lodsb | 84 c0 test %al,%al | 74/eb rel8 | ee out %al,(%dx)
 *   b0 fe mov $0xfe,%al | e6 64 out %al,$0x64 | b8 imm32 mov $imm32,%eax
 *   0f 01 18 lidt (%eax) / (%rax) | 0f 0b ud2 | f4 hlt
 * Check with: objdump -d -M i386 vs objdump -d -M x86-64.
 */

    .section .text.entry, "ax", @progbits
    .code32
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    movl    $message, %esi
    movw    $0x3f8, %dx
1:  lodsb
    testb   %al, %al
    jz      2f
    outb    %al, (%dx)
    jmp     1b
2:  movb    $0xfe, %al
    outb    %al, $0x64
    movl    $null_idt, %eax
    lidt    (%eax)
    ud2
3:  cli
    hlt
    jmp     3b
    .size _start, . - _start

    .section .rodata, "a", @progbits
message:
    .asciz  "tiny guest up\n"
    .balign 8
    /* A zero-limit IDT descriptor: 10 bytes cover both the 6-byte (32-bit)
     * and the 10-byte (64-bit) forms. */
null_idt:
    .quad   0
    .quad   0

/* Xen PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), the 32-bit entry
 * address, stored as a 64-bit value (as Linux does for ELF64; QEMU reads
 * 8 bytes for an ELF64 image, linux-loader reads the low 4). */
    .section .note.Xen, "a", @note
    .balign 4
    .long   4               /* namesz: "Xen\0" */
    .long   8               /* descsz */
    .long   18              /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz  "Xen"
    .balign 4
    .quad   _start
    .balign 4

    .section .note.GNU-stack, "", @progbits
