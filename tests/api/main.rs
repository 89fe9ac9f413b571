//! HTTP API tests against a real PostgreSQL: every test gets its own migrated database
//! (`#[sqlx::test]`) and its own server on a free port.
mod helpers;
mod media;
#[path = "../fixtures/models.rs"]
mod models;

mod audit;
mod auth;
mod base_models;
mod batches;
mod datasets;
mod dicom;
mod health;
mod hygiene;
mod ingest_bounds;
mod jobs;
mod openapi;
mod pacs;
mod problems;
mod quota;
mod retention;
mod roles;
mod sandbox;
mod serving;
mod streams;
mod walkthrough;
