//! virtio-blk requests: parsing a descriptor chain and executing it against
//! the backing file. Data moves between the file and guest memory only
//! through vm-memory, so reads into the guest mark the dirty bitmap.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::write_log::{DiskWrite, WriteLog};
use crate::memory::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: usize = 16;

/// Why a request failed (reported to the guest as a status byte).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the chain has no device-writable byte for the status")]
    NoStatusByte,
    #[error("the request header is {0} bytes, expected {HEADER_LEN}")]
    ShortHeader(usize),
    #[error("guest memory access at {addr:#x} (+{len:#x}) failed: {source}")]
    GuestMemory {
        addr: u64,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("{what} at byte {offset} of the disk file failed: {source}")]
    File {
        what: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error(transparent)]
    NoteWritten(#[from] super::written_map::WrittenMapError),
}

impl RequestError {
    /// The status byte the guest sees.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The backing file as requests see it.
pub struct Disk<'a> {
    pub file: &'a File,
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Where executed writes are recorded, when something mirrors the disk.
    pub log: Option<&'a WriteLog>,
}

/// Guest buffers: (address, length) pieces in chain order.
pub(super) type Segments = Vec<(GuestAddress, usize)>;

fn total(segments: &Segments) -> u64 {
    segments.iter().map(|&(_, len)| len as u64).sum()
}

/// Drops the first `skip` bytes of `segments`.
fn skip_bytes(segments: &Segments, mut skip: usize) -> Segments {
    let mut out = Vec::new();
    for &(addr, len) in segments {
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push((GuestAddress(addr.0 + skip as u64), len - skip));
        skip = 0;
    }
    out
}

fn mem_err(
    addr: GuestAddress,
    len: usize,
) -> impl FnOnce(vm_memory::GuestMemoryError) -> RequestError {
    move |source| RequestError::GuestMemory {
        addr: addr.0,
        len,
        source,
    }
}

/// What a completed request reports: the status byte's address and the
/// number of bytes written into the guest's buffers (status included).
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
}

/// Executes the request in `chain` and writes its status byte. Returns the
/// used length for the used ring; Err only when there is no status byte to
/// report through (the request is then completed with length 0).
pub fn execute(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    disk: &Disk,
) -> Result<Completion, RequestError> {
    let readable: Segments = chain
        .iter()
        .filter(|d| !d.is_write_only())
        .map(|d| (d.addr(), d.len() as usize))
        .collect();
    let mut writable: Segments = chain
        .iter()
        .filter(|d| d.is_write_only() && d.len() > 0)
        .map(|d| (d.addr(), d.len() as usize))
        .collect();
    // The status is the last writable byte.
    let status_addr = match writable.last_mut() {
        Some((addr, len)) => {
            *len -= 1;
            GuestAddress(addr.0 + *len as u64)
        }
        None => return Err(RequestError::NoStatusByte),
    };
    writable.retain(|&(_, len)| len > 0);

    let (status, data_written) = match run(mem, &readable, &writable, disk) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => (e.status(), 0),
    };
    mem.write_obj(status, status_addr)
        .map_err(mem_err(status_addr, 1))?;
    Ok(Completion {
        status,
        used_len: data_written + 1,
    })
}

/// Runs the request; returns how many data bytes it wrote to the guest.
fn run(
    mem: &GuestMemoryMmap,
    readable: &Segments,
    writable: &Segments,
    disk: &Disk,
) -> Result<u32, RequestError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    for &(addr, len) in readable {
        if got == HEADER_LEN {
            break;
        }
        let n = len.min(HEADER_LEN - got);
        mem.read_slice(&mut header[got..got + n], addr)
            .map_err(mem_err(addr, n))?;
        got += n;
    }
    if got < HEADER_LEN {
        return Err(RequestError::ShortHeader(got));
    }
    let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    match request_type {
        VIRTIO_BLK_T_IN => {
            let offset = check_range(disk, sector, total(writable))?;
            read_into_guest(mem, disk.file, offset, writable)?;
            Ok(total(writable) as u32)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let data = skip_bytes(readable, HEADER_LEN);
            let offset = check_range(disk, sector, total(&data))?;
            write(mem, disk, offset, &data)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.file.sync_data().map_err(|source| RequestError::File {
                what: "fdatasync",
                offset: 0,
                source,
            })?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut written = 0;
            for &(addr, len) in writable {
                if written == disk.id.len() {
                    break;
                }
                let n = len.min(disk.id.len() - written);
                mem.write_slice(&disk.id[written..written + n], addr)
                    .map_err(mem_err(addr, n))?;
                written += n;
            }
            Ok(written as u32)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks that `len` bytes from `sector` are whole sectors on the disk;
/// returns the byte offset.
fn check_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= disk.capacity_sectors => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: disk.capacity_sectors,
        }),
    }
}

fn seek(mut file: &File, offset: u64) -> Result<(), RequestError> {
    file.seek(SeekFrom::Start(offset))
        .map(|_| ())
        .map_err(|source| RequestError::File {
            what: "seek",
            offset,
            source,
        })
}

fn read_into_guest(
    mem: &GuestMemoryMmap,
    mut file: &File,
    mut offset: u64,
    segments: &Segments,
) -> Result<(), RequestError> {
    for &(addr, len) in segments {
        let mut done = 0;
        while done < len {
            seek(file, offset)?;
            let at = GuestAddress(addr.0 + done as u64);
            let n = mem
                .read_volatile_from(at, &mut file, len - done)
                .map_err(mem_err(at, len - done))?;
            if n == 0 {
                return Err(RequestError::File {
                    what: "read (end of file)",
                    offset,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            done += n;
            offset += n as u64;
        }
    }
    Ok(())
}

/// Writes the guest's data through a buffer that the write log keeps.
/// Executes a guest write; a disk someone mirrors records it, decided and
/// done under its log's lock (see [`WriteLog::write_with`]).
pub(super) fn write(
    mem: &GuestMemoryMmap,
    disk: &Disk,
    offset: u64,
    segments: &Segments,
) -> Result<(), RequestError> {
    match disk.log {
        Some(log) => log.write_with((offset, total(segments)), |recording| {
            if recording {
                write_gathered(mem, disk.file, offset, segments).map(Some)
            } else {
                write_from_guest(mem, disk.file, offset, segments).map(|()| None)
            }
        }),
        None => write_from_guest(mem, disk.file, offset, segments),
    }
}

/// Gathers the guest's buffers, writes them and returns them as a record.
fn write_gathered(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    segments: &Segments,
) -> Result<DiskWrite, RequestError> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; total(segments) as usize];
    let mut at = 0;
    for &(addr, len) in segments {
        mem.read_slice(&mut data[at..at + len], addr)
            .map_err(mem_err(addr, len))?;
        at += len;
    }
    file.write_all_at(&data, offset)
        .map_err(|source| RequestError::File {
            what: "write",
            offset,
            source,
        })?;
    Ok(DiskWrite { offset, data })
}

fn write_from_guest(
    mem: &GuestMemoryMmap,
    mut file: &File,
    mut offset: u64,
    segments: &Segments,
) -> Result<(), RequestError> {
    for &(addr, len) in segments {
        seek(file, offset)?;
        mem.write_all_volatile_to(addr, &mut file, len)
            .map_err(mem_err(addr, len))?;
        offset += len as u64;
    }
    Ok(())
}
