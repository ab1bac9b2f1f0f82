//! The CLI side of the control plane: `worker status`, `set-availability`,
//! `stop` — one HTTP/1 request over the agent's Unix socket, authorised with
//! the control token from the state dir.

use nightshift_proto::exit::ExitStatus;
use std::io::ErrorKind;
use std::path::PathBuf;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use super::api::{SetAvailabilityBody, StopAnswer, StopBody};
use super::error::ErrorBody;
use super::guard::{self, TokenError};
use super::page::{source_words, state_word};
use super::server::SOCKET_FILE_NAME;
use super::when::{self, span_words};
use crate::cli::{AvailabilityArg, ConfigArg};
use crate::config::WorkerConfig;
use crate::handle::AgentStatus;
use nightshift_proto::when::{short_time, zone_label};

/// A response: status and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Sends one request over `stream` (a Unix or TCP connection to the agent).
pub async fn send<S>(
    stream: S,
    method: Method,
    path: &str,
    token: Option<&str>,
    json: Option<Vec<u8>>,
) -> anyhow::Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost")
        .header(header::ACCEPT, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if json.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    drop(sender);
    connection.abort();
    Ok(Reply { status, body })
}

/// Where the running agent is, from `worker.toml`.
#[derive(Debug, Clone)]
pub struct Target {
    pub state_dir: PathBuf,
    pub token_file: Option<PathBuf>,
    pub time_zone: TimeZone,
}

/// How a CLI verb failed, with the exit code it earns.
#[derive(Debug)]
pub enum Failure {
    /// Bad flags or config: exit 2.
    Usage(String),
    /// Anything else, including "no agent": exit 1.
    Failed(String),
}

impl Failure {
    fn report(self) -> ExitStatus {
        match self {
            Failure::Usage(message) => {
                eprintln!("error: {message}");
                ExitStatus::Usage
            }
            Failure::Failed(message) => {
                eprintln!("{message}");
                ExitStatus::Failure
            }
        }
    }
}

impl Target {
    /// Reads `worker.toml` (as `worker run` would) for the state dir, token
    /// file and time zone.
    pub fn load(config: &ConfigArg) -> Result<Target, Failure> {
        let (_path, config) = WorkerConfig::load(config.config.as_deref())
            .map_err(|errors| Failure::Usage(errors.to_string()))?;
        let time_zone = config
            .policy()
            .map(|policy| policy.time_zone().clone())
            .unwrap_or_else(|_| TimeZone::system());
        Ok(Target {
            state_dir: config.state_dir,
            token_file: config.control.token_file,
            time_zone,
        })
    }

    fn socket(&self) -> PathBuf {
        self.state_dir.join(SOCKET_FILE_NAME)
    }

    fn not_running(&self) -> Failure {
        Failure::Failed(format!(
            "no worker agent is running (state dir {})",
            self.state_dir.display()
        ))
    }

    fn token(&self) -> Result<String, Failure> {
        let path = guard::token_path(self.token_file.as_deref(), &self.state_dir);
        guard::read_token(&path).map_err(|error| match error {
            TokenError::Missing if self.token_file.is_none() => self.not_running(),
            TokenError::Io(error) if error.kind() == ErrorKind::PermissionDenied => Failure::Failed(format!(
                "cannot read the control token {}: permission denied (run as the agent's user, or with sudo)",
                path.display()
            )),
            error => Failure::Failed(format!("control token {}: {error}", path.display())),
        })
    }

    /// One request to the running agent; `Err` already says what went wrong.
    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<Reply, Failure> {
        let socket = self.socket();
        let stream = match UnixStream::connect(&socket).await {
            Ok(stream) => stream,
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::NotFound | ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(self.not_running());
            }
            Err(error) if error.kind() == ErrorKind::PermissionDenied => {
                return Err(Failure::Failed(format!(
                    "cannot connect to {}: permission denied (run as the agent's user, or with sudo)",
                    socket.display()
                )));
            }
            Err(error) => {
                return Err(Failure::Failed(format!(
                    "cannot connect to {}: {error}",
                    socket.display()
                )));
            }
        };
        let token = self.token()?;
        let reply = send(stream, method, path, Some(&token), json)
            .await
            .map_err(|error| {
                Failure::Failed(format!(
                    "talking to the agent on {}: {error}",
                    socket.display()
                ))
            })?;
        if reply.status.is_success() {
            return Ok(reply);
        }
        let message = serde_json::from_slice::<ErrorBody>(&reply.body)
            .map(|body| body.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&reply.body).into_owned());
        let message = format!("the agent refused: {message} ({})", reply.status);
        Err(
            if reply.status.is_client_error()
                && !matches!(
                    reply.status,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::CONFLICT
                )
            {
                Failure::Usage(message)
            } else {
                Failure::Failed(message)
            },
        )
    }
}

fn run<T>(future: impl std::future::Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure::Failed(format!("cannot start the async runtime: {error}")))?;
    runtime.block_on(future)
}

fn decode<T: serde::de::DeserializeOwned>(reply: &Reply) -> Result<T, Failure> {
    serde_json::from_slice(&reply.body).map_err(|error| {
        Failure::Failed(format!(
            "the agent sent an answer this CLI does not understand: {error}"
        ))
    })
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|error| Failure::Failed(format!("cannot print JSON: {error}")))?;
    println!("{text}");
    Ok(())
}

/// `worker status [--json]`.
pub fn status(config: &ConfigArg, json: bool) -> ExitStatus {
    let result = Target::load(config).and_then(|target| {
        run(async {
            let reply = target.call(Method::GET, "/api/v1/status", None).await?;
            let status: AgentStatus = decode(&reply)?;
            if json {
                print_json(&status)?;
            } else {
                print!("{}", describe(&status, Timestamp::now(), &target.time_zone));
            }
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitStatus::Ok,
        Err(failure) => failure.report(),
    }
}

/// `worker set-availability STATE [--for D | --until T] [--reason R] [--json]`.
pub fn set_availability(
    config: &ConfigArg,
    state: AvailabilityArg,
    for_: Option<String>,
    until: Option<String>,
    reason: Option<String>,
    json: bool,
) -> ExitStatus {
    let result = Target::load(config).and_then(|target| {
        let body = availability_body(
            state,
            for_,
            until,
            reason,
            Timestamp::now(),
            &target.time_zone,
        )?;
        let bytes =
            serde_json::to_vec(&body).map_err(|error| Failure::Failed(error.to_string()))?;
        run(async {
            let reply = target
                .call(Method::POST, "/api/v1/set-availability", Some(bytes))
                .await?;
            let status: AgentStatus = decode(&reply)?;
            if json {
                print_json(&status)?;
            } else {
                print!("{}", describe(&status, Timestamp::now(), &target.time_zone));
            }
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitStatus::Ok,
        Err(failure) => failure.report(),
    }
}

/// Checks the flags and builds the request body. `--for` is sent as written
/// (the agent adds it to its own clock); `--until` becomes an absolute
/// instant here, read in the policy's time zone.
pub fn availability_body(
    state: AvailabilityArg,
    for_: Option<String>,
    until: Option<String>,
    reason: Option<String>,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<SetAvailabilityBody, Failure> {
    let word = match state {
        AvailabilityArg::Available => "available",
        AvailabilityArg::Reluctant => "reluctant",
        AvailabilityArg::Away => "away",
        AvailabilityArg::Auto => "auto",
    };
    if state == AvailabilityArg::Auto && (for_.is_some() || until.is_some() || reason.is_some()) {
        return Err(Failure::Usage(
            "`auto` hands the decision back to the policies; it takes no --for, --until or --reason".into(),
        ));
    }
    if let Some(text) = &for_ {
        when::parse_for(text).map_err(|error| Failure::Usage(format!("--for: {error}")))?;
    }
    let until = match until {
        Some(text) => Some(
            when::parse_until(&text, now, tz)
                .map_err(|error| Failure::Usage(format!("--until: {error}")))?
                .to_string(),
        ),
        None => None,
    };
    if let Some(text) = &reason
        && text.chars().count() > super::api::MAX_REASON_CHARS
    {
        return Err(Failure::Usage(format!(
            "--reason is longer than {} characters",
            super::api::MAX_REASON_CHARS
        )));
    }
    Ok(SetAvailabilityBody {
        state: word.into(),
        for_,
        until,
        reason,
    })
}

/// `worker stop [--graceful] [--deadline D]`.
pub fn stop(config: &ConfigArg, graceful: bool, deadline: Option<String>) -> ExitStatus {
    let result = Target::load(config).and_then(|target| {
        if let Some(text) = &deadline {
            when::parse_for(text).map_err(|error| Failure::Usage(format!("--deadline: {error}")))?;
        }
        let body = StopBody { graceful, deadline };
        let bytes = serde_json::to_vec(&body).map_err(|error| Failure::Failed(error.to_string()))?;
        run(async {
            let reply = target.call(Method::POST, "/api/v1/stop", Some(bytes)).await?;
            let answer: StopAnswer = decode(&reply)?;
            let now = Timestamp::now();
            match (answer.graceful, answer.deadline) {
                (false, _) => println!("the agent is stopping now; running builds are cancelled and go back to the master's queue"),
                (true, None) => println!("the agent takes no new builds and exits when its running builds end"),
                (true, Some(deadline)) => println!(
                    "the agent takes no new builds and exits when its running builds end; at {} (in {}) it cancels them and the master re-queues them",
                    short_time(deadline, now, &target.time_zone),
                    span_words(deadline.duration_since(now))
                ),
            }
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitStatus::Ok,
        Err(failure) => failure.report(),
    }
}

/// The human `worker status` text.
pub fn describe(status: &AgentStatus, now: Timestamp, tz: &TimeZone) -> String {
    use std::fmt::Write;
    let presence = &status.presence;
    let mut out = String::new();
    let until = match presence.until {
        Some(until) => format!(
            " until {} (in {})",
            short_time(until, now, tz),
            span_words(until.duration_since(now))
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "{}: {}{until} — {}",
        status.worker,
        state_word(presence.state).to_uppercase(),
        source_words(&presence.source)
    );
    let _ = writeln!(out, "  why:     {} [{}]", presence.reason, presence.source);
    let _ = writeln!(
        out,
        "  since:   {} ({} ago)",
        short_time(presence.since, now, tz),
        span_words(now.duration_since(presence.since))
    );
    let _ = writeln!(out, "  times:   {}", zone_label(tz, now));
    if status.stopping {
        let _ = writeln!(out, "  stopping: exits when its running builds end");
    } else if let Some(manual) = &status.manual {
        let until = manual
            .until
            .map(|until| format!(" until {}", short_time(until, now, tz)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  manual:  {}{until} (`worker set-availability auto` returns to the policies)",
            manual.state
        );
    }
    if let Some(supervised) = &status.supervised {
        describe_supervised(&mut out, supervised, now, tz);
    } else if status.builds.is_empty() {
        let _ = writeln!(out, "  builds:  none running");
    } else {
        for build in &status.builds {
            let _ = writeln!(
                out,
                "  build:   #{} {} — step {} {:?}, running {}",
                build.build_id,
                build.builder,
                build.step + 1,
                build.step_name,
                span_words(
                    now.duration_since(build.started_at)
                        .max(SignedDuration::ZERO)
                )
            );
            if let Some(line) = build
                .tail
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
            {
                let _ = writeln!(out, "           > {}", line.trim_end());
            }
        }
    }
    let master = &status.master;
    let since = master
        .since
        .map(|since| format!(" since {}", short_time(since, now, tz)))
        .unwrap_or_default();
    if status.supervised.is_some() {
        // No nightshift master: the CI agent talks to its own.
    } else if master.connected {
        let _ = writeln!(out, "  master:  {} (connected{since})", master.url);
    } else {
        let error = master
            .error
            .as_deref()
            .map(|error| format!(": {error}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  master:  {} (not connected{since}{error})",
            master.url
        );
    }
    if let Some(load) = &status.load {
        let _ = writeln!(
            out,
            "  load:    {:.2} (cpu {:.0}% not counting own builds)",
            load.load1, load.cpu_percent
        );
    }
    let _ = writeln!(
        out,
        "  totals:  {} run, {} failed, {}",
        plural(status.counters.builds_run, "build", "builds"),
        status.counters.builds_failed,
        plural(
            status.counters.presence_changes,
            "state change",
            "state changes"
        )
    );
    out
}

/// The `ci agent:` lines of `worker status` for a `[supervise]` worker.
fn describe_supervised(
    out: &mut String,
    supervised: &crate::handle::SupervisedStatus,
    now: Timestamp,
    tz: &TimeZone,
) {
    use std::fmt::Write;
    let pid = supervised
        .pid
        .map(|pid| format!(" pid {pid},"))
        .unwrap_or_default();
    let job = match supervised.job_running {
        Some(true) => ", running a job",
        Some(false) => ", idle",
        None => "",
    };
    let _ = writeln!(
        out,
        "  ci agent: {} {}{pid} since {}{job} — {}",
        supervised.kind,
        supervised.state.as_str(),
        short_time(supervised.since, now, tz),
        supervised.command
    );
    if let Some(at) = supervised.hard_stop_at {
        let _ = writeln!(
            out,
            "           draining; stopped hard at {} if still running",
            short_time(at, now, tz)
        );
    }
    if let Some(at) = supervised.restart_at {
        let _ = writeln!(
            out,
            "           starts again at {}",
            short_time(at, now, tz)
        );
    }
    let _ = writeln!(
        out,
        "           {}: {}",
        if supervised.wanted {
            "wanted running"
        } else {
            "wanted stopped"
        },
        supervised.why
    );
    if let Some(exit) = &supervised.last_exit {
        let _ = writeln!(
            out,
            "  last exit: {} at {}{} — {}",
            exit.status,
            short_time(exit.at, now, tz),
            if exit.stopped_hard {
                " (stopped hard)"
            } else {
                ""
            },
            exit.reason
        );
    }
    if supervised.restarts > 0 {
        let _ = writeln!(
            out,
            "  restarts: {} after exiting by itself",
            supervised.restarts
        );
    }
}

fn plural(count: u64, one: &str, many: &str) -> String {
    if count == 1 {
        format!("1 {one}")
    } else {
        format!("{count} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::metrics::tests::status_fixture;
    use crate::handle::ManualRequest;
    use nightshift_policy::{PresenceState, Source};

    fn tz() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-23T11:00:00Z".parse().unwrap()
    }

    #[test]
    fn until_becomes_an_instant_and_for_is_checked() {
        let body = availability_body(
            AvailabilityArg::Away,
            None,
            Some("19:00".into()),
            Some("lunch".into()),
            now(),
            &tz(),
        )
        .unwrap();
        assert_eq!(body.state, "away");
        assert_eq!(body.until.as_deref(), Some("2026-11-23T18:00:00Z"));
        assert_eq!(body.reason.as_deref(), Some("lunch"));
        let body = availability_body(
            AvailabilityArg::Reluctant,
            Some("2h".into()),
            None,
            None,
            now(),
            &tz(),
        )
        .unwrap();
        assert_eq!(
            (body.state.as_str(), body.for_.as_deref()),
            ("reluctant", Some("2h"))
        );
        for (state, for_, until) in [
            (AvailabilityArg::Away, Some("soon"), None),
            (AvailabilityArg::Away, None, Some("teatime")),
            (AvailabilityArg::Auto, Some("1h"), None),
        ] {
            let result = availability_body(
                state,
                for_.map(Into::into),
                until.map(Into::into),
                None,
                now(),
                &tz(),
            );
            assert!(
                matches!(result, Err(Failure::Usage(_))),
                "{state:?} {for_:?} {until:?}"
            );
        }
    }

    #[test]
    fn status_in_words() {
        let mut status = status_fixture(now());
        status.worker = "lab-3".into();
        status.presence = nightshift_policy::Presence {
            state: PresenceState::Away,
            reason: "set by hand: lunch".into(),
            source: Source::Manual,
            since: now() - SignedDuration::from_mins(5),
            until: Some("2026-11-23T18:00:00Z".parse().unwrap()),
        };
        status.manual = Some(ManualRequest {
            state: PresenceState::Away,
            until: Some("2026-11-23T18:00:00Z".parse().unwrap()),
            reason: Some("lunch".into()),
        });
        let text = describe(&status, now(), &tz());
        assert!(
            text.starts_with("lab-3: AWAY until 19:00 (in 7 h) — set by you\n"),
            "{text}"
        );
        assert!(
            text.contains("why:     set by hand: lunch [manual]"),
            "{text}"
        );
        assert!(text.contains("since:   11:55 (5 min ago)"), "{text}");
        assert!(
            text.contains("times:   Europe/Berlin (CET, UTC+01:00)\n"),
            "{text}"
        );
        assert!(text.contains("manual:  away until 19:00"), "{text}");
        assert!(
            text.contains("build:   #42 linux\nx86 — step 2 \"test\", running 2 min"),
            "{text}"
        );
        assert!(
            text.contains("master:  wss://master.example:9443 (connected since 12:00)"),
            "{text}"
        );
        assert!(
            text.contains("totals:  7 builds run, 2 failed, 11 state changes"),
            "{text}"
        );
    }
}
