//! ftvmm boots the project's guest kernel to its init inside a lab node (real
//! kvm_amd), with 1 and with 2 vCPUs, and the guest runs a command; a guest
//! that resets by triple fault is told apart from one that reboots.

use ft_tests::guest::{guest_console_after_reset, run_ftvmm};
use ft_tests::{LabPair, NodeId};

/// Boots the guest with `vcpus` vCPUs running `program`, then rebooting;
/// returns the guest console.
fn boot_guest(lab: &LabPair, kernel: &str, vcpus: u8, program: &str) -> String {
    let cmdline =
        format!("console=ttyS0 reboot=k panic=1 quiet ftguest.run={program} ftguest.then=reboot");
    guest_console_after_reset(run_ftvmm(lab, NodeId::A, kernel, vcpus, &cmdline, &[]))
}

/// The guest's own uptime when its init started (printed by the init).
fn init_uptime(console: &str) -> f64 {
    let line = console
        .lines()
        .find(|l| l.starts_with("ftguest: init reached after "))
        .unwrap_or_else(|| panic!("the guest never reached its init:\n{console}"));
    line.trim_start_matches("ftguest: init reached after ")
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|e| panic!("bad uptime in {line:?}: {e}"))
}

#[test]
fn guest_boots_to_init_with_one_and_two_vcpus_and_runs_a_command() {
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    for vcpus in [1u8, 2] {
        let console = boot_guest(&lab, "/images/vmlinux", vcpus, "/bin/nproc");
        let uptime = init_uptime(&console);
        // nproc's output is the number of CPUs the guest brought up.
        let cpus: Vec<&str> = console
            .lines()
            .filter(|l| l.trim() == vcpus.to_string())
            .collect();
        assert_eq!(cpus.len(), 1, "nproc did not print {vcpus}:\n{console}");
        eprintln!(
            "[e2e] PVH vmlinux, {vcpus} vCPU(s): init reached after {uptime:.2}s of guest uptime"
        );
    }
}

#[test]
fn guest_boots_from_a_bzimage() {
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let console = boot_guest(&lab, "/images/bzImage", 1, "/bin/uname");
    assert!(
        console.lines().any(|l| l.trim() == "Linux"),
        "uname did not run:\n{console}"
    );
    eprintln!(
        "[e2e] bzImage: init reached after {:.2}s",
        init_uptime(&console)
    );
}

/// A guest that reboots by triple fault (Linux's `reboot=t`: an empty
/// interrupt table, then `int3`) is reported as a triple fault, not as the
/// reset through the keyboard controller that the other tests' `reboot=k`
/// takes (`guest_console_after_reset` checks that one), so that a guest's CPU failing
/// can be told from a guest that rebooted or panicked.
#[test]
fn a_triple_fault_is_told_apart_from_a_reboot() {
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let cmdline = "console=ttyS0 reboot=t panic=1 quiet ftguest.run=/bin/true ftguest.then=reboot";
    let out = run_ftvmm(&lab, NodeId::A, "/images/vmlinux", 1, cmdline, &[]);
    // It booted and rebooted as asked (not a fault on the way).
    assert!(
        out.success()
            && out.stdout.contains("ftguest: init reached after ")
            && out
                .stderr
                .contains("guest stopped (reset by a triple fault on vCPU 0"),
        "ftvmm exited with {}:\n{}\n{}",
        out.exit_code(),
        out.stdout,
        out.stderr
    );
}
