//! `serin run --leader-elect` replicas on the real control plane, each behind a fault
//! proxy of its own ([`super::fault_proxy`]) that records every request it sends; and the
//! checks on those records (no two replicas writing at once).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::e2e::{Env, http_get};
use super::fault_proxy::{Exchange, FaultProxy};
use super::wait_for;

/// Lease timing of the replicas: generous for a busy 2-core machine (a leader gives up
/// when it cannot renew for 7 s), so that a slow API server is not mistaken for a fault.
pub const LEASE: &[&str] = &[
    "--lease-duration-secs",
    "10",
    "--renew-deadline-secs",
    "7",
    "--retry-period-secs",
    "1",
];

/// Debian's libfaketime, which `faketime` preloads (used directly so that the replica is
/// the test's own child, and SIGKILL reaches it).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// One `serin run --leader-elect` behind its own fault proxy.
pub struct Replica {
    pub name: &'static str,
    pub proxy: FaultProxy,
    child: Arc<Mutex<Child>>,
    log: PathBuf,
    /// When the process was seen to exit, and how.
    exit: Arc<Mutex<Option<(Instant, ExitStatus)>>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Starts replica `name` with `extra` flags; with `clock`, under libfaketime with that
    /// offset (`+5m`).
    pub async fn start(
        env: &Env,
        name: &'static str,
        clock: Option<&str>,
        extra: &[&str],
    ) -> Replica {
        let dir = env.cluster.dir.path();
        let (proxy, kubeconfig) =
            FaultProxy::for_operator(name, &env.operator_kubeconfig, dir).await;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_serin"));
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--namespace", &env.ns, "--lease-namespace", &env.ns])
            .args(["--leader-elect", "--identity", name])
            .args(LEASE)
            .args(extra)
            .env("RUST_LOG", "info,serin=debug")
            .stdout(Stdio::null())
            .stderr(out);
        if let Some(offset) = clock {
            assert!(
                std::path::Path::new(LIBFAKETIME).is_file(),
                "{LIBFAKETIME} is missing: run scripts/install-deps (it installs Debian's faketime)"
            );
            cmd.env("LD_PRELOAD", LIBFAKETIME).env("FAKETIME", offset);
        }
        let child = Arc::new(Mutex::new(cmd.spawn().expect("start serin run")));
        let exit = Arc::new(Mutex::new(None));
        let (c, e) = (child.clone(), exit.clone());
        let watch = tokio::spawn(async move {
            loop {
                if let Ok(Some(status)) = c.lock().unwrap().try_wait() {
                    *e.lock().unwrap() = Some((Instant::now(), status));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Replica {
            name,
            proxy,
            child,
            log,
            exit,
            watch,
        }
    }

    /// SIGKILL; returns when it was sent.
    pub fn kill(&self) -> Instant {
        let at = Instant::now();
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        if let Ok(status) = child.wait() {
            self.exit.lock().unwrap().get_or_insert((at, status));
        }
        at
    }

    /// SIGTERM (a clean shutdown, as Kubernetes stops a pod); returns when it was sent.
    pub fn terminate(&self) -> Instant {
        let pid = self.child.lock().unwrap().id();
        let at = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {pid}");
        at
    }

    pub fn exited(&self) -> Option<(Instant, ExitStatus)> {
        *self.exit.lock().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from its metrics/health server, whose address it logs.
    pub async fn http(&self, path: &str) -> u16 {
        let addr = wait_for(
            &format!("{} to log its metrics address", self.name),
            Duration::from_secs(30),
            || async {
                self.log()
                    .lines()
                    .find(|l| l.contains("serving /metrics"))
                    .and_then(|l| l.split("address=").nth(1))
                    .and_then(|a| a.split_whitespace().next())
                    .map(str::to_string)
            },
        )
        .await;
        let reply = tokio::task::spawn_blocking({
            let path = path.to_string();
            move || {
                let port = addr.rsplit(':').next().unwrap().parse().unwrap();
                http_get(port, &path)
            }
        })
        .await
        .unwrap();
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        self.watch.abort();
    }
}

/// One write, for failure messages: times in ms from `t0`.
pub fn describe(e: &Exchange, t0: Instant) -> String {
    let ms = |t: Option<Instant>| {
        t.map(|t| format!("{}", t.saturating_duration_since(t0).as_millis()))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "{} {} {} forwarded {} answered {} -> {:?} {:?}",
        e.proxy,
        e.method,
        e.path,
        ms(e.forwarded),
        ms(e.answered),
        e.status,
        e.outcome
    )
}

/// `None` when every write of `first` ended before any write of `then` was sent (a write
/// without an answer counts as lasting until now); else what went wrong.
pub fn overlapping(first: &[Exchange], then: &[Exchange]) -> Option<String> {
    let now = Instant::now();
    let end = |e: &Exchange| e.answered.unwrap_or(now);
    let last_of_first = first.iter().max_by_key(|e| end(e))?;
    let first_of_then = then.iter().min_by_key(|e| e.forwarded)?;
    let t0 = first
        .iter()
        .chain(then)
        .filter_map(|e| e.forwarded)
        .min()
        .unwrap_or(now);
    (end(last_of_first) >= first_of_then.forwarded.unwrap_or(now)).then(|| {
        format!(
            "two replicas wrote in the same interval:\n  {}\n  {}",
            describe(last_of_first, t0),
            describe(first_of_then, t0)
        )
    })
}
