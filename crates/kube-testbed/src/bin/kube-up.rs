//! `kube-up`: a real Kubernetes control plane on 127.0.0.1 until Ctrl-C, SIGTERM, or the end
//! of standard input. Prints the kubeconfig's path and contents once the API server is ready.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::io::AsyncReadExt as _;

const USAGE: &str =
    "usage: kube-up --bin-dir DIR [--dir DIR] [--kubeconfig-out FILE] [--no-node-agent]

Starts etcd, kube-apiserver (TLS, RBAC, audit log) and kube-controller-manager on 127.0.0.1,
with a node agent that makes pods run. DIR holds etcd, kube-apiserver and
kube-controller-manager (scripts/build-kube prints it). Everything stops on Ctrl-C, SIGTERM,
or when standard input closes.";

struct Args {
    bin_dir: PathBuf,
    dir: Option<PathBuf>,
    kubeconfig_out: Option<PathBuf>,
    node_agent: bool,
}

fn parse() -> Result<Args, String> {
    let mut bin_dir = std::env::var_os("SERIN_KUBE_BIN").map(PathBuf::from);
    let (mut dir, mut kubeconfig_out, mut node_agent) = (None, None, true);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .ok_or(format!("{name} needs a value"))
        };
        match a.as_str() {
            "--bin-dir" => bin_dir = Some(value("--bin-dir")?),
            "--dir" => dir = Some(value("--dir")?),
            "--kubeconfig-out" => kubeconfig_out = Some(value("--kubeconfig-out")?),
            "--no-node-agent" => node_agent = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let bin_dir = bin_dir.ok_or("--bin-dir (or SERIN_KUBE_BIN) is required")?;
    Ok(Args {
        bin_dir,
        dir,
        kubeconfig_out,
        node_agent,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("kube-up: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let temp = match &args.dir {
        Some(_) => None,
        None => match tempfile::Builder::new().prefix("kube-testbed-").tempdir() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("kube-up: cannot make a temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let dir = args.dir.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    let started = std::time::Instant::now();
    let mut cp = match kube_testbed::ControlPlane::start(kube_testbed::Options {
        bin_dir: args.bin_dir,
        dir: dir.clone(),
        node_agent: args.node_agent,
    })
    .await
    {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("kube-up: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(out) = &args.kubeconfig_out {
        // Written whole, then renamed: a reader never sees half a file.
        let tmp = out.with_extension("tmp");
        if let Err(e) = std::fs::copy(&cp.kubeconfig, &tmp).and_then(|_| std::fs::rename(&tmp, out))
        {
            eprintln!("kube-up: cannot write {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    }
    let shown = args
        .kubeconfig_out
        .clone()
        .unwrap_or_else(|| cp.kubeconfig.clone());
    println!(
        "kube-up: control plane ready at {} in {:.1}s",
        cp.url,
        started.elapsed().as_secs_f64()
    );
    println!("kube-up: logs, audit log and state in {}", dir.display());
    println!("export KUBECONFIG={}", shown.display());
    println!(
        "{}",
        std::fs::read_to_string(&cp.kubeconfig).unwrap_or_default()
    );
    println!("kube-up: Ctrl-C (or closing standard input) stops it");
    wait_for_stop().await;
    cp.stop();
    drop(temp);
    ExitCode::SUCCESS
}

/// Resolves on Ctrl-C, SIGTERM or the end of standard input.
async fn wait_for_stop() {
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = stdin_closed => {}
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
