//! Media: FFmpeg probing and decoding, DICOM cine and video objects, the training cache format, safe archive extraction, the
//! child process that isolates FFmpeg from the server, and H.264 writing for synthetic data.
//! Every untrusted file is opened through [`input::open`], which keeps FFmpeg to that file's own
//! bytes and to the allow-listed containers.
pub mod archive;
pub mod cache;
pub mod clips;
pub mod decode;
pub mod dicom;
pub mod encode;
pub mod input;
pub mod worker;
