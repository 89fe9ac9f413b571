//! The state every handler shares: the pool, settings, the serving and decoding pools.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use uuid::Uuid;

use crate::config::Settings;
use crate::datadir::DataDir;
use crate::ingest::Ingest;
use crate::jobs::events::EventHub;
use crate::media::worker::MediaPool;
use crate::metrics::HttpMetrics;
use crate::serve::{BatchRunner, ModelCache, RateLimiter};

/// State shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub settings: Arc<Settings>,
    /// The data directory's layout (`settings.data_dir`).
    pub data: DataDir,
    /// Ingest's settings and its decoders, shared by every upload.
    pub ingest: Arc<Ingest>,
    /// Loaded models for predictions.
    pub models: Arc<ModelCache>,
    /// Decoders for prediction uploads.
    pub media: Arc<MediaPool>,
    pub limiter: Arc<RateLimiter>,
    pub http_metrics: Arc<HttpMetrics>,
    /// Runs batch predictions, this process's and those of processes that died.
    pub batches: Arc<BatchRunner>,
    /// The one LISTEN connection's fan-out to job event streams.
    pub events: Arc<EventHub>,
    /// Event streams open per API key.
    pub streams: Arc<StreamSlots>,
}

impl AppState {
    /// The state for `settings`: empty model cache, a decoder pool of the ingest concurrency.
    pub fn new(settings: Settings, db: PgPool) -> Self {
        let data = DataDir::new(&settings.data_dir);
        let models = Arc::new(ModelCache::new(settings.serve.clone()));
        Self {
            batches: Arc::new(BatchRunner::new(db.clone(), data.clone(), models.clone())),
            db,
            data,
            ingest: Arc::new(Ingest::new(
                settings.ingest.clone(),
                settings.tenant_quota_bytes,
            )),
            models,
            media: Arc::new(MediaPool::new(
                &settings.ingest.media_worker_exe,
                settings.ingest.concurrency,
            )),
            limiter: Arc::default(),
            http_metrics: Arc::default(),
            events: Arc::default(),
            streams: Arc::default(),
            settings: Arc::new(settings),
        }
    }
}

/// Open event streams per API key, so that one key cannot hold every stream (or, before
/// streams shared one LISTEN connection, every pooled connection) of the server.
#[derive(Default)]
pub struct StreamSlots {
    open: Mutex<HashMap<Uuid, usize>>,
}

impl StreamSlots {
    /// A slot for one more stream of `key`, or `None` when it has `max` open already. The slot
    /// is given back when dropped (the stream ends or its client goes away).
    pub fn take(self: &Arc<Self>, key: Uuid, max: usize) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            slots: self.clone(),
            key,
        })
    }
}

/// One open stream of a key (see [`StreamSlots::take`]).
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    key: Uuid,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}
