//! Carrying out a pool's actions on tokio: provider calls and timers in
//! their own tasks, their end reported as events.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{LatentAction, LatentEvent, LatentProvider, StartOutcome};

/// Carries out one action on the current tokio runtime: provider calls and
/// timers run in their own tasks, and their end is reported through
/// `report` (which the scheduler wires to its event channel).
pub fn spawn_action(
    action: LatentAction,
    providers: &BTreeMap<String, Arc<dyn LatentProvider>>,
    report: Arc<dyn Fn(LatentEvent) + Send + Sync>,
) {
    match action {
        LatentAction::Start {
            instance,
            attempt,
            timeout,
        } => {
            let Some(provider) = providers.get(&instance.worker).cloned() else {
                report(LatentEvent::StartDone {
                    worker: instance.worker.clone(),
                    attempt,
                    outcome: StartOutcome::Failed("no provider configured".into()),
                });
                return;
            };
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(timeout, provider.start(&instance)).await {
                    Ok(outcome) => outcome,
                    Err(_) => StartOutcome::Failed(format!(
                        "{} provider did not answer within start_timeout ({}s)",
                        provider.kind(),
                        timeout.as_secs()
                    )),
                };
                report(LatentEvent::StartDone {
                    worker: instance.worker,
                    attempt,
                    outcome,
                });
            });
        }
        LatentAction::Stop { instance, attempt } => {
            let Some(provider) = providers.get(&instance.worker).cloned() else {
                report(LatentEvent::StopDone {
                    worker: instance.worker.clone(),
                    attempt,
                    result: Ok(()),
                });
                return;
            };
            tokio::spawn(async move {
                let result = provider.stop(&instance).await;
                if let Err(error) = &result {
                    tracing::warn!(worker = %instance.worker, %error, "latent stop failed");
                }
                report(LatentEvent::StopDone {
                    worker: instance.worker,
                    attempt,
                    result,
                });
            });
        }
        LatentAction::Timer {
            worker,
            at,
            kind,
            generation,
            instance,
        } => {
            let provider = providers.get(&worker).cloned();
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let health = match (provider, instance) {
                    (Some(provider), Some(instance)) => Some(provider.health(&instance).await),
                    _ => None,
                };
                report(LatentEvent::Timer {
                    worker,
                    kind,
                    generation,
                    health,
                });
            });
        }
    }
}
