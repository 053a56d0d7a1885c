//! moto's server (`moto_server`, pinned in scripts/install-deps) on 127.0.0.1, shared by the
//! tests of one test binary. Tests keep their data apart with their own dimension values.

use std::sync::OnceLock;
use std::time::Duration;

use super::{Guarded, free_port, listening, require, wait_for_blocking};

/// A running moto server.
pub struct Moto {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    _process: Guarded,
    _dir: tempfile::TempDir,
}

static SHARED: OnceLock<Moto> = OnceLock::new();

/// The test binary's moto server, started on first use. It stops when the test process
/// exits.
pub fn shared() -> &'static Moto {
    SHARED.get_or_init(start)
}

fn start() -> Moto {
    require("moto_server");
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let log = dir.path().join("moto.log");
    let process = Guarded::spawn(
        "moto_server",
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        &log,
    );
    wait_for_blocking("moto_server to listen", Duration::from_secs(30), || {
        listening(port)
    });
    Moto {
        url: format!("http://127.0.0.1:{port}"),
        _process: process,
        _dir: dir,
    }
}
