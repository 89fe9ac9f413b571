//! The PACS an operator configured, over DICOMweb: QIDO-RS to find a study's instances, WADO-RS
//! to fetch each one as stored (`transfer-syntax=*`: no transcoding, so H.264 and JPEG objects
//! arrive as they are). Its address and credentials come from configuration only; requests name
//! studies, never servers. Every fetch streams to disk under a byte cap.
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

/// Where the PACS is and how to sign in.
#[derive(Debug, Clone)]
pub struct PacsConfig {
    /// The DICOMweb root, e.g. `https://pacs.hospital.example/dicom-web`.
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// For one request (a search, or one instance's transfer).
    pub timeout: Duration,
}

/// A prediction's input named on the PACS instead of sent: a study, and optionally the series
/// and instance within it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyRef {
    pub study_uid: String,
    #[serde(default)]
    pub series_uid: Option<String>,
    #[serde(default)]
    pub sop_instance_uid: Option<String>,
}

/// One instance of a study.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InstanceRef {
    pub study: String,
    pub series: String,
    pub sop: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PacsError {
    /// The PACS could not be reached or answered with an error: the text is for the tenant
    /// (no address, no credentials).
    #[error("{0}")]
    Unavailable(String),
    /// An instance is larger than what may be fetched.
    #[error("the instance is larger than {0} bytes")]
    TooLarge(u64),
    /// The answer was not what DICOMweb specifies.
    #[error("{0}")]
    Malformed(String),
    #[error("writing the fetched instance failed: {0}")]
    Io(#[from] std::io::Error),
    /// The reference names no instance on the PACS.
    #[error("the PACS has no instance for this reference")]
    NotFound,
    /// The reference names several instances.
    #[error("the reference names {0} instances; give `series_uid` and `sop_instance_uid`")]
    Ambiguous(usize),
}

pub struct Pacs {
    cfg: PacsConfig,
    http: reqwest::Client,
}

/// QIDO-RS match keys a search may use: what selects studies, not what identifies a person
/// more than the search itself needs.
pub const QUERY_KEYS: &[&str] = &[
    "StudyInstanceUID",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "ModalitiesInStudy",
    "StudyDescription",
];

impl Pacs {
    pub fn new(cfg: PacsConfig) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("vidtune/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self { cfg, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.url.trim_end_matches('/'))
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let rb = self.http.get(url).timeout(self.cfg.timeout);
        match &self.cfg.user {
            Some(u) => rb.basic_auth(u, self.cfg.password.as_deref()),
            None => rb,
        }
    }

    async fn search(&self, path: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, PacsError> {
        let mut url = self.url(path);
        if !query.is_empty() {
            url.push('?');
            url.push_str(
                &form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(query)
                    .finish(),
            );
        }
        let resp = self
            .get(&url)
            .header("accept", "application/dicom+json")
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(PacsError::Unavailable(format!(
                "the PACS answered a search with HTTP {status}"
            )));
        }
        // A search answer is metadata: more than this is not one a PACS should send.
        const MAX_SEARCH_BYTES: usize = 64 << 20;
        let mut bytes = Vec::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk.map_err(unreachable)?);
            if bytes.len() > MAX_SEARCH_BYTES {
                return Err(PacsError::Malformed(format!(
                    "the PACS's search answer exceeds {} MiB",
                    MAX_SEARCH_BYTES >> 20
                )));
            }
        }
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            PacsError::Malformed(format!("the PACS's search answer is not DICOM JSON: {e}"))
        })
    }

    /// Study UIDs matching `query` (QIDO-RS `/studies`), at most `limit`.
    pub async fn studies(
        &self,
        query: &[(String, String)],
        limit: usize,
    ) -> Result<Vec<String>, PacsError> {
        let limit = limit.to_string();
        let mut q: Vec<(&str, &str)> = query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        q.push(("limit", &limit));
        let found = self.search("/studies", &q).await?;
        Ok(found.iter().filter_map(|d| string(d, "0020000D")).collect())
    }

    /// Every instance of `study` (QIDO-RS, series then instances), in series and instance order.
    pub async fn instances(&self, study: &str) -> Result<Vec<InstanceRef>, PacsError> {
        let series = self
            .search(&format!("/studies/{}/series", segment(study)?), &[])
            .await?;
        let mut out = Vec::new();
        for s in series {
            let Some(se) = string(&s, "0020000E") else {
                continue;
            };
            let path = format!(
                "/studies/{}/series/{}/instances",
                segment(study)?,
                segment(&se)?
            );
            let mut found: Vec<(i64, String)> = self
                .search(&path, &[])
                .await?
                .iter()
                .filter_map(|i| {
                    let n = i
                        .get("00200013")
                        .and_then(|e| e.get("Value"))
                        .and_then(|v| v.get(0))
                        .and_then(|n| n.as_i64().or_else(|| n.as_str()?.trim().parse().ok()))
                        .unwrap_or(0);
                    Some((n, string(i, "00080018")?))
                })
                .collect();
            found.sort();
            out.extend(found.into_iter().map(|(_, sop)| InstanceRef {
                study: study.to_owned(),
                series: se.clone(),
                sop,
            }));
        }
        Ok(out)
    }

    /// Fetch one instance as stored (WADO-RS, `multipart/related; type="application/dicom";
    /// transfer-syntax=*`) into `dest`, at most `cap` bytes of it. Returns its size.
    pub async fn retrieve(
        &self,
        inst: &InstanceRef,
        dest: &Path,
        cap: u64,
    ) -> Result<u64, PacsError> {
        let path = format!(
            "/studies/{}/series/{}/instances/{}",
            segment(&inst.study)?,
            segment(&inst.series)?,
            segment(&inst.sop)?
        );
        let resp = self
            .get(&self.url(&path))
            .header(
                "accept",
                "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            )
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(PacsError::Unavailable(format!(
                "the PACS answered a retrieve with HTTP {status}"
            )));
        }
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let boundary = boundary_of(&ctype).ok_or_else(|| {
            PacsError::Malformed(format!(
                "the PACS's retrieve answer is not multipart/related ({ctype})"
            ))
        })?;
        let mut part = FirstPart::new(&boundary, std::fs::File::create(dest)?, cap);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(unreachable)?;
            if part.feed(&chunk)? {
                break;
            }
        }
        part.finish()
    }
}

impl Pacs {
    /// Fetch the one instance `r` names into `dest` (at most `cap` bytes).
    pub async fn fetch_reference(
        &self,
        r: &StudyRef,
        dest: &Path,
        cap: u64,
    ) -> Result<u64, PacsError> {
        for uid in [
            Some(&r.study_uid),
            r.series_uid.as_ref(),
            r.sop_instance_uid.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            segment(uid)?;
        }
        let found: Vec<InstanceRef> = self
            .instances(&r.study_uid)
            .await?
            .into_iter()
            .filter(|i| r.series_uid.as_ref().is_none_or(|s| *s == i.series))
            .filter(|i| r.sop_instance_uid.as_ref().is_none_or(|s| *s == i.sop))
            .collect();
        match found.as_slice() {
            [] => Err(PacsError::NotFound),
            [one] => self.retrieve(one, dest, cap).await,
            many => Err(PacsError::Ambiguous(many.len())),
        }
    }
}

fn unreachable(e: reqwest::Error) -> PacsError {
    let what = if e.is_timeout() {
        "did not answer in time"
    } else if e.is_connect() {
        "cannot be reached"
    } else {
        "broke off the transfer"
    };
    PacsError::Unavailable(format!("the PACS {what}"))
}

/// A UID as a path segment: digits and dots only, so nothing else reaches the PACS's URL.
fn segment(uid: &str) -> Result<&str, PacsError> {
    if !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        Ok(uid)
    } else {
        Err(PacsError::Malformed(
            "a UID from the PACS is not digits and dots".into(),
        ))
    }
}

/// The first string value of attribute `tag` (8 hex digits) of a DICOM JSON object.
fn string(obj: &Value, tag: &str) -> Option<String> {
    let v = obj.get(tag)?.get("Value")?.get(0)?.as_str()?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// The `boundary` parameter of a multipart content type.
fn boundary_of(ctype: &str) -> Option<String> {
    let (kind, params) = ctype.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/related") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty() && b.len() <= 200)
    })
}

/// Streams the body of the first part of a multipart message into a file. The message is fed in
/// chunks of any size; only a tail of the delimiter's length is held back.
struct FirstPart {
    /// `\r\n--boundary`.
    delim: Vec<u8>,
    out: std::fs::File,
    cap: u64,
    written: u64,
    /// Bytes not yet placed: the preamble and headers, or a content tail that may start a
    /// delimiter.
    held: Vec<u8>,
    state: State,
}

#[derive(PartialEq)]
enum State {
    /// Before the first delimiter (the message is read as if it began with `\r\n`).
    Preamble,
    /// In the part's headers, until an empty line.
    Headers,
    Content,
    Done,
}

impl FirstPart {
    fn new(boundary: &str, out: std::fs::File, cap: u64) -> Self {
        Self {
            delim: format!("\r\n--{boundary}").into_bytes(),
            out,
            cap,
            written: 0,
            held: b"\r\n".to_vec(),
            state: State::Preamble,
        }
    }

    /// Returns whether the part is complete.
    fn feed(&mut self, chunk: &[u8]) -> Result<bool, PacsError> {
        self.held.extend_from_slice(chunk);
        loop {
            match self.state {
                State::Preamble => match find(&self.held, &self.delim) {
                    Some(i) => {
                        self.held.drain(..i + self.delim.len());
                        self.state = State::Headers;
                    }
                    None => {
                        if self.held.len() > 64 << 10 {
                            return Err(PacsError::Malformed(
                                "no multipart delimiter in the first 64 KiB".into(),
                            ));
                        }
                        return Ok(false);
                    }
                },
                State::Headers => match find(&self.held, b"\r\n\r\n") {
                    Some(i) => {
                        self.held.drain(..i + 4);
                        self.state = State::Content;
                    }
                    None => {
                        if self.held.len() > 64 << 10 {
                            return Err(PacsError::Malformed(
                                "a multipart part's headers exceed 64 KiB".into(),
                            ));
                        }
                        return Ok(false);
                    }
                },
                State::Content => {
                    if let Some(i) = find(&self.held, &self.delim) {
                        let body: Vec<u8> = self.held.drain(..i).collect();
                        self.write(&body)?;
                        self.state = State::Done;
                        return Ok(true);
                    }
                    // Everything but a tail that could begin a delimiter is content.
                    let keep = self.delim.len() - 1;
                    if self.held.len() > keep {
                        let n = self.held.len() - keep;
                        let body: Vec<u8> = self.held.drain(..n).collect();
                        self.write(&body)?;
                    }
                    return Ok(false);
                }
                State::Done => return Ok(true),
            }
        }
    }

    fn write(&mut self, b: &[u8]) -> Result<(), PacsError> {
        self.written += b.len() as u64;
        if self.written > self.cap {
            return Err(PacsError::TooLarge(self.cap));
        }
        self.out.write_all(b)?;
        Ok(())
    }

    fn finish(mut self) -> Result<u64, PacsError> {
        if self.state != State::Done {
            return Err(PacsError::Malformed(
                "the PACS's answer ended inside its first part".into(),
            ));
        }
        self.out.flush()?;
        Ok(self.written)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(message: &[u8], chunk: usize, cap: u64) -> Result<Vec<u8>, PacsError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part");
        let mut part = FirstPart::new("B0und", std::fs::File::create(&p).unwrap(), cap);
        for c in message.chunks(chunk) {
            if part.feed(c)? {
                break;
            }
        }
        part.finish()?;
        Ok(std::fs::read(&p).unwrap())
    }

    #[test]
    fn the_first_part_comes_out_whole_whatever_the_chunking() {
        // A body that holds CRLFs and a near-delimiter.
        let body: Vec<u8> = b"DICM\r\n--B0un\r\n-- data \r\n--B0unx"
            .iter()
            .copied()
            .chain((0..5000u32).map(|i| (i % 251) as u8))
            .collect();
        let mut msg =
            b"--B0und\r\nContent-Type: application/dicom\r\nContent-Length: 1\r\n\r\n".to_vec();
        msg.extend_from_slice(&body);
        msg.extend_from_slice(b"\r\n--B0und--\r\n");
        for chunk in [1, 3, 7, 64, 100_000] {
            assert_eq!(split(&msg, chunk, 1 << 20).unwrap(), body, "chunk {chunk}");
        }
        // A preamble before the first delimiter is ignored.
        let mut with_preamble = b"ignored preamble".to_vec();
        with_preamble.extend_from_slice(b"\r\n");
        with_preamble.extend_from_slice(&msg);
        assert_eq!(split(&with_preamble, 5, 1 << 20).unwrap(), body);
        // Capped, and a truncated message is not a part.
        assert!(matches!(
            split(&msg, 64, 100),
            Err(PacsError::TooLarge(100))
        ));
        assert!(matches!(
            split(&msg[..msg.len() - 20], 64, 1 << 20),
            Err(PacsError::Malformed(_))
        ));
    }

    #[test]
    fn boundaries_and_uids_are_read_strictly() {
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom\"; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary_of("multipart/related;boundary=\"x y\"").as_deref(),
            Some("x y")
        );
        assert_eq!(boundary_of("application/dicom"), None);
        assert!(segment("1.2.840.113619").is_ok());
        for bad in ["", "1.2/../x", "1.2?a=b", "1.2 3"] {
            assert!(segment(bad).is_err(), "{bad}");
        }
    }
}
