//! Checks run before a node joins, changing nothing: the token, every
//! member's peer port, the cluster CA against the token's fingerprint, the
//! clock, the MTU a VXLAN overlay needs, free disk, and libvirt.

use std::path::Path;
use std::time::{Duration, Instant};

use super::app::{Check, Verdict};
use crate::cluster::join::JoinToken;

/// VXLAN adds 50 bytes to every frame of a 1500-byte overlay.
pub const MIN_UNDERLAY_MTU: u32 = 1550;
pub const MAX_CLOCK_SKEW_MS: i64 = 500;
pub const MIN_FREE_DISK_BYTES: u64 = 2 << 30;
const TIMEOUT: Duration = Duration::from_secs(3);

fn check(name: impl Into<String>, verdict: Verdict, detail: String, fix: &str) -> Check {
    Check {
        name: name.into(),
        verdict,
        detail,
        fix: fix.into(),
    }
}

/// Runs every check; one failing does not stop the others.
pub async fn run(token: &JoinToken, data_dir: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let now = crate::cluster::join::now_ms();
    checks.push(if token.expires_at_ms > now {
        check(
            "Join token still valid",
            Verdict::Pass,
            format!("expires in {} min", (token.expires_at_ms - now) / 60_000),
            "",
        )
    } else {
        check(
            "Join token still valid",
            Verdict::Fail,
            format!(
                "the token expired {} s ago",
                (now - token.expires_at_ms) / 1000
            ),
            "create a new one with `allod cluster join-token` on a member",
        )
    });

    let mut local_addr = None;
    let mut reachable_api = None;
    for member in &token.members {
        let name = format!("Member {} reachable ({})", member.name, member.peer_addr);
        match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(&member.peer_addr)).await
        {
            Ok(Ok(stream)) => {
                local_addr = local_addr.or(stream.local_addr().ok());
                reachable_api = reachable_api.or(Some(member.api_addr.clone()));
                checks.push(check(name, Verdict::Pass, "peer port answers".into(), ""));
            }
            Ok(Err(e)) => checks.push(check(
                name,
                Verdict::Fail,
                format!("cannot connect: {e}"),
                "check the address, routing and firewalls between the nodes",
            )),
            Err(_) => checks.push(check(
                name,
                Verdict::Fail,
                format!("no answer within {} s", TIMEOUT.as_secs()),
                "check routing and firewalls between the nodes",
            )),
        }
    }

    match &reachable_api {
        Some(api) => {
            checks.extend(ca_and_clock(api, &token.ca_fingerprint).await);
        }
        None => checks.push(check(
            "Cluster CA matches the token",
            Verdict::Fail,
            "no member could be reached to compare".into(),
            "make a member reachable first",
        )),
    }

    checks.push(mtu_check(local_addr));
    checks.push(disk_check(data_dir));
    checks.push(libvirt_check().await);
    checks
}

/// The first 16 characters of a fingerprint, for showing.
fn prefix(fingerprint: &str) -> String {
    fingerprint.chars().take(16).collect()
}

async fn ca_and_clock(api: &str, fingerprint: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    // Unverified on purpose: what the member presents is what is checked.
    let http = match reqwest::Client::builder()
        .use_preconfigured_tls(crate::cluster::pki::unverified_client_config())
        .timeout(TIMEOUT)
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            return vec![check(
                "Cluster CA matches the token",
                Verdict::Fail,
                e.to_string(),
                "",
            )]
        }
    };
    let ca = async {
        let pem = http
            .get(format!("https://{api}/v1/cluster/ca"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        anyhow::Ok(crate::cluster::pki::pem_fingerprint(&pem)?)
    };
    checks.push(match ca.await {
        Ok(seen) if seen.eq_ignore_ascii_case(fingerprint) => check(
            "Cluster CA matches the token",
            Verdict::Pass,
            format!("SHA-256 {}...", prefix(&seen)),
            "",
        ),
        Ok(seen) => check(
            "Cluster CA matches the token",
            Verdict::Fail,
            format!(
                "the member presents CA {}..., the token names {}...",
                prefix(&seen),
                prefix(fingerprint)
            ),
            "the token is not from this cluster (or something is in the way); get a new one from a member you trust",
        ),
        Err(e) => check(
            "Cluster CA matches the token",
            Verdict::Fail,
            format!("cannot read the member's CA: {e:#}"),
            "check that the member's API port is reachable",
        ),
    });
    let clock = async {
        let sent = Instant::now();
        let before = crate::cluster::join::now_ms();
        let health: serde_json::Value = http
            .get(format!("https://{api}/healthz"))
            .send()
            .await?
            .json()
            .await?;
        let round_trip = sent.elapsed().as_millis() as u64;
        let theirs = health["time_ms"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("the member does not report its time"))?;
        anyhow::Ok((theirs as i64 - (before + round_trip / 2) as i64, round_trip))
    };
    checks.push(match clock.await {
        Ok((skew, _)) if skew.abs() <= MAX_CLOCK_SKEW_MS => check(
            "Clock within 500 ms of the cluster",
            Verdict::Pass,
            format!("{skew:+} ms"),
            "",
        ),
        Ok((skew, _)) => check(
            "Clock within 500 ms of the cluster",
            Verdict::Fail,
            format!(
                "this clock is {} ms {}",
                skew.abs(),
                if skew > 0 { "behind" } else { "ahead" }
            ),
            "configure NTP with the same servers as the cluster",
        ),
        Err(e) => check(
            "Clock within 500 ms of the cluster",
            Verdict::Fail,
            format!("{e:#}"),
            "check that the member's API port is reachable",
        ),
    });
    checks
}

fn mtu_check(local: Option<std::net::SocketAddr>) -> Check {
    let name = "MTU large enough for VXLAN";
    let Some(local) = local else {
        return check(
            name,
            Verdict::Fail,
            "no member reached, so the interface is unknown".into(),
            "make a member reachable first",
        );
    };
    let ip = local.ip().to_string();
    match super::facts::interfaces()
        .into_iter()
        .find(|i| i.addresses.contains(&ip))
    {
        Some(iface) if iface.mtu >= MIN_UNDERLAY_MTU => check(
            name,
            Verdict::Pass,
            format!("{} has MTU {}", iface.name, iface.mtu),
            "",
        ),
        Some(iface) => check(
            name,
            Verdict::Fail,
            format!(
                "{} has MTU {}; overlays need {MIN_UNDERLAY_MTU}",
                iface.name, iface.mtu
            ),
            "raise the MTU of the management network (switches too), e.g. to 9000",
        ),
        None => check(
            name,
            Verdict::Warn,
            format!("no interface holds {ip}"),
            "check the network configuration",
        ),
    }
}

fn disk_check(data_dir: &Path) -> Check {
    let name = "Free disk for the node's state";
    let probe = if data_dir.exists() {
        data_dir
    } else {
        data_dir.parent().unwrap_or(Path::new("/"))
    };
    match nix::sys::statvfs::statvfs(probe) {
        Ok(stat) => {
            let free = stat.blocks_available() * stat.fragment_size();
            let text = crate::units::human_size(free);
            if free >= MIN_FREE_DISK_BYTES {
                check(name, Verdict::Pass, format!("{text} free"), "")
            } else {
                check(
                    name,
                    Verdict::Fail,
                    format!("only {text} free; at least 2 GiB is needed"),
                    "free space on the data disk",
                )
            }
        }
        Err(e) => check(
            name,
            Verdict::Fail,
            format!("cannot read {}: {e}", probe.display()),
            "",
        ),
    }
}

async fn libvirt_check() -> Check {
    let name = "libvirt answering";
    for path in ["/run/libvirt/libvirt-sock", "/var/run/libvirt/libvirt-sock"] {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return check(name, Verdict::Pass, format!("{path} accepts"), "");
        }
    }
    check(
        name,
        Verdict::Warn,
        "libvirtd is not running: the node can join, but will run no VMs".into(),
        "start libvirtd (and virtlogd)",
    )
}
