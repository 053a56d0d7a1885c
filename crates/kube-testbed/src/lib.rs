//! A real Kubernetes control plane on 127.0.0.1 for tests and by hand: etcd, kube-apiserver
//! and kube-controller-manager (the binaries `scripts/build-kube` builds from the published
//! Go modules), plus a [`node_agent`] so that pods "run" without a kubelet.
//!
//! The API server speaks TLS with a throwaway CA ([`certs`]), authenticates an admin by
//! client certificate, authorizes with RBAC, signs service-account tokens (TokenRequest
//! works) and writes an audit log. The controller manager runs the deployment, ReplicaSet,
//! EndpointSlice, garbage-collector, namespace, service-account (and token) and root-CA
//! publisher controllers, and not node-lifecycle, which would evict the pods of a node that
//! never heartbeats.
//!
//! Every child runs under a small shell that kills it when its standard input closes, and
//! this process holds those pipes: when it exits for any reason (a panicking test, SIGKILL),
//! the children go too. Nothing here knows of Serin.
#![forbid(unsafe_code)]

pub mod certs;
pub mod node_agent;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Where the binaries are and where the state goes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Holds `etcd`, `kube-apiserver` and `kube-controller-manager`.
    pub bin_dir: PathBuf,
    /// Working directory for certificates, etcd's data, logs and the kubeconfig.
    pub dir: PathBuf,
    /// Whether to run the node agent in this process.
    pub node_agent: bool,
}

/// A running control plane; dropping it stops every process.
pub struct ControlPlane {
    /// The API server, `https://127.0.0.1:PORT`.
    pub url: String,
    /// A kubeconfig for the admin (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// The API server's audit log (JSON lines).
    pub audit_log: PathBuf,
    /// The certificates and keys.
    pub pki: certs::Pki,
    /// The working directory.
    pub dir: PathBuf,
    etcd_url: String,
    children: Vec<Guarded>,
    agent: Option<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts etcd, the API server (waiting for `/readyz`) and the controller manager, and
    /// the node agent when asked; must be called inside a Tokio runtime.
    pub async fn start(options: Options) -> anyhow::Result<ControlPlane> {
        let started = Instant::now();
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir)?;
        let pki = certs::generate(&dir.join("pki"))?;
        let bin = |name: &str| -> anyhow::Result<String> {
            let p = options.bin_dir.join(name);
            if !p.is_file() {
                bail!(
                    "{} is missing: build the control plane with scripts/build-kube",
                    p.display()
                );
            }
            Ok(p.display().to_string())
        };
        let mut children = Vec::new();
        let etcd_port = free_port()?;
        children.push(Guarded::spawn(
            &bin("etcd")?,
            &etcd_args(&dir, etcd_port)?,
            &dir.join("etcd.log"),
        )?);
        wait_listening(
            "etcd",
            etcd_port,
            Duration::from_secs(30),
            &dir.join("etcd.log"),
        )?;

        let port = free_port()?;
        let audit_log = dir.join("audit.log");
        let args = apiserver_args(&dir, &pki, etcd_port, port, &audit_log)?;
        children.push(Guarded::spawn(
            &bin("kube-apiserver")?,
            &args,
            &dir.join("kube-apiserver.log"),
        )?);
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &pki)?;
        let client = client(&kubeconfig).await?;
        let apiserver = children
            .last_mut()
            .context("the API server was just started")?;
        wait_ready(
            &client,
            apiserver,
            Duration::from_secs(90),
            &dir.join("kube-apiserver.log"),
        )
        .await?;

        let args = controller_manager_args(&pki, &kubeconfig);
        children.push(Guarded::spawn(
            &bin("kube-controller-manager")?,
            &args,
            &dir.join("kube-controller-manager.log"),
        )?);
        let agent = options
            .node_agent
            .then(|| tokio::spawn(node_agent::run(client.clone())));
        tracing::info!(url, took = ?started.elapsed(), "control plane ready");
        Ok(ControlPlane {
            url,
            kubeconfig,
            audit_log,
            pki,
            dir,
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            children,
            agent,
        })
    }

    /// etcd's client URL, `http://127.0.0.1:PORT` (plain HTTP; it also serves the JSON gateway
    /// under `/v3/`), for tests that compact etcd or read it directly.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// An admin client.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client(&self.kubeconfig).await
    }

    /// Writes a kubeconfig that authenticates with a bearer `token` (a service account's,
    /// from TokenRequest), trusting the control plane's CA, with `namespace` as default.
    pub fn write_token_kubeconfig(
        &self,
        path: &Path,
        token: &str,
        namespace: &str,
    ) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-testbed\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n- name: token\n  context:\n    cluster: kube-testbed\n    user: token\n    namespace: {namespace}\ncurrent-context: token\n",
            url = self.url,
            ca = self.pki.ca_cert.display(),
        );
        std::fs::write(path, text)?;
        Ok(())
    }

    /// Stops every process (also done on drop).
    pub fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.abort();
        }
        // The controller manager first, etcd last.
        while let Some(child) = self.children.pop() {
            drop(child);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A kube client for `kubeconfig`.
pub async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn etcd_args(dir: &Path, port: u16) -> anyhow::Result<Vec<String>> {
    let peer = free_port()?;
    Ok(vec![
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls=http://127.0.0.1:{port}"),
        format!("--advertise-client-urls=http://127.0.0.1:{port}"),
        format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ])
}

/// Audit everything Serin could do, at the Metadata level (who, verb, resource, code).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n";

fn apiserver_args(
    dir: &Path,
    pki: &certs::Pki,
    etcd_port: u16,
    port: u16,
    audit_log: &Path,
) -> anyhow::Result<Vec<String>> {
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(&policy, AUDIT_POLICY)?;
    let p = |f: &Path| f.display().to_string();
    Ok(vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", p(&pki.server_cert)),
        format!("--tls-private-key-file={}", p(&pki.server_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        "--authorization-mode=RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        // RFC 2544's benchmarking range: ClusterIPs are data only here; nothing routes to
        // them. A /16, so that a benchmark's thousands of Services fit (a /24 held 254).
        "--service-cluster-ip-range=198.18.0.0/16".into(),
        format!("--audit-policy-file={}", p(&policy)),
        format!("--audit-log-path={}", p(audit_log)),
        "--audit-log-maxsize=0".into(),
        format!("--cert-dir={}", p(&dir.join("apiserver-certs"))),
        // The default reconciler refuses a loopback advertise address; clients here use the
        // kubeconfig, not the `kubernetes` Service.
        "--endpoint-reconciler-type=none".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ])
}

fn controller_manager_args(pki: &certs::Pki, kubeconfig: &Path) -> Vec<String> {
    let p = |f: &Path| f.display().to_string();
    vec![
        format!("--kubeconfig={}", p(kubeconfig)),
        format!("--authentication-kubeconfig={}", p(kubeconfig)),
        format!("--authorization-kubeconfig={}", p(kubeconfig)),
        "--leader-elect=false".into(),
        "--controllers=deployment-controller,replicaset-controller,endpointslice-controller,endpoints-controller,garbage-collector-controller,namespace-controller,clusterrole-aggregation-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller".into(),
        format!("--service-account-private-key-file={}", p(&pki.sa_key)),
        format!("--root-ca-file={}", p(&pki.ca_cert)),
        "--bind-address=127.0.0.1".into(),
        "--secure-port=0".into(),
        "--concurrent-deployment-syncs=10".into(),
        "--concurrent-replicaset-syncs=10".into(),
        "--v=1".into(),
    ]
}

/// A kubeconfig for the admin certificate, trusting the throwaway CA.
fn write_kubeconfig(path: &Path, url: &str, pki: &certs::Pki) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-testbed\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: testbed-admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: kube-testbed\n  context:\n    cluster: kube-testbed\n    user: testbed-admin\n    namespace: default\ncurrent-context: kube-testbed\n",
        ca = pki.ca_cert.display(),
        cert = pki.admin_cert.display(),
        key = pki.admin_key.display(),
    );
    std::fs::write(path, text)?;
    Ok(())
}

async fn wait_ready(
    client: &kube::Client,
    apiserver: &mut Guarded,
    timeout: Duration,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if apiserver.exited() {
            bail!("kube-apiserver exited; its log ends:\n{}", tail(log, 20));
        }
        let req = http_request("/readyz")?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "kube-apiserver was not ready after {timeout:?} ({last}); its log ends:\n{}",
        tail(log, 20)
    )
}

fn http_request(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

fn wait_listening(what: &str, port: u16, timeout: Duration, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{what} did not listen on 127.0.0.1:{port} within {timeout:?}; its log ends:\n{}",
        tail(log, 20)
    )
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// A child process that is killed when this value is dropped, and also when this process
/// exits without dropping it (a panicking test, a server kept in a `static`, SIGKILL): a
/// small shell waits for its standard input to close, then kills the program.
pub struct Guarded {
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl Guarded {
    /// Starts `program args...`, with its output written to `log`.
    pub fn spawn(program: &str, args: &[String], log: &Path) -> anyhow::Result<Guarded> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" & pid=$!; read _ignored; kill $pid 2>/dev/null; wait $pid"#)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let stdin = shell.stdin.take();
        Ok(Guarded { shell, stdin })
    }
}

impl Guarded {
    /// Whether the program (its shell) has ended.
    pub fn exited(&mut self) -> bool {
        matches!(self.shell.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.shell.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}
