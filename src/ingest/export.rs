//! A dataset's training cache taken out of the service: its accepted, labelled videos' cache
//! files linked (or copied) into a folder with the `manifest.json` that `vidtune train` reads,
//! labels, patients and splits as the dataset has them. For training where the server does not
//! run (`vidtune export-cache`).
use std::path::Path;

use anyhow::Context;
use uuid::Uuid;

use crate::datadir::DataDir;
use crate::db::{self, PgPool, videos::VideoStatus};
use crate::train::offline::{Manifest, ManifestVideo};

/// Export dataset `dataset_id` into `out` (created; files already there are replaced): one
/// `<video id>.vtc` per accepted, labelled video, hard-linked where `out` shares the data
/// directory's file system, then the manifest. Returns the manifest.
pub async fn export_cache(
    db: &PgPool,
    data: &DataDir,
    dataset_id: Uuid,
    out: &Path,
) -> anyhow::Result<Manifest> {
    let videos = db::datasets::dataset_videos(db, dataset_id).await?;
    anyhow::ensure!(
        !videos.is_empty(),
        "dataset {dataset_id} has no videos (or does not exist)"
    );
    let dirs = data.dataset(dataset_id);
    let out = out.to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || -> anyhow::Result<Manifest> {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let mut entries = Vec::new();
        for v in videos {
            let Some(label) = v.label.filter(|_| v.status == VideoStatus::Accepted) else {
                continue;
            };
            let name = format!("{}.vtc", v.id);
            let (from, to) = (dirs.cache_file(v.id), out.join(&name));
            let _ = std::fs::remove_file(&to);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to)
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            }
            entries.push(ManifestVideo {
                cache: name,
                label,
                patient_id: v.patient_id,
                split: v.split,
            });
        }
        let manifest = Manifest {
            version: 1,
            videos: entries,
        };
        manifest.write(&out)?;
        Ok(manifest)
    })
    .await
    .context("export task")??;
    Ok(manifest)
}
