//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns its vCPUs, its IOAPIC and how ISA IRQs are routed. Built as
//! bytes (little endian, packed) and written at the start of the EBDA, where
//! Linux looks for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, IOAPIC_START, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Size of the EBDA window the table must fit in.
const MAX_TABLE_SIZE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (at most {max})", max = max_vcpus())]
    TooManyVcpus(u8),
    #[error("writing the MP table to guest memory failed: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// The most vCPUs whose table fits the EBDA window.
pub const fn max_vcpus() -> u8 {
    // 16 (pointer) + 44 (header) + 8 * (1 bus + 1 ioapic + pins + 2 lint) + 20 per cpu.
    ((MAX_TABLE_SIZE - 16 - 44 - 8 * (4 + IOAPIC_PINS as usize)) / 20) as u8
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_sub(b))
}

/// Builds the floating pointer and the table for `vcpus` vCPUs placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > max_vcpus() {
        return Err(MpTableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let table_addr = base + 16;

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    // Bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    // ISA IRQ n goes to IOAPIC pin n (KVM routes the PIT to pin 2 itself).
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // Local interrupts: the 8259 (ExtINT) on the boot CPU's LINT0, NMI on
    // every local APIC's LINT1.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);

    let entry_count = vcpus as u16 + 1 + 1 + u16::from(IOAPIC_PINS) + 2;
    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"FTVMM   ");
    table.extend_from_slice(b"FT-PAIR     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a table is present
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(MPTABLE_START, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
    }

    #[test]
    fn checksums_lengths_and_counts_are_consistent() {
        for vcpus in [1, 2, 8] {
            let t = build(MPTABLE_START, vcpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, vcpus as usize + 4 + IOAPIC_PINS as usize);
            // Exactly one boot processor.
            let cpus: Vec<&[u8]> = table[44..].chunks(20).take(vcpus as usize).collect();
            assert!(cpus.iter().all(|c| c[0] == 0));
            assert_eq!(
                cpus.iter()
                    .filter(|c| c[3] & CPU_BOOTPROCESSOR != 0)
                    .count(),
                1
            );
            assert!(t.len() <= MAX_TABLE_SIZE);
        }
        assert!(build(MPTABLE_START, 0).is_err());
        assert!(build(MPTABLE_START, max_vcpus() + 1).is_err());
    }
}
