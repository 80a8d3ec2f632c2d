//! Block storage through the real binary: three `allod agent` processes on
//! 127.0.0.1, volumes driven with the CLI, bytes moved with qemu-io,
//! qemu-img and nbdinfo through each node's `nbd.sock`, and the object
//! stores checked on disk against the placement function.

mod common;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::wait_for;
use storage::ObjectStore;

use support::{build_boot_disk, qemu_io, run, sha256, Cluster, Domain};

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
    a_replica_node_killed_with_sigkill_leaves_writes_going_and_resyncs_when_it_returns(&mut c)
        .await;
}

async fn a_replica_node_killed_with_sigkill_leaves_writes_going_and_resyncs_when_it_returns(
    c: &mut Cluster,
) {
    // What the volume holds after the writes made while a node is down.
    const WRITTEN: [&str; 5] = [
        "read -P 0x62 0 1M",
        "read -P 0x61 1M 3M",
        "read -P 0x63 4M 1M",
        "read -P 0x61 5M 3M",
        "read -P 0x64 8M 1M",
    ];
    let v = c.json(&[
        "volume",
        "create",
        "survivor",
        "--project",
        "p",
        "--size",
        "16M",
    ]);
    assert_eq!(v["replicas"], 3, "{v}");
    assert_eq!(v["min_replicas"], 2, "{v}");
    assert_eq!(v["in_sync"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["out_of_sync"], serde_json::json!([]), "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // A volume that wants every copy for each write.
    c.allod_ok(&[
        "volume",
        "create",
        "strict",
        "--project",
        "p",
        "--size",
        "8M",
        "--min-replicas",
        "3",
    ]);
    let strict = c.volume_id("strict");
    let err = c.allod_fails(&[
        "volume",
        "create",
        "nonsense",
        "--project",
        "p",
        "--size",
        "8M",
        "--replicas",
        "2",
        "--min-replicas",
        "3",
    ]);
    assert!(err.contains("min_replicas"), "{err}");
    qemu_io(&c.uri(0, &id), &["write -P 0x61 0 8M", "flush"]);
    qemu_io(&c.uri(0, &strict), &["write -P 0x11 0 1M", "flush"]);

    // The third node dies (two of three keep the cluster's quorum): writes
    // go on with two in-sync copies, acknowledged within a bounded time.
    let dead = c.node_id(2);
    c.kill(2);
    // Slow, so that the resync below is seen at work.
    c.allod_ok(&["storage", "config", "--recovery-rate", "1M"]);
    let started = Instant::now();
    qemu_io(&c.uri(0, &id), &["write -P 0x62 0 1M", "flush"]);
    let took = started.elapsed();
    qemu_io(
        &c.uri(0, &id),
        &["write -P 0x63 4M 1M", "write -P 0x64 8M 1M", "flush"],
    );
    assert!(
        took < Duration::from_secs(10),
        "a write with one replica down took {took:?}"
    );
    let v = c.json(&["volume", "show", "survivor", "--project", "p"]);
    assert_eq!(v["state"], "degraded", "{v}");
    assert_eq!(v["out_of_sync"], serde_json::json!([dead]), "{v}");
    assert!(
        !v["in_sync"].as_array().unwrap().contains(&dead.into()),
        "{v}"
    );
    // A volume that needs all three copies refuses the write plainly.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x12 0 1M", &c.uri(0, &strict)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Input/output error"), "{text}");
    let s = c.json(&["volume", "show", "strict", "--project", "p"]);
    assert_eq!(s["state"], "degraded", "{s}");
    // Another node takes over as writer and reads what was acknowledged.
    qemu_io(&c.uri(1, &id), &WRITTEN);

    // The node returns with its old copies. A read through it never sees
    // them: it is not in sync, so it reads from the replicas that are,
    // until its resync brings it back.
    c.restart(2);
    // The resync is a job with its progress: three objects (4 MiB each)
    // changed while the node was away, paced at 1 MiB/s.
    wait_for("the resync job", Duration::from_secs(60), || {
        let s = c.json(&["storage", "status"]);
        s["jobs"].as_array().unwrap().iter().any(|j| {
            j["volume"] == id.as_str()
                && j["kind"] == "resync"
                && j["total_bytes"] == 3 * (4u64 << 20)
                && j["done_bytes"].as_u64().unwrap() <= 3 * (4u64 << 20)
        })
    })
    .await;
    c.allod_ok(&["storage", "config", "--recovery-rate", "200M"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut args = vec!["-f", "raw"];
        for r in WRITTEN {
            args.extend(["-c", r]);
        }
        let uri = c.uri(2, &id);
        args.push(&uri);
        let out = Command::new("qemu-io").args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains("Pattern verification failed"),
            "a read through the returning node went back in time: {text}"
        );
        if out.status.success() && !text.contains("error") {
            break;
        }
        assert!(Instant::now() < deadline, "the node never served: {text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for(
        "the returned replica in sync again",
        Duration::from_secs(60),
        || {
            let v = c.json(&["volume", "show", "survivor", "--project", "p"]);
            v["state"] == "available" && v["in_sync"].as_array().unwrap().len() == 3
        },
    )
    .await;
    // Now its own copy is read (local first) and holds the new data.
    qemu_io(&c.uri(2, &id), &WRITTEN);
    let store = ObjectStore::open(&c.dirs[2].join("storage")).unwrap();
    let here = store.list(&id).unwrap();
    assert_eq!(here.iter().filter(|o| o.head).count(), 3, "{here:?}");
    // The strict volume resyncs too and takes writes again.
    wait_for(
        "the strict volume in sync again",
        Duration::from_secs(60),
        || c.json(&["volume", "show", "strict", "--project", "p"])["state"] == "available",
    )
    .await;
    qemu_io(&c.uri(0, &strict), &["write -P 0x13 0 1M", "flush"]);
}

/// Where `.ci/guest-kit` put the kernel, virtio modules and busybox.
async fn guest_boots_from_a_cloned_image_and_its_writes_read_back(c: &Cluster) {
    let version = Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "libvirt is not reachable at qemu:///system (start virtlogd and libvirtd; .ci/test does): {version:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    // Writes 4 KiB of 'A' at 48 MiB (past the file system), then powers off.
    let disk = build_boot_disk(
        tmp.path(),
        "yes A | tr -d '\\n' | head -c 4096 > /tmp/mark\n\
         dd if=/tmp/mark of=/dev/vda bs=4096 seek=12288 conv=fsync && echo ALLOD-GUEST-WROTE > /dev/ttyS0\n\
         sync\n\
         poweroff -f",
    );
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
    // This domain is not the agents' (no VM record): it reaches the disk
    // as an operator would, with an export of node 1.
    let (socket, export) = c.export(0, &id);
    // QEMU runs as libvirt-qemu: it must write the console log.
    run("chmod", &["755", tmp.path().to_str().unwrap()]);
    let console = tmp.path().join("console.log");
    let spec = hypervisor::spec::DomainSpec {
        id: format!("test-{id}"),
        uuid: format!("{}-0000-4000-8000-{}", &id[..8], &id[4..16]),
        virt_type: hypervisor::spec::VirtType::Qemu,
        vcpus: 1,
        memory_bytes: 256 << 20,
        disks: vec![hypervisor::spec::Disk {
            export: export.clone(),
            socket: socket.to_str().unwrap().to_string(),
            target: "vda".into(),
            read_only: false,
        }],
        nics: Vec::new(),
        // Not a node id: the agents' reconcilers must leave this domain alone.
        node: "test".into(),
        project: "p".into(),
        name: "guest".into(),
        generation: 1,
        console_log: Some(console.display().to_string()),
    };
    let xml = spec.to_xml().unwrap();
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

/// An image import whose node is killed with SIGKILL while it writes the
/// image into its base volume is not left `importing`: the node finds the
/// recorded operation when it is back, writes the image again in full, and
/// the image becomes available with exactly the uploaded bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_import_killed_with_sigkill_midway_finishes_after_the_restart() {
    let mut c = Cluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("big.raw");
    // Large enough that writing it through NBD takes a while; no zeros, so
    // every range is written.
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251 + 1) as u8).collect();
    let mut bytes = Vec::with_capacity(256 << 20);
    for i in 0..256u32 {
        bytes.extend(block.iter().map(|b| b.wrapping_add(i as u8) | 1));
    }
    std::fs::write(&raw, &bytes).unwrap();
    drop(bytes);
    let mut import = Command::new(support::BIN)
        .args(["image", "import", raw.to_str().unwrap(), "--name", "big"])
        .envs(c.env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let imports = c.dirs[0].join("imports");
    common::wait_for(
        "node 1 to start writing the image",
        Duration::from_secs(120),
        || {
            std::fs::read_dir(&imports).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".started"))
            })
        },
    )
    .await;
    let image = c.json(&["image", "show", "big"]);
    assert_eq!(image["state"], "importing", "{image}");
    c.kill(0);
    let _ = import.wait();
    c.restart(0);
    let mut image = serde_json::Value::Null;
    for _ in 0..600 {
        let out = c.allod(&["image", "show", "big", "--output", "json"]);
        if out.status.success() {
            image = serde_json::from_slice(&out.stdout).unwrap();
            if image["state"] == "available" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(image["state"], "available", "{image}");
    // Read through a clone: an image's base volume is nobody's to export.
    c.allod_ok(&["project", "create", "p"]);
    c.allod_ok(&[
        "volume",
        "create",
        "copy",
        "--project",
        "p",
        "--image",
        "big",
    ]);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &c.uri(1, "copy"),
        ],
    );
    common::wait_for(
        "the upload to be removed once written",
        Duration::from_secs(30),
        || std::fs::read_dir(&imports).is_ok_and(|mut entries| entries.next().is_none()),
    )
    .await;
}

/// A tenant's disk is reachable only with a credential: a node's NBD
/// socket lists nothing and opens nothing for a bare volume id or a wrong
/// credential; an operator's export works on its own node only, for its
/// time only, read-only when asked; `NBD_OPT_INFO` takes no writer lease;
/// and the node's files are the agent's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_exports_open_only_with_a_credential_for_this_node() {
    use std::os::unix::fs::PermissionsExt;
    use support::nbd::NbdClient;
    let c = Cluster::start().await;
    c.allod_ok(&["project", "create", "p"]);
    let v = c.json(&["volume", "create", "d", "--project", "p", "--size", "16M"]);
    let id = v["id"].as_str().unwrap().to_string();
    let nodes = c.json(&["node", "list"]);
    let socket_of = |i: usize| -> std::path::PathBuf {
        let node_id = c.node_id(i);
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == node_id)
            .unwrap();
        std::path::PathBuf::from(n["storage"]["nbd_socket"].as_str().unwrap())
    };
    let socket0 = socket_of(0);
    assert!(!socket0.starts_with(&c.dirs[0]), "{}", socket0.display());

    // Nothing is listed; a bare id or a made-up credential opens nothing.
    let list = run(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", socket0.display()),
        ],
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["exports"], serde_json::json!([]), "{list}");
    assert!(NbdClient::connect(&socket0, &id).is_err());
    assert!(NbdClient::connect(&socket0, &format!("{id}.{}", "0".repeat(32))).is_err());
    assert!(NbdClient::info(&socket0, &id).is_err());

    // An export of node 2 works there, not on node 1.
    let (socket1, export1) = c.export(1, "d");
    assert_eq!(socket1, socket_of(1));
    assert!(NbdClient::connect(&socket0, &export1).is_err());
    let mut nbd = NbdClient::connect(&socket1, &export1).unwrap();
    nbd.write(0, &[7u8; 4096]).unwrap();
    nbd.flush().unwrap();
    drop(nbd);
    let lease =
        |c: &Cluster| c.json(&["volume", "show", "d", "--project", "p"])["lease"]["node"].clone();
    assert_eq!(lease(&c), c.node_id(1));
    // INFO on node 3 describes the volume and moves no lease.
    let (socket2, export2) = c.export(2, "d");
    assert_eq!(NbdClient::info(&socket2, &export2).unwrap(), 16 << 20);
    assert_eq!(lease(&c), c.node_id(1));

    // Read-only exports refuse writes; expired ones open nothing.
    let read_only = c.json(&["volume", "export", "d", "--project", "p", "--read-only"]);
    let uri = read_only["uri"].as_str().unwrap();
    let (name, socket) = uri
        .strip_prefix("nbd+unix:///")
        .unwrap()
        .split_once("?socket=")
        .unwrap();
    let mut nbd = NbdClient::connect(std::path::Path::new(socket), name).unwrap();
    assert_eq!(nbd.read(0, 4096).unwrap(), vec![7u8; 4096]);
    assert!(nbd.write(0, &[8u8; 4096]).is_err());
    drop(nbd);
    let short = c.json(&["volume", "export", "d", "--project", "p", "--ttl", "2s"]);
    let (name, socket) = short["uri"]
        .as_str()
        .unwrap()
        .strip_prefix("nbd+unix:///")
        .unwrap()
        .split_once("?socket=")
        .unwrap();
    // A connection opened in time is cut off when its grant expires.
    let mut open = NbdClient::connect(std::path::Path::new(socket), name).unwrap();
    open.read(0, 4096).unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert!(open.read(0, 4096).is_err(), "an expired grant still served");
    assert!(NbdClient::connect(std::path::Path::new(socket), name).is_err());

    // The data directory and what the agent wrote in it are its own.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.dirs[0]), 0o700);
    for file in [
        "state.redb",
        "raft-log.redb",
        "node.key",
        "ca.key",
        "admin.token",
    ] {
        let path = c.dirs[0].join(file);
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "{} is {:o}",
            path.display(),
            mode(&path)
        );
    }
    assert_eq!(mode(&c.dirs[0].join("storage")), 0o700);
}
