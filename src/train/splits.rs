//! The dataset as a job trains on it: class names from the training split, and the accepted,
//! labelled videos of each split with their cached frame counts and sizes.
use std::collections::BTreeSet;
use std::path::PathBuf;

use super::TrainError;
use super::data::Item;
/// Which split a video belongs to (the plain enum its row stores).
pub use crate::db::videos::Split as SplitName;

/// One accepted video of the dataset, as its row and training cache describe it.
#[derive(Debug, Clone)]
pub struct SplitVideo {
    pub split: Option<SplitName>,
    pub label: Option<String>,
    pub cache: PathBuf,
    /// Frames in the cache (at least 1).
    pub frames: u32,
    /// Cached frame height and width.
    pub hw: (i64, i64),
}

/// The dataset split into train / val / test items, and the class names.
#[derive(Debug, Clone)]
pub struct Splits {
    pub classes: Vec<String>,
    pub train: Split,
    pub val: Split,
    pub test: Split,
}

/// The videos of one split and their cached frame sizes.
#[derive(Debug, Default, Clone)]
pub struct Split {
    pub items: Vec<Item>,
    pub hw: Vec<(i64, i64)>,
}

impl Split {
    pub fn push(&mut self, item: Item, hw: (i64, i64)) {
        self.items.push(item);
        self.hw.push(hw);
    }
}

impl Splits {
    /// Classes are the labels of the training split (sorted); a video of another label or of
    /// no split is left out. The user's error when fewer than 2 classes or no validation video.
    pub fn new(videos: Vec<SplitVideo>) -> Result<Self, TrainError> {
        let classes: Vec<String> = videos
            .iter()
            .filter(|v| v.split == Some(SplitName::Train))
            .filter_map(|v| v.label.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if classes.len() < 2 {
            return Err(TrainError::User(format!(
                "the training split has {} class(es); at least 2 are needed",
                classes.len()
            )));
        }
        let mut s = Splits {
            classes,
            train: Split::default(),
            val: Split::default(),
            test: Split::default(),
        };
        for v in videos {
            let Some(label) = v
                .label
                .as_ref()
                .and_then(|l| s.classes.iter().position(|c| c == l))
            else {
                continue;
            };
            let item = Item {
                cache: v.cache,
                frames: v.frames,
                label,
            };
            match v.split {
                Some(SplitName::Train) => s.train.push(item, v.hw),
                Some(SplitName::Val) => s.val.push(item, v.hw),
                Some(SplitName::Test) => s.test.push(item, v.hw),
                None => continue,
            }
        }
        if s.val.items.is_empty() {
            return Err(TrainError::User(
                "the dataset has no validation videos (give the val split a share)".into(),
            ));
        }
        Ok(s)
    }
}
