//! The standby's epoch assembler (`EpochAssembler`) fed any sequence of
//! replication messages, aborts and applies, against a plain model of the
//! protocol's rules and a shadow copy of the replica.
//!
//! Input: [`ftvm_fuzz::Op`]s. Checks, after every step:
//! - the assembler accepts, completes and refuses exactly what the model
//!   does (an epoch begins only when none is staged and it is the next one;
//!   its messages carry its number; its end record matches the page count,
//!   the crc of the page addresses in order, the write count and the crc of
//!   the write payloads; anything else drops the staged epoch);
//! - a completed epoch holds exactly the pages and writes sent, in order;
//! - an apply succeeds iff the epoch is the next one and every page and
//!   write lies inside the replica; then memory and disks hold what the
//!   shadow does, and a refused apply changes nothing (checked on every
//!   page and range the epoch names);
//! - the next expected epoch is the model's.
#![no_main]

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::{BufMut, Bytes, BytesMut};
use ft_link::Frame;
use ftvm_fuzz::Op;
use libfuzzer_sys::fuzz_target;
use replicator::assembler::{CompleteEpoch, EpochAssembler};
use replicator::protocol::{
    DiskBatch, DiskRecord, Envelope, EpochEnd, Message, PageBatch, PAGE_SIZE,
};
use replicator::standby::replica_disk::ReplicaDisk;
use vmm::replication::ReplicaRam;

const RAM_MIB: u64 = 16;
const DISK_BYTES: [u64; 2] = [64 << 10, 256 << 10];

/// The replica, its disks read back through handles of their own, and the
/// shadow of what they must hold. Kept across inputs (made once).
struct World {
    ram: ReplicaRam,
    disks: Vec<ReplicaDisk>,
    readers: Vec<File>,
    shadow_ram: Vec<u8>,
    shadow_disks: Vec<Vec<u8>>,
}

impl World {
    fn new() -> World {
        let dir = std::env::temp_dir().join(format!("ftvm-fuzz-assembler-{}", std::process::id()));
        let disks: Vec<ReplicaDisk> = DISK_BYTES
            .iter()
            .enumerate()
            .map(|(i, &size)| ReplicaDisk::create(&dir.join(format!("disk{i}")), size).unwrap())
            .collect();
        let readers = disks.iter().map(|d| File::open(&d.path).unwrap()).collect();
        // The files stay open; nothing is left behind when the fuzzer exits.
        std::fs::remove_dir_all(&dir).unwrap();
        World {
            ram: ReplicaRam::create(RAM_MIB).unwrap(),
            disks,
            readers,
            shadow_ram: vec![0; (RAM_MIB << 20) as usize],
            shadow_disks: DISK_BYTES.iter().map(|&s| vec![0; s as usize]).collect(),
        }
    }

    fn page_inside(&self, gpa: u64) -> bool {
        gpa.is_multiple_of(PAGE_SIZE as u64)
            && gpa
                .checked_add(PAGE_SIZE as u64)
                .is_some_and(|end| end <= self.ram.bytes())
    }

    fn write_inside(&self, w: &DiskRecord) -> bool {
        self.disks.get(w.disk as usize).is_some_and(|d| {
            w.offset
                .checked_add(w.data.len() as u64)
                .is_some_and(|end| end <= d.size)
        })
    }

    /// Memory and disks hold the shadow's bytes wherever `c` names.
    fn check_against_shadow(&self, c: &CompleteEpoch) {
        let mut page = vec![0u8; PAGE_SIZE];
        for (gpa, _) in c.pages.iter().flat_map(|b| b.records()) {
            if self.page_inside(gpa) {
                self.ram.read_page(gpa, &mut page).unwrap();
                let at = gpa as usize;
                assert!(page == self.shadow_ram[at..at + PAGE_SIZE], "page {gpa:#x}");
            }
        }
        for w in c.writes.iter().filter(|w| self.write_inside(w)) {
            let mut got = vec![0u8; w.data.len()];
            self.readers[w.disk as usize]
                .read_exact_at(&mut got, w.offset)
                .unwrap();
            let at = w.offset as usize;
            assert!(
                got == self.shadow_disks[w.disk as usize][at..at + got.len()],
                "disk {} at {}",
                w.disk,
                w.offset
            );
        }
    }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

/// An epoch as the model stages it.
struct Stage {
    epoch: u64,
    state: Bytes,
    pages: Vec<(u64, Vec<u8>)>,
    pages_crc: crc32fast::Hasher,
    writes: Vec<DiskRecord>,
    writes_crc: crc32fast::Hasher,
}

/// The protocol's rules, plainly.
struct Model {
    expected: u64,
    staging: Option<Stage>,
}

impl Model {
    fn on_message(&mut self, env: &Envelope) -> Result<Option<Stage>, ()> {
        let result = self.step(env);
        if result.is_err() {
            self.staging = None;
        }
        result
    }

    fn open(&mut self, epoch: u64) -> Result<&mut Stage, ()> {
        match &mut self.staging {
            Some(s) if s.epoch == epoch => Ok(s),
            _ => Err(()),
        }
    }

    fn step(&mut self, env: &Envelope) -> Result<Option<Stage>, ()> {
        let epoch = env.epoch;
        match &env.message {
            Message::EpochBegin(state) => {
                if self.staging.is_some() || epoch != self.expected {
                    return Err(());
                }
                self.staging = Some(Stage {
                    epoch,
                    state: state.clone(),
                    pages: Vec::new(),
                    pages_crc: crc32fast::Hasher::new(),
                    writes: Vec::new(),
                    writes_crc: crc32fast::Hasher::new(),
                });
            }
            Message::Pages(batch) => {
                let s = self.open(epoch)?;
                for (gpa, data) in batch.records() {
                    s.pages_crc.update(&gpa.to_le_bytes());
                    s.pages.push((gpa, data.to_vec()));
                }
            }
            Message::DiskWrites(batch) => {
                let s = self.open(epoch)?;
                s.writes_crc.update(batch.bytes());
                s.writes.extend(batch.records().iter().cloned());
            }
            Message::EpochEnd(end) => {
                self.open(epoch)?;
                let s = self.staging.take().expect("open");
                let whole = end.pages == s.pages.len() as u64
                    && end.pages_crc == s.pages_crc.clone().finalize()
                    && end.writes == s.writes.len() as u64
                    && end.writes_crc == s.writes_crc.clone().finalize();
                return if whole { Ok(Some(s)) } else { Err(()) };
            }
            _ => return Err(()),
        }
        Ok(None)
    }
}

/// What the input sent since its last `EpochBegin` (for an honest end
/// record).
#[derive(Default)]
struct Tally {
    pages: u64,
    pages_crc: crc32fast::Hasher,
    writes: u64,
    writes_crc: crc32fast::Hasher,
}

impl Tally {
    fn end(&self) -> EpochEnd {
        EpochEnd {
            pages: self.pages,
            pages_crc: self.pages_crc.clone().finalize(),
            writes: self.writes,
            writes_crc: self.writes_crc.clone().finalize(),
        }
    }
}

/// The message as the standby gets it: through a frame and its decoder.
fn through_frame(message: Message, epoch: u64) -> Option<Envelope> {
    Message::from_frame(message.into_frame(epoch, 0)).ok()
}

fn envelope(op: Op, expected: u64, tally: &Tally) -> Option<Envelope> {
    let epoch_of = |delta: i8| expected.wrapping_add_signed(i64::from(delta));
    match op {
        Op::Frame {
            kind,
            delta,
            payload,
        } => {
            let frame = Frame::message(64 + kind % 16, epoch_of(delta), 0, payload).unwrap();
            Message::from_frame(frame).ok()
        }
        Op::Pages { delta, pages } => {
            let mut payload = BytesMut::new();
            for (gpa, fill) in pages {
                payload.put_u64_le(gpa);
                payload.put_bytes(fill, PAGE_SIZE);
            }
            let batch = PageBatch::new(payload.freeze()).expect("whole records");
            through_frame(Message::Pages(batch), epoch_of(delta))
        }
        Op::DiskWrites { delta, writes } => {
            let mut payload = BytesMut::new();
            for (disk, offset, len, fill) in writes {
                payload.put_u32_le(u32::from(disk));
                payload.put_u64_le(u64::from(offset));
                payload.put_u32_le(u32::from(len));
                payload.put_bytes(fill, usize::from(len));
            }
            let batch = DiskBatch::parse(payload.freeze()).expect("whole records");
            through_frame(Message::DiskWrites(batch), epoch_of(delta))
        }
        Op::End { delta, tamper } => {
            let mut end = tally.end();
            match Op::tamper(tamper) {
                None => {}
                Some((0, n)) => end.pages = end.pages.wrapping_add(u64::from(n)),
                Some((1, n)) => end.pages_crc ^= u32::from(n),
                Some((2, n)) => end.writes = end.writes.wrapping_add(u64::from(n)),
                Some((_, n)) => end.writes_crc ^= u32::from(n),
            }
            through_frame(Message::EpochEnd(end), epoch_of(delta))
        }
        Op::Abort | Op::Apply => unreachable!("not a message"),
    }
}

fn check_complete(got: &CompleteEpoch, want: &Stage) {
    assert_eq!(got.epoch, want.epoch);
    assert_eq!(got.state, want.state);
    assert_eq!(got.page_count, want.pages.len() as u64);
    let pages: Vec<(u64, &[u8])> = got.pages.iter().flat_map(|b| b.records()).collect();
    let wanted: Vec<(u64, &[u8])> = want.pages.iter().map(|(g, d)| (*g, &d[..])).collect();
    assert!(
        pages == wanted,
        "the completed epoch's pages differ from those sent"
    );
    assert_eq!(got.writes, want.writes);
}

fn apply(world: &mut World, assembler: &mut EpochAssembler, model: &mut Model, c: &CompleteEpoch) {
    let fits = c
        .pages
        .iter()
        .flat_map(|b| b.records())
        .all(|(gpa, _)| world.page_inside(gpa))
        && c.writes.iter().all(|w| world.write_inside(w));
    let should = c.epoch == model.expected && fits;
    let result = assembler.apply(c, &world.ram, &world.disks);
    assert_eq!(
        result.is_ok(),
        should,
        "apply of epoch {} (expected {}): {result:?}",
        c.epoch,
        model.expected
    );
    if should {
        model.expected += 1;
        for (gpa, data) in c.pages.iter().flat_map(|b| b.records()) {
            world.shadow_ram[gpa as usize..gpa as usize + PAGE_SIZE].copy_from_slice(data);
        }
        for w in &c.writes {
            let at = w.offset as usize;
            world.shadow_disks[w.disk as usize][at..at + w.data.len()].copy_from_slice(&w.data);
        }
    }
    world.check_against_shadow(c);
}

fuzz_target!(|data: &[u8]| {
    WORLD.with(|cell| {
        let mut cell = cell.borrow_mut();
        let world = cell.get_or_insert_with(World::new);
        let mut assembler = EpochAssembler::new(1);
        let mut model = Model {
            expected: 1,
            staging: None,
        };
        let mut tally = Tally::default();
        let mut last: Option<CompleteEpoch> = None;
        for op in Op::parse_all(data) {
            match op {
                Op::Abort => {
                    assert_eq!(assembler.abort(), model.staging.take().map(|s| s.epoch));
                }
                Op::Apply => {
                    if let Some(c) = &last {
                        apply(world, &mut assembler, &mut model, c);
                    }
                }
                op => {
                    let Some(env) = envelope(op, model.expected, &tally) else {
                        continue;
                    };
                    match &env.message {
                        Message::EpochBegin(_) => tally = Tally::default(),
                        Message::Pages(b) => {
                            tally.pages += b.len() as u64;
                            b.hash_addresses(&mut tally.pages_crc);
                        }
                        Message::DiskWrites(b) => {
                            tally.writes += b.records().len() as u64;
                            tally.writes_crc.update(b.bytes());
                        }
                        _ => {}
                    }
                    let want = model.on_message(&env);
                    let got = assembler.on_message(env);
                    match (got, want) {
                        (Ok(None), Ok(None)) | (Err(_), Err(())) => {}
                        (Ok(Some(got)), Ok(Some(want))) => {
                            check_complete(&got, &want);
                            last = Some(got);
                        }
                        (got, want) => panic!(
                            "the assembler said {:?}, the model {:?}",
                            got.map(|c| c.map(|c| c.epoch)),
                            want.map(|s| s.map(|s| s.epoch))
                        ),
                    }
                }
            }
            assert_eq!(assembler.expected(), model.expected);
        }
    });
});
