//! `kubectl serin`: the kubectl plugin (binary `kubectl-serin`) SREs use to watch and steer
//! rollouts. It reads Canaries and their Events with the user's kubeconfig, context and
//! namespace, as kubectl does, and steers rollouts only through the commands the controller
//! understands (the `serin.dev/command` annotation), then waits to show that they took
//! effect.
//!
//! Every error names the Canary and its namespace and says what to do.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt as _};
use serde_json::json;

use crate::api::Canary;
use crate::controller::COMMAND_ANNOTATION;
use crate::rollout::{CommandKind, reasons};
use crate::view::{self, EventLine, Observed, View};

/// How often `get --watch` and the command wait poll the Canary.
const POLL: Duration = Duration::from_millis(500);
/// Events shown by `get`.
const EVENTS_SHOWN: usize = 8;

/// `kubectl serin`: watch and steer Serin's canary rollouts.
#[derive(clap::Parser, Debug)]
#[command(name = "kubectl-serin", bin_name = "kubectl serin", version)]
pub struct Args {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else `default`).
    #[arg(long, short = 'n', global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// The plugin's subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// A Canary's rollout: phase, steps, weights, each metric against its bound, failed
    /// checks, revision, timing and recent Events.
    Get {
        /// The Canary.
        name: String,
        /// Keep watching (redrawn in place on a terminal; a line per change when piped).
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Every Canary with its phase, weights, step, last result and age.
    List {
        /// In all namespaces.
        #[arg(long, short = 'A')]
        all_namespaces: bool,
    },
    /// Skip the rest of the current step: the next step now (with --full: promote now).
    Promote {
        /// The Canary.
        name: String,
        /// Skip every remaining step and check and promote now.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Roll back now.
    Abort {
        /// The Canary.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Start the failed revision's rollout again.
    Retry {
        /// The Canary.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Hold the rollout where it is until `resume` (kept in status, so a GitOps sync of
    /// the spec does not undo it).
    Pause {
        /// The Canary.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Lift a `pause`.
    Resume {
        /// The Canary.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// The promotion history, newest first.
    History {
        /// The Canary.
        name: String,
    },
    /// A local web page of the Canaries (every namespace, or the one of -n): live phase and
    /// weights, each rollout's weight over time with its checks, and buttons for the
    /// commands. Served on 127.0.0.1 only, at a URL with a token made for this start.
    Dashboard {
        /// The local port (0: any free one).
        #[arg(long, default_value_t = crate::dashboard::DEFAULT_PORT)]
        port: u16,
    },
}

/// How long a command waits for the controller.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Wait {
    /// Seconds to wait for Serin to carry the command out (0: do not wait).
    #[arg(long = "wait", default_value_t = 15, value_name = "SECONDS")]
    pub seconds: u64,
}

impl PluginCommand {
    /// The controller command a subcommand writes, with its Canary and wait.
    fn steer(&self) -> Option<(&str, CommandKind, Wait)> {
        Some(match self {
            PluginCommand::Promote { name, full, wait } => (
                name,
                if *full {
                    CommandKind::PromoteFull
                } else {
                    CommandKind::Promote
                },
                *wait,
            ),
            PluginCommand::Abort { name, wait } => (name, CommandKind::Abort, *wait),
            PluginCommand::Retry { name, wait } => (name, CommandKind::Retry, *wait),
            PluginCommand::Pause { name, wait } => (name, CommandKind::Pause, *wait),
            PluginCommand::Resume { name, wait } => (name, CommandKind::Resume, *wait),
            PluginCommand::Get { .. }
            | PluginCommand::List { .. }
            | PluginCommand::History { .. }
            | PluginCommand::Dashboard { .. } => {
                return None;
            }
        })
    }
}

/// Runs the plugin; the error is the one message the user sees.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let (client, default_ns) = connect(&args).await?;
    let ns = args.namespace.clone().unwrap_or(default_ns);
    if let Some((name, kind, wait)) = args.command.steer() {
        return command(&client, &ns, name, kind, wait).await;
    }
    let tty = std::io::stdout().is_terminal();
    match &args.command {
        PluginCommand::Get { name, watch } => get(&client, &ns, name, *watch, tty).await,
        PluginCommand::List { all_namespaces } => {
            let scope = (!all_namespaces).then_some(ns.as_str());
            let canaries = list(&client, scope).await?;
            print!("{}", list_table(&canaries, *all_namespaces, Utc::now()));
            Ok(())
        }
        PluginCommand::History { name } => {
            let canary = read(&client, &ns, name).await?;
            print!("{}", history_table(&canary, Utc::now()));
            Ok(())
        }
        PluginCommand::Dashboard { port } => {
            crate::dashboard::serve(client, args.namespace.clone(), *port, |url| {
                // A closed standard output (the terminal went away) must not stop the server.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "Serin dashboard: {url}");
                let _ = writeln!(out, "(serving on 127.0.0.1 only; Ctrl-C stops it)");
                let _ = out.flush();
            })
            .await
        }
        _ => unreachable!("the steering commands returned above"),
    }
}

/// A client for the kubeconfig, context and namespace kubectl would use.
pub(crate) async fn connect(args: &Args) -> anyhow::Result<(Client, String)> {
    let kubeconfig = match &args.kubeconfig {
        Some(path) => Kubeconfig::read_from(path)
            .with_context(|| format!("reading the kubeconfig {}", path.display()))?,
        None => Kubeconfig::read().context(
            "reading the kubeconfig ($KUBECONFIG, else ~/.kube/config): point --kubeconfig at one",
        )?,
    };
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| match &args.context {
            Some(c) => anyhow!(
                "the kubeconfig has no usable context {c:?} ({e}): `kubectl config get-contexts` lists them"
            ),
            None => anyhow!("the kubeconfig cannot be used: {e}"),
        })?;
    let ns = config.default_namespace.clone();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    Ok((client, ns))
}

/// The Canary `ns/name`, with errors that say what to do.
async fn read(client: &Client, ns: &str, name: &str) -> anyhow::Result<Canary> {
    let api: Api<Canary> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => bail!(
            "canary {name:?} not found in namespace {ns:?}: `kubectl serin list -n {ns}` lists \
             that namespace's Canaries, `kubectl serin list -A` every namespace's"
        ),
        Err(e) => Err(api_error(e, ns, Some(name), "read")),
    }
}

/// One message for a failed request about Canaries.
pub(crate) fn api_error(e: kube::Error, ns: &str, name: Option<&str>, verb: &str) -> anyhow::Error {
    let what = match name {
        Some(n) => format!("canary {n:?} in namespace {ns:?}"),
        None => format!("the Canaries in namespace {ns:?}"),
    };
    match &e {
        kube::Error::Api(s) if s.code == 403 => anyhow!(
            "not allowed to {verb} {what}: {}; ask for a Role that grants it on \
             canaries.serin.dev (the chart's aggregated ClusterRoles give `view` read and \
             `edit` write access)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 404 => anyhow!(
            "cannot {verb} {what}: the Canary CRD (canaries.serin.dev) is not installed in \
             this cluster; install it with `serin crd | kubectl apply -f -`"
        ),
        _ => anyhow!("cannot {verb} {what}: {e}"),
    }
}

/// Canaries in `ns`, or in every namespace.
async fn list(client: &Client, ns: Option<&str>) -> anyhow::Result<Vec<Canary>> {
    let api: Api<Canary> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, ns.unwrap_or("*"), None, "list"))?
        .items;
    items.sort_by_key(|c| (c.namespace(), c.name_any()));
    Ok(items)
}

/// The Canary's Events, oldest first.
async fn events(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=Canary,involvedObject.name={name}"
    ));
    api.list(&params).await.map(|l| l.items).unwrap_or_default()
}

async fn get(client: &Client, ns: &str, name: &str, watch: bool, tty: bool) -> anyhow::Result<()> {
    if !watch {
        let canary = read(client, ns, name).await?;
        let events = view::event_lines(events(client, ns, name).await, name);
        let lines = describe(&canary, &events, Utc::now());
        let mut out = std::io::stdout().lock();
        for l in lines {
            writeln!(out, "{}", if tty { l } else { view::plain(&l) })?;
        }
        return Ok(());
    }
    let mut v = View::new(tty);
    v.title(&format!("kubectl serin get {name} -n {ns} --watch"));
    loop {
        let canary = read(client, ns, name).await?;
        let events = view::event_lines(events(client, ns, name).await, name);
        v.update(Observed::of_canary(&canary, None), events);
        tokio::time::sleep(POLL).await;
    }
}

/// The lines of `get`: the view's frame of the Canary, with its Events.
pub fn describe(canary: &Canary, events: &[EventLine], now: DateTime<Utc>) -> Vec<String> {
    let observed = Observed::of_canary(canary, None);
    let shown = &events[events.len().saturating_sub(EVENTS_SHOWN)..];
    view::describe(&observed, shown, now)
}

/// The table of `list`.
pub fn list_table(canaries: &[Canary], namespaces: bool, now: DateTime<Utc>) -> String {
    let mut rows = vec![{
        let mut h = vec!["NAME", "PHASE", "WEIGHTS", "STEP", "LAST RESULT", "AGE"];
        if namespaces {
            h.insert(0, "NAMESPACE");
        }
        h.into_iter().map(String::from).collect::<Vec<_>>()
    }];
    for c in canaries {
        let status = c.status.clone().unwrap_or_default();
        let steps = c.spec.steps.len().max(1);
        let step = if status.phase.in_rollout() {
            format!("{}/{steps}", (status.step as usize + 1).min(steps))
        } else {
            "-".into()
        };
        let last = status
            .history
            .first()
            .map(|h| {
                format!(
                    "{} {} ago",
                    h.result.as_str(),
                    view::human_duration(now - h.finished_at)
                )
            })
            .unwrap_or_else(|| "-".into());
        let age = c
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond()))
            .map(|t| view::human_duration(now - t))
            .unwrap_or_else(|| "-".into());
        let mut row = vec![
            c.name_any(),
            status.phase.as_str().to_string(),
            format!(
                "{}/{}",
                100 - status.canary_weight.min(100),
                status.canary_weight
            ),
            step,
            last,
            age,
        ];
        if namespaces {
            row.insert(0, c.namespace().unwrap_or_default());
        }
        rows.push(row);
    }
    if canaries.is_empty() {
        return "No Canaries found.\n".into();
    }
    table(&rows)
}

/// The table of `history`, newest first.
pub fn history_table(canary: &Canary, now: DateTime<Utc>) -> String {
    let status = canary.status.clone().unwrap_or_default();
    if status.history.is_empty() {
        return format!(
            "canary {}/{} has finished no rollout yet (phase {})\n",
            canary.namespace().unwrap_or_default(),
            canary.name_any(),
            status.phase.as_str()
        );
    }
    let mut rows = vec![
        [
            "REVISION", "STARTED", "FINISHED", "DURATION", "RESULT", "REACHED", "WEIGHTS", "REASON",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for h in &status.history {
        let started = h
            .started_at
            .map(|t| {
                format!(
                    "{} ({} ago)",
                    t.format("%Y-%m-%d %H:%M:%S"),
                    view::human_duration(now - t)
                )
            })
            .unwrap_or_else(|| "-".into());
        rows.push(vec![
            h.revision.clone(),
            started,
            h.finished_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            h.started_at
                .map(|t| view::human_duration(h.finished_at - t))
                .unwrap_or_else(|| "-".into()),
            h.result.as_str().to_string(),
            format!("{}%", h.reached_weight),
            // The weights written, when the entry still has its timeline.
            h.timeline
                .as_ref()
                .filter(|t| !t.points.is_empty())
                .map(|t| {
                    t.points
                        .iter()
                        .map(|p| p.weight.to_string())
                        .collect::<Vec<_>>()
                        .join("→")
                })
                .unwrap_or_else(|| "-".into()),
            h.reason.clone(),
        ]);
    }
    table(&rows)
}

/// Columns padded to their widest cell, as kubectl prints them; the last column is not
/// padded.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == r.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// Writes command `kind` for `ns/name`, then waits for the controller to carry it out and
/// says what happened.
async fn command(
    client: &Client,
    ns: &str,
    name: &str,
    kind: CommandKind,
    wait: Wait,
) -> anyhow::Result<()> {
    println!("{}", steer(client, ns, name, kind, wait).await?);
    Ok(())
}

/// Writes command `kind` for `ns/name` and waits for the controller to carry it out; the
/// text says what happened (the error, why it did not apply). The dashboard's buttons use
/// it too.
pub(crate) async fn steer(
    client: &Client,
    ns: &str,
    name: &str,
    kind: CommandKind,
    wait: Wait,
) -> anyhow::Result<String> {
    // Read first, so a missing Canary gets the message that says what to do.
    read(client, ns, name).await?;
    let written = Utc::now();
    let id = format!("kubectl-{}", written.timestamp_millis());
    let api: Api<Canary> = Api::namespaced(client.clone(), ns);
    let patch = json!({"metadata": {"annotations": {COMMAND_ANNOTATION: format!("{}/{id}", kind.as_str())}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, ns, Some(name), "annotate"))?;
    let what = format!("{} of canary {ns}/{name}", kind.as_str());
    if wait.seconds == 0 {
        return Ok(format!(
            "{what} requested (not waiting for Serin to carry it out)"
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.seconds);
    let canary = loop {
        let c = read(client, ns, name).await?;
        if c.status.as_ref().and_then(|s| s.last_command.as_deref()) == Some(id.as_str()) {
            break c;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{what} was written (annotation {COMMAND_ANNOTATION}) but Serin did not carry \
                 it out within {}s: is the operator running and watching namespace {ns:?}? \
                 (`kubectl get pods -A -l app.kubernetes.io/name=serin`). It runs the command \
                 when it gets to the Canary.",
                wait.seconds
            );
        }
        tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
    };
    // The Events of this command: written by the decision that recorded it.
    let outcome = command_outcome(&events(client, ns, name).await, name, written);
    let status = view::status_line(&Observed::of_canary(&canary, None));
    match outcome {
        Some((true, message)) => Ok(format!("{what}: done: {message}\n{status}")),
        Some((false, message)) => bail!("{what} did not apply: {message}\n{status}"),
        // Recorded, but its Event was lost or not listed yet: the status says.
        None => Ok(format!("{what}: carried out\n{status}")),
    }
}

/// The command's Event written at or after `since`: (carried out, message).
fn command_outcome(events: &[Event], name: &str, since: DateTime<Utc>) -> Option<(bool, String)> {
    let since = since - chrono::Duration::seconds(1);
    events
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .filter(|e| view::event_time(e).is_some_and(|t| t >= since))
        .filter_map(|e| match e.reason.as_deref() {
            Some(reasons::COMMAND) => Some((true, e.message.clone().unwrap_or_default())),
            Some(reasons::COMMAND_IGNORED) => Some((false, e.message.clone().unwrap_or_default())),
            _ => None,
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HistoryEntry, Phase, RolloutResult};

    fn canary(ns: &str, name: &str) -> Canary {
        let mut c: Canary = serde_json::from_value(json!({
            "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-12-03T10:00:00Z"},
            "spec": {
                "backends": {"primary": "web-v1", "canary": "web-v2"},
                "service": {"port": 80},
                "router": {"gloo": {"upstreamGroup": {"name": "web"}}},
                "analysis": {"interval": "1m", "metrics": [
                    {"name": "error-rate", "provider": {"prometheus": {"address": "http://127.0.0.1:9090"}},
                     "preset": "gloo-error-rate", "max": 1.0}]}
            }
        }))
        .unwrap();
        let status = c.status.get_or_insert_default();
        status.phase = Phase::Progressing;
        status.step = 1;
        status.canary_weight = 50;
        status.revision = Some("web-v2".into());
        c
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// `list` shows each Canary's phase, weights, step and age in aligned columns.
    #[test]
    fn list_shows_phase_weights_step_and_age() {
        let out = list_table(
            &[canary("shop", "web"), canary("shop", "checkout-api")],
            true,
            at("2026-12-03T10:05:30Z"),
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("NAMESPACE   NAME"), "{out}");
        assert!(lines[1].contains("Progressing   50/50     2/3"), "{out}");
        assert!(lines[1].ends_with("5m30s"), "{out}");
        let column = lines[0].find("PHASE").unwrap();
        assert!(
            lines.iter().all(|l| l[column..].starts_with(['P'])),
            "{out}"
        );
        assert_eq!(list_table(&[], false, Utc::now()), "No Canaries found.\n");
    }

    /// `history` lists rollouts newest first with duration, result, weight and reason.
    #[test]
    fn history_lists_rollouts() {
        let mut c = canary("shop", "web");
        c.status.as_mut().unwrap().history = vec![
            HistoryEntry {
                revision: "web-v2".into(),
                started_at: Some(at("2026-12-03T10:00:00Z")),
                finished_at: at("2026-12-03T10:03:05Z"),
                result: RolloutResult::RolledBack,
                reached_weight: 50,
                reason: "error-rate 4.1 % above max 1".into(),
                timeline: Some(crate::api::Timeline {
                    metrics: vec!["error-rate".into()],
                    points: [(0, 20), (60, 50), (185, 0)]
                        .map(|(at, weight)| crate::api::TimelinePoint {
                            at,
                            weight,
                            ..Default::default()
                        })
                        .to_vec(),
                }),
            },
            HistoryEntry {
                revision: "web-v1".into(),
                started_at: None,
                finished_at: at("2026-12-02T09:00:00Z"),
                result: RolloutResult::Promoted,
                reached_weight: 100,
                reason: String::new(),
                timeline: None,
            },
        ];
        let out = history_table(&c, at("2026-12-03T11:00:00Z"));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("REVISION"), "{out}");
        assert!(lines[1].starts_with("web-v2"), "{out}");
        assert!(lines[1].contains("3m05s"), "{out}");
        assert!(lines[1].contains("RolledBack"), "{out}");
        assert!(lines[1].contains("20→50→0"), "{out}");
        assert!(lines[1].ends_with("error-rate 4.1 % above max 1"), "{out}");
        assert!(
            lines[2].contains("Promoted") && lines[2].contains("100%"),
            "{out}"
        );
        c.status.as_mut().unwrap().history.clear();
        assert!(history_table(&c, Utc::now()).contains("has finished no rollout yet"));
    }

    /// `get` names the step, the weights, the revision and the metric against its bound.
    #[test]
    fn describe_shows_the_rollout() {
        let c = canary("shop", "web");
        let lines: Vec<String> = describe(&c, &[], Utc::now())
            .iter()
            .map(|l| view::plain(l))
            .collect();
        let text = lines.join("\n");
        assert!(
            text.contains("shop/web  Progressing  step 2/3 (20 → 50 → 100)"),
            "{text}"
        );
        assert!(text.contains("primary 50% / canary 50%"), "{text}");
        assert!(text.contains("revision web-v2"), "{text}");
        assert!(text.contains("error-rate"), "{text}");
        assert!(text.contains("max 1"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }
}
