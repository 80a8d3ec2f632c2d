//! Structured mutation fuzzing of every parser that reads what strangers
//! send: the NBD handshake and transmission phase, the storage protocol
//! decoder, join tokens, DHCP requests, and the API's JSON bodies.
//!
//! No coverage-guided fuzzer builds on this stable toolchain, so each
//! target starts from its checked-in corpus (`tests/fuzz-corpus/<target>/`)
//! and mutates it with a seeded generator (bit flips, byte and length
//! changes, truncation, splicing, inserted interesting values) for a time
//! budget: `ALLOD_FUZZ_SECS` (default 10 s per target), seed
//! `ALLOD_FUZZ_SEED` (default: fixed, so CI runs are repeatable). Every
//! input must be handled without a panic and without holding more than
//! the target's memory bound; a failing input is saved under
//! `target/fuzz-failures/` to be added to the corpus once fixed.
//! `ALLOD_FUZZ_WRITE_CORPUS=1` rewrites the seed files from the encoders.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// Counts live heap bytes and their peak, to catch an input that makes a
/// parser allocate without bound. nextest runs each test in a process of
/// its own, so the count is this target's alone.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the
// counters are atomics that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as it is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as it is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grown = new_size - layout.size();
                let live = LIVE.fetch_add(grown, Ordering::Relaxed) + grown;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

/// The checked-in seeds of `target`; with `ALLOD_FUZZ_WRITE_CORPUS=1`,
/// first rewritten from `generated`.
fn corpus(target: &str, generated: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    if std::env::var_os("ALLOD_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in generated.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
        }
    }
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {} is missing: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "the corpus {} is empty", dir.display());
    seeds.sort();
    seeds
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    u64::MAX,
    1 << 25,
    (1 << 25) + 1,
];

fn mutate(rng: &mut rand::rngs::StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..6) {
        let at = |rng: &mut rand::rngs::StdRng, len: usize| rng.gen_range(0..len.max(1));
        match rng.gen_range(0..7) {
            0 if !data.is_empty() => {
                let i = at(rng, data.len());
                data[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !data.is_empty() => {
                let i = at(rng, data.len());
                data[i] = rng.gen();
            }
            2 => {
                let cut = at(rng, data.len() + 1);
                data.truncate(cut);
            }
            3 => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let from = at(rng, other.len());
                let to = at(rng, data.len() + 1);
                let piece: Vec<u8> = other[from.min(other.len())..]
                    .iter()
                    .take(64)
                    .copied()
                    .collect();
                data.splice(to..to, piece);
            }
            4 => {
                // An interesting number over 1, 2, 4 or 8 bytes, big-endian
                // (the wire protocols' order).
                let width = [1usize, 2, 4, 8][rng.gen_range(0..4)];
                let value = INTERESTING[rng.gen_range(0..INTERESTING.len())].to_be_bytes();
                let i = at(rng, data.len());
                for (k, b) in value[8 - width..].iter().enumerate() {
                    if let Some(slot) = data.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
            5 if data.len() > 1 => {
                let i = at(rng, data.len());
                let n = rng.gen_range(1..=(data.len() - i).min(16));
                data.drain(i..i + n);
            }
            _ => {
                let i = at(rng, data.len() + 1);
                let byte: u8 = rng.gen();
                let n = rng.gen_range(1..32);
                data.splice(i..i, std::iter::repeat_n(byte, n));
            }
        }
    }
    data
}

/// Runs `check` on mutated inputs for the time budget; panics (with the
/// input saved) on a panic or when an input pushes the live heap past
/// `memory_bound` bytes above where it started.
fn fuzz(target: &str, generated: Vec<Vec<u8>>, memory_bound: usize, mut check: impl FnMut(&[u8])) {
    let seeds = corpus(target, generated);
    let secs = std::env::var("ALLOD_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10u64);
    let seed = std::env::var("ALLOD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_261_202u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    let save = |input: &[u8], why: &str, runs: u64| -> String {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{target}-{runs}"));
        std::fs::write(&path, input).unwrap();
        format!("{target}: {why}; the input is in {}", path.display())
    };
    // A panic is reported by saving its input; without a backtrace, whose
    // symbolisation would count against the memory bound.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    // The seeds themselves first, then mutations.
    let mut pending: Vec<Vec<u8>> = seeds.clone();
    while Instant::now() < deadline || !pending.is_empty() {
        let input = pending.pop().unwrap_or_else(|| mutate(&mut rng, &seeds));
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if outcome.is_err() {
            panic!("{}", save(&input, "the parser panicked", runs));
        }
        let used = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        if used > memory_bound {
            panic!(
                "{}",
                save(
                    &input,
                    &format!("one input held {used} bytes, more than {memory_bound}"),
                    runs
                )
            );
        }
        runs += 1;
    }
    eprintln!("{target}: {runs} inputs, no panic, memory within {memory_bound} bytes");
}

#[test]
fn fuzz_the_storage_protocol_decoder() {
    use storage::proto::{Request, Response};
    // Frames without their 4-byte length prefix: what the decoders get.
    let generated: Vec<Vec<u8>> = vec![
        Request::Write {
            volume: "v".into(),
            index: 3,
            offset: 512,
            seq: 1,
            epoch: 2,
            data: vec![0xab; 64],
        }
        .encode(7),
        Request::Flush { volume: "v".into() }.encode(8),
        Response::Data(vec![1, 2, 3]).encode(9),
        Response::Error {
            kind: storage::proto::ErrorKind::StaleEpoch,
            message: "fenced".into(),
        }
        .encode(10),
    ]
    .into_iter()
    .map(|frame| frame[4..].to_vec())
    .collect();
    fuzz("storage-proto", generated, 1 << 20, |input| {
        // A frame's body: what the transport hands the decoders.
        let _ = Request::decode(input);
        let _ = Response::decode(input);
    });
}

#[test]
fn fuzz_join_tokens() {
    let token = agent::cluster::join::JoinToken {
        cluster_id: "c0ffee".into(),
        ca_fingerprint: "ab".repeat(32),
        members: vec![agent::cluster::join::TokenMember {
            name: "n1".into(),
            api_addr: "10.0.0.1:7443".into(),
            peer_addr: "10.0.0.1:7444".into(),
        }],
        id: "id".into(),
        secret: "s".repeat(64),
        expires_at_ms: u64::MAX,
    };
    let json = serde_json::to_vec(&token).unwrap();
    let generated = vec![token.encode().into_bytes(), json];
    fuzz("join-token", generated, 1 << 20, |input| {
        // As pasted text, and as the JSON inside the base64.
        let text = String::from_utf8_lossy(input);
        let _ = agent::cluster::join::JoinToken::decode(&text, 0);
        use base64::Engine;
        let wrapped = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(input);
        if let Ok(t) = agent::cluster::join::JoinToken::decode(&wrapped, 0) {
            assert_eq!(
                t.ca_fingerprint.len(),
                64,
                "a token with a bad fingerprint was taken"
            );
        }
    });
}

#[test]
fn fuzz_dhcp_requests() {
    use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
    use dhcproto::Encodable;
    let mac = [0x52u8, 0x54, 0, 0x12, 0x34, 0x56];
    let mut discover = Message::default();
    discover.set_chaddr(&mac);
    discover
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    discover
        .opts_mut()
        .insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
        ]));
    let mut request = discover.clone();
    request
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    request
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress([10, 0, 0, 5].into()));
    let generated = vec![discover.to_vec().unwrap(), request.to_vec().unwrap()];
    let leases: std::collections::HashMap<netfabric::Mac, netfabric::dhcp::Lease> = [(
        mac,
        netfabric::dhcp::Lease {
            ip: [10, 0, 0, 5].into(),
            prefix: 24,
            router: [10, 0, 0, 1].into(),
            dns: vec![[10, 0, 0, 2].into()],
            mtu: 1450,
            hostname: "web1".into(),
        },
    )]
    .into();
    fuzz("dhcp", generated, 1 << 20, |input| {
        if let Ok(Some(reply)) = netfabric::dhcp::handle_packet(input, Some(&leases)) {
            assert!(reply.len() <= 1500, "a reply larger than a frame");
        }
    });
}

#[test]
fn fuzz_the_apis_json_bodies() {
    use agent::api_types::*;
    let generated: Vec<Vec<u8>> = [
        r#"{"name":"data","size_bytes":1073741824,"replicas":3,"min_replicas":2}"#,
        r#"{"name":"web1","vcpus":2,"memory_bytes":536870912,"image":"debian-12","disk_size_bytes":10737418240,"nics":[{"subnet":"front","security_groups":["default"]}],"start":true}"#,
        r#"{"name":"p","description":"d","zone":"SECRET"}"#,
        r#"{"direction":"ingress","protocol":"tcp","port_min":22,"port_max":22,"cidr":"192.0.2.0/24"}"#,
        r#"{"name":"front","cidr":"10.0.0.0/24","gateway":"10.0.0.1","dns":["10.0.0.2"]}"#,
        r#"{"user":"admin","password":"correct horse"}"#,
        r#"{"issuer":"https://sso.example","audience":"allod","claim":"groups","mappings":[{"value":"ops","role":"cluster-admin"}]}"#,
        r#"{"token":"abc","csr_pem":"-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----\n","name":"n2","api_addr":"10.0.0.2:7443","peer_addr":"10.0.0.2:7444","time_ms":1}"#,
        r#"{"read_only":true,"ttl_secs":3600,"node":1}"#,
        r#"{"snapshot":"s","name":"c","size_bytes":2147483648}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("api-json", generated, 4 << 20, |input| {
        // The API reads at most 64 KiB of a body.
        let input = &input[..input.len().min(64 << 10)];
        let _ = serde_json::from_slice::<CreateVolume>(input);
        let _ = serde_json::from_slice::<CreateVm>(input);
        let _ = serde_json::from_slice::<CreateProject>(input);
        let _ = serde_json::from_slice::<AddRule>(input);
        let _ = serde_json::from_slice::<CreateSubnet>(input);
        let _ = serde_json::from_slice::<CreatePort>(input);
        let _ = serde_json::from_slice::<Login>(input);
        let _ = serde_json::from_slice::<IssuerSpec>(input);
        let _ = serde_json::from_slice::<CreateExport>(input);
        let _ = serde_json::from_slice::<CloneVolume>(input);
        let _ = serde_json::from_slice::<CreateToken>(input);
        let _ = serde_json::from_slice::<UpdateUser>(input);
        let _ = serde_json::from_slice::<UpdateVm>(input);
        let _ = serde_json::from_slice::<CreatePool>(input);
        let _ = serde_json::from_slice::<agent::cluster::join::JoinRequest>(input);
        if let Ok(issuer) = serde_json::from_slice::<agent::state::auth::OidcIssuer>(input) {
            let _ = issuer.validate();
        }
    });
}

/// One single-replica volume on a real store in a temporary directory,
/// served as export `v.ok`; every other name is refused.
struct OneVolume {
    storage: Arc<storage::Storage>,
    spec: storage::VolumeSpec,
}

struct NoSets;

impl storage::ReplicaSets for NoSets {
    fn out_of_sync(
        &self,
        _: &str,
        _: u64,
        _: Vec<u64>,
    ) -> storage::nbd::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn recovering(
        &self,
        _: &str,
        _: u64,
        _: u64,
    ) -> storage::nbd::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn in_sync(&self, _: &str, _: u64, _: u64) -> storage::nbd::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

impl storage::nbd::Exports for OneVolume {
    fn open<'a>(
        &'a self,
        name: &'a str,
    ) -> storage::nbd::BoxFuture<'a, Result<storage::nbd::Export, String>> {
        Box::pin(async move {
            if name != "v.ok" {
                return Err("no such export".into());
            }
            let handle = self.storage.open(self.spec.clone());
            handle.activate().await.map_err(|e| e.to_string())?;
            Ok(storage::nbd::Export {
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
    ) -> storage::nbd::BoxFuture<'a, Result<storage::nbd::ExportInfo, String>> {
        Box::pin(async move {
            if name != "v.ok" {
                return Err("no such export".into());
            }
            Ok(storage::nbd::ExportInfo {
                size: self.spec.size,
                read_only: false,
            })
        })
    }
    fn list(&self) -> storage::nbd::BoxFuture<'_, Vec<String>> {
        Box::pin(async { Vec::new() })
    }
}

/// What a client sends: fixed newstyle flags, options, then requests.
fn nbd_session(options: &[(u32, Vec<u8>)], requests: &[(u16, u16, u64, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec();
    for (opt, data) in options {
        out.extend_from_slice(b"IHAVEOPT");
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    for (i, (flags, cmd, offset, len, data)) in requests.iter().enumerate() {
        out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&cmd.to_be_bytes());
        out.extend_from_slice(&(i as u64).to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(data);
    }
    out
}

fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[test]
fn fuzz_the_nbd_handshake_and_transmission() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(storage::ObjectStore::open(dir.path()).unwrap());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let storage = storage::Storage::new(
        1,
        store,
        storage::transport::Peers::new(Arc::new(tls)),
        Arc::new(NoSets),
    );
    let spec = storage::VolumeSpec {
        id: "v".into(),
        size: 8 << 20,
        object_size: 4 << 20,
        replicas: 1,
        min_replicas: 1,
        in_sync: vec![1],
        seq: 0,
        epoch: 1,
        map: Arc::new(storage::StorageMap {
            epoch: 1,
            nodes: vec![storage::MapNode {
                node: 1,
                weight: 1,
                failure_domain: "a".into(),
            }],
        }),
        parent: None,
    };
    let exports: Arc<dyn storage::nbd::Exports> = Arc::new(OneVolume { storage, spec });
    let go = info_request("v.ok", &[3]);
    let generated = vec![
        nbd_session(
            &[(3, vec![]), (6, go.clone()), (7, go.clone())],
            &[
                (0, 1, 4096, 4096, vec![0x5a; 4096]),
                (1, 1, 0, 512, vec![7; 512]),
                (0, 0, 0, 8192, vec![]),
                (0, 3, 0, 0, vec![]),
                (0, 4, 4096, 4096, vec![]),
                (2, 6, 8192, 4096, vec![]),
                (0, 2, 0, 0, vec![]),
            ],
        ),
        nbd_session(
            &[(1, b"v.ok".to_vec())],
            &[(0, 0, (8 << 20) - 512, 512, vec![])],
        ),
        nbd_session(&[(6, info_request("nope", &[])), (2, vec![])], &[]),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A connection may hold two of the largest requests' payloads.
    fuzz("nbd", generated, 96 << 20, |input| {
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let serve = tokio::spawn(storage::nbd::serve_client(server, exports.clone()));
            let input = input.to_vec();
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let send = async {
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let drain = async {
                let mut sink = vec![0u8; 64 << 10];
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let bounded = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::join!(send, drain);
            });
            bounded
                .await
                .expect("the server finished with the input within 10 s");
            match serve.await {
                Ok(_) => {}
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("{e}"),
            }
        });
    });
}
