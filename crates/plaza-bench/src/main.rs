use anyhow::{Context, Result};
use clap::Parser;
use plaza_bench::cli::{Cli, Scenario};
use plaza_bench::scenario::{chat, conns, dm, fanout, publish};

/// Exit status: 0 for a clean run, 2 for a run that finished with problems (loss, refusals,
/// dropped subscribers, the deadline: listed in `problems`), 1 when it could not run.
fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("plaza-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<bool> {
    let cli = Cli::parse();
    plaza_bench::clock::base();
    let threads = cli.threads.max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let clean = match cli.scenario {
        Scenario::Fanout(args) => {
            let report = rt.block_on(fanout::run(args, threads))?;
            eprint!("{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
            report.problems.is_empty()
        }
        Scenario::Chat(args) => {
            let report = rt.block_on(chat::run(args, threads))?;
            eprint!("{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
            report.problems.is_empty()
        }
        Scenario::Dm(args) => {
            let report = rt.block_on(dm::run(args))?;
            eprint!("{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
            report.problems.is_empty()
        }
        Scenario::Conns(args) => {
            let report = rt.block_on(conns::run(args, threads))?;
            eprint!("{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
            report.problems.is_empty()
        }
        Scenario::Publish(args) => {
            let report = rt.block_on(publish::run(args, threads))?;
            eprint!("{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
            report.problems.is_empty()
        }
    };
    // Do not wait for connections still being torn down.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(clean)
}
