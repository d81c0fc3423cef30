//! A label beside a replica's RAM file (`<file>.label`): what its owner
//! says the memory holds (for the replicator, "checkpoint E of session
//! S"), so that a later copy brings only what changed since instead of
//! comparing every page.
//!
//! A label is taken (read and cleared) when the RAM file is opened, and
//! cleared before the memory runs as a guest: whatever writes the memory
//! after that makes any earlier label wrong. It is only good for the boot
//! it was written in, and for the RAM file it was written for (the device
//! and inode of the file its owner's memory is in, not whatever the path
//! names now): neither file is made durable, so after a crash of
//! the node the RAM file's pages may be older than the label says, and a
//! RAM file made anew holds nothing a label said.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"FTRL1\n";
/// `/proc/sys/kernel/random/boot_id`: 36 characters.
const BOOT_ID_LEN: usize = 36;
/// The longest label kept.
pub const MAX_LABEL: usize = 256;

/// The label file of one RAM file, open for as long as its owner holds
/// the RAM.
#[derive(Debug)]
pub struct RamLabel {
    file: File,
    owner: Owner,
}

/// Whose a label is: this boot's identity, then the RAM file's device and
/// inode.
type Owner = [u8; BOOT_ID_LEN + 16];

/// This boot and the RAM file `ram` (the open file, wherever its path
/// points now).
fn owner(ram: &File) -> io::Result<Owner> {
    use std::os::unix::fs::MetadataExt;
    let meta = ram.metadata()?;
    let mut owner = [0u8; BOOT_ID_LEN + 16];
    owner[..BOOT_ID_LEN].copy_from_slice(&boot_id()?);
    owner[BOOT_ID_LEN..BOOT_ID_LEN + 8].copy_from_slice(&meta.dev().to_le_bytes());
    owner[BOOT_ID_LEN + 8..].copy_from_slice(&meta.ino().to_le_bytes());
    Ok(owner)
}

/// Where the label of the RAM file at `ram` lives.
pub fn label_path(ram: &Path) -> PathBuf {
    let mut name = ram.as_os_str().to_owned();
    name.push(".label");
    PathBuf::from(name)
}

/// This boot's identity.
fn boot_id() -> io::Result<[u8; BOOT_ID_LEN]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    text.trim()
        .as_bytes()
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unexpected boot id"))
}

impl RamLabel {
    /// Opens the label beside the RAM file at `ram` (made if missing, mode
    /// 0600) for the memory in `memory`, the file its owner opened there;
    /// returns what the label said if it was written whole in this boot
    /// for that very file, and clears it.
    pub fn take(ram: &Path, memory: &File) -> io::Result<(RamLabel, Option<Vec<u8>>)> {
        let path = label_path(ram);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let label = RamLabel {
            file,
            owner: owner(memory)?,
        };
        let said = label.read()?;
        label.clear()?;
        Ok((label, said))
    }

    fn read(&self) -> io::Result<Option<Vec<u8>>> {
        let len = self.file.metadata()?.len();
        if len > (MAGIC.len() + BOOT_ID_LEN + 16 + 2 + MAX_LABEL + 4) as u64 {
            return Ok(None);
        }
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, 0)?;
        Ok(decode(&buf, &self.owner))
    }

    /// Says `label` (at most [`MAX_LABEL`] bytes) from now on.
    pub fn set(&self, label: &[u8]) -> io::Result<()> {
        if label.len() > MAX_LABEL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a label of {} bytes (at most {MAX_LABEL})", label.len()),
            ));
        }
        let record = encode(label, &self.owner);
        // One write of a whole record; a shorter earlier one is longer
        // than none, and a record is checked whole when read.
        self.file.write_all_at(&record, 0)?;
        if self.file.metadata()?.len() != record.len() as u64 {
            self.file.set_len(record.len() as u64)?;
        }
        Ok(())
    }

    /// Says nothing from now on.
    pub fn clear(&self) -> io::Result<()> {
        self.file.set_len(0)
    }
}

fn encode(label: &[u8], owner: &Owner) -> Vec<u8> {
    let mut record = Vec::with_capacity(MAGIC.len() + owner.len() + 2 + label.len() + 4);
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(owner);
    record.extend_from_slice(&(label.len() as u16).to_le_bytes());
    record.extend_from_slice(label);
    let crc = crc32fast::hash(&record);
    record.extend_from_slice(&crc.to_le_bytes());
    record
}

/// The label in `record` if it is whole and `owner`'s.
fn decode(record: &[u8], owner: &Owner) -> Option<Vec<u8>> {
    let body_len = record.len().checked_sub(4)?;
    let (body, crc) = record.split_at(body_len);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let rest = rest.strip_prefix(&owner[..])?;
    let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let label = rest.get(2..)?;
    (label.len() == len).then(|| label.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ft-ram-label-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ram = dir.join("guest.ram");
        std::fs::write(&ram, b"ram").unwrap();
        ram
    }

    /// Takes the label beside `ram` for the file there now.
    fn take(ram: &Path) -> (RamLabel, Option<Vec<u8>>) {
        RamLabel::take(ram, &File::open(ram).unwrap()).unwrap()
    }

    #[test]
    fn a_label_is_taken_once_and_only_what_was_set_last() {
        let ram = ram_path("once");
        let (label, said) = take(&ram);
        assert_eq!(said, None, "a new label says nothing");
        label.set(b"a longer label, first").unwrap();
        label.set(b"second").unwrap();
        drop(label);
        let (label, said) = take(&ram);
        assert_eq!(said.as_deref(), Some(&b"second"[..]));
        drop(label);
        let (label, said) = take(&ram);
        assert_eq!(said, None, "taking it cleared it");
        label.set(b"third").unwrap();
        drop(label);
        // A RAM file made anew (another inode) holds nothing it said.
        let other = ram.with_extension("other");
        std::fs::write(&other, b"new").unwrap();
        std::fs::rename(&other, &ram).unwrap();
        let (_, said) = take(&ram);
        assert_eq!(said, None, "a label of the file replaced");
        let _ = std::fs::remove_dir_all(ram.parent().unwrap());
    }

    #[test]
    fn a_label_is_for_the_file_its_owner_holds_not_the_one_at_the_path_now() {
        let ram = ram_path("held");
        let held = File::open(&ram).unwrap();
        // Another process replaces the path while the owner holds the
        // file it opened; the owner then labels its own memory.
        let other = ram.with_extension("other");
        std::fs::write(&other, b"new").unwrap();
        std::fs::rename(&other, &ram).unwrap();
        let (label, _) = RamLabel::take(&ram, &held).unwrap();
        label.set(b"checkpoint 9").unwrap();
        drop(label);
        let (_, said) = take(&ram);
        assert_eq!(said, None, "the file at the path now was never labelled");
        let _ = std::fs::remove_dir_all(ram.parent().unwrap());
    }

    #[test]
    fn a_label_of_another_boot_or_file_or_damaged_says_nothing() {
        let owner = [b'a'; BOOT_ID_LEN + 16];
        let record = encode(b"checkpoint 7", &owner);
        assert_eq!(
            decode(&record, &owner).as_deref(),
            Some(&b"checkpoint 7"[..])
        );
        let mut other = owner;
        other[0] = b'b';
        assert_eq!(decode(&record, &other), None, "another boot");
        let mut other = owner;
        other[BOOT_ID_LEN + 9] ^= 1;
        assert_eq!(decode(&record, &other), None, "another RAM file");
        for at in [
            0,
            10,
            MAGIC.len() + owner.len(),
            record.len() - 6,
            record.len() - 1,
        ] {
            let mut damaged = record.clone();
            damaged[at] ^= 0x40;
            assert_eq!(decode(&damaged, &owner), None, "byte {at} damaged");
        }
        assert_eq!(
            decode(&record[..record.len() - 1], &owner),
            None,
            "cut short"
        );
        assert_eq!(decode(&[], &owner), None);
        let ram = ram_path("long");
        let (label, _) = take(&ram);
        assert!(label.set(&[0; MAX_LABEL + 1]).is_err());
        let _ = std::fs::remove_dir_all(ram.parent().unwrap());
    }
}
