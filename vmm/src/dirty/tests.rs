//! Dirty tracking on this host's KVM, by ring and by bitmap, with tiny
//! real-mode guests (they run on hardware KVM and on PVM alike) that write
//! known pages: what a harvest reports must be exactly what was written.

// Page sets are lists of ranges here; a list of one range is meant.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::cpu::runner::Vcpus;
use crate::devices::bus::{BusDevice, IoBuses};
use crate::kvm_host::{self, KvmHostError};
use crate::memory::{self, GuestRam};
use crate::selftest::{self, CODE_GPA};
use crate::vm_event::VmEvent;

/// The port where the guest says which phase it finished (OUT) and asks
/// which it may start (IN).
const PHASE_PORT: u8 = 0xe9;
/// A port nothing listens on: an OUT to it is only an exit.
const EXIT_PORT: u8 = 0x80;
/// How long a phase may take before the test fails (PVM emulates real
/// mode at ~1.6 us an instruction; a phase takes milliseconds).
const PHASE_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn set_bits_become_page_numbers_in_order() {
    let mut pages = Vec::new();
    push_set_bits(0, &[0b101, 1 << 63], &mut pages);
    push_set_bits(256, &[0, 1], &mut pages);
    assert_eq!(pages, vec![0, 2, 127, 320]);
}

#[test]
fn merging_counts_who_wrote_what() {
    let merged = DirtyPages::merge(&[1, 3, 5, 9], &[2, 3, 10]);
    assert_eq!(
        merged.page_numbers().collect::<Vec<_>>(),
        [1, 2, 3, 5, 9, 10]
    );
    assert_eq!((merged.count(), merged.by_guest, merged.by_vmm), (6, 3, 2));
}

/// Real-mode code at [`CODE_GPA`]. Phase k (from 1) waits until the host
/// allows it (`in al, PHASE_PORT` gives at least k), writes byte k at the
/// start of each page of its ranges (pages 0x10..0x100: below 1 MiB, past
/// the code), optionally with an exit after each page, then reports
/// `out PHASE_PORT, k`. After the last phase it waits for ever.
fn program(phases: &[&[Range<u64>]], exit_per_page: bool) -> Vec<u8> {
    let mut code = Vec::new();
    let jump_back = |code: &mut Vec<u8>, opcode: u8, target: usize| {
        let disp = target as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[opcode, i8::try_from(disp).expect("short jump") as u8]);
    };
    for (i, ranges) in phases.iter().enumerate() {
        let k = u8::try_from(i + 1).expect("phases");
        let wait = code.len();
        code.extend_from_slice(&[0xe4, PHASE_PORT, 0x3c, k]); // in al, port; cmp al, k
        jump_back(&mut code, 0x72, wait); // jb wait
        for r in ranges.iter() {
            assert!(r.start >= 0x10 && r.end <= 0x100 && r.start < r.end);
            let count = (r.end - r.start) as u16;
            let segment = (r.start * 0x100) as u16;
            code.push(0xb9); // mov cx, count
            code.extend_from_slice(&count.to_le_bytes());
            code.push(0xb8); // mov ax, segment
            code.extend_from_slice(&segment.to_le_bytes());
            let each = code.len();
            code.extend_from_slice(&[0x8e, 0xd8]); // mov ds, ax
            code.extend_from_slice(&[0xc6, 0x06, 0, 0, k]); // mov byte [0], k
            if exit_per_page {
                code.extend_from_slice(&[0xe6, EXIT_PORT]); // out EXIT_PORT, al
            }
            code.extend_from_slice(&[0x05, 0x00, 0x01]); // add ax, 0x100
            jump_back(&mut code, 0xe2, each); // loop each
        }
        code.extend_from_slice(&[0xb0, k, 0xe6, PHASE_PORT]); // mov al, k; out port, al
    }
    let wait = code.len();
    code.extend_from_slice(&[0xe4, PHASE_PORT]); // in al, port
    jump_back(&mut code, 0xeb, wait);
    code
}

fn pages(ranges: &[Range<u64>]) -> Vec<u64> {
    let mut all: Vec<u64> = ranges.iter().flat_map(|r| r.clone()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The phase the guest finished and the one the host allows.
#[derive(Default)]
struct Phases {
    state: Mutex<(u8, u8)>,
    changed: Condvar,
}

struct PhasePort(Arc<Phases>);

impl BusDevice for PhasePort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.0.state.lock().unwrap().1;
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0.state.lock().unwrap().0 = data[0];
        self.0.changed.notify_all();
    }
}

/// A one-vCPU test guest with dirty tracking, run by the VMM's own vCPU
/// runner. Fields drop in order: the VM before the RAM it maps.
struct Guest {
    vcpus: Vcpus,
    events: Receiver<VmEvent>,
    phases: Arc<Phases>,
    log: DirtyLog,
    vm: VmFd,
    ram: GuestRam,
}

/// A VM of `mem_mib` with dirty tracking and its vCPU at `code`, not yet
/// running. `None` when this host has no /dev/kvm, or no ring when
/// `tracking` insists on one.
fn tracked_vm(
    code: &[u8],
    mem_mib: u64,
    tracking: DirtyTracking,
    ring_entries: u32,
    hot_harvests: u32,
) -> Option<(VcpuFd, DirtyLog, VmFd, GuestRam)> {
    let kvm = match kvm_host::probe() {
        Ok((kvm, _)) => kvm,
        Err(KvmHostError::NoDevKvm) => return None,
        Err(e) => panic!("KVM host check failed: {e}"),
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let ram = memory::create(mem_mib).expect("guest RAM");
    ram.memory
        .write_slice(code, GuestAddress(CODE_GPA))
        .expect("code fits");
    let log = match DirtyLog::enable_sized(
        &vm,
        &[(0, 0, ram.size)],
        tracking,
        ring_entries,
        hot_harvests,
    ) {
        Ok(log) => log,
        Err(DirtyLogError::NoRing) => {
            eprintln!("this KVM has no dirty ring: test skipped");
            return None;
        }
        Err(e) => panic!("enabling dirty tracking failed: {e}"),
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: ram.size,
        userspace_addr: ram.memory.get_host_address(GuestAddress(0)).unwrap() as u64,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
    };
    // SAFETY: the region is `ram`'s live mapping, which the caller keeps
    // until after the VM is gone.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    selftest::start_at_code(&vcpu).expect("real-mode registers");
    log.attach_vcpus(std::slice::from_ref(&vcpu))
        .expect("mapping the dirty ring");
    Some((vcpu, log, vm, ram))
}

impl Guest {
    /// Starts `code` with dirty tracking `tracking`; the first harvest
    /// (every page) is taken, so the next reports only what is written.
    fn start(code: &[u8], tracking: DirtyTracking, ring_entries: u32) -> Option<Guest> {
        Self::start_hot(code, tracking, ring_entries, 0)
    }

    /// [`Guest::start`] with hot pages left writable for up to
    /// `hot_harvests` harvests (bitmap only).
    fn start_hot(
        code: &[u8],
        tracking: DirtyTracking,
        ring_entries: u32,
        hot_harvests: u32,
    ) -> Option<Guest> {
        let (vcpu, log, vm, ram) = tracked_vm(code, 16, tracking, ring_entries, hot_harvests)?;
        log.harvest(&vm, &ram.memory).expect("first harvest");
        let phases = Arc::new(Phases::default());
        let buses = Arc::new(IoBuses::default());
        let port = Arc::new(Mutex::new(PhasePort(Arc::clone(&phases))));
        buses
            .pio
            .insert(u64::from(PHASE_PORT), 1, port)
            .expect("port free");
        let (events_tx, events) = std::sync::mpsc::channel();
        let vcpus = Vcpus::start(vec![vcpu], buses, events_tx, log.ring().cloned(), false)
            .expect("vCPU thread");
        Some(Guest {
            vcpus,
            events,
            phases,
            log,
            vm,
            ram,
        })
    }

    /// Lets the guest run phase `k` and waits until it has finished it.
    fn run_phase(&self, k: u8) {
        let deadline = Instant::now() + PHASE_DEADLINE;
        let mut state = self.phases.state.lock().unwrap();
        state.1 = k;
        while state.0 < k {
            match self.events.try_recv() {
                Ok(event) => panic!("the guest stopped in phase {k}: {event:?}"),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not finish phase {k}"
            );
            state = self
                .phases
                .changed
                .wait_timeout(state, Duration::from_millis(20))
                .unwrap()
                .0;
        }
    }

    /// Harvests with the vCPU paused (as a checkpoint does).
    fn harvest(&self) -> DirtyPages {
        self.vcpus.pause();
        let harvested = self.log.harvest(&self.vm, &self.ram.memory);
        self.vcpus.resume();
        harvested.expect("harvest")
    }

    fn full_exits(&self) -> u64 {
        self.log.ring().map_or(0, |r| r.full_exits())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vcpus.stop();
    }
}

fn numbers(pages: &DirtyPages) -> Vec<u64> {
    pages.page_numbers().collect()
}

#[test]
fn auto_prefers_the_bitmap_for_guests_up_to_its_bound_with_manual_protect() {
    let bound = AUTO_BITMAP_MAX_BYTES;
    assert_eq!(
        DirtyTracking::Auto.prefers_bitmap(128 << 20, true),
        AUTO_PREFERS_HOT_PAGES
    );
    assert_eq!(
        DirtyTracking::Auto.prefers_bitmap(bound, true),
        AUTO_PREFERS_HOT_PAGES
    );
    assert!(!DirtyTracking::Auto.prefers_bitmap(bound + 4096, true));
    assert!(!DirtyTracking::Auto.prefers_bitmap(128 << 20, false));
    assert!(DirtyTracking::Bitmap.prefers_bitmap(bound * 2, false));
    assert!(!DirtyTracking::Ring.prefers_bitmap(4096, true));
}

/// Auto on this KVM, for a small guest: the ring where KVM has one (the
/// bitmap with hot pages first where [`AUTO_PREFERS_HOT_PAGES`]).
#[test]
fn auto_takes_the_bitmap_with_hot_pages_for_a_small_guest() {
    let Some((_vcpu, log, vm, _ram)) =
        tracked_vm(&[0xf4], 16, DirtyTracking::Auto, RING_ENTRIES, HOT_HARVESTS)
    else {
        return;
    };
    let has_ring =
        vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING)) > 0;
    let has_manual_protect = BitmapLog::has_manual_protect(&vm);
    let expected = if has_manual_protect && AUTO_PREFERS_HOT_PAGES || !has_ring {
        DirtyMethod::Bitmap
    } else {
        DirtyMethod::Ring
    };
    assert_eq!(log.method(), expected);
    match log.ring() {
        Some(ring) => assert_eq!(ring.entries(), RING_ENTRIES),
        None if has_manual_protect => assert_eq!(log.hot_harvests(), HOT_HARVESTS),
        None => assert_eq!(log.hot_harvests(), 0),
    }
}

#[test]
fn the_first_harvest_reports_every_page_by_either_method() {
    for tracking in [DirtyTracking::Bitmap, DirtyTracking::Ring] {
        let Some((_vcpu, log, vm, ram)) = tracked_vm(&[0xf4], 16, tracking, RING_ENTRIES, 0) else {
            continue;
        };
        let first = log.harvest(&vm, &ram.memory).unwrap();
        if tracking == DirtyTracking::Ring || log.manual_protect() {
            assert_eq!(first.count(), 16 << 8, "{tracking:?}");
        }
        let second = log.harvest(&vm, &ram.memory).unwrap();
        assert_eq!(second.count(), 0, "{tracking:?}: nothing was written");
    }
}

/// The guest writes a known set, the VMM one page of it and one more: the
/// ring reports exactly that set, as the bitmap does for the same program.
#[test]
fn the_ring_reports_exactly_the_pages_written_as_the_bitmap_does() {
    let written = [0x20..0x40, 0x80..0x84, 0xf0..0xf1];
    let code = program(&[&written], false);
    let by_vmm = [0x20_u64, 0x300];
    let mut expected = pages(&written);
    expected.push(0x300);
    let mut reports = Vec::new();
    for tracking in [DirtyTracking::Bitmap, DirtyTracking::Ring] {
        let Some(guest) = Guest::start(&code, tracking, RING_ENTRIES) else {
            continue;
        };
        guest.run_phase(1);
        guest.vcpus.pause();
        for page in by_vmm {
            guest
                .ram
                .memory
                .write_obj(0xaa_u8, GuestAddress(page << 12))
                .unwrap();
        }
        guest.vcpus.resume();
        let harvested = guest.harvest();
        assert_eq!(numbers(&harvested), expected, "{tracking:?}");
        assert_eq!(
            (harvested.by_guest, harvested.by_vmm),
            (expected.len() as u64 - 2, 1),
            "{tracking:?}: page 0x20 was written by both, 0x300 by the VMM only"
        );
        assert_eq!(
            guest.log.method() == DirtyMethod::Ring,
            tracking == DirtyTracking::Ring
        );
        reports.push(harvested);
    }
    if let [bitmap, ring] = reports.as_slice() {
        assert_eq!(bitmap, ring);
    }
}

#[test]
fn a_second_harvest_sees_only_pages_written_after_the_first() {
    let first = [0x20..0x30];
    let second = [0x28..0x38];
    let code = program(&[&first, &second], false);
    for tracking in [DirtyTracking::Ring, DirtyTracking::Bitmap] {
        let Some(guest) = Guest::start(&code, tracking, RING_ENTRIES) else {
            continue;
        };
        guest.run_phase(1);
        assert_eq!(numbers(&guest.harvest()), pages(&first), "{tracking:?}");
        guest.run_phase(2);
        assert_eq!(numbers(&guest.harvest()), pages(&second), "{tracking:?}");
        assert_eq!(guest.harvest().count(), 0, "{tracking:?}: nothing since");
    }
}

/// With the bitmap, pages the guest wrote in two epochs in a row stay
/// writable and are reported at each harvest, written or not, until their
/// word's turn to be protected again; then they are no longer reported.
#[test]
fn hot_pages_stay_reported_until_retired() {
    const HOT: u32 = 4;
    let hot = [0x20..0x30];
    let code = program(&[&hot, &hot], false);
    let Some(guest) = Guest::start_hot(&code, DirtyTracking::Bitmap, RING_ENTRIES, HOT) else {
        return;
    };
    if !guest.log.manual_protect() {
        eprintln!("this KVM has no manual dirty protect: test skipped");
        return;
    }
    assert_eq!(guest.log.hot_harvests(), HOT);
    // Harvest 0 was the first (every page). Word 0 (pages 0-63) retires
    // its hot pages at harvests 4, 8, ...
    guest.run_phase(1);
    let first = guest.harvest();
    assert_eq!(numbers(&first), pages(&hot), "harvest 1");
    assert_eq!(first.hot, 0, "written once: protected again");
    guest.run_phase(2);
    let second = guest.harvest();
    assert_eq!(numbers(&second), pages(&hot), "harvest 2");
    assert_eq!(second.hot, 16, "written twice in a row: hot");
    assert_eq!(second.written, 16, "each was protected, and written");
    let third = guest.harvest();
    assert_eq!(numbers(&third), pages(&hot), "harvest 3: not written, hot");
    assert_eq!(third.hot, 16);
    assert_eq!(third.written, 0, "hot: not known to be written");
    let fourth = guest.harvest();
    assert_eq!(numbers(&fourth), pages(&hot), "harvest 4: retired");
    assert_eq!(fourth.hot, 0);
    assert_eq!(guest.harvest().count(), 0, "harvest 5: cold, protected");
}

/// 240 pages into a ring of 256 entries (KVM stops the vCPU at 192): the
/// vCPU thread empties its ring and runs on, and no page is lost, twice
/// over (the second fill reuses the entries the first one recycled).
#[test]
fn a_full_ring_stops_the_vcpu_and_loses_no_page() {
    let all = [0x10..0x100];
    // An exit after each page: KVM checks for a full ring when it enters
    // the guest (PVM emulates real mode without re-entering in between).
    let code = program(&[&all, &all], true);
    let Some(guest) = Guest::start(&code, DirtyTracking::Ring, 256) else {
        return;
    };
    assert_eq!(guest.log.ring().map(|r| r.entries()), Some(256));
    guest.run_phase(1);
    assert!(guest.full_exits() >= 1, "the ring never filled up");
    assert_eq!(numbers(&guest.harvest()), pages(&all));
    let before = guest.full_exits();
    guest.run_phase(2);
    assert!(guest.full_exits() > before, "the ring did not fill again");
    assert_eq!(numbers(&guest.harvest()), pages(&all));
    assert_eq!(guest.harvest().count(), 0);
}

/// A harvest hands its entries back to KVM (`KVM_RESET_DIRTY_RINGS`):
/// 112 pages three times into a ring that stops the vCPU at 192 entries,
/// harvested in between, never fill it.
#[test]
fn a_harvest_recycles_the_ring() {
    let some = [0x10..0x80];
    let code = program(&[&some, &some, &some], true);
    let Some(guest) = Guest::start(&code, DirtyTracking::Ring, 256) else {
        return;
    };
    for phase in 1..=3 {
        guest.run_phase(phase);
        assert_eq!(numbers(&guest.harvest()), pages(&some), "phase {phase}");
    }
    assert_eq!(guest.full_exits(), 0, "harvests left the ring full");
}

/// Host-side harvest time of an idle guest (and of one that dirtied 100
/// pages) at 128 MiB and 1 GiB, by each method. Run with
/// `cargo test --release -p vmm -- --ignored --nocapture harvest_time`.
#[test]
#[ignore = "a measurement, not a check"]
fn harvest_time_by_memory_size_and_method() {
    const ROUNDS: usize = 200;
    const DIRTY: u64 = 100;
    // l: write DIRTY pages; out PHASE_PORT, al; jmp l
    let mut code = program(&[&[0x10..0x10 + DIRTY]], false);
    // Drop the phase wait at the start and the wait at the end: loop.
    code.drain(..6);
    code.truncate(code.len() - 4);
    let back = -(code.len() as i64 + 2);
    code.extend_from_slice(&[0xeb, back as i8 as u8]);
    let median = |mut t: Vec<Duration>| {
        t.sort();
        (t[t.len() / 2], t[t.len() * 9 / 10])
    };
    let mut results = Vec::new();
    for mem_mib in [128, 1024] {
        for tracking in [DirtyTracking::Bitmap, DirtyTracking::Ring] {
            let Some((mut vcpu, log, vm, ram)) =
                tracked_vm(&code, mem_mib, tracking, RING_ENTRIES, 0)
            else {
                return;
            };
            log.harvest(&vm, &ram.memory).unwrap();
            let mut idle = Vec::new();
            for _ in 0..ROUNDS {
                let t = Instant::now();
                let h = log.harvest(&vm, &ram.memory).unwrap();
                idle.push(t.elapsed());
                assert_eq!(h.count(), 0);
            }
            let mut busy = Vec::new();
            for _ in 0..ROUNDS / 4 {
                loop {
                    match vcpu.run().expect("KVM_RUN") {
                        VcpuExit::IoOut(port, _) if port == u16::from(PHASE_PORT) => break,
                        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                        other => panic!("unexpected exit {other:?}"),
                    }
                }
                let t = Instant::now();
                let h = log.harvest(&vm, &ram.memory).unwrap();
                busy.push(t.elapsed());
                assert_eq!(h.count(), DIRTY);
            }
            let (idle_p50, idle_p90) = median(idle);
            let (busy_p50, busy_p90) = median(busy);
            println!(
                "harvest {mem_mib:>5} MiB {:>6}: idle p50 {:>7.1} us p90 {:>7.1} us; \
                 {DIRTY} pages dirty p50 {:>7.1} us p90 {:>7.1} us",
                log.method(),
                idle_p50.as_secs_f64() * 1e6,
                idle_p90.as_secs_f64() * 1e6,
                busy_p50.as_secs_f64() * 1e6,
                busy_p90.as_secs_f64() * 1e6,
            );
            results.push((mem_mib, log.method(), idle_p50, busy_p50));
            drop((vcpu, log, vm));
            drop(ram);
        }
    }
    for method in [DirtyMethod::Bitmap, DirtyMethod::Ring] {
        let at = |mib| {
            results
                .iter()
                .find(|r| r.0 == mib && r.1 == method)
                .map(|r| (r.2.as_secs_f64(), r.3.as_secs_f64()))
                .unwrap()
        };
        let (small, large) = (at(128), at(1024));
        println!(
            "{method:>6}: 1 GiB / 128 MiB harvest time: idle {:.2}x, {DIRTY} pages {:.2}x",
            large.0 / small.0,
            large.1 / small.1
        );
    }
}
