//! `allod volume` and `allod image`, with upload progress.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::api_types::{CloneVolume, CreateSnapshot, CreateVolume, Resize, Rollback};
use crate::cli::{body, emit, print_table, request, text, ApiArgs, Output};
use crate::units::{human_size, parse_size};

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin volume, or a copy-on-write clone of an image.
    Create {
        name: String,
        #[arg(long)]
        project: String,
        /// e.g. 20G (a multiple of 512 bytes); default with --image: the image's size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Copies of every byte on distinct nodes (1 to 3; default 3, or
        /// every storage node when there are fewer).
        #[arg(long)]
        replicas: Option<u8>,
        /// In-sync copies a write needs (1 to --replicas; default 2, or 1
        /// for a single replica).
        #[arg(long)]
        min_replicas: Option<u8>,
        /// Clone this image (instant, whatever its size).
        #[arg(long)]
        image: Option<String>,
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
    /// Grow a volume (clients see the new size when they reconnect).
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a short-lived NBD URI for the volume (for qemu-img, nbdcopy,
    /// backups) that works on one node only; the volume must be detached.
    Export {
        name: String,
        #[arg(long)]
        project: String,
        /// Refuse writes through it.
        #[arg(long)]
        read_only: bool,
        /// How long it stays valid, e.g. 30m, 1h, 2d (default 1h, at most 7d).
        #[arg(long, value_parser = crate::cli::parse_duration_secs)]
        ttl: Option<u64>,
        /// The node it works on (default: the node the CLI talks to).
        #[arg(long)]
        node: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take a snapshot (copy-on-write, instant).
    Snapshot {
        name: String,
        snapshot: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a volume's snapshots.
    Snapshots {
        name: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a snapshot (refused while clones read through to it).
    SnapshotDelete {
        name: String,
        snapshot: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Return a (detached) volume to a snapshot's content.
    Rollback {
        name: String,
        snapshot: String,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make a new volume from a snapshot (copy-on-write, instant).
    Clone {
        name: String,
        #[arg(long)]
        snapshot: String,
        /// The new volume's name.
        #[arg(long)]
        to: String,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long)]
        project: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Upload a raw or qcow2 disk image (the format is detected) into the catalog.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// The file's SHA-256 as published; computed here when omitted.
        #[arg(long)]
        sha256: Option<String>,
        /// Private to this project (default: public).
        #[arg(long)]
        project: Option<String>,
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
    /// Delete an image (refused while volumes are cloned from it).
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(super) fn print_volumes(volumes: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                text(&v["name"]),
                text(&v["id"]),
                human_size(v["size_bytes"].as_u64().unwrap_or(0)),
                text(&v["replicas"]),
                text(&v["state"]),
                text(&v["zone"]),
            ]
        })
        .collect();
    print_table(&["NAME", "ID", "SIZE", "REPLICAS", "STATE", "ZONE"], &rows);
}

/// Calls the API and prints the volume it answers with.
pub(super) async fn volume_action(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    request(api, method, path, body, |v| {
        print_volumes(std::slice::from_ref(v))
    })
    .await?;
    Ok(())
}

pub(super) async fn run_volume(command: VolumeCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        VolumeCommand::Create {
            name,
            project,
            size,
            replicas,
            min_replicas,
            image,
            api,
        } => {
            if size.is_none() && image.is_none() {
                anyhow::bail!("give --size (e.g. --size 20G), or --image to clone an image");
            }
            let client = api.resolve()?;
            let payload = CreateVolume {
                name,
                size_bytes: size,
                replicas,
                min_replicas,
                from_image: image,
                from_snapshot: None,
            };
            let volume = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/volumes"),
                    body(&payload),
                )
                .await?;
            emit(api.output, &volume, |v| {
                print_volumes(std::slice::from_ref(v))
            });
        }
        VolumeCommand::Resize {
            name,
            size,
            project,
            api,
        } => {
            volume_action(
                &api,
                Method::POST,
                &format!("/v1/projects/{project}/volumes/{name}/resize"),
                body(&Resize { size_bytes: size }),
            )
            .await?;
        }
        VolumeCommand::Export {
            name,
            project,
            read_only,
            ttl,
            node,
            api,
        } => {
            request(
                &api,
                Method::POST,
                &format!("/v1/projects/{project}/volumes/{name}/exports"),
                body(&crate::api_types::CreateExport {
                    read_only,
                    ttl_secs: ttl,
                    node,
                }),
                |e| {
                    println!("{}", text(&e["uri"]));
                    eprintln!(
                        "Valid on node {} until {} (ms since the epoch){}; shown only now.",
                        text(&e["node"]),
                        text(&e["expires_at_ms"]),
                        if e["read_only"] == true {
                            ", read-only"
                        } else {
                            ""
                        }
                    );
                },
            )
            .await?;
        }
        VolumeCommand::Snapshot {
            name,
            snapshot,
            project,
            api,
        } => {
            request(
                &api,
                Method::POST,
                &format!("/v1/projects/{project}/volumes/{name}/snapshots"),
                body(&CreateSnapshot { name: snapshot }),
                |v| {
                    print_snapshots(
                        v["snapshots"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default(),
                    )
                },
            )
            .await?;
        }
        VolumeCommand::Snapshots { name, project, api } => {
            request(
                &api,
                Method::GET,
                &format!("/v1/projects/{project}/volumes/{name}/snapshots"),
                None,
                |l| print_snapshots(l.as_array().map(Vec::as_slice).unwrap_or_default()),
            )
            .await?;
        }
        VolumeCommand::SnapshotDelete {
            name,
            snapshot,
            project,
            api,
        } => {
            request(
                &api,
                Method::DELETE,
                &format!("/v1/projects/{project}/volumes/{name}/snapshots/{snapshot}"),
                None,
                |_| {},
            )
            .await?;
            if api.output == Output::Table {
                println!("Deleted snapshot {snapshot} of volume {name}.");
            }
        }
        VolumeCommand::Rollback {
            name,
            snapshot,
            project,
            api,
        } => {
            volume_action(
                &api,
                Method::POST,
                &format!("/v1/projects/{project}/volumes/{name}/rollback"),
                body(&Rollback { snapshot }),
            )
            .await?;
        }
        VolumeCommand::Clone {
            name,
            snapshot,
            to,
            size,
            project,
            api,
        } => {
            let client = api.resolve()?;
            let payload = CloneVolume {
                snapshot,
                name: to,
                size_bytes: size,
                replicas: None,
            };
            let volume = client
                .call(
                    Method::POST,
                    &format!("/v1/projects/{project}/volumes/{name}/clone"),
                    body(&payload),
                )
                .await?;
            emit(api.output, &volume, |v| {
                print_volumes(std::slice::from_ref(v))
            });
        }
        VolumeCommand::List { project, api } => {
            request(
                &api,
                Method::GET,
                &format!("/v1/projects/{project}/volumes"),
                None,
                |list| print_volumes(list.as_array().map(Vec::as_slice).unwrap_or_default()),
            )
            .await?;
        }
        VolumeCommand::Show { name, project, api } => {
            request(
                &api,
                Method::GET,
                &format!("/v1/projects/{project}/volumes/{name}"),
                None,
                |v| {
                    print_volumes(std::slice::from_ref(v));
                    let j = &v["recovery"];
                    if j.is_object() {
                        let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
                        let (done, total) = (n(&j["done_bytes"]), n(&j["total_bytes"]));
                        println!(
                            "Recovery: {} on node {}, {} of {} ({} %)",
                            text(&j["kind"]),
                            text(&j["node"]),
                            crate::units::human_size(done),
                            crate::units::human_size(total),
                            (done * 100).checked_div(total).unwrap_or(0)
                        );
                    }
                },
            )
            .await?;
        }
        VolumeCommand::Delete { name, project, api } => {
            request(
                &api,
                Method::DELETE,
                &format!("/v1/projects/{project}/volumes/{name}"),
                None,
                |_| {},
            )
            .await?;
            if api.output == Output::Table {
                println!("Deleted volume {name} of project {project}.");
            }
        }
    }
    Ok(())
}

/// A file as a stream of 1 MiB chunks.
pub(super) fn tokio_util_reader(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

pub(super) fn print_snapshots(snapshots: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                text(&s["name"]),
                text(&s["id"]),
                s["clones"].as_array().map_or(0, Vec::len).to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "ID", "CLONES"], &rows);
}

pub(super) fn print_images(images: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                text(&i["name"]),
                human_size(i["size_bytes"].as_u64().unwrap_or(0)),
                text(&i["format"]),
                i["project"].as_str().unwrap_or("(public)").to_string(),
                text(&i["state"]),
                i["sha256"]
                    .as_str()
                    .map_or(String::new(), |h| h.chars().take(16).collect()),
            ]
        })
        .collect();
    print_table(
        &["NAME", "SIZE", "FORMAT", "PROJECT", "STATE", "SHA256"],
        &rows,
    );
}

/// A progress bar on stderr when it is a terminal; silence otherwise.
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    shown: u64,
    tty: bool,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(what: impl Into<String>, total: u64) -> Self {
        use std::io::IsTerminal;
        Self {
            what: what.into(),
            total: total.max(1),
            done: 0,
            shown: u64::MAX,
            tty: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        let permille = self.done * 1000 / self.total;
        if self.tty && permille != self.shown {
            self.shown = permille;
            let width = 30;
            let filled = (permille * width / 1000) as usize;
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            eprint!(
                "\r{} [{}{}] {:>5.1}% {} of {} ({}/s)  ",
                self.what,
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                permille as f64 / 10.0,
                human_size(self.done),
                human_size(self.total),
                human_size(rate as u64)
            );
        }
    }

    pub fn finish(&mut self) {
        if self.tty {
            eprintln!();
        }
    }
}

pub(super) async fn sha256_file(path: &std::path::Path, len: u64) -> anyhow::Result<String> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut progress = Progress::new("checksumming", len);
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.add(n as u64);
    }
    progress.finish();
    Ok(hex::encode(hasher.finalize()))
}

pub(super) async fn run_image(command: ImageCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        ImageCommand::Import {
            file,
            name,
            sha256,
            project,
            api,
        } => {
            let client = api.resolve()?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            let sha256 = match sha256 {
                Some(h) => h,
                None => sha256_file(&file, len).await?,
            };
            let mut path = format!("/v1/images?name={name}&sha256={sha256}");
            if let Some(p) = &project {
                path.push_str(&format!("&project={p}"));
            }
            let image = client.upload(&path, &file, len).await?;
            emit(api.output, &image, |i| {
                print_images(std::slice::from_ref(i))
            });
        }
        ImageCommand::List { api } => {
            request(&api, Method::GET, "/v1/images", None, |l| {
                print_images(l.as_array().map(Vec::as_slice).unwrap_or_default())
            })
            .await?;
        }
        ImageCommand::Show { name, api } => {
            request(
                &api,
                Method::GET,
                &format!("/v1/images/{name}"),
                None,
                |i| print_images(std::slice::from_ref(i)),
            )
            .await?;
        }
        ImageCommand::Delete { name, api } => {
            request(
                &api,
                Method::DELETE,
                &format!("/v1/images/{name}"),
                None,
                |_| {},
            )
            .await?;
            if api.output == Output::Table {
                println!("Deleted image {name}.");
            }
        }
    }
    Ok(())
}
