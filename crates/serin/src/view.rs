//! The terminal view of a rollout: a frame per Canary redrawn in place with ANSI escapes when
//! standard output is a terminal, or one plain line per change (no escape codes) when it is
//! not (tests, CI, pipes). `serin demo` draws it; a kubectl plugin can draw the same.
//!
//! It only formats what its caller observed; it reads nothing itself.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::time::Instant;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt as _;

use crate::api::{Canary, CheckRecord, Phase, Verdict};
use crate::arms::{PerArm, Weights};
use crate::metrics::presets::{self, Kind};

/// Width of the weight bar, in cells.
const BAR: usize = 30;
/// Events shown in the frame.
const EVENTS_SHOWN: usize = 5;

/// A metric of the Canary: its name, unit and bounds.
#[derive(Clone, Debug)]
pub struct MetricInfo {
    /// `spec.analysis.metrics[].name`.
    pub name: String,
    /// `%` or `ms`.
    pub unit: &'static str,
    /// Lower bound.
    pub min: Option<f64>,
    /// Upper bound.
    pub max: Option<f64>,
}

/// What was seen of one Canary at one poll.
#[derive(Clone, Debug)]
pub struct Observed {
    /// `namespace/name`.
    pub canary: String,
    /// Status phase.
    pub phase: Phase,
    /// Status step (index into the steps).
    pub step: u32,
    /// `spec.steps`.
    pub steps: Vec<i32>,
    /// The weights on the VirtualRouter, as the data plane reads them.
    pub weights: Option<Weights>,
    /// Failed checks in this rollout.
    pub failed_checks: u32,
    /// `analysis.failureThreshold`.
    pub failure_threshold: u32,
    /// The last counted check.
    pub last_check: Option<CheckRecord>,
    /// The Canary's metrics.
    pub metrics: Vec<MetricInfo>,
    /// Requests and errors each arm has served, when known (the demo's simulator counts
    /// them).
    pub traffic: Option<PerArm<Served>>,
    /// The sequential judge's evidence (`status.evidence`), when it judges this rollout.
    pub evidence: Option<crate::api::EvidenceStatus>,
    /// The revision under analysis, or the stable one between rollouts.
    pub revision: Option<String>,
    /// When the rollout under way started.
    pub started: Option<DateTime<Utc>>,
    /// When the next check is due.
    pub next_check: Option<DateTime<Utc>>,
    /// What a gate holds the rollout for (`status.webhooks`), when one does.
    pub waiting: Option<String>,
}

impl Observed {
    /// What a Canary's spec and status say, with the weights as `weights` (the data plane's
    /// when the caller reads them, else the status's).
    pub fn of_canary(canary: &Canary, weights: Option<Weights>) -> Self {
        let status = canary.status.clone().unwrap_or_default();
        let metrics = canary
            .spec
            .analysis
            .metrics
            .iter()
            .map(|m| MetricInfo {
                name: m.name.clone(),
                unit: match m.preset.map(presets::kind) {
                    Some(Kind::LatencyP99) => "ms",
                    _ => "%",
                },
                min: m.min,
                max: m.max,
            })
            .collect();
        let in_rollout = status.phase.in_rollout();
        Observed {
            canary: format!(
                "{}/{}",
                canary.namespace().unwrap_or_default(),
                canary.name_any()
            ),
            phase: status.phase,
            step: status.step,
            steps: canary.spec.steps.clone(),
            weights: weights.or(Some(Weights::with_canary(status.canary_weight))),
            failed_checks: status.failed_checks,
            failure_threshold: canary.spec.analysis.failure_threshold,
            last_check: status.last_check.clone(),
            metrics,
            traffic: None,
            next_check: in_rollout
                .then(|| crate::rollout::next_check_at(&canary.spec, &status))
                .flatten(),
            started: status.rollout_started_at.filter(|_| in_rollout),
            revision: if in_rollout {
                status.revision.clone()
            } else {
                status.stable_revision.clone()
            },
            waiting: status
                .webhooks
                .as_ref()
                .filter(|w| w.waiting_for.is_some() && status.phase == Phase::Progressing)
                .map(|w| {
                    if w.message.is_empty() {
                        format!(
                            "waiting for {}",
                            w.waiting_for.as_deref().unwrap_or_default()
                        )
                    } else {
                        w.message.clone()
                    }
                }),
            evidence: status.evidence,
        }
    }
}

/// The Events about the Canary `name`, oldest first, as the view shows them.
pub fn event_lines(events: Vec<Event>, name: &str) -> Vec<EventLine> {
    let mut events: Vec<(i64, EventLine)> = events
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.involved_object.kind.as_deref() == Some("Canary")
        })
        .map(|e| {
            let ms = event_time(&e).map(|t| t.timestamp_millis()).unwrap_or(0);
            let time = DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%H:%M:%S").to_string())
                .unwrap_or_default();
            let line = EventLine {
                key: format!(
                    "{}/{}",
                    e.metadata.uid.unwrap_or_default(),
                    e.count.unwrap_or(1)
                ),
                time,
                type_: e.type_.unwrap_or_default(),
                reason: match e.count {
                    // kube's recorder folds a repeated reason into one Event with a count,
                    // keeping the first occurrence's message.
                    Some(n) if n > 1 => format!("{} ×{n}", e.reason.unwrap_or_default()),
                    _ => e.reason.unwrap_or_default(),
                },
                message: e.message.unwrap_or_default(),
            };
            (ms, line)
        })
        .collect();
    events.sort_by_key(|(ms, _)| *ms);
    events.into_iter().map(|(_, e)| e).collect()
}

/// When an Event last happened: the latest of its series, else its own times.
pub fn event_time(e: &Event) -> Option<DateTime<Utc>> {
    let ms = e
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0.as_millisecond()))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0.as_millisecond()))
        .or_else(|| e.event_time.as_ref().map(|t| t.0.as_millisecond()))
        .or_else(|| {
            e.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
        })?;
    DateTime::from_timestamp_millis(ms)
}

/// `1h02m`, `3m05s`, `42s`: a duration as people read it.
pub fn human_duration(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `revision abc · started 3m05s ago · next check in 20s`, of what is known.
fn timing_text(o: &Observed, now: DateTime<Utc>) -> String {
    let mut parts = Vec::new();
    if let Some(r) = &o.revision {
        parts.push(format!("revision {r}"));
    }
    if let Some(t) = o.started {
        parts.push(format!("started {} ago", human_duration(now - t)));
    }
    if let Some(w) = &o.waiting {
        parts.push(w.clone());
    }
    if let Some(t) = o.next_check {
        parts.push(if t > now {
            format!("next check in {}", human_duration(t - now))
        } else {
            "next check due".into()
        });
    }
    parts.join(" · ")
}

/// Requests an arm served, and how many of them failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests.
    pub requests: u64,
    /// Requests answered with an error (5xx).
    pub errors: u64,
}

/// One Kubernetes Event about the Canary.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    /// Identity (uid and count), so each is shown once.
    pub key: String,
    /// `HH:MM:SS`.
    pub time: String,
    /// Normal or Warning.
    pub type_: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// The view.
pub struct View {
    tty: bool,
    /// Terminal width: frame lines are cut to fit, since a wrapped line would throw off the
    /// redraw.
    width: usize,
    started: Instant,
    title: String,
    drawn: usize,
    last_line: String,
    seen: HashSet<String>,
    events: VecDeque<EventLine>,
    last: Option<Observed>,
}

impl View {
    /// A view that redraws in place when `tty`.
    pub fn new(tty: bool) -> Self {
        View {
            tty,
            width: if tty { terminal_width() } else { usize::MAX },
            started: Instant::now(),
            title: String::new(),
            drawn: 0,
            last_line: String::new(),
            seen: HashSet::new(),
            events: VecDeque::new(),
            last: None,
        }
    }

    fn elapsed(&self) -> String {
        format!("{:>6.1}s", self.started.elapsed().as_secs_f64())
    }

    /// Prints a line that stays (above the frame on a terminal).
    pub fn note(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            self.redraw(&mut out, Some(text));
        } else {
            let _ = writeln!(out, "[{}] {text}", self.elapsed());
        }
        let _ = out.flush();
    }

    /// Sets the frame's title (the scenario) and prints it once.
    pub fn title(&mut self, title: &str) {
        self.title = title.to_string();
        self.note(&format!("== {title}"));
    }

    /// Shows a new observation and any new Events.
    pub fn update(&mut self, observed: Observed, events: Vec<EventLine>) {
        let mut fresh = Vec::new();
        for e in events {
            if self.seen.insert(e.key.clone()) {
                fresh.push(e.clone());
                self.events.push_back(e);
                while self.events.len() > EVENTS_SHOWN {
                    self.events.pop_front();
                }
            }
        }
        let mut out = std::io::stdout().lock();
        if self.tty {
            self.last = Some(observed);
            self.redraw(&mut out, None);
        } else {
            let line = status_line(&observed);
            if line != self.last_line {
                let _ = writeln!(out, "[{}] {line}", self.elapsed());
                self.last_line = line;
            }
            for e in fresh {
                let _ = writeln!(
                    out,
                    "[{}] event {} {}: {}",
                    self.elapsed(),
                    e.type_,
                    e.reason,
                    e.message
                );
            }
            self.last = Some(observed);
        }
        let _ = out.flush();
    }

    /// Leaves the frame as it is and moves below it.
    pub fn finish(&mut self) {
        self.drawn = 0;
    }

    /// Overwrites the frame in place (line by line, so it does not flicker), with `note`
    /// printed above it to stay.
    fn redraw(&mut self, out: &mut impl Write, note: Option<&str>) {
        if self.drawn > 0 {
            // Back to the frame's first line.
            let _ = write!(out, "\x1b[{}F", self.drawn);
        }
        if let Some(note) = note {
            let _ = writeln!(out, "{note}\x1b[K");
        }
        let lines = match &self.last {
            Some(o) => frame(
                &self.title,
                self.started.elapsed().as_secs_f64(),
                o,
                &self.events,
            ),
            None => Vec::new(),
        };
        for l in &lines {
            let _ = writeln!(out, "{}\x1b[K", fit(l, self.width));
        }
        // Clear what is left of a longer previous frame.
        let _ = write!(out, "\x1b[J");
        self.drawn = lines.len();
    }
}

/// The terminal's width from `stty size` (80 when unknown).
fn terminal_width() -> usize {
    std::process::Command::new("stty")
        .arg("size")
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .filter(|w: &usize| *w >= 20)
        .unwrap_or(80)
}

/// `line` without its escape sequences (for output that is not a terminal).
pub fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Cuts `line` to `width − 1` visible characters; escape sequences do not count.
fn fit(line: &str, width: usize) -> String {
    let mut out = String::with_capacity(line.len());
    let mut visible = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for e in chars.by_ref() {
                out.push(e);
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if visible + 1 >= width {
            out.push_str("\x1b[0m");
            break;
        }
        out.push(c);
        visible += 1;
    }
    out
}

fn weights_text(w: Option<Weights>) -> String {
    match w {
        Some(w) => format!("primary {}% / canary {}%", w.primary(), w.canary()),
        None => "weights unknown".into(),
    }
}

fn bar(w: Option<Weights>) -> String {
    let canary = w.map(|w| usize::from(w.canary())).unwrap_or(0);
    let cells = (canary * BAR + 50) / 100;
    format!(
        "primary {}{} canary",
        "█".repeat(BAR - cells),
        "░".repeat(cells)
    )
}

fn value_text(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit == "%" => format!("{v:.2} %"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "no value".into(),
    }
}

fn bounds_text(m: &MetricInfo) -> String {
    match (m.min, m.max) {
        (Some(lo), Some(hi)) => format!("in [{lo}, {hi}]"),
        (None, Some(hi)) => format!("max {hi}"),
        (Some(lo), None) => format!("min {lo}"),
        (None, None) => String::new(),
    }
}

/// A sequential metric's evidence: `e 0.8, 340 of 1,200 canary requests`.
fn evidence_text(o: &Observed, metric: &str) -> Option<String> {
    let ev = o.evidence.as_ref()?;
    let m = ev.metrics.iter().find(|m| m.metric == metric)?;
    Some(format!(
        "e {}, {} of {} canary requests",
        crate::analysis::display_value(crate::analysis::sequential::e_values(m, true).relative),
        m.canary_requests.round(),
        m.required_canary_requests
    ))
}

/// The metrics of the last check: `name value (bound) verdict`.
fn metric_results(o: &Observed) -> Vec<(String, String, String, Option<Verdict>)> {
    o.metrics
        .iter()
        .map(|m| {
            let result = o
                .last_check
                .as_ref()
                .and_then(|c| c.results.iter().find(|r| r.metric == m.name));
            (
                m.name.clone(),
                result
                    .map(|r| value_text(r.value, m.unit))
                    .unwrap_or_else(|| "-".into()),
                bounds_text(m),
                result.map(|r| r.verdict),
            )
        })
        .collect()
}

fn step_text(o: &Observed) -> String {
    let steps: Vec<String> = o.steps.iter().map(i32::to_string).collect();
    format!(
        "step {}/{} ({})",
        (o.step as usize + 1).min(o.steps.len()),
        o.steps.len(),
        steps.join(" → ")
    )
}

/// The one-line form, for output that is not a terminal.
pub fn status_line(o: &Observed) -> String {
    let metrics: Vec<String> = metric_results(o)
        .into_iter()
        .map(|(name, value, bound, verdict)| {
            let verdict = verdict.map(Verdict::as_str).unwrap_or("-");
            match evidence_text(o, &name) {
                Some(e) => format!("{name} {value} ({bound}) {verdict} [{e}]"),
                None => format!("{name} {value} ({bound}) {verdict}"),
            }
        })
        .collect();
    format!(
        "{} {} {} | {} | failed checks {}/{} | {}",
        o.canary,
        o.phase.as_str(),
        step_text(o),
        weights_text(o.weights),
        o.failed_checks,
        o.failure_threshold,
        metrics.join(", ")
    )
}

fn colour(verdict: Option<Verdict>) -> (&'static str, &'static str) {
    match verdict {
        Some(Verdict::Pass) => ("\x1b[32m", "Pass"),
        Some(Verdict::Fail) => ("\x1b[31m", "Fail"),
        Some(Verdict::Inconclusive) => ("\x1b[33m", "Inconclusive"),
        Some(Verdict::Waiting) => ("\x1b[36m", "Waiting"),
        None => ("", "-"),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The terminal frame: a title line, then [`describe`].
fn frame(title: &str, elapsed: f64, o: &Observed, events: &VecDeque<EventLine>) -> Vec<String> {
    let events: Vec<EventLine> = events.iter().cloned().collect();
    let mut lines = vec![format!(
        "\x1b[1m{}\x1b[0m  {elapsed:.1}s",
        truncate(title, 100)
    )];
    lines.extend(describe(o, &events, Utc::now()));
    lines
}

/// A Canary as the view shows it, with colour escapes (see [`plain`]): phase and step,
/// the weights as a bar, revision and timing, failed checks, each metric's last value
/// against its bound with its verdict, and `events`.
pub fn describe(o: &Observed, events: &[EventLine], now: DateTime<Utc>) -> Vec<String> {
    let mut lines = vec![
        format!(
            "{}  \x1b[1m{}\x1b[0m  {}",
            o.canary,
            o.phase.as_str(),
            step_text(o)
        ),
        format!("  {}   {}", bar(o.weights), weights_text(o.weights)),
    ];
    let timing = timing_text(o, now);
    if !timing.is_empty() {
        lines.push(format!("  {timing}"));
    }
    lines.push(format!(
        "  failed checks {} of {} allowed{}",
        o.failed_checks,
        o.failure_threshold,
        o.last_check
            .as_ref()
            .map(|c| format!(
                "   last check {} {}",
                c.time.format("%H:%M:%S"),
                c.verdict.as_str()
            ))
            .unwrap_or_default()
    ));
    for (name, value, bound, verdict) in metric_results(o) {
        let (c, v) = colour(verdict);
        let evidence = evidence_text(o, &name).unwrap_or_default();
        lines.push(format!(
            "  {name:<14} {value:>10}   {bound:<10} {c}{v:<12}\x1b[0m {evidence}"
        ));
    }
    if let Some(t) = &o.traffic {
        lines.push(format!(
            "  traffic  primary {} req / {} err   canary {} req / {} err",
            t.primary.requests, t.primary.errors, t.canary.requests, t.canary.errors
        ));
    }
    lines.push("  events".into());
    for e in events {
        let (on, off) = if e.type_ == "Warning" {
            ("\x1b[33m", "\x1b[0m")
        } else {
            ("", "")
        };
        lines.push(format!(
            "    {} {on}{:<7}{off} {:<16} {}",
            e.time,
            e.type_,
            e.reason,
            truncate(&e.message, 80)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            canary: "appmesh-demo/colorteller".into(),
            phase: Phase::Progressing,
            step: 1,
            steps: vec![20, 50, 100],
            weights: Some(Weights::with_canary(50)),
            failed_checks: 0,
            failure_threshold: 2,
            last_check: None,
            metrics: vec![MetricInfo {
                name: "error-rate".into(),
                unit: "%",
                min: None,
                max: Some(1.0),
            }],
            traffic: None,
            evidence: None,
            revision: Some("5f1c".into()),
            started: None,
            next_check: None,
            waiting: None,
        }
    }

    /// What a gate holds the rollout for is shown with the timing.
    #[test]
    fn a_waiting_gate_is_shown() {
        let mut o = observed();
        o.waiting = Some("waiting for confirm-promotion: release: answered 403".into());
        let text = describe(&o, &[], Utc::now()).join("\n");
        assert!(
            plain(&text).contains("waiting for confirm-promotion: release: answered 403"),
            "{text}"
        );
    }

    /// The plain line names the phase, the step and both weights, without escape codes.
    #[test]
    fn status_line_is_plain() {
        let line = status_line(&observed());
        assert!(line.contains("Progressing step 2/3"), "{line}");
        assert!(line.contains("primary 50% / canary 50%"), "{line}");
        assert!(!line.contains('\x1b'), "{line}");
    }

    /// Frame lines are cut to the terminal's width without counting escape codes.
    #[test]
    fn fit_ignores_escape_codes() {
        assert_eq!(fit("\x1b[1mabcdef\x1b[0m", 5), "\x1b[1mabcd\x1b[0m");
        assert_eq!(fit("abc", 80), "abc");
    }

    /// The bar splits its cells by the weights.
    #[test]
    fn bar_follows_the_weights() {
        let b = bar(Some(Weights::with_canary(20)));
        assert_eq!(b.matches('░').count(), 6);
        assert_eq!(b.matches('█').count(), 24);
    }
}
