//! An HTTP proxy on 127.0.0.1 for the router tests. It forwards every request to one
//! upstream, records `METHOD path?query` in order, can answer the next requests of a method
//! with an injected error or run a hook before forwarding one (to simulate a concurrent
//! writer), and can rewrite responses.
//!
//! The upstream is either a Kubernetes API server reached through an authenticated
//! `kube::Client` ([`Proxy::kube`]: the real kube-apiserver with TLS and the admin's client
//! certificate, or the in-memory one), or a plain-HTTP base URL reached with reqwest
//! ([`Proxy::start`], for moto). The router under test talks plain HTTP to the proxy with
//! no credentials of its own; the proxy adds them by forwarding through the admin's client.
//!
//! [`normalise_moto`] is the App Mesh rewrite: moto 5.2 differs from AWS in exactly two ways
//! that the Rust SDK notices, and the rewrite fixes only those:
//! 1. `createdAt`/`lastUpdatedAt` are strings like `22/11/2026, 03:44:56`; AWS sends epoch
//!    seconds (a JSON number), which is all the SDK accepts. They become epoch seconds.
//! 2. A missing mesh, virtual router or route is `400` with `MeshNotFound`,
//!    `VirtualRouterNotFound` or `RouteNotFound`; AWS answers `404 NotFoundException`. The
//!    status, the `X-Amzn-ErrorType` header and `__type` become AWS's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::Value;

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A response rewrite: (status, headers, body) in, (status, headers, body) out.
pub type Rewrite = Arc<dyn Fn(u16, HeaderMap, Bytes) -> (u16, HeaderMap, Bytes) + Send + Sync>;

enum Fault {
    Answer {
        method: String,
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    Before {
        method: String,
        hook: Hook,
    },
}

impl Fault {
    fn method(&self) -> &str {
        match self {
            Fault::Answer { method, .. } | Fault::Before { method, .. } => method,
        }
    }
}

#[derive(Default)]
struct State {
    log: Vec<String>,
    faults: VecDeque<Fault>,
}

/// Where the proxy forwards to.
#[derive(Clone)]
enum Upstream {
    /// A plain-HTTP base URL (moto).
    Http { http: reqwest::Client, base: String },
    /// A Kubernetes API server, through a client that carries its credentials.
    Kube(kube::Client),
}

/// A running proxy.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy to `upstream` (a plain-HTTP base URL), rewriting responses with
    /// `rewrite`.
    pub async fn start(upstream: &str, rewrite: Option<Rewrite>) -> Proxy {
        let upstream = Upstream::Http {
            http: reqwest::Client::new(),
            base: upstream.trim_end_matches('/').to_string(),
        };
        Proxy::serve(upstream, rewrite).await
    }

    /// Starts a proxy to the Kubernetes API server of `client`, which adds its credentials
    /// (TLS and the client certificate of the real server) to every forwarded request.
    pub async fn kube(client: kube::Client) -> Proxy {
        Proxy::serve(Upstream::Kube(client), None).await
    }

    async fn serve(upstream: Upstream, rewrite: Option<Rewrite>) -> Proxy {
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let (st, upstream, rewrite) = (st.clone(), upstream.clone(), rewrite.clone());
            async move { forward(st, upstream, rewrite, req).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Proxy { url, state, task }
    }

    /// The requests seen so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("lock").log.clone()
    }

    /// The requests seen so far whose method is `method`.
    pub fn requests_of(&self, method: &str) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.starts_with(&format!("{method} ")))
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.state.lock().expect("lock").log.clear();
    }

    /// Answers the next `count` requests with `method` with this status and body instead of
    /// forwarding them.
    pub fn answer(
        &self,
        method: &str,
        count: usize,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) {
        let mut st = self.state.lock().expect("lock");
        for _ in 0..count {
            st.faults.push_back(Fault::Answer {
                method: method.into(),
                status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.into(),
            });
        }
    }

    /// Runs `hook` before forwarding the next request with `method`.
    pub fn before<F, Fut>(&self, method: &str, hook: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.state
            .lock()
            .expect("lock")
            .faults
            .push_back(Fault::Before {
                method: method.into(),
                hook: Box::new(move || Box::pin(hook())),
            });
    }
}

async fn forward(
    st: Arc<Mutex<State>>,
    upstream: Upstream,
    rewrite: Option<Rewrite>,
    req: Request<Body>,
) -> Response<Body> {
    let method = req.method().clone();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let fault = {
        let mut st = st.lock().expect("lock");
        st.log.push(format!("{method} {pq}"));
        let pos = st.faults.iter().position(|f| f.method() == method.as_str());
        pos.and_then(|i| st.faults.remove(i))
    };
    match fault {
        Some(Fault::Answer {
            status,
            headers,
            body,
            ..
        }) => {
            let mut resp = Response::builder().status(status);
            for (k, v) in headers {
                resp = resp.header(k, v);
            }
            return resp.body(Body::from(body)).expect("response");
        }
        Some(Fault::Before { hook, .. }) => hook().await,
        None => {}
    }
    for h in ["host", "content-length", "transfer-encoding", "connection"] {
        headers.remove(h);
    }
    let sent = match upstream {
        Upstream::Http { http, base } => send_http(&http, &base, method, &pq, headers, body).await,
        Upstream::Kube(client) => send_kube(&client, method, &pq, headers, body).await,
    };
    let (status, mut headers, bytes) = match sent {
        Ok(answer) => answer,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("the proxy could not forward {pq}: {e}")))
                .expect("response");
        }
    };
    let (status, mut headers, bytes) = match &rewrite {
        Some(r) => r(status, headers, bytes),
        None => {
            headers.remove("content-length");
            (status, headers, bytes)
        }
    };
    for h in ["content-length", "transfer-encoding", "connection"] {
        headers.remove(h);
    }
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = StatusCode::from_u16(status).expect("status");
    *out.headers_mut() = headers;
    out
}

type Answer = (u16, HeaderMap, Bytes);

async fn send_http(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    pq: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, String> {
    let resp = http
        .request(method, format!("{base}{pq}"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    Ok((status, headers, bytes))
}

/// Forwards through `client`: its middleware puts the request under the server's URL and
/// adds the credentials; `send` hands back the raw response, error statuses included.
async fn send_kube(
    client: &kube::Client,
    method: Method,
    pq: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, String> {
    let mut req = Request::builder()
        .method(method)
        .uri(pq)
        .body(kube::client::Body::from(body))
        .map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    let resp = client.send(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect_bytes().await.map_err(|e| e.to_string())?;
    Ok((parts.status.as_u16(), parts.headers, bytes))
}

/// The App Mesh normalisation described in the module docs.
pub fn normalise_moto(status: u16, mut headers: HeaderMap, body: Bytes) -> (u16, HeaderMap, Bytes) {
    let not_found = ["MeshNotFound", "VirtualRouterNotFound", "RouteNotFound"];
    let error_type = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Ok(mut json) = serde_json::from_slice::<Value>(&body) else {
        return (status, headers, body);
    };
    let mut status = status;
    if let Some(t) = error_type
        && not_found.contains(&t.as_str())
    {
        status = 404;
        headers.insert(
            "x-amzn-errortype",
            HeaderValue::from_static("NotFoundException"),
        );
        json["__type"] = Value::String("NotFoundException".into());
    }
    fix_times(&mut json);
    let bytes = Bytes::from(serde_json::to_vec(&json).expect("json"));
    (status, headers, bytes)
}

fn fix_times(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if (k == "createdAt" || k == "lastUpdatedAt")
                    && let Some(s) = v.as_str()
                    && let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%d/%m/%Y, %H:%M:%S")
                {
                    *v = Value::from(t.and_utc().timestamp());
                } else {
                    fix_times(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(fix_times),
        _ => {}
    }
}
