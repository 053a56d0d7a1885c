//! `serin analyze`: evaluate a Canary's metrics once, now, and print each rendered query, its
//! value, the bound and the verdict; or, with `--from`, replay the analysis over a past window
//! through `rollout::decide` and print where the rollout would have advanced or rolled back.
//!
//! It joins the metric providers, the rollout rules and the routers' naming of the arms, as
//! the controller does, but needs no cluster.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};

use crate::analysis::judge;
use crate::api::{Canary, CanaryStatus, Phase, Verdict};
use crate::metrics::{CanaryContext, Evaluator, EvaluatorConfig, MetricEvaluation, StaticSecrets};
use crate::rollout::{self, Input, Observations, WorkloadState};
use crate::router;

/// Arguments of `serin analyze`.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// Manifest with the Canary (YAML; other documents are ignored).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// The Canary to analyse when the file holds several (its metadata.name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replay from this time: RFC 3339 (2024-05-01T10:00:00Z) or relative to now (-1h, -30m).
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// End of the replay (default now).
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Time between replayed decisions (default: analysis.interval). For example 30s, 1m.
    #[arg(long)]
    pub step: Option<String>,
    /// Evaluate at this time instead of now (RFC 3339 or relative).
    #[arg(long, allow_hyphen_values = true)]
    pub at: Option<String>,
}

/// Runs `serin analyze`.
pub async fn run_analyze(args: AnalyzeArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let canary = load_canary(&text, args.name.as_deref())?;
    let arms = router::data_plane_arms(&canary).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ctx = CanaryContext::of(&canary, arms);
    // `serin analyze` has no cluster access: a secretRef cannot be resolved.
    let evaluator = Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = Utc::now();
    match &args.from {
        None => {
            let at = match &args.at {
                Some(t) => parse_time(t, now)?,
                None => now,
            };
            let evals = evaluator.evaluate_detailed(&ctx, at).await;
            print!("{}", report(&ctx, &evals, at));
            if ctx.spec.analysis.has_sequential() {
                print!("{}", sequential_report(&evaluator, &ctx, at).await);
            }
            Ok(())
        }
        Some(from) => {
            let from = parse_time(from, now)?;
            let to = match &args.to {
                Some(t) => parse_time(t, now)?,
                None => now,
            };
            if to <= from {
                bail!(
                    "--to ({}) must be after --from ({})",
                    to.to_rfc3339(),
                    from.to_rfc3339()
                );
            }
            let step = match &args.step {
                Some(s) => parse_duration(s)?,
                None if ctx.spec.analysis.has_sequential() => ctx.spec.analysis.look_interval(),
                None => ctx.spec.analysis.interval.into(),
            };
            print!("{}", backtest(&evaluator, &ctx, from, to, step).await?);
            Ok(())
        }
    }
}

/// The Canary in `text` (named `name` when given), refusing invalid ones with the
/// validation messages.
pub fn load_canary(text: &str, name: Option<&str>) -> anyhow::Result<Canary> {
    let report = crate::api::check_manifests(text);
    if !report.problems.is_empty() {
        let lines: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        bail!("the Canary is invalid:\n{}", lines.join("\n"));
    }
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(doc)?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("Canary") {
            continue;
        }
        let canary: Canary = serde_json::from_value(value)?;
        if name.is_none() || canary.metadata.name.as_deref() == name {
            return Ok(canary);
        }
    }
    match name {
        Some(n) => bail!("no Canary named {n} in the file"),
        None => bail!("the file holds no Canary"),
    }
}

fn report(ctx: &CanaryContext, evals: &[MetricEvaluation], at: DateTime<Utc>) -> String {
    let mut out = format!(
        "Canary {}/{} evaluated at {}\n",
        ctx.namespace,
        ctx.name,
        at.to_rfc3339()
    );
    let mut verdicts = Vec::new();
    for (metric, e) in ctx.spec.analysis.metrics.iter().zip(evals) {
        let (verdict, message) = judge(metric, &e.outcome());
        verdicts.push(verdict);
        out.push_str(&format!("\nmetric {} ({})\n", e.name, e.provider));
        for q in &e.queries {
            out.push_str(&format!("  query:   {q}\n"));
        }
        match &e.result {
            Ok(s) => {
                out.push_str(&format!("  value:   {}", s.value));
                if let Some(n) = s.sample_size {
                    out.push_str(&format!(" (sample size {n})"));
                }
                out.push_str(&format!(" at {}\n", s.timestamp.to_rfc3339()));
                if let Some(ev) = &s.evidence {
                    out.push_str(&format!(
                        "  arms:    primary {} requests / {} errors, canary {} requests / {} errors\n",
                        ev.primary.requests, ev.primary.errors, ev.canary.requests, ev.canary.errors
                    ));
                }
            }
            Err(err) => out.push_str(&format!("  error:   [{}] {err}\n", err.category())),
        }
        out.push_str(&format!("  bound:   {}\n", bounds(metric.min, metric.max)));
        out.push_str(&format!(
            "  verdict: {} ({message})\n",
            verdict_str(verdict)
        ));
    }
    out.push_str(&format!(
        "\ncheck verdict: {}\n",
        verdict_str(crate::analysis::combine(verdicts))
    ));
    out
}

/// The sequential judge over the interval before `at`: every look's per-arm counts and the
/// e-value and evidence after it, as the controller would have folded them from a step
/// that started one interval earlier.
async fn sequential_report(
    evaluator: &Evaluator,
    ctx: &CanaryContext,
    at: DateTime<Utc>,
) -> String {
    let a = &ctx.spec.analysis;
    let interval: Duration = a.interval.into();
    let step = a.look_interval();
    let delay = chrono::Duration::from_std(a.look_delay()).unwrap_or_default();
    let from = at - chrono::Duration::from_std(interval).unwrap_or_default() - delay;
    let batch = evaluator.looks(ctx, from, step, at - delay).await;
    let mut out = format!(
        "
sequential judge (alpha {}, looks every {}s) over the interval before {}
",
        a.alpha(),
        step.as_secs(),
        at.to_rfc3339()
    );
    let tests = a.sequential_tests();
    for metric in a.metrics.iter().filter(|m| m.is_sequential()) {
        out.push_str(&format!(
            "
metric {} (sequential)
",
            metric.name
        ));
        let Some(looks) = batch.metrics.iter().find(|m| m.name == metric.name) else {
            continue;
        };
        let looks = match &looks.result {
            Ok(l) => l,
            Err(o) => {
                out.push_str(&format!(
                    "  looks:   none: {o:?}
"
                ));
                continue;
            }
        };
        let bound = metric.guard_bound();
        let settings = crate::analysis::sequential::Settings::of(a, metric);
        let mut state = crate::analysis::sequential::start(&metric.name);
        for (k, look) in looks.iter().enumerate() {
            crate::analysis::sequential::update(&mut state, look, bound);
            let e = crate::analysis::sequential::e_values(&state, bound.is_some());
            let required =
                crate::analysis::sequential::required_canary_requests(&state, &settings, tests);
            let end = from + chrono::Duration::from_std(step * (k as u32 + 1)).unwrap_or_default();
            out.push_str(&format!(
                "  look {}: primary {}/{} bad, canary {}/{} bad; e-value {} (bound {}); evidence {} of {} canary requests
",
                end.format("%H:%M:%S"),
                crate::analysis::display_value(look.primary.bad),
                crate::analysis::display_value(look.primary.requests),
                crate::analysis::display_value(look.canary.bad),
                crate::analysis::display_value(look.canary.requests),
                crate::analysis::display_value(e.relative),
                e.guard.map(crate::analysis::display_value).unwrap_or_else(|| "-".into()),
                crate::analysis::display_value(state.canary_requests),
                required
            ));
        }
    }
    out
}

fn bounds(min: Option<f64>, max: Option<f64>) -> String {
    match (min, max) {
        (Some(lo), Some(hi)) => format!("{lo} <= value <= {hi}"),
        (None, Some(hi)) => format!("value <= {hi}"),
        (Some(lo), None) => format!("value >= {lo}"),
        (None, None) => "none".into(),
    }
}

fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "Pass",
        Verdict::Fail => "Fail",
        Verdict::Inconclusive => "Inconclusive",
        Verdict::Waiting => "Waiting",
    }
}

/// Replays a rollout that starts at `from` with the canary ready, deciding every `step` and
/// evaluating the metrics whenever a check is due.
pub async fn backtest(
    evaluator: &Evaluator,
    ctx: &CanaryContext,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
) -> anyhow::Result<String> {
    let step = chrono::Duration::from_std(step.max(Duration::from_secs(1)))
        .context("--step is too large")?;
    let mut replay = Replay::start(ctx);
    let mut out = replay_header(ctx, from, to, step);
    let mut t = from;
    while t <= to {
        if let Some(line) = replay.tick(evaluator, t).await {
            out.push_str(&line);
        }
        if replay.finished() {
            break;
        }
        t += step;
    }
    out.push('\n');
    out.push_str(&replay.outcome());
    Ok(out)
}

/// A rollout being replayed: the status `rollout::decide` keeps and what it is shown.
struct Replay<'a> {
    ctx: &'a CanaryContext,
    /// Validation, once for the whole replay.
    problems: Vec<crate::api::Problem>,
    /// The revision that becomes the primary's once promoting.
    new_revision: String,
    status: CanaryStatus,
    obs: Observations,
}

impl<'a> Replay<'a> {
    /// A rollout waiting to start: the stable revision serves, the new one is ready.
    fn start(ctx: &'a CanaryContext) -> Self {
        let (stable, new) = match &ctx.spec.backends {
            Some(b) => (b.primary.clone(), b.canary.clone()),
            None => ("stable".to_string(), "candidate".to_string()),
        };
        let ready = |revision: &str| WorkloadState {
            revision: Some(revision.to_string()),
            ready: true,
        };
        Replay {
            ctx,
            problems: crate::api::validate(&ctx.spec),
            status: CanaryStatus {
                phase: Phase::Waiting,
                revision: Some(stable.clone()),
                stable_revision: Some(stable.clone()),
                ..Default::default()
            },
            obs: Observations {
                canary: ready(&new),
                primary: ready(&stable),
                metrics: vec![],
                command: None,
                // The replay has no data plane: its weights are those it decided.
                weights: None,
                looks: None,
                evidence: None,
                hooks: vec![],
            },
            new_revision: new,
        }
    }

    /// One decision at `t`, evaluating the metrics when a check is due; the line to print
    /// when something was checked or moved.
    async fn tick(&mut self, evaluator: &Evaluator, t: DateTime<Utc>) -> Option<String> {
        let spec = &self.ctx.spec;
        let due = rollout::next_check_at(spec, &self.status).is_some_and(|d| d <= t);
        let look_due = rollout::next_look_at(spec, &self.status, self.obs.evidence.as_ref(), t)
            .is_some_and(|d| d <= t);
        if (due || look_due)
            && let Some(base) = rollout::evidence_base(&self.status, self.obs.evidence.as_ref())
        {
            let delay = chrono::Duration::from_std(spec.analysis.look_delay()).unwrap_or_default();
            self.obs.looks = Some(
                evaluator
                    .looks(
                        self.ctx,
                        base.through,
                        spec.analysis.look_interval(),
                        t - delay,
                    )
                    .await,
            );
        }
        let mut cells = Vec::new();
        if due {
            let evals = evaluator.evaluate_detailed(self.ctx, t).await;
            cells = evals
                .iter()
                .zip(&spec.analysis.metrics)
                .map(|(e, metric)| metric_cell(metric, e))
                .collect();
            self.obs.metrics = evals.iter().map(MetricEvaluation::observation).collect();
        }
        // A replay calls no webhook: its gates and hooks are taken to answer 2xx, but for
        // the rollback gates, which would end it.
        self.obs.hooks = rollout::hooks_due(spec, &self.status, due, t)
            .into_iter()
            .map(|w| rollout::HookAnswer {
                name: w.name.clone(),
                outcome: match w.type_ {
                    crate::api::WebhookType::Rollback => Err("not called in a replay".into()),
                    _ => Ok(()),
                },
                at: t,
            })
            .collect();
        let decision = rollout::decide(Input {
            spec,
            generation: None,
            status: &self.status,
            problems: &self.problems,
            observations: &self.obs,
            now: t,
        });
        let checked = decision.status.last_check != self.status.last_check;
        let moved = decision.status.canary_weight != self.status.canary_weight
            || decision.status.phase != self.status.phase;
        let looked = self.obs.looks.take().is_some();
        let evidence = decision
            .evidence
            .clone()
            .or_else(|| decision.status.evidence.clone());
        if looked && let Some(ev) = &evidence {
            // The sequential metrics' state after this look, after the threshold cells.
            cells.push(format!(
                "e-value {}{}",
                crate::analysis::display_value(ev.e_value),
                ev.metrics
                    .iter()
                    .map(|m| format!(
                        ", {}: {} of {} canary requests",
                        m.metric,
                        crate::analysis::display_value(m.canary_requests),
                        m.required_canary_requests
                    ))
                    .collect::<String>()
            ));
        }
        self.obs.evidence = decision.evidence;
        self.status = decision.status;
        if self.status.phase == Phase::Promoting {
            // The primary takes the new revision and becomes ready.
            self.obs.primary.revision = Some(self.new_revision.clone());
        }
        (due || looked || checked || moved).then(|| self.line(t, checked, &cells))
    }

    /// The table row at `t`.
    fn line(&self, t: DateTime<Utc>, checked: bool, cells: &[String]) -> String {
        let check = match &self.status.last_check {
            Some(c) if checked => verdict_str(c.verdict),
            _ => "-",
        };
        format!(
            "{:<25} {:>4} {:>5}%  {:<12} {}\n",
            t.to_rfc3339(),
            self.status.step + 1,
            self.status.canary_weight,
            check,
            cells.join(" | ")
        )
    }

    /// Whether the rollout ended (promoted or rolled back).
    fn finished(&self) -> bool {
        matches!(self.status.phase, Phase::Succeeded | Phase::Failed)
    }

    /// How the replay ended.
    fn outcome(&self) -> String {
        match self.status.history.first().filter(|_| self.finished()) {
            Some(h) => format!(
                "outcome: {} at {} (reached {}%): {}\n",
                h.result.as_str(),
                h.finished_at.to_rfc3339(),
                h.reached_weight,
                h.reason
            ),
            None => format!(
                "outcome: still {} at step {} ({}% canary) when the window ended\n",
                self.status.phase.as_str(),
                self.status.step + 1,
                self.status.canary_weight
            ),
        }
    }
}

/// The replay table's title and column heads.
fn replay_header(
    ctx: &CanaryContext,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: chrono::Duration,
) -> String {
    let names: Vec<&str> = ctx
        .spec
        .analysis
        .metrics
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    format!(
        "Replaying Canary {}/{} from {} to {} every {}s (steps {:?})\n\n{:<25} {:>4} {:>6}  {:<12} {}\n",
        ctx.namespace,
        ctx.name,
        from.to_rfc3339(),
        to.to_rfc3339(),
        step.num_seconds(),
        ctx.spec.steps,
        "time",
        "step",
        "weight",
        "check",
        names.join(" | ")
    )
}

/// One metric's value (or error category) and verdict, as a table cell.
fn metric_cell(metric: &crate::api::MetricSpec, e: &MetricEvaluation) -> String {
    let (v, _) = judge(metric, &e.outcome());
    let value = match &e.result {
        Ok(s) => format!("{:.3}", s.value),
        Err(err) => err.category().to_string(),
    };
    format!("{value} {}", verdict_str(v))
}

/// RFC 3339, `now`, or a negative offset from now such as `-1h`, `-30m`, `-90s`, `-1h30m`.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    let t = text.trim();
    if t == "now" {
        return Ok(now);
    }
    if let Some(rel) = t.strip_prefix('-') {
        let d = parse_duration(rel)?;
        return Ok(now - chrono::Duration::from_std(d).context("the offset is too large")?);
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| d.with_timezone(&Utc))
        .with_context(|| {
            format!("{t:?} is neither RFC 3339 (2024-05-01T10:00:00Z) nor relative (-1h)")
        })
}

/// A duration such as `90s`, `1m`, `1h30m`, `2d`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .with_context(|| format!("{text:?} is not a duration such as 30s, 5m or 1h"))?;
        num.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => bail!("{text:?} is not a duration such as 30s, 5m or 1h"),
        };
        any = true;
    }
    if !num.is_empty() || !any {
        bail!("{text:?} is not a duration such as 30s, 5m or 1h");
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative and absolute times both parse; nonsense is refused with a hint.
    #[test]
    fn times() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_time("-1h30m", now).unwrap().to_rfc3339(),
            "2024-05-01T10:30:00+00:00"
        );
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(
            parse_time("2024-05-01T11:00:00Z", now)
                .unwrap()
                .to_rfc3339(),
            "2024-05-01T11:00:00+00:00"
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    }
}
