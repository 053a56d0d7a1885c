//! A fault-injecting proxy between one `serin run` and the real kube-apiserver.
//!
//! The real server speaks TLS; the proxy listens on plain HTTP at 127.0.0.1 and forwards
//! through an authenticated `kube::Client` (TLS, the server's CA, the operator's
//! ServiceAccount token), so the operator under it authenticates with that bearer token
//! and RBAC applies as without the proxy. Responses stream (watches work).
//!
//! What it can do, each on command:
//! - **record** every exchange: method, path, when it arrived, was forwarded and was
//!   answered upstream, and how it ended ([`FaultProxy::log`], [`FaultProxy::writes`]);
//! - **stall** ([`FaultProxy::stall`] / [`FaultProxy::resume`]): nothing moves in either
//!   direction — no request is forwarded, no response or watch event delivered — as on a
//!   connection that stopped carrying packets. What arrived meanwhile moves on at resume,
//!   but only while its client still waits for it: a request whose client gave up (timed
//!   out, or died) is never forwarded, as a closed connection's would not be;
//! - **fail** the `nth` request matching a method and a path substring, and the next
//!   `times − 1` matching ones, with an HTTP status and a `metav1.Status` body, without
//!   forwarding them ([`FaultProxy::fail_nth`]);
//! - **hold** the `nth` matching request, before forwarding it or after forwarding it and
//!   before answering ([`FaultProxy::hold_nth`]), until the test releases it — a write "in
//!   the middle" while the test kills its sender.
//!
//! ```ignore
//! let (proxy, kubeconfig) = FaultProxy::for_operator("a", &env.operator_kubeconfig, dir).await;
//! // the status write after the 2nd weight write fails once:
//! proxy.fail_nth("PUT", "/canaries/podinfo/status", 2, 1, 500);
//! let held = proxy.hold_nth("PATCH", "/virtualrouters/podinfo", 1, HoldAt::Response);
//! held.reached().await;   // the write reached the server; its answer is held
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use futures::StreamExt as _;
use tokio::sync::{Notify, watch};

/// How one exchange ended (so far).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still going.
    Pending,
    /// Forwarded and answered upstream (any status).
    Answered,
    /// Answered by an injected failure; never forwarded.
    Failed,
    /// The client went away before it was forwarded: it never reached the server.
    Abandoned,
    /// The client went away after it was forwarded, before its answer was delivered.
    AbandonedAfterForwarding,
    /// Forwarding failed (a transport error upstream).
    Unreachable,
}

/// One request through the proxy.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The proxy's name (the replica behind it).
    pub proxy: String,
    /// `GET`, `PUT`, ...
    pub method: String,
    /// Path and query.
    pub path: String,
    /// When it arrived.
    pub received: Instant,
    /// When it was sent upstream (`None`: it never reached the server).
    pub forwarded: Option<Instant>,
    /// When the upstream answer (its head) came back.
    pub answered: Option<Instant>,
    /// The upstream (or injected) status.
    pub status: Option<u16>,
    /// How it ended.
    pub outcome: Outcome,
}

impl Exchange {
    /// POST, PUT, PATCH or DELETE.
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    /// A write to a Lease (leader election itself).
    pub fn is_lease(&self) -> bool {
        self.path.contains("/apis/coordination.k8s.io/")
    }
}

/// Where [`FaultProxy::hold_nth`] holds a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldAt {
    /// Before forwarding: the server has not seen it.
    Request,
    /// After forwarding and the server's answer, before delivering that answer.
    Response,
}

/// A request held by [`FaultProxy::hold_nth`].
pub struct Held {
    reached: watch::Receiver<bool>,
    release: Arc<Notify>,
}

impl Held {
    /// Waits until the request is held (at the point asked for).
    pub async fn reached(&mut self) {
        let _ = self.reached.wait_for(|r| *r).await;
    }

    /// Whether it is held now (or was).
    pub fn is_reached(&self) -> bool {
        *self.reached.borrow()
    }

    /// Lets it go on (if its client still waits).
    pub fn release(&self) {
        self.release.notify_one();
    }
}

enum Action {
    Fail(u16),
    Hold {
        at: HoldAt,
        reached: watch::Sender<bool>,
        release: Arc<Notify>,
    },
}

struct Rule {
    method: String,
    path: String,
    /// Matching requests still to let through before acting.
    skip: usize,
    /// Matching requests still to act on.
    times: usize,
    action: Action,
}

/// What a rule decided for one request.
enum Decision {
    Pass,
    Fail(u16),
    Hold {
        at: HoldAt,
        reached: watch::Sender<bool>,
        release: Arc<Notify>,
    },
}

struct Shared {
    name: String,
    upstream: kube::Client,
    stalled: watch::Sender<bool>,
    log: Mutex<Vec<Exchange>>,
    rules: Mutex<Vec<Rule>>,
}

impl Shared {
    fn update(&self, i: usize, f: impl FnOnce(&mut Exchange)) {
        if let Some(e) = self.log.lock().unwrap().get_mut(i) {
            f(e);
        }
    }

    fn decide(&self, method: &str, path: &str) -> Decision {
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if rule.times == 0 || rule.method != method || !path.contains(&rule.path) {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            rule.times -= 1;
            return match &rule.action {
                Action::Fail(status) => Decision::Fail(*status),
                Action::Hold {
                    at,
                    reached,
                    release,
                } => Decision::Hold {
                    at: *at,
                    reached: reached.clone(),
                    release: release.clone(),
                },
            };
        }
        Decision::Pass
    }

    async fn unstalled(&self) {
        let mut rx = self.stalled.subscribe();
        let _ = rx.wait_for(|s| !*s).await;
    }
}

/// Marks an exchange abandoned when its handler is dropped before it finished: the client
/// closed the connection (hyper then drops the request's future).
struct Guard {
    shared: Arc<Shared>,
    index: usize,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.update(self.index, |e| {
                if e.outcome == Outcome::Pending {
                    e.outcome = if e.forwarded.is_some() {
                        Outcome::AbandonedAfterForwarding
                    } else {
                        Outcome::Abandoned
                    };
                }
            });
        }
    }
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// A proxy named `name` forwarding to the API server of `upstream`, which adds the
    /// credentials.
    pub async fn start(name: &str, upstream: kube::Client) -> FaultProxy {
        let (stalled, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            upstream,
            stalled,
            log: Mutex::default(),
            rules: Mutex::default(),
        });
        let st = shared.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let st = st.clone();
            async move { forward(st, req).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy { url, shared, task }
    }

    /// A proxy for an operator that authenticates with the bearer token of `kubeconfig`
    /// (the one [`super::rbac::operator_kubeconfig`] writes): the proxy forwards with that
    /// kubeconfig's server, CA and token, and the returned kubeconfig (written in `dir`)
    /// points the operator at the proxy with the same token.
    pub async fn for_operator(name: &str, kubeconfig: &Path, dir: &Path) -> (FaultProxy, PathBuf) {
        let upstream = kube_testbed::client(kubeconfig)
            .await
            .expect("a client for the operator's kubeconfig");
        let proxy = FaultProxy::start(name, upstream).await;
        let kc: serde_json::Value =
            serde_norway::from_str(&std::fs::read_to_string(kubeconfig).unwrap()).unwrap();
        let token = kc["users"][0]["user"]["token"]
            .as_str()
            .expect("the operator's kubeconfig has a token")
            .to_string();
        let namespace = kc["contexts"][0]["context"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let path = dir.join(format!("{name}-via-proxy.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: {}\nusers:\n- name: serin\n  user:\n    token: {token}\ncontexts:\n- name: serin\n  context:\n    cluster: proxy\n    user: serin\n    namespace: {namespace}\ncurrent-context: serin\n",
                proxy.url
            ),
        )
        .unwrap();
        (proxy, path)
    }

    /// Stops all forwarding, both ways, until [`FaultProxy::resume`].
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Forwards again (what still waits moves on).
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// Answers the `nth` (1-based, counted from now) request with `method` whose path
    /// and query contain `path`, and the `times − 1` matching ones after it, with `status`
    /// and a `metav1.Status` body, without forwarding them.
    pub fn fail_nth(&self, method: &str, path: &str, nth: usize, times: usize, status: u16) {
        self.add(method, path, nth, times, Action::Fail(status));
    }

    /// Holds the `nth` (1-based, counted from now) request with `method` whose path and
    /// query contain `path` at `at`, until [`Held::release`].
    pub fn hold_nth(&self, method: &str, path: &str, nth: usize, at: HoldAt) -> Held {
        let (reached, rx) = watch::channel(false);
        let release = Arc::new(Notify::new());
        self.add(
            method,
            path,
            nth,
            1,
            Action::Hold {
                at,
                reached,
                release: release.clone(),
            },
        );
        Held {
            reached: rx,
            release,
        }
    }

    fn add(&self, method: &str, path: &str, nth: usize, times: usize, action: Action) {
        assert!(nth >= 1, "nth counts from 1");
        self.shared.rules.lock().unwrap().push(Rule {
            method: method.to_string(),
            path: path.to_string(),
            skip: nth - 1,
            times,
            action,
        });
    }

    /// Every exchange so far, in order of arrival.
    pub fn log(&self) -> Vec<Exchange> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The writes that reached the server (forwarded), Lease writes excluded.
    pub fn writes(&self) -> Vec<Exchange> {
        self.log()
            .into_iter()
            .filter(|e| e.is_write() && !e.is_lease() && e.forwarded.is_some())
            .collect()
    }
}

/// A `metav1.Status` answer.
fn status_response(code: u16, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "InternalError", "code": code,
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

async fn forward(st: Arc<Shared>, req: Request<Body>) -> Response<Body> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let index = {
        let mut log = st.log.lock().unwrap();
        log.push(Exchange {
            proxy: st.name.clone(),
            method: method.clone(),
            path: path.clone(),
            received: Instant::now(),
            forwarded: None,
            answered: None,
            status: None,
            outcome: Outcome::Pending,
        });
        log.len() - 1
    };
    let mut guard = Guard {
        shared: st.clone(),
        index,
        done: false,
    };
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let decision = st.decide(&method, &path);
    let hold = match decision {
        Decision::Fail(code) => {
            st.update(index, |e| {
                e.status = Some(code);
                e.outcome = Outcome::Failed;
            });
            guard.done = true;
            return status_response(
                code,
                &format!("fault proxy: injected {code} for {method} {path}"),
            );
        }
        Decision::Hold {
            at,
            reached,
            release,
        } => Some((at, reached, release)),
        Decision::Pass => None,
    };
    if let Some((HoldAt::Request, reached, release)) = &hold {
        reached.send_replace(true);
        release.notified().await;
    }
    st.unstalled().await;

    let mut headers = parts.headers.clone();
    for h in ["host", "content-length", "transfer-encoding", "connection"] {
        headers.remove(h);
    }
    let mut upstream_req = Request::builder()
        .method(parts.method.clone())
        .uri(path.as_str())
        .body(kube::client::Body::from(body))
        .expect("request");
    *upstream_req.headers_mut() = headers;
    st.update(index, |e| e.forwarded = Some(Instant::now()));
    // The upstream exchange runs on its own task: a request that left for the server goes
    // on when its client dies (as a request already on the wire may still be applied), and
    // its answer time is recorded, so a killed replica's last write has a real end.
    let upstream = {
        let st = st.clone();
        tokio::spawn(async move {
            let resp = st.upstream.send(upstream_req).await;
            if let Ok(r) = &resp {
                let code = r.status().as_u16();
                st.update(index, |e| {
                    e.answered = Some(Instant::now());
                    e.status = Some(code);
                });
            }
            resp
        })
    };
    let resp = match upstream.await.expect("the upstream exchange panicked") {
        Ok(r) => r,
        Err(e) => {
            st.update(index, |x| x.outcome = Outcome::Unreachable);
            guard.done = true;
            return status_response(502, &format!("fault proxy: upstream: {e}"));
        }
    };
    if let Some((HoldAt::Response, reached, release)) = &hold {
        reached.send_replace(true);
        release.notified().await;
    }
    st.unstalled().await;
    let (mut parts, body) = resp.into_parts();
    for h in ["content-length", "transfer-encoding", "connection"] {
        parts.headers.remove(h);
    }
    // Stream the body, each chunk waiting out a stall (a watch freezes, then goes on).
    let gate = st.clone();
    let chunks = Body::new(body).into_data_stream().then(move |chunk| {
        let gate = gate.clone();
        async move {
            gate.unstalled().await;
            chunk
        }
    });
    st.update(index, |e| e.outcome = Outcome::Answered);
    guard.done = true;
    Response::from_parts(parts, Body::from_stream(chunks))
}
