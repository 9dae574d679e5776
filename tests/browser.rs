//! The dashboard in a real browser: headless Chromium (Debian package `chromium`) driven over
//! the DevTools protocol on a pipe, against a gateway fed by simulated sensors. The page must
//! list the devices, and its charts must move with the live stream.

mod support;

use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sensorgate::app::Gateway;
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Scenario, publish};
use serde_json::{Value, json};
use support::*;
use tokio_util::sync::CancellationToken;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium with `--remote-debugging-pipe`: it reads DevTools commands on fd 3 and writes
/// answers on fd 4, each a JSON text ended by a NUL byte.
struct Browser {
    child: Child,
    to_browser: std::fs::File,
    from_browser: std::io::BufReader<std::fs::File>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    fn launch() -> Self {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        );
        let profile = tempfile::tempdir().unwrap();
        let (commands_read, commands_write) = pipe();
        let (answers_read, answers_write) = pipe();
        let (child_in, child_out) = (commands_read.as_raw_fd(), answers_write.as_raw_fd());
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("chromium starts");
        drop((commands_read, answers_write));
        Self {
            child,
            to_browser: std::fs::File::from(commands_write),
            from_browser: std::io::BufReader::new(std::fs::File::from(answers_read)),
            next_id: 0,
            _profile: profile,
        }
    }

    /// Sends a command (to a page when `session` is given) and waits for its answer,
    /// skipping the events that arrive meanwhile.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).unwrap();
        loop {
            let mut raw = Vec::new();
            std::io::BufRead::read_until(&mut self.from_browser, 0, &mut raw).unwrap();
            assert!(!raw.is_empty(), "chromium closed the pipe");
            raw.pop();
            let answer: Value = serde_json::from_slice(&raw).unwrap();
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab; returns the session to talk to it.
    fn open(&mut self, url: &str) -> String {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        attached["sessionId"].as_str().unwrap().to_string()
    }

    fn eval(&mut self, session: &str, expression: &str) -> Value {
        let result = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until `done` holds for its value.
    fn wait(
        &mut self,
        session: &str,
        what: &str,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.eval(session, expression);
            if done(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last {value}"
            );
            // A blocking test thread: the gateway runs on its own runtime threads.
            #[allow(
                clippy::disallowed_methods,
                reason = "polling a browser from a test thread"
            )]
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    #[allow(clippy::disallowed_methods, reason = "reaping the child process")]
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_devices_and_charts_follow_the_live_stream() {
    init_logging();
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let scenario = Scenario {
        start_ms: sensorgate::reading::now_millis() - 30_000,
        period_ms: 500,
        ..support::scenario(Format::Json, 3, 120, 0, &unique("web"))
    };
    // A device that lists no metrics stores whatever it sends: also names a plain
    // JavaScript object holds already (`__proto__`, `constructor`, `toString`).
    let odd_topic = format!("{}/odd", scenario.topic_prefix);
    let text = gateway_config(
        broker.port,
        &db,
        &unique("gw"),
        "[http]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
        &[(&scenario, "room")],
    ) + &format!(
        "[[devices]]\nkind = \"mqtt\"\nid = \"zz-odd\"\nbroker = \"test\"\ntopic = \"{odd_topic}\"\n\
         format = \"json\"\ntimestamp_field = \"ts\"\n"
    );
    let config = sensorgate::config::parse(&text, Path::new("test.toml")).unwrap();
    let gateway = Gateway::build(config).await.unwrap();
    let url = format!("http://{}/", gateway.http_address().unwrap());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    let pool = read_pool(&db).await;
    wait_for_devices_in(&pool, "connected", 4).await;
    let odd = sensorgate_sim::plan::Planned {
        device: 0,
        topic: odd_topic,
        payload: format!(
            r#"{{"ts": {}, "__proto__": 1, "constructor": 2, "toString": 3}}"#,
            sensorgate::reading::now_millis() - 60_000
        )
        .into_bytes(),
        fault: None,
        expect: Default::default(),
    };
    publish(
        "127.0.0.1",
        broker.port,
        &unique("odd"),
        std::iter::once(odd),
        Pace::Unlimited,
        1,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    wait_for("the odd metrics", Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM series").await >= 3
    })
    .await;
    // Sensors keep publishing while the page is open: 6 messages a second for a minute.
    let port = broker.port;
    let sensors = scenario.clone();
    let publisher = tokio::spawn(async move {
        publish(
            "127.0.0.1",
            port,
            &unique("pub"),
            sensors.messages(),
            Pace::Steady(6.0),
            1,
            CancellationToken::new(),
        )
        .await
    });

    let checks = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::launch();
        let page = browser.open(&url);
        let names = browser.wait(
            &page,
            "the device table",
            "[...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device)",
            |v| v.as_array().is_some_and(|a| a.len() == 4),
        );
        assert_eq!(names, json!(["room-0", "room-1", "room-2", "zz-odd"]));
        let states = browser.eval(&page, "[...document.querySelectorAll('#devices tbody tr td:nth-child(3)')].map(c => c.textContent)");
        assert!(
            states
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s.as_str().unwrap().starts_with("connected")),
            "{states}"
        );
        browser.wait(
            &page,
            "charts of room-0",
            "document.querySelectorAll('#charts svg').length",
            |v| v == &json!(2),
        );
        let chart = "document.querySelector('#charts [data-metric=temperature] polyline')?.getAttribute('points') ?? ''";
        let before = browser.eval(&page, chart);
        let charted =
            "window.sensorgate.series.get(\"temperature\").points.reduce((n, p) => n + p.n, 0)";
        let charted_before = browser.eval(&page, charted).as_u64().unwrap();
        let live_before = browser
            .eval(&page, "window.sensorgate.liveCount")
            .as_u64()
            .unwrap();
        let live = browser.wait(&page, "live readings", "window.sensorgate.liveCount", |v| {
            v.as_u64().is_some_and(|n| n >= live_before + 10)
        });
        let after = browser.wait(&page, "the chart to redraw", chart, |v| v != &before);
        let charted_after = browser.eval(&page, charted).as_u64().unwrap();
        assert!(
            charted_after > charted_before,
            "the chart holds {charted_after} readings, before {charted_before}"
        );
        // The odd device's metrics each get their chart, with the point stored.
        browser.eval(&page, "select('zz-odd').then(() => true)");
        let charts = browser.wait(
            &page,
            "charts of zz-odd",
            "[...document.querySelectorAll('#charts .chart')].map(c => c.dataset.metric + ':' + c.querySelector('svg').dataset.points)",
            |v| v.as_array().is_some_and(|a| a.len() == 3),
        );
        assert_eq!(
            charts,
            json!(["__proto__:1", "constructor:1", "toString:1"])
        );
        eprintln!(
            "dashboard: 4 devices listed, {live} live readings, temperature chart redrawn ({} -> {} chars)",
            before.as_str().map_or(0, str::len),
            after.as_str().map_or(0, str::len)
        );
    });
    checks.await.unwrap();
    publisher.abort();
    shutdown.cancel();
    running.await.unwrap().unwrap();
}
