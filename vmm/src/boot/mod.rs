//! Loading a Linux guest: the kernel (PVH `vmlinux` or `bzImage`), the
//! initramfs, the command line, the boot information (PVH start info or the
//! zero page with its e820 map) and the MP table that describes the vCPUs.

pub mod mptable;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point in a loaded bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is an ELF without a PVH entry note: boot its bzImage instead, or build it with CONFIG_PVH=y")]
    NoPvhNote { path: PathBuf },
    #[error("cannot load kernel {path} (neither a PVH ELF nor a bzImage): {source}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs of {size} bytes does not fit in guest RAM above the kernel")]
    InitrdTooBig { size: u64 },
    #[error("bad kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("writing the command line to guest memory failed: {0}")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("writing boot information failed: {0}")]
    BootInfo(#[source] linux_loader::configurator::Error),
    #[error("writing guest memory during boot set-up failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::MpTableError),
}

/// How vCPU 0 enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode at the PVH entry, `rbx` = start info.
    Pvh,
    /// 64-bit long mode at the bzImage's 64-bit entry, `rsi` = zero page.
    Linux64,
}

#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub protocol: BootProtocol,
    pub entry: GuestAddress,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Loads everything into `mem` (of `ram_size` bytes) for `vcpus` vCPUs.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    vcpus: u8,
    source: &BootSource,
) -> Result<KernelEntry, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(&source.cmdline)
        .map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();

    let (protocol, entry, kernel_end, setup_header) = load_kernel(mem, &source.kernel)?;
    let initrd = match &source.initrd {
        Some(path) => Some(load_initrd(mem, ram_size, kernel_end, path)?),
        None => None,
    };
    mptable::write(mem, vcpus)?;
    match protocol {
        BootProtocol::Pvh => write_pvh_info(mem, ram_size, initrd)?,
        BootProtocol::Linux64 => write_zero_page(mem, ram_size, initrd, cmdline_len, setup_header)?,
    }
    Ok(KernelEntry { protocol, entry })
}

type LoadedKernel = (
    BootProtocol,
    GuestAddress,
    u64,
    Option<linux_loader::loader::bootparam::setup_header>,
);

fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.to_path_buf(),
            source,
        })
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut open()?, himem) {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => {
                Ok((BootProtocol::Pvh, entry, r.kernel_end, None))
            }
            _ => Err(BootError::NoPvhNote {
                path: path.to_path_buf(),
            }),
        },
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            let r = BzImage::load(mem, None, &mut open()?, himem).map_err(|source| {
                BootError::LoadKernel {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            let entry = GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET);
            Ok((BootProtocol::Linux64, entry, r.kernel_end, r.setup_header))
        }
        Err(source) => Err(BootError::LoadKernel {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads the initramfs at the top of RAM (page aligned); returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let addr = ram_size
        .checked_sub(size)
        .map(|a| a & !(crate::memory::PAGE_SIZE as u64 - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitrdTooBig { size })?;
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok((addr, size))
}

/// The e820 map: low RAM, the reserved EBDA/ROM area, high RAM.
fn memory_map(ram_size: u64) -> [(u64, u64, u32); 3] {
    [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, ram_size - HIMEM_START, E820_RAM),
    ]
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = memory_map(ram_size);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let modlist_addr = GuestAddress(PVH_MEMMAP_START + 0xc0);
    if initrd.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr.0;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    params.set_sections(&entries, GuestAddress(PVH_MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], modlist_addr);
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootInfo)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in memory_map(ram_size).iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = type_;
        params.e820_entries = i as u8 + 1;
    }
    let boot = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(BootError::BootInfo)
}
