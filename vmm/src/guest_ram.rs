//! Anonymous guest RAM for small test VMs. (The VMM proper will keep guest
//! memory in a memfd through vm-memory; the self-test needs only a few pages.)

use std::ptr::NonNull;

/// Errors of guest RAM set-up.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    #[error("mmap of {size} bytes of guest RAM failed: {source}")]
    Mmap {
        size: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "write of {len} bytes at offset {offset:#x} is outside the {size:#x} bytes of guest RAM"
    )]
    OutOfRange {
        offset: usize,
        len: usize,
        size: usize,
    },
}

/// A private anonymous mapping that backs a guest memory slot.
pub struct GuestRam {
    ptr: NonNull<u8>,
    size: usize,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed memory.
    pub fn new(size: usize) -> Result<Self, GuestRamError> {
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(GuestRamError::Mmap {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(GuestRamError::Mmap {
            size,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(GuestRam { ptr, size })
    }

    /// Host address of the mapping (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Copies `bytes` into guest RAM at `offset`.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<(), GuestRamError> {
        let end = offset.checked_add(bytes.len()).filter(|&e| e <= self.size);
        if end.is_none() {
            return Err(GuestRamError::OutOfRange {
                offset,
                len: bytes.len(),
                size: self.size,
            });
        }
        // SAFETY: the range [offset, offset + len) was checked to lie inside
        // the mapping, which this struct owns exclusively (&mut self).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            );
        }
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: ptr and size are those of the mapping created in `new`,
        // unmapped exactly once here. A VM using it must be dropped first,
        // which holders guarantee by field order.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_bounds_checked() {
        let mut ram = GuestRam::new(4096).unwrap();
        ram.write(4090, &[1; 6]).unwrap();
        assert!(matches!(
            ram.write(4091, &[1; 6]),
            Err(GuestRamError::OutOfRange { .. })
        ));
        assert!(ram.write(usize::MAX, &[1]).is_err());
    }
}
