//! A protocol translator between the AWS SDK for Rust and moto.
//!
//! `aws-sdk-cloudwatch` (≥ 1.100) speaks Smithy RPC v2 CBOR: `POST
//! /service/<Service>/operation/<Operation>` with a CBOR body. moto 5.2 serves CloudWatch
//! only in the query and JSON (`X-Amz-Target`) protocols and answers the CBOR path with 404.
//! This server on 127.0.0.1 decodes the CBOR request, forwards it to moto as JSON 1.0 with
//! the same `Authorization` header (moto reads the region from it), and encodes moto's JSON
//! answer back to CBOR: numbers under `Values` become doubles and those under `Timestamp(s)`
//! become CBOR tag 1 (epoch seconds), as the Smithy protocol requires. Errors keep their
//! status and `__type`/`Message`.
//!
//! It also counts requests per operation and can answer the next requests with injected
//! errors (throttling, access denied) instead of forwarding them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, Response, StatusCode};
use ciborium::Value as Cbor;
use serde_json::Value as Json;

/// A canned error answer.
#[derive(Clone, Debug)]
pub struct Injected {
    /// HTTP status.
    pub status: u16,
    /// The `__type` error code, e.g. `Throttling`.
    pub code: String,
    /// The error message.
    pub message: String,
}

#[derive(Default)]
struct State {
    counts: HashMap<String, usize>,
    injected: VecDeque<Injected>,
    /// Number of queries in each GetMetricData request, in order.
    query_counts: Vec<usize>,
}

/// A running translator.
pub struct Translator {
    /// Base URL to give the SDK as its endpoint.
    pub url: String,
    state: Arc<Mutex<State>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Translator {
    /// Starts a translator in front of moto at `moto_url`, for the JSON service name
    /// `service` (CloudWatch: `GraniteServiceVersion20100801`).
    pub async fn start(moto_url: &str, service: &str) -> Translator {
        let state = Arc::new(Mutex::new(State::default()));
        let http = reqwest::Client::new();
        let moto = moto_url.trim_end_matches('/').to_string();
        let service = service.to_string();
        let st = state.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let st = st.clone();
            let http = http.clone();
            let moto = moto.clone();
            let service = service.clone();
            async move { handle(req, st, http, moto, service).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the translator on 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Translator {
            url,
            state,
            _server: server,
        }
    }

    /// Answers the next `times` requests with `error` instead of forwarding them.
    pub fn inject(&self, times: usize, error: Injected) {
        let mut s = self.state.lock().expect("translator state");
        for _ in 0..times {
            s.injected.push_back(error.clone());
        }
    }

    /// Requests received for `operation` so far (injected answers included).
    pub fn count(&self, operation: &str) -> usize {
        let s = self.state.lock().expect("translator state");
        s.counts.get(operation).copied().unwrap_or(0)
    }

    /// The number of MetricDataQueries in each GetMetricData request so far.
    pub fn query_counts(&self) -> Vec<usize> {
        self.state
            .lock()
            .expect("translator state")
            .query_counts
            .clone()
    }
}

fn cbor_response(status: u16, body: &Cbor) -> Response<Body> {
    let mut bytes = Vec::new();
    ciborium::into_writer(body, &mut bytes).expect("encode CBOR");
    Response::builder()
        .status(status)
        .header("content-type", "application/cbor")
        .header("smithy-protocol", "rpc-v2-cbor")
        .body(Body::from(bytes))
        .expect("build the response")
}

fn error_body(code: &str, message: &str) -> Cbor {
    Cbor::Map(vec![
        (Cbor::Text("__type".into()), Cbor::Text(code.into())),
        (Cbor::Text("message".into()), Cbor::Text(message.into())),
    ])
}

async fn handle(
    req: Request<Body>,
    state: Arc<Mutex<State>>,
    http: reqwest::Client,
    moto: String,
    service: String,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let headers: HeaderMap = req.headers().clone();
    let Some(operation) = path
        .strip_prefix(&format!("/service/{service}/operation/"))
        .map(str::to_string)
    else {
        return cbor_response(
            404,
            &error_body("UnknownOperation", &format!("no route {path}")),
        );
    };
    if headers
        .get("content-encoding")
        .is_some_and(|v| v != "identity")
    {
        return cbor_response(
            400,
            &error_body(
                "UnsupportedEncoding",
                "the translator does not decompress; disable request compression in the client",
            ),
        );
    }
    let body: Bytes = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => return cbor_response(400, &error_body("BadBody", &e.to_string())),
    };
    let decoded: Cbor = if body.is_empty() {
        Cbor::Map(vec![])
    } else {
        match ciborium::from_reader(body.as_ref()) {
            Ok(v) => v,
            Err(e) => {
                return cbor_response(400, &error_body("SerializationException", &e.to_string()));
            }
        }
    };
    let json = to_json(&decoded);
    let injected = {
        let mut s = state.lock().expect("translator state");
        *s.counts.entry(operation.clone()).or_default() += 1;
        if operation == "GetMetricData" {
            let n = json
                .get("MetricDataQueries")
                .and_then(Json::as_array)
                .map(Vec::len)
                .unwrap_or(0);
            s.query_counts.push(n);
        }
        s.injected.pop_front()
    };
    if let Some(e) = injected {
        return cbor_response(e.status, &error_body(&e.code, &e.message));
    }
    let mut forward = http
        .post(format!("{moto}/"))
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", format!("{service}.{operation}"))
        .body(json.to_string());
    for name in ["authorization", "x-amz-date", "x-amz-security-token"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            forward = forward.header(name, v);
        }
    }
    let answer = match forward.send().await {
        Ok(a) => a,
        Err(e) => return cbor_response(502, &error_body("MotoUnreachable", &e.to_string())),
    };
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap_or_default();
    match serde_json::from_str::<Json>(&text) {
        Ok(j) => cbor_response(status, &to_cbor(&j, None)),
        Err(_) => {
            // moto answers an unsupported request with an HTML 500 page.
            let first = text.lines().find(|l| l.contains("<p>")).unwrap_or(&text);
            cbor_response(
                if status == StatusCode::OK.as_u16() {
                    500
                } else {
                    status
                },
                &error_body("InternalFailure", &format!("moto: {}", first.trim())),
            )
        }
    }
}

fn to_json(v: &Cbor) -> Json {
    match v {
        Cbor::Null => Json::Null,
        Cbor::Bool(b) => Json::Bool(*b),
        Cbor::Integer(i) => {
            let n: i128 = (*i).into();
            Json::from(n as i64)
        }
        Cbor::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Cbor::Text(s) => Json::String(s.clone()),
        Cbor::Bytes(b) => Json::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        // Tag 1: epoch seconds. The JSON protocol writes timestamps as epoch-second numbers.
        Cbor::Tag(_, inner) => to_json(inner),
        Cbor::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Cbor::Map(pairs) => Json::Object(
            pairs
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Cbor::Text(s) => s.clone(),
                        other => format!("{other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        _ => Json::Null,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Hint {
    Double,
    Timestamp,
}

fn to_cbor(v: &Json, hint: Option<Hint>) -> Cbor {
    match v {
        Json::Null => Cbor::Null,
        Json::Bool(b) => Cbor::Bool(*b),
        Json::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            match hint {
                Some(Hint::Timestamp) => Cbor::Tag(1, Box::new(Cbor::Float(f))),
                Some(Hint::Double) => Cbor::Float(f),
                None => match n.as_i64() {
                    Some(i) => Cbor::Integer(i.into()),
                    None => Cbor::Float(f),
                },
            }
        }
        Json::String(s) => Cbor::Text(s.clone()),
        Json::Array(items) => Cbor::Array(items.iter().map(|i| to_cbor(i, hint)).collect()),
        Json::Object(map) => Cbor::Map(
            map.iter()
                .map(|(k, v)| {
                    let hint = match k.as_str() {
                        "Timestamps"
                        | "Timestamp"
                        | "StateUpdatedTimestamp"
                        | "AlarmConfigurationUpdatedTimestamp"
                        | "LastModified" => Some(Hint::Timestamp),
                        "Values" | "Value" | "Threshold" => Some(Hint::Double),
                        _ => None,
                    };
                    (Cbor::Text(k.clone()), to_cbor(v, hint))
                })
                .collect(),
        ),
    }
}
