//! What the console shows of the machine: read from `/proc`, `/sys` and the
//! kernel's interface list, never changed.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub hostname: String,
    pub cpus: u64,
    pub cpu_model: String,
    pub memory_bytes: u64,
    /// Why hardware virtualisation cannot be used; `None` when it can.
    pub no_virtualization: Option<String>,
    pub interfaces: Vec<Interface>,
    pub disks: Vec<Disk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub up: bool,
    pub mtu: u32,
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn interfaces() -> Vec<Interface> {
    let mut found: Vec<Interface> = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let dir = entry.path();
        found.push(Interface {
            up: matches!(read(dir.join("operstate")).as_str(), "up" | "unknown")
                && read(dir.join("carrier")) != "0",
            mtu: read(dir.join("mtu")).parse().unwrap_or(0),
            addresses: Vec::new(),
            name,
        });
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for addr in addrs {
            let Some(address) = addr.address else {
                continue;
            };
            let text = if let Some(v4) = address.as_sockaddr_in() {
                v4.ip().to_string()
            } else if let Some(v6) = address.as_sockaddr_in6() {
                v6.ip().to_string()
            } else {
                continue;
            };
            if let Some(iface) = found.iter_mut().find(|i| i.name == addr.interface_name) {
                iface.addresses.push(text);
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

pub fn collect() -> NodeFacts {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or_default();
    let no_virtualization = if !(flags.contains(" vmx") || flags.contains(" svm")) {
        Some("the CPU shows no vmx/svm: guests run emulated (virt type qemu), slowly".to_string())
    } else if !Path::new("/dev/kvm").exists() {
        Some(
            "/dev/kvm is missing: load the kvm module, or enable virtualisation in the firmware"
                .to_string(),
        )
    } else {
        None
    };
    let (cpus, memory_bytes) = crate::daemon::local_capacity();
    let mut disks = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if ["loop", "ram", "zram", "sr", "dm-"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                continue;
            }
            let sectors: u64 = read(entry.path().join("size")).parse().unwrap_or(0);
            disks.push(Disk {
                size_bytes: sectors * 512,
                model: read(entry.path().join("device/model")),
                name,
            });
        }
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    NodeFacts {
        hostname: read("/proc/sys/kernel/hostname"),
        cpus,
        cpu_model,
        memory_bytes,
        no_virtualization,
        interfaces: interfaces(),
        disks,
    }
}
