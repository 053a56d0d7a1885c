//! `serin run`: configuration parsed once into a [`Context`], then the controller, the
//! metrics/health server and (optionally) leader election.
//!
//! With `--leader-elect`, every write through a client made by [`client`] is fenced by
//! the leader lease ([`super::leader::fenced_client`]); the Lease itself is renewed through
//! a separate, unfenced client. A standby serves `/readyz` as ready (it is healthy) but
//! starts no controller until it holds the Lease.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::watch;

use super::leader::{self, Fence, LeaderElector, LeaseConfig, LeaseTiming, TimingError};
use super::ratelimit::{self, RateLimit};
use super::shard::Shard;
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
    /// Metric checks and looks fetched at once, across all Canaries (separate from the
    /// reconciles, so a slow provider holds these, not the reconciles).
    #[arg(long, default_value_t = super::checks::DEFAULT_CONCURRENCY)]
    pub check_concurrency: usize,
    /// Kubernetes requests per second, across all Canaries (a token bucket; 0: no limit):
    /// a burst of work waits in Serin instead of flooding the API server. The Lease of the
    /// leader election is renewed outside this limit.
    #[arg(long, default_value_t = 300.0)]
    pub kube_qps: f64,
    /// Kubernetes requests that may go at once before `--kube-qps` paces them.
    #[arg(long, default_value_t = 600)]
    pub kube_burst: u32,
    /// Threads running the operator's tasks. One is the default: the work is waiting on
    /// the network, and one thread spends about a quarter less CPU per check than one per
    /// core (measured with `serin bench scale`), whose threads wake each other for little
    /// work. Raise it only if one core is busy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
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
    /// How long a standby waits, after it last saw the leader renew, before taking the
    /// Lease, in whole seconds.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// How long a leader goes on without a successful renewal before it stops writing and
    /// exits, in seconds (fractions allowed); shorter than the lease duration. Every write
    /// gets `lease duration − renew deadline` to finish. Default: 2/3 of the lease duration.
    #[arg(long, value_name = "SECS")]
    pub renew_deadline_secs: Option<f64>,
    /// Pause between renewals, and between a standby's attempts to acquire, in seconds
    /// (fractions allowed); shorter than the renew deadline. Default: 2/15 of the lease
    /// duration (2 s for 15 s).
    #[arg(long, value_name = "SECS")]
    pub retry_period_secs: Option<f64>,
    /// Shards that share the Canaries, each led through its own Lease (1 to 64; more than
    /// one needs `--leader-elect`). A replica leads whichever shard is free and watches only
    /// that shard's Canaries: those whose label `serin.io/shard` (a bucket from 0 to 63,
    /// set by Serin from the Canary's UID, or by a user) modulo the shard count is the
    /// shard. Run at least as many replicas as shards; the extra ones stand by. Changing
    /// it pauses every shard for about one lease duration, and never lets replicas of the
    /// old and the new count act at once.
    #[arg(long, default_value_t = 1)]
    pub shards: u16,
    /// Where to send notifications of rollouts (Slack, Teams, JSON webhooks): a YAML file,
    /// see docs/notifications.md. Read at start; a mistake stops Serin with a message
    /// naming the field.
    #[arg(long, value_name = "FILE")]
    pub notifications: Option<PathBuf>,
    /// What Canaries may make Serin do with its identity (roles, endpoints, URLs).
    #[command(flatten)]
    pub policy: crate::policy::PolicyArgs,
}

impl RunArgs {
    /// The client-side rate limit `--kube-qps` and `--kube-burst` ask for (`None`: no
    /// limit), or an error naming the flag to fix.
    pub fn rate_limit(&self) -> anyhow::Result<Option<RateLimit>> {
        if !(self.kube_qps.is_finite() && self.kube_qps >= 0.0) {
            anyhow::bail!(
                "--kube-qps must be a number of requests per second above 0, or 0 for no limit; not {}",
                self.kube_qps
            );
        }
        if self.kube_burst == 0 && self.kube_qps > 0.0 {
            anyhow::bail!(
                "--kube-burst must be at least 1 (the requests that may go at once); not 0"
            );
        }
        Ok(RateLimit::new(self.kube_qps, self.kube_burst))
    }

    /// The shard count `--shards` asks for, or an error naming the flag and the fix.
    pub fn shard_count(&self) -> anyhow::Result<u16> {
        let max = super::shard::BUCKETS;
        if self.shards == 0 || self.shards > max {
            anyhow::bail!(
                "--shards must be from 1 to {max} (the Canaries' shard buckets); not {}",
                self.shards
            );
        }
        if self.shards > 1 && !self.leader_elect {
            anyhow::bail!(
                "--shards {} needs --leader-elect: each shard is led through its own Lease, so that no two replicas act on one Canary",
                self.shards
            );
        }
        Ok(self.shards)
    }

    /// The lease timing the flags ask for, or an error naming the flag to fix.
    pub fn lease_timing(&self) -> anyhow::Result<LeaseTiming> {
        let secs = |flag: &str, v: f64| -> anyhow::Result<Duration> {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!("{flag} must be a number of seconds above zero, not {v}")
                })
        };
        let lease = self.lease_duration_secs;
        let duration = secs("--lease-duration-secs", lease as f64)?;
        let renew_deadline = match self.renew_deadline_secs {
            Some(v) => secs("--renew-deadline-secs", v)?,
            None => duration * 2 / 3,
        };
        let retry_period = match self.retry_period_secs {
            Some(v) => secs("--retry-period-secs", v)?,
            None => duration * 2 / 15,
        };
        LeaseTiming::new(duration, renew_deadline, retry_period).map_err(|e| {
            let (r, p) = (renew_deadline.as_secs_f64(), retry_period.as_secs_f64());
            match e {
                TimingError::RenewDeadlineNotShorter => anyhow::anyhow!(
                    "--renew-deadline-secs ({r}) must be shorter than --lease-duration-secs ({lease}): a leader must stop writing before its lease can expire for the others"
                ),
                TimingError::RetryPeriodNotShorter => anyhow::anyhow!(
                    "--retry-period-secs ({p}) must be shorter than --renew-deadline-secs ({r}), so a leader can retry a failed renewal before its deadline"
                ),
                TimingError::TooLong => anyhow::anyhow!(
                    "--lease-duration-secs ({lease}) must be at most {} seconds",
                    LeaseTiming::MAX_DURATION.as_secs()
                ),
                TimingError::Zero => anyhow::anyhow!(
                    "--lease-duration-secs ({lease}) is too short for a renew deadline and a retry period above zero; set them with --renew-deadline-secs and --retry-period-secs"
                ),
            }
        })
    }
}

/// The fence of every client [`client`] makes: open until `run` elects a leader (one
/// operator per process, so one fence per process; `main` builds the client before `run`).
static FENCE: LazyLock<Arc<Fence>> = LazyLock::new(|| Arc::new(Fence::open()));

/// Builds the Kubernetes client from `--kubeconfig` or the environment, paced by `limit`
/// (none: unpaced). Its writes are fenced by the leader lease once [`run`] elects a leader,
/// so pass it to [`run`] and build the routers from it. A request waits for its turn under
/// the limit before the fence checks the lease and times the write.
pub async fn client(
    kubeconfig: Option<&PathBuf>,
    limit: Option<Arc<RateLimit>>,
) -> anyhow::Result<kube::Client> {
    let fenced = leader::fenced_client(unfenced_client(kubeconfig).await?, FENCE.clone());
    Ok(match limit {
        Some(limit) => ratelimit::rate_limited_client(fenced, limit),
        None => fenced,
    })
}

/// A client without the fence: for the Lease, whose writes are what open it.
async fn unfenced_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(with_user_agent(config))?)
}

/// Names Serin in the User-Agent of its requests (kube-rs sends none), so the API server's
/// audit log, its metrics and `serin bench scale` tell Serin's requests from others'.
pub fn with_user_agent(mut config: kube::Config) -> kube::Config {
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!("serin/", env!("CARGO_PKG_VERSION"))),
    ));
    config
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
/// (returns an error so the process exits non-zero and a standby takes over). With
/// `--leader-elect`, writes through clients made by [`client`] go out only inside the
/// lease.
pub async fn run(args: RunArgs, client: kube::Client, parts: Parts) -> anyhow::Result<()> {
    // The AWS writes of the routers pass the same fence as the client's.
    crate::router::guard_writes(FENCE.clone());
    let timing = args.lease_timing()?;
    let shards = args.shard_count()?;
    let notifications = match &args.notifications {
        Some(path) => crate::notify::load(path)?,
        None => crate::notify::Config::default(),
    };
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

    // A standby is healthy: ready, though it does not act until it leads.
    health.set_ready(true);
    let (elector, shard) = if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        // Before anything can write: from here on writes wait for a held lease.
        FENCE.arm(&timing);
        let elector = LeaderElector::new(
            unfenced_client(args.kubeconfig.as_ref()).await?,
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace: args
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                identity,
                timing,
                shards,
            },
            FENCE.clone(),
        );
        let shard = tokio::select! {
            shard = elector.acquire() => shard,
            () = shutdown_signal() => return Ok(()),
        };
        (Some(elector), shard)
    } else {
        (None, Shard::ALL)
    };
    metrics.set_shard(shard);

    let ctx = Arc::new(
        Context::new(
            client,
            parts.routers,
            parts.metrics_source,
            metrics.clone(),
            args.identity.clone(),
        )
        .with_policy(args.policy.policy())
        .with_check_concurrency(args.check_concurrency)
        .with_notifier({
            let metrics = metrics.clone();
            crate::notify::Notifier::start(
                notifications,
                Arc::new(move |receiver: &str, outcome| metrics.notification(receiver, outcome)),
            )
        }),
    );
    let controller = super::run(
        ctx,
        ControllerOptions {
            namespace: args.namespace.clone(),
            concurrency: args.concurrency.max(1),
            shard,
        },
        stopped(stop_rx.clone()),
    );
    let lost = async {
        match &elector {
            Some(e) => Some(e.hold().await),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(controller);
    tokio::select! {
        () = &mut controller => Ok(()),
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            if let Some(elector) = &elector {
                // No new write from here on; the reconciles under way end (each write is
                // bounded by the write timeout), then the Lease goes to a standby at once.
                FENCE.close();
                let _ = stop_tx.send(true);
                let drain = timing.write_timeout() + Duration::from_secs(1);
                let _ = tokio::time::timeout(drain, &mut controller).await;
                elector.release().await;
            } else {
                let _ = stop_tx.send(true);
            }
            Ok(())
        }
        Some(err) = lost => {
            // The fence already refuses every write; exit without draining the queue.
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        run: RunArgs,
    }

    fn timing(flags: &[&str]) -> anyhow::Result<LeaseTiming> {
        let cmd = Cmd::try_parse_from(std::iter::once("serin").chain(flags.iter().copied()))?;
        cmd.run.lease_timing()
    }

    /// The defaults are client-go's (15 s lease, 10 s renew deadline, 2 s retry), and a
    /// shorter lease scales them.
    #[test]
    fn lease_timing_defaults() {
        let t = timing(&[]).unwrap();
        assert_eq!(
            (t.duration, t.renew_deadline, t.retry_period),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        assert_eq!(t.write_timeout(), Duration::from_secs(5));
        let t = timing(&["--lease-duration-secs", "3"]).unwrap();
        assert_eq!(t.renew_deadline, Duration::from_secs(2));
        assert_eq!(t.retry_period, Duration::from_millis(400));
        let t = timing(&["--renew-deadline-secs", "4.5", "--retry-period-secs", "0.5"]).unwrap();
        assert_eq!(t.renew_deadline, Duration::from_millis(4500));
    }

    fn limit(flags: &[&str]) -> anyhow::Result<Option<RateLimit>> {
        let cmd = Cmd::try_parse_from(std::iter::once("serin").chain(flags.iter().copied()))?;
        cmd.run.rate_limit()
    }

    /// The rate limit is on by default, `--kube-qps 0` turns it off, and a rate or burst
    /// that cannot work is refused naming the flag.
    #[test]
    fn rate_limit_flags() {
        assert!(limit(&[]).unwrap().is_some());
        assert!(limit(&["--kube-qps", "0"]).unwrap().is_none());
        let err = |flags: &[&str]| limit(flags).unwrap_err().to_string();
        assert!(err(&["--kube-qps=-5"]).starts_with("--kube-qps must be"));
        assert!(err(&["--kube-qps", "NaN"]).starts_with("--kube-qps must be"));
        assert!(err(&["--kube-burst", "0"]).starts_with("--kube-burst must be at least 1"));
    }

    /// A shard count out of range, or shards without leader election, is refused naming
    /// the flag and the fix.
    #[test]
    fn shard_flags() {
        let count = |flags: &[&str]| {
            let cmd =
                Cmd::try_parse_from(std::iter::once("serin").chain(flags.iter().copied())).unwrap();
            cmd.run.shard_count()
        };
        assert_eq!(count(&[]).unwrap(), 1);
        assert_eq!(count(&["--shards", "3", "--leader-elect"]).unwrap(), 3);
        assert_eq!(count(&["--shards", "64", "--leader-elect"]).unwrap(), 64);
        let err = |flags: &[&str]| count(flags).unwrap_err().to_string();
        assert!(err(&["--shards", "0"]).starts_with("--shards must be from 1 to 64"));
        assert!(
            err(&["--shards", "65", "--leader-elect"]).starts_with("--shards must be from 1 to 64")
        );
        assert!(err(&["--shards", "2"]).contains("needs --leader-elect"));
    }

    /// Timing that could let a lease expire under a writing leader is refused, naming the
    /// flag to fix.
    #[test]
    fn lease_timing_errors_name_the_flag() {
        let err = |flags: &[&str]| timing(flags).unwrap_err().to_string();
        assert!(
            err(&["--renew-deadline-secs", "15"]).starts_with(
                "--renew-deadline-secs (15) must be shorter than --lease-duration-secs (15)"
            ),
            "{}",
            err(&["--renew-deadline-secs", "15"])
        );
        assert!(err(&["--retry-period-secs", "10"]).starts_with(
            "--retry-period-secs (10) must be shorter than --renew-deadline-secs (10)"
        ));
        assert!(err(&["--lease-duration-secs", "0"]).starts_with("--lease-duration-secs must be"));
        assert!(err(&["--retry-period-secs=-1"]).starts_with("--retry-period-secs must be"));
        assert!(
            err(&["--renew-deadline-secs", "NaN"]).starts_with("--renew-deadline-secs must be")
        );
        assert!(err(&["--lease-duration-secs", "999999"]).contains("at most 86400"));
        assert!(err(&["--lease-duration-secs", "3", "--renew-deadline-secs", "5"]).contains("(3)"));
    }
}
