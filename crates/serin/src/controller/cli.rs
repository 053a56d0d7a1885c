//! `serin run`: configuration parsed once into a [`Context`], then the controller, the
//! metrics/health server and (optionally) leader election.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::leader::{LeaderElector, LeaseConfig};
use super::telemetry::{self, Health, Metrics};
use super::{Context, ControllerOptions, MetricSource};
use crate::logging::LogFormat;
use crate::router::Routers;

/// Arguments of `serin run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Path to a kubeconfig; defaults to $KUBECONFIG, ~/.kube/config, then in-cluster config.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch Canaries in this namespace only (default: all namespaces).
    #[arg(long, short = 'n', env = "SERIN_NAMESPACE")]
    pub namespace: Option<String>,
    /// Canaries reconciled at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Elect a leader with a coordination.k8s.io Lease, so several replicas can run.
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "serin-leader")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else the host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a leader's Lease lasts without renewal, in seconds.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
}

/// Builds the Kubernetes client from `--kubeconfig` or the environment.
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// The parts of the operator that differ between a cluster and the demo.
pub struct Parts {
    /// The routers.
    pub routers: Routers,
    /// The metric providers.
    pub metrics_source: Arc<dyn MetricSource>,
    /// Registers the providers' own metrics.
    pub register: Box<dyn FnOnce(&mut prometheus_client::registry::Registry) + Send>,
}

/// Runs the operator until SIGTERM/Ctrl-C (returns Ok) or until leadership is lost
/// (returns an error so the process exits non-zero and a standby takes over).
pub async fn run(args: RunArgs, client: kube::Client, parts: Parts) -> anyhow::Result<()> {
    super::check_crd(&client, args.namespace.as_deref()).await?;
    let metrics = Arc::new(Metrics::new(parts.register));
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let bound = telemetry::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
        stopped(stop_rx.clone()),
    )
    .await?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");

    let elector = if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let elector = LeaderElector::new(
            client.clone(),
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace: args
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                identity,
                duration: Duration::from_secs(args.lease_duration_secs.max(2)),
                renew_every: Duration::from_secs((args.lease_duration_secs / 3).max(1)),
            },
        );
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown_signal() => return Ok(()),
        }
        Some(elector)
    } else {
        None
    };

    let ctx = Arc::new(Context::new(
        client,
        parts.routers,
        parts.metrics_source,
        metrics,
        args.identity.clone(),
    ));
    health.set_ready(true);
    let controller = super::run(
        ctx,
        ControllerOptions {
            namespace: args.namespace.clone(),
            concurrency: args.concurrency.max(1),
        },
        stopped(stop_rx.clone()),
    );
    let lost = async {
        match &elector {
            Some(e) => Some(e.hold().await),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = controller => Ok(()),
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            Ok(())
        }
        Some(err) = lost => {
            // Stop writing at once: exit without draining the queue.
            Err(anyhow::anyhow!("lost leadership: {err}"))
        }
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "serin".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
