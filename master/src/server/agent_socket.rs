//! The per-agent WebSocket: the token checked at the upgrade, the hello, then frames and heartbeats.

use super::*;

/// Whether `token` belongs to some worker (configured, enrolled in a
/// configured group, or a latent instance started by this master). A
/// group's enrolment token is not a worker token: it is refused here. Checked before the upgrade, so a stranger costs
/// one HTTP answer instead of a WebSocket session waiting for a hello.
fn token_known(state: &AppState, token: &str) -> bool {
    let hash = token_sha256(token);
    let config = state.config.get();
    config.workers_with_token(&hash).next().is_some()
        || state.latent_tokens.worker_with_hash(&hash).is_some()
        || state
            .enrolled
            .with_token(&hash)
            .is_some_and(|member| config.worker_group(&member.group).is_some())
}

pub(super) async fn agent_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return unauthorized("no token (send Authorization: Bearer <token> on the upgrade)");
    };
    if !token_known(&state, &token) {
        return unauthorized("unknown worker or wrong token");
    }
    let Some(slot) = state.agent_slots.enter() else {
        tracing::warn!(
            "an agent was refused with retry-after: {} agents connected, the limit (max_agents)",
            state.agent_slots.max()
        );
        return over_capacity("agents", state.agent_slots.max());
    };
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            agent_session(state, socket, Some(token)).await;
        })
}

fn unauthorized(reason: &str) -> Response {
    tracing::warn!("agent refused at the upgrade: {reason}");
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(ApiError {
            error: reason.to_owned(),
        }),
    )
        .into_response()
}

pub(super) async fn refuse(socket: &mut WebSocket, reason: String) {
    tracing::warn!("agent refused: {reason}");
    let frame = MasterMessage::Refused {
        reason: reason.clone(),
    }
    .encode();
    let _ = socket.send(Message::Text(frame.into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1008,
            reason: truncate(&reason, 120).into(),
        })))
        .await;
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Reads and checks the hello: version, worker, token.
async fn read_hello(
    state: &AppState,
    socket: &mut WebSocket,
    token: Option<String>,
) -> Result<(String, Hello), String> {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await {
        Err(_) => return Err("no hello within 10s".into()),
        Ok(None) => return Err("closed before its hello".into()),
        Ok(Some(Err(e))) => return Err(format!("bad first frame: {e}")),
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(_))) => return Err("the first frame must be a JSON text hello".into()),
    };
    let value: serde_json::Value =
        serde_json::from_str(first.as_str()).map_err(|e| format!("bad hello: not JSON: {e}"))?;
    if value.get("type").and_then(|t| t.as_str()) != Some("hello") {
        return Err("the first frame must be a hello".into());
    }
    match value.get("protocol").and_then(|p| p.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} is not supported; this master speaks version {PROTOCOL_VERSION}"
            ));
        }
        None => return Err("bad hello: no protocol version".into()),
    }
    let hello = AgentMessage::decode(first.as_str()).map_err(|e| format!("bad hello: {e}"))?;
    let AgentMessage::Hello {
        worker,
        agent_version,
        max_builds,
        presence,
        running,
        outlook,
        ..
    } = hello
    else {
        return Err("the first frame must be a hello".into());
    };
    let config = state.config.get();
    // A `[[worker]]`'s token hash, or an enrolled member's (of a group
    // still configured).
    let expected = match config.worker(&worker) {
        Some(def) => def.token_sha256.clone(),
        None => match state.enrolled.member(&worker) {
            Some(member) if config.worker_group(&member.group).is_some() => member.token_sha256,
            _ => return Err(format!("unknown worker `{worker}` or wrong token")),
        },
    };
    let Some(token) = token else {
        return Err(format!(
            "worker `{worker}`: no token (send Authorization: Bearer <token> on the upgrade)"
        ));
    };
    // A latent instance presents the token made for its start.
    if !constant_time_eq(token_sha256(&token).as_bytes(), expected.as_bytes())
        && !state.latent_tokens.matches(&worker, &token)
    {
        return Err(format!("unknown worker `{worker}` or wrong token"));
    }
    Ok((
        worker,
        Hello {
            agent_version,
            max_builds,
            presence,
            running,
            outlook,
        },
    ))
}

/// One agent's connection, from hello to close.
async fn agent_session(state: AppState, mut socket: WebSocket, token: Option<String>) {
    let (worker, hello) = match read_hello(&state, &mut socket, token).await {
        Ok(pair) => pair,
        Err(reason) => return refuse(&mut socket, reason).await,
    };
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    // Limits as configured when the agent connected (a reconfig applies to
    // later connections).
    let config = state.config.get();
    let agent_limits = config.agent_limits;
    let heartbeat_secs = heartbeat_secs_for(config.workers.len() + state.enrolled.len());
    drop(config);
    let outbox_frames = agent_limits.outbox_frames as usize;
    let (out, mut outbox) = agent_outbox(outbox_frames);
    // Connection events go through the bounded agent inbox, in order: a
    // full inbox makes this task wait, and its socket is not read meanwhile.
    if state
        .agent_events
        .send(Event::Connected {
            worker: worker.clone(),
            conn,
            hello,
            heartbeat_secs,
            out,
        })
        .await
        .is_err()
    {
        return refuse(&mut socket, "master is stopping".into()).await;
    }
    // The agent pings every beat and the master answers; the master pings
    // only an agent silent for a beat: one frame each way per beat, not two.
    let beat = Duration::from_secs(heartbeat_secs);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut limits = FrameLimits::new(&agent_limits, Instant::now());
    let mut seq = 0u64;
    let reason = loop {
        tokio::select! {
            outbound = outbox.next() => match outbound {
                Next::Frame(Outbound::Message(message)) => {
                    if let Err(e) = socket.send(Message::Text(message.encode().into())).await {
                        break format!("send failed: {e}");
                    }
                    if let MasterMessage::StartBuild { build_id, .. } = &message {
                        limits.handed_out();
                        tracing::debug!(
                            target: nightshift_proto::log::HANDOFF,
                            "build {build_id}: hand-out written"
                        );
                    }
                }
                Next::Frame(Outbound::AfterCommit(committed)) => committed.wait().await,
                Next::Frame(Outbound::Close(why)) => {
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: truncate(&why, 120).into(),
                    }))).await;
                    break why;
                }
                Next::Overflowed => {
                    let why = format!(
                        "outbox full: the agent did not read its last {outbox_frames} frames"
                    );
                    tracing::warn!("worker {worker}: disconnected: {why}");
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: truncate(&why, 120).into(),
                    }))).await;
                    break why;
                }
                Next::Dropped => break "master is stopping".into(),
            },
            frame = socket.recv() => {
                last_heard = Instant::now();
                match frame {
                    None => break "connection closed".into(),
                    Some(Err(e)) => break format!("bad frame: {e}"),
                    Some(Ok(Message::Text(text))) => {
                        let message = match AgentMessage::decode(text.as_str()) {
                            Ok(message) => message,
                            Err(e) => {
                                crate::metrics::METRICS.disconnected(DisconnectReason::BadFrame);
                                let _ = socket.send(Message::Close(Some(CloseFrame {
                                    code: 1007,
                                    reason: truncate(&e.to_string(), 120).into(),
                                }))).await;
                                break e.to_string();
                            }
                        };
                        match limits.check(&message, Instant::now()) {
                            FrameVerdict::Pass => {}
                            FrameVerdict::Throttle(wait) => {
                                // Not reading meanwhile: TCP pushes back on the agent.
                                crate::metrics::METRICS.frame_rate_limited();
                                tokio::time::sleep(wait).await;
                            }
                            FrameVerdict::Disconnect(why) => {
                                crate::metrics::METRICS.disconnected(DisconnectReason::RateLimited);
                                tracing::warn!("worker {worker}: disconnected: {why}");
                                let _ = socket.send(Message::Close(Some(CloseFrame {
                                    code: 1008,
                                    reason: truncate(&why, 120).into(),
                                }))).await;
                                break why;
                            }
                        }
                        match message {
                            AgentMessage::Ping { seq } => {
                                let pong = MasterMessage::Pong { seq }.encode();
                                if let Err(e) = socket.send(Message::Text(pong.into())).await {
                                    break format!("send failed: {e}");
                                }
                            }
                            AgentMessage::Pong { .. } => {}
                            message => {
                                let event = Event::Agent {
                                    worker: worker.clone(),
                                    conn,
                                    message,
                                };
                                if state.agent_events.send(event).await.is_err() {
                                    break "master is stopping".into();
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let _ = socket.send(Message::Close(Some(CloseFrame {
                            code: 1003,
                            reason: "binary frames are not part of the protocol".into(),
                        }))).await;
                        break "bad frame: binary frames are not part of the protocol".into();
                    }
                    Some(Ok(Message::Close(_))) => break "agent closed the connection".into(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > beat * MISSED_BEATS {
                    crate::metrics::METRICS.disconnected(DisconnectReason::Silent);
                    break format!("silent for {}s (missed heartbeats)", last_heard.elapsed().as_secs());
                }
                if last_heard.elapsed() < beat {
                    continue;
                }
                seq += 1;
                let ping = MasterMessage::Ping { seq }.encode();
                if let Err(e) = socket.send(Message::Text(ping.into())).await {
                    break format!("send failed: {e}");
                }
            }
        }
    };
    tracing::info!("worker {worker}: connection closed: {reason}");
    let _ = state
        .agent_events
        .send(Event::Disconnected {
            worker,
            conn,
            reason,
        })
        .await;
}
