//! `allod storage`: the storage cluster's health and work, and its
//! settings.

use clap::Subcommand;

use crate::cli::client::{emit, parse_duration_secs, print_table, text, ApiArgs};
use crate::state::storage::StorageConfigChange;
use crate::units::{human_size, parse_size};

#[derive(Subcommand, Debug)]
pub enum StorageCommand {
    /// Health (ok, degraded, recovering), each node's state and use,
    /// degraded objects and running recovery jobs with their progress.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Scrub a volume's replicas now (or every volume's): compare them,
    /// and with --deep read every block against its checksum; damaged
    /// copies are repaired from intact ones (cluster admins).
    Scrub {
        /// Read every block and check it against its checksum.
        #[arg(long)]
        deep: bool,
        /// The one volume to scrub (with --project); default: all.
        #[arg(long, requires = "project")]
        volume: Option<String>,
        #[arg(long, requires = "volume")]
        project: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change the cluster-wide storage settings (cluster admins); with no
    /// flag, show them.
    Config {
        /// How long a node may stay down before its objects get new
        /// replicas elsewhere (e.g. 10m).
        #[arg(long, value_parser = parse_duration_secs)]
        down_out_after: Option<u64>,
        /// Bytes a second each node may copy for recovery and rebalancing
        /// (e.g. 200M; 0: unlimited).
        #[arg(long, value_parser = parse_rate)]
        recovery_rate: Option<u64>,
        /// Time between two deep scrubs of a replica (e.g. 7d).
        #[arg(long, value_parser = parse_duration_secs)]
        scrub_interval: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    if t == "0" {
        return Ok(0);
    }
    parse_size(t).map_err(|e| format!("{e} (a rate in bytes a second, e.g. 200M; 0: unlimited)"))
}

pub async fn run_storage(command: StorageCommand) -> anyhow::Result<()> {
    match command {
        StorageCommand::Status { api } => {
            let client = api.resolve()?;
            let status = client
                .call(reqwest::Method::GET, "/v1/storage", None)
                .await?;
            emit(api.output, &status, print_status);
        }
        StorageCommand::Scrub {
            deep,
            volume,
            project,
            api,
        } => {
            let body = crate::api_types::ScrubRequest {
                deep,
                project,
                volume,
            };
            let client = api.resolve()?;
            let answer = client
                .call(
                    reqwest::Method::POST,
                    "/v1/storage/scrub",
                    Some(serde_json::to_value(&body)?),
                )
                .await?;
            emit(api.output, &answer, |a| {
                println!(
                    "{} scrub asked of {} volumes; `allod storage status` shows the jobs, `allod volume show` each volume's result.",
                    if deep { "A deep" } else { "A light" },
                    text(&a["volumes"])
                );
            });
        }
        StorageCommand::Config {
            down_out_after,
            recovery_rate,
            scrub_interval,
            api,
        } => {
            let change = StorageConfigChange {
                down_out_after_s: down_out_after,
                recovery_rate_bytes: recovery_rate,
                scrub_interval_s: scrub_interval,
            };
            let client = api.resolve()?;
            let config = if change == StorageConfigChange::default() {
                client
                    .call(reqwest::Method::GET, "/v1/storage", None)
                    .await?["config"]
                    .take()
            } else {
                client
                    .call(
                        reqwest::Method::PATCH,
                        "/v1/storage/config",
                        Some(serde_json::to_value(&change)?),
                    )
                    .await?
            };
            emit(api.output, &config, |c| {
                let secs = |v: &serde_json::Value| format!("{} s", text(v));
                let rate = match c["recovery_rate_bytes"].as_u64() {
                    Some(0) => "unlimited".to_string(),
                    Some(r) => format!("{}/s", human_size(r)),
                    None => "-".into(),
                };
                print_table(
                    &["DOWN OUT AFTER", "RECOVERY RATE", "SCRUB INTERVAL"],
                    &[vec![
                        secs(&c["down_out_after_s"]),
                        rate,
                        secs(&c["scrub_interval_s"]),
                    ]],
                );
            });
        }
    }
    Ok(())
}

fn print_status(s: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut line = format!("health: {}", text(&s["health"]));
    if n(&s["bytes_to_move"]) > 0 {
        line.push_str(&format!(
            ", {} to move at {}/s",
            human_size(n(&s["bytes_to_move"])),
            human_size(n(&s["rate_bytes_per_s"]))
        ));
        if let Some(eta) = s["eta_s"].as_u64() {
            line.push_str(&format!(", about {eta} s left"));
        }
    }
    println!("{line}");
    println!(
        "objects degraded: {}; volumes to move: {}; storage map epoch {}",
        n(&s["objects_degraded"]),
        n(&s["volumes_to_move"]),
        n(&s["map_epoch"])
    );
    let rows: Vec<Vec<String>> = s["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|node| {
            vec![
                text(&node["id"]),
                text(&node["name"]),
                text(&node["state"]),
                format!(
                    "{} / {}",
                    human_size(n(&node["used_bytes"])),
                    human_size(n(&node["capacity_bytes"]))
                ),
                text(&node["failure_domain"]),
            ]
        })
        .collect();
    println!();
    print_table(&["ID", "NAME", "STATE", "USED", "DOMAIN"], &rows);
    for node in s["nodes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(why) = node["unavailable"].as_str() {
            println!(
                "node {} ({}) serves no block storage: {why}",
                text(&node["id"]),
                text(&node["name"])
            );
        }
    }
    let jobs: Vec<Vec<String>> = s["jobs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|j| {
            let (done, total) = (n(&j["done_bytes"]), n(&j["total_bytes"]));
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            vec![
                text(&j["kind"]),
                text(&j["volume"]),
                text(&j["node"]),
                format!("{} / {} ({pct} %)", human_size(done), human_size(total)),
            ]
        })
        .collect();
    if !jobs.is_empty() {
        println!();
        print_table(&["JOB", "VOLUME", "NODE", "PROGRESS"], &jobs);
    }
}
