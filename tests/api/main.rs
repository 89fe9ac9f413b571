//! HTTP API tests against a real PostgreSQL: every test gets its own migrated database
//! (`#[sqlx::test]`) and its own server on a free port.
mod helpers;
mod media;
#[path = "../fixtures/models.rs"]
mod models;

mod audit;
mod auth;
mod base_models;
mod datasets;
mod health;
mod hygiene;
mod jobs;
mod openapi;
mod problems;
mod roles;
mod sandbox;
mod serving;
mod walkthrough;
