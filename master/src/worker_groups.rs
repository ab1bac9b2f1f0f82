//! Worker groups (`[[worker_group]]`): many machines enrol with one group
//! token and each receives its own worker token, of which the master keeps
//! only the hash (in SQLite, not in master.toml); and the roster of enrolled
//! workers the server checks upgrades and hellos against, by name or token
//! hash in O(1); the enrolment and revocation endpoints, the enrolment one
//! rate-limited per source address and in all ([`EnrolLimiter`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nightshift_proto::api::{ApiError, EnrollRequest, EnrollResponse, RevokeResponse};
use serde::Deserialize;

use crate::api::{AppState, bearer, token_sha256};
use crate::scheduler::Event;

/// Most workers a group enrols unless `max_workers` says otherwise.
pub const DEFAULT_MAX_WORKERS: u32 = 10_000;

/// One `[[worker_group]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerGroupDef {
    /// The group's name: builders list it in `workers`, and every member's
    /// name starts with `<name>-`.
    pub name: String,
    /// Lowercase hex SHA-256 of the enrolment token. That token only
    /// enrols: it never opens an agent session and never runs a build.
    pub enroll_token_sha256: String,
    /// Builds each member may run at once (also capped by its agent).
    pub max_builds: u32,
    /// Most members the group enrols (revoking one makes room).
    pub max_workers: u32,
    /// Master-side availability windows for every member (same forms and
    /// meaning as a `[[worker]]`'s `schedule`), evaluated once for the group.
    pub schedule: Vec<nightshift_policy::ScheduleConfig>,
    /// The zone `schedule` is read in (default: the master's).
    pub timezone: Option<String>,
}

impl WorkerGroupDef {
    /// Whether `worker` is a name a member of this group may have:
    /// `<group>-<suffix>`, a valid name.
    pub fn may_name(&self, worker: &str) -> bool {
        worker
            .strip_prefix(&self.name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|suffix| !suffix.is_empty())
            && crate::config::valid_name(worker)
    }
}

/// `[[worker_group]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkerGroup {
    name: String,
    enroll_token_sha256: Option<String>,
    #[serde(default = "one")]
    max_builds: u32,
    #[serde(default = "default_max_workers")]
    max_workers: u32,
    #[serde(default)]
    schedule: Vec<nightshift_policy::ScheduleConfig>,
    timezone: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_max_workers() -> u32 {
    DEFAULT_MAX_WORKERS
}

/// Validates the groups; `worker_names` are the `[[worker]]` names (a group
/// may not share one: a builder's `workers` entry must mean one thing).
/// Every problem goes to `issue(key, message)`.
pub fn validate(
    raw: Vec<RawWorkerGroup>,
    worker_names: &BTreeSet<String>,
    issue: &mut impl FnMut(String, String),
) -> Vec<WorkerGroupDef> {
    let mut names = BTreeSet::new();
    let mut groups = Vec::new();
    for (i, g) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("worker_group[{i}].{field}");
        if !crate::config::valid_name(&g.name) {
            issue(
                key("name"),
                format!(
                    "`{}` is not a valid name (letters, digits, `-`, `_`, `.`)",
                    g.name
                ),
            );
        } else if worker_names.contains(&g.name) {
            issue(
                key("name"),
                format!(
                    "`{}` is already a [[worker]]; a group needs a name of its own",
                    g.name
                ),
            );
        } else if !names.insert(g.name.clone()) {
            issue(
                key("name"),
                format!("worker group `{}` is defined twice", g.name),
            );
        }
        let hash = match g.enroll_token_sha256.as_deref() {
            None => {
                issue(
                    key("enroll_token_sha256"),
                    "missing: the SHA-256 of the group's enrolment token \
                     (`master add-worker-group NAME` prints one)"
                        .into(),
                );
                String::new()
            }
            Some(text) => crate::config::normalize_hash(text).unwrap_or_else(|| {
                issue(
                    key("enroll_token_sha256"),
                    format!("`{text}` is not 64 hex digits (a SHA-256)"),
                );
                String::new()
            }),
        };
        if g.max_builds == 0 {
            issue(key("max_builds"), "must be at least 1".into());
        }
        if g.max_workers == 0 {
            issue(key("max_workers"), "must be at least 1".into());
        }
        crate::config::check_master_schedule(
            &g.schedule,
            g.timezone.as_deref(),
            &format!("worker_group[{i}]"),
            issue,
        );
        groups.push(WorkerGroupDef {
            name: g.name,
            enroll_token_sha256: hash,
            max_builds: g.max_builds,
            max_workers: g.max_workers,
            schedule: g.schedule,
            timezone: g.timezone,
        });
    }
    // One enrolment token per group, so a token says which group it is for.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        if g.enroll_token_sha256.is_empty() {
            continue;
        }
        if let Some(other) = seen.insert(&g.enroll_token_sha256, &g.name) {
            issue(
                format!("worker_group[{i}].enroll_token_sha256"),
                format!("the same enrolment token as group `{other}`; give each group its own"),
            );
        }
    }
    groups
}

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

/// An error answer: status and [`ApiError`] JSON.
fn failure(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
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

/// `429 Too Many Requests` with a `Retry-After` of `wait` (whole seconds,
/// at least one).
fn too_many(limit: EnrolLimit, wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let whose = match limit {
        EnrolLimit::Source => "from this address",
        EnrolLimit::Global => "on this master",
    };
    let mut response = failure(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many enrolments {whose}; retry after {seconds} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// `POST /api/v1/enroll`, authorized by a group's enrolment token: records a
/// new member of that group under the name it asks for and answers its own
/// token, shown this once (only the hash is stored). The enrolment token
/// itself opens no agent session.
pub async fn enroll(
    State(state): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Response {
    // The accept loop puts the peer's address on every request.
    let source = peer.map_or(
        IpAddr::from([0, 0, 0, 0]),
        |axum::Extension(ConnectInfo(addr))| addr.ip(),
    );
    if let Err((limit, wait)) = state.enrol_limiter.check(source, Instant::now()) {
        crate::metrics::METRICS.enrolment_rate_limited(limit);
        tracing::warn!(
            "enrolment from {source} refused: over the {} rate limit",
            limit.label()
        );
        return too_many(limit, wait);
    }
    let Some(token) = bearer(&headers) else {
        return failure(
            StatusCode::UNAUTHORIZED,
            "no enrolment token (Authorization: Bearer <the worker group's enrolment token>)"
                .into(),
        );
    };
    let config = state.config.get();
    let Some(group) = config.group_with_enroll_token(&token_sha256(&token)) else {
        tracing::warn!("enrolment refused: not a worker group's enrolment token");
        return failure(
            StatusCode::UNAUTHORIZED,
            "not the enrolment token of any [[worker_group]]".into(),
        );
    };
    let Json(request) = match body {
        Ok(body) => body,
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let name = request.name;
    if !group.may_name(&name) {
        return failure(
            StatusCode::BAD_REQUEST,
            format!(
                "`{name}` is not a name for group `{0}`: its workers are named `{0}-<suffix>` \
                 (letters, digits, `-`, `_`, `.`; at most 64 characters)",
                group.name
            ),
        );
    }
    if config.worker(&name).is_some() || state.enrolled.member(&name).is_some() {
        return failure(
            StatusCode::CONFLICT,
            format!(
                "worker `{name}` exists already; to enrol a machine under that name again, \
                 revoke it first (`master revoke-worker {name}`)"
            ),
        );
    }
    if state.enrolled.count(&group.name) >= group.max_workers {
        return failure(
            StatusCode::CONFLICT,
            format!(
                "group `{}` is full (max_workers = {}); revoke a worker or raise max_workers",
                group.name, group.max_workers
            ),
        );
    }
    let worker_token = crate::locate::new_token();
    let member = Member {
        name: name.clone(),
        group: group.name.clone(),
        token_sha256: token_sha256(&worker_token),
    };
    match state
        .store
        .enroll(member.clone(), jiff::Timestamp::now())
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return failure(
                StatusCode::CONFLICT,
                format!("worker `{name}` exists already (enrolled at the same moment)"),
            );
        }
        Err(e) => {
            tracing::error!("enrolment of {name}: {e:#}");
            return failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        }
    }
    state.enrolled.insert(member.clone());
    let _ = state.events.send(Event::Enrolled { member });
    tracing::info!("worker {name} enrolled in group {}", group.name);
    (
        StatusCode::CREATED,
        Json(EnrollResponse {
            name,
            group: group.name.clone(),
            token: worker_token,
        }),
    )
        .into_response()
}

/// `POST /api/v1/workers/{name}/revoke` (admin): the enrolled worker's
/// token stops working at once, its connection is closed and its running
/// builds run elsewhere.
pub async fn revoke(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(member) = state.enrolled.member(&name) else {
        let hint = if state.config.get().worker(&name).is_some() {
            " (it is a [[worker]] of master.toml: remove it there and reconfig)"
        } else {
            ""
        };
        return failure(
            StatusCode::NOT_FOUND,
            format!("no enrolled worker `{name}`{hint}"),
        );
    };
    match state.store.revoke(name.clone()).await {
        Ok(_) => {}
        Err(e) => {
            tracing::error!("revocation of {name}: {e:#}");
            return failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        }
    }
    state.enrolled.remove(&name);
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state
        .events
        .send(Event::Revoked {
            name: name.clone(),
            reply,
        })
        .is_err()
        || answer.await.is_err()
    {
        return failure(StatusCode::SERVICE_UNAVAILABLE, "master is stopping".into());
    }
    Json(RevokeResponse {
        name,
        group: member.group,
    })
    .into_response()
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
    fn a_refusal_is_429_with_whole_seconds_to_wait() {
        let response = too_many(EnrolLimit::Source, Duration::from_millis(300));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = too_many(EnrolLimit::Global, Duration::from_millis(2100));
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
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

    fn group(name: &str) -> WorkerGroupDef {
        WorkerGroupDef {
            name: name.into(),
            enroll_token_sha256: "a".repeat(64),
            max_builds: 1,
            max_workers: 10,
            schedule: Vec::new(),
            timezone: None,
        }
    }

    #[test]
    fn members_are_named_after_their_group() {
        let lab = group("lab");
        assert!(lab.may_name("lab-pc17"));
        assert!(lab.may_name("lab-a.b_c"));
        assert!(!lab.may_name("lab-"), "a suffix is needed");
        assert!(!lab.may_name("lab"), "the group's own name");
        assert!(!lab.may_name("labx-1"));
        assert!(!lab.may_name("other-1"));
        assert!(!lab.may_name("lab-a b"), "not a valid name");
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

    #[test]
    fn groups_are_validated_with_every_problem_named() {
        let raw: Vec<RawWorkerGroup> = toml::from_str::<toml::Table>(
            r#"
            [[g]]
            name = "w"
            enroll_token_sha256 = "xyz"
            max_builds = 0
            [[g]]
            name = "lab"
            [[g]]
            name = "lab"
            enroll_token_sha256 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            [[g]]
            name = "lab2"
            enroll_token_sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "#,
        )
        .unwrap()["g"]
            .clone()
            .try_into()
            .unwrap();
        let mut issues = Vec::new();
        let workers = BTreeSet::from(["w".to_owned()]);
        let groups = validate(raw, &workers, &mut |key, message| {
            issues.push(format!("{key}: {message}"))
        });
        assert_eq!(groups.len(), 4);
        assert_eq!(groups[2].enroll_token_sha256, "a".repeat(64));
        let text = issues.join("\n");
        for expected in [
            "worker_group[0].name: `w` is already a [[worker]]",
            "worker_group[0].enroll_token_sha256: `xyz` is not 64 hex digits",
            "worker_group[0].max_builds: must be at least 1",
            "worker_group[1].enroll_token_sha256: missing",
            "worker_group[2].name: worker group `lab` is defined twice",
            "worker_group[3].enroll_token_sha256: the same enrolment token as group `lab`",
        ] {
            assert!(text.contains(expected), "{expected}\nin:\n{text}");
        }
        assert_eq!(issues.len(), 6, "{text}");
    }
}
