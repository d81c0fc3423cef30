//! Where things live in guest physical memory (x86_64, no ACPI, no PCI).

/// GDT used for PVH and 64-bit boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) used during boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, then its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The zero page (`boot_params`) of the Linux 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for 64-bit boot: PML4, PDPTE, PDE.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of low memory usable by the guest (the EBDA follows).
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table lives in the EBDA.
pub const MPTABLE_START: u64 = EBDA_START;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; guest RAM ends below it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// virtio-mmio devices: one 4 KiB window each from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC and local APIC (their addresses are fixed by KVM's irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) and identity map page, below 4 GiB, outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// First GSI for virtio devices (after the legacy ISA IRQs).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The legacy serial port (COM1) and its IRQ.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
