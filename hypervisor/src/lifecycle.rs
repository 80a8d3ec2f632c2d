//! Lifecycle through libvirt (the `virt` bindings): define, start, ACPI
//! shutdown, destroy, reboot, undefine, and what this node's domains are
//! doing. Calls block; callers run them on a blocking thread.
//!
//! Only domains named `allod-…` whose Allod metadata element names this
//! node are ever listed or changed; anything else on the hypervisor (other
//! tools' domains, other nodes' in a shared libvirtd) is left alone.

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::sys;

use crate::spec::{DomainSpec, METADATA_NS};

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("domain {name}: {message}")]
    Domain { name: String, message: String },
    #[error("domain {name} exists but is not Allod's for this node; it is left alone")]
    NotOurs { name: String },
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
}

/// What a domain is doing, in the words the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Running,
    Paused,
    ShuttingDown,
    Stopped,
    Crashed,
}

/// One of this node's domains as libvirt has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The VM id from the metadata.
    pub id: String,
    pub generation: u64,
    pub power: Power,
}

pub struct Hypervisor {
    conn: Connect,
    uri: String,
    node: String,
    /// Other nodes (as the metadata names them) whose shut-off domains this
    /// node may define over: nodes its cluster declared dead, whose VMs it
    /// now runs. Only where nodes share one libvirtd; each node has its own
    /// on an appliance.
    replaceable: std::sync::Mutex<Vec<String>>,
}

pub(crate) fn domain_err(name: &str) -> impl FnOnce(virt::error::Error) -> HvError + '_ {
    move |e| HvError::Domain {
        name: name.to_string(),
        message: e.to_string(),
    }
}

/// Reads one attribute of Allod's metadata element.
fn attribute(xml: &str, name: &str) -> Option<String> {
    let key = format!(" {name}='");
    let (start, quote) = match xml.find(&key) {
        Some(i) => (i + key.len(), '\''),
        None => {
            let key = format!(" {name}=\"");
            (xml.find(&key)? + key.len(), '"')
        }
    };
    let end = xml[start..].find(quote)? + start;
    Some(
        xml[start..end]
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

impl Hypervisor {
    /// Connects to libvirt; `node` is this node's id as the metadata names it.
    pub fn connect(uri: &str, node: &str) -> Result<Self, HvError> {
        // libvirt prints every error to stderr by default; ours carry them.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|e| HvError::Connect {
            uri: uri.to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            conn,
            uri: uri.to_string(),
            node: node.to_string(),
            replaceable: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn conn(&self) -> &Connect {
        &self.conn
    }

    /// The nodes whose shut-off domains [`Hypervisor::define`] may replace.
    pub fn set_replaceable(&self, nodes: Vec<String>) {
        *self.replaceable.lock().expect("replaceable nodes") = nodes;
    }

    /// Whether the connection still answers (libvirtd may have restarted).
    pub fn alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// (id, generation) from a domain's metadata when it is ours.
    fn ours(&self, dom: &Domain) -> Option<(String, u64)> {
        let name = dom.name().ok()?;
        name.strip_prefix("allod-")?;
        let meta = dom
            .metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(METADATA_NS),
                0,
            )
            .ok()?;
        if attribute(&meta, "node")? != self.node {
            return None;
        }
        let id = attribute(&meta, "id")?;
        let generation = attribute(&meta, "generation")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        Some((id, generation))
    }

    fn power(dom: &Domain) -> Power {
        match dom.state() {
            Ok((virt::enumutil::Enum::Known(state), _)) => match state {
                DomainState::Running | DomainState::Blocked => Power::Running,
                DomainState::Paused | DomainState::PMSuspended => Power::Paused,
                DomainState::Shutdown => Power::ShuttingDown,
                DomainState::Crashed => Power::Crashed,
                DomainState::Shutoff | DomainState::NoState => Power::Stopped,
            },
            _ => Power::Stopped,
        }
    }

    /// This node's domains.
    pub fn list(&self) -> Result<Vec<Observed>, HvError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|e| HvError::Connect {
                uri: self.uri.clone(),
                message: e.to_string(),
            })?;
        Ok(domains
            .iter()
            .filter_map(|d| {
                let (id, generation) = self.ours(d)?;
                Some(Observed {
                    id,
                    generation,
                    power: Self::power(d),
                })
            })
            .collect())
    }

    /// Our domain by VM id, or `None`; a same-named domain that is not ours
    /// is an error.
    pub(crate) fn lookup(&self, id: &str) -> Result<Option<Domain>, HvError> {
        let name = format!("allod-{id}");
        match self.conn.lookup_domain_by_name(&name) {
            Ok(d) => match self.ours(&d) {
                Some(_) => Ok(Some(d)),
                None => Err(HvError::NotOurs { name }),
            },
            Err(e)
                if e.code() == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain) =>
            {
                Ok(None)
            }
            Err(e) => Err(domain_err(&name)(e)),
        }
    }

    /// Whether a domain that is not ours is a shut-off one of a node the
    /// cluster declared dead.
    fn replaceable(&self, name: &str) -> bool {
        let Ok(dom) = self.conn.lookup_domain_by_name(name) else {
            return false;
        };
        let owner = dom
            .metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(METADATA_NS),
                0,
            )
            .ok()
            .and_then(|meta| attribute(&meta, "node"));
        let dead = owner.is_some_and(|o| {
            self.replaceable
                .lock()
                .expect("replaceable nodes")
                .contains(&o)
        });
        dead && !dom.is_active().unwrap_or(true)
    }

    /// Defines (or redefines: libvirt keeps one definition per name) the
    /// domain; a running domain takes the new definition when it next starts.
    pub fn define(&self, spec: &DomainSpec) -> Result<(), HvError> {
        let xml = spec.to_xml()?;
        // Refuses to overwrite someone else's domain of the same name,
        // unless a dead node left it shut off.
        match self.lookup(&spec.id) {
            Err(HvError::NotOurs { name }) if self.replaceable(&name) => {}
            other => {
                other?;
            }
        }
        self.conn
            .define_domain_xml(&xml)
            .map(drop)
            .map_err(domain_err(&spec.domain_name()))
    }

    pub(crate) fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Domain) -> Result<T, virt::error::Error>,
    ) -> Result<Option<T>, HvError> {
        match self.lookup(id)? {
            Some(d) => f(&d).map(Some).map_err(domain_err(&format!("allod-{id}"))),
            None => Ok(None),
        }
    }

    /// Starts a defined domain (nothing if it runs).
    pub fn start(&self, id: &str) -> Result<bool, HvError> {
        self.with(id, |d| {
            if d.is_active()? {
                Ok(false)
            } else {
                d.create().map(|()| true)
            }
        })
        .map(|r| r.unwrap_or(false))
    }

    /// Asks the guest to power off (ACPI power button).
    pub fn shutdown(&self, id: &str) -> Result<(), HvError> {
        self.with(id, |d| if d.is_active()? { d.shutdown() } else { Ok(()) })
            .map(drop)
    }

    /// Pulls the plug.
    pub fn destroy(&self, id: &str) -> Result<(), HvError> {
        self.with(id, |d| if d.is_active()? { d.destroy() } else { Ok(()) })
            .map(drop)
    }

    /// Resets a running domain.
    pub fn reboot(&self, id: &str) -> Result<(), HvError> {
        self.with(id, |d| if d.is_active()? { d.reset() } else { Ok(()) })
            .map(drop)
    }

    /// Stops (forcibly) and removes the definition.
    pub fn undefine(&self, id: &str) -> Result<(), HvError> {
        self.with(id, |d| {
            if d.is_active()? {
                d.destroy()?;
            }
            d.undefine()
        })
        .map(drop)
    }

    pub fn power_of(&self, id: &str) -> Result<Option<Power>, HvError> {
        Ok(self.lookup(id)?.map(|d| Self::power(&d)))
    }

    /// The pty the serial console is on, while the domain runs.
    pub fn console_pty(&self, id: &str) -> Result<Option<String>, HvError> {
        let xml = self.with(id, |d| d.xml_desc(0))?;
        Ok(xml.and_then(|x| {
            let serial = &x[x
                .find("<serial type='pty'>")
                .or_else(|| x.find("<serial type=\"pty\">"))?..];
            let source = &serial[..serial.find("</serial>")?];
            let at = source.find("<source path=")?;
            attribute(&source[at - 1..], "path")
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{tests::sample, VirtType};

    fn spec(id: &str, node: &str) -> DomainSpec {
        DomainSpec {
            id: id.into(),
            uuid: format!("{}-0000-4000-8000-{}", &id[..8], &id[4..]),
            node: node.into(),
            nics: Vec::new(),
            ..sample(VirtType::Qemu)
        }
    }

    #[test]
    fn metadata_attributes_are_read_back() {
        let xml = "<instance xmlns='x' id='ab12' node='3' generation=\"7\" name='a&apos;b'/>";
        assert_eq!(attribute(xml, "id").as_deref(), Some("ab12"));
        assert_eq!(attribute(xml, "generation").as_deref(), Some("7"));
        assert_eq!(attribute(xml, "name").as_deref(), Some("a'b"));
        assert_eq!(attribute(xml, "missing"), None);
    }

    /// The whole lifecycle on libvirt's in-process test driver.
    #[test]
    fn lifecycle_on_the_test_driver_touches_only_our_domains() {
        let hv = Hypervisor::connect("test:///default", "7").unwrap();
        // The test driver starts with a domain called "test": not ours.
        assert!(hv.list().unwrap().is_empty());
        let mut s = spec("0123456789abcdef", "7");
        hv.define(&s).unwrap();
        assert_eq!(
            hv.list().unwrap(),
            vec![Observed {
                id: s.id.clone(),
                generation: 3,
                power: Power::Stopped
            }]
        );
        // Redefining is idempotent and takes the new generation.
        s.generation = 4;
        hv.define(&s).unwrap();
        hv.define(&s).unwrap();
        assert_eq!(hv.list().unwrap().len(), 1);
        assert_eq!(hv.list().unwrap()[0].generation, 4);
        assert!(hv.start(&s.id).unwrap());
        assert!(
            !hv.start(&s.id).unwrap(),
            "starting a running domain does nothing"
        );
        assert_eq!(hv.power_of(&s.id).unwrap(), Some(Power::Running));
        hv.reboot(&s.id).unwrap();
        hv.destroy(&s.id).unwrap();
        assert_eq!(hv.power_of(&s.id).unwrap(), Some(Power::Stopped));
        hv.start(&s.id).unwrap();
        hv.shutdown(&s.id).unwrap();
        assert_eq!(hv.power_of(&s.id).unwrap(), Some(Power::Stopped));
        // Another node's domain in the same libvirt is invisible to us, and
        // we cannot change it.
        let other = spec("fedcba9876543210", "8");
        let hv8 = Hypervisor {
            conn: hv.conn.clone(),
            uri: hv.uri.clone(),
            node: "8".into(),
            replaceable: Default::default(),
        };
        hv8.define(&other).unwrap();
        assert_eq!(hv8.list().unwrap().len(), 1);
        assert_eq!(hv.list().unwrap().len(), 1, "only node 7's own domain");
        assert!(matches!(hv.start(&other.id), Err(HvError::NotOurs { .. })));
        assert_eq!(hv8.power_of(&other.id).unwrap(), Some(Power::Stopped));
        // Node 8 declared dead: node 7 may define over its shut-off domain
        // (the VM was restarted on node 7), never over a running one.
        let mut moved = other.clone();
        moved.node = "7".into();
        hv8.start(&other.id).unwrap();
        hv.set_replaceable(vec!["8".into()]);
        assert!(matches!(hv.define(&moved), Err(HvError::NotOurs { .. })));
        hv8.destroy(&other.id).unwrap();
        hv.set_replaceable(Vec::new());
        assert!(matches!(hv.define(&moved), Err(HvError::NotOurs { .. })));
        hv.set_replaceable(vec!["8".into()]);
        hv.define(&moved).unwrap();
        assert_eq!(hv.list().unwrap().len(), 2);
        assert!(hv8.list().unwrap().is_empty());
        hv.undefine(&moved.id).unwrap();
        hv.undefine(&s.id).unwrap();
        assert!(hv.list().unwrap().is_empty());
        assert_eq!(hv.power_of(&s.id).unwrap(), None);
        // The driver's own domain is still there, untouched.
        let test = hv.conn.lookup_domain_by_name("test").unwrap();
        assert!(test.is_active().unwrap());
        // A domain named like ours but without our metadata is refused.
        let mut foreign = spec("1111222233334444", "7");
        foreign.id = "1111222233334444".into();
        let xml = foreign
            .to_xml()
            .unwrap()
            .replace(METADATA_NS, "https://example.org/other");
        hv.conn.define_domain_xml(&xml).unwrap();
        assert!(matches!(hv.define(&foreign), Err(HvError::NotOurs { .. })));
        assert!(matches!(
            hv.start(&foreign.id),
            Err(HvError::NotOurs { .. })
        ));
        assert!(hv.list().unwrap().is_empty());
    }
}
