//! The web console in real headless Chromium (Debian's `chromium`, driven
//! over the DevTools protocol) against the lab pair, with the ledger client
//! writing (issue 13): log in as a console user (made through the API on the
//! other node); see both nodes and the
//! protected ledger VM, and its live charts; protect it at HA and move it
//! by live migration from the console of the node that does not run its
//! primary, then back to FT and back to its node by a switchover (the
//! Protect, Migrate and Switch over buttons); enter maintenance on the
//! primary's node and watch the VM move; pull that node and see that
//! nothing happens to the VM; bring it back, leave maintenance and watch
//! the VM return to protected on its node; pull the primary and see the
//! takeover and its alert appear without a reload; the audit log page names
//! the user for each request. Each step's screenshot
//! goes under the test's output folder (`target/tmp/console/`); the page's
//! console must stay free of errors; `ftctl node show`'s view (the API)
//! agrees with the page at each step; nothing acknowledged is lost.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ft_tests::browser::Browser;
use ft_tests::{Appender, LabPair};
use ftd_client::model::{NodeView, VmView};
use lab::ft_pair;
use lab::NodeId;
use replicator::level::Level;
use replicator::status::{FtState, Role, Status};

/// Polls the text of `selector` (the client writing meanwhile) until
/// `want` holds; returns it. A write the ledger does not acknowledge ends
/// the test with both nodes' logs.
fn until(
    lab: &LabPair,
    browser: &Browser,
    writer: &mut Appender,
    selector: &str,
    what: &str,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(text) = browser.text(selector) {
            if want(&text) {
                return text;
            }
            last = text;
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: {selector} shows {last:?} after {timeout:?}; console errors: {:?}",
            browser.console_errors()
        );
        if let Err(e) = writer.try_append_for(Duration::from_millis(300)) {
            panic!(
                "{what}: the ledger client failed: {e}\n--- node a:\n{}\n--- node b:\n{}",
                logs(lab, NodeId::A),
                logs(lab, NodeId::B)
            );
        }
    }
}

/// The page under test, with the ledger client that writes while it is
/// watched.
struct Page<'a> {
    lab: &'a LabPair,
    browser: &'a Browser,
    writer: &'a mut Appender,
}

impl Page<'_> {
    /// Waits (at most `secs`) until the text of `selector` satisfies `want`.
    fn until(
        &mut self,
        selector: &str,
        what: &str,
        secs: u64,
        want: impl Fn(&str) -> bool,
    ) -> String {
        until(
            self.lab,
            self.browser,
            self.writer,
            selector,
            what,
            Duration::from_secs(secs),
            want,
        )
    }

    /// Waits (at most `secs`, the client writing) until `node`'s engine
    /// says what `want` asks; returns its status.
    fn engine(
        &mut self,
        node: NodeId,
        what: &str,
        secs: u64,
        want: impl Fn(&Status) -> bool,
    ) -> Status {
        let start = Instant::now();
        loop {
            let status = ft_pair::status(self.lab.lab(), node);
            if let Some(s) = status.as_ref().filter(|s| want(s)) {
                return s.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{what}: {node:?}'s engine says {status:?}\n{}",
                logs(self.lab, node)
            );
            if let Err(e) = self.writer.try_append_for(Duration::from_millis(300)) {
                panic!(
                    "{what}: the ledger client failed: {e}\n{}",
                    logs(self.lab, node)
                );
            }
        }
    }

    /// Clicks the button at `selector` and confirms the question it asks,
    /// which must begin with `question` (a click that hit another button
    /// is not confirmed).
    /// A row whose state changes is drawn again, and its buttons may move
    /// under the pointer between finding one and clicking it: a click that
    /// opened no confirmation is made again on the button found anew
    /// (a click that missed asked nothing).
    fn act(&mut self, selector: &str, question: &str) {
        // The button is drawn with its row's state, which the next update
        // may draw again: a state the page just showed can be undone by a
        // later update for a moment (seen once: the Migrate button gone
        // right after the row showed "protected" at level HA), and the
        // button comes back with the state. A user waits for it too.
        if let Err(e) = self.browser.wait_for(selector, Duration::from_secs(30)) {
            let _ = self.browser.screenshot("button-missing");
            panic!("{selector}: never drawn: {e}");
        }
        // Nothing covers the button: a user could click it.
        let uncovered = self
            .browser
            .eval(&format!(
                "(() => {{ const b = document.querySelector({sel}); if (!b) return 'missing'; \
                 b.scrollIntoView({{block: 'center', inline: 'center'}}); \
                 const r = b.getBoundingClientRect(); \
                 const at = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2); \
                 return at === b || b.contains(at) ? 'clear' : `covered by ${{at && at.outerHTML.slice(0, 80)}}`; }})()",
                sel = serde_json::to_string(selector).unwrap()
            ))
            .expect("the button's place");
        if uncovered != serde_json::json!("clear") {
            let _ = self.browser.screenshot("button-covered");
            panic!("{selector}: {uncovered}");
        }
        for attempt in 1..=3 {
            self.browser.click(selector).expect("the button");
            match self
                .browser
                .wait_for("#confirm[open]", Duration::from_secs(3))
            {
                Ok(_) => break,
                Err(e) if attempt == 3 => {
                    let _ = self.browser.screenshot("no-confirmation");
                    panic!("{selector}: no confirmation after {attempt} clicks: {e:?}")
                }
                Err(_) => {}
            }
        }
        let asked = self.browser.text("#confirm-text").expect("the question");
        assert!(
            asked.starts_with(question),
            "{selector}: the confirmation asks {asked:?}, not {question:?}"
        );
        self.browser.click("#confirm-ok").expect("confirm");
    }
}

/// Whether `s` is a primary protected at `level`.
fn protected_primary(s: &Status, level: Level) -> bool {
    s.role == Role::Primary && s.level == level && s.state == FtState::Protected
}

/// A node's daemon log and its engine's log without the per-epoch lines.
fn logs(lab: &LabPair, node: NodeId) -> String {
    lab.lab()
        .exec(
            node,
            &[
                "sh",
                "-c",
                "tail -n 25 /data/ftd/ftd.log; echo '--- engine'; \
                 grep -v 'epoch committed' /data/ftd/vms/ledger-vm/ftprotect.log | tail -n 60",
            ],
            Duration::from_secs(30),
        )
        .map(|o| o.stdout)
        .unwrap_or_else(|e| format!("(cannot read: {e})"))
}

/// The API's view of node-a's maintenance (what `ftctl node show` prints).
fn api_maintenance(lab: &LabPair, via: NodeId) -> String {
    let api = ft_pair::api(lab.lab(), via).expect("api");
    api.node::<NodeView>("node-a").expect("node-a").maintenance
}

const VM_ROW: &str = "#vms tr[data-vm=\"ledger-vm\"]";
const VM_STATE: &str = "#vms tr[data-vm=\"ledger-vm\"] td.state";
const VM_PRIMARY: &str = "#vms tr[data-vm=\"ledger-vm\"] td.primary";
const VM_LEVEL: &str = "#vms tr[data-vm=\"ledger-vm\"] td.level";
const VM_PLACEMENT: &str = "#vms tr[data-vm=\"ledger-vm\"] td.placement";
const VM_GENERATION: &str = "#vms tr[data-vm=\"ledger-vm\"] td.generation";
const NODE_A_ROW: &str = "#nodes tr[data-node=\"node-a\"]";

#[test]
fn the_console_follows_maintenance_a_pull_and_a_takeover_live() {
    let lab = LabPair::start("ftconsole");
    let (a, b) = (NodeId::A, NodeId::B);
    ft_pair::protect(lab.lab(), a, Default::default()).expect("protected through the API");
    ft_pair::wait_for(
        lab.lab(),
        b,
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(60),
    )
    .expect("standby ready");
    let mut writer = Appender::new(lab.ledger_client());
    writer.append_for(Duration::from_secs(1));

    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    let _ = std::fs::remove_dir_all(&out);
    let browser = Browser::launch(&out).expect("headless chromium");
    let mut page = Page {
        lab: &lab,
        browser: &browser,
        writer: &mut writer,
    };
    // The console of node b: the node that stays up through every step.
    let url = format!("{}/console/", lab.lab().topo.api_url(b));
    // A console user, made through the API (as `ftctl user set` does).
    let password = "maintenance-night-42";
    ft_pair::api(lab.lab(), a)
        .unwrap()
        .set_user::<serde_json::Value>("operator", password)
        .expect("a console user");

    // Log in as that user (on the other node: users travel).
    browser.goto(&url).expect("the console loads");
    browser
        .wait_for("#login-user", Duration::from_secs(20))
        .expect("the login form");
    browser.screenshot("login").expect("screenshot");
    browser
        .type_into("#login-user", "operator")
        .expect("type the user");
    browser
        .type_into("#login-password", password)
        .expect("type the password");
    browser.click("#login-submit").expect("log in");

    // Both nodes, the protected VM.
    page.until("#nodes tbody", "both nodes", 30, |t| {
        t.contains("node-a") && t.contains("node-b")
    });
    page.until(VM_STATE, "the VM protected", 30, |t| t == "protected");
    assert_eq!(browser.text(VM_PRIMARY).expect("primary"), "node-a");
    page.until(VM_PLACEMENT, "why the VM runs on a", 10, |t| {
        t == "its preferred node"
    });
    browser.screenshot("dashboard").expect("screenshot");
    // Live charts on the VM's page (a few samples), then back.
    browser.click(&format!("{VM_ROW} a")).expect("open the VM");
    page.until("#vm-title", "the VM page", 10, |t| {
        t.starts_with("ledger-vm")
    });
    let charts = browser
        .eval("document.querySelectorAll('#vm-charts canvas').length")
        .expect("charts");
    assert!(
        charts.as_u64().unwrap_or(0) >= 6,
        "the charts are not drawn: {charts}"
    );
    page.writer.append_for(Duration::from_secs(4));
    browser.screenshot("vm-charts").expect("screenshot");
    browser.click("#nav a[data-route=\"\"]").expect("dashboard");
    // A mark that a reload would erase.
    browser.eval("window.__consoleTestMark = 7").expect("mark");

    // Level HA, then a live migration asked on this node's console while
    // the primary runs on node a: node b passes it to node a.
    page.act(
        &format!("{VM_ROW} button[data-action=\"protect_ha\"]"),
        "Protect ledger-vm at level HA?",
    );
    page.until(VM_LEVEL, "level ha", 30, |t| t == "ha");
    let before = page.engine(a, "a's engine at ha", 120, |s| {
        protected_primary(s, Level::Ha)
    });
    page.until(VM_STATE, "protected at ha", 60, |t| t == "protected");
    browser.screenshot("protected-ha").expect("screenshot");
    page.act(
        &format!("{VM_ROW} button[data-action=\"migrate\"]"),
        "Move ledger-vm to its standby by live migration?",
    );
    let migrated = Instant::now();
    page.until(VM_PRIMARY, "the VM migrated to b", 240, |t| t == "node-b");
    let moved = page.engine(b, "b's engine at ha", 240, |s| {
        protected_primary(s, Level::Ha)
    });
    let migrate_s = migrated.elapsed().as_secs_f64();
    assert!(
        moved.generation > before.generation && moved.counters.failovers == 0,
        "a live migration, not a failover: {moved:?}"
    );
    page.until(VM_STATE, "protected at ha on b", 120, |t| t == "protected");
    page.until("#activity", "the migration's answer", 10, |t| {
        t.contains("ledger-vm moved to node-b")
    });
    browser.screenshot("migrated").expect("screenshot");

    // Back to level FT, and back to node a by a switchover (the primary
    // now runs on this node).
    page.act(
        &format!("{VM_ROW} button[data-action=\"protect\"]"),
        "Protect ledger-vm at level FT?",
    );
    page.until(VM_LEVEL, "level ft", 30, |t| t == "ft");
    page.engine(b, "b's engine at ft", 180, |s| {
        protected_primary(s, Level::Ft)
    });
    page.until(VM_STATE, "protected at ft on b", 60, |t| t == "protected");
    page.act(
        &format!("{VM_ROW} button[data-action=\"switchover\"]"),
        "Switch ledger-vm over to its standby?",
    );
    page.until(VM_PRIMARY, "the VM switched back to a", 60, |t| {
        t == "node-a"
    });
    page.engine(a, "a's engine protected again", 180, |s| {
        protected_primary(s, Level::Ft)
    });
    page.until(VM_STATE, "protected on a", 60, |t| t == "protected");
    page.until("#activity", "the switchover's answer", 10, |t| {
        t.contains("Switch ledger-vm over to its standby: done")
    });
    browser.screenshot("switched-back").expect("screenshot");

    // Enter maintenance on node a (the primary's node).
    browser
        .click("button[data-action=\"enter-maintenance\"][data-node=\"node-a\"]")
        .expect("the enter button");
    browser
        .wait_for("#confirm[open]", Duration::from_secs(5))
        .expect("the confirmation");
    browser
        .screenshot("confirm-maintenance")
        .expect("screenshot");
    browser.click("#confirm-ok").expect("confirm");
    let entered = Instant::now();
    page.until(NODE_A_ROW, "node-a in maintenance", 120, |t| {
        t.contains("\ton")
    });
    let row = page.until(VM_PRIMARY, "the VM on b", 60, |t| t == "node-b");
    page.until(VM_STATE, "the VM unprotected on b", 60, |t| {
        t == "unprotected"
    });
    let enter_s = entered.elapsed().as_secs_f64();
    assert_eq!(api_maintenance(&lab, b), "on");
    page.until("#activity", "the step's result", 10, |t| {
        t.contains("node-a is in maintenance")
    });
    page.until(
        "#alerts",
        "the alert that the VM runs unprotected",
        30,
        |t| t.contains("run unprotected on node-b"),
    );
    assert_eq!(
        browser
            .text(&format!("{NODE_A_ROW} .standbys"))
            .expect("node-a's standbys"),
        "-",
        "a node in maintenance keeps no standby"
    );
    page.until(VM_PLACEMENT, "why the VM runs on b", 10, |t| {
        t == "node-a (preferred) is in maintenance"
    });
    browser.screenshot("in-maintenance").expect("screenshot");
    let generation = ft_pair::api(lab.lab(), b)
        .unwrap()
        .vm::<VmView>(ft_pair::VM_NAME)
        .unwrap()
        .generation;

    // Pull node a: the page shows it unreachable, the VM untouched.
    lab.pull(a);
    page.until(NODE_A_ROW, "node-a unreachable", 30, |t| {
        t.contains("unreachable")
    });
    page.writer.append_for(Duration::from_secs(3));
    let row_after = browser.text(VM_ROW).expect("the VM row");
    assert_eq!(
        (
            browser.text(VM_PRIMARY).expect("primary"),
            browser.text(VM_GENERATION).expect("generation"),
        ),
        ("node-b".to_string(), generation.to_string()),
        "the VM changed after the pull of a node in maintenance: {row:?} -> {row_after:?}"
    );
    browser
        .screenshot("maintenance-node-pulled")
        .expect("screenshot");

    // Node a comes back (still in maintenance), then leaves it.
    lab.lab().up(&[a]).expect("a back");
    page.until(NODE_A_ROW, "node-a up", 120, |t| t.contains("\tup\t"));
    browser.screenshot("node-back").expect("screenshot");
    page.act(
        "button[data-action=\"exit-maintenance\"][data-node=\"node-a\"]",
        "Leave maintenance on node-a?",
    );
    let left = Instant::now();
    page.until(NODE_A_ROW, "node-a back in service", 300, |t| {
        t.contains("\toff")
    });
    page.until(VM_PRIMARY, "the VM back on a", 60, |t| t == "node-a");
    page.until(VM_STATE, "the VM protected again", 60, |t| t == "protected");
    let leave_s = left.elapsed().as_secs_f64();
    assert_eq!(api_maintenance(&lab, b), "off");
    browser
        .screenshot("out-of-maintenance")
        .expect("screenshot");

    // Pull the primary: the takeover and its alert appear without a reload.
    lab.pull(a);
    page.until(VM_PRIMARY, "the VM taken over by b", 60, |t| t == "node-b");
    page.until("#alerts", "the takeover's alert", 30, |t| {
        t.contains("took over")
    });
    browser.screenshot("takeover").expect("screenshot");
    let mark = browser.eval("window.__consoleTestMark").expect("mark");
    assert_eq!(mark, serde_json::json!(7), "the page was reloaded");

    // The audit log names the user for each request made from the page.
    browser
        .click("#nav a[data-route=\"audit\"]")
        .expect("the audit log");
    let audit = page.until("#audit tbody", "the audit log", 20, |t| {
        t.contains("POST /api/nodes/node-a/maintenance/exit")
    });
    // Each action cell exactly, as often as the page asked it (the
    // migration from a and the switchover back from b are both
    // switchovers, each naming where the VM ran).
    for (action, times) in [
        ("POST /api/vms/ledger-vm/protect?level=ha", 1),
        ("POST /api/vms/ledger-vm/switchover?from=node-a", 1),
        ("POST /api/vms/ledger-vm/switchover?from=node-b", 1),
        ("POST /api/vms/ledger-vm/protect", 1),
        ("POST /api/nodes/node-a/maintenance/enter", 1),
        ("POST /api/nodes/node-a/maintenance/exit", 1),
        ("POST /api/session", 1),
    ] {
        let by_operator = audit
            .lines()
            .filter(|l| {
                let cells: Vec<&str> = l.split('\t').collect();
                cells.get(2).is_some_and(|who| who.starts_with("operator@"))
                    && cells.get(3) == Some(&action)
            })
            .count();
        assert_eq!(
            by_operator, times,
            "audit entries of operator for {action}: {audit}"
        );
    }
    browser.screenshot("audit").expect("screenshot");

    let errors = browser.console_errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    page.writer.assert_nothing_lost();
    eprintln!(
        "[e2e] console: migrated a -> b (asked on b) in {migrate_s:.1} s; maintenance entered in \
         {enter_s:.1} s, left in {leave_s:.1} s; takeover shown live; \
         {} operations, none lost; screenshots in {}",
        page.writer.acked.len(),
        out.display()
    );
}
