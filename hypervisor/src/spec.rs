//! A VM as Allod asks libvirt for it, and its domain XML, rendered in this
//! one place.

use std::fmt::Write as _;

/// The XML namespace of Allod's metadata element.
pub const METADATA_NS: &str = "https://allod.dev/xmlns/domain/1";

/// `kvm` on hardware with virtualisation; `qemu` (TCG emulation) elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtType {
    Kvm,
    Qemu,
}

impl VirtType {
    pub fn parse(text: &str) -> Option<VirtType> {
        match text {
            "kvm" => Some(VirtType::Kvm),
            "qemu" => Some(VirtType::Qemu),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VirtType::Kvm => "kvm",
            VirtType::Qemu => "qemu",
        }
    }
}

/// A disk served over NBD by the node's storage socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The NBD export name (the volume's id).
    pub export: String,
    /// The Unix socket the node's NBD server listens on.
    pub socket: String,
    /// Guest device name: `vda`, `vdb`, ...
    pub target: String,
    pub read_only: bool,
}

/// A NIC on a Linux bridge, with the tap name and MAC the fabric chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub bridge: String,
    pub tap: String,
    /// `52:54:00:xx:xx:xx`.
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// A stable id, also the libvirt domain name (`allod-<id>`).
    pub id: String,
    /// The domain's UUID (8-4-4-4-12 hex).
    pub uuid: String,
    pub virt_type: VirtType,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// In boot order: the first disk boots.
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// Which node this domain belongs to (written into the metadata).
    pub node: String,
    /// The project and VM name, for operators reading `virsh dumpxml`.
    pub project: String,
    pub name: String,
    /// The desired spec's generation, kept in the metadata so a node can
    /// tell whether a defined domain is current.
    pub generation: u64,
    /// A file the serial console is also written to (by virtlogd).
    pub console_log: Option<String>,
}

/// Why a spec cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("{field} {value:?} is invalid: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

fn invalid(field: &'static str, value: impl Into<String>, why: &'static str) -> SpecError {
    SpecError::Invalid {
        field,
        value: value.into(),
        why,
    }
}

/// Escapes text for XML attribute values and element content.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn is_uuid(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_device_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 15
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl DomainSpec {
    /// The libvirt domain name.
    pub fn domain_name(&self) -> String {
        format!("allod-{}", self.id)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.id.is_empty()
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid("id", &self.id, "use letters, digits and '-'"));
        }
        if !is_uuid(&self.uuid) {
            return Err(invalid("uuid", &self.uuid, "not 8-4-4-4-12 hex digits"));
        }
        if self.vcpus == 0 || self.vcpus > 256 {
            return Err(invalid("vcpus", self.vcpus.to_string(), "must be 1 to 256"));
        }
        if self.memory_bytes < (16 << 20) || !self.memory_bytes.is_multiple_of(1 << 20) {
            return Err(invalid(
                "memory_bytes",
                self.memory_bytes.to_string(),
                "must be whole MiB, at least 16 MiB",
            ));
        }
        for disk in &self.disks {
            if !(disk.target.starts_with("vd") && is_device_name(&disk.target)) {
                return Err(invalid("disk target", &disk.target, "use vda, vdb, ..."));
            }
            if disk.export.is_empty() || !disk.socket.starts_with('/') {
                return Err(invalid(
                    "disk",
                    &disk.export,
                    "needs an export name and an absolute socket path",
                ));
            }
        }
        for nic in &self.nics {
            if !is_mac(&nic.mac) {
                return Err(invalid("mac", &nic.mac, "not six hex pairs"));
            }
            if !is_device_name(&nic.tap) || !is_device_name(&nic.bridge) {
                return Err(invalid(
                    "nic",
                    &nic.tap,
                    "tap and bridge names are 1-15 characters",
                ));
            }
        }
        Ok(())
    }

    /// The domain XML libvirt defines the VM from.
    pub fn to_xml(&self) -> Result<String, SpecError> {
        self.validate()?;
        let mut x = String::new();
        let memory_kib = self.memory_bytes / 1024;
        // Writing to a String cannot fail.
        let _ = writeln!(x, "<domain type='{}'>", self.virt_type.as_str());
        let _ = writeln!(x, "  <name>{}</name>", escape(&self.domain_name()));
        let _ = writeln!(x, "  <uuid>{}</uuid>", self.uuid);
        let _ = writeln!(
            x,
            "  <title>{}/{}</title>",
            escape(&self.project),
            escape(&self.name)
        );
        let _ = writeln!(x, "  <metadata>");
        let _ = writeln!(
            x,
            "    <allod:instance xmlns:allod='{METADATA_NS}' id='{}' project='{}' name='{}' node='{}' generation='{}'/>",
            escape(&self.id),
            escape(&self.project),
            escape(&self.name),
            escape(&self.node),
            self.generation
        );
        let _ = writeln!(x, "  </metadata>");
        let _ = writeln!(x, "  <memory unit='KiB'>{memory_kib}</memory>");
        let _ = writeln!(
            x,
            "  <currentMemory unit='KiB'>{memory_kib}</currentMemory>"
        );
        let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", self.vcpus);
        let _ = writeln!(x, "  <os>");
        let _ = writeln!(x, "    <type arch='x86_64' machine='q35'>hvm</type>");
        let _ = writeln!(x, "  </os>");
        let _ = writeln!(x, "  <features>");
        let _ = writeln!(x, "    <acpi/>");
        let _ = writeln!(x, "    <apic/>");
        let _ = writeln!(x, "  </features>");
        match self.virt_type {
            VirtType::Kvm => {
                let _ = writeln!(x, "  <cpu mode='host-passthrough'/>");
            }
            VirtType::Qemu => {
                let _ = writeln!(x, "  <cpu mode='custom' match='exact'>");
                let _ = writeln!(x, "    <model fallback='allow'>qemu64</model>");
                let _ = writeln!(x, "  </cpu>");
            }
        }
        let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
        let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
        let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
        let _ = writeln!(x, "  <devices>");
        for (order, disk) in self.disks.iter().enumerate() {
            let _ = writeln!(x, "    <disk type='network' device='disk'>");
            let _ = writeln!(
                x,
                "      <driver name='qemu' type='raw' cache='none' io='native' discard='unmap'/>"
            );
            let _ = writeln!(
                x,
                "      <source protocol='nbd' name='{}'>",
                escape(&disk.export)
            );
            let _ = writeln!(
                x,
                "        <host transport='unix' socket='{}'/>",
                escape(&disk.socket)
            );
            let _ = writeln!(x, "      </source>");
            let _ = writeln!(x, "      <target dev='{}' bus='virtio'/>", disk.target);
            if disk.read_only {
                let _ = writeln!(x, "      <readonly/>");
            }
            let _ = writeln!(x, "      <boot order='{}'/>", order + 1);
            let _ = writeln!(x, "    </disk>");
        }
        for nic in &self.nics {
            let _ = writeln!(x, "    <interface type='bridge'>");
            let _ = writeln!(x, "      <mac address='{}'/>", nic.mac.to_ascii_lowercase());
            let _ = writeln!(x, "      <source bridge='{}'/>", escape(&nic.bridge));
            let _ = writeln!(x, "      <target dev='{}'/>", escape(&nic.tap));
            let _ = writeln!(x, "      <model type='virtio'/>");
            let _ = writeln!(x, "    </interface>");
        }
        let _ = writeln!(x, "    <serial type='pty'>");
        if let Some(log) = &self.console_log {
            let _ = writeln!(x, "      <log file='{}' append='on'/>", escape(log));
        }
        let _ = writeln!(x, "      <target type='isa-serial' port='0'/>");
        let _ = writeln!(x, "    </serial>");
        let _ = writeln!(x, "    <console type='pty'>");
        let _ = writeln!(x, "      <target type='serial' port='0'/>");
        let _ = writeln!(x, "    </console>");
        let _ = writeln!(x, "    <memballoon model='virtio'/>");
        let _ = writeln!(x, "    <rng model='virtio'>");
        let _ = writeln!(x, "      <backend model='random'>/dev/urandom</backend>");
        let _ = writeln!(x, "    </rng>");
        let _ = writeln!(x, "  </devices>");
        let _ = writeln!(x, "</domain>");
        Ok(x)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(virt_type: VirtType) -> DomainSpec {
        DomainSpec {
            id: "9c1d2e3f4a5b6c7d".into(),
            uuid: "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f".into(),
            virt_type,
            vcpus: 2,
            memory_bytes: 512 << 20,
            disks: vec![
                Disk {
                    export: "a1b2c3d4e5f60718".into(),
                    socket: "/var/lib/allod/nbd.sock".into(),
                    target: "vda".into(),
                    read_only: false,
                },
                Disk {
                    export: "0f1e2d3c4b5a6978".into(),
                    socket: "/var/lib/allod/nbd.sock".into(),
                    target: "vdb".into(),
                    read_only: true,
                },
            ],
            nics: vec![Nic {
                bridge: "br-vni4097".into(),
                tap: "tap9c1d2e3f0".into(),
                mac: "52:54:00:AB:cd:01".into(),
            }],
            node: "rack1-node2".into(),
            project: "shop".into(),
            name: "web<1>".into(),
            generation: 3,
            console_log: (virt_type == VirtType::Qemu)
                .then(|| "/var/lib/allod/console/9c1d2e3f4a5b6c7d.log".into()),
        }
    }

    #[test]
    fn renders_kvm_and_tcg_domains() {
        insta::assert_snapshot!("kvm", sample(VirtType::Kvm).to_xml().unwrap());
        insta::assert_snapshot!("qemu", sample(VirtType::Qemu).to_xml().unwrap());
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        let mut spec = sample(VirtType::Kvm);
        spec.nics[0].mac = "52:54:00:zz:00:01".into();
        assert!(spec.to_xml().unwrap_err().to_string().contains("mac"));
        let mut spec = sample(VirtType::Kvm);
        spec.memory_bytes = 1000;
        assert!(spec
            .to_xml()
            .unwrap_err()
            .to_string()
            .contains("memory_bytes"));
        let mut spec = sample(VirtType::Kvm);
        spec.disks[0].target = "sda".into();
        assert!(spec.to_xml().is_err());
        let mut spec = sample(VirtType::Kvm);
        spec.uuid = "not-a-uuid".into();
        assert!(spec.to_xml().is_err());
        let mut spec = sample(VirtType::Kvm);
        spec.id = "a'b".into();
        assert!(spec.to_xml().is_err());
        assert_eq!(VirtType::parse("kvm"), Some(VirtType::Kvm));
        assert_eq!(VirtType::parse("xen"), None);
    }

    /// libvirt's own schema accepts what we render (`virt-xml-validate`,
    /// from libvirt-clients; `.ci/test` installs it).
    #[test]
    fn libvirt_schema_accepts_the_xml() {
        let dir = tempfile::tempdir().unwrap();
        for virt_type in [VirtType::Kvm, VirtType::Qemu] {
            let path = dir.path().join(format!("{}.xml", virt_type.as_str()));
            std::fs::write(&path, sample(virt_type).to_xml().unwrap()).unwrap();
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .expect("virt-xml-validate (package libvirt-clients) is installed");
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
