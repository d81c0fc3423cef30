//! A guest VM run by ftvmm inside a lab node, driven through the node's agent:
//! start it in the background, watch its console log, talk to its control
//! socket, kill it, restore it.

use std::time::{Duration, Instant};

use crate::{LabPair, NodeId};

/// The capture folder of every ftvmm a [`NodeGuest`] starts
/// (`--capture-dir`): `ctl("capture NAME")` writes `{CAPTURE_DIR}/NAME`,
/// `ctl("harvest --pages-file NAME")` too.
pub const CAPTURE_DIR: &str = "/tmp/captures";

/// An ftvmm process (and the guest in it) inside a node.
pub struct NodeGuest<'a> {
    pub lab: &'a LabPair,
    pub node: NodeId,
    /// Console log of the current ftvmm process, in the node.
    pub console: String,
    /// Control socket of the current ftvmm process, in the node.
    pub sock: String,
    generation: u32,
}

impl<'a> NodeGuest<'a> {
    /// Boots the guest kernel with `vcpus`, `mem_mib` and extra kernel
    /// command-line words `extra`, in the background.
    pub fn boot(
        lab: &'a LabPair,
        node: NodeId,
        vcpus: u8,
        mem_mib: u64,
        extra: &str,
    ) -> NodeGuest<'a> {
        Self::boot_with(lab, node, vcpus, mem_mib, extra, "")
    }

    /// Like [`NodeGuest::boot`], with more ftvmm arguments (`--disk`, `--net`).
    pub fn boot_with(
        lab: &'a LabPair,
        node: NodeId,
        vcpus: u8,
        mem_mib: u64,
        extra: &str,
        vmm_args: &str,
    ) -> NodeGuest<'a> {
        let mut guest = NodeGuest {
            lab,
            node,
            console: String::new(),
            sock: String::new(),
            generation: 0,
        };
        guest.next_generation();
        let cmdline = format!("console=ttyS0 reboot=k panic=1 quiet {extra}");
        let script = format!(
            "(ftvmm run --kernel /images/vmlinux --initrd /images/guest-initramfs.cpio.gz \
             --vcpus {vcpus} --mem-mib {mem_mib} --cmdline '{cmdline}' {vmm_args} \
             --serial-log {} --api-sock {} --capture-dir {CAPTURE_DIR} > {}.out 2>&1 &)",
            guest.console, guest.sock, guest.console
        );
        lab.sh(node, &script);
        guest
    }

    fn next_generation(&mut self) {
        self.generation += 1;
        self.console = format!("/tmp/guest-{}.console", self.generation);
        self.sock = format!("/tmp/guest-{}.sock", self.generation);
    }

    /// The console log so far.
    pub fn console_text(&self) -> String {
        self.lab.sh(
            self.node,
            &format!("cat {} 2>/dev/null || true", self.console),
        )
    }

    /// Waits (at most `timeout`) for the program's line that begins with
    /// `marker` and ends with a newline, read with the kernel's messages
    /// taken out (the kernel may print one in the middle of a long line);
    /// returns what follows the marker.
    pub fn wait_for_marked_line(&self, timeout: Duration, marker: &str) -> String {
        let start = Instant::now();
        loop {
            let text = without_kernel_messages(&self.console_text());
            if let Some((_, rest)) = text.split_once(marker) {
                if let Some((line, _)) = rest.split_once('\n') {
                    return line.trim_end_matches('\r').to_string();
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no whole console line after {marker:?} within {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until a console line satisfies `pred`; returns that line.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.console_text();
            // Only whole lines: the guest may be half-way through one.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            if let Some(line) = complete.lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if start.elapsed() > timeout {
                let vmm = self.lab.sh(
                    self.node,
                    &format!("cat {}.out 2>/dev/null || true", self.console),
                );
                panic!(
                    "no matching console line after {timeout:?}; console:\n{text}\nftvmm:\n{vmm}"
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Sends a control request (`ftvmm ctl` arguments) and returns the
    /// answer. Captures and page lists are named, and go into
    /// [`CAPTURE_DIR`].
    pub fn ctl(&self, args: &str) -> serde_json::Value {
        let out = self
            .lab
            .sh(self.node, &format!("ftvmm ctl --sock {} {args}", self.sock));
        let answer: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("bad ctl answer {out:?}: {e}"));
        assert_ne!(answer["kind"], "error", "ctl {args}: {answer}");
        answer
    }

    /// Kills the ftvmm process with SIGKILL.
    pub fn kill(&self) {
        self.lab.sh(
            self.node,
            &format!(
                "kill -9 $(cat {}.pid 2>/dev/null || pidof ftvmm) 2>/dev/null; true",
                self.console
            ),
        );
        self.lab.sh(
            self.node,
            "while pidof ftvmm >/dev/null; do sleep 0.1; done",
        );
    }

    /// Continues the VM captured in `dir` in a new ftvmm process.
    pub fn restore(&mut self, dir: &str) {
        self.next_generation();
        let script = format!(
            "(ftvmm restore {dir} --serial-log {} --api-sock {} --capture-dir {CAPTURE_DIR} \
             > {}.out 2>&1 &)",
            self.console, self.sock, self.console
        );
        self.lab.sh(self.node, &script);
    }
}

/// Runs ftvmm in the foreground in `node` with `kernel`, the guest
/// initramfs, 256 MiB, `vcpus` and `cmdline` (plus `extra_args`), for at
/// most 100 s; returns how it ended ([`guest_console_after_reset`] checks
/// that the guest reset, as its `ftguest.then=reboot` does, and gives its
/// console).
pub fn run_ftvmm(
    lab: &LabPair,
    node: NodeId,
    kernel: &str,
    vcpus: u8,
    cmdline: &str,
    extra_args: &[&str],
) -> lab::agent::ExecOutput {
    let vcpus = vcpus.to_string();
    let mut argv = vec![
        "timeout",
        "100",
        "ftvmm",
        "run",
        "--kernel",
        kernel,
        "--initrd",
        "/images/guest-initramfs.cpio.gz",
        "--vcpus",
        &vcpus,
        "--mem-mib",
        "256",
        "--cmdline",
        cmdline,
    ];
    argv.extend_from_slice(extra_args);
    lab.exec(node, &argv)
}

/// The guest console of a foreground ftvmm run, after checking that ftvmm
/// exited 0 because the guest reset itself (a reboot through the keyboard
/// controller, as `reboot=k` does: not a triple fault).
pub fn guest_console_after_reset(out: lab::agent::ExecOutput) -> String {
    assert!(
        out.success()
            && out
                .stderr
                .contains("guest stopped (reset through the keyboard controller"),
        "ftvmm exited with {}:\n{}\n{}",
        out.exit_code(),
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// `text` without the kernel's console messages (`[    5.950316] ...` to
/// the end of its line): a message printed in the middle of a program's
/// line is taken out, and the two halves of that line join again.
pub fn without_kernel_messages(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('[') {
        let (before, from) = rest.split_at(i);
        out.push_str(before);
        match kernel_stamp_len(from) {
            Some(len) => {
                let end = from[len..].find('\n').map_or(from.len(), |e| len + e + 1);
                rest = &from[end..];
            }
            None => {
                out.push('[');
                rest = &from[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The length of a kernel message's time stamp (`[`, spaces, seconds `.`
/// microseconds, `]`) at the start of `s`.
fn kernel_stamp_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let digits = |mut i: usize| {
        let from = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i > from).then_some(i)
    };
    let mut i = 1;
    while i < b.len() && b[i] == b' ' {
        i += 1;
    }
    let i = digits(i)?;
    if b.get(i) != Some(&b'.') {
        return None;
    }
    let i = digits(i + 1)?;
    (b.get(i) == Some(&b']')).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::without_kernel_messages;

    #[test]
    fn a_kernel_message_inside_a_line_is_taken_out() {
        let text = "boot\r\n[    5.950316] kvm: hello\r\nft-dirtier frames 1,23[    9.1] random: crng init done\r\n45,6\n[x] stays\n";
        assert_eq!(
            without_kernel_messages(text),
            "boot\r\nft-dirtier frames 1,2345,6\n[x] stays\n"
        );
        assert_eq!(without_kernel_messages("[1.] [ 2] [3.4"), "[1.] [ 2] [3.4");
    }
}
