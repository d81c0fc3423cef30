//! virtio-blk driven through the virtio-mmio transport against a temporary
//! image file, with the queue in guest memory as a driver would set it up.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::driver::{bring_up, notify};
use crate::devices::virtio::mmio::{MmioTransport, CONFIG_SPACE_OFFSET};
use crate::devices::virtio::test_queue::{test_memory, TestQueue};

const SECTORS: u64 = 64;
const HEADER: u64 = 0x20_0000;
const STATUS: u64 = 0x20_1000;
const DATA: u64 = 0x30_0000;

struct Rig {
    mem: GuestMemoryMmap,
    queue: TestQueue,
    transport: MmioTransport,
    irq: Arc<VirtioInterrupt>,
    image: TempFile,
}

fn rig(read_only: bool) -> Rig {
    rig_with(read_only, false)
}

fn rig_with(read_only: bool, written_map: bool) -> Rig {
    let image = TempFile::new_with_prefix("/tmp/ftvmm-blk-test").unwrap();
    image.as_file().set_len(SECTORS * SECTOR_SIZE).unwrap();
    // Sector 3 holds a pattern.
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 % 251) as u8).collect();
    image.as_file().write_all_at(&pattern, 3 * 512).unwrap();
    let config = DiskConfig {
        path: image.as_path().to_path_buf(),
        read_only,
        written_map,
    };
    let block = Block::open(&config).unwrap();
    let mem = test_memory();
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut transport = MmioTransport::new(Box::new(block), mem.clone(), irq.clone());
    let queue = TestQueue::new(&mem, 0x1_0000, 16);
    let features = transport.device().features();
    let status = bring_up(&mut transport, features, &[&queue]);
    assert!(transport.is_active(), "status {status:#x}");
    Rig {
        mem,
        queue,
        transport,
        irq,
        image,
    }
}

impl Rig {
    /// Submits a request with `data` buffers between header and status;
    /// returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HEADER, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        self.submit(&chain)
    }

    fn submit(&mut self, chain: &[(u64, u32, bool)]) -> (u8, u32) {
        let before = self.queue.used_idx(&self.mem);
        let head = self.queue.add_chain(&self.mem, chain);
        notify(&mut self.transport, 0);
        assert_eq!(self.queue.used_idx(&self.mem), before.wrapping_add(1));
        let (id, len) = self.queue.used_elem(&self.mem, before);
        assert_eq!(id, u32::from(head));
        assert_eq!(self.irq.irqfd().read().unwrap(), 1);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }
}

fn dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    mem.iter().next().unwrap().bitmap().dirty_at(addr as usize)
}

#[test]
fn read_write_flush_get_id_round_trip_against_the_image() {
    let mut r = rig(false);
    let mut config = [0u8; 8];
    r.transport.read(CONFIG_SPACE_OFFSET, &mut config[..4]);
    r.transport.read(CONFIG_SPACE_OFFSET + 4, &mut config[4..]);
    assert_eq!(u64::from_le_bytes(config), SECTORS);

    // Read sector 3 into two half-sector buffers; the pages it lands on are
    // marked dirty in the VMM's bitmap.
    assert!(!dirty(&r.mem, DATA) && !dirty(&r.mem, DATA + 0x1000));
    let (status, used) = r.request(
        VIRTIO_BLK_T_IN,
        3,
        &[(DATA, 256, true), (DATA + 0x1000, 256, true)],
    );
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 513));
    let mut got = vec![0u8; 512];
    r.mem
        .read_slice(&mut got[..256], GuestAddress(DATA))
        .unwrap();
    r.mem
        .read_slice(&mut got[256..], GuestAddress(DATA + 0x1000))
        .unwrap();
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(got, pattern);
    assert!(dirty(&r.mem, DATA) && dirty(&r.mem, DATA + 0x1000));
    assert!(!dirty(&r.mem, DATA + 0x2000));

    // Write two sectors at 10 from guest memory.
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 13) as u8 + 1).collect();
    r.mem
        .write_slice(&data, GuestAddress(DATA + 0x4000))
        .unwrap();
    let (status, used) = r.request(VIRTIO_BLK_T_OUT, 10, &[(DATA + 0x4000, 1024, false)]);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 1));
    let mut on_disk = vec![0u8; 1024];
    r.image
        .as_file()
        .read_exact_at(&mut on_disk, 10 * 512)
        .unwrap();
    assert_eq!(on_disk, data);

    let (status, _) = r.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);

    let (status, used) = r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x8000, 20, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    r.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x8000))
        .unwrap();
    let name = r.image.as_path().file_name().unwrap().to_string_lossy();
    let n = name.len().min(20);
    assert_eq!(&id[..n], &name.as_bytes()[..n]);
    assert_eq!(used, n as u32 + 1);

    let block = r.transport.device();
    assert_eq!(block.queue_states().unwrap()[0].next_used, 4);
}

#[test]
fn bad_requests_complete_with_an_error_status() {
    let mut r = rig(false);
    // Beyond the end of the disk.
    let (status, used) = r.request(VIRTIO_BLK_T_IN, SECTORS - 1, &[(DATA, 1024, true)]);
    assert_eq!((status, used), (VIRTIO_BLK_S_IOERR as u8, 1));
    // A sector number that overflows.
    let (status, _) = r.request(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, false)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    // Not whole sectors.
    let (status, _) = r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    // A buffer outside guest memory.
    let (status, _) = r.request(VIRTIO_BLK_T_IN, 0, &[(0x1000_0000, 512, true)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    // Discard is not offered.
    let (status, _) = r.request(11, 0, &[]);
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
    // A header shorter than 16 bytes.
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let (status, _) = r.submit(&[(HEADER, 8, false), (STATUS, 1, true)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    // No status byte at all: completed with length 0, nothing else happens.
    let (_, used) = r.submit(&[(HEADER, 16, false)]);
    assert_eq!(used, 0);
    let mut tail = vec![0u8; 512];
    r.image
        .as_file()
        .read_exact_at(&mut tail, (SECTORS - 1) * 512)
        .unwrap();
    assert!(tail.iter().all(|&b| b == 0));
}

#[test]
fn read_only_disk_offers_ro_and_refuses_writes() {
    let mut r = rig(true);
    assert_ne!(r.transport.device().features() & (1 << VIRTIO_BLK_F_RO), 0);
    r.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let (status, _) = r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    let mut first = [0u8; 512];
    r.image.as_file().read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, [0u8; 512]);
    let (status, _) = r.request(VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn state_restores_only_onto_an_image_of_the_same_size() {
    let r = rig(false);
    let config = DiskConfig {
        path: r.image.as_path().to_path_buf(),
        read_only: false,
        written_map: false,
    };
    let block = Block::open(&config).unwrap();
    let state = block.state();
    assert_eq!(state.capacity_sectors, SECTORS);
    let json = serde_json::to_string(&state).unwrap();
    let back: BlockState = serde_json::from_str(&json).unwrap();
    assert!(Block::from_state(&config, &back).is_ok());
    r.image.as_file().set_len((SECTORS + 8) * 512).unwrap();
    assert!(matches!(
        Block::from_state(&config, &back),
        Err(BlockError::CapacityChanged { found, saved: SECTORS, .. }) if found == SECTORS + 8
    ));
}

#[test]
fn disk_option_parsing() {
    assert_eq!(
        "/a/b.img".parse::<DiskConfig>(),
        Ok(DiskConfig {
            path: "/a/b.img".into(),
            read_only: false,
            written_map: false,
        })
    );
    assert_eq!(
        "/a/b.img,ro".parse::<DiskConfig>().map(|d| d.read_only),
        Ok(true)
    );
    assert!("/a/b.img,xx".parse::<DiskConfig>().is_err());
    assert!(",ro".parse::<DiskConfig>().is_err());
}

/// A disk with a written map notes a guest write's extent in the map file
/// before the write reaches the image; reads note nothing.
#[test]
#[allow(clippy::single_range_in_vec_init)] // ranges of extents
fn a_guest_write_is_noted_in_the_written_map() {
    let mut r = rig_with(false, true);
    let map_path = written_map::WrittenMap::path_for(r.image.as_path());
    let _remove = RemoveOnDrop(map_path.clone());
    let open = || written_map::WrittenMap::open(&map_path, SECTORS * SECTOR_SIZE).unwrap();
    assert!(open().0.written().is_empty());
    let (status, _) = r.request(VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert!(open().0.written().is_empty(), "a read is not a write");
    let (status, _) = r.request(VIRTIO_BLK_T_OUT, 5, &[(DATA, 512, false)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let (map, fresh) = open();
    assert_eq!(fresh, None);
    assert_eq!(map.written(), vec![0..1]);
}

/// A disk opened without its map (by `ftvmm` alone, say) may be written
/// without it: the map beside it then names no common point.
#[test]
fn a_disk_opened_without_its_map_drops_the_maps_common_point() {
    let r = rig(false);
    let map_path = written_map::WrittenMap::path_for(r.image.as_path());
    let _remove = RemoveOnDrop(map_path.clone());
    let (map, _) = written_map::WrittenMap::open(&map_path, SECTORS * SECTOR_SIZE).unwrap();
    map.set_common(Some([9; 16]), 0).unwrap();
    drop(map);
    let config = DiskConfig {
        path: r.image.as_path().to_path_buf(),
        read_only: false,
        written_map: false,
    };
    drop(Block::open(&config).unwrap());
    let (map, _) = written_map::WrittenMap::open(&map_path, SECTORS * SECTOR_SIZE).unwrap();
    assert_eq!(map.common(), None);
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
