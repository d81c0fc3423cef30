//! `ftctl lab smoke` as a test: a lab node has kvm_amd and runs a ring-0
//! guest under it.

use ft_tests::LabLock;

#[test]
fn a_lab_node_runs_a_ring0_guest_under_kvm_amd() {
    let _lock = LabLock::acquire();
    let report = lab::smoke::run(20_000_000).unwrap_or_else(|e| panic!("smoke run failed: {e}"));
    assert!(report.passed(), "smoke failures: {:?}", report.failures);
    assert_eq!(report.kvm_module.as_deref(), Some("kvm_amd"));
    let selftest = report.selftest.expect("self-test report");
    assert_eq!(selftest["reported"], selftest["expected"]);
    eprintln!(
        "[e2e] smoke: boot {:.1}s, ring-0 loop {} ns/iteration",
        report.boot_secs, selftest["ns_per_iteration"]
    );
}
