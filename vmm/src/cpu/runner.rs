//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches its exits to
//! the I/O buses. The VMM can pause all of them promptly (a real-time signal
//! kicks a vCPU out of the guest; the handler sets `immediate_exit`, so a
//! kick that lands just before `KVM_RUN` is not lost), and resume them.

use std::cell::Cell;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::IoBuses;
use crate::vm_event::VmEvent;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("installing the vCPU kick signal handler failed: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("starting the thread of vCPU {index} failed: {source}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set
            // by the vCPU thread before its first KVM_RUN and valid while it
            // lives; a byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// What the controller asks of the vCPU threads.
#[derive(Debug, Default)]
struct GateState {
    pause: bool,
    stop: bool,
    /// Threads parked in the gate.
    parked: usize,
    /// Threads still alive.
    alive: usize,
}

/// Where vCPU threads park while paused.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().expect("vCPU gate poisoned")
    }

    /// Called by a vCPU thread between runs: parks while a pause is asked
    /// for; returns false when the thread must stop.
    fn checkpoint(&self) -> bool {
        let mut s = self.lock();
        if s.pause && !s.stop {
            s.parked += 1;
            self.changed.notify_all();
            while s.pause && !s.stop {
                s = self.changed.wait(s).expect("vCPU gate poisoned");
            }
            s.parked -= 1;
            self.changed.notify_all();
        }
        !s.stop
    }

    fn thread_exited(&self) {
        let mut s = self.lock();
        s.alive -= 1;
        self.changed.notify_all();
    }
}

/// A vCPU shared between its thread (which holds it while in the guest)
/// and the VMM (which uses it only while the vCPUs are paused).
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// The running vCPUs of a VM.
pub struct Vcpus {
    threads: Mutex<Vec<JoinHandle<()>>>,
    fds: Vec<SharedVcpu>,
    gate: Arc<Gate>,
}

impl Vcpus {
    /// Starts one thread per vCPU.
    pub fn start(
        vcpus: Vec<VcpuFd>,
        buses: Arc<IoBuses>,
        events: Sender<VmEvent>,
    ) -> Result<Vcpus, RunnerError> {
        register_signal_handler(kick_signal(), kick_handler).map_err(RunnerError::SignalHandler)?;
        let gate = Arc::new(Gate::default());
        gate.lock().alive = vcpus.len();
        let mut threads = Vec::new();
        let fds: Vec<SharedVcpu> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        for (index, vcpu) in fds.iter().enumerate() {
            let index = index as u8;
            let vcpu = Arc::clone(vcpu);
            let (gate, buses, events) = (Arc::clone(&gate), Arc::clone(&buses), events.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    run_vcpu(index, vcpu, &gate, &buses, &events);
                    gate.thread_exited();
                })
                .map_err(|source| RunnerError::Spawn { index, source })?;
            threads.push(thread);
        }
        Ok(Vcpus {
            threads: Mutex::new(threads),
            fds,
            gate,
        })
    }

    /// Runs `f` on every vCPU while they are paused (the caller paused
    /// them); returns what `f` returned for each, in vCPU order.
    pub fn with_paused<T, E>(
        &self,
        mut f: impl FnMut(u8, &VcpuFd) -> Result<T, E>,
    ) -> Result<Vec<T>, E> {
        debug_assert!(self.gate.lock().pause, "vCPUs must be paused");
        self.fds
            .iter()
            .enumerate()
            .map(|(i, fd)| f(i as u8, &fd.lock().expect("vCPU lock")))
            .collect()
    }

    fn kick_all(&self) {
        for t in self.threads.lock().expect("vCPU threads lock").iter() {
            // A thread that already exited cannot be signalled; that is fine.
            let _ = t.kill(kick_signal());
        }
    }

    /// Stops every vCPU between two guest instructions and returns how long
    /// that took. The guest stays stopped until [`Vcpus::resume`].
    pub fn pause(&self) -> Duration {
        let start = Instant::now();
        self.gate.lock().pause = true;
        self.kick_all();
        let mut s = self.gate.lock();
        while s.parked < s.alive {
            // Re-kick now and then: a signal can race with a thread that
            // is handling an exit and about to re-enter the guest.
            let (guard, timeout) = self
                .gate
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .expect("vCPU gate poisoned");
            s = guard;
            if timeout.timed_out() && s.parked < s.alive {
                drop(s);
                self.kick_all();
                s = self.gate.lock();
            }
        }
        start.elapsed()
    }

    pub fn is_paused(&self) -> bool {
        self.gate.lock().pause
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.gate.lock().pause = false;
        self.gate.changed.notify_all();
    }

    /// Stops every vCPU thread and waits for them (idempotent).
    pub fn stop(&self) {
        self.gate.lock().stop = true;
        self.gate.changed.notify_all();
        self.kick_all();
        let threads = std::mem::take(&mut *self.threads.lock().expect("vCPU threads lock"));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn run_vcpu(index: u8, shared: SharedVcpu, gate: &Gate, buses: &IoBuses, events: &Sender<VmEvent>) {
    {
        let mut vcpu = shared.lock().expect("vCPU lock");
        KVM_RUN.with(|run| run.set(vcpu.get_kvm_run() as *mut kvm_run));
    }
    while gate.checkpoint() {
        // Held while in the guest; released while parked in the gate.
        let mut vcpu = shared.lock().expect("vCPU lock");
        match vcpu.run() {
            Ok(exit) => {
                if let Some(event) = handle_exit(index, exit, buses) {
                    let _ = events.send(event);
                    break;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                let _ = events.send(VmEvent::VcpuFailed {
                    index,
                    reason: format!("KVM_RUN failed: {e}"),
                });
                break;
            }
        }
    }
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
}

/// Handles one exit; returns an event when the VM must stop.
fn handle_exit(index: u8, exit: VcpuExit<'_>, buses: &IoBuses) -> Option<VmEvent> {
    match exit {
        VcpuExit::IoIn(port, data) => buses.pio.read(u64::from(port), data),
        VcpuExit::IoOut(port, data) => buses.pio.write(u64::from(port), data),
        VcpuExit::MmioRead(addr, data) => buses.mmio.read(addr, data),
        VcpuExit::MmioWrite(addr, data) => buses.mmio.write(addr, data),
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Some(VmEvent::Reset),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                _ => VmEvent::Shutdown,
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VmEvent::VcpuFailed {
                index,
                reason: format!("VM entry failed (reason {reason:#x}, cpu {cpu})"),
            })
        }
        VcpuExit::InternalError => {
            return Some(VmEvent::VcpuFailed {
                index,
                reason: "KVM internal error (emulation failure)".into(),
            })
        }
        other => {
            return Some(VmEvent::VcpuFailed {
                index,
                reason: format!("unexpected exit {other:?}"),
            })
        }
    }
    None
}
