//! The state every handler shares: the pool, settings, the serving and decoding pools.
use std::sync::Arc;

use sqlx::PgPool;

use crate::config::Settings;
use crate::datadir::DataDir;
use crate::ingest::Ingest;
use crate::media::worker::MediaPool;
use crate::metrics::HttpMetrics;
use crate::serve::{ModelCache, RateLimiter};

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
}

impl AppState {
    /// The state for `settings`: empty model cache, a decoder pool of the ingest concurrency.
    pub fn new(settings: Settings, db: PgPool) -> Self {
        Self {
            db,
            data: DataDir::new(&settings.data_dir),
            ingest: Arc::new(Ingest::new(
                settings.ingest.clone(),
                settings.tenant_quota_bytes,
            )),
            models: Arc::new(ModelCache::new(settings.serve.clone())),
            media: Arc::new(MediaPool::new(
                &settings.ingest.media_worker_exe,
                settings.ingest.concurrency,
            )),
            limiter: Arc::default(),
            http_metrics: Arc::default(),
            settings: Arc::new(settings),
        }
    }
}
