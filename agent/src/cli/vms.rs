//! `allod vm`.

use clap::Subcommand;

use crate::api_types::{AttachVolume, CreateVm, UpdateVm, VmNicRequest};
use crate::cli::{body, emit, print_table, text, ApiArgs, ApiClient, Output};
use crate::units::{human_size, parse_size};

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Place a VM on a node of its project's zone.
    Create {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u64,
        /// e.g. 512M or 4G.
        #[arg(long, value_parser = parse_size)]
        memory: u64,
        /// VMs of one group never share a node.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Boot from a new volume cloned from this image.
        #[arg(long)]
        image: Option<String>,
        /// The boot volume's size (default: the image's), e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// A NIC, repeatable (eth0 first): `subnet=web,sg=default`; more
        /// `sg=` for more security groups, `ip=` for a fixed address.
        #[arg(long = "nic", value_parser = parse_nic)]
        nics: Vec<VmNicRequest>,
        /// Wait until the VM runs (or fails, saying why).
        #[arg(long)]
        wait: bool,
        /// Only define it; start it later with `allod vm start`.
        #[arg(long, conflicts_with = "wait")]
        no_start: bool,
        /// When its node dies: restarted elsewhere (`always`, waiting for
        /// room if need be), restarted if a node has room (`best-effort`),
        /// or stopped (`never`).
        #[arg(long, value_parser = ["always", "best-effort", "never"])]
        restart_policy: Option<String>,
        /// Restarts after a node's death place higher priorities first
        /// (-1000 to 1000; default 0).
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
        priority: Option<i32>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Power on a stopped VM.
    Start {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Ask the guest to power off (ACPI); it is forced off after the node's stop timeout.
    Stop {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Power off at once.
    ForceStop {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Move a running VM to another node while its guest runs (live
    /// migration), showing its progress and the guest's pause.
    Migrate {
        name: String,
        #[arg(long)]
        project: String,
        /// The node to move to (name or id); default: the scheduler's pick.
        #[arg(long)]
        to: Option<String>,
        /// Return once the migration is recorded, without following it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Reset a running VM.
    Reboot {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Change vCPUs or memory of a stopped VM.
    Update {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        vcpus: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Attach this terminal to the VM's serial console (Ctrl-] leaves).
    Console {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Delete {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Attach a volume (of this project, or of another with --volume-project).
    Attach {
        name: String,
        volume: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        volume_project: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Detach a volume (by name or id).
    Detach {
        name: String,
        volume: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `subnet=web,sg=default,sg=ssh,ip=10.0.0.5` as the API's NIC object.
pub(super) fn parse_nic(text: &str) -> Result<VmNicRequest, String> {
    let mut subnet = None;
    let mut groups = Vec::new();
    let mut ip = None;
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("subnet", v)) if !v.is_empty() => subnet = Some(v.to_string()),
            Some(("sg", v)) if !v.is_empty() => groups.push(v.to_string()),
            Some(("ip", v)) if !v.is_empty() => ip = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "{pair:?} is not subnet=NAME, sg=GROUP or ip=ADDRESS (e.g. --nic subnet=web,sg=default)"
                ))
            }
        }
    }
    let Some(subnet) = subnet else {
        return Err("a NIC needs subnet=NAME (e.g. --nic subnet=web,sg=default)".into());
    };
    Ok(VmNicRequest {
        subnet,
        security_groups: (!groups.is_empty()).then_some(groups),
        ip,
    })
}

pub(super) fn print_vms(vms: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                text(&v["name"]),
                text(&v["state"]),
                match v["reason"].as_str() {
                    Some(r) => format!("({r})"),
                    None => text(&v["power"]),
                },
                text(&v["node"]),
                text(&v["vcpus"]),
                human_size(v["memory_bytes"].as_u64().unwrap_or(0)),
                text(&v["zone"]),
                v["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| text(&a["volume"]))
                    .collect::<Vec<_>>()
                    .join(","),
                v["nics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| text(&n["ip"]))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "STATE",
            "WANTED",
            "NODE",
            "VCPUS",
            "MEMORY",
            "ZONE",
            "VOLUMES",
            "ADDRESSES",
        ],
        &rows,
    );
}

/// Polls a new VM until it runs or fails.
pub(super) async fn wait_for_vm(
    client: &ApiClient,
    project: &str,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let started = std::time::Instant::now();
    loop {
        let vm = client
            .call(
                reqwest::Method::GET,
                &format!("/v1/projects/{project}/vms/{name}"),
                None,
            )
            .await?;
        match vm["state"].as_str() {
            Some("running") => return Ok(vm),
            Some("failed") => anyhow::bail!(
                "VM {name} failed: {}",
                vm["reason"].as_str().unwrap_or("no reason given")
            ),
            _ if started.elapsed() > std::time::Duration::from_secs(600) => {
                anyhow::bail!("VM {name} is still {} after 10 minutes", text(&vm["state"]))
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}

/// Shows a VM's migration until it ends: its phase and bytes while it
/// runs, then the guest's pause; an error when it failed.
async fn follow_migration(
    client: &ApiClient,
    project: &str,
    name: &str,
    output: Output,
) -> anyhow::Result<serde_json::Value> {
    use std::io::IsTerminal;
    let tty = output == Output::Table && std::io::stderr().is_terminal();
    let mut last = String::new();
    let started = std::time::Instant::now();
    loop {
        let vm = client
            .call(
                reqwest::Method::GET,
                &format!("/v1/projects/{project}/vms/{name}"),
                None,
            )
            .await?;
        let m = &vm["migration"];
        let line = match m["phase"].as_str() {
            Some("done") | Some("failed") | None => String::new(),
            Some(phase) => format!(
                "migrating {name} from node {} to node {}: {phase}, {} sent, {} of {} left",
                text(&m["from"]),
                text(&m["to"]),
                human_size(m["bytes_sent"].as_u64().unwrap_or(0)),
                human_size(m["bytes_remaining"].as_u64().unwrap_or(0)),
                human_size(m["bytes_total"].as_u64().unwrap_or(0)),
            ),
        };
        if !line.is_empty() && line != last && output == Output::Table {
            if tty {
                eprint!("\r{line}    ");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        match m["phase"].as_str() {
            Some("done") => {
                if output == Output::Table {
                    let took = m["finished_at_ms"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_sub(m["started_at_ms"].as_u64().unwrap_or(0));
                    eprintln!(
                        "{}migrated {name} to node {} in {:.1} s; the guest was paused {} ms",
                        if tty { "\n" } else { "" },
                        text(&m["to"]),
                        took as f64 / 1000.0,
                        text(&m["downtime_ms"])
                    );
                }
                return Ok(vm);
            }
            Some("failed") | None => anyhow::bail!(
                "{}the migration of VM {name} failed; it runs on node {}: {}",
                if tty { "\n" } else { "" },
                text(&vm["node"]),
                m["error"].as_str().unwrap_or("no reason given")
            ),
            _ if started.elapsed() > std::time::Duration::from_secs(3600) => anyhow::bail!(
                "{}VM {name} is still migrating after an hour; `allod vm show {name} --project {project}` follows it",
                if tty { "\n" } else { "" }
            ),
            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}

pub(super) async fn run_vm(command: VmCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    let (api, method, path, body) = match command {
        VmCommand::Create {
            name,
            project,
            vcpus,
            memory,
            anti_affinity,
            image,
            disk_size,
            nics,
            wait,
            no_start,
            restart_policy,
            priority,
            api,
        } => {
            let restart_policy = restart_policy
                .map(|p| serde_json::from_value(serde_json::Value::String(p)))
                .transpose()?;
            let payload = CreateVm {
                restart_policy,
                priority,
                name: name.clone(),
                vcpus,
                memory_bytes: memory,
                anti_affinity,
                image,
                start: no_start.then_some(false),
                disk_size_bytes: disk_size,
                nics,
            };
            let client = api.resolve()?;
            let mut vm = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/vms"),
                    body(&payload),
                )
                .await?;
            if wait {
                vm = wait_for_vm(&client, &project, &name).await?;
            }
            emit(api.output, &vm, |v| print_vms(std::slice::from_ref(v)));
            return Ok(());
        }
        VmCommand::Start { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/start"),
            None,
        ),
        VmCommand::Stop { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/stop"),
            None,
        ),
        VmCommand::ForceStop { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/force-stop"),
            None,
        ),
        VmCommand::Migrate {
            name,
            project,
            to,
            no_wait,
            api,
        } => {
            let client = api.resolve()?;
            let vm = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/vms/{name}/migrate"),
                    body(&crate::api_types::MigrateVm { to }),
                )
                .await?;
            let vm = if no_wait {
                vm
            } else {
                follow_migration(&client, &project, &name, api.output).await?
            };
            emit(api.output, &vm, |v| print_vms(std::slice::from_ref(v)));
            return Ok(());
        }
        VmCommand::Reboot { name, project, api } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/reboot"),
            None,
        ),
        VmCommand::Update {
            name,
            project,
            vcpus,
            memory,
            api,
        } => (
            api,
            Method::PATCH,
            format!("/v1/projects/{project}/vms/{name}"),
            body(&UpdateVm {
                vcpus,
                memory_bytes: memory,
            }),
        ),
        VmCommand::Console { name, project, api } => {
            return crate::cli::console_client::attach(&api, &project, &name).await;
        }
        VmCommand::List { project, api } => (
            api,
            Method::GET,
            format!("/v1/projects/{project}/vms"),
            None,
        ),
        VmCommand::Show { name, project, api } => (
            api,
            Method::GET,
            format!("/v1/projects/{project}/vms/{name}"),
            None,
        ),
        VmCommand::Delete { name, project, api } => (
            api,
            Method::DELETE,
            format!("/v1/projects/{project}/vms/{name}"),
            None,
        ),
        VmCommand::Attach {
            name,
            volume,
            project,
            volume_project,
            api,
        } => (
            api,
            Method::POST,
            format!("/v1/projects/{project}/vms/{name}/volumes"),
            body(&AttachVolume {
                volume,
                project: volume_project,
            }),
        ),
        VmCommand::Detach {
            name,
            volume,
            project,
            api,
        } => (
            api,
            Method::DELETE,
            format!("/v1/projects/{project}/vms/{name}/volumes/{volume}"),
            None,
        ),
    };
    let client = api.resolve()?;
    let deleting = method == Method::DELETE && !path.contains("/volumes/");
    let answer = client.call(method, &path, body).await?;
    if deleting {
        if api.output == Output::Table {
            println!("Deleted.");
        }
        return Ok(());
    }
    emit(api.output, &answer, |v| match v.as_array() {
        Some(list) => print_vms(list),
        None => print_vms(std::slice::from_ref(v)),
    });
    Ok(())
}
