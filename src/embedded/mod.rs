//! In-memory Kubernetes API server for tests and `serin demo` (work in progress).

use std::path::PathBuf;

/// Arguments of `serin apiserver`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiServerArgs {
    /// Port to listen on (127.0.0.1 only); a free port is chosen when omitted.
    #[arg(long)]
    pub port: Option<u16>,
    /// Write a kubeconfig that points at this server to FILE.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig_out: Option<PathBuf>,
}

/// Runs `serin apiserver` until Ctrl-C.
pub async fn run_apiserver(_args: ApiServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("the embedded API server is not built yet")
}
