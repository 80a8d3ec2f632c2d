//! Three storage nodes in this process (real object stores, real mutual TLS
//! on 127.0.0.1), one NBD server on a unix socket and TCP, and the real
//! external clients: qemu-img, qemu-io, nbdinfo, nbdcopy and fio.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use storage::nbd::{self, BoxFuture, Export, Exports};
use storage::transport::{self, Peers};
use storage::{MapNode, ObjectStore, ReplicaSets, Storage, StorageMap, VolumeSpec};

const MIB: u64 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    nodes: Vec<Arc<Storage>>,
    map: Arc<StorageMap>,
    exports: Arc<TestExports>,
    socket: PathBuf,
    tcp: String,
}

struct TestExports {
    storage: Arc<Storage>,
    volumes: Mutex<HashMap<String, VolumeSpec>>,
}

impl Exports for TestExports {
    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Export, String>> {
        Box::pin(async move {
            let spec = self
                .volumes
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no volume has the id {name:?}"))?;
            let handle = self.storage.open(spec);
            handle.activate().await.map_err(|e| e.to_string())?;
            Ok(Export {
                handle,
                read_only: false,
                withdrawn: None,
                standby: None,
            })
        })
    }
    fn describe<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<storage::nbd::ExportInfo, String>> {
        Box::pin(async move {
            let spec = self
                .volumes
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no volume has the id {name:?}"))?;
            Ok(storage::nbd::ExportInfo {
                size: spec.size,
                read_only: false,
            })
        })
    }
    fn list(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move { self.volumes.lock().unwrap().keys().cloned().collect() })
    }
}

/// The cluster state's record of in-sync sets, kept in memory: these
/// tests run with every replica healthy, so nothing is ever recorded.
#[derive(Default)]
struct RecordedSets {
    changes: Mutex<Vec<String>>,
}

impl ReplicaSets for RecordedSets {
    fn out_of_sync(
        &self,
        volume: &str,
        epoch: u64,
        nodes: Vec<u64>,
    ) -> BoxFuture<'_, Result<(), String>> {
        let line = format!("{volume}@{epoch}: {nodes:?} out of sync");
        Box::pin(async move {
            self.changes.lock().unwrap().push(line);
            Ok(())
        })
    }
    fn recovering(&self, volume: &str, epoch: u64, node: u64) -> BoxFuture<'_, Result<(), String>> {
        let line = format!("{volume}@{epoch}: {node} recovering");
        Box::pin(async move {
            self.changes.lock().unwrap().push(line);
            Ok(())
        })
    }
    fn in_sync(&self, volume: &str, epoch: u64, node: u64) -> BoxFuture<'_, Result<(), String>> {
        let line = format!("{volume}@{epoch}: {node} in sync");
        Box::pin(async move {
            self.changes.lock().unwrap().push(line);
            Ok(())
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // A cluster CA and one certificate per node, as the agent makes them.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let mut nodes = Vec::new();
        let mut addrs = HashMap::new();
        let mut map = StorageMap {
            epoch: 1,
            nodes: Vec::new(),
        };
        let _guard = rt.enter();
        for id in 1..=3u64 {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            let chain = vec![cert.der().clone(), ca.der().clone()];
            let pkey = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider(),
            )
            .build()
            .unwrap();
            let server = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), pkey())
                .unwrap();
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(chain, pkey())
                .unwrap();
            let store = Arc::new(ObjectStore::open(&dir.path().join(format!("node{id}"))).unwrap());
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            addrs.insert(id, listener.local_addr().unwrap().to_string());
            rt.spawn(transport::serve(
                listener,
                Arc::new(server),
                store.clone(),
                Arc::new(transport::CaSignatureOnly),
            ));
            nodes.push(Storage::new(
                id,
                store,
                Peers::new(Arc::new(client)),
                Arc::new(RecordedSets::default()),
            ));
            map.nodes.push(MapNode {
                node: id,
                weight: 1,
                failure_domain: format!("rack{id}"),
            });
        }
        for n in &nodes {
            n.peers.set_addresses(addrs.clone());
        }
        let exports = Arc::new(TestExports {
            storage: nodes[0].clone(),
            volumes: Mutex::new(HashMap::new()),
        });
        let socket = dir.path().join("nbd.sock");
        let unix = tokio::net::UnixListener::bind(&socket).unwrap();
        rt.spawn(nbd::serve_unix(unix, exports.clone()));
        let tcp = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let tcp_addr = tcp.local_addr().unwrap().to_string();
        rt.spawn(nbd::serve_tcp(tcp, exports.clone()));
        drop(_guard);
        Fixture {
            dir,
            rt,
            nodes,
            map: Arc::new(map),
            exports,
            socket,
            tcp: tcp_addr,
        }
    })
}

impl Fixture {
    fn volume(&self, id: &str, size: u64, replicas: usize) -> VolumeSpec {
        let spec = VolumeSpec {
            id: id.into(),
            size,
            object_size: 4 * MIB,
            replicas,
            min_replicas: replicas.min(2),
            in_sync: vec![1, 2, 3],
            seq: 0,
            epoch: 1,
            map: self.map.clone(),
            parent: None,
        };
        self.publish(&spec);
        spec
    }

    /// Makes the NBD server open the volume as `spec` says from now on.
    fn publish(&self, spec: &VolumeSpec) {
        self.exports
            .volumes
            .lock()
            .unwrap()
            .insert(spec.id.clone(), spec.clone());
    }

    fn uri(&self, id: &str) -> String {
        format!("nbd+unix:///{id}?socket={}", self.socket.display())
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} could not start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

fn run_fails(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{cmd} {args:?} should have failed:\n{text}"
    );
    text
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    // Leave a 1 MiB hole so sparse handling is exercised too.
    if len > 3 * MIB as usize {
        data[MIB as usize..2 * MIB as usize].fill(0);
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn qemu_io_writes_land_on_exactly_the_placed_replicas() {
    let f = fixture();
    let spec = f.volume("vol-placed", 64 * MIB, 3);
    let uri = f.uri("vol-placed");
    // Objects 0, 2 (straddling into 3) and 15.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 9M 4M",
            "-c",
            "write -P 0x11 63M 1M",
            &uri,
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 9M 4M",
            "-c",
            "read -P 0x11 63M 1M",
            "-c",
            "read -P 0 1M 8M",
            &uri,
        ],
    );
    for index in 0..16u64 {
        let placed = f.map.place(&spec.id, index, 3);
        let written = matches!(index, 0 | 2 | 3 | 15);
        for node in &f.nodes {
            let has = node
                .store
                .list(&spec.id)
                .unwrap()
                .iter()
                .any(|o| o.index == index && o.head);
            assert_eq!(
                has,
                written && placed.contains(&node.node),
                "object {index} on node {} (placed {placed:?})",
                node.node
            );
        }
    }
    // Each replica holds the bytes themselves, checked against the store.
    for node in f.map.place(&spec.id, 0, 3) {
        let n = f.nodes.iter().find(|n| n.node == node).unwrap();
        let d = n
            .store
            .read(&spec.id, 0, None, 0, MIB, spec.epoch)
            .unwrap()
            .unwrap();
        assert!(d.iter().all(|b| *b == 0xab));
    }
}

#[test]
fn qemu_img_convert_compare_and_nbdcopy_move_real_data() {
    let f = fixture();
    f.volume("vol-img", 24 * MIB, 3);
    let src = f.scratch("source.raw");
    random_file(&src, 24 * MIB as usize, 42);
    let uri = f.uri("vol-img");
    let info = run("qemu-img", &["info", "--output=json", &uri]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 24 * MIB)),
        "{info}"
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    // nbdcopy out again (several connections: the export allows multi-conn).
    let back = f.scratch("back.raw");
    run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    // And over TCP.
    let tcp_uri = format!("nbd://{}/vol-img", f.tcp);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &tcp_uri,
        ],
    );
    let info = run("nbdinfo", &["--json", &uri]);
    assert!(
        info.contains(&format!("\"export-size\": {}", 24 * MIB)),
        "{info}"
    );
    // A flush is no barrier across connections, so several are not offered.
    assert!(info.contains("\"can_multi_conn\": false"), "{info}");
    let list = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", f.socket.display()),
        ],
    );
    assert!(list.contains("vol-img"), "{list}");
}

#[test]
fn fio_verifies_random_writes_through_the_nbd_engine() {
    let f = fixture();
    f.volume("vol-fio", 32 * MIB, 3);
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", f.uri("vol-fio")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=terse",
        ],
    );
    assert!(!out.contains("verify:"), "{out}");
}

#[test]
fn snapshots_clones_and_rollback_keep_the_right_bytes() {
    let f = fixture();
    let mut spec = f.volume("vol-snap", 16 * MIB, 3);
    let uri = f.uri("vol-snap");
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x01 0 6M", &uri]);
    // Snapshot 1: writes now carry sequence 1.
    spec.seq = 1;
    f.publish(&spec);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x02 1M 1M",
            "-c",
            "write -P 0x03 12M 1M",
            &uri,
        ],
    );
    let storage = &f.nodes[1];
    let at = |snap: Option<u64>, off, len| match snap {
        Some(snap) => {
            f.rt.block_on(storage.read_snapshot(&spec, snap, off, len))
                .unwrap()
        }
        None => {
            f.rt.block_on(f.exports.storage.open(spec.clone()).read(off, len))
                .unwrap()
        }
    };
    assert!(at(Some(1), MIB, MIB).iter().all(|b| *b == 1));
    assert!(at(Some(1), 12 * MIB, MIB).iter().all(|b| *b == 0));
    assert!(at(None, MIB, MIB).iter().all(|b| *b == 2));
    // A clone of snapshot 1, bigger than its parent: reads through until written.
    let clone = VolumeSpec {
        id: "vol-clone".into(),
        size: 20 * MIB,
        parent: Some(Arc::new(storage::ParentSpec {
            volume: spec.clone(),
            snap: 1,
            overlap: 16 * MIB,
        })),
        ..spec.clone()
    };
    let clone = VolumeSpec { seq: 0, ..clone };
    f.publish(&clone);
    let curi = f.uri("vol-clone");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x01 0 6M",
            "-c",
            "read -P 0 6M 14M",
            &curi,
        ],
    );
    // Copy-up: a small write keeps the rest of the object from the parent.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x09 4100 10",
            "-c",
            "write -P 0x07 18M 1M",
            &curi,
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x01 0 4100",
            "-c",
            "read -P 0x09 4100 10",
            "-c",
            "read -P 0x01 4110 6287250",
            "-c",
            "read -P 0x07 18M 1M",
            &curi,
        ],
    );
    // The parent did not change.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x01 0 1M",
            "-c",
            "read -P 0x02 1M 1M",
            &uri,
        ],
    );
    // Roll the parent back to snapshot 1 (as sequence 2, with a new writer epoch).
    spec.seq = 2;
    spec.epoch = 2;
    f.rt.block_on(f.exports.storage.open(spec.clone()).rollback(1))
        .unwrap();
    f.publish(&spec);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x01 0 6M",
            "-c",
            "read -P 0 12M 1M",
            &uri,
        ],
    );
    // The old writer (epoch 1) is fenced off.
    let old = f.nodes[2].open(VolumeSpec {
        epoch: 1,
        ..spec.clone()
    });
    let err = f.rt.block_on(old.write(0, b"late")).unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    // Every replica refuses the old epoch, for reads as for writes.
    for node in 1..=3 {
        for req in [
            storage::proto::Request::Read {
                volume: spec.id.clone(),
                index: 0,
                snap: None,
                offset: 0,
                len: 4,
                epoch: 1,
            },
            storage::proto::Request::Write {
                volume: spec.id.clone(),
                index: 0,
                offset: 0,
                seq: 2,
                epoch: 1,
                data: b"late".to_vec(),
            },
        ] {
            let err = f.rt.block_on(f.nodes[2].call(node, req)).unwrap_err();
            assert!(
                matches!(err, storage::IoError::Fenced(_)),
                "node {node}: {err}"
            );
        }
    }
}

#[test]
fn bad_clients_get_errors_and_the_server_keeps_serving() {
    use std::io::{Read, Write};
    let f = fixture();
    f.volume("vol-bad", 8 * MIB, 3);
    let uri = f.uri("vol-bad");
    // Reads and writes past the end.
    let out = run_fails("qemu-io", &["-f", "raw", "-c", "read 8M 4k", &uri]);
    assert!(
        out.contains("Input/output error")
            || out.contains("Invalid argument")
            || out.contains("out of"),
        "{out}"
    );
    let out = run("nbdinfo", &["--size", &uri]);
    assert_eq!(out.trim(), (8 * MIB).to_string());
    // Unknown export: the client is told, by name.
    let out = run_fails("nbdinfo", &[&f.uri("no-such-volume")]);
    assert!(
        out.contains("no-such-volume") && out.contains("No such file"),
        "{out}"
    );
    // Garbage, truncation and a wrong magic on raw sockets.
    for junk in [
        &b"\x00\x00\x00\x00"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x00\x00\x01IHAVEOPT",
        b"\x00\x00\x00\x01",
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&f.socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(junk).unwrap();
        drop(s);
    }
    // An option with a huge length is refused without reading it.
    let mut s = std::os::unix::net::UnixStream::connect(&f.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&7u32.to_be_bytes()).unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "the server closes the connection"
    );
    // Still serving.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
            &uri,
        ],
    );
}

/// Resident memory of this process (the NBD server runs in it).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn replies_a_client_never_reads_do_not_grow_the_servers_memory() {
    use std::io::{Read, Write};
    let f = fixture();
    f.volume("vol-greedy", 64 * MIB, 1);
    let mut s = std::os::unix::net::UnixStream::connect(&f.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    // Fixed newstyle, no zeroes; NBD_OPT_EXPORT_NAME.
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&(b"vol-greedy".len() as u32).to_be_bytes())
        .unwrap();
    s.write_all(b"vol-greedy").unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        64 * MIB
    );
    let before = rss_bytes();
    // 64 pipelined reads of 32 MiB (2 GiB of replies), never read back.
    let mut requests = Vec::new();
    for i in 0..64u64 {
        requests.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        requests.extend_from_slice(&0u16.to_be_bytes());
        requests.extend_from_slice(&0u16.to_be_bytes());
        requests.extend_from_slice(&i.to_be_bytes());
        requests.extend_from_slice(&((i % 2) * 32 * MIB).to_be_bytes());
        requests.extend_from_slice(&(32u32 << 20).to_be_bytes());
    }
    s.write_all(&requests).unwrap();
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        peak = peak.max(rss_bytes().saturating_sub(before));
    }
    assert!(
        peak < 400 * MIB,
        "the server held {} MiB of replies for a client that reads none",
        peak / MIB
    );
    drop(s);
    // Still serving.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5b 0 64k",
            "-c",
            "read -P 0x5b 0 64k",
            &f.uri("vol-greedy"),
        ],
    );
}

#[test]
fn a_clones_first_write_asks_only_in_sync_replicas_whether_the_object_exists() {
    let f = fixture();
    // A parent with one snapshot of 0x41 bytes, and a clone of it.
    let mut parent = f.volume("vol-cu-parent", 8 * MIB, 3);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x41 0 4M",
            &f.uri("vol-cu-parent"),
        ],
    );
    parent.seq = 1;
    f.publish(&parent);
    let clone = VolumeSpec {
        id: "vol-cu-clone".into(),
        parent: Some(Arc::new(storage::ParentSpec {
            volume: parent.clone(),
            snap: 1,
            overlap: 8 * MIB,
        })),
        seq: 0,
        ..parent.clone()
    };
    // The replica placement names first misses the clone's first write (it
    // is out of sync from then on).
    let stale = f.map.place(&clone.id, 0, 3)[0];
    let two = VolumeSpec {
        in_sync: (1..=3).filter(|n| *n != stale).collect(),
        ..clone.clone()
    };
    let node = |id: u64| f.nodes.iter().find(|n| n.node == id).unwrap();
    let first = node(two.in_sync[0]).open(two.clone());
    f.rt.block_on(first.activate()).unwrap();
    f.rt.block_on(first.write(0, &[0x42; 4096])).unwrap();
    drop(first);
    // A writer on the stale node itself, which knows it is out of sync: its
    // copy, which lacks the object, is not asked whether it exists, so the
    // next write keeps the first instead of copying the parent over it.
    let second = node(stale).open(VolumeSpec { epoch: 2, ..two });
    f.rt.block_on(second.activate()).unwrap();
    f.rt.block_on(second.write(8192, &[0x43; 4096])).unwrap();
    let got = f.rt.block_on(second.read(0, 12288)).unwrap();
    assert!(
        got[..4096].iter().all(|b| *b == 0x42),
        "the first write was lost"
    );
    assert!(got[4096..8192].iter().all(|b| *b == 0x41));
    assert!(got[8192..].iter().all(|b| *b == 0x43));
}
