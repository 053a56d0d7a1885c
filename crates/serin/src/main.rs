//! The `serin` command line.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serin::logging::{self, LogFormat};

/// jemalloc instead of glibc's malloc: at steady checks a quarter of the operator's CPU
/// samples were in glibc's malloc and free (chunk consolidation and unlinking), for the
/// short-lived allocations of JSON, PromQL and reconciles (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    Run(serin::controller::cli::RunArgs),
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
    #[cfg(feature = "demo")]
    Apiserver(kube_sandbox::ApiServerArgs),
    /// Evaluate a Canary's metrics now (or replay them over a past window with --from) and
    /// print each rendered query, value, bound and verdict.
    Analyze(serin::analyze::AnalyzeArgs),
    /// Watch Serin promote a healthy canary and roll back a faulty one, on an embedded API
    /// server with simulated traffic: nothing to install.
    #[cfg(feature = "demo")]
    Demo(serin::demo::DemoArgs),
    /// `serin demo` (this build has no demo: it was built without the `demo` feature).
    #[cfg(not(feature = "demo"))]
    Demo {
        /// Ignored.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// Benchmarks that need no cluster: `serin bench judge` compares the canary judges on
    /// simulated traffic and prints a Markdown table.
    Bench {
        #[command(subcommand)]
        which: serin::bench::BenchCommand,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { which } => {
            match serin::bench::run(&which, &mut |line| eprintln!("{line}")) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
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
        Command::Run(args) => {
            logging::init(args.log_format, "info", None);
            let workers = usize::from(args.worker_threads);
            block_on_with(Some(workers), run(args))
        }
        Command::Analyze(args) => {
            logging::init(LogFormat::Text, "info", None);
            block_on(serin::analyze::run_analyze(args))
        }
        #[cfg(feature = "demo")]
        Command::Apiserver(args) => {
            logging::init(LogFormat::Text, "info", None);
            block_on(kube_sandbox::run_apiserver(args))
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            serin::demo::init_logging(&args);
            block_on(serin::demo::run(args))
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => {
            eprintln!(
                "serin demo: this serin was built without the demo (the `demo` feature); run `cargo run --release -- demo` from a checkout of Serin"
            );
            ExitCode::from(2)
        }
    }
}

fn block_on(fut: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    block_on_with(None, fut)
}

/// Runs `fut` on a multi-threaded runtime with `workers` worker threads (default: one per
/// core).
fn block_on_with(
    workers: Option<usize>,
    fut: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.enable_all().build() {
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

async fn run(args: serin::controller::cli::RunArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use serin::controller::{cli, sources::KubeSecrets};
    use serin::metrics::{Evaluator, EvaluatorConfig};
    use serin::router::{ObjectCache, Routers};

    let limit = args.rate_limit()?.map(Arc::new);
    let client = cli::client(args.kubeconfig.as_ref(), limit.clone()).await?;
    let evaluator = Evaluator::new(
        Arc::new(KubeSecrets::new(client.clone())),
        EvaluatorConfig::default(),
    )
    .map_err(|e| anyhow::anyhow!("cannot set up the metric providers: {e}"))?;
    let provider_metrics = evaluator.metrics().clone();
    let parts = cli::Parts {
        routers: Routers::standard(
            &client,
            &ObjectCache::watching(client.clone(), args.namespace.clone()),
        ),
        metrics_source: Arc::new(evaluator),
        register: Box::new(move |registry| {
            provider_metrics.register(registry);
            if let Some(limit) = &limit {
                limit.register(registry);
            }
        }),
    };
    cli::run(args, client, parts).await
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
