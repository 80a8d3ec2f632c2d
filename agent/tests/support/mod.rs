//! What the process-level tests share: a three-node cluster of real
//! `allod agent` processes driven through the CLI, and a bootable test disk
//! built from the guest kit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use storage::{MapNode, ObjectStore, StorageMap};

pub mod nbd;

pub const BIN: &str = env!("CARGO_BIN_EXE_allod");

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub dirs: Vec<PathBuf>,
    pub children: Vec<Child>,
    pub env: Vec<(String, String)>,
    /// (api, peer) ports of each node, kept across restarts.
    ports: Vec<(u16, u16)>,
    extra: Vec<String>,
    /// Agents run in mount namespaces of their own (what they mount
    /// goes away with them).
    private_mounts: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Kept for reading when asked (ALLOD_KEEP_LOGS=DIR).
        if let Some(keep) = std::env::var_os("ALLOD_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            for dir in &self.dirs {
                let log = dir.with_extension("log");
                let _ = std::fs::copy(&log, Path::new(&keep).join(log.file_name().unwrap()));
            }
        }
        // A failed test shows what the agents said last.
        if std::thread::panicking() {
            for dir in &self.dirs {
                let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(80).collect();
                eprintln!("--- the last lines of {}.log:", dir.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(
    dir: &Path,
    name: &str,
    ports: (u16, u16),
    extra: &[String],
    private_mounts: bool,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    let mut command = if private_mounts {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    command
        .args(["agent", "--data-dir", dir.to_str().unwrap(), "--name", name])
        .args(["--api-listen", &format!("127.0.0.1:{}", ports.0)])
        .args(["--peer-listen", &format!("127.0.0.1:{}", ports.1)])
        .args(["--storage-listen", "127.0.0.1:0"])
        // `{node}` in a flag is the node's number: per-node settings.
        .args(extra.iter().map(|a| a.replace("{node}", &name[1..])))
        // Agents sharing the host's network namespace would each own its
        // `al*` links and `allod` tables: one at most builds networks.
        .args(if extra.iter().any(|a| a == "--network-fabric") {
            &[][..]
        } else {
            &["--network-fabric", "off"][..]
        })
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Three agents with `extra` flags, joined into one cluster.
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::start_nodes(3, extra).await
    }

    /// `count` agents with `extra` flags, joined into one cluster.
    pub async fn start_nodes(count: usize, extra: &[&str]) -> Self {
        Self::start_prepared(count, extra, false, |_, _| {}).await
    }

    /// Like [`Cluster::start_nodes`], with `prepare(i, data_dir)` run once
    /// each agent is up and before it joins (e.g. `allod node setup`),
    /// and agents in mount namespaces of their own if `private_mounts`.
    pub async fn start_prepared(
        count: usize,
        extra: &[&str],
        private_mounts: bool,
        prepare: impl Fn(usize, &Path),
    ) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let tmp = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 1..=count {
            let dir = tmp.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let p = (free_port(), free_port());
            children.push(spawn(&dir, &format!("n{i}"), p, &extra, private_mounts));
            ports.push(p);
            let sock = dir.join("admin.sock");
            crate::common::wait_for("admin socket", Duration::from_secs(20), || sock.exists())
                .await;
            prepare(i - 1, &dir);
            dirs.push(dir);
        }
        let d = |i: usize| dirs[i].to_str().unwrap().to_string();
        run(BIN, &["cluster", "init", "--data-dir", &d(0)]);
        for i in 1..count {
            let token = run(BIN, &["cluster", "join-token", "--data-dir", &d(0)])
                .trim()
                .to_string();
            run(
                BIN,
                &["cluster", "join", "--data-dir", &d(i), "--token", &token],
            );
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dirs[0].join("node.json")).unwrap())
                .unwrap();
        let env = vec![
            (
                "ALLOD_URL".to_string(),
                format!("https://{}", config["api_addr"].as_str().unwrap()),
            ),
            (
                "ALLOD_TOKEN".to_string(),
                std::fs::read_to_string(dirs[0].join("admin.token"))
                    .unwrap()
                    .trim()
                    .to_string(),
            ),
            (
                "ALLOD_CA".to_string(),
                dirs[0].join("ca.pem").to_str().unwrap().to_string(),
            ),
        ];
        let cluster = Cluster {
            tmp,
            dirs,
            children,
            env,
            ports,
            extra,
            private_mounts,
        };
        cluster.wait_for_block_stores(count).await;
        cluster
    }

    /// Starts one more agent and joins it to the cluster; returns its index.
    pub async fn add_node(&mut self) -> usize {
        let i = self.dirs.len();
        let dir = self.tmp.path().join(format!("n{}", i + 1));
        std::fs::create_dir_all(&dir).unwrap();
        let p = (free_port(), free_port());
        self.children.push(spawn(
            &dir,
            &format!("n{}", i + 1),
            p,
            &self.extra,
            self.private_mounts,
        ));
        self.ports.push(p);
        let sock = dir.join("admin.sock");
        crate::common::wait_for("admin socket", Duration::from_secs(20), || sock.exists()).await;
        let first = self.dirs[0].to_str().unwrap().to_string();
        let token = run(BIN, &["cluster", "join-token", "--data-dir", &first])
            .trim()
            .to_string();
        run(
            BIN,
            &[
                "cluster",
                "join",
                "--data-dir",
                dir.to_str().unwrap(),
                "--token",
                &token,
            ],
        );
        self.dirs.push(dir);
        self.wait_for_block_stores(i + 1).await;
        i
    }

    async fn wait_for_block_stores(&self, count: usize) {
        let cluster = self;
        crate::common::wait_for(
            "every block store registered",
            Duration::from_secs(30),
            || {
                let nodes: serde_json::Value =
                    serde_json::from_str(&cluster.allod_ok(&["node", "list", "--output", "json"]))
                        .unwrap();
                nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| n["storage"].is_object())
                    .count()
                    == count
            },
        )
        .await;
    }

    /// Kills node `i` (0-based) with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Starts node `i` again on its ports and data.
    pub fn restart(&mut self, i: usize) {
        self.children[i] = spawn(
            &self.dirs[i],
            &format!("n{}", i + 1),
            self.ports[i],
            &self.extra,
            self.private_mounts,
        );
    }

    pub fn allod(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .unwrap()
    }

    pub fn allod_ok(&self, args: &[&str]) -> String {
        let out = self.allod(args);
        assert!(
            out.status.success(),
            "allod {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn allod_fails(&self, args: &[&str]) -> String {
        let out = self.allod(args);
        assert!(
            !out.status.success(),
            "allod {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.allod_ok(&all)).unwrap()
    }

    pub fn volume_id(&self, name: &str) -> String {
        self.json(&["volume", "show", name, "--project", "p"])["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// An NBD URI for a volume (of project `p`, by name or id) on node `i`
    /// (0-based), from `allod volume export` asked of that node's API.
    pub fn uri(&self, i: usize, id: &str) -> String {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.dirs[i].join("node.json")).unwrap())
                .unwrap();
        let url = format!("https://{}", config["api_addr"].as_str().unwrap());
        let args = [
            "volume",
            "export",
            id,
            "--project",
            "p",
            "--url",
            &url,
            "--output",
            "json",
        ];
        // The node may be starting (after a restart): ask again for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = self.allod(&args);
            if out.status.success() {
                let export: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                return export["uri"].as_str().unwrap().to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "allod {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// [`Cluster::uri`] as the socket path and the export name.
    pub fn export(&self, i: usize, id: &str) -> (std::path::PathBuf, String) {
        let uri = self.uri(i, id);
        let rest = uri.strip_prefix("nbd+unix:///").unwrap();
        let (name, socket) = rest.split_once("?socket=").unwrap();
        (std::path::PathBuf::from(socket), name.to_string())
    }

    /// The storage map as the nodes registered it.
    pub fn map(&self) -> StorageMap {
        let nodes = self.json(&["node", "list"]);
        let mut map = StorageMap {
            epoch: 0,
            nodes: Vec::new(),
        };
        for n in nodes.as_array().unwrap() {
            let s = &n["storage"];
            map.nodes.push(MapNode {
                node: n["id"].as_u64().unwrap(),
                weight: (s["capacity_bytes"].as_u64().unwrap() >> 30).max(1),
                failure_domain: s["failure_domain"].as_str().unwrap().to_string(),
            });
        }
        map
    }

    /// Node id of the process with data directory index `i`.
    pub fn node_id(&self, i: usize) -> u64 {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.dirs[i].join("node.json")).unwrap())
                .unwrap();
        config["node_id"].as_u64().unwrap()
    }

    /// Object indexes with data of their own in the volume on node `i`.
    pub fn objects_on(&self, i: usize, volume: &str) -> Vec<u64> {
        let store = ObjectStore::open(&self.dirs[i].join("storage")).unwrap();
        store
            .list(volume)
            .unwrap()
            .into_iter()
            .filter(|o| o.head)
            .map(|o| o.index)
            .collect()
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let text = run("qemu-io", &args);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    text
}

pub fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn guest_kit() -> PathBuf {
    let kit = std::env::var_os("ALLOD_GUEST_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kit"));
    assert!(
        kit.join("vmlinuz").exists() && kit.join("busybox").exists(),
        "no guest kit in {}: run .ci/guest-kit (it downloads a Debian kernel and busybox)",
        kit.display()
    );
    kit
}

/// A 64 MiB raw disk that SeaBIOS boots: FAT with syslinux, a Debian
/// kernel and a busybox initramfs whose init loads the virtio modules, says
/// `ALLOD-GUEST-BOOTED` on the serial console and runs the shell in `then`.
pub fn build_boot_disk(dir: &Path, then: &str) -> PathBuf {
    let kit = guest_kit();
    let ir = dir.join("initramfs");
    for d in ["bin", "lib/modules", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(ir.join(d)).unwrap();
    }
    std::fs::copy(kit.join("busybox"), ir.join("bin/busybox")).unwrap();
    for entry in std::fs::read_dir(kit.join("modules")).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), ir.join("lib/modules").join(e.file_name())).unwrap();
    }
    let init = format!(
        "#!/bin/busybox sh\n\
        /bin/busybox --install -s /bin\n\
        mount -t proc proc /proc\n\
        mount -t sysfs sys /sys\n\
        mount -t devtmpfs dev /dev\n\
        for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done\n\
        echo ALLOD-GUEST-BOOTED > /dev/ttyS0\n\
        {then}\n"
    );
    std::fs::write(ir.join("init"), init).unwrap();
    run("chmod", &["755", ir.join("init").to_str().unwrap()]);
    let initrd = dir.join("initrd.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | ./bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            ir.display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = dir.join("syslinux.cfg");
    std::fs::write(
        &cfg,
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.gz\n  APPEND console=ttyS0 rdinit=/init panic=-1 quiet\n",
    )
    .unwrap();
    let disk = dir.join("boot.img");
    let d = disk.to_str().unwrap();
    run("mkfs.vfat", &["-C", d, "32768"]);
    run("syslinux", &["--install", d]);
    run(
        "mcopy",
        &[
            "-i",
            d,
            kit.join("vmlinuz").to_str().unwrap(),
            initrd.to_str().unwrap(),
            cfg.to_str().unwrap(),
            "::/",
        ],
    );
    run("truncate", &["-s", "64M", d]);
    disk
}

/// Removes the test domain however the test ends.
pub struct Domain(pub String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &self.0])
            .output();
    }
}
