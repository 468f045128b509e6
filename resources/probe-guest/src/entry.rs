//! Boot entry points, page tables, GDT, stack and exception stubs (assembly).
//!
//! Two ways in, one way on:
//!
//! * `pvh_start` (32-bit, published by the Xen `PHYS32_ENTRY` ELF note):
//!   protected mode, paging off, `EBX` = `struct hvm_start_info`.
//! * `linux64_start` (the ELF `e_entry`): Linux 64-bit boot protocol, long
//!   mode with the VMM's identity map of (at least) the first GiB,
//!   `RSI` = `struct boot_params`.
//!
//! Both zero `.bss`, build the same identity map of the first 4 GiB with
//! 2 MiB pages (the MMIO hole `[0xd000_0000, 4 GiB)` uncached), load our
//! GDT (0x08 = 64-bit code, 0x10 = data), switch to our stack, enable SSE
//! (CR0.MP, !CR0.EM, CR4.OSFXSR|OSXMMEXCPT) and call [`crate::probe_main`]
//! with the boot kind and the info pointer.
//!
//! Privileged instructions are kept to the minimum (each one traps): CR0,
//! CR3 and CR4 are written with constants, never read. The code is built
//! without SSE (see `.cargo/config.toml`), so SSE is enabled only in case
//! future code needs it; `ldmxcsr`/`fxsave` are avoided because
//! instruction-emulating KVMs (kvm_pvm) do not implement them.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// `kind` argument of `probe_main` for the PVH entry.
pub const BOOT_PVH: u32 = 1;
/// `kind` argument of `probe_main` for the Linux 64-bit entry.
pub const BOOT_LINUX64: u32 = 2;

/// The largest identity map the probe builds: RAM above it is not checked.
pub const IDENTITY_MAP_LIMIT: u64 = 16 << 30;
/// The identity map the entry code builds; [`extend_identity_map`] grows
/// it to cover RAM above 4 GiB. Every page-table entry costs an emulated
/// store on instruction-emulating KVMs, so the probe maps only what it uses.
const BOOT_MAP_LIMIT: u64 = 4 << 30;
const PAGE_2M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Present, writable, 2 MiB page.
const PDE_LARGE_RW: u64 = 0x83;
/// Present, writable: a table entry.
const TABLE_RW: u64 = 0x03;

static MAPPED_LIMIT: AtomicU64 = AtomicU64::new(BOOT_MAP_LIMIT);

unsafe extern "C" {
    static mut probe_pml4: [u64; 512];
    static mut probe_pdpt: [u64; 512];
    static mut probe_pd: [[u64; 512]; 16];
}

/// The end of the identity map: addresses below it are mapped.
pub fn mapped_limit() -> u64 {
    MAPPED_LIMIT.load(Ordering::Relaxed)
}

/// Identity-maps `[0, limit)` (rounded up to a GiB, at most
/// [`IDENTITY_MAP_LIMIT`]) by filling page directories above 4 GiB.
pub fn extend_identity_map(limit: u64) {
    let target = limit.min(IDENTITY_MAP_LIMIT).div_ceil(GIB) * GIB;
    let mut mapped = mapped_limit();
    while mapped < target {
        let gib = (mapped / GIB) as usize;
        // SAFETY: single-threaded; page directory `gib` is not referenced
        // by the PDPT yet, so filling it changes no live mapping, and the
        // page tables are identity-mapped below 4 GiB.
        let pd = unsafe { &mut *core::ptr::addr_of_mut!(probe_pd[gib]) };
        for (i, entry) in pd.iter_mut().enumerate() {
            *entry = (mapped + i as u64 * PAGE_2M) | PDE_LARGE_RW;
        }
        let pd_addr = pd.as_ptr() as u64;
        // SAFETY: as above; a not-present PDPT entry is never cached by the
        // TLB, so the new GiB is visible without a flush.
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!(probe_pdpt[gib]), pd_addr | TABLE_RW)
        };
        mapped += GIB;
    }
    MAPPED_LIMIT.store(mapped, Ordering::Relaxed);
}

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 0x80;
/// Present, writable, write-through, cache-disabled 4 KiB page (UC with
/// the default PAT).
const PTE_MMIO_4K: u64 = 0x1b;
const PAGE_4K: u64 = 4096;
/// Physical-address bits of a page-table entry.
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Tables available to [`map_device`] (PDPTs, page directories and page
/// tables for device windows outside the identity map).
const DEVICE_TABLES: usize = 16;

#[repr(C, align(4096))]
struct DeviceTables(core::cell::UnsafeCell<core::mem::MaybeUninit<[[u64; 512]; DEVICE_TABLES]>>);

// SAFETY: the probe is single-threaded with interrupts disabled; a table
// is handed out once by `alloc_table` (counter below) and then only
// reached through the page-table entry that points at it.
unsafe impl Sync for DeviceTables {}

/// Not zeroed at boot: `alloc_table` clears a table before it is linked.
#[unsafe(link_section = ".probe_noinit.device_tables")]
static DEVICE_TABLE_POOL: DeviceTables =
    DeviceTables(core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit()));
static DEVICE_TABLES_USED: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

/// Why [`map_device`] refused a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Not 4 KiB aligned, or not a whole number of 4 KiB pages.
    Unaligned,
    /// Beyond the CPU's physical-address width (or 2^48).
    TooHigh,
    /// The table pool is used up.
    NoTables,
}

impl MapError {
    pub fn name(self) -> &'static str {
        match self {
            MapError::Unaligned => "unaligned",
            MapError::TooHigh => "beyond-phys-bits",
            MapError::NoTables => "out-of-page-tables",
        }
    }
}

/// A zeroed table from the pool (its physical = virtual address).
fn alloc_table() -> Option<u64> {
    let used = DEVICE_TABLES_USED.load(Ordering::Relaxed);
    if used >= DEVICE_TABLES {
        return None;
    }
    DEVICE_TABLES_USED.store(used + 1, Ordering::Relaxed);
    // SAFETY: `used` < DEVICE_TABLES, so the table is inside the pool and
    // was never handed out; nothing references it yet.
    let table = unsafe { DEVICE_TABLE_POOL.0.get().cast::<[u64; 512]>().add(used) };
    for i in 0..512 {
        // SAFETY: as above; a plain store into our own table.
        unsafe { (&raw mut (*table)[i]).write_volatile(0) };
    }
    Some(table as u64)
}

/// The CPU's physical-address width (CPUID 0x8000_0008), at most 48 bits
/// (a 4-level map reaches 2^48).
fn phys_bits() -> u32 {
    use core::arch::x86_64::__cpuid;
    let bits = if __cpuid(0x8000_0000).eax >= 0x8000_0008 {
        __cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    };
    bits.clamp(32, 48)
}

/// Maps the device window `[addr, addr + size)` uncached with 4 KiB pages
/// (exactly the window, nothing around it). Pages already inside the
/// identity map (a 2 MiB page covers them) are left as they are. Only
/// not-present entries are written, so no TLB flush is needed.
pub fn map_device(addr: u64, size: u64) -> Result<(), MapError> {
    if !addr.is_multiple_of(PAGE_4K) || !size.is_multiple_of(PAGE_4K) || size == 0 {
        return Err(MapError::Unaligned);
    }
    let end = addr.checked_add(size).ok_or(MapError::TooHigh)?;
    if end > 1u64 << phys_bits() {
        return Err(MapError::TooHigh);
    }
    let pml4 = (&raw mut probe_pml4).cast::<u64>() as u64;
    let mut page = addr;
    while page < end {
        let indices = [(page >> 39) & 511, (page >> 30) & 511, (page >> 21) & 511];
        let mut table = pml4;
        let mut covered = false;
        for index in indices {
            let slot = core::ptr::with_exposed_provenance_mut::<u64>((table + index * 8) as usize);
            // SAFETY: `table` is a live page table (the PML4 or one an
            // entry points to, all identity-mapped in the image or pool),
            // `index` < 512.
            let entry = unsafe { slot.read_volatile() };
            if entry & PTE_PRESENT == 0 {
                let new = alloc_table().ok_or(MapError::NoTables)?;
                // SAFETY: as above; the entry was not present, so no live
                // mapping (nor TLB entry) changes.
                unsafe { slot.write_volatile(new | TABLE_RW) };
                table = new;
            } else if entry & PTE_LARGE != 0 {
                covered = true;
                break;
            } else {
                table = entry & PTE_ADDR_MASK;
            }
        }
        if !covered {
            let slot = core::ptr::with_exposed_provenance_mut::<u64>(
                (table + ((page >> 12) & 511) * 8) as usize,
            );
            // SAFETY: `table` is a live page table (see above); a present
            // 4 KiB entry is left alone, a missing one filled.
            unsafe {
                if slot.read_volatile() & PTE_PRESENT == 0 {
                    slot.write_volatile(page | PTE_MMIO_4K);
                }
            }
        }
        page += PAGE_4K;
    }
    Ok(())
}

// Xen ELF note announcing the 32-bit PVH entry point. The descriptor is
// 8 bytes like Linux's `.quad` (linux-loader reads the low 4 bytes and
// accepts any size >= 4; QEMU reads a full 64-bit word). The section is
// 4-byte aligned so that PT_NOTE's p_align is 4, which linux-loader and
// QEMU use to pad the 4-byte name.
global_asm!(
    r#"
    .pushsection .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4
    .popsection
    "#,
    options(att_syntax)
);

// GDT (in .data: the CPU may set accessed bits), page tables and stack.
global_asm!(
    r#"
    .pushsection .data.probe_gdt, "aw", @progbits
    .balign 16
probe_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
probe_gdt_end:
    .balign 16
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt
    .popsection

    .pushsection .bss.probe_pagetables, "aw", @nobits
    .balign 4096
    .global probe_pml4
probe_pml4:
    .skip 4096
    .global probe_pdpt
probe_pdpt:
    .skip 4096
    .popsection

    // Not zeroed at entry: every entry is written before the PDPT points
    // at its directory (the first four at entry, the rest on demand).
    .pushsection .probe_noinit, "aw", @nobits
    .balign 4096
    .global probe_pd
probe_pd:
    .skip 16 * 4096
    .popsection

    // The stack needs no zeroing either.
    .pushsection .probe_noinit, "aw", @nobits
    .balign 16
probe_stack_bottom:
    .skip 65536
probe_stack_top:
    .popsection
    "#,
    options(att_syntax)
);

// PVH entry: 32-bit protected mode, paging off, flat segments, EBX =
// hvm_start_info. Builds the page tables and enters long mode.
global_asm!(
    r#"
    .pushsection .text.entry, "ax", @progbits
    .code32
    .global pvh_start
    .type pvh_start, @function
pvh_start:
    cli
    cld
    movl %ebx, %esi

    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    movl $probe_pd, %edi
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $0x680, %ecx
    jb 2f
    cmpl $0x800, %ecx
    jae 2f
    orl $0x18, %eax
2:
    movl %eax, (%edi,%ecx,8)
    movl %ecx, %edx
    shrl $11, %edx
    movl %edx, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b

    movl $probe_pdpt, %edi
    movl $(probe_pd + 3), %eax
    xorl %ecx, %ecx
3:
    movl %eax, (%edi,%ecx,8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 3b
    movl $(probe_pdpt + 3), probe_pml4

    movl $probe_pml4, %eax
    movl %eax, %cr3
    movl $0x620, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    xorl %edx, %edx
    movl $0x100, %eax
    wrmsr
    lgdt probe_gdt_ptr
    movl $0x80000033, %eax
    movl %eax, %cr0
    ljmp $0x08, $pvh_long_mode

    .code64
pvh_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $probe_stack_top, %rsp
    movl %esi, %esi
    movl $1, %edi
    jmp probe_common64
    .size pvh_start, . - pvh_start

    .global linux64_start
    .type linux64_start, @function
linux64_start:
    cli
    cld
    movq %rsi, %r12

    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    movl $probe_pd, %edi
    xorl %ecx, %ecx
4:
    movq %rcx, %rax
    shlq $21, %rax
    orq $0x83, %rax
    cmpl $0x680, %ecx
    jb 5f
    cmpl $0x800, %ecx
    jae 5f
    orq $0x18, %rax
5:
    movq %rax, (%rdi,%rcx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 4b

    movl $probe_pdpt, %edi
    movl $(probe_pd + 3), %eax
    xorl %ecx, %ecx
6:
    movq %rax, (%rdi,%rcx,8)
    addq $4096, %rax
    incl %ecx
    cmpl $4, %ecx
    jb 6b
    movl $(probe_pdpt + 3), %eax
    movq %rax, probe_pml4

    movl $probe_pml4, %eax
    movq %rax, %cr3
    movl $0x620, %eax
    movq %rax, %cr4
    movl $0x80000033, %eax
    movq %rax, %cr0
    lgdt probe_gdt_ptr(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $probe_stack_top, %rsp
    pushq $0x08
    leaq 7f(%rip), %rax
    pushq %rax
    lretq
7:
    movq %r12, %rsi
    movl $2, %edi
    jmp probe_common64
    .size linux64_start, . - linux64_start

probe_common64:
    call probe_main
8:
    cli
    hlt
    jmp 8b
    .popsection
    "#,
    options(att_syntax)
);

// Exception stubs: 32 stubs, 16 bytes apart, each pushing a dummy error
// code (for vectors where the CPU pushes none) and the vector number, then
// calling `probe_exception(vector, error_code, rip)`. Error-code vectors:
// 8, 10-14, 17, 21, 29, 30 (mask 0x60227d00).
global_asm!(
    r#"
    .pushsection .text.probe_exceptions, "ax", @progbits
    .balign 16
    .global probe_exception_stubs
probe_exception_stubs:
    .set probe_vec, 0
    .rept 32
    .balign 16
    .if ((0x60227d00 >> probe_vec) & 1) == 0
    pushq $0
    .endif
    pushq $probe_vec
    jmp probe_exception_common
    .set probe_vec, probe_vec + 1
    .endr

probe_exception_common:
    movq (%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    andq $-16, %rsp
    call probe_exception
9:
    cli
    hlt
    jmp 9b
    .popsection
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static probe_exception_stubs: u8;
}

/// Distance between two exception stubs.
pub const EXCEPTION_STUB_STRIDE: u64 = 16;

/// Physical range `[start, end)` of the loaded image, including `.bss`
/// (page tables, stack, static buffers).
pub fn image_range() -> (u64, u64) {
    let start = (&raw const __image_start) as u64;
    let end = (&raw const __image_end) as u64;
    (start, end)
}

/// Address of the first exception stub (vector 0).
pub fn exception_stubs() -> u64 {
    (&raw const probe_exception_stubs) as u64
}
