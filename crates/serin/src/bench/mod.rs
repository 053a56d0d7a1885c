//! `serin bench`: benchmarks that need no cluster.
//!
//! `serin bench judge` simulates rollouts on Poisson traffic ([`crate::analysis::simulate`])
//! and prints, as Markdown, how the sequential judge and the threshold judge fare on the same
//! traffic: false rollbacks of identical versions, time to catch a regression, failed requests
//! served. The report depends only on the arguments (single-threaded, seeded), so two runs
//! with the same arguments print the same table.
//!
//! `serin bench scale` ([`scale`]) runs the real operator on N Canaries in the embedded API
//! server and prints what it costs and how fast it moves traffic.

use anyhow::Context;

use crate::analysis::simulate::{self, Cell};

#[cfg(feature = "demo")]
pub mod scale;

/// The benchmarks.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Compare the sequential and threshold judges on simulated traffic (a Markdown table).
    Judge(JudgeBenchArgs),
    /// Run the operator on N Canaries in the embedded API server, next to a background of
    /// unrelated objects, and measure memory, CPU, requests and latency (a Markdown table).
    #[cfg(feature = "demo")]
    Scale(scale::ScaleBenchArgs),
}

/// Arguments of `serin bench judge`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct JudgeBenchArgs {
    /// Simulated rollouts per cell. Default 1000, or 20 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: Option<u32>,
    /// Seed of the random numbers; the same seed prints the same table.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A few cells at 100 rps only, for a smoke test.
    #[arg(long)]
    pub quick: bool,
}

impl JudgeBenchArgs {
    /// Runs per cell, after defaults.
    pub fn runs(&self) -> u32 {
        self.runs.unwrap_or(if self.quick { 20 } else { 1000 })
    }

    /// The command line that reproduces the report.
    pub fn command(&self) -> String {
        format!(
            "serin bench judge --runs {} --seed {}{}",
            self.runs(),
            self.seed,
            if self.quick { " --quick" } else { "" }
        )
    }
}

/// Runs a benchmark and returns its report; `progress` hears one line per finished part.
pub fn run(which: &BenchCommand, progress: &mut dyn FnMut(&str)) -> anyhow::Result<String> {
    match which {
        BenchCommand::Judge(args) => judge(args, progress),
        #[cfg(feature = "demo")]
        BenchCommand::Scale(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(scale::run(args, progress)),
    }
}

/// `serin bench judge`: every cell of the grid, both judges, as a Markdown report.
pub fn judge(args: &JudgeBenchArgs, progress: &mut dyn FnMut(&str)) -> anyhow::Result<String> {
    let metric = simulate::threshold_metric()
        .context("cannot parse the threshold metric of the benchmark")?;
    let cells: Vec<Cell> = simulate::cells(!args.quick);
    let runs = args.runs();
    let results: Vec<_> = cells
        .iter()
        .enumerate()
        .map(|(i, cell)| {
            let r = simulate::run_cell(cell, &metric, runs, args.seed);
            progress(&format!("[{}/{}] {}", i + 1, cells.len(), cell.label()));
            r
        })
        .collect();
    Ok(format!(
        "{}\n{}",
        header(args, cells.len()),
        simulate::table(&results)
    ))
}

fn header(args: &JudgeBenchArgs, cells: usize) -> String {
    format!(
        "# Canary judges on simulated traffic\n\n\
         `{command}` ({cells} cells × {runs} runs).\n\n\
         Model: Poisson traffic from the canary's first request to a {horizon}-minute horizon; \
         a fixed canary share (the two one-minute steps collapsed to one weight); failures \
         independent per request, the canary's at a multiple of the primary's (×1 is A/A: \
         identical versions), or 50% for a hard failure; no ingestion delay. Both judges run \
         Serin's code on the same traffic:\n\
         - **sequential**: `analysis::sequential` on one error-rate metric with `max: {max}` \
         (a 1% guard), α = {alpha}, at every look; rollback on `Regression` or \
         `BaselineUnhealthy`. It promotes at the first 60 s check from 120 s on with at least \
         `required_canary_requests` (minDetectableRatio {ratio}, minSampleSize {floor}, two \
         tests) canary requests.\n\
         - **threshold**: `analysis::judge` on the canary's error rate over the last 60 s, \
         every 60 s, `max: {max}`, no minSampleSize; {failures} failed checks roll back, two \
         passing checks promote.\n",
        command = args.command(),
        runs = args.runs(),
        horizon = simulate::HORIZON_SECONDS / 60,
        max = simulate::MAX_ERROR_PERCENT,
        alpha = crate::analysis::sequential::DEFAULT_ALPHA,
        ratio = crate::analysis::sequential::DEFAULT_MIN_DETECTABLE_RATIO,
        floor = crate::analysis::sequential::DEFAULT_MIN_SAMPLE_SIZE,
        failures = simulate::FAILURE_THRESHOLD,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        which: BenchCommand,
    }

    fn parse(args: &[&str]) -> BenchCommand {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .which
    }

    /// The flags parse, and the defaults are 1000 runs, or 20 with --quick.
    #[test]
    fn arguments() {
        let BenchCommand::Judge(a) = parse(&["judge"]) else {
            panic!("not judge")
        };
        assert_eq!((a.runs(), a.seed, a.quick), (1000, 1, false));
        let BenchCommand::Judge(a) = parse(&["judge", "--quick"]) else {
            panic!("not judge")
        };
        assert_eq!(a.runs(), 20);
        assert_eq!(a.command(), "serin bench judge --runs 20 --seed 1 --quick");
        let BenchCommand::Judge(a) = parse(&["judge", "--runs", "5", "--seed", "9"]) else {
            panic!("not judge")
        };
        assert_eq!(a.command(), "serin bench judge --runs 5 --seed 9");
        assert!(Cli::try_parse_from(["bench", "judge", "--runs", "0"]).is_err());
    }

    /// The quick benchmark reports the command, one row per cell and a progress line per
    /// cell, and the same arguments give the same report.
    #[test]
    fn quick_report() {
        let which = parse(&["judge", "--quick", "--runs", "5", "--seed", "3"]);
        let mut lines = Vec::new();
        let report = run(&which, &mut |l| lines.push(l.to_string())).unwrap();
        let cells = simulate::cells(false).len();
        assert!(report.contains("`serin bench judge --runs 5 --seed 3 --quick`"));
        assert_eq!(
            report
                .lines()
                .filter(|l| l.starts_with("| 100 rps"))
                .count(),
            cells
        );
        assert_eq!(lines.len(), cells);
        assert_eq!(report, run(&which, &mut |_| {}).unwrap());
    }

    /// Manual tool, not a check: prints the full grid at 1000 runs per cell (minutes in a
    /// debug build). `cargo test -p serin --lib bench::tests::full_grid -- --ignored
    /// --nocapture`
    #[test]
    #[ignore = "manual: prints the full benchmark; takes minutes"]
    fn full_grid() {
        let args = JudgeBenchArgs {
            runs: None,
            seed: 1,
            quick: false,
        };
        let started = std::time::Instant::now();
        let report = judge(&args, &mut |l| eprintln!("{l}")).unwrap();
        println!("{report}");
        eprintln!("took {:.1} s", started.elapsed().as_secs_f64());
    }
}
