//! PostgreSQL access: the embedded migrations, the pool, and one module per table family.
//! Functions take an executor so callers choose the transaction.
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

pub mod audit;
pub mod base_models;
pub mod batch_predictions;
pub mod datasets;
pub mod jobs;
pub mod models;
pub mod tenants;

/// Migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Open a pool; fails fast when the database cannot be reached.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")
}

/// Apply pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    MIGRATOR.run(pool).await.context("applying migrations")
}
