//! Guest physical frame numbers of this process's pages, from
//! `/proc/self/pagemap` (needs root, which guest programs are).

use std::fs::File;
use std::os::unix::fs::FileExt;

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_PFN_MASK: u64 = (1 << 55) - 1;

#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("cannot read /proc/self/pagemap: {0}")]
    Read(#[from] std::io::Error),
    #[error("page at {0:#x} is not present")]
    NotPresent(usize),
    #[error("pagemap hides frame numbers (not root?)")]
    Hidden,
}

/// The frame number behind the (resident) page at virtual address `addr`.
pub fn frame_of(pagemap: &File, addr: usize) -> Result<u64, PagemapError> {
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, (addr / 4096 * 8) as u64)?;
    let entry = u64::from_le_bytes(entry);
    if entry & PAGEMAP_PRESENT == 0 {
        return Err(PagemapError::NotPresent(addr));
    }
    match entry & PAGEMAP_PFN_MASK {
        0 => Err(PagemapError::Hidden),
        pfn => Ok(pfn),
    }
}

pub fn open() -> Result<File, PagemapError> {
    Ok(File::open("/proc/self/pagemap")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touched_page_is_present_or_the_error_says_why() {
        let buf = vec![1u8; 8192];
        let pagemap = open().unwrap();
        match frame_of(&pagemap, buf.as_ptr() as usize) {
            Ok(pfn) => assert_ne!(pfn, 0),
            // Unprivileged test runs see zeroed frame numbers.
            Err(PagemapError::Hidden) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
