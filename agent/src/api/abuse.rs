//! What refused and unauthenticated callers may cost a node: they are
//! counted in memory and summarised in the audit log once per window, and
//! password logins are rate-limited and run Argon2 a bounded number at a
//! time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::cluster::node::ClusterNode;
use crate::state::audit::{
    AuditContext, AuditRecord, RefusalSummary, SourceCount, REFUSAL_SUMMARY_ACTION,
};

/// How often a node writes its summary of refused unauthenticated requests.
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Distinct source addresses counted one by one per window; the rest are
/// counted together.
const MAX_SOURCES: usize = 4096;
/// Sources named in a summary.
const TOP_SOURCES: usize = 10;
/// Requests quoted in a summary, and the most bytes of each.
const FIRST_REQUESTS: usize = 5;
const REQUEST_QUOTE_BYTES: usize = 256;

/// Unauthenticated requests this node refused since its last summary.
#[derive(Default)]
pub struct RefusalLog {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    since_ms: u64,
    requests: u64,
    results: std::collections::BTreeMap<String, u64>,
    sources: HashMap<Option<IpAddr>, u64>,
    unlisted: u64,
    first_requests: Vec<String>,
}

use crate::units::truncate_at_char;

impl RefusalLog {
    /// Counts one refused request. Costs a lock and a few map updates, and
    /// the memory it holds is bounded whatever the callers send.
    pub fn record(&self, now_ms: u64, source: Option<IpAddr>, result: &str, request: &str) {
        let mut w = self.window.lock().expect("refusal log");
        if w.requests == 0 {
            w.since_ms = now_ms;
        }
        w.requests += 1;
        match w.results.get_mut(result) {
            Some(n) => *n += 1,
            None => {
                w.results.insert(result.to_string(), 1);
            }
        }
        let known = w.sources.len();
        match w.sources.get_mut(&source) {
            Some(n) => *n += 1,
            None if known < MAX_SOURCES => {
                w.sources.insert(source, 1);
            }
            None => w.unlisted += 1,
        }
        if w.first_requests.len() < FIRST_REQUESTS {
            w.first_requests
                .push(truncate_at_char(request, REQUEST_QUOTE_BYTES).to_string());
        }
    }

    /// The window's summary as an audit record, and a new window; `None`
    /// when nothing was refused.
    pub fn take(&self, node: u64, now_ms: u64) -> Option<AuditRecord> {
        let w = std::mem::take(&mut *self.window.lock().expect("refusal log"));
        if w.requests == 0 {
            return None;
        }
        let mut sources: Vec<(Option<IpAddr>, u64)> = w.sources.into_iter().collect();
        sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let show = |ip: &Option<IpAddr>| ip.map_or_else(|| "-".to_string(), |ip| ip.to_string());
        let top_sources: Vec<SourceCount> = sources
            .iter()
            .take(TOP_SOURCES)
            .map(|(ip, n)| SourceCount {
                source: show(ip),
                requests: *n,
            })
            .collect();
        let other_requests = w.unlisted
            + sources
                .iter()
                .skip(TOP_SOURCES)
                .map(|(_, n)| n)
                .sum::<u64>();
        let context = AuditContext {
            time_ms: now_ms,
            user: "-".into(),
            token_id: "-".into(),
            source: top_sources
                .first()
                .map_or_else(|| "-".into(), |s| s.source.clone()),
            action: REFUSAL_SUMMARY_ACTION.into(),
            object: format!("{} requests", w.requests),
            zone: None,
        };
        let mut record = context.with_result("unauthenticated");
        record.summary = Some(RefusalSummary {
            node,
            since_ms: w.since_ms,
            until_ms: now_ms,
            requests: w.requests,
            results: w.results,
            top_sources,
            other_requests,
            first_requests: w.first_requests,
        });
        Some(record)
    }
}

/// Writes this node's summary of refused requests to the audit log every
/// `interval`, for as long as the node runs.
pub async fn write_summaries(
    node: Weak<ClusterNode>,
    log: std::sync::Arc<RefusalLog>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(node) = node.upgrade() else { return };
        let Some(record) = log.take(node.id, crate::cluster::join::now_ms()) else {
            continue;
        };
        let requests = record.summary.as_ref().map_or(0, |s| s.requests);
        match node
            .write(&crate::state::Command::AppendAudit { record })
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, requests, "the audit log refused a summary of refused requests")
            }
            Err(e) => tracing::error!(
                error = %crate::error_chain(&e),
                requests,
                "cannot write the summary of refused requests to the audit log; they are logged here only"
            ),
        }
    }
}

/// Unknown bearer tokens a node may see in a second before it counts as a
/// flood.
pub const FLOOD_PER_SECOND: u32 = 20;

/// Tells a flood of unknown tokens from an occasional one (a token created
/// a moment ago through another node, not yet applied here).
#[derive(Default)]
pub struct FloodMeter {
    /// The current second, its count, and the previous second's count.
    window: Mutex<(u64, u32, u32)>,
}

impl FloodMeter {
    /// Counts one unknown token; whether this or the last second saw more
    /// than [`FLOOD_PER_SECOND`].
    pub fn note(&self, now_ms: u64) -> bool {
        let mut w = self.window.lock().expect("flood meter");
        let second = now_ms / 1000;
        if second != w.0 {
            let previous = if second == w.0 + 1 { w.1 } else { 0 };
            *w = (second, 0, previous);
        }
        w.1 = w.1.saturating_add(1);
        w.1 > FLOOD_PER_SECOND || w.2 > FLOOD_PER_SECOND
    }
}

/// A token bucket: `burst` at most, refilled at one per `refill_ms`.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets by key, bounded in number.
struct Buckets {
    burst: f64,
    refill_ms: f64,
    buckets: HashMap<String, Bucket>,
}

const MAX_BUCKETS: usize = 10_000;

impl Buckets {
    fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst: f64::from(burst),
            refill_ms: refill.as_millis() as f64,
            buckets: HashMap::new(),
        }
    }

    fn level(&self, bucket: Bucket, now_ms: u64) -> f64 {
        (bucket.tokens + now_ms.saturating_sub(bucket.at_ms) as f64 / self.refill_ms)
            .min(self.burst)
    }

    /// Seconds until `key` has a token, or `None` when it has one now.
    fn wait_secs(&self, key: &str, now_ms: u64) -> Option<u64> {
        let bucket = self.buckets.get(key)?;
        let level = self.level(*bucket, now_ms);
        (level < 1.0).then(|| ((1.0 - level) * self.refill_ms / 1000.0).ceil() as u64)
    }

    /// Takes a token from `key`'s bucket (it may go below zero: a caller
    /// who keeps trying waits longer).
    fn take(&mut self, key: &str, now_ms: u64) {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(key) {
            let (burst, refill_ms) = (self.burst, self.refill_ms);
            self.buckets.retain(|_, b| {
                b.tokens + now_ms.saturating_sub(b.at_ms) as f64 / refill_ms < burst
            });
            if self.buckets.len() >= MAX_BUCKETS {
                // Every bucket is in use: forget the lot rather than grow.
                self.buckets.clear();
            }
        }
        let level = match self.buckets.get(key) {
            Some(bucket) => self.level(*bucket, now_ms),
            None => self.burst,
        };
        self.buckets.insert(
            key.to_string(),
            Bucket {
                tokens: (level - 1.0).max(-self.burst),
                at_ms: now_ms,
            },
        );
    }

    /// Gives back a token taken by [`Buckets::take`].
    fn refund(&mut self, key: &str) {
        if let Some(bucket) = self.buckets.get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }
}

/// Refused calls of one user that get an audit entry of their own: a burst
/// of this many, then one a second; the rest are counted in the node's
/// summary entry, so a caller looping on a refused call cannot grow the
/// permanent log without bound.
pub const REFUSED_ENTRIES_BURST: u32 = 20;

/// The budget of audit entries for each user's refused calls.
pub struct RefusedEntries(Mutex<Buckets>);

impl Default for RefusedEntries {
    fn default() -> Self {
        Self(Mutex::new(Buckets::new(
            REFUSED_ENTRIES_BURST,
            Duration::from_secs(1),
        )))
    }
}

impl RefusedEntries {
    /// Whether `user`'s next refused call gets an entry of its own.
    pub fn admit(&self, user: &str, now_ms: u64) -> bool {
        let user = truncate_at_char(user, 128);
        let mut buckets = self.0.lock().expect("refused entries");
        if buckets.wait_secs(user, now_ms).is_some() {
            return false;
        }
        buckets.take(user, now_ms);
        true
    }
}

/// Password logins: at most one Argon2 per core at a time, a budget of
/// attempts per source address, and a budget of failures per user name
/// from each source address (so that a guesser cannot spend the budget of
/// the user's own logins from elsewhere) as well as from all together.
pub struct LoginGuard {
    argon: tokio::sync::Semaphore,
    limits: Mutex<LoginLimits>,
    /// A hash of a random password, verified against when the user does
    /// not exist or has no password, so that such a refusal takes as long
    /// as a wrong password does.
    decoy: OnceLock<String>,
}

struct LoginLimits {
    by_source: Buckets,
    /// Failures per user name and source address.
    by_user_here: Buckets,
    /// Failures per user name from anywhere: many addresses together can
    /// spend it, but one address alone refills slower than it does.
    by_user: Buckets,
}

/// Failed logins per user name from all addresses together: a burst of this
/// many, then one a second.
pub const LOGIN_BURST_PER_USER_ANYWHERE: u32 = 20;

/// Login attempts per source address: a burst of this many, then one a second.
pub const LOGIN_BURST_PER_SOURCE: u32 = 10;
/// Failed logins per user name and source address: a burst of this many,
/// then one every 6 s.
pub const LOGIN_BURST_PER_USER: u32 = 5;

impl Default for LoginGuard {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            argon: tokio::sync::Semaphore::new(cores),
            limits: Mutex::new(LoginLimits {
                by_source: Buckets::new(LOGIN_BURST_PER_SOURCE, Duration::from_secs(1)),
                by_user_here: Buckets::new(LOGIN_BURST_PER_USER, Duration::from_secs(6)),
                by_user: Buckets::new(LOGIN_BURST_PER_USER_ANYWHERE, Duration::from_secs(1)),
            }),
            decoy: OnceLock::new(),
        }
    }
}

/// Why a login attempt was not even tried.
pub struct LoginLimited {
    pub retry_after_secs: u64,
    pub by_user: bool,
}

impl LoginGuard {
    /// Admits an attempt from `source` for `user`, or says how long to wait.
    pub fn admit(
        &self,
        source: Option<IpAddr>,
        user: &str,
        now_ms: u64,
    ) -> Result<(), LoginLimited> {
        let source = source.map_or_else(|| "-".to_string(), |ip| ip.to_string());
        let user = truncate_at_char(user, 128);
        let mut limits = self.limits.lock().expect("login limits");
        let limits = &mut *limits;
        if let Some(secs) = limits.by_source.wait_secs(&source, now_ms) {
            return Err(LoginLimited {
                retry_after_secs: secs,
                by_user: false,
            });
        }
        let user_here = format!("{user} from {source}");
        if let Some(secs) = limits
            .by_user_here
            .wait_secs(&user_here, now_ms)
            .or_else(|| limits.by_user.wait_secs(user, now_ms))
        {
            return Err(LoginLimited {
                retry_after_secs: secs,
                by_user: true,
            });
        }
        limits.by_source.take(&source, now_ms);
        limits.by_user_here.take(&user_here, now_ms);
        limits.by_user.take(user, now_ms);
        Ok(())
    }

    /// A successful login does not count against its user's budget.
    pub fn succeeded(&self, source: Option<IpAddr>, user: &str) {
        let source = source.map_or_else(|| "-".to_string(), |ip| ip.to_string());
        let user = truncate_at_char(user, 128);
        let mut limits = self.limits.lock().expect("login limits");
        limits.by_user_here.refund(&format!("{user} from {source}"));
        limits.by_user.refund(user);
    }

    /// Checks `password` against `phc`, or against a decoy when there is
    /// none, with at most one Argon2 per core running at a time.
    pub async fn verify(&self, password: String, phc: Option<String>) -> bool {
        let Ok(_permit) = self.argon.acquire().await else {
            return false;
        };
        let real = phc.is_some();
        let phc = match phc {
            Some(phc) => phc,
            None => self.decoy().await,
        };
        crate::api::users::verify_password(password, phc).await && real
    }

    async fn decoy(&self) -> String {
        if let Some(phc) = self.decoy.get() {
            return phc.clone();
        }
        let random = crate::cluster::join::random_hex(16);
        let phc = crate::api::users::hash_password(random)
            .await
            .unwrap_or_default();
        self.decoy.get_or_init(|| phc).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guesser who spends a user's failure budget from one address does
    /// not lock the user out from another, however long it keeps guessing.
    #[test]
    fn a_guesser_cannot_spend_a_users_login_budget_elsewhere() {
        let guard = LoginGuard::default();
        let guesser = Some(IpAddr::from([192, 0, 2, 1]));
        let user = Some(IpAddr::from([198, 51, 100, 7]));
        let now = 1_000_000;
        let mut refused = None;
        for _ in 0..=LOGIN_BURST_PER_USER {
            if let Err(limited) = guard.admit(guesser, "alice", now) {
                refused = Some(limited);
            }
        }
        assert!(refused.is_some_and(|l| l.by_user), "the guesser is limited");
        assert!(guard.admit(user, "alice", now).is_ok());
        guard.succeeded(user, "alice");
        // Guessing as fast as it is let, for an hour, from one address.
        for second in (6..3600).step_by(6) {
            let _ = guard.admit(guesser, "alice", now + second * 1000);
            assert!(guard.admit(user, "alice", now + second * 1000).is_ok());
            guard.succeeded(user, "alice");
        }
    }

    #[test]
    fn a_flood_is_summarised_in_bounded_memory() {
        let log = RefusalLog::default();
        let long = format!("GET /{}", "é".repeat(1000));
        for _ in 0..100 {
            log.record(1_000, None, "invalid_argument", "POST /v1/login");
        }
        for i in 0..20_000u32 {
            let ip = IpAddr::from((i % 5000).to_be_bytes());
            log.record(2_000, Some(ip), "unauthenticated", &long);
        }
        let window = log.window.lock().unwrap();
        assert_eq!(window.sources.len(), MAX_SOURCES);
        drop(window);
        let record = log.take(3, 5_000).unwrap();
        let summary = record.summary.unwrap();
        assert_eq!(summary.requests, 20_100);
        assert_eq!(summary.results["unauthenticated"], 20_000);
        assert_eq!(summary.results["invalid_argument"], 100);
        assert_eq!(summary.top_sources.len(), TOP_SOURCES);
        assert_eq!(summary.top_sources[0].source, "-");
        assert_eq!(summary.top_sources[0].requests, 100);
        let named: u64 = summary.top_sources.iter().map(|s| s.requests).sum();
        assert_eq!(named + summary.other_requests, 20_100);
        assert_eq!(summary.first_requests.len(), FIRST_REQUESTS);
        assert!(summary
            .first_requests
            .iter()
            .all(|r| r.len() <= REQUEST_QUOTE_BYTES));
        assert_eq!(
            (summary.since_ms, summary.until_ms, summary.node),
            (1_000, 5_000, 3)
        );
        assert!(serde_json::to_vec(&summary).unwrap().len() < 4096);
        assert!(log.take(3, 6_000).is_none(), "the window starts empty");
    }

    #[test]
    fn a_flood_is_told_from_an_occasional_unknown_token() {
        let meter = FloodMeter::default();
        assert!((0..FLOOD_PER_SECOND).all(|i| !meter.note(1_000 + u64::from(i))));
        assert!(meter.note(1_500));
        assert!(meter.note(2_100), "the next second still counts the flood");
        assert!(!meter.note(4_000), "two quiet seconds end it");
    }

    #[test]
    fn login_budgets_refill_and_a_success_is_refunded() {
        let guard = LoginGuard::default();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..LOGIN_BURST_PER_USER {
            assert!(guard.admit(a, "alice", 0).is_ok());
        }
        // The user's budget from that address is spent.
        let limited = guard.admit(a, "alice", 0).err().unwrap();
        assert!(limited.by_user);
        assert_eq!(limited.retry_after_secs, 6);
        assert!(guard.admit(b, "bob", 0).is_ok());
        // A success gives its token back.
        guard.succeeded(a, "alice");
        assert!(guard.admit(a, "alice", 0).is_ok());
        // The source's budget.
        for i in 0..LOGIN_BURST_PER_SOURCE - LOGIN_BURST_PER_USER - 1 {
            assert!(guard.admit(a, &format!("u{i}"), 0).is_ok());
        }
        let limited = guard.admit(a, "carol", 0).err().unwrap();
        assert!(!limited.by_user);
        assert_eq!(limited.retry_after_secs, 1);
        assert!(guard.admit(a, "carol", 1_000).is_ok());
        assert!(guard.admit(b, "alice", 7_000).is_ok());
        assert!(guard.admit(a, "alice", 7_000).is_ok());
    }
}
