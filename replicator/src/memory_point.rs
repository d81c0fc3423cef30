//! Memory common points: a standby's RAM file labelled "checkpoint E of
//! the session of lineage L" ([`vmm::replication::ram_label`]), written
//! after it applied epoch E. A primary that kept the pages of each epoch
//! of that session (and the pages its guest wrote since the last one)
//! brings such a replica forward by those pages alone: no page is read
//! and digested on either node, as the written maps do for disks
//! ([`crate::written`]).
//!
//! Why a label is enough: every write to the RAM file after the label is
//! either an epoch of the same session (whose pages the primary kept; an
//! epoch applied only in part is among them too), or comes after the
//! label was cleared (a new session's copy, a promotion, a VM booted on
//! the file). A label of an older session never matches: the primary
//! starts a new lineage at every copy at level FT.

use vmm::replication::written_map::CommonId;

/// A session's memory lineage: 16 random bytes.
pub type Lineage = CommonId;

/// The label of a replica that applied checkpoint `epoch` of `lineage`.
pub fn label(lineage: &Lineage, epoch: u64) -> [u8; 24] {
    let mut label = [0u8; 24];
    label[..16].copy_from_slice(lineage);
    label[16..].copy_from_slice(&epoch.to_le_bytes());
    label
}

/// The lineage and checkpoint a label names (`None` for anything else).
pub fn from_label(label: &[u8]) -> Option<(Lineage, u64)> {
    if label.len() != 24 {
        return None;
    }
    let lineage = label[..16].try_into().ok()?;
    let epoch = u64::from_le_bytes(label[16..].try_into().ok()?);
    Some((lineage, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_names_its_lineage_and_checkpoint() {
        let lineage = [7u8; 16];
        assert_eq!(from_label(&label(&lineage, 42)), Some((lineage, 42)));
        assert_eq!(from_label(&[0; 23]), None);
        assert_eq!(from_label(&[0; 25]), None);
    }
}
