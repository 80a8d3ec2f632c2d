//! Block storage through the real binary: three `allod agent` processes on
//! 127.0.0.1, volumes driven with the CLI, bytes moved with qemu-io,
//! qemu-img and nbdinfo through each node's `nbd.sock`, and the object
//! stores checked on disk against the placement function.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use storage::{MapNode, ObjectStore, StorageMap};

const BIN: &str = env!("CARGO_BIN_EXE_allod");

struct Cluster {
    _tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
    env: Vec<(String, String)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        let mut children = Vec::new();
        for i in 1..=3 {
            let dir = tmp.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let log = std::fs::File::create(dir.with_extension("log")).unwrap();
            children.push(
                Command::new(BIN)
                    .args([
                        "agent",
                        "--data-dir",
                        dir.to_str().unwrap(),
                        "--name",
                        &format!("n{i}"),
                    ])
                    .args([
                        "--api-listen",
                        "127.0.0.1:0",
                        "--peer-listen",
                        "127.0.0.1:0",
                    ])
                    .args(["--storage-listen", "127.0.0.1:0"])
                    .env("RUST_LOG", "info")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            );
            let sock = dir.join("admin.sock");
            common::wait_for("admin socket", Duration::from_secs(20), || sock.exists()).await;
            dirs.push(dir);
        }
        let d = |i: usize| dirs[i].to_str().unwrap().to_string();
        run(BIN, &["cluster", "init", "--data-dir", &d(0)]);
        for i in 1..3 {
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
            _tmp: tmp,
            dirs,
            children,
            env,
        };
        common::wait_for(
            "three registered block stores",
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
                    == 3
            },
        )
        .await;
        cluster
    }

    fn allod(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .unwrap()
    }

    fn allod_ok(&self, args: &[&str]) -> String {
        let out = self.allod(args);
        assert!(
            out.status.success(),
            "allod {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn allod_fails(&self, args: &[&str]) -> String {
        let out = self.allod(args);
        assert!(
            !out.status.success(),
            "allod {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.allod_ok(&all)).unwrap()
    }

    fn volume_id(&self, name: &str) -> String {
        self.json(&["volume", "show", name, "--project", "p"])["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The export of a volume on node `i` (0-based).
    fn uri(&self, i: usize, id: &str) -> String {
        format!(
            "nbd+unix:///{id}?socket={}",
            self.dirs[i].join("nbd.sock").display()
        )
    }

    /// The storage map as the nodes registered it.
    fn map(&self) -> StorageMap {
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
    fn node_id(&self, i: usize) -> u64 {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.dirs[i].join("node.json")).unwrap())
                .unwrap();
        config["node_id"].as_u64().unwrap()
    }

    /// Object indexes with data of their own in the volume on node `i`.
    fn objects_on(&self, i: usize, volume: &str) -> Vec<u64> {
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

fn run(cmd: &str, args: &[&str]) -> String {
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

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let text = run("qemu-io", &args);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    text
}

fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_snapshots_clones_and_images_across_three_nodes() {
    let mut c = Cluster::start().await;
    c.allod_ok(&["project", "create", "p"]);

    // Three replicas by default on three nodes; every byte on all of them.
    let v = c.json(&["volume", "create", "v1", "--project", "p", "--size", "64M"]);
    assert_eq!(v["replicas"], 3, "{v}");
    assert_eq!(v["state"], "available");
    let id = c.volume_id("v1");
    qemu_io(
        &c.uri(0, &id),
        &["write -P 0xab 0 1M", "write -P 0xcd 9M 4M"],
    );
    for i in 0..3 {
        assert_eq!(c.objects_on(i, &id), vec![0, 2, 3], "node {i}");
    }
    // Another node becomes the writer: it reads what the first wrote, and
    // the first reads what it writes.
    qemu_io(
        &c.uri(1, &id),
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 9M 4M",
            "write -P 0x5e 20M 64k",
        ],
    );
    qemu_io(
        &c.uri(0, &id),
        &["read -P 0x5e 20M 64k", "read -P 0 21M 1M"],
    );

    // Two replicas: each object on exactly the two nodes placement names.
    let v2 = c.json(&[
        "volume",
        "create",
        "v2",
        "--project",
        "p",
        "--size",
        "256M",
        "--replicas",
        "2",
    ]);
    let id2 = v2["id"].as_str().unwrap().to_string();
    let writes: Vec<String> = (0..64)
        .map(|i| format!("write -P {} {}M 4k", i + 1, i * 4))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&c.uri(2, &id2), &writes);
    let map = c.map();
    for index in 0..64u64 {
        let placed = map.place(&id2, index, 2);
        assert_eq!(placed.len(), 2);
        for i in 0..3 {
            let has = c.objects_on(i, &id2).contains(&index);
            assert_eq!(
                has,
                placed.contains(&c.node_id(i)),
                "object {index} on node index {i}, placed {placed:?}"
            );
        }
    }

    // Snapshot, overwrite, clone the snapshot, grow the clone, roll back.
    c.allod_ok(&["volume", "snapshot", "v1", "s1", "--project", "p"]);
    qemu_io(&c.uri(0, &id), &["write -P 0x11 0 1M"]);
    let clone = c.json(&[
        "volume",
        "clone",
        "v1",
        "--snapshot",
        "s1",
        "--to",
        "c1",
        "--project",
        "p",
    ]);
    assert_eq!(clone["parent"]["snapshot"], "s1", "{clone}");
    let cid = clone["id"].as_str().unwrap().to_string();
    qemu_io(
        &c.uri(2, &cid),
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 9M 4M",
            "write -P 0x22 4k 4k",
        ],
    );
    qemu_io(
        &c.uri(2, &cid),
        &[
            "read -P 0xab 0 4k",
            "read -P 0x22 4k 4k",
            "read -P 0xab 8k 1040384",
        ],
    );
    c.allod_ok(&["volume", "resize", "c1", "--size", "128M", "--project", "p"]);
    let size = run("nbdinfo", &["--size", &c.uri(1, &cid)]);
    assert_eq!(size.trim(), (128u64 << 20).to_string());
    qemu_io(
        &c.uri(1, &cid),
        &[
            "read -P 0 100M 1M",
            "write -P 0x33 120M 1M",
            "read -P 0x33 120M 1M",
        ],
    );
    let refused = c.allod_fails(&["volume", "resize", "c1", "--size", "64M", "--project", "p"]);
    assert!(refused.contains("only grow"), "{refused}");
    qemu_io(&c.uri(0, &id), &["read -P 0x11 0 1M"]);
    c.allod_ok(&["volume", "rollback", "v1", "s1", "--project", "p"]);
    qemu_io(
        &c.uri(1, &id),
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 9M 4M",
            "read -P 0x5e 20M 64k",
        ],
    );
    // The parent's snapshot cannot go while the clone reads through to it.
    let refused = c.allod_fails(&["volume", "snapshot-delete", "v1", "s1", "--project", "p"]);
    assert!(refused.contains("clone"), "{refused}");
    let refused = c.allod_fails(&["volume", "delete", "v1", "--project", "p"]);
    assert!(refused.contains("clone"), "{refused}");

    // Images: a qcow2 of 1 GiB (virtual) with a known pattern.
    let tmp = tempfile::tempdir().unwrap();
    let qcow = tmp.path().join("tiny.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "1G"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 0 1M",
            "-c",
            "write -P 0x43 1023M 1M",
            qcow.to_str().unwrap(),
        ],
    );
    let image = c.json(&[
        "image",
        "import",
        qcow.to_str().unwrap(),
        "--name",
        "tiny",
        "--sha256",
        &sha256(&qcow),
    ]);
    assert_eq!(image["format"], "qcow2", "{image}");
    assert_eq!(image["size_bytes"], 1u64 << 30);
    assert_eq!(image["state"], "available");
    // A boot volume cloned from it: no object is written anywhere to make it.
    let boot = c.json(&[
        "volume",
        "create",
        "boot",
        "--project",
        "p",
        "--image",
        "tiny",
    ]);
    let bid = boot["id"].as_str().unwrap().to_string();
    assert_eq!(boot["size_bytes"], 1u64 << 30);
    for i in 0..3 {
        assert!(
            c.objects_on(i, &bid).is_empty(),
            "node {i} holds objects of a fresh clone"
        );
    }
    qemu_io(
        &c.uri(1, &bid),
        &[
            "read -P 0x42 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x43 1023M 1M",
        ],
    );
    // A raw image, and its checksum refused when wrong.
    let raw = tmp.path().join("disk.raw");
    std::fs::write(&raw, vec![0x7fu8; 3 << 20]).unwrap();
    let wrong = "0".repeat(64);
    let err = c.allod_fails(&[
        "image",
        "import",
        raw.to_str().unwrap(),
        "--name",
        "bad",
        "--sha256",
        &wrong,
    ]);
    assert!(
        err.contains("SHA-256") && err.contains("nothing was stored"),
        "{err}"
    );
    let corrupt = tmp.path().join("corrupt.qcow2");
    std::fs::write(
        &corrupt,
        b"QFI\xfb\x00\x00\x00\x03garbage that is not a qcow2 header",
    )
    .unwrap();
    let err = c.allod_fails(&[
        "image",
        "import",
        corrupt.to_str().unwrap(),
        "--name",
        "corrupt",
    ]);
    assert!(err.contains("not a valid one"), "{err}");
    let raw_image = c.json(&[
        "image",
        "import",
        raw.to_str().unwrap(),
        "--name",
        "rawdisk",
    ]);
    assert_eq!(raw_image["format"], "raw");
    let names: Vec<String> = c
        .json(&["image", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["rawdisk", "tiny"]);
    // Images' base volumes are reached through the image routes only.
    let err = c.allod_fails(&["volume", "delete", "tiny", "--project", "_images"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = c.allod_fails(&[
        "volume",
        "create",
        "sneak",
        "--project",
        "_images",
        "--size",
        "1M",
    ]);
    assert!(err.contains("does not exist"), "{err}");
    let err = c.allod_fails(&["image", "delete", "tiny"]);
    assert!(err.contains("used by 1 volume"), "{err}");
    let err = c.allod_fails(&["volume", "create", "x", "--project", "p", "--image", "nope"]);
    assert!(err.contains("image \"nope\" does not exist"), "{err}");

    // Nodes show their storage.
    for n in c.json(&["node", "list"]).as_array().unwrap() {
        let s = &n["storage"];
        assert!(s["capacity_bytes"].as_u64().unwrap() > 0, "{n}");
        assert!(s["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{n}");
    }
    // Deleting in dependency order works.
    c.allod_ok(&["volume", "delete", "boot", "--project", "p"]);
    c.allod_ok(&["image", "delete", "tiny"]);
    c.allod_ok(&["volume", "delete", "c1", "--project", "p"]);
    c.allod_ok(&["volume", "snapshot-delete", "v1", "s1", "--project", "p"]);
    c.allod_ok(&["volume", "delete", "v1", "--project", "p"]);

    guest_boots_from_a_cloned_image_and_its_writes_read_back(&c).await;
    a_lost_replica_fails_writes_cleanly_and_keeps_what_was_acknowledged(&mut c).await;
}

async fn a_lost_replica_fails_writes_cleanly_and_keeps_what_was_acknowledged(c: &mut Cluster) {
    let v = c.json(&[
        "volume",
        "create",
        "survivor",
        "--project",
        "p",
        "--size",
        "16M",
    ]);
    let id = v["id"].as_str().unwrap().to_string();
    qemu_io(&c.uri(0, &id), &["write -P 0x61 0 8M", "flush"]);
    // The third node dies (two of three keep the cluster's quorum).
    c.children[2].kill().unwrap();
    c.children[2].wait().unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x62 0 1M", &c.uri(0, &id)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error"),
        "a write needing the dead replica must fail: {text}"
    );
    // What was acknowledged before is all there, from the surviving replicas,
    // through either live node.
    qemu_io(&c.uri(1, &id), &["read -P 0x61 1M 7M"]);
    qemu_io(&c.uri(0, &id), &["read -P 0x61 1M 7M"]);
}

/// Where `.ci/guest-kit` put the kernel, virtio modules and busybox.
fn guest_kit() -> PathBuf {
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
/// kernel and a busybox initramfs whose init says it booted, writes 4 KiB
/// of 'A' at 48 MiB (past the file system) and powers off.
fn build_boot_disk(dir: &Path) -> PathBuf {
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
    let init = "#!/bin/busybox sh\n\
        /bin/busybox --install -s /bin\n\
        mount -t proc proc /proc\n\
        mount -t sysfs sys /sys\n\
        mount -t devtmpfs dev /dev\n\
        for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done\n\
        echo ALLOD-GUEST-BOOTED > /dev/ttyS0\n\
        yes A | tr -d '\\n' | head -c 4096 > /tmp/mark\n\
        dd if=/tmp/mark of=/dev/vda bs=4096 seek=12288 conv=fsync && echo ALLOD-GUEST-WROTE > /dev/ttyS0\n\
        sync\n\
        poweroff -f\n";
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
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &self.0])
            .output();
    }
}

async fn guest_boots_from_a_cloned_image_and_its_writes_read_back(c: &Cluster) {
    let version = Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "libvirt is not reachable at qemu:///system (start virtlogd and libvirtd; .ci/test does): {version:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let disk = build_boot_disk(tmp.path());
    c.allod_ok(&[
        "image",
        "import",
        disk.to_str().unwrap(),
        "--name",
        "bootable",
    ]);
    let vol = c.json(&[
        "volume",
        "create",
        "guestdisk",
        "--project",
        "p",
        "--image",
        "bootable",
    ]);
    let id = vol["id"].as_str().unwrap().to_string();
    // QEMU runs as libvirt-qemu: it must reach the node's NBD socket and
    // write the console log.
    for dir in [c._tmp.path(), tmp.path()] {
        run("chmod", &["755", dir.to_str().unwrap()]);
    }
    let console = tmp.path().join("console.log");
    let spec = hypervisor::spec::DomainSpec {
        id: format!("test-{id}"),
        uuid: format!("{}-0000-4000-8000-{}", &id[..8], &id[4..16]),
        virt_type: hypervisor::spec::VirtType::Qemu,
        vcpus: 1,
        memory_bytes: 256 << 20,
        disks: vec![hypervisor::spec::Disk {
            export: id.clone(),
            socket: c.dirs[0].join("nbd.sock").to_str().unwrap().to_string(),
            target: "vda".into(),
            read_only: false,
        }],
        nics: Vec::new(),
        node: c.node_id(0).to_string(),
        project: "p".into(),
        name: "guest".into(),
    };
    let xml = spec.to_xml().unwrap().replace(
        "<serial type='pty'>\n",
        &format!(
            "<serial type='pty'>\n      <log file='{}' append='off'/>\n",
            console.display()
        ),
    );
    let xml_path = tmp.path().join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let domain = Domain(spec.domain_name());
    run(
        "virsh",
        &["-c", "qemu:///system", "create", xml_path.to_str().unwrap()],
    );
    common::wait_for(
        "the guest to boot and write (TCG)",
        Duration::from_secs(240),
        || std::fs::read_to_string(&console).is_ok_and(|t| t.contains("ALLOD-GUEST-WROTE")),
    )
    .await;
    common::wait_for("the guest to power off", Duration::from_secs(60), || {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "domstate", &domain.0])
            .output()
            .unwrap();
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("shut off")
    })
    .await;
    // What the guest wrote, read through another node's NBD socket.
    qemu_io(&c.uri(2, &id), &["read -P 0x41 48M 4k", "read -P 0 52M 4k"]);
    // The image itself is untouched: a fresh clone has zeros there.
    let again = c.json(&[
        "volume",
        "create",
        "guestdisk2",
        "--project",
        "p",
        "--image",
        "bootable",
    ]);
    qemu_io(
        &c.uri(1, again["id"].as_str().unwrap()),
        &["read -P 0 48M 4k"],
    );
}
