//! Waiting on a farm's builds and workers through the API, with deadlines.

use crate::*;

impl Farm {
    /// Waits (long-polling the API) until build `id` is finished.
    pub async fn wait_build(&self, id: BuildId) -> anyhow::Result<BuildInfo> {
        let api = self.api()?;
        let start = Instant::now();
        loop {
            let remaining = DEADLINE.saturating_sub(start.elapsed()).as_secs().max(1);
            let build = api.wait(id, remaining.min(30)).await?;
            if build.state == BuildState::Finished {
                return Ok(build);
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "build {id} did not finish within {DEADLINE:?}: {build:?}\nmaster log:\n{}",
                    self.master_log()
                );
            }
        }
    }

    /// Waits until build `id` satisfies `check`.
    pub async fn wait_build_state(
        &self,
        id: BuildId,
        what: &str,
        check: impl Fn(&BuildInfo) -> bool,
    ) -> anyhow::Result<BuildInfo> {
        let api = self.api()?;
        wait_for(what, DEADLINE, || {
            let api = api.clone();
            let check = &check;
            async move {
                let build = api.build(id).await?;
                Ok(check(&build).then_some(build))
            }
        })
        .await
    }

    /// Waits until the master's view of worker `name` (its API) satisfies
    /// `check`; `what` names the awaited condition in the error, which also
    /// shows the last view.
    pub async fn wait_worker(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&WorkerInfo) -> bool,
    ) -> anyhow::Result<WorkerInfo> {
        let api = self.api()?;
        let last = std::sync::Mutex::new(None);
        let found = wait_for(what, DEADLINE, || {
            let api = api.clone();
            let (check, last) = (&check, &last);
            async move {
                let list = api.workers().await?;
                let worker = list.workers.into_iter().find(|w| w.name == name);
                let matched = worker.as_ref().is_some_and(check);
                if let Ok(mut last) = last.lock() {
                    *last = worker.clone();
                }
                Ok(if matched { worker } else { None })
            }
        })
        .await;
        found.with_context(|| {
            let last = last.lock().map(|l| l.clone()).unwrap_or_default();
            format!("the master's last view of `{name}`: {last:?}")
        })
    }

    /// Waits until the master shows worker `name` as `state`.
    pub async fn wait_worker_state(
        &self,
        name: &str,
        state: PresenceState,
    ) -> anyhow::Result<WorkerInfo> {
        let api = self.api()?;
        wait_for(&format!("worker {name} to be {state}"), DEADLINE, || {
            let api = api.clone();
            async move {
                let list = api.workers().await?;
                Ok(list.workers.into_iter().find(|w| {
                    w.name == name
                        && w.state == state
                        && (state == PresenceState::Offline || w.connected)
                }))
            }
        })
        .await
    }
}
