//! Media: FFmpeg probing and decoding, the training cache format, safe archive extraction, the
//! child process that isolates FFmpeg from the server, and H.264 writing for synthetic data.
pub mod archive;
pub mod cache;
pub mod clips;
pub mod decode;
pub mod encode;
pub mod worker;
