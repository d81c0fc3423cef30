//! The driver side of a split virtqueue in guest memory, for device tests:
//! it places descriptor chains the way a guest driver does and reads the
//! used ring back.

use std::cell::Cell;

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// 4 MiB of guest memory with a dirty bitmap, like the VM's.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("test memory")
}

pub struct TestQueue {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    next_desc: Cell<u16>,
    avail_idx: Cell<u16>,
}

impl TestQueue {
    /// A queue of `size` entries with its rings from `base` on (zeroed).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> TestQueue {
        let desc_table = base;
        let avail_ring = base + 16 * u64::from(size);
        let used_ring = (avail_ring + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used_ring + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .expect("rings in memory");
        TestQueue {
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_desc: Cell::new(0),
            avail_idx: Cell::new(0),
        }
    }

    /// Places a chain of `(addr, len, device_writable)` buffers and makes it
    /// available; returns its head index.
    pub fn add_chain(&self, mem: &GuestMemoryMmap, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc.get();
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let at = self.desc_table + 16 * u64::from(index);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc
            .set((head + buffers.len() as u16) % self.size);
        let idx = self.avail_idx.get();
        let slot = self.avail_ring + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx.set(idx.wrapping_add(1));
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail_ring + 2))
            .unwrap();
        head
    }

    /// The used ring's index: how many chains the device has completed.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap()
    }

    /// Used ring entry `i`: (head index, bytes written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used_ring + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}
