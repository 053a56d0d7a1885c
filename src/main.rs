//! The `serin` command line.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Serin: progressive delivery (canary releases) for Kubernetes.
///
/// Serin shifts live traffic from the stable version of a service to a new one in steps,
/// checks error rate and latency SLOs in Prometheus or CloudWatch at every step, and rolls
/// back by itself when the new version breaches them.
#[derive(Parser, Debug)]
#[command(name = "serin", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator against the cluster in your kubeconfig (or in-cluster config).
    Run(RunArgs),
    /// Print the Canary CustomResourceDefinition (YAML) to install with `kubectl apply -f -`.
    Crd,
    /// Check Canary manifests offline; prints one line per mistake. Exit code 1 when any
    /// file is invalid.
    Validate {
        /// Manifest files (YAML, several documents allowed); `-` reads standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<String>,
    },
    /// Run an in-memory Kubernetes API server for trying Serin and kubectl locally.
    Apiserver(serin::embedded::ApiServerArgs),
    /// Evaluate a Canary's metrics now (or replay them over a past window with --from) and
    /// print each rendered query, value, bound and verdict.
    Analyze(serin::metrics::AnalyzeArgs),
    /// Print the version.
    Version,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Path to a kubeconfig; defaults to $KUBECONFIG, ~/.kube/config, then in-cluster.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match serin::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRD: {e}");
                ExitCode::from(2)
            }
        },
        Command::Validate { files } => validate(&files),
        Command::Version => {
            println!("serin {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run(args) => block_on(run(args)),
        Command::Apiserver(args) => block_on(serin::embedded::run_apiserver(args)),
        Command::Analyze(args) => block_on(serin::metrics::run_analyze(args)),
    }
}

fn block_on(fut: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    anyhow::bail!(
        "loaded the cluster configuration for {}, but the controller is not built yet (issue \
         \"The controller\"); `serin crd`, `serin validate` and `serin apiserver` work today",
        config.cluster_url
    )
}

fn validate(files: &[String]) -> ExitCode {
    let mut all_valid = true;
    for file in files {
        let (label, text) = if file == "-" {
            let mut text = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut text) {
                eprintln!("-: cannot read standard input: {e}");
                all_valid = false;
                continue;
            }
            ("<stdin>".to_string(), text)
        } else {
            match std::fs::read_to_string(file) {
                Ok(t) => (file.clone(), t),
                Err(e) => {
                    eprintln!("{file}: cannot read: {e}");
                    all_valid = false;
                    continue;
                }
            }
        };
        let report = serin::api::check_manifests(&text);
        if report.problems.is_empty() {
            println!("{label}: valid ({})", report.canaries.join(", "));
        } else {
            all_valid = false;
            for p in &report.problems {
                println!("{label}: {p}");
            }
        }
    }
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
