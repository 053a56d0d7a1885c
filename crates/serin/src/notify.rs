//! Notifications: what a team's chat channel hears about rollouts. `serin run
//! --notifications FILE` names the receivers — Slack-compatible incoming webhooks,
//! Microsoft Teams (Workflows) webhooks and plain JSON POSTs — and which Events each hears:
//! `RolloutStarted`, `StepAdvanced`, `Promoted`, `RolledBack` (which covers aborts) and
//! `Invalid` by default.
//!
//! A notification is queued after the decision it reports was recorded (as its Event is),
//! never awaited: a receiver that hangs, fails or is down delays no rollout and no rollback.
//! One task delivers for every Canary, each receiver with its own rate limit; a failed
//! delivery is retried a few times, then counted as failed
//! (`serin_notifications_total{receiver, outcome}`) and logged.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use crate::rollout::reasons;

/// The Events a receiver hears unless its `events` says otherwise.
pub const DEFAULT_EVENTS: [&str; 5] = [
    reasons::ROLLOUT_STARTED,
    reasons::STEP_ADVANCED,
    reasons::PROMOTED,
    reasons::ROLLED_BACK,
    reasons::INVALID,
];

/// Notifications waiting for delivery; more are dropped (and counted) rather than held.
const QUEUE: usize = 4096;
/// Deliveries in flight at once, across receivers.
const IN_FLIGHT: usize = 32;
/// Attempts per notification (the first and two retries).
const ATTEMPTS: u32 = 3;
/// The pause before the first retry; doubled before the next.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The `--notifications` file.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where notifications go.
    #[serde(default)]
    pub receivers: Vec<Receiver>,
}

/// One receiver of notifications.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Receiver {
    /// Its name, in metrics and logs (the URL never is: it is a credential).
    pub name: String,
    /// The payload it understands.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Where to POST. Slack and Teams webhook URLs are credentials: keep the file in a
    /// Secret (the chart does).
    pub url: String,
    /// The Event reasons it hears (default [`DEFAULT_EVENTS`]; `Warning` for every
    /// Warning Event).
    #[serde(default)]
    pub events: Vec<String>,
    /// Only Canaries in these namespaces (default: all).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Notifications per minute at most; more are dropped and counted (default 30).
    #[serde(default = "default_per_minute")]
    pub per_minute: u32,
    /// Seconds an attempt may take (default 5).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

fn default_per_minute() -> u32 {
    30
}

fn default_timeout() -> u64 {
    5
}

/// The payload a receiver gets.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A Slack incoming webhook (or a compatible one: Mattermost, Rocket.Chat): `{"text"}`.
    Slack,
    /// A Microsoft Teams Workflows webhook: a message with an Adaptive Card.
    Teams,
    /// Any HTTP endpoint: the notification as JSON (see [`Notice::json`]).
    Webhook,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Slack => "slack",
            Kind::Teams => "teams",
            Kind::Webhook => "webhook",
        }
    }
}

/// Reads and checks a `--notifications` file: one message naming the field and the fix.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--notifications {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("--notifications {}: {e}", path.display()))
}

/// Parses and checks a notifications config.
pub fn parse(text: &str) -> Result<Config, String> {
    let de = serde_norway::Deserializer::from_str(text);
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        format!(
            "{}: {}; see docs/notifications.md for the fields",
            if path == "." { "the file".into() } else { path },
            e.inner()
        )
    })?;
    let mut names = std::collections::HashSet::new();
    for (i, r) in config.receivers.iter().enumerate() {
        let field = |f: &str| format!("receivers[{i}].{f}");
        if r.name.trim().is_empty() {
            return Err(format!(
                "{} is empty: name the receiver, for example team-slack",
                field("name")
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(format!(
                "{}: {:?} is used twice: give each receiver its own name",
                field("name"),
                r.name
            ));
        }
        match reqwest::Url::parse(&r.url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {}
            _ => {
                return Err(format!(
                    "{} is not an http(s) URL: paste the webhook URL the chat tool gave you, starting with https://",
                    field("url")
                ));
            }
        }
        for (j, e) in r.events.iter().enumerate() {
            if e != "Warning" && !crate::rollout::reasons::ALL.contains(&e.as_str()) {
                return Err(format!(
                    "{}: {e:?} is not an Event reason Serin emits: use one of {} or Warning",
                    field(&format!("events[{j}]")),
                    crate::rollout::reasons::ALL.join(", ")
                ));
            }
        }
        if r.per_minute == 0 {
            return Err(format!(
                "{} is 0: allow at least 1 notification per minute, or remove the receiver",
                field("perMinute")
            ));
        }
        if !(1..=60).contains(&r.timeout_seconds) {
            return Err(format!(
                "{} is {}: use 1 to 60 seconds",
                field("timeoutSeconds"),
                r.timeout_seconds
            ));
        }
    }
    Ok(config)
}

/// One thing to tell the receivers: an Event Serin recorded about a Canary.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// The Event's reason.
    pub reason: &'static str,
    /// Whether the Event is a Warning.
    pub warning: bool,
    /// The Canary's namespace.
    pub namespace: String,
    /// The Canary's name.
    pub name: String,
    /// The Event's message.
    pub message: String,
    /// The Canary's phase after the decision.
    pub phase: &'static str,
    /// The canary's weight after the decision.
    pub canary_weight: u8,
    /// The revision under analysis or last analysed.
    pub revision: Option<String>,
    /// When it was recorded.
    pub time: DateTime<Utc>,
}

impl Notice {
    /// The generic webhook's payload.
    pub fn json(&self) -> Value {
        json!({
            "reason": self.reason,
            "type": if self.warning { "Warning" } else { "Normal" },
            "namespace": self.namespace,
            "name": self.name,
            "message": self.message,
            "phase": self.phase,
            "canaryWeight": self.canary_weight,
            "primaryWeight": 100 - self.canary_weight.min(100),
            "revision": self.revision,
            "time": self.time,
        })
    }

    /// One line for people.
    fn line(&self) -> String {
        format!(
            "{}/{} {}: {} (primary {}% / canary {}%{})",
            self.namespace,
            self.name,
            self.reason,
            self.message,
            100 - self.canary_weight.min(100),
            self.canary_weight,
            self.revision
                .as_deref()
                .map(|r| format!(", revision {r}"))
                .unwrap_or_default()
        )
    }

    /// The body `kind` expects.
    pub fn payload(&self, kind: Kind) -> Value {
        match kind {
            Kind::Slack => {
                let mark = match (self.reason, self.warning) {
                    (reasons::PROMOTED, _) => ":white_check_mark:",
                    (_, true) => ":warning:",
                    _ => ":arrow_forward:",
                };
                json!({"text": format!("{mark} {}", self.line())})
            }
            Kind::Teams => json!({
                "type": "message",
                "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            {"type": "TextBlock", "size": "Medium", "weight": "Bolder",
                             "color": if self.warning { "Attention" } else if self.reason == reasons::PROMOTED { "Good" } else { "Default" },
                             "text": format!("{}/{} {}", self.namespace, self.name, self.reason)},
                            {"type": "TextBlock", "wrap": true, "text": self.message},
                            {"type": "FactSet", "facts": [
                                {"title": "Phase", "value": self.phase},
                                {"title": "Weights", "value": format!("primary {}% / canary {}%", 100 - self.canary_weight.min(100), self.canary_weight)},
                                {"title": "Revision", "value": self.revision.clone().unwrap_or_else(|| "-".into())},
                            ]}
                        ]
                    }
                }]
            }),
            Kind::Webhook => self.json(),
        }
    }
}

/// A receiver's rate limit: a bucket of `per_minute` tokens refilled evenly.
struct Bucket {
    tokens: f64,
    capacity: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Bucket {
            tokens: f64::from(per_minute),
            capacity: f64::from(per_minute),
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * self.capacity / 60.0;
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts deliveries by receiver and outcome.
pub type Counter = Arc<dyn Fn(&str, &'static str) + Send + Sync>;

/// The queue into the delivery task. Cheap to clone; sending never waits.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Notice>>,
    count: Counter,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl Notifier {
    /// A notifier that tells no one.
    pub fn none() -> Self {
        Notifier {
            tx: None,
            count: Arc::new(|_, _| {}),
        }
    }

    /// Starts the delivery task for `config`'s receivers (none: a notifier that tells no
    /// one); `count` counts each delivery's outcome.
    pub fn start(config: Config, count: Counter) -> Self {
        if config.receivers.is_empty() {
            return Notifier::none();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver_all(config, rx, count.clone()));
        Notifier {
            tx: Some(tx),
            count,
        }
    }

    /// Queues `notice`; when the queue is full it is dropped and counted.
    pub fn send(&self, notice: Notice) {
        if let Some(tx) = &self.tx
            && tx.try_send(notice).is_err()
        {
            (self.count)("*", "dropped");
        }
    }
}

/// Whether `r` hears `notice`.
fn hears(r: &Receiver, notice: &Notice) -> bool {
    let event = if r.events.is_empty() {
        DEFAULT_EVENTS.contains(&notice.reason)
    } else {
        r.events
            .iter()
            .any(|e| e == notice.reason || (e == "Warning" && notice.warning))
    };
    event && (r.namespaces.is_empty() || r.namespaces.contains(&notice.namespace))
}

async fn deliver_all(config: Config, mut rx: mpsc::Receiver<Notice>, count: Counter) {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "notifications: cannot build the HTTP client; none will be sent");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut buckets: HashMap<String, Bucket> = config
        .receivers
        .iter()
        .map(|r| (r.name.clone(), Bucket::new(r.per_minute)))
        .collect();
    let receivers: Vec<Arc<Receiver>> = config.receivers.into_iter().map(Arc::new).collect();
    while let Some(notice) = rx.recv().await {
        let notice = Arc::new(notice);
        for r in receivers.iter().filter(|r| hears(r, &notice)) {
            let allowed = buckets
                .get_mut(&r.name)
                .is_some_and(|b| b.take(Instant::now()));
            if !allowed {
                count(&r.name, "rate_limited");
                tracing::warn!(receiver = %r.name, reason = notice.reason, "notification dropped: over the receiver's perMinute");
                continue;
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (http, r, notice, count) = (http.clone(), r.clone(), notice.clone(), count.clone());
            tokio::spawn(async move {
                let outcome = deliver(&http, &r, &notice).await;
                count(&r.name, outcome);
                drop(slot);
            });
        }
    }
}

/// Posts `notice` to `r`, retrying errors and 5xx answers: `delivered` or `failed`.
async fn deliver(http: &reqwest::Client, r: &Receiver, notice: &Notice) -> &'static str {
    let body = notice.payload(r.kind).to_string();
    let mut pause = RETRY_AFTER;
    for attempt in 1..=ATTEMPTS {
        let sent = http
            .post(&r.url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("serin/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(r.timeout_seconds))
            .body(body.clone())
            .send()
            .await;
        let why = match sent {
            Ok(resp) if resp.status().is_success() => return "delivered",
            // A 4xx will not change by asking again (a revoked or mistyped URL).
            Ok(resp) if resp.status().is_client_error() => {
                tracing::warn!(receiver = %r.name, kind = r.kind.as_str(), status = resp.status().as_u16(), "notification refused; check the receiver's url");
                return "failed";
            }
            Ok(resp) => format!("answered {}", resp.status().as_u16()),
            Err(e) if e.is_timeout() => format!("no answer within {}s", r.timeout_seconds),
            Err(e) => format!("could not connect ({})", e.without_url()),
        };
        tracing::warn!(receiver = %r.name, kind = r.kind.as_str(), attempt, error = %why, "notification not delivered");
        if attempt < ATTEMPTS {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    "failed"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(reason: &'static str, warning: bool) -> Notice {
        Notice {
            reason,
            warning,
            namespace: "shop".into(),
            name: "web".into(),
            message: "revision web-v2 rolled back: error-rate 4.1% above max 1".into(),
            phase: "Failed",
            canary_weight: 0,
            revision: Some("web-v2".into()),
            time: "2026-12-07T10:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn a_config_parses_with_defaults() {
        let c = parse(
            "receivers:\n- {name: team, type: slack, url: 'https://hooks.slack.com/services/T/B/x'}\n- {name: ops, type: webhook, url: 'http://127.0.0.1:9/h', events: [RolledBack, Warning], namespaces: [shop], perMinute: 5, timeoutSeconds: 2}\n",
        )
        .unwrap();
        assert_eq!(c.receivers.len(), 2);
        assert_eq!(c.receivers[0].per_minute, 30);
        assert_eq!(c.receivers[0].timeout_seconds, 5);
        assert_eq!(c.receivers[1].kind, Kind::Webhook);
    }

    /// Each mistake gets one message naming the field and the fix.
    #[test]
    fn mistakes_name_the_field_and_the_fix() {
        for (text, field, fix) in [
            (
                "receivers:\n- {name: a, type: discord, url: 'https://x'}\n",
                "receivers[0].type",
                "unknown variant",
            ),
            (
                "receivers:\n- {name: a, type: slack, url: 'hooks.slack.com/x'}\n",
                "receivers[0].url",
                "starting with https://",
            ),
            (
                "receivers:\n- {name: a, type: slack, url: 'https://x', events: [Promotd]}\n",
                "receivers[0].events[0]",
                "Promoted",
            ),
            (
                "receivers:\n- {name: a, type: slack, url: 'https://x'}\n- {name: a, type: teams, url: 'https://y'}\n",
                "receivers[1].name",
                "its own name",
            ),
            (
                "receivers:\n- {name: a, type: slack, url: 'https://x', perMinute: 0}\n",
                "receivers[0].perMinute",
                "at least 1",
            ),
            (
                "receivers:\n- {name: a, type: slack, url: 'https://x', timeoutSeconds: 600}\n",
                "receivers[0].timeoutSeconds",
                "1 to 60",
            ),
            (
                "receivers:\n- {name: a, type: slack, url: 'https://x', colour: red}\n",
                "receivers[0]",
                "unknown field",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(field), "{field} not in {err}");
            assert!(err.contains(fix), "{fix} not in {err}");
        }
    }

    #[test]
    fn receivers_hear_their_events_and_namespaces() {
        let c = parse("receivers:\n- {name: all, type: slack, url: 'https://x'}\n- {name: warn, type: slack, url: 'https://y', events: [Warning], namespaces: [shop]}\n").unwrap();
        let (all, warn) = (&c.receivers[0], &c.receivers[1]);
        assert!(hears(all, &notice(reasons::PROMOTED, false)));
        assert!(
            !hears(all, &notice(reasons::CHECK_INCONCLUSIVE, true)),
            "not a default event"
        );
        assert!(hears(warn, &notice(reasons::CHECK_INCONCLUSIVE, true)));
        assert!(!hears(warn, &notice(reasons::PROMOTED, false)));
        let mut elsewhere = notice(reasons::ROLLED_BACK, true);
        elsewhere.namespace = "other".into();
        assert!(!hears(warn, &elsewhere));
    }

    #[test]
    fn payloads_fit_each_receiver() {
        let n = notice(reasons::ROLLED_BACK, true);
        let slack = n.payload(Kind::Slack);
        assert_eq!(
            slack["text"],
            ":warning: shop/web RolledBack: revision web-v2 rolled back: error-rate 4.1% above max 1 (primary 100% / canary 0%, revision web-v2)"
        );
        let teams = n.payload(Kind::Teams);
        assert_eq!(teams["type"], "message");
        let card = &teams["attachments"][0];
        assert_eq!(
            card["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(card["content"]["type"], "AdaptiveCard");
        assert_eq!(card["content"]["body"][0]["text"], "shop/web RolledBack");
        let hook = n.payload(Kind::Webhook);
        assert_eq!(hook["reason"], "RolledBack");
        assert_eq!(hook["type"], "Warning");
        assert_eq!(hook["primaryWeight"], 100);
        assert_eq!(hook["revision"], "web-v2");
    }

    #[test]
    fn the_bucket_allows_per_minute_then_refills() {
        let start = Instant::now();
        let mut b = Bucket::new(2);
        b.last = start;
        assert!(b.take(start));
        assert!(b.take(start));
        assert!(!b.take(start), "a third within the minute");
        assert!(
            b.take(start + Duration::from_secs(30)),
            "one token back after 30 s"
        );
        assert!(!b.take(start + Duration::from_secs(30)));
    }
}
