//! A real headless Chromium for the tests that look at a web page: Debian's
//! `/usr/bin/chromium`, driven over the DevTools protocol (no chromedriver).
//!
//! One [`Browser`] has one tab. From its launch on, it records the page's
//! console errors, uncaught exceptions and failed loads (a 404 image, a
//! refused fetch), also those of a page still loading: [`Browser::console_errors`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::{Emulation, Log, Page, Runtime};
use headless_chrome::{LaunchOptions, Tab};
use serde_json::Value;

pub use headless_chrome::Element;

/// Debian's chromium; the project installs it (`need_pkgs chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long click, type_into and text wait for their element.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The page's viewport, also that of the screenshots.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 900;
const NAVIGATION_TIMEOUT: Duration = Duration::from_secs(30);
/// The connection to Chromium closes after this long without a word from it
/// (30 s by default, and a lab test may leave a page alone for longer); it is
/// also how long a call waits for its answer.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(100);
/// A console.debug text that marks how far the console events were read.
const SYNC_MARK: &str = "ft-browser-sync";

/// What a browser operation failed at, with what it was given.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("cannot launch {path} headless: {cause}")]
    Launch { path: String, cause: String },
    #[error("cannot open {url}: {cause}")]
    Goto { url: String, cause: String },
    #[error("no element matches {selector:?} within {timeout:?}: {cause}")]
    WaitFor {
        selector: String,
        timeout: Duration,
        cause: String,
    },
    #[error("the text of {selector:?} is not {wanted} within {timeout:?}; last seen: {last:?}")]
    WaitForText {
        selector: String,
        wanted: String,
        timeout: Duration,
        last: Option<String>,
    },
    #[error("cannot click {selector:?}: {cause}")]
    Click { selector: String, cause: String },
    #[error("cannot type into {selector:?}: {cause}")]
    TypeInto { selector: String, cause: String },
    #[error("cannot read the text of {selector:?}: {cause}")]
    Text { selector: String, cause: String },
    #[error("evaluating `{js}` failed: {cause}")]
    Eval { js: String, cause: String },
    #[error("cannot save the screenshot {path}: {cause}")]
    Screenshot { path: PathBuf, cause: String },
}

/// A headless Chromium with one tab; dropped, the browser process ends and
/// its fresh profile folder is removed.
pub struct Browser {
    tab: Arc<Tab>,
    console: Arc<Console>,
    out_dir: PathBuf,
    screenshots: AtomicU32,
    // Last: the process ends after the tab is gone.
    _browser: headless_chrome::Browser,
}

/// The page's errors as the DevTools events bring them.
#[derive(Default)]
struct Console {
    state: Mutex<ConsoleState>,
    marked: Condvar,
}

#[derive(Default)]
struct ConsoleState {
    errors: Vec<String>,
    /// The highest sync mark read, and the last one sent.
    marks_seen: u64,
    marks_sent: u64,
}

impl Browser {
    /// Starts Chromium headless (1280x900, no sandbox: the tests run as root,
    /// a new profile in a temporary folder); screenshots go to `out_dir`.
    pub fn launch(out_dir: &Path) -> Result<Browser, BrowserError> {
        let launch_err = |cause: String| BrowserError::Launch {
            path: CHROMIUM.into(),
            cause,
        };
        std::fs::create_dir_all(out_dir).map_err(|e| launch_err(format!("{out_dir:?}: {e}")))?;
        let options = LaunchOptions::default_builder()
            .path(Some(CHROMIUM.into()))
            .headless(true)
            .sandbox(false)
            .window_size(Some((WIDTH, HEIGHT)))
            .idle_browser_timeout(IDLE_TIMEOUT)
            .build()
            .map_err(|e| launch_err(e.to_string()))?;
        let browser =
            headless_chrome::Browser::new(options).map_err(|e| launch_err(e.to_string()))?;
        let tab = browser.new_tab().map_err(|e| launch_err(e.to_string()))?;
        tab.set_default_timeout(NAVIGATION_TIMEOUT);
        // Chromium opens a tab of its own at the start: leave ours alone.
        let others: Vec<Arc<Tab>> = (browser.get_tabs().lock().unwrap().iter())
            .filter(|t| t.get_target_id() != tab.get_target_id())
            .cloned()
            .collect();
        for other in others {
            other
                .close_target()
                .map_err(|e| launch_err(e.to_string()))?;
        }
        // In the new headless mode the window size includes a window frame
        // nobody sees: the page gets the whole size this way.
        tab.call_method(Emulation::SetDeviceMetricsOverride {
            width: WIDTH,
            height: HEIGHT,
            device_scale_factor: 1.0,
            mobile: false,
            scale: None,
            screen_width: None,
            screen_height: None,
            position_x: None,
            position_y: None,
            dont_set_visible_size: None,
            screen_orientation: None,
            viewport: None,
            display_feature: None,
            device_posture: None,
        })
        .map_err(|e| launch_err(e.to_string()))?;
        // Listen first, then enable the domains: nothing the page says is lost.
        let console = Arc::new(Console::default());
        let listener = Arc::clone(&console);
        tab.add_event_listener(Arc::new(move |event: &Event| listener.on_event(event)))
            .map_err(|e| launch_err(e.to_string()))?;
        tab.enable_runtime()
            .and_then(|t| t.enable_log())
            .map_err(|e| launch_err(e.to_string()))?;
        Ok(Browser {
            tab,
            console,
            out_dir: out_dir.to_path_buf(),
            screenshots: AtomicU32::new(0),
            _browser: browser,
        })
    }

    /// The tab itself, for what this module does not offer.
    pub fn tab(&self) -> &Tab {
        &self.tab
    }

    /// Opens `url` and waits until the page has loaded and the network is quiet.
    pub fn goto(&self, url: &str) -> Result<(), BrowserError> {
        let goto_err = |cause: String| BrowserError::Goto {
            url: url.into(),
            cause,
        };
        let tab = self
            .tab
            .navigate_to(url)
            .map_err(|e| goto_err(e.to_string()))?;
        if let Err(e) = tab.wait_until_navigated() {
            // The quiet network may have come before navigate_to returned,
            // and then its wait never ends: a loaded page is enough.
            if self.eval("document.readyState").ok() != Some(Value::from("complete")) {
                return Err(goto_err(e.to_string()));
            }
        }
        Ok(())
    }

    /// Waits until an element matches the CSS `selector`.
    pub fn wait_for(&self, selector: &str, timeout: Duration) -> Result<Element<'_>, BrowserError> {
        self.tab
            .wait_for_element_with_custom_timeout(selector, timeout)
            .map_err(|e| BrowserError::WaitFor {
                selector: selector.into(),
                timeout,
                cause: e.to_string(),
            })
    }

    /// Waits until the innerText of the element matching `selector` contains
    /// `wanted`; the page may change it without reloading. Returns the text.
    pub fn wait_for_text(
        &self,
        selector: &str,
        wanted: &str,
        timeout: Duration,
    ) -> Result<String, BrowserError> {
        self.wait_for_text_matching(selector, &format!("containing {wanted:?}"), timeout, |t| {
            t.contains(wanted)
        })
    }

    /// Waits until the innerText of the element matching `selector` satisfies
    /// `matches` (`wanted` describes it in the error). Returns the text.
    pub fn wait_for_text_matching(
        &self,
        selector: &str,
        wanted: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String, BrowserError> {
        let start = Instant::now();
        let mut last = None;
        loop {
            // A page that is loading or re-rendering may have no such element
            // yet, or no JavaScript context: both are worth another look.
            if let Ok(Some(text)) = self.inner_text(selector) {
                if matches(&text) {
                    return Ok(text);
                }
                last = Some(text);
            }
            if start.elapsed() >= timeout {
                return Err(BrowserError::WaitForText {
                    selector: selector.into(),
                    wanted: wanted.into(),
                    timeout,
                    last,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Clicks the middle of the element matching `selector` with the mouse.
    pub fn click(&self, selector: &str) -> Result<(), BrowserError> {
        let element = self.wait_for(selector, DEFAULT_TIMEOUT)?;
        element.click().map(drop).map_err(|e| BrowserError::Click {
            selector: selector.into(),
            cause: e.to_string(),
        })
    }

    /// Clicks the element matching `selector` and types `text` key by key.
    pub fn type_into(&self, selector: &str, text: &str) -> Result<(), BrowserError> {
        let element = self.wait_for(selector, DEFAULT_TIMEOUT)?;
        element
            .type_into(text)
            .map(drop)
            .map_err(|e| BrowserError::TypeInto {
                selector: selector.into(),
                cause: e.to_string(),
            })
    }

    /// The innerText of the element matching `selector` now.
    pub fn text(&self, selector: &str) -> Result<String, BrowserError> {
        let text_err = |cause: String| BrowserError::Text {
            selector: selector.into(),
            cause,
        };
        self.inner_text(selector)
            .map_err(|e| text_err(e.to_string()))?
            .ok_or_else(|| text_err("no element matches".into()))
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value
    /// as JSON (`null` for undefined); a thrown exception is an error.
    pub fn eval(&self, js: &str) -> Result<Value, BrowserError> {
        let eval_err = |cause: String| BrowserError::Eval {
            js: js.into(),
            cause,
        };
        let answer = self
            .tab
            .call_method(Runtime::Evaluate {
                expression: js.into(),
                return_by_value: Some(true),
                await_promise: Some(true),
                object_group: None,
                include_command_line_api: None,
                silent: None,
                context_id: None,
                generate_preview: None,
                user_gesture: None,
                throw_on_side_effect: None,
                timeout: None,
                disable_breaks: None,
                repl_mode: None,
                allow_unsafe_eval_blocked_by_csp: None,
                unique_context_id: None,
                serialization_options: None,
            })
            .map_err(|e| eval_err(e.to_string()))?;
        if let Some(details) = answer.exception_details {
            return Err(eval_err(describe_exception(&details)));
        }
        Ok(answer.result.value.unwrap_or(Value::Null))
    }

    /// Saves the visible page as `NN-name.png` in the output folder, numbered
    /// in the order taken, and returns its path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf, BrowserError> {
        let n = self.screenshots.fetch_add(1, Ordering::Relaxed) + 1;
        let path = self.out_dir.join(format!("{n:02}-{name}.png"));
        let shot_err = |cause: String| BrowserError::Screenshot {
            path: path.clone(),
            cause,
        };
        let png = self
            .tab
            .capture_screenshot(Page::CaptureScreenshotFormatOption::Png, None, None, true)
            .map_err(|e| shot_err(e.to_string()))?;
        std::fs::write(&path, png).map_err(|e| shot_err(e.to_string()))?;
        Ok(path)
    }

    /// Every console error, uncaught exception and failed load of the tab's
    /// pages so far, in order. It first waits (5 s at most) until the events
    /// the page sent before this call have been read.
    pub fn console_errors(&self) -> Vec<String> {
        let mark = {
            let mut state = self.console.state.lock().unwrap();
            state.marks_sent += 1;
            state.marks_sent
        };
        let sent = self
            .eval(&format!("console.debug({SYNC_MARK:?}, {mark})"))
            .is_ok();
        let state = self.console.state.lock().unwrap();
        let (state, _) = self
            .console
            .marked
            .wait_timeout_while(state, Duration::from_secs(5), |s| {
                sent && s.marks_seen < mark
            })
            .unwrap();
        state.errors.clone()
    }

    /// The innerText of the first element matching `selector`, if any.
    fn inner_text(&self, selector: &str) -> Result<Option<String>, BrowserError> {
        let selector_js = Value::from(selector).to_string();
        let text = self.eval(&format!(
            "document.querySelector({selector_js})?.innerText ?? null"
        ))?;
        Ok(text.as_str().map(str::to_owned))
    }
}

impl Console {
    fn on_event(&self, event: &Event) {
        use Runtime::ConsoleAPICalledEventTypeOption as Kind;
        let error = match event {
            Event::RuntimeConsoleAPICalled(called) => {
                let args = &called.params.args;
                let value = |i: usize| args.get(i).and_then(|a| a.value.as_ref());
                if called.params.Type == Kind::Debug && value(0) == Some(&Value::from(SYNC_MARK)) {
                    let mark = value(1).and_then(Value::as_u64).unwrap_or(0);
                    let mut state = self.state.lock().unwrap();
                    state.marks_seen = state.marks_seen.max(mark);
                    self.marked.notify_all();
                    return;
                }
                if called.params.Type != Kind::Error && called.params.Type != Kind::Assert {
                    return;
                }
                let text: Vec<String> = args.iter().map(describe_value).collect();
                let kind = format!("{:?}", called.params.Type).to_lowercase();
                format!("console.{kind}: {}", text.join(" "))
            }
            Event::RuntimeExceptionThrown(thrown) => {
                format!(
                    "exception: {}",
                    describe_exception(&thrown.params.exception_details)
                )
            }
            Event::LogEntryAdded(added)
                if added.params.entry.level == Log::LogEntryLevel::Error =>
            {
                let entry = &added.params.entry;
                let source = format!("{:?}", entry.source).to_lowercase();
                let url = entry.url.as_deref().unwrap_or("");
                format!("{source}: {} {url}", entry.text)
            }
            _ => return,
        };
        self.state.lock().unwrap().errors.push(error);
    }
}

/// A console argument as the DevTools console shows it.
fn describe_value(arg: &Runtime::RemoteObject) -> String {
    match (&arg.value, &arg.unserializable_value, &arg.description) {
        (Some(Value::String(s)), _, _) => s.clone(),
        (Some(v), _, _) => v.to_string(),
        (None, Some(u), _) => u.clone(),
        (None, None, Some(d)) => d.clone(),
        (None, None, None) => format!("{:?}", arg.Type).to_lowercase(),
    }
}

/// "Uncaught Error: message" with its stack, or with where it was thrown.
fn describe_exception(details: &Runtime::ExceptionDetails) -> String {
    let what = details
        .exception
        .as_ref()
        .map(describe_value)
        .unwrap_or_default();
    let place = details.url.as_deref().unwrap_or("");
    if what.contains(place) {
        format!("{} {what}", details.text)
    } else {
        // The protocol counts lines from 0.
        format!(
            "{} {what} ({place}:{})",
            details.text,
            details.line_number + 1
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    // Without an icon of its own a page makes Chromium ask for /favicon.ico,
    // and that 404 is an error like any other.
    const CLEAN_PAGE: &str = r#"<!doctype html><title>clean</title><link rel="icon" href="data:,">
<p id="ok">all fine</p><script>console.log("only a log"); console.warn("only a warning");</script>"#;

    const LIVE_PAGE: &str = r#"<!doctype html><title>live</title><link rel="icon" href="data:,">
<div id="live">loading</div>
<button id="go" onclick="document.querySelector('#live').innerText = 'clicked'">go</button>
<input id="name">
<img src="/missing.png">
<script>
  setTimeout(() => { document.querySelector('#live').innerText = 'ready after 300 ms'; }, 300);
  console.error("boom-123");
  setTimeout(() => { throw new Error("kaboom-456"); }, 0);
</script>"#;

    /// Serves the two pages (everything else is a 404) until the test ends.
    fn serve() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // A connection of its own each: Chromium may open one it never uses.
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut reader = BufReader::new(&stream);
                    let mut request = String::new();
                    if reader.read_line(&mut request).is_err() {
                        return;
                    }
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let path = request.split(' ').nth(1).unwrap_or("");
                    let (status, body) = match path {
                        "/clean" => ("200 OK", CLEAN_PAGE),
                        "/live" => ("200 OK", LIVE_PAGE),
                        _ => ("404 Not Found", "not found"),
                    };
                    let _ = write!(
                        &stream,
                        "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn browser_drives_a_live_page_and_catches_its_errors() {
        let base = serve();
        let out = tempfile::tempdir().unwrap();
        let browser = Browser::launch(out.path()).unwrap();

        browser.goto(&format!("{base}/clean")).unwrap();
        assert_eq!(browser.text("#ok").unwrap(), "all fine");
        assert_eq!(browser.console_errors(), Vec::<String>::new());

        browser.goto(&format!("{base}/live")).unwrap();
        let text = browser
            .wait_for_text("#live", "ready", Duration::from_secs(10))
            .unwrap();
        assert_eq!(text, "ready after 300 ms");
        browser.click("#go").unwrap();
        browser
            .wait_for_text_matching("#live", "exactly \"clicked\"", DEFAULT_TIMEOUT, |t| {
                t == "clicked"
            })
            .unwrap();
        browser.type_into("#name", "pair-7").unwrap();
        let value = browser
            .eval("document.querySelector('#name').value")
            .unwrap();
        assert_eq!(value, Value::from("pair-7"));
        assert_eq!(browser.eval("1 + 2").unwrap(), Value::from(3));
        assert!(matches!(
            browser.eval("nope()"),
            Err(BrowserError::Eval { .. })
        ));
        assert!(matches!(
            browser.wait_for_text("#live", "never", Duration::from_millis(300)),
            Err(BrowserError::WaitForText { last: Some(ref t), .. }) if t == "clicked"
        ));

        let shot = browser.screenshot("live").unwrap();
        let size = browser.eval("`${innerWidth}x${innerHeight}`").unwrap();
        assert_eq!(size, Value::from("1280x900"));
        assert_eq!(shot, out.path().join("01-live.png"));
        let png = std::fs::read(&shot).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {shot:?}");
        let header_u32 = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!(
            (header_u32(16), header_u32(20)),
            (WIDTH, HEIGHT),
            "the PNG's size"
        );
        let second = browser.screenshot("again").unwrap();
        assert_eq!(second, out.path().join("02-again.png"));

        let errors = browser.console_errors();
        let has = |what: &str| errors.iter().any(|e| e.contains(what));
        assert!(has("console.error: boom-123"), "{errors:#?}");
        assert!(has("kaboom-456"), "{errors:#?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("404") && e.contains(&format!("{base}/missing.png"))),
            "{errors:#?}"
        );

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let refused = browser.goto(&format!("http://{closed}/"));
        assert!(
            matches!(refused, Err(BrowserError::Goto { ref cause, .. }) if cause.contains("REFUSED")),
            "{refused:?}"
        );
    }
}
