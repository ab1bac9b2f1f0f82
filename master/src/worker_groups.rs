//! Worker groups' members (`[[worker_group]]` itself is read by
//! `config/worker_groups.rs`): many machines enrol with one group token and
//! each receives its own worker token, of which the master keeps only the
//! hash (in SQLite, not in master.toml); the roster of enrolled workers the
//! server checks upgrades and hellos against, by name or token hash in O(1);
//! and the enrolment endpoint's rate limit, per source address and in all
//! ([`EnrolLimiter`]). The endpoints themselves are in `enrolment.rs`, a
//! layer above.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// One enrolled worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub group: String,
    /// Lowercase hex SHA-256 of its own token.
    pub token_sha256: String,
}

#[derive(Debug, Default)]
struct Roster {
    by_name: HashMap<String, Member>,
    by_token: HashMap<String, String>,
    per_group: HashMap<String, u32>,
}

/// The enrolled workers, shared by the server (upgrade and hello checks),
/// the enrolment and revocation API, and the scheduler's start. Cheap to
/// clone; every lookup is O(1).
#[derive(Debug, Clone, Default)]
pub struct Enrolled(Arc<RwLock<Roster>>);

impl Enrolled {
    /// The roster as stored.
    pub fn of(members: Vec<Member>) -> Enrolled {
        let enrolled = Enrolled::default();
        for member in members {
            enrolled.insert(member);
        }
        enrolled
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Roster> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Roster> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, member: Member) {
        let mut roster = self.write();
        roster
            .by_token
            .insert(member.token_sha256.clone(), member.name.clone());
        *roster.per_group.entry(member.group.clone()).or_default() += 1;
        if let Some(old) = roster.by_name.insert(member.name.clone(), member) {
            roster.by_token.remove(&old.token_sha256);
            if let Some(count) = roster.per_group.get_mut(&old.group) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// Forgets `name`; answers what it was.
    pub fn remove(&self, name: &str) -> Option<Member> {
        let mut roster = self.write();
        let member = roster.by_name.remove(name)?;
        roster.by_token.remove(&member.token_sha256);
        if let Some(count) = roster.per_group.get_mut(&member.group) {
            *count = count.saturating_sub(1);
        }
        Some(member)
    }

    pub fn member(&self, name: &str) -> Option<Member> {
        self.read().by_name.get(name).cloned()
    }

    /// The member whose token hashes to `hash`.
    pub fn with_token(&self, hash: &str) -> Option<Member> {
        let roster = self.read();
        let name = roster.by_token.get(hash)?;
        roster.by_name.get(name).cloned()
    }

    /// How many members `group` has.
    pub fn count(&self, group: &str) -> u32 {
        self.read().per_group.get(group).copied().unwrap_or(0)
    }

    /// How many workers are enrolled, in all groups.
    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    /// Every member (the scheduler's start).
    pub fn all(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self.read().by_name.values().cloned().collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        members
    }
}

/// Enrolments one source address may make per second, sustained…
pub const ENROL_PER_SOURCE_PER_SEC: f64 = 2.0;
/// …and at once (a lab behind one NAT enrolling its machines together).
pub const ENROL_PER_SOURCE_BURST: f64 = 60.0;
/// Enrolments per second from everywhere together, sustained…
pub const ENROL_PER_SEC: f64 = 50.0;
/// …and at once.
pub const ENROL_BURST: f64 = 500.0;
/// Most source addresses remembered; past it, addresses whose bucket is
/// full again are forgotten, and a new one meets only the global limit.
pub const ENROL_SOURCES_KEPT: usize = 4096;

/// A token bucket that refuses (without going into debt) when empty.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes a token, or answers how long until there is one.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Which limit refused an enrolment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrolLimit {
    /// Its source address's.
    Source,
    /// All sources' together.
    Global,
}

impl EnrolLimit {
    pub fn label(self) -> &'static str {
        match self {
            EnrolLimit::Source => "source",
            EnrolLimit::Global => "global",
        }
    }
}

/// The enrolment endpoint's own rate limit: a token bucket per source
/// address and one for all of them, checked before the enrolment token is
/// (a guess costs a token too). Its clock is a parameter, so tests choose
/// the instants.
#[derive(Debug)]
pub struct EnrolLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    global: Bucket,
    per_source: HashMap<IpAddr, Bucket>,
}

impl EnrolLimiter {
    pub fn new(now: Instant) -> EnrolLimiter {
        EnrolLimiter {
            state: Mutex::new(LimiterState {
                global: Bucket::new(ENROL_PER_SEC, ENROL_BURST, now),
                per_source: HashMap::new(),
            }),
        }
    }

    /// Whether `source` may enrol at `now`; when not, which limit says so
    /// and when to come back.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), (EnrolLimit, Duration)> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.per_source.contains_key(&source) && state.per_source.len() >= ENROL_SOURCES_KEPT {
            state.per_source.retain(|_, bucket| !bucket.is_full(now));
        }
        let kept =
            state.per_source.len() < ENROL_SOURCES_KEPT || state.per_source.contains_key(&source);
        if kept {
            let bucket = state.per_source.entry(source).or_insert_with(|| {
                Bucket::new(ENROL_PER_SOURCE_PER_SEC, ENROL_PER_SOURCE_BURST, now)
            });
            // A source's own refusal does not use up the others' share.
            bucket
                .take(now)
                .map_err(|wait| (EnrolLimit::Source, wait))?;
        }
        state
            .global
            .take(now)
            .map_err(|wait| (EnrolLimit::Global, wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolments_are_limited_per_source_and_in_all() {
        let t0 = Instant::now();
        let limiter = EnrolLimiter::new(t0);
        let lab: IpAddr = "10.0.0.1".parse().unwrap();
        let burst = ENROL_PER_SOURCE_BURST as usize;
        for i in 0..burst {
            assert_eq!(limiter.check(lab, t0), Ok(()), "enrolment {i}");
        }
        let (limit, wait) = limiter.check(lab, t0).unwrap_err();
        assert_eq!(limit, EnrolLimit::Source);
        assert_eq!(
            wait,
            Duration::from_secs_f64(1.0 / ENROL_PER_SOURCE_PER_SEC)
        );
        // Another address is not held up by the first one's.
        assert_eq!(limiter.check("10.0.0.2".parse().unwrap(), t0), Ok(()));
        // After the wait, the lab may go on at the sustained rate.
        assert_eq!(limiter.check(lab, t0 + wait), Ok(()));
        assert!(limiter.check(lab, t0 + wait).is_err());

        // Many addresses at once meet the global limit.
        let limiter = EnrolLimiter::new(t0);
        let mut refused = None;
        for i in 0..(ENROL_BURST as u32 + 1) {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if let Err(why) = limiter.check(source, t0) {
                refused = Some((i, why.0));
                break;
            }
        }
        assert_eq!(refused, Some((ENROL_BURST as u32, EnrolLimit::Global)));
    }

    #[test]
    fn the_sources_remembered_stay_bounded() {
        let t0 = Instant::now();
        let limiter = EnrolLimiter::new(t0);
        let later = t0 + Duration::from_secs(3600);
        for i in 0..(ENROL_SOURCES_KEPT as u32 + 10) {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            // Spread out, so the global bucket never runs dry.
            let now = t0 + Duration::from_secs(u64::from(i));
            let _ = limiter.check(source, now.min(later));
        }
        let kept = limiter.state.lock().unwrap().per_source.len();
        assert!(kept <= ENROL_SOURCES_KEPT, "{kept} sources kept");
    }

    #[test]
    fn the_roster_finds_members_by_name_and_token_and_counts_them_per_group() {
        let member = |name: &str, group: &str, hash: char| Member {
            name: name.into(),
            group: group.into(),
            token_sha256: hash.to_string().repeat(64),
        };
        let roster = Enrolled::of(vec![
            member("lab-1", "lab", '1'),
            member("lab-2", "lab", '2'),
        ]);
        assert_eq!(roster.count("lab"), 2);
        assert_eq!(roster.with_token(&"2".repeat(64)).unwrap().name, "lab-2");
        assert_eq!(roster.member("lab-1").unwrap().token_sha256, "1".repeat(64));
        // Re-issuing a member's token forgets the old one.
        roster.insert(member("lab-1", "lab", '3'));
        assert!(roster.with_token(&"1".repeat(64)).is_none());
        assert_eq!(roster.count("lab"), 2);
        assert_eq!(roster.remove("lab-1").unwrap().group, "lab");
        assert!(roster.with_token(&"3".repeat(64)).is_none());
        assert!(roster.member("lab-1").is_none());
        assert_eq!(roster.count("lab"), 1);
        assert!(roster.remove("lab-1").is_none());
    }
}
