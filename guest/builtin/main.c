/* The built-in guest of vmm-fleet: a tiny freestanding x86-64 program.
 *
 * Contract with the VMM (see also entry.S and link.ld):
 *  - linked and loaded at 0x100000 (identity mapped, image ends < 0x280000);
 *  - every vCPU enters _start in 64-bit long mode, interrupts off, with
 *    RSI = guest-physical address of the Linux boot_params zero page;
 *  - configuration comes from the kernel command line (key=value tokens):
 *      then=poweroff|reset|crash|spin|idle|flood   io_exits=N   heartbeat_ms=N
 *      echo=0|1   touch=ADDR:N   ro_write=ADDR
 *  - output goes to the 16550 at I/O port 0x3f8, one whole line at a time;
 *  - the BSP writes 0x41 to port 0x80 once every vCPU listed in the MP
 *    table has finished its start-up work ("guest is up");
 *  - then=idle: the BSP takes interrupts: its LAPIC timer (heartbeat), the
 *    keyboard (IRQ 1, routed through the IOAPIC: on Ctrl-Alt-Del it prints
 *    `ctrl-alt-del: powering off` and powers off) and, with echo=1, the UART
 *    (IRQ 4: every byte received is written back, "\r" as "\r\n"). The
 *    8259 PIC is masked. Other modes keep interrupts off and ignore both.
 *
 * Ring-0 code may be run by KVM's instruction emulator: keep to plain,
 * common instructions.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define NULL ((void *)0)

/* ------------------------------------------------------------------ */
/* Hardware access                                                     */

#define COM1 0x3f8
#define PORT_POST 0x80       /* debug port: io_exits and the "up" signal */
#define PORT_I8042 0x64      /* i8042 command/status port: 0xFE = pulse reset */
#define PORT_I8042_DATA 0x60 /* i8042 data port: scancodes */
#define I8042_STATUS_OBF 0x01 /* output buffer full: a byte waits at 0x60 */
#define I8042_CMD_WRITE_CTR 0x60
#define I8042_CTR 0x45       /* translate to set 1 | POST ok | keyboard interrupt */
#define PIC1_DATA 0x21
#define PIC2_DATA 0xA1
#define UART_IER 1
#define UART_LSR 5
#define UART_LSR_DR 0x01     /* a received byte waits */
#define PORT_ACPI_SLEEP 0x600 /* ACPI sleep control: 0x34 = S5 | SLP_EN */

#define LAPIC_BASE 0xFEE00000UL
#define LAPIC_ID 0x020
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_ISR 0x100
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3E0

#define IOAPIC_BASE 0xFEC00000UL
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDTBL(irq) (0x10 + 2 * (irq))

#define HEARTBEAT_VECTOR 0x40
#define KBD_IRQ 1
#define KBD_VECTOR 0x41
#define COM1_IRQ 4
#define COM1_VECTOR 0x44

static inline void outb(u16 port, u8 val)
{
    __asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline u32 lapic_read(u32 reg)
{
    return *(volatile u32 *)(LAPIC_BASE + reg);
}

static inline void lapic_write(u32 reg, u32 val)
{
    *(volatile u32 *)(LAPIC_BASE + reg) = val;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

static __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}

static __attribute__((noreturn)) void idle_forever(void)
{
    for (;;)
        __asm__ volatile("sti; hlt" ::: "memory");
}

/* entry.S */
extern __attribute__((noreturn)) void spin_forever(void);
extern char isr_stubs[];

/* The compiler may emit calls to these even when freestanding. */
void *memset(void *dst, int c, u64 n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

/* ------------------------------------------------------------------ */
/* Serial console, one whole line at a time                            */

static volatile u32 print_lock = 0;

static void lock(volatile u32 *l)
{
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE) != 0) {
        while (*l != 0)
            cpu_relax();
    }
}

static void unlock(volatile u32 *l)
{
    __atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

struct line {
    char buf[128];
    u32 len;
};

static void line_str(struct line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf) - 1)
        l->buf[l->len++] = *s++;
}

static void line_dec(struct line *l, u64 v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < (int)sizeof(tmp));
    while (n > 0 && l->len < sizeof(l->buf) - 1)
        l->buf[l->len++] = tmp[--n];
}

static void line_hex(struct line *l, u64 v)
{
    for (int shift = 60; shift >= 0; shift -= 4) {
        u32 d = (u32)(v >> shift) & 0xf;
        if (l->len < sizeof(l->buf) - 1)
            l->buf[l->len++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    }
}

static void serial_write(const char *s, u32 len)
{
    for (u32 i = 0; i < len; i++)
        outb(COM1, (u8)s[i]);
}

/* Print l followed by "\n" under the print lock. */
static void line_print(struct line *l)
{
    l->buf[l->len++] = '\n';
    lock(&print_lock);
    serial_write(l->buf, l->len);
    unlock(&print_lock);
}

static void print(const char *s)
{
    struct line l;
    l.len = 0; /* buf is filled as written; no zeroing (no rep stos) */
    line_str(&l, s);
    line_print(&l);
}

static void print_num(const char *prefix, u64 v)
{
    struct line l;
    l.len = 0;
    line_str(&l, prefix);
    line_dec(&l, v);
    line_print(&l);
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */

enum then_action { THEN_POWEROFF, THEN_RESET, THEN_CRASH, THEN_SPIN, THEN_IDLE, THEN_FLOOD };

struct config {
    enum then_action then;
    u64 io_exits;
    u64 heartbeat_ms;
    int echo;
    int touch;
    u64 touch_addr;
    u64 touch_pages;
    int ro_write;
    u64 ro_write_addr;
};

#define BP_CMD_LINE_PTR 0x228 /* boot_params.hdr.cmd_line_ptr (u32) */
#define CMDLINE_MAX 4096

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Parse a decimal or 0x-hex number occupying exactly [s, e). */
static int parse_num(const char *s, const char *e, u64 *out)
{
    u64 v = 0;
    if (s >= e)
        return 0;
    if (e - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (; s < e; s++) {
            char c = *s;
            u64 d;
            if (c >= '0' && c <= '9')
                d = (u64)(c - '0');
            else if (c >= 'a' && c <= 'f')
                d = (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                d = (u64)(c - 'A' + 10);
            else
                return 0;
            v = (v << 4) | d;
        }
    } else {
        for (; s < e; s++) {
            if (*s < '0' || *s > '9')
                return 0;
            v = v * 10 + (u64)(*s - '0');
        }
    }
    *out = v;
    return 1;
}

/* Does [s, e) equal the NUL-terminated word w? */
static int span_eq(const char *s, const char *e, const char *w)
{
    while (s < e && *w && *s == *w) {
        s++;
        w++;
    }
    return s == e && *w == 0;
}

static void apply_token(struct config *cfg, const char *k, const char *ke, const char *v,
                        const char *ve)
{
    u64 a, b;
    if (span_eq(k, ke, "then")) {
        if (span_eq(v, ve, "poweroff"))
            cfg->then = THEN_POWEROFF;
        else if (span_eq(v, ve, "reset"))
            cfg->then = THEN_RESET;
        else if (span_eq(v, ve, "crash"))
            cfg->then = THEN_CRASH;
        else if (span_eq(v, ve, "spin"))
            cfg->then = THEN_SPIN;
        else if (span_eq(v, ve, "idle"))
            cfg->then = THEN_IDLE;
        else if (span_eq(v, ve, "flood"))
            cfg->then = THEN_FLOOD;
    } else if (span_eq(k, ke, "io_exits")) {
        if (parse_num(v, ve, &a))
            cfg->io_exits = a;
    } else if (span_eq(k, ke, "heartbeat_ms")) {
        if (parse_num(v, ve, &a))
            cfg->heartbeat_ms = a;
    } else if (span_eq(k, ke, "echo")) {
        if (parse_num(v, ve, &a))
            cfg->echo = (a != 0);
    } else if (span_eq(k, ke, "touch")) {
        const char *colon = v;
        while (colon < ve && *colon != ':')
            colon++;
        if (colon < ve && parse_num(v, colon, &a) && parse_num(colon + 1, ve, &b)) {
            cfg->touch = 1;
            cfg->touch_addr = a;
            cfg->touch_pages = b;
        }
    } else if (span_eq(k, ke, "ro_write")) {
        if (parse_num(v, ve, &a)) {
            cfg->ro_write = 1;
            cfg->ro_write_addr = a;
        }
    }
}

static void parse_cmdline(struct config *cfg, u64 zero_page)
{
    cfg->then = THEN_POWEROFF;
    cfg->io_exits = 0;
    cfg->heartbeat_ms = 1000;
    cfg->echo = 0;
    cfg->touch = 0;
    cfg->touch_addr = 0;
    cfg->touch_pages = 0;
    cfg->ro_write = 0;
    cfg->ro_write_addr = 0;

    u64 ptr = *(volatile u32 *)(zero_page + BP_CMD_LINE_PTR);
    if (ptr == 0)
        return;
    const char *p = (const char *)ptr;
    const char *end = p + CMDLINE_MAX;
    while (p < end && *p) {
        while (p < end && *p && is_space(*p))
            p++;
        const char *tok = p;
        const char *eq = NULL;
        while (p < end && *p && !is_space(*p)) {
            if (*p == '=' && eq == NULL)
                eq = p;
            p++;
        }
        if (eq != NULL)
            apply_token(cfg, tok, eq, eq + 1, p);
    }
}

/* ------------------------------------------------------------------ */
/* MP table                                                            */

/* The byte sum of p[0..len), eight bytes per step: where the host runs every
 * guest instruction through KVM's emulator (about 0.6 us each), a byte loop over
 * the MP table was a third of the whole boot of this guest. */
static u8 checksum(const volatile u8 *p, u32 len)
{
    const u64 even = 0x00FF00FF00FF00FFUL;
    u32 total = 0;
    u32 i = 0;
    while (i + 8 <= len) {
        /* Four 16-bit lanes, two bytes each per word: 64 words stay below 2^16. */
        u64 lanes = 0;
        u32 words = (len - i) / 8;
        if (words > 64)
            words = 64;
        for (u32 k = 0; k < words; k++, i += 8) {
            u64 w = *(const volatile u64 *)(p + i);
            lanes += (w & even) + ((w >> 8) & even);
        }
        lanes += lanes >> 32;
        lanes += lanes >> 16;
        total += (u32)(lanes & 0xFFFF);
    }
    for (; i < len; i++)
        total += p[i];
    return (u8)total;
}

static u64 find_mpfp_in(u64 start, u64 end)
{
    for (u64 a = start; a + 16 <= end; a += 16) {
        const volatile u8 *p = (const volatile u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_')
            return a;
    }
    return 0;
}

static u64 find_mpfp(void)
{
    u64 a = 0;
    u64 bda_ebda = 0x40E; /* BIOS data area: EBDA segment */
    __asm__("" : "+r"(bda_ebda)); /* an address, not an object: silence -Warray-bounds */
    u64 ebda = (u64)(*(volatile u16 *)bda_ebda) << 4;
    if (ebda != 0 && ebda < 0xA0000)
        a = find_mpfp_in(ebda, ebda + 1024);
    if (a == 0)
        a = find_mpfp_in(0x9FC00, 0xA0000);
    if (a == 0)
        a = find_mpfp_in(0xF0000, 0x100000);
    return a;
}

/* Count the enabled processors in the MP table; 0 and *err on failure. */
static u32 mptable_cpus(const char **err)
{
    u64 fp = find_mpfp();
    if (fp == 0) {
        *err = "no floating pointer";
        return 0;
    }
    const volatile u8 *f = (const volatile u8 *)fp;
    if (checksum(f, 16) != 0) {
        *err = "bad floating pointer checksum";
        return 0;
    }
    u64 ct = *(const volatile u32 *)(fp + 4);
    if (ct == 0) {
        *err = "no configuration table";
        return 0;
    }
    const volatile u8 *c = (const volatile u8 *)ct;
    if (c[0] != 'P' || c[1] != 'C' || c[2] != 'M' || c[3] != 'P') {
        *err = "bad configuration table signature";
        return 0;
    }
    u32 len = *(const volatile u16 *)(ct + 4);
    if (len < 44) {
        *err = "configuration table too short";
        return 0;
    }
    if (checksum(c, len) != 0) {
        *err = "bad configuration table checksum";
        return 0;
    }
    u32 count = *(const volatile u16 *)(ct + 34);
    u32 off = 44;
    u32 cpus = 0;
    for (u32 i = 0; i < count; i++) {
        if (off >= len) {
            *err = "entries overrun table";
            return 0;
        }
        u8 type = c[off];
        u32 size;
        if (type == 0)
            size = 20;
        else if (type <= 4)
            size = 8;
        else {
            *err = "bad entry type";
            return 0;
        }
        if (off + size > len) {
            *err = "entries overrun table";
            return 0;
        }
        if (type == 0 && (c[off + 3] & 1))
            cpus++;
        off += size;
    }
    if (cpus == 0) {
        *err = "no enabled processors";
        return 0;
    }
    return cpus;
}

/* ------------------------------------------------------------------ */
/* Interrupts                                                          */

struct idt_entry {
    u16 offset_lo;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_hi;
    u32 reserved;
} __attribute__((packed));

struct idt_ptr {
    u16 limit;
    u64 base;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
static volatile u32 idt_state = 0; /* 0 = unbuilt, 1 = building, 2 = ready */
static volatile u64 heartbeats = 0;

/* Build the shared IDT once (any vCPU may get here first) and load it. */
static void idt_load(void)
{
    u32 expected = 0;
    if (__atomic_compare_exchange_n(&idt_state, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                    __ATOMIC_ACQUIRE)) {
        for (u32 v = 0; v < 256; v++) {
            u64 h = (u64)isr_stubs + 16 * v;
            idt[v].offset_lo = (u16)h;
            idt[v].selector = 0x08;
            idt[v].ist = 0;
            idt[v].type_attr = 0x8E; /* present, DPL 0, 64-bit interrupt gate */
            idt[v].offset_mid = (u16)(h >> 16);
            idt[v].offset_hi = (u32)(h >> 32);
            idt[v].reserved = 0;
        }
        __atomic_store_n(&idt_state, 2, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&idt_state, __ATOMIC_ACQUIRE) != 2)
            cpu_relax();
    }
    struct idt_ptr p = { .limit = sizeof(idt) - 1, .base = (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

static int lapic_in_service(u32 vector)
{
    return (lapic_read(LAPIC_ISR + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

/* ------------------------------------------------------------------ */
/* Keyboard and UART input (then=idle, BSP only, interrupts off inside) */

#define SC_EXTENDED 0xE0
#define SC_CTRL 0x1D  /* set 1 make codes; break = make | 0x80 */
#define SC_ALT 0x38
#define SC_DEL 0x53   /* after 0xE0 */

static int kbd_extended, kbd_ctrl, kbd_alt;
static int echo_on;

static __attribute__((noreturn)) void power_off(void)
{
    outb(PORT_ACPI_SLEEP, 0x34);
    halt_forever();
}

/* Read every scancode the i8042 holds; Ctrl-Alt-Del powers off. */
static void kbd_drain(void)
{
    while (inb(PORT_I8042) & I8042_STATUS_OBF) {
        u8 sc = inb(PORT_I8042_DATA);
        if (sc == SC_EXTENDED) {
            kbd_extended = 1;
            continue;
        }
        int ext = kbd_extended;
        int down = !(sc & 0x80);
        kbd_extended = 0;
        switch (sc & 0x7f) {
        case SC_CTRL: /* left, or right with 0xE0 */
            kbd_ctrl = down;
            break;
        case SC_ALT:
            kbd_alt = down;
            break;
        case SC_DEL:
            if (ext && down && kbd_ctrl && kbd_alt) {
                print("ctrl-alt-del: powering off");
                power_off();
            }
            break;
        default:
            break;
        }
    }
}

/* Read every byte the UART holds; write each back when echoing. */
static void uart_drain(void)
{
    while (inb(COM1 + UART_LSR) & UART_LSR_DR) {
        u8 c = inb(COM1);
        if (!echo_on)
            continue;
        lock(&print_lock);
        outb(COM1, c);
        if (c == '\r')
            outb(COM1, '\n');
        unlock(&print_lock);
    }
}

static void ioapic_write(u32 reg, u32 val)
{
    *(volatile u32 *)(IOAPIC_BASE + IOAPIC_REGSEL) = reg;
    *(volatile u32 *)(IOAPIC_BASE + IOAPIC_WIN) = val;
}

/* ISA line `irq` -> `vector` on the BSP: fixed, physical, edge, active high. */
static void ioapic_route(u32 irq, u32 vector)
{
    ioapic_write(IOAPIC_REDTBL(irq) + 1, 0); /* destination: LAPIC ID 0 */
    ioapic_write(IOAPIC_REDTBL(irq), vector);
}

/* Interrupts from devices: keyboard always, the UART when echoing. Called
 * with interrupts off; input that came before is read here. */
static void start_input(int echo)
{
    outb(PIC1_DATA, 0xFF); /* the 8259s deliver nothing (LINT0 is ExtINT) */
    outb(PIC2_DATA, 0xFF);
    ioapic_route(KBD_IRQ, KBD_VECTOR);
    /* The i8042 raises IRQ 1 only once its control register says so. */
    outb(PORT_I8042, I8042_CMD_WRITE_CTR);
    outb(PORT_I8042_DATA, I8042_CTR);
    kbd_drain();
    if (echo) {
        echo_on = 1;
        ioapic_route(COM1_IRQ, COM1_VECTOR);
        outb(COM1 + UART_IER, 0x01); /* received data available */
        uart_drain();
    }
}

/* Called from isr_common with a pointer to: vector, error code, RIP, ... */
void isr_dispatch(u64 *frame)
{
    u32 vector = (u32)(frame[0] & 0xff);
    if (vector == HEARTBEAT_VECTOR) {
        u64 k = ++heartbeats;
        print_num("heartbeat ", k);
        lapic_write(LAPIC_EOI, 0);
        return;
    }
    if (vector == KBD_VECTOR) {
        kbd_drain();
        lapic_write(LAPIC_EOI, 0);
        return;
    }
    if (vector == COM1_VECTOR) {
        uart_drain();
        lapic_write(LAPIC_EOI, 0);
        return;
    }
    if (vector < 32) {
        /* A CPU exception: report without the lock (it may be held by the
         * code that faulted) and stop this vCPU. */
        struct line l;
    l.len = 0;
        line_str(&l, "unexpected exception ");
        line_dec(&l, vector);
        line_str(&l, " rip=0x");
        line_hex(&l, frame[2]);
        l.buf[l.len++] = '\n';
        serial_write(l.buf, l.len);
        halt_forever();
    }
    print_num("unexpected interrupt ", vector);
    if (lapic_in_service(vector))
        lapic_write(LAPIC_EOI, 0);
}

static void start_heartbeat(u64 heartbeat_ms)
{
    u64 count = heartbeat_ms * 62500; /* 1 GHz LAPIC timer, divide by 16 */
    if (heartbeat_ms > 0xFFFFFFFFUL / 62500 || count > 0xFFFFFFFFUL)
        count = 0xFFFFFFFFUL;
    lapic_write(LAPIC_SVR, 0x1FF);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, (1u << 17) | HEARTBEAT_VECTOR);
    lapic_write(LAPIC_TIMER_INIT, (u32)count);
}

/* ------------------------------------------------------------------ */
/* Main                                                                */

static volatile u32 done_count = 0;

static __attribute__((noreturn)) void crash(void)
{
    struct idt_ptr p = { .limit = 0, .base = 0 };
    __asm__ volatile("lidt %0; ud2" : : "m"(p) : "memory");
    halt_forever();
}

static __attribute__((noreturn)) void do_then(const struct config *cfg)
{
    switch (cfg->then) {
    case THEN_RESET:
        print("reset");
        outb(PORT_I8042, 0xFE);
        halt_forever();
    case THEN_CRASH:
        print("crash");
        crash();
    case THEN_SPIN:
        spin_forever();
    case THEN_IDLE:
        idt_load();
        start_heartbeat(cfg->heartbeat_ms);
        start_input(cfg->echo);
        idle_forever();
    case THEN_FLOOD:
        /* A guest writing its UART as fast as it can, forever: one port write (one
         * VM exit) per byte. */
        for (;;) {
            static const char line[] =
                "flood 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n";
            serial_write(line, sizeof(line) - 1);
        }
    case THEN_POWEROFF:
    default:
        print("poweroff");
        power_off();
    }
}

__attribute__((noreturn)) void guest_main(u32 id, u64 zero_page)
{
    struct config cfg;
    int bsp = (id == 0);
    u32 cpus = 1;

    {
        struct line l;
    l.len = 0;
        line_str(&l, "vcpu ");
        line_dec(&l, id);
        line_str(&l, " up");
        line_print(&l);
    }
    if (bsp) {
        struct line l;
    l.len = 0;
        const char *err = NULL;
        cpus = mptable_cpus(&err);
        if (cpus == 0) {
            line_str(&l, "mptable error: ");
            line_str(&l, err);
            cpus = 1;
        } else {
            line_str(&l, "mptable cpus=");
            line_dec(&l, cpus);
        }
        line_print(&l);
    }
    parse_cmdline(&cfg, zero_page);

    for (u64 i = 0; i < cfg.io_exits; i++)
        outb(PORT_POST, 0x00);

    if (bsp) {
        if (cfg.touch) {
            for (u64 i = 0; i < cfg.touch_pages; i++)
                *(volatile u64 *)(cfg.touch_addr + i * 4096) = 0x746f756368000000UL | (i + 1);
        }
        if (cfg.ro_write)
            *(volatile u8 *)cfg.ro_write_addr = 0xAB;
    }

    __atomic_fetch_add(&done_count, 1, __ATOMIC_SEQ_CST);

    if (bsp) {
        while (__atomic_load_n(&done_count, __ATOMIC_ACQUIRE) < cpus)
            cpu_relax();
        outb(PORT_POST, 0x41);
        do_then(&cfg);
    }

    switch (cfg.then) {
    case THEN_SPIN:
        spin_forever();
    case THEN_IDLE:
        idt_load();
        idle_forever();
    default:
        halt_forever();
    }
}
