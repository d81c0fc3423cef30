//! `ftctl lab smoke`: boot one lab node, check that it has hardware-style
//! KVM (`kvm_amd`), run the VMM's ring-0 self-test guest in it, report.

use std::time::Duration;

use serde::Serialize;

use crate::lab::{progress, Lab, LabError};
use crate::topology::NodeId;

/// The lab the smoke test uses (apart from the user's default lab).
pub const SMOKE_LAB: &str = "smoke";

#[derive(Debug, Clone, Serialize)]
pub struct SmokeReport {
    pub boot_secs: f64,
    pub kernel_uptime_secs: f64,
    pub kvm_module: Option<String>,
    pub nested_paging: bool,
    pub selftest: Option<serde_json::Value>,
    pub failures: Vec<String>,
}

impl SmokeReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Stops the smoke lab however the run ends.
struct Teardown<'a>(&'a Lab);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            progress(format_args!("cleaning up the smoke lab failed: {e}"));
        }
    }
}

pub fn run(iterations: u32) -> Result<SmokeReport, LabError> {
    let lab = Lab::open(SMOKE_LAB)?;
    lab.down()?;
    let _teardown = Teardown(&lab);
    let boot = lab
        .up(&[NodeId::A])?
        .pop()
        .expect("up returns one boot per node");
    let mut failures = Vec::new();
    let node = NodeId::A;
    let timeout = Duration::from_secs(60);

    let modules = lab.exec(node, &["cat", "/proc/modules"], timeout)?;
    let kvm_module = modules
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|m| matches!(*m, "kvm_amd" | "kvm_intel" | "kvm_pvm"))
        .map(str::to_string);
    if kvm_module.as_deref() != Some("kvm_amd") {
        failures.push(format!(
            "expected kvm_amd in the node, found {kvm_module:?}"
        ));
    }
    let dev = lab.exec(node, &["test", "-c", "/dev/kvm"], timeout)?;
    if !dev.success() {
        failures.push("/dev/kvm is missing in the node".into());
    }
    let dmesg = lab.exec(node, &["dmesg"], timeout)?;
    let nested_paging = dmesg.stdout.contains("Nested Paging enabled");

    progress("running the ring-0 self-test guest in node a");
    let iters = iterations.to_string();
    let out = lab.exec(
        node,
        &["/bin/ftvmm", "selftest", "--iterations", &iters],
        timeout,
    )?;
    let selftest = serde_json::from_str::<serde_json::Value>(out.stdout.trim()).ok();
    if !out.success() {
        failures.push(format!(
            "ftvmm selftest exited with {}: {}",
            out.exit_code(),
            out.stderr.trim()
        ));
    }
    match &selftest {
        Some(report) => {
            if report["passed"] != serde_json::Value::Bool(true) {
                failures.push(format!("self-test guest did not pass: {report}"));
            }
            if report["host"]["flavor"] != "kvm_amd" {
                failures.push(format!(
                    "ftvmm saw KVM flavour {}",
                    report["host"]["flavor"]
                ));
            }
        }
        None => failures.push(format!(
            "ftvmm selftest printed no report: {:?}",
            out.stdout
        )),
    }
    Ok(SmokeReport {
        boot_secs: boot.boot_secs,
        kernel_uptime_secs: boot.kernel_uptime_secs,
        kvm_module,
        nested_paging,
        selftest,
        failures,
    })
}
