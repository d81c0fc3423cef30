//! The page audit of an epoch: for a few pages, a 64-bit sum of what the
//! replica's page must hold once the epoch is applied, taken by the
//! primary while its guest was stopped. The standby checks them after it
//! applies the epoch: a replica that drifted from the primary (a write the
//! dirty log missed, a delta made against another version than the
//! replica's) is refused at the first epoch that shows it, instead of
//! being found at a failover by a guest that no longer runs.
//!
//! Payload: records of `[guest physical address | why: u64 LE][sum: u64
//! LE]`, at most [`AUDIT_MAX`]; a page's address is page-aligned, so its
//! low 12 bits carry why the page was picked ([`Picked`]).

use bytes::{BufMut, Bytes, BytesMut};

use super::PAGE_SIZE;

/// Pages an epoch's audit names, at most.
pub const AUDIT_MAX: usize = 256;
const RECORD: usize = 16;

/// Why the primary picked a page for the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Picked {
    /// Written in the epoch before, not in this one: where a write the
    /// dirty log missed would show.
    Recent = 1,
    /// Anywhere in memory.
    Random = 2,
    /// Sent as a delta in this epoch.
    Delta = 3,
}

impl Picked {
    fn from_bits(bits: u64) -> Option<Picked> {
        match bits {
            1 => Some(Picked::Recent),
            2 => Some(Picked::Random),
            3 => Some(Picked::Delta),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Picked::Recent => "recent",
            Picked::Random => "random",
            Picked::Delta => "delta",
        }
    }
}

/// One audited page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRecord {
    pub gpa: u64,
    pub picked: Picked,
    pub sum: u64,
}

/// An epoch's audit: at most [`AUDIT_MAX`] pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageAudit {
    records: Vec<AuditRecord>,
}

impl PageAudit {
    /// Adds page `gpa` (page-aligned) whose contents are `page`; `false`
    /// (nothing added) once the audit is full.
    pub fn add(&mut self, gpa: u64, picked: Picked, page: &[u8]) -> bool {
        debug_assert_eq!(gpa % PAGE_SIZE as u64, 0);
        if self.is_full() {
            return false;
        }
        self.records.push(AuditRecord {
            gpa,
            picked,
            sum: page_sum(page),
        });
        true
    }

    pub fn is_full(&self) -> bool {
        self.records.len() >= AUDIT_MAX
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn records(&self) -> &[AuditRecord] {
        &self.records
    }

    pub fn to_payload(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.records.len() * RECORD);
        for r in &self.records {
            b.put_u64_le(r.gpa | r.picked as u64);
            b.put_u64_le(r.sum);
        }
        b.freeze()
    }

    /// `None` unless `payload` is whole records, at most [`AUDIT_MAX`],
    /// each naming a reason it knows.
    pub fn parse(payload: &[u8]) -> Option<PageAudit> {
        if !payload.len().is_multiple_of(RECORD) || payload.len() / RECORD > AUDIT_MAX {
            return None;
        }
        let records = payload
            .chunks_exact(RECORD)
            .map(|r| {
                let word = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
                let sum = u64::from_le_bytes(r[8..].try_into().expect("8 bytes"));
                let low = word & (PAGE_SIZE as u64 - 1);
                Some(AuditRecord {
                    gpa: word - low,
                    picked: Picked::from_bits(low)?,
                    sum,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PageAudit { records })
    }
}

/// A 64-bit sum of a page (any length that is whole 8-byte words): four
/// independent lanes of multiply-xor, mixed at the end. Not a MAC (the
/// A-link authenticates frames); it tells two versions of a page apart,
/// and is cheap enough to take while the guest is stopped.
pub fn page_sum(page: &[u8]) -> u64 {
    const K: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x27d4_eb2f_1656_67c5,
    ];
    let mut lanes = K;
    let mut chunks = page.chunks_exact(32);
    for chunk in &mut chunks {
        for (lane, (word, k)) in lanes.iter_mut().zip(chunk.chunks_exact(8).zip(K)) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(k).rotate_left(29);
        }
    }
    for word in chunks.remainder().chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        lanes[0] = (lanes[0] ^ u64::from_le_bytes(w)).wrapping_mul(K[0]);
    }
    let mut h = page.len() as u64;
    for (lane, k) in lanes.into_iter().zip(K) {
        h = (h ^ lane).wrapping_mul(k);
        h ^= h >> 31;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audit_goes_and_comes_back_whole() {
        let mut audit = PageAudit::default();
        let page = vec![7u8; PAGE_SIZE];
        assert!(audit.add(0x1000, Picked::Recent, &page));
        assert!(audit.add(0x7fff_f000, Picked::Random, &page));
        assert!(audit.add(0, Picked::Delta, &[0u8; PAGE_SIZE]));
        let back = PageAudit::parse(&audit.to_payload()).expect("parses");
        assert_eq!(back, audit);
        assert_eq!(back.records()[1].gpa, 0x7fff_f000);
        assert_eq!(back.records()[1].picked, Picked::Random);
    }

    #[test]
    fn malformed_audits_are_refused() {
        let mut audit = PageAudit::default();
        audit.add(0x2000, Picked::Delta, &[1u8; PAGE_SIZE]);
        let payload = audit.to_payload();
        assert!(
            PageAudit::parse(&payload[..RECORD - 1]).is_none(),
            "cut short"
        );
        let mut unknown = payload.to_vec();
        unknown[0] = 0x09; // why = 9
        assert!(PageAudit::parse(&unknown).is_none(), "unknown reason");
        let mut none = payload.to_vec();
        none[0] = 0;
        assert!(PageAudit::parse(&none).is_none(), "no reason");
        let too_many = vec![0x01u8; RECORD * (AUDIT_MAX + 1)];
        assert!(PageAudit::parse(&too_many).is_none(), "over the bound");
        assert_eq!(PageAudit::parse(&[]), Some(PageAudit::default()));
    }

    #[test]
    fn a_full_audit_takes_no_more() {
        let mut audit = PageAudit::default();
        let page = [0u8; PAGE_SIZE];
        for n in 0..AUDIT_MAX as u64 {
            assert!(audit.add(n * PAGE_SIZE as u64, Picked::Random, &page));
        }
        assert!(!audit.add(0, Picked::Random, &page));
        assert_eq!(audit.len(), AUDIT_MAX);
    }

    #[test]
    fn the_sum_tells_pages_apart_by_any_word_and_place() {
        let base = vec![0u8; PAGE_SIZE];
        let s0 = page_sum(&base);
        let mut seen = std::collections::HashSet::new();
        seen.insert(s0);
        // One bit anywhere, and the same word at two places.
        for at in (0..PAGE_SIZE).step_by(97) {
            let mut p = base.clone();
            p[at] ^= 1 << (at % 8);
            assert!(seen.insert(page_sum(&p)), "a flip at {at} collides");
        }
        let mut a = base.clone();
        let mut b = base.clone();
        a[..8].copy_from_slice(&1u64.to_le_bytes());
        b[8..16].copy_from_slice(&1u64.to_le_bytes());
        assert_ne!(page_sum(&a), page_sum(&b), "a word moved to the next lane");
        let mut c = base.clone();
        c[32..40].copy_from_slice(&1u64.to_le_bytes());
        assert_ne!(page_sum(&a), page_sum(&c), "a word moved a round on");
    }
}
