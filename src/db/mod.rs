//! PostgreSQL access: the embedded migrations, the pool, and one module per table family.
//! Functions take an executor so callers choose the transaction.
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

pub mod audit;
pub mod base_models;
pub mod batch_predictions;
pub mod datasets;
pub mod deletions;
pub mod jobs;
pub mod models;
pub mod tenants;
pub mod uploads;
pub mod usage;
pub mod videos;

/// The pool and error types, named through `db` so that the modules above it need not depend on
/// sqlx themselves.
pub use sqlx::{Error, PgPool};

/// Whether the statement broke a unique constraint (a name already taken, say): the caller's
/// conflict, not a failure of the database.
pub fn is_unique_violation(e: &Error) -> bool {
    matches!(e, Error::Database(d) if d.is_unique_violation())
}

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

/// The database answers a trivial query (readiness).
pub async fn ping(db: &PgPool) -> sqlx::Result<()> {
    sqlx::query_scalar::<_, i32>("select 1")
        .fetch_one(db)
        .await?;
    Ok(())
}

/// The server's version string.
pub async fn server_version(db: &PgPool) -> sqlx::Result<String> {
    sqlx::query_scalar("show server_version")
        .fetch_one(db)
        .await
}

/// How many migrations have been applied successfully (an error before the first migration).
pub async fn migrations_applied(db: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(db)
        .await
}
