//! HTTP API tests against a real PostgreSQL: every test gets its own migrated database
//! (`#[sqlx::test]`) and its own server on a free port.
mod helpers;
mod media;

mod audit;
mod auth;
mod datasets;
mod health;
mod openapi;
mod problems;
