//! Helpers shared by the integration tests: free ports, waiting on conditions with a
//! deadline, and child processes that die with the test process.
//!
//! Each helper is a real component on 127.0.0.1: [`prometheus`] starts Debian's
//! `prometheus` with a temporary data directory, [`moto`] starts moto's server, and [`cbor`]
//! translates the AWS SDK's Smithy RPC v2 CBOR protocol to the JSON protocol moto speaks.
#![allow(dead_code)]

pub mod cbor;
pub mod cluster;
pub mod e2e;
pub mod fault_proxy;
pub mod moto;
pub mod prometheus;
pub mod rbac;
pub mod replica;

use std::path::Path;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Panics with a clear message when `program` is not on PATH: the tests need it and
/// `scripts/install-deps` installs it.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not on PATH: run scripts/install-deps (it installs Debian's prometheus and moto[server])"
    );
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blocking variant of [`wait_for`] for start-up code outside a runtime.
pub fn wait_for_blocking(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A child process that dies with the test: [`kube_testbed::Guarded`], panicking when the
/// program cannot start (it is one the tests need and `scripts/install-deps` installs).
pub struct Guarded(#[allow(dead_code)] kube_testbed::Guarded);

impl Guarded {
    /// Starts `program args...`, with its output written to `log`.
    pub fn spawn(program: &str, args: &[String], log: &Path) -> Guarded {
        Guarded(
            kube_testbed::Guarded::spawn(program, args, log)
                .unwrap_or_else(|e| panic!("cannot start {program}: {e:#}")),
        )
    }
}

/// The metric context of Canary `namespace/name` with `spec`, its arms resolved by the
/// Canary's router, as the controller builds it.
pub fn canary_context(
    namespace: impl Into<String>,
    name: &str,
    spec: serin::api::CanarySpec,
) -> serin::metrics::CanaryContext {
    let namespace = namespace.into();
    let mut canary = serin::api::Canary::new(name, spec.clone());
    canary.metadata.namespace = Some(namespace.clone());
    let arms = serin::router::data_plane_arms(&canary).expect("the spec names a router");
    serin::metrics::CanaryContext::new(namespace, name, spec, arms)
}
