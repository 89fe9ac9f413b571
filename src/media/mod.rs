//! Media: FFmpeg probing and decoding, the training cache format, safe archive extraction, and
//! the child process that isolates FFmpeg from the server.
pub mod archive;
pub mod cache;
pub mod decode;
pub mod worker;
