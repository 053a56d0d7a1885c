//! Calls the Canaries' webhooks (`spec.webhooks`): the payload, the URL and headers (from
//! the spec or a Secret in the Canary's namespace), the operator's address allow-list, and
//! what an answer means. When each is called, and what its answer does to the rollout, is
//! the rollout's business (`rollout::hooks_due`); `event` webhooks are told here, off the
//! reconcile, as each Event is recorded.
//!
//! One POST per call, never redirected (a 3xx is a refusal: a redirect could lead past
//! the allow-list), with the webhook's timeout. A call is not retried inside the call:
//! gates and pre-rollout hooks are called again at the next interval, a `rollout` hook's
//! failure fails its check, and post-rollout deliveries back off in status
//! (`rollout::POST_ROLLOUT_ATTEMPTS`). `event` deliveries are tried up to 3 times.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::api::{Canary, WebhookFormat, WebhookSpec, WebhookType};
use crate::metrics::SecretLookup;
use crate::policy::Policy;
use crate::rollout::HookAnswer;

/// The header that carries a delivery's key, `uid/revision/webhook`: the same for every
/// attempt of one delivery, so a receiver that must act once can tell repeats.
pub const DELIVERY_HEADER: &str = "serin-delivery";

/// `event` deliveries in flight at once; more are dropped (and logged), never queued
/// without bound.
const EVENTS_IN_FLIGHT: usize = 64;

/// Attempts at an `event` delivery.
const EVENT_ATTEMPTS: u32 = 3;

/// How much of an answer's body goes into the message.
const BODY_EXCERPT: usize = 200;

/// Counts calls by webhook type and outcome (`ok`, `refused`, `timeout`, `unreachable`,
/// `not_allowed`, `dropped`).
pub type Counter = Arc<dyn Fn(&'static str, &'static str) + Send + Sync>;

/// What one call is about, besides the Canary.
#[derive(Clone, Debug, Default)]
pub struct Occasion {
    /// The revision the call is about (a finished rollout's, for post-rollout).
    pub revision: Option<String>,
    /// How the rollout ended (post-rollout).
    pub result: Option<&'static str>,
    /// The Event told (event webhooks): type, reason, message.
    pub event: Option<(&'static str, &'static str, String)>,
}

/// Calls webhooks for the controller. Cheap to share.
pub struct Caller {
    http: reqwest::Client,
    secrets: Arc<dyn SecretLookup>,
    policy: Policy,
    count: Counter,
    events: Arc<Semaphore>,
}

impl Caller {
    /// A caller reading Secrets through `secrets`, calling only what `policy` allows.
    pub fn new(secrets: Arc<dyn SecretLookup>, policy: Policy, count: Counter) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("serin/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Caller {
            http,
            secrets,
            policy,
            count,
            events: Arc::new(Semaphore::new(EVENTS_IN_FLIGHT)),
        }
    }

    /// Calls each of `hooks` about `canary` at once, at `now`; one answer each, in order.
    pub async fn call_all(
        &self,
        canary: &Canary,
        hooks: &[WebhookSpec],
        occasion: &Occasion,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Vec<HookAnswer> {
        let calls = hooks.iter().map(|hook| async move {
            let post = hook.type_ == WebhookType::PostRollout;
            let occasion = if post {
                let owed = canary.status.as_ref().and_then(|s| s.post_rollout.as_ref());
                Occasion {
                    revision: owed.map(|p| p.revision.clone()),
                    result: owed.map(|p| p.result.as_str()),
                    ..occasion.clone()
                }
            } else {
                occasion.clone()
            };
            HookAnswer {
                name: hook.name.clone(),
                outcome: self.call(canary, hook, &occasion).await,
                at: now,
            }
        });
        futures::future::join_all(calls).await
    }

    /// One call of `hook` about `canary`: `Ok` for a 2xx answer, else why not in one line
    /// (never the URL, which may be secret).
    pub async fn call(
        &self,
        canary: &Canary,
        hook: &WebhookSpec,
        occasion: &Occasion,
    ) -> Result<(), String> {
        let kind = hook.type_.as_str();
        let (url, headers) = match self.target(canary, hook).await {
            Ok(t) => t,
            Err((outcome, why)) => {
                (self.count)(kind, outcome);
                return Err(why);
            }
        };
        let body = body(canary, hook, occasion).to_string();
        let timeout = hook.timeout();
        let sent = self
            .http
            .post(url)
            .headers(headers)
            .header("content-type", "application/json")
            .header(DELIVERY_HEADER, delivery_key(canary, hook, occasion))
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let (outcome, result) = match sent {
            Ok(resp) if resp.status().is_success() => ("ok", Ok(())),
            Ok(resp) => {
                let code = resp.status().as_u16();
                let text = excerpt(resp).await;
                let why = if text.is_empty() {
                    format!("answered {code}")
                } else {
                    format!("answered {code}: {text}")
                };
                ("refused", Err(why))
            }
            Err(e) if e.is_timeout() => (
                "timeout",
                Err(format!(
                    "no answer within {}s (spec.webhooks[].timeout)",
                    timeout.as_secs_f64()
                )),
            ),
            Err(e) => (
                "unreachable",
                Err(format!("could not be reached: {}", error_chain(&e))),
            ),
        };
        (self.count)(kind, outcome);
        result
    }

    /// Tells every `event` webhook of `canary` about an Event, with the status it was
    /// recorded with, off the caller's task: at most [`EVENTS_IN_FLIGHT`] at once (more are
    /// dropped), up to [`EVENT_ATTEMPTS`] attempts each.
    pub fn tell(
        self: &Arc<Self>,
        canary: &Canary,
        status: &crate::api::CanaryStatus,
        type_: &'static str,
        reason: &'static str,
        message: &str,
    ) {
        if !canary.spec.has_webhook(WebhookType::Event) {
            return;
        }
        let mut canary = canary.clone();
        canary.status = Some(status.clone());
        let canary = &canary;
        for hook in canary.spec.webhooks_of(WebhookType::Event) {
            let Ok(slot) = self.events.clone().try_acquire_owned() else {
                (self.count)(WebhookType::Event.as_str(), "dropped");
                tracing::warn!(canary = %canary.name_any(), webhook = %hook.name, "event webhook dropped: too many deliveries in flight");
                continue;
            };
            let (me, canary, hook) = (self.clone(), canary.clone(), hook.clone());
            let occasion = Occasion {
                event: Some((type_, reason, message.to_string())),
                ..Occasion::default()
            };
            tokio::spawn(async move {
                let mut pause = Duration::from_secs(1);
                for attempt in 1..=EVENT_ATTEMPTS {
                    match me.call(&canary, &hook, &occasion).await {
                        Ok(()) => break,
                        Err(why) => {
                            tracing::warn!(canary = %canary.name_any(), namespace = %canary.namespace().unwrap_or_default(), webhook = %hook.name, attempt, error = %why, "event webhook not delivered");
                        }
                    }
                    if attempt < EVENT_ATTEMPTS {
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                }
                drop(slot);
            });
        }
    }

    /// The URL and headers of `hook`: the spec's, overridden by its Secret's.
    async fn target(
        &self,
        canary: &Canary,
        hook: &WebhookSpec,
    ) -> Result<(reqwest::Url, HeaderMap), (&'static str, String)> {
        let not_allowed = |why: String| ("not_allowed", why);
        let mut url = hook.url.clone();
        let mut headers = HeaderMap::new();
        for h in &hook.headers {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_str(&h.value),
            ) else {
                return Err(not_allowed(format!(
                    "header {:?} cannot be sent (see serin validate)",
                    h.name
                )));
            };
            headers.insert(name, value);
        }
        let mut from_secret = false;
        if let Some(secret) = &hook.secret_ref {
            if !self.policy.read_secrets {
                return Err(not_allowed(
                    "this operator reads no Secrets (--no-read-secrets); secretRef cannot be used"
                        .into(),
                ));
            }
            let ns = canary.namespace().unwrap_or_default();
            let data = self
                .secrets
                .secret_data(&ns, &secret.name)
                .await
                .map_err(|e| ("unreachable", format!("secretRef: {e}")))?;
            for (key, value) in data {
                let text = String::from_utf8_lossy(&value).trim().to_string();
                if key == "url" {
                    url = Some(text);
                    from_secret = true;
                    continue;
                }
                let (Ok(name), Ok(mut value)) = (
                    HeaderName::from_bytes(key.as_bytes()),
                    HeaderValue::from_str(&text),
                ) else {
                    return Err(not_allowed(format!(
                        "key {key:?} of secret {ns}/{} cannot be sent as an HTTP header",
                        secret.name
                    )));
                };
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        }
        let where_ = if from_secret {
            "the url in its secretRef"
        } else {
            "url"
        };
        let Some(url) = url else {
            return Err(not_allowed(
                "has no url, and its secretRef holds no key `url`".into(),
            ));
        };
        let parsed = reqwest::Url::parse(&url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| not_allowed(format!("{where_} is not an http(s) URL")))?;
        if !self.policy.may_fetch(&url) {
            return Err(not_allowed(format!(
                "{where_} is not an address this operator may call (serin run --allow-address)"
            )));
        }
        Ok((parsed, headers))
    }
}

/// The delivery key of a call: `uid/revision/webhook`.
pub fn delivery_key(canary: &Canary, hook: &WebhookSpec, occasion: &Occasion) -> String {
    let revision = occasion
        .revision
        .clone()
        .or_else(|| canary.status.as_ref().and_then(|s| s.revision.clone()))
        .unwrap_or_default();
    format!(
        "{}/{revision}/{}",
        canary.metadata.uid.as_deref().unwrap_or_default(),
        hook.name
    )
}

/// The JSON body of a call (documented in docs/webhooks.md).
pub fn payload(canary: &Canary, hook: &WebhookSpec, occasion: &Occasion) -> Value {
    let status = canary.status.clone().unwrap_or_default();
    let revision = occasion.revision.clone().or(status.revision.clone());
    let mut body = json!({
        "name": canary.name_any(),
        "namespace": canary.namespace().unwrap_or_default(),
        "uid": canary.metadata.uid.clone().unwrap_or_default(),
        "webhook": hook.name,
        "type": hook.type_.as_str(),
        "phase": status.phase.as_str(),
        "revision": revision,
        "stableRevision": status.stable_revision,
        "canaryWeight": status.canary_weight,
        "primaryWeight": 100 - status.canary_weight.min(100),
        "step": status.step,
        "steps": canary.spec.steps,
        "failedChecks": status.failed_checks,
        "lastCheck": status.last_check,
        "metadata": hook.metadata,
    });
    if let Some(result) = occasion.result {
        body["result"] = json!(result);
    }
    if let Some((type_, reason, message)) = &occasion.event {
        body["event"] = json!({"type": type_, "reason": reason, "message": message});
    }
    body
}

/// What a call sends: Serin's payload, or for an `event` webhook with a `format` the
/// Slack or Teams message `serin run --notifications` would send.
fn body(canary: &Canary, hook: &WebhookSpec, occasion: &Occasion) -> Value {
    let kind = match hook.format {
        Some(WebhookFormat::Slack) => crate::notify::Kind::Slack,
        Some(WebhookFormat::Teams) => crate::notify::Kind::Teams,
        _ => return payload(canary, hook, occasion),
    };
    let Some((type_, reason, message)) = &occasion.event else {
        return payload(canary, hook, occasion);
    };
    let status = canary.status.clone().unwrap_or_default();
    crate::notify::Notice {
        reason,
        warning: *type_ == "Warning",
        namespace: canary.namespace().unwrap_or_default(),
        name: canary.name_any(),
        message: message.clone(),
        phase: status.phase.as_str(),
        canary_weight: status.canary_weight,
        revision: status.revision.clone(),
        time: chrono::Utc::now(),
    }
    .payload(kind)
}

/// The start of an answer's body, on one line.
async fn excerpt(mut resp: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < BODY_EXCERPT {
        match resp.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_EXCERPT)]).into_owned();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The error and its causes, without the URL.
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        parts.push("connection failed".into());
    }
    parts.dedup();
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StaticSecrets;
    use crate::policy::PolicyArgs;
    use axum::http::StatusCode;

    fn canary(hooks: serde_json::Value) -> Canary {
        let mut c: Canary = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
            "spec": {
                "backends": {"primary": "web-v1", "canary": "web-v2"},
                "service": {"port": 80},
                "router": {"gatewayApi": {"httpRoute": {"name": "web"}}},
                "analysis": {"metrics": [{"name": "e", "provider": {"prometheus": {"address": "http://p:9090"}}, "query": "vector(0)", "max": 1}]},
                "webhooks": hooks,
            },
            "status": {"phase": "Progressing", "revision": "web-v2", "stableRevision": "web-v1", "canaryWeight": 20, "step": 0},
        }))
        .unwrap();
        c.metadata.uid = Some("u-1".into());
        c
    }

    /// `/ok` answers 200, `/moved` redirects to `/ok`, `/fail` answers 500 with a long body.
    async fn server() -> String {
        let app = axum::Router::new()
            .route("/ok", axum::routing::post(|| async { StatusCode::OK }))
            .route(
                "/moved",
                axum::routing::post(|| async { (StatusCode::FOUND, [("location", "/ok")], "") }),
            )
            .route(
                "/fail",
                axum::routing::post(|| async {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("broken\n{}", "x".repeat(1000)),
                    )
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    fn caller(secrets: StaticSecrets, allow: &[&str]) -> Caller {
        let policy = PolicyArgs {
            allow_address: allow.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .policy();
        Caller::new(Arc::new(secrets), policy, Arc::new(|_, _| {}))
    }

    /// A 2xx is Ok; a redirect is not followed; a 500's body is cut to one short line; a
    /// URL from a Secret obeys the allow-list, and no message holds a URL.
    #[tokio::test]
    async fn answers_redirects_bodies_and_secret_urls() {
        let base = server().await;
        let c = canary(json!([
            {"name": "ok", "type": "rollout", "url": format!("{base}/ok")},
            {"name": "moved", "type": "rollout", "url": format!("{base}/moved")},
            {"name": "fail", "type": "rollout", "url": format!("{base}/fail")},
            {"name": "secret", "type": "rollout", "secretRef": {"name": "hook"}},
        ]));
        let secrets = StaticSecrets::none().with(
            "shop",
            "hook",
            [("url", "http://169.254.169.254/latest/meta-data")],
        );
        let allowed = format!("{base}/*");
        let caller = caller(secrets, &[&allowed]);
        let now = chrono::Utc::now();
        let answers = caller
            .call_all(&c, &c.spec.webhooks, &Occasion::default(), now)
            .await;
        let outcome = |name: &str| {
            answers
                .iter()
                .find(|a| a.name == name)
                .unwrap()
                .outcome
                .clone()
        };
        assert_eq!(outcome("ok"), Ok(()));
        assert_eq!(outcome("moved"), Err("answered 302".to_string()));
        let fail = outcome("fail").unwrap_err();
        assert!(fail.starts_with("answered 500: broken x"), "{fail}");
        assert!(fail.len() < 230, "{} bytes", fail.len());
        let secret = outcome("secret").unwrap_err();
        assert!(
            secret.contains("not an address this operator may call"),
            "{secret}"
        );
        assert!(!secret.contains("169.254"), "{secret}");
        assert!(answers.iter().all(|a| a.at == now));
    }

    /// The payload and the delivery key, for a check and for a post-rollout delivery.
    #[test]
    fn payload_and_delivery_key() {
        let c = canary(json!([
            {"name": "load", "type": "rollout", "url": "http://lt/", "metadata": {"cmd": "hey"}},
        ]));
        let hook = &c.spec.webhooks[0];
        let body = payload(&c, hook, &Occasion::default());
        assert_eq!(body["name"], "web");
        assert_eq!(body["namespace"], "shop");
        assert_eq!(body["uid"], "u-1");
        assert_eq!(body["type"], "rollout");
        assert_eq!(body["phase"], "Progressing");
        assert_eq!(body["revision"], "web-v2");
        assert_eq!(body["canaryWeight"], 20);
        assert_eq!(body["primaryWeight"], 80);
        assert_eq!(body["metadata"]["cmd"], "hey");
        assert!(body.get("result").is_none() && body.get("event").is_none());
        assert_eq!(
            delivery_key(&c, hook, &Occasion::default()),
            "u-1/web-v2/load"
        );
        let post = Occasion {
            revision: Some("web-v1".into()),
            result: Some("RolledBack"),
            event: None,
        };
        assert_eq!(payload(&c, hook, &post)["result"], "RolledBack");
        assert_eq!(payload(&c, hook, &post)["revision"], "web-v1");
        assert_eq!(delivery_key(&c, hook, &post), "u-1/web-v1/load");
    }
}
