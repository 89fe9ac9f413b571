//! The data directory's layout: the one place that decides where bytes live on disk.
//!
//! Postgres records keep paths *relative* to the data directory (so a data directory can move
//! or be mounted elsewhere on another worker host); [`DataDir::resolve`] turns them back into
//! paths. Every other module asks this one instead of joining path pieces itself.
//!
//! ```text
//! datasets/<dataset>/incoming/<upload>      received archive bodies until extracted
//! datasets/<dataset>/files/<upload>/…       extracted source videos (`video` for a single one)
//! datasets/<dataset>/cache/<video>.vtc      the training cache
//! jobs/<job>/checkpoints/attempt-N/epoch-NNNN/  checkpoints of attempt N (weights, optimizer,
//!                                           loop state); an attempt never writes another's
//! models/<model>/                           exported models (model.safetensors, model.json, exports)
//! weights/<arch>/<sha256>.safetensors       imported pretrained weights
//! weights/incoming/                         weights being received or downloaded
//! backbones/<id>.pt                         registered TorchScript backbones
//! tmp/predict/                              prediction uploads while they are decoded
//! ```
//!
//! Durability: a file or folder becomes visible under its final name only through
//! [`durable_rename`] (contents flushed, renamed, directory entry flushed), and the database row
//! that refers to it is committed after that; [`remove_durably`] is its inverse.
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// The data directory. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path a database record holds (relative to the data directory).
    pub fn resolve(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.root.join(relative)
    }

    /// `path` as a database record holds it: relative to the data directory when inside it.
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    /// A dataset's folders.
    pub fn dataset(&self, dataset_id: Uuid) -> DatasetDirs {
        DatasetDirs::new(&self.root, dataset_id)
    }

    /// A job's folder: its checkpoints (one folder per attempt, then per epoch).
    pub fn job_relative(job_id: Uuid) -> PathBuf {
        Path::new("jobs").join(job_id.to_string())
    }

    /// A job's checkpoints, one folder per attempt.
    pub fn checkpoints(&self, job_id: Uuid) -> PathBuf {
        self.resolve(Self::job_relative(job_id)).join("checkpoints")
    }

    /// A dataset's folder, relative (sources, incoming bodies, training cache).
    pub fn dataset_relative(dataset_id: Uuid) -> PathBuf {
        Path::new("datasets").join(dataset_id.to_string())
    }

    /// A model's folder, relative (as its record holds it).
    pub fn model_relative(model_id: Uuid) -> PathBuf {
        Path::new("models").join(model_id.to_string())
    }

    /// Imported weights of an architecture, relative (as their record holds it).
    pub fn weights_relative(arch: &str, sha256: &str) -> PathBuf {
        Path::new("weights")
            .join(arch)
            .join(format!("{sha256}.safetensors"))
    }

    /// Weights files being received or downloaded.
    pub fn weights_incoming(&self) -> PathBuf {
        self.root.join("weights").join("incoming")
    }

    /// A registered TorchScript backbone, relative (as its record holds it).
    pub fn backbone_relative(backbone_id: Uuid) -> PathBuf {
        Path::new("backbones").join(format!("{backbone_id}.pt"))
    }

    /// The identity of the database this data directory belongs to (written at the first start).
    pub fn installation_marker(&self) -> PathBuf {
        self.root.join(".vidtune-installation")
    }

    /// `precision: "auto"`'s decisions, kept per machine, model and clip size
    /// (`train::precision::Memo`).
    pub fn precision_memos(&self) -> PathBuf {
        self.root.join("precision")
    }

    /// Prediction uploads while they are decoded.
    pub fn predict_scratch(&self) -> PathBuf {
        self.root.join("tmp").join("predict")
    }
}

/// Where a dataset's bytes live under the data directory.
#[derive(Debug, Clone)]
pub struct DatasetDirs {
    pub root: PathBuf,
}

impl DatasetDirs {
    /// The folders of `dataset_id` under the data directory `data_dir`.
    pub fn new(data_dir: &Path, dataset_id: Uuid) -> Self {
        Self {
            root: data_dir.join("datasets").join(dataset_id.to_string()),
        }
    }
    /// Received upload bodies, `<upload_id>`, until ingest has extracted them.
    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }
    /// Source files, one folder per upload.
    pub fn files(&self, upload_id: Uuid) -> PathBuf {
        self.root.join("files").join(upload_id.to_string())
    }
    /// Training cache, one file per accepted video.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn cache_file(&self, video_id: Uuid) -> PathBuf {
        self.cache().join(format!("{video_id}.vtc"))
    }
    /// Where an archive upload's body is received.
    pub fn archive_body(&self, upload_id: Uuid) -> PathBuf {
        self.incoming().join(upload_id.to_string())
    }
    /// Where a single-video upload's body is received (and stays).
    pub fn video_body(&self, upload_id: Uuid) -> PathBuf {
        self.files(upload_id).join("video")
    }
}

/// Bytes of the files under `path` (a file's own size; 0 when it does not exist). Symbolic
/// links are not followed.
pub fn dir_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| dir_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Flush a file's contents, or a folder's files (recursively) and entries, to stable storage.
pub fn sync_tree(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if !entry.file_type()?.is_symlink() {
                sync_tree(&entry.path())?;
            }
        }
        sync_dir(path)
    } else {
        std::fs::File::open(path)?.sync_all()
    }
}

/// Flush a directory's entries (names created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Flush a file or folder already at its final name, and the directory entry naming it.
pub fn sync_in_place(path: &Path) -> std::io::Result<()> {
    sync_tree(path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Move a complete file or folder `from` to `to` so that after a crash `to` is either absent or
/// whole: flush the contents, rename, flush the directory that now names it. Callers commit
/// the database row that refers to `to` only after this returns. `to` must not be an existing
/// non-empty folder.
pub fn durable_rename(from: &Path, to: &Path) -> std::io::Result<()> {
    sync_tree(from)?;
    std::fs::rename(from, to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Remove a file or folder (absent already is fine) and flush the removal from its directory,
/// so that removed data does not come back after a crash.
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match path.parent().map(sync_dir) {
        Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Deletes a file that is not (yet) wanted unless disarmed: a partly received upload, a
/// scratch copy. Also runs when the request that owns it is dropped mid-way.
pub struct PartialFile {
    path: Option<PathBuf>,
}

impl PartialFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }
    /// The file is complete and wanted: leave it.
    pub fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_hold_paths_relative_to_the_data_dir() {
        let d = DataDir::new("/srv/vidtune");
        let id = Uuid::nil();
        let rel = DataDir::model_relative(id);
        assert_eq!(
            d.resolve(&rel),
            Path::new("/srv/vidtune/models/00000000-0000-0000-0000-000000000000")
        );
        assert_eq!(d.relative(&d.resolve(&rel)), rel.to_string_lossy());
        let ckpt = d.checkpoints(id).join("epoch-0001");
        assert_eq!(
            d.relative(&ckpt),
            "jobs/00000000-0000-0000-0000-000000000000/checkpoints/epoch-0001"
        );
        // Outside the data directory a path stays as it is.
        assert_eq!(d.relative(Path::new("/elsewhere/x")), "/elsewhere/x");
    }

    #[test]
    fn durable_rename_moves_whole_folders_and_remove_durably_forgets_them() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join("epoch-0001.part-1");
        std::fs::create_dir_all(part.join("sub")).unwrap();
        std::fs::write(part.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(part.join("sub").join("state.json"), b"{}").unwrap();
        let dest = tmp.path().join("epoch-0001");
        durable_rename(&part, &dest).unwrap();
        assert!(!part.exists());
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"weights"
        );
        remove_durably(&dest).unwrap();
        assert!(!dest.exists());
        // Removing what is already gone is not an error (a resumed deletion).
        remove_durably(&dest).unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        remove_durably(&file).unwrap();
        assert!(!file.exists());
    }
}
