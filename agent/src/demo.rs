//! The status page with made-up data, for looking at it in a browser
//! (`cargo run -p nightshift-agent --example status-page-demo`): a stand-in
//! daemon that applies the page's commands (manual state, stop) to its
//! status, a worker in the middle of a build, and the preview of a
//! nights-and-weekends schedule. The control plane's tests drive the same
//! stand-in daemon.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use nightshift_policy::{Presence, PresenceState, Source};
use tokio::sync::{mpsc, watch};

use crate::control::server::{ControlOptions, serve_with};
use crate::control::state::{PreviewFn, PreviewInterval};
use crate::handle::{AgentHandle, AgentStatus, ControlCommand, Counters, MasterLink, RunningBuild};

/// A daemon stand-in behind the [`AgentHandle`] it answers (on the current
/// tokio runtime): applies `SetManual` and `Stop` to `status` (times from
/// `now`) and counts the commands it receives in `commands`.
pub(crate) fn stand_in_daemon(
    status: Arc<watch::Sender<AgentStatus>>,
    commands: Arc<AtomicUsize>,
    now: fn() -> Timestamp,
) -> AgentHandle {
    let status_rx = status.subscribe();
    let (commands_tx, mut commands_rx) = mpsc::channel::<ControlCommand>(8);
    let (sender, counter) = (status, commands);
    tokio::spawn(async move {
        while let Some(command) = commands_rx.recv().await {
            counter.fetch_add(1, Ordering::SeqCst);
            match command {
                ControlCommand::SetManual { manual, reply } => {
                    let presence = match &manual {
                        Some(manual) => Presence {
                            state: manual.state,
                            reason: manual
                                .reason
                                .clone()
                                .unwrap_or_else(|| "set by the owner".into()),
                            source: Source::Manual,
                            since: now(),
                            until: manual.until,
                        },
                        None => Presence {
                            state: PresenceState::Available,
                            reason: "inside schedule nights".into(),
                            source: Source::Schedule("nights".into()),
                            since: now(),
                            until: None,
                        },
                    };
                    sender.send_modify(|status| {
                        status.presence = presence.clone();
                        status.manual = manual.clone();
                        status.counters.presence_changes += 1;
                    });
                    let _ = reply.send(Ok(presence));
                }
                ControlCommand::Stop { reply, .. } => {
                    sender.send_modify(|status| status.stopping = true);
                    let _ = reply.send(Ok(()));
                }
            }
        }
    });
    AgentHandle {
        commands: commands_tx,
        status: status_rx,
    }
}

/// A worker mid-build inside its night window, connected to a master.
fn demo_status(now: Timestamp) -> AgentStatus {
    AgentStatus {
        worker: "lab-3".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        presence: Presence {
            state: PresenceState::Available,
            reason: "inside schedule nights (19:00–07:00)".into(),
            source: Source::Schedule("nights".into()),
            since: now - jiff::SignedDuration::from_mins(47),
            until: Some(now + jiff::SignedDuration::from_mins(133)),
        },
        manual: None,
        stopping: false,
        builds: vec![RunningBuild {
            build_id: 1842,
            builder: "linux-x86_64".into(),
            started_at: now - jiff::SignedDuration::from_secs(312),
            step: 2,
            step_name: "cargo test".into(),
            tail:
                "   Compiling nightshift-policy v0.1.0\n   Compiling nightshift-agent v0.1.0\n    \
                   Finished `test` profile in 41.2s\n     Running unittests src/lib.rs\n\
                   test window::tests::crosses_midnight ... ok\n\
                   test window::tests::dst_spring_forward ... ok"
                    .into(),
        }],
        master: MasterLink {
            url: "wss://master.example:9443".into(),
            connected: true,
            since: Some(now - jiff::SignedDuration::from_mins(180)),
            error: None,
        },
        counters: Counters {
            builds_run: 7,
            builds_failed: 2,
            presence_changes: 11,
        },
        load: None,
        isolation: None,
        supervised: None,
        outlook: None,
    }
}

/// What the page previews: nights 19:00–07:00 available, weekend days
/// reluctant, other days away, in `zone`.
fn nights_and_weekends(zone: TimeZone) -> PreviewFn {
    Arc::new(move |from: Timestamp, to: Timestamp| {
        // Nights 19:00–07:00 available, weekend days reluctant, else away.
        let mut out = Vec::new();
        let mut day = from.to_zoned(zone.clone()).date();
        while day.to_zoned(zone.clone()).unwrap().timestamp() < to {
            let at = |h: i8| {
                day.at(h, 0, 0, 0)
                    .to_zoned(zone.clone())
                    .unwrap()
                    .timestamp()
            };
            let weekend = matches!(
                day.weekday(),
                jiff::civil::Weekday::Saturday | jiff::civil::Weekday::Sunday
            );
            let night = |from, to| PreviewInterval {
                from,
                to,
                state: PresenceState::Available,
                source: Source::Schedule("nights".into()),
            };
            out.push(night(at(0), at(7)));
            out.push(PreviewInterval {
                from: at(7),
                to: at(19),
                state: if weekend {
                    PresenceState::Reluctant
                } else {
                    PresenceState::Away
                },
                source: if weekend {
                    Source::Schedule("weekends".into())
                } else {
                    Source::Default
                },
            });
            out.push(night(
                at(19),
                day.tomorrow()
                    .unwrap()
                    .to_zoned(zone.clone())
                    .unwrap()
                    .timestamp(),
            ));
            day = day.tomorrow().unwrap();
        }
        out
    })
}

/// Serves the demo page on `listen` (port 0: any free one), its socket and
/// token under `state_dir`; prints the URL and serves for `serve_for` or
/// until Ctrl-C.
pub async fn serve(
    listen: SocketAddr,
    state_dir: &Path,
    serve_for: Duration,
) -> anyhow::Result<()> {
    let status = Arc::new(watch::channel(demo_status(Timestamp::now())).0);
    let handle = stand_in_daemon(status, Arc::default(), Timestamp::now);
    let zone = TimeZone::system();
    let mut options = ControlOptions::new(listen, zone.clone());
    options.preview = Some(nights_and_weekends(zone));
    let server = serve_with(handle, options, state_dir).await?;
    println!("demo page: http://{}/", server.local_addr());
    tokio::select! {
        () = tokio::time::sleep(serve_for) => {}
        stopped = tokio::signal::ctrl_c() => stopped?,
    }
    server.shutdown().await
}
