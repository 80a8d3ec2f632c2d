//! `allod project` and its quota limits.

use anyhow::Context;
use clap::Subcommand;

use crate::api_types::{CreateProject, UpdateProject};
use crate::cli::{body, print_table, request, text, ApiArgs, Output};
use crate::units::parse_size;

#[derive(Subcommand, Debug)]
pub enum ProjectCommand {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// OFFICIAL (default), OFFICIAL-SENSITIVE or SECRET; fixed for the project's life.
        #[arg(long)]
        zone: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Update {
        name: String,
        #[arg(long)]
        description: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set a project's quotas (cluster admins); the flags given change,
    /// the others stay. `unlimited` lifts a limit.
    Quota {
        name: String,
        #[arg(long, value_parser = parse_count_limit)]
        vcpus: Option<Limit>,
        /// e.g. 64G
        #[arg(long, value_parser = parse_size_limit)]
        memory: Option<Limit>,
        /// e.g. 2T
        #[arg(long, value_parser = parse_size_limit)]
        storage: Option<Limit>,
        #[arg(long, value_parser = parse_count_limit)]
        volumes: Option<Limit>,
        #[arg(long, value_parser = parse_count_limit)]
        vms: Option<Limit>,
        #[arg(long, value_parser = parse_count_limit)]
        floating_ips: Option<Limit>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A quota limit from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Unlimited,
    At(u64),
}

pub(super) fn parse_count_limit(text: &str) -> Result<Limit, String> {
    match text {
        "unlimited" => Ok(Limit::Unlimited),
        _ => text
            .parse()
            .map(Limit::At)
            .map_err(|_| format!("{text:?} is not a number or `unlimited`")),
    }
}

pub(super) fn parse_size_limit(text: &str) -> Result<Limit, String> {
    match text {
        "unlimited" => Ok(Limit::Unlimited),
        _ => parse_size(text).map(Limit::At),
    }
}

pub(super) fn print_projects(projects: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = projects
        .iter()
        .map(|p| {
            vec![
                text(&p["name"]),
                text(&p["zone"]),
                text(&p["description"]),
                text(&p["generation"]),
            ]
        })
        .collect();
    print_table(&["NAME", "ZONE", "DESCRIPTION", "GENERATION"], &rows);
}

/// One project with its quotas and usage.
pub(super) fn print_project_detail(p: &serde_json::Value) {
    print_projects(std::slice::from_ref(p));
    println!();
    let rows: Vec<Vec<String>> = [
        "vcpus",
        "memory_bytes",
        "storage_bytes",
        "volumes",
        "vms",
        "floating_ips",
    ]
    .iter()
    .map(|field| {
        vec![
            field.to_string(),
            text(&p["usage"][field]).replace('-', "0"),
            match &p["quota"][field] {
                serde_json::Value::Null => "unlimited".into(),
                limit => text(limit),
            },
        ]
    })
    .collect();
    print_table(&["RESOURCE", "USED", "QUOTA"], &rows);
}

pub(super) async fn run_project(command: ProjectCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        ProjectCommand::Create {
            name,
            description,
            zone,
            api,
        } => {
            let payload = CreateProject {
                name,
                description,
                zone,
            };
            request(&api, Method::POST, "/v1/projects", body(&payload), |p| {
                println!("Created project {}.", text(&p["name"]))
            })
            .await?;
        }
        ProjectCommand::List { api } => {
            request(&api, Method::GET, "/v1/projects", None, |p| {
                print_projects(p.as_array().map(Vec::as_slice).unwrap_or_default())
            })
            .await?;
        }
        ProjectCommand::Show { name, api } => {
            let path = format!("/v1/projects/{name}");
            request(&api, Method::GET, &path, None, print_project_detail).await?;
        }
        ProjectCommand::Quota {
            name,
            vcpus,
            memory,
            storage,
            volumes,
            vms,
            floating_ips,
            api,
        } => {
            let client = api.resolve()?;
            let project = client
                .call(Method::GET, &format!("/v1/projects/{name}"), None)
                .await?;
            let mut quota = project["quota"].as_object().cloned().unwrap_or_default();
            for (field, limit) in [
                ("vcpus", vcpus),
                ("memory_bytes", memory),
                ("storage_bytes", storage),
                ("volumes", volumes),
                ("vms", vms),
                ("floating_ips", floating_ips),
            ] {
                match limit {
                    None => {}
                    Some(Limit::Unlimited) => {
                        quota.remove(field);
                    }
                    Some(Limit::At(n)) => {
                        quota.insert(field.into(), n.into());
                    }
                }
            }
            let path = format!("/v1/projects/{name}/quota");
            let quota = serde_json::Value::Object(quota);
            request(&api, Method::PUT, &path, Some(quota), print_project_detail).await?;
        }
        ProjectCommand::Update {
            name,
            description,
            api,
        } => {
            let path = format!("/v1/projects/{name}");
            let payload = UpdateProject { description };
            request(&api, Method::PATCH, &path, body(&payload), |p| {
                print_projects(std::slice::from_ref(p))
            })
            .await?;
        }
        ProjectCommand::Delete { name, api } => {
            let path = format!("/v1/projects/{name}");
            request(&api, Method::DELETE, &path, None, |_| {}).await?;
            if api.output == Output::Table {
                println!("Deleted project {name}.");
            }
        }
    }
    Ok(())
}

pub(super) fn read_line(prompt: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    if let Some(prompt) = prompt {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
