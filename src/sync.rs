//! The sync worker: refreshes cached status and events, drains the outbox.
use crate::config::SyncSettings;
use crate::gateway::Gateway;

/// A running worker.
pub struct WorkerHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    /// Stop after the current unit of work and release leases.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Start the worker on the current runtime.
pub fn spawn(gateway: Gateway, settings: SyncSettings) -> WorkerHandle {
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let _ = (&gateway, &settings);
        let _ = rx.changed().await;
    });
    WorkerHandle { stop, task }
}

/// `credsync sync --once`.
pub async fn run_once_cli(
    settings: crate::config::Settings,
    users: Vec<uuid::Uuid>,
    discover: bool,
) -> anyhow::Result<()> {
    let _ = (settings, users, discover);
    anyhow::bail!("sync --once is not implemented yet")
}
