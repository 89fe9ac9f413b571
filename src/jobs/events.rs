//! Live job events: one LISTEN connection per process ([`EventHub`]), fanned out to every open
//! stream, and the stream a client watches ([`stream`]).
//!
//! A stream holds no database connection while it waits: it borrows one from the pool only to
//! read the rows written since its last event, when the hub says its job wrote one (or, as a
//! safety net for notifications lost while the hub reconnects, every [`RECHECK`]).
use std::time::Duration;

use futures_util::Stream;
use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::db::{self, jobs::EventRow};

/// How often a waiting stream looks for rows even without a notification.
pub const RECHECK: Duration = Duration::from_secs(2);

/// How long a stream whose job has ended waits for the job's final `state` event.
const FINAL_EVENT_WAIT: Duration = Duration::from_secs(2);

/// Notifications a slow subscriber may fall behind by before it skips to "look again" (it then
/// re-reads from its last event id, so nothing is lost).
const BACKLOG: usize = 1024;

/// The process's fan-out of `vidtune_job_events` notifications: the id of the job that wrote an
/// event, or [`Uuid::nil`] for "anything may have changed" (after a reconnect).
pub struct EventHub {
    tx: broadcast::Sender<Uuid>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl EventHub {
    /// Wake-ups for one stream.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }

    /// Hold the one LISTEN connection and forward every notification, reconnecting with
    /// back-off when the connection is lost. Runs until the process ends.
    pub async fn run(&self, db: PgPool) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match db::jobs::EventListener::connect(&db).await {
                Ok(mut listener) => {
                    backoff = Duration::from_millis(500);
                    // Whatever was written while no one listened.
                    let _ = self.tx.send(Uuid::nil());
                    loop {
                        match listener.recv().await {
                            Ok(Some(job)) => {
                                // No subscriber is no error.
                                let _ = self.tx.send(job);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "job event notifications lost; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for job events; streams poll meanwhile");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Job `id`'s events after event id `after`, then each new one as it is written, ending after
/// the job's final state (or when the job is gone). `wake` comes from [`EventHub::subscribe`].
pub fn stream(
    db: PgPool,
    mut wake: broadcast::Receiver<Uuid>,
    tenant_id: Uuid,
    id: Uuid,
    mut after: i64,
) -> impl Stream<Item = EventRow> {
    async_stream::stream! {
        loop {
            let rows = db::jobs::events_after(&db, id, after).await.unwrap_or_default();
            for r in rows.iter().cloned() {
                after = r.id;
                yield r;
            }
            if !rows.is_empty() {
                continue;
            }
            let done = db::jobs::get(&db, tenant_id, id)
                .await
                .ok()
                .flatten()
                .is_none_or(|j| j.state.is_final());
            if done {
                // A worker records the final `state` event just after the final state: wait a
                // moment for it (and anything written since the read above) before ending.
                let deadline = tokio::time::Instant::now() + FINAL_EVENT_WAIT;
                loop {
                    let rows = db::jobs::events_after(&db, id, after).await.unwrap_or_default();
                    let ended = rows.iter().any(|r| r.kind == "state");
                    for r in rows {
                        after = r.id;
                        yield r;
                    }
                    if ended || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                break;
            }
            // Idle: no connection held, only a place in the hub's fan-out.
            let woken = async {
                loop {
                    match wake.recv().await {
                        Ok(job) if job == id || job.is_nil() => return,
                        Ok(_) => {}
                        // Fell behind: look again from `after`.
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(RECHECK, woken).await;
        }
    }
}
