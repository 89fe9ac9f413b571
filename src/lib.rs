//! vidtune: fine-tune pretrained video-understanding models on medical video and serve them.
//!
//! The crate is organised by role (see README "Code tour"): `http` and `worker` at the top,
//! `db`, `media` and `backbone` at the bottom; nothing below imports from above.
pub mod app;
pub mod auth;
pub mod backbone;
pub mod cli;
pub mod client;
pub mod config;
pub mod datadir;
pub mod db;
pub mod device;
pub mod doctor;
pub mod evaluation;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod media;
pub mod metrics;
pub mod pacs;
pub mod plots;
pub mod quota;
pub mod registry;
pub mod retention;
pub mod sandbox;
pub mod serve;
pub mod synth;
pub mod telemetry;
pub mod train;
pub mod worker;
