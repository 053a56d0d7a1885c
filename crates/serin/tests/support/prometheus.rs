//! A real Prometheus (Debian's package) on 127.0.0.1 with a temporary data directory, filled
//! with history backfilled by `promtool tsdb create-blocks-from openmetrics` before it starts
//! (blocks added while it runs appear only at the next reload).

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use super::{Guarded, free_port, listening, require, wait_for_blocking};

/// A running Prometheus; stopped and its data removed on drop.
pub struct TestPrometheus {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    _process: Guarded,
    _dir: tempfile::TempDir,
}

impl TestPrometheus {
    /// Backfills `openmetrics` (text ending in `# EOF`) and starts Prometheus on it.
    pub fn start(openmetrics: &str) -> TestPrometheus {
        require("prometheus");
        require("promtool");
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let input = dir.path().join("history.om");
        std::fs::write(&input, openmetrics).expect("write the OpenMetrics history");
        let out = Command::new("promtool")
            .args(["tsdb", "create-blocks-from", "openmetrics"])
            .arg(&input)
            .arg(&data)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool could not backfill: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.path().join("prometheus.yml");
        // No scrape jobs: the data is exactly what the test wrote.
        std::fs::write(&config, "global:\n  evaluation_interval: 1h\n").expect("write config");
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let process = Guarded::spawn(
            "prometheus",
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", data.display()),
                "--storage.tsdb.retention.time=100y".into(),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn".into(),
            ],
            &log,
        );
        let url = format!("http://127.0.0.1:{port}");
        let ready = format!("{url}/-/ready");
        wait_for_blocking("prometheus to be ready", Duration::from_secs(20), || {
            listening(port) && http_ok(&ready)
        });
        TestPrometheus {
            url,
            _process: process,
            _dir: dir,
        }
    }
}

fn http_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

/// Builds OpenMetrics text: every series is a linear counter sampled every `step` seconds.
#[derive(Default)]
pub struct History {
    families: Vec<(String, Vec<(String, f64)>)>,
}

impl History {
    /// Adds a counter `name{labels}` that grows by `per_second` from `offset`.
    pub fn counter(&mut self, name: &str, labels: &str, per_second: f64) -> &mut Self {
        match self.families.iter_mut().find(|(n, _)| n == name) {
            Some((_, series)) => series.push((labels.to_string(), per_second)),
            None => self
                .families
                .push((name.to_string(), vec![(labels.to_string(), per_second)])),
        }
        self
    }

    /// The OpenMetrics text for samples every `step` seconds in [`from`, `to`] (Unix
    /// seconds). Counters start at 1000 so that no extrapolation stops at zero.
    pub fn render(&self, from: i64, to: i64, step: i64) -> String {
        let mut out = String::new();
        for (name, series) in &self.families {
            let _ = writeln!(out, "# TYPE {name} unknown");
            for (labels, rate) in series {
                let mut t = from;
                while t <= to {
                    let v = 1000.0 + rate * (t - from) as f64;
                    let _ = writeln!(out, "{name}{{{labels}}} {v} {t}");
                    t += step;
                }
            }
        }
        out.push_str("# EOF\n");
        out
    }
}
