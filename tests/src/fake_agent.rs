//! A raw WebSocket client speaking the agent protocol by hand, for tests of the master alone.

use crate::*;

impl Farm {
    /// Connects a raw fake agent as `name` with its configured token.
    pub async fn fake_agent(&self, name: &str, state: PresenceState) -> anyhow::Result<FakeAgent> {
        let token = self.worker_spec(name)?.token.clone();
        let mut agent = FakeAgent::connect(self, Some(&token)).await?;
        agent.hello(name, state, 1, vec![]).await?;
        match agent.recv().await? {
            MasterMessage::Welcome { .. } => Ok(agent),
            other => bail!("expected welcome, got {other:?}"),
        }
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw WebSocket client speaking the agent protocol by hand: for tests of
/// the master alone (bad tokens, garbage frames, races).
/// How the master answered a WebSocket upgrade it did not accept.
#[derive(Debug, Clone)]
pub struct UpgradeRefusal {
    /// HTTP status (401 for a bad token, 503 at the connection limit).
    pub status: u16,
    /// The `error` of the JSON body.
    pub error: String,
    /// Seconds from the `Retry-After` header, when present.
    pub retry_after: Option<u64>,
}

pub struct FakeAgent {
    ws: WsStream,
}

/// A presence for fake agents.
/// The result of a build of one step that ended now with `outcome` (exit
/// code 0 on success, else 1) and `log`: what a fake agent sends, or forges.
pub fn one_step_result(
    build_id: BuildId,
    outcome: nightshift_proto::wire::Outcome,
    log: &str,
) -> nightshift_proto::wire::BuildResult {
    let now = jiff::Timestamp::now();
    nightshift_proto::wire::BuildResult {
        build_id,
        outcome,
        steps: vec![nightshift_proto::wire::StepResult {
            step: 0,
            outcome,
            exit_code: Some(if outcome == nightshift_proto::wire::Outcome::Success {
                0
            } else {
                1
            }),
            signal: None,
            started_at: now,
            finished_at: now,
        }],
        reason: None,
        log: log.to_owned(),
        finished_at: now,
    }
}

pub fn presence(state: PresenceState) -> Presence {
    Presence {
        state,
        reason: format!("fake agent says {state}"),
        source: Source::Manual,
        since: jiff::Timestamp::now(),
        until: None,
    }
}

impl FakeAgent {
    /// Opens the WebSocket (TLS, pinned) with `token` as the bearer.
    pub async fn connect(farm: &Farm, token: Option<&str>) -> anyhow::Result<FakeAgent> {
        match FakeAgent::try_connect(farm, token).await? {
            Ok(agent) => Ok(agent),
            Err(refusal) => bail!(
                "the master refused the upgrade: {} {}",
                refusal.status,
                refusal.error
            ),
        }
    }

    /// Opens the WebSocket, or returns how the master refused the upgrade
    /// (an HTTP answer instead of `101 Switching Protocols`).
    pub async fn try_connect(
        farm: &Farm,
        token: Option<&str>,
    ) -> anyhow::Result<Result<FakeAgent, UpgradeRefusal>> {
        let mut request = format!("{}{WS_PATH}", farm.ws_url()).into_client_request()?;
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let connector = if farm.is_insecure() {
            None
        } else {
            Some(tokio_tungstenite::Connector::Rustls(farm.tls_client()?))
        };
        match tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector).await
        {
            Ok((ws, _)) => Ok(Ok(FakeAgent { ws })),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                let error = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
                    .unwrap_or(body);
                Ok(Err(UpgradeRefusal {
                    status: response.status().as_u16(),
                    error,
                    retry_after: response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse().ok()),
                }))
            }
            Err(e) => Err(anyhow::Error::new(e).context("websocket connect")),
        }
    }

    /// Sends a hello.
    pub async fn hello(
        &mut self,
        worker: &str,
        state: PresenceState,
        max_builds: u32,
        running: Vec<BuildId>,
    ) -> anyhow::Result<()> {
        self.send(&AgentMessage::Hello {
            protocol: PROTOCOL_VERSION,
            worker: worker.to_owned(),
            agent_version: "fake".into(),
            max_builds,
            presence: presence(state),
            running,
            outlook: None,
        })
        .await
    }

    pub async fn send(&mut self, message: &AgentMessage) -> anyhow::Result<()> {
        self.send_text(&message.encode()).await
    }

    /// Sends any text frame (garbage included).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next protocol message (pings are answered, not returned); errors
    /// when the connection closes or nothing comes within [`DEADLINE`].
    pub async fn recv(&mut self) -> anyhow::Result<MasterMessage> {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame from the master within {DEADLINE:?}"))?;
            match frame {
                None => bail!("connection closed"),
                Some(Err(e)) => bail!("connection error: {e}"),
                Some(Ok(Message::Text(text))) => {
                    let message = MasterMessage::decode(text.as_str())?;
                    if let MasterMessage::Ping { seq } = message {
                        self.send(&AgentMessage::Pong { seq }).await?;
                        continue;
                    }
                    return Ok(message);
                }
                Some(Ok(Message::Close(frame))) => {
                    bail!(
                        "connection closed: {}",
                        frame.map(|f| f.reason.to_string()).unwrap_or_default()
                    )
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits for the next `StartBuild`; returns its build id.
    pub async fn expect_start(&mut self) -> anyhow::Result<BuildId> {
        loop {
            if let MasterMessage::StartBuild { build_id, .. } = self.recv().await? {
                return Ok(build_id);
            }
        }
    }

    /// Accepts build `build_id` and asks for the locks of its `step`, as an
    /// agent does before running a step that claims locks.
    pub async fn accept_and_wait_for_step(
        &mut self,
        build_id: BuildId,
        step: u32,
    ) -> anyhow::Result<()> {
        self.send(&AgentMessage::BuildAccepted { build_id }).await?;
        self.send(&AgentMessage::StepWaiting { build_id, step })
            .await
    }

    /// Waits until the connection is closed by the master; returns every
    /// message received before (e.g. a `Refused`).
    pub async fn expect_closed(&mut self) -> anyhow::Result<Vec<MasterMessage>> {
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Ok(message) => seen.push(message),
                Err(e)
                    if e.to_string().contains("closed")
                        || e.to_string().contains("connection error") =>
                {
                    return Ok(seen);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts, runs (instantly) and finishes a build with `outcome` and `log`.
    pub async fn finish(
        &mut self,
        build_id: BuildId,
        outcome: nightshift_proto::wire::Outcome,
        log: &str,
    ) -> anyhow::Result<()> {
        self.send(&AgentMessage::BuildAccepted { build_id }).await?;
        self.send(&AgentMessage::Output {
            build_id,
            step: 0,
            data: log.to_owned(),
        })
        .await?;
        self.send(&AgentMessage::BuildFinished {
            result: one_step_result(build_id, outcome, log),
        })
        .await
    }

    /// Reads frames WITHOUT answering heartbeats (a hung agent) until the
    /// master drops the connection; returns how long that took.
    pub async fn stay_silent_until_dropped(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let frame =
                tokio::time::timeout(deadline.saturating_sub(start.elapsed()), self.ws.next())
                    .await
                    .map_err(|_| anyhow!("the master kept a silent connection for {deadline:?}"))?;
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(start.elapsed()),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Closes the connection cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
