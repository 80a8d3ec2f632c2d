//! A node's own setup: host name, management network, time servers and the
//! disks Allod may use. The agent validates a whole setup before changing
//! anything, applies the kernel side through netlink (address, link up,
//! default route) and `sethostname`, and keeps the setup in
//! `DATA_DIR/setup.json`, from which the appliance's boot configures what
//! lives outside the kernel (DHCP client, resolver, NTP).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt as _;
use serde::{Deserialize, Serialize};

use crate::daemon::disks::DiskRecord;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSetup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management: Option<Management>,
    #[serde(default)]
    pub ntp: Vec<String>,
    /// Whole disks (`/dev/...`) Allod may use for volumes.
    #[serde(default)]
    pub storage_disks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Management {
    pub interface: String,
    /// Address by DHCP (the appliance's client) rather than `address`.
    #[serde(default)]
    pub dhcp: bool,
    /// `ADDRESS/PREFIX`, e.g. `10.0.0.7/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

/// A setup that passed validation, in the kernel's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub hostname: Option<String>,
    pub interface: Option<String>,
    pub address: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub wipe: Vec<PathBuf>,
    /// New storage disks: a file system is made on each and mounted.
    pub format: Vec<String>,
    /// Storage disks this node already uses, left as they are.
    pub kept: Vec<String>,
}

fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("address {text:?} needs a prefix length, e.g. 10.0.0.7/24"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("prefix length {prefix:?} must be 1 to 32"))?;
    Ok((ip, prefix))
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

/// The whole disk a block device (or one of its partitions) belongs to.
fn disk_of(device: &str) -> Option<String> {
    let name = Path::new(device).file_name()?.to_str()?.to_string();
    if Path::new("/sys/block").join(&name).exists() {
        return Some(name);
    }
    let link = std::fs::canonicalize(Path::new("/sys/class/block").join(&name)).ok()?;
    link.parent()?.file_name()?.to_str().map(str::to_string)
}

/// Disks holding a mounted file system (the boot disk among them); Allod
/// never takes those.
pub fn disks_in_use() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut disks: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|d| d.starts_with("/dev/"))
        .filter_map(disk_of)
        .collect();
    disks.sort();
    disks.dedup();
    disks
}

/// Whether a disk holds anything: partitions, or any non-zero byte in its
/// first and last MiB (partition tables and file-system signatures).
fn has_data(disk: &str) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let sys = Path::new("/sys/block").join(disk);
    let partitioned = std::fs::read_dir(&sys)?
        .flatten()
        .any(|e| e.path().join("partition").exists());
    if partitioned {
        return Ok(true);
    }
    let mut file = std::fs::File::open(Path::new("/dev").join(disk))?;
    let size = file.seek(SeekFrom::End(0))?;
    let mut buf = vec![0u8; 1 << 20];
    for offset in [0, size.saturating_sub(1 << 20)] {
        file.seek(SeekFrom::Start(offset))?;
        let n = file.read(&mut buf)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

impl NodeSetup {
    /// Checks the whole setup against this machine, whose storage disks so
    /// far are `known`; nothing changes.
    pub fn plan(&self, wipe: &[String], known: &[DiskRecord]) -> Result<Plan, String> {
        if let Some(host) = &self.hostname {
            for label in host.split('.') {
                crate::state::validate_name("host", label).map_err(|e| e.message)?;
            }
        }
        for server in &self.ntp {
            if server.is_empty() || server.contains(char::is_whitespace) {
                return Err(format!(
                    "NTP server {server:?} is not a host name or address"
                ));
            }
        }
        let (mut interface, mut address, mut gateway) = (None, None, None);
        if let Some(m) = &self.management {
            if !Path::new("/sys/class/net").join(&m.interface).exists() {
                return Err(format!(
                    "interface {:?} does not exist on this machine; the console lists them",
                    m.interface
                ));
            }
            interface = Some(m.interface.clone());
            match (m.dhcp, &m.address) {
                (true, Some(_)) => {
                    return Err("choose DHCP or a static address, not both".into());
                }
                (false, None) => {
                    return Err(
                        "a static setup needs --address ADDRESS/PREFIX (or use --dhcp)".into(),
                    )
                }
                (true, None) => {
                    if m.gateway.is_some() {
                        return Err("with DHCP the gateway comes from the DHCP server".into());
                    }
                }
                (false, Some(cidr)) => {
                    let (ip, prefix) = parse_cidr(cidr)?;
                    if let Some(gw) = &m.gateway {
                        let gw: Ipv4Addr = gw
                            .parse()
                            .map_err(|_| format!("gateway {gw:?} is not an IPv4 address"))?;
                        if !same_subnet(ip, gw, prefix) || gw == ip {
                            return Err(format!("gateway {gw} is not another address of {cidr}"));
                        }
                        gateway = Some(gw);
                    }
                    address = Some((ip, prefix));
                }
            }
            for dns in &m.dns {
                dns.parse::<IpAddr>()
                    .map_err(|_| format!("DNS server {dns:?} is not an IP address"))?;
            }
        }
        // Disks already this node's storage disks hold its objects: they are
        // kept as they are (never wiped), and none may be taken back.
        let ours: Vec<(&String, DiskRecord)> = self
            .storage_disks
            .iter()
            .filter_map(|d| crate::daemon::disks::is_ours(d, known).map(|r| (d, r)))
            .collect();
        if let Some(gone) = known
            .iter()
            .find(|k| !ours.iter().any(|(_, r)| r.uuid == k.uuid))
        {
            let device = crate::daemon::disks::find(gone)
                .map_or_else(|| gone.device.clone(), |d| d.display().to_string());
            return Err(format!(
                "{device} is a storage disk of this node (file system {}) and holds its objects; list it \
                 again with --storage-disk. A storage disk cannot be taken back from a node: \
                 remove the node from the cluster (`allod cluster remove`) to free its disks",
                gone.uuid
            ));
        }
        let kept: Vec<String> = ours.iter().map(|(d, _)| (*d).clone()).collect();
        let in_use = disks_in_use();
        let mut wiped = Vec::new();
        let mut format = Vec::new();
        for device in self
            .storage_disks
            .iter()
            .chain(wipe)
            .filter(|d| !kept.contains(d))
        {
            let disk = device.strip_prefix("/dev/").unwrap_or(device);
            if !Path::new("/sys/block").join(disk).exists() {
                return Err(format!("{device} is not a whole disk on this machine"));
            }
            if in_use.iter().any(|d| d == disk) {
                return Err(format!(
                    "{device} holds a mounted file system (the boot disk?); Allod never uses it"
                ));
            }
        }
        for device in wipe {
            if !self.storage_disks.contains(device) {
                return Err(format!("--wipe {device}: wipe only a disk given to Allod"));
            }
        }
        for device in self.storage_disks.iter().filter(|d| !kept.contains(d)) {
            let disk = device.strip_prefix("/dev/").unwrap_or(device);
            if format.contains(device) {
                return Err(format!("{device} is listed twice"));
            }
            format.push(device.clone());
            if wipe.contains(device) {
                wiped.push(Path::new("/dev").join(disk));
            } else if has_data(disk).map_err(|e| format!("cannot read {device}: {e}"))? {
                return Err(format!(
                    "{device} holds data (partitions or a file system); to erase it, list it to wipe too (--wipe {device})"
                ));
            }
        }
        Ok(Plan {
            hostname: self.hostname.clone(),
            interface,
            address,
            gateway,
            wipe: wiped,
            format,
            kept,
        })
    }
}

/// Zeroes a disk's first and last MiB: partition tables and signatures.
fn wipe(device: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(device)?;
    let size = file.seek(SeekFrom::End(0))?;
    let zeros = vec![0u8; (1 << 20).min(size as usize)];
    for offset in [0, size.saturating_sub(zeros.len() as u64)] {
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&zeros)?;
    }
    file.sync_all()
}

/// Applies a validated plan; says what it did, step by step. Storage disks
/// are recorded in `data_dir`.
pub async fn apply(
    plan: &Plan,
    data_dir: &Path,
    progress: &(dyn Fn(String) + Send + Sync),
) -> anyhow::Result<()> {
    if let Some(host) = &plan.hostname {
        nix::unistd::sethostname(host)?;
        progress(format!("Host name set to {host}"));
    }
    if let Some(name) = &plan.interface {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let connection = tokio::spawn(connection);
        let outcome = async {
            let link = handle
                .link()
                .get()
                .match_name(name.clone())
                .execute()
                .try_next()
                .await?
                .ok_or_else(|| anyhow::anyhow!("interface {name} disappeared"))?;
            let index = link.header.index;
            handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await?;
            progress(format!("{name} is up"));
            if let Some((ip, prefix)) = plan.address {
                handle
                    .address()
                    .add(index, IpAddr::V4(ip), prefix)
                    .replace()
                    .execute()
                    .await?;
                progress(format!("{name} has {ip}/{prefix}"));
            }
            if let Some(gw) = plan.gateway {
                let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gw)
                    .output_interface(index)
                    .build();
                handle.route().add(route).replace().execute().await?;
                progress(format!("Default route via {gw}"));
            }
            anyhow::Ok(())
        }
        .await;
        connection.abort();
        outcome?;
    }
    for device in &plan.wipe {
        wipe(device)?;
        progress(format!("Wiped {}", device.display()));
    }
    for device in &plan.kept {
        progress(format!(
            "{device} is already a storage disk of this node; kept as it is"
        ));
    }
    for device in &plan.format {
        progress(format!("Making a file system on {device}"));
        let data_dir = data_dir.to_owned();
        let dev = device.clone();
        let disk =
            tokio::task::spawn_blocking(move || crate::daemon::disks::prepare(&data_dir, &dev))
                .await??;
        progress(format!(
            "{device} is storage disk {} ({} MiB); the block store takes it into use when it next starts",
            disk.uuid,
            disk.capacity_bytes >> 20
        ));
    }
    Ok(())
}

/// Where a node keeps its setup.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("setup.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn static_setup(address: &str, gateway: Option<&str>) -> NodeSetup {
        NodeSetup {
            management: Some(Management {
                interface: "lo".into(),
                dhcp: false,
                address: Some(address.into()),
                gateway: gateway.map(str::to_string),
                dns: vec!["9.9.9.9".into()],
            }),
            ..NodeSetup::default()
        }
    }

    #[test]
    fn plans_refuse_bad_input_with_the_reason() {
        assert!(static_setup("10.0.0.7/24", Some("10.0.0.1"))
            .plan(&[], &[])
            .is_ok());
        let error = |s: NodeSetup| s.plan(&[], &[]).unwrap_err();
        assert!(error(static_setup("10.0.0.7", None)).contains("prefix length"));
        assert!(
            error(static_setup("10.0.0.7/24", Some("10.0.1.1"))).contains("not another address")
        );
        assert!(error(static_setup("10.0.0.300/24", None)).contains("not an IPv4"));
        let mut no_iface = static_setup("10.0.0.7/24", None);
        no_iface.management.as_mut().unwrap().interface = "nope0".into();
        assert!(error(no_iface).contains("does not exist"));
        let bad_host = NodeSetup {
            hostname: Some("Bad_Host".into()),
            ..NodeSetup::default()
        };
        assert!(error(bad_host).contains("invalid"));
        let boot = NodeSetup {
            storage_disks: disks_in_use()
                .into_iter()
                .map(|d| format!("/dev/{d}"))
                .collect(),
            ..NodeSetup::default()
        };
        if !boot.storage_disks.is_empty() {
            assert!(error(boot).contains("mounted file system"));
        }
        let missing = NodeSetup {
            storage_disks: vec!["/dev/nope".into()],
            ..NodeSetup::default()
        };
        assert!(error(missing).contains("not a whole disk"));
        // A storage disk the node uses cannot be left out.
        let known = [DiskRecord {
            uuid: "0f0e0d0c-0b0a-0908-0706-050403020100".into(),
            device: "/dev/sdz".into(),
            capacity_bytes: 1 << 30,
        }];
        let message = NodeSetup::default().plan(&[], &known).unwrap_err();
        assert!(
            message.contains("/dev/sdz") && message.contains("cannot be taken back"),
            "{message}"
        );
    }
}
