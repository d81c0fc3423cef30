//! The receive thread of a virtio-net device: it waits for frames on the
//! TAP, for frames to replay (the receive log), for the guest adding
//! receive buffers (the receive queue's notification, forwarded as a kick)
//! and for a stop request, and moves frames into the guest under the
//! device's queue Mutex.
//!
//! The TAP is watched edge-triggered: a receive pass always reads until the
//! TAP is empty, or stops early (no buffers, paused) and is restarted by a
//! kick; so a TAP with frames waiting does not wake the thread in a loop.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queues::{NetQueues, RxStop};
use super::rx_log::RxLog;
use crate::devices::virtio::ActivateError;

const TOKEN_TAP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_REPLAY: u64 = 3;

/// The running receive thread; dropped, it stops and is joined.
pub struct RxThread {
    kick: Arc<EventFd>,
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl RxThread {
    pub fn spawn(queues: Arc<Mutex<NetQueues>>, name: &str) -> Result<RxThread, ActivateError> {
        let eventfd = |what| {
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| ActivateError::EventFd { what, source })
        };
        let kick = Arc::new(eventfd("the receive kick")?);
        let stop = eventfd("the receive thread's stop")?;
        let epoll = Epoll::new().map_err(ActivateError::Epoll)?;
        let (tap_fd, rx_log) = {
            let q = queues.lock().expect("net queues lock");
            (q.tap.as_raw_fd(), Arc::clone(&q.rx_log))
        };
        for (fd, token, events) in [
            (tap_fd, TOKEN_TAP, EventSet::IN | EventSet::EDGE_TRIGGERED),
            (
                rx_log.replay_ready().as_raw_fd(),
                TOKEN_REPLAY,
                EventSet::IN,
            ),
            (kick.as_raw_fd(), TOKEN_KICK, EventSet::IN),
            (stop.as_raw_fd(), TOKEN_STOP, EventSet::IN),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(ActivateError::Epoll)?;
        }
        let stop_fd = stop.try_clone().map_err(|source| ActivateError::EventFd {
            what: "the receive thread's stop",
            source,
        })?;
        let thread_kick = Arc::clone(&kick);
        let handle = std::thread::Builder::new()
            .name(format!("net-rx-{name}"))
            .spawn({
                let tap = name.to_string();
                move || run(epoll, queues, thread_kick, rx_log, stop_fd, &tap)
            })
            .map_err(ActivateError::SpawnThread)?;
        Ok(RxThread {
            kick,
            stop,
            handle: Some(handle),
        })
    }

    /// Makes the thread try to receive again (buffers added, resumed).
    pub fn kick(&self) {
        // The counter saturating is the only failure, and it still wakes.
        let _ = self.kick.write(1);
    }
}

impl Drop for RxThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The thread's loop; `_stop` keeps the stop eventfd open while it waits.
fn run(
    epoll: Epoll,
    queues: Arc<Mutex<NetQueues>>,
    kick: Arc<EventFd>,
    rx_log: Arc<RxLog>,
    _stop: EventFd,
    tap: &str,
) {
    let mut events = [EpollEvent::default(); 4];
    let mut tap_failed = false;
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // epoll_wait on a valid epoll fd fails only for bad arguments.
            Err(error) => {
                tracing::error!(
                    tap,
                    %error,
                    "the receive thread's wait failed: this NIC receives nothing more"
                );
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_STOP => return,
                TOKEN_KICK => {
                    let _ = kick.read();
                }
                TOKEN_REPLAY => {
                    let _ = rx_log.replay_ready().read();
                }
                _ => {}
            }
        }
        let stop_reason = queues.lock().expect("net queues lock").receive();
        if let (RxStop::TapError(kind), false) = (stop_reason, tap_failed) {
            // The TAP went away (interface deleted): its arrivals are no
            // longer watched (a kick still reads it). Said once: the guest
            // receives nothing on this NIC but what a kick finds.
            tap_failed = true;
            tracing::warn!(
                tap,
                error = %kind,
                "a read from the TAP failed: its arrivals are no longer watched"
            );
            let _ = epoll.ctl(
                ControlOperation::Delete,
                queues.lock().expect("net queues lock").tap.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}
