//! Synthetic echocardiography-like datasets, so that the whole loop can be tried, tested and
//! benchmarked without patient data.
//!
//! Each video is a grey cine loop in an ultrasound sector: a dark blood pool inside a bright
//! myocardial wall, over speckled tissue, beating at a heart rate drawn from its class's band.
//! Contraction lasts about `0.36·√RR` seconds (Bazett's scaling of systole with the RR interval),
//! so a slow heart rests long between short beats and a fast one never rests. A patient fixes
//! the anatomy (chamber size, position, wall thickness, gain, shortening) and a base rate; each of
//! the patient's clips varies the rate by a few percent, the phase and the noise. Every file is
//! an H.264 MP4 with a `labels.csv` (`path,label,patient_id`), so a dataset's split can keep a
//! patient's clips together.
use std::f64::consts::PI;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::media::encode::Mp4Writer;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Number of heart-rate classes (2 to 8).
    pub classes: u32,
    /// Patients per class.
    pub patients: u32,
    /// Clips per patient.
    pub clips: u32,
    /// Length of each clip.
    pub seconds: f64,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Same seed, same files (bit for bit with the same FFmpeg).
    pub seed: u64,
    pub format: SynthFormat,
}

/// How each loop is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthFormat {
    /// H.264 in MP4.
    #[default]
    Mp4,
    /// DICOM Ultrasound Multi-frame objects (native MONOCHROME2, Cine Rate and Frame Time),
    /// with synthetic patient, study and series attributes: PatientID per patient (labels.csv
    /// then names no patient: ingest takes it from the objects), the class in
    /// SeriesDescription.
    Dicom,
}

impl Default for SynthSpec {
    fn default() -> Self {
        Self {
            classes: 3,
            patients: 8,
            clips: 2,
            seconds: 4.0,
            width: 128,
            height: 112,
            fps: 30,
            seed: 1,
            format: SynthFormat::Mp4,
        }
    }
}

impl SynthSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((2..=8).contains(&self.classes), "classes: 2 to 8");
        anyhow::ensure!(
            (1..=10_000).contains(&self.patients),
            "patients: 1 to 10000"
        );
        anyhow::ensure!((1..=100).contains(&self.clips), "clips: 1 to 100");
        anyhow::ensure!((0.5..=600.0).contains(&self.seconds), "seconds: 0.5 to 600");
        anyhow::ensure!(
            (32..=1920).contains(&self.width)
                && (32..=1080).contains(&self.height)
                && self.width.is_multiple_of(2)
                && self.height.is_multiple_of(2),
            "size: even, from 32×32 to 1920×1080"
        );
        anyhow::ensure!((5..=120).contains(&self.fps), "fps: 5 to 120");
        Ok(())
    }
}

/// A class: a name and its heart-rate band in beats per minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateClass {
    pub label: String,
    pub bpm: (f64, f64),
}

/// The classes for `n` bands. Two and three use clinical names; more split 36–170 bpm evenly on
/// a log scale, with a gap between neighbours so that every label is decidable from the video.
pub fn rate_classes(n: u32) -> Vec<RateClass> {
    let named = |v: &[(&str, f64, f64)]| {
        v.iter()
            .map(|&(l, a, b)| RateClass {
                label: l.to_string(),
                bpm: (a, b),
            })
            .collect()
    };
    match n {
        2 => named(&[("normal", 58.0, 92.0), ("tachycardia", 112.0, 170.0)]),
        3 => named(&[
            ("bradycardia", 36.0, 52.0),
            ("normal", 62.0, 92.0),
            ("tachycardia", 112.0, 170.0),
        ]),
        _ => {
            let (lo, hi) = (36f64.ln(), 170f64.ln());
            let step = (hi - lo) / f64::from(n);
            (0..n)
                .map(|i| {
                    let a = (lo + step * f64::from(i)).exp();
                    let b = (lo + step * (f64::from(i) + 0.8)).exp();
                    RateClass {
                        label: format!("hr_{:.0}_{:.0}", a, b),
                        bpm: (a, b),
                    }
                })
                .collect()
        }
    }
}

/// One generated file.
#[derive(Debug, Clone, Serialize)]
pub struct SynthVideo {
    /// Relative to the dataset folder: `<label>/<patient>_<clip>.mp4`, or for DICOM
    /// `<label>/im-c<class>-p<patient>-<clip>.dcm`.
    pub path: String,
    pub label: String,
    pub patient_id: String,
    pub bpm: f64,
}

/// Anatomy of one patient, shared by the patient's clips.
#[derive(Debug, Clone)]
struct Patient {
    id: String,
    class: usize,
    bpm: f64,
    centre: (f64, f64),
    radii: (f64, f64),
    wall: f64,
    gain: f64,
    shortening: f64,
}

/// Everything one clip needs to be rendered.
#[derive(Debug, Clone)]
struct Clip {
    patient: Patient,
    index: u32,
    bpm: f64,
    phase: f64,
    noise: f64,
    seed: u64,
}

fn plan(spec: &SynthSpec) -> (Vec<RateClass>, Vec<Clip>) {
    let classes = rate_classes(spec.classes);
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let (w, h) = (f64::from(spec.width), f64::from(spec.height));
    let mut clips = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        let (lo, hi) = class.bpm;
        for p in 0..spec.patients {
            let rx = rng.random_range(0.16..0.2) * w.min(h * 1.2);
            let patient = Patient {
                id: format!("s{}-c{c}-p{p:03}", spec.seed),
                class: c,
                bpm: rng.random_range(lo + 0.1 * (hi - lo)..hi - 0.1 * (hi - lo)),
                centre: (
                    rng.random_range(0.46..0.54) * w,
                    rng.random_range(0.5..0.56) * h,
                ),
                radii: (rx, rx * rng.random_range(1.3..1.7)),
                wall: rx * rng.random_range(0.3..0.4),
                gain: rng.random_range(0.9..1.05),
                shortening: rng.random_range(0.35..0.45),
            };
            for k in 0..spec.clips {
                clips.push(Clip {
                    bpm: (patient.bpm * rng.random_range(0.96..1.04)).clamp(lo, hi),
                    phase: rng.random_range(0.0..1.0),
                    noise: rng.random_range(0.01..0.03),
                    seed: rng.random(),
                    index: k,
                    patient: patient.clone(),
                });
            }
        }
    }
    (classes, clips)
}

/// How far the chamber has contracted (0 relaxed, 1 end-systole) at time `t`.
fn contraction(t: f64, bpm: f64, phase: f64) -> f64 {
    let rr = 60.0 / bpm;
    let systole = (0.36 * rr.sqrt()).min(0.5 * rr);
    let tau = ((t / rr + phase).fract()) * rr;
    if tau < systole {
        (PI * tau / systole).sin().powi(2)
    } else if tau > 0.85 * rr {
        // The atrial kick at the end of diastole: a small extra filling movement.
        0.12 * (PI * (tau - 0.85 * rr) / (0.15 * rr)).sin().powi(2)
    } else {
        0.0
    }
}

/// Render and encode one clip.
fn encode(spec: &SynthSpec, clip: &Clip, label: &str, path: &Path) -> anyhow::Result<()> {
    if spec.format == SynthFormat::Dicom {
        return write_dicom(spec, clip, label, path);
    }
    let mut writer = Mp4Writer::create(path, spec.width, spec.height, spec.fps, spec.fps * 2)?;
    render(spec, clip, &mut |luma| writer.push_gray(luma))?;
    writer.finish()
}

/// A `2.25` UID derived from the seed and `parts`: the same files for the same seed.
fn synthetic_uid(seed: u64, parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let n = u128::from_be_bytes(d[..16].try_into().expect("16 bytes"));
    format!("2.25.{n}")
}

/// One clip as a DICOM Ultrasound Multi-frame object with synthetic identity.
fn write_dicom(spec: &SynthSpec, clip: &Clip, label: &str, path: &Path) -> anyhow::Result<()> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    let mut pixels = Vec::new();
    let mut frames = 0u32;
    render(spec, clip, &mut |luma| {
        pixels.extend_from_slice(luma);
        frames += 1;
        Ok(())
    })?;
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    let p = &clip.patient.id;
    let index = clip.index.to_string();
    let study = synthetic_uid(spec.seed, &["study", p]);
    let series = synthetic_uid(spec.seed, &["series", p, &index]);
    let sop = synthetic_uid(spec.seed, &["sop", p, &index]);
    let mut obj = InMemDicomObject::new_empty();
    let text = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    for e in [
        text(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.3.1"),
        text(tags::SOP_INSTANCE_UID, VR::UI, &sop),
        text(tags::STUDY_INSTANCE_UID, VR::UI, &study),
        text(tags::SERIES_INSTANCE_UID, VR::UI, &series),
        text(tags::MODALITY, VR::CS, "US"),
        text(tags::PATIENT_ID, VR::LO, p),
        text(tags::PATIENT_NAME, VR::PN, &format!("Synthetic^{p}")),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, "19700101"),
        text(tags::PATIENT_SEX, VR::CS, "O"),
        text(tags::STUDY_DATE, VR::DA, "20260101"),
        text(tags::STUDY_ID, VR::SH, "1"),
        text(
            tags::ACCESSION_NUMBER,
            VR::SH,
            &format!("SYN{}", clip.seed % 1_000_000),
        ),
        text(tags::INSTITUTION_NAME, VR::LO, "vidtune synthetic clinic"),
        text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "Synthetic^Referrer"),
        text(tags::STUDY_DESCRIPTION, VR::LO, "Synthetic echocardiogram"),
        text(tags::SERIES_DESCRIPTION, VR::LO, label),
        text(tags::SERIES_NUMBER, VR::IS, &(clip.index + 1).to_string()),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        text(tags::NUMBER_OF_FRAMES, VR::IS, &frames.to_string()),
        text(
            tags::FRAME_TIME,
            VR::DS,
            &format!("{:.4}", 1000.0 / f64::from(spec.fps)),
        ),
        text(tags::CINE_RATE, VR::IS, &spec.fps.to_string()),
        us(tags::SAMPLES_PER_PIXEL, 1),
        us(tags::ROWS, spec.height as u16),
        us(tags::COLUMNS, spec.width as u16),
        us(tags::BITS_ALLOCATED, 8),
        us(tags::BITS_STORED, 8),
        us(tags::HIGH_BIT, 7),
        us(tags::PIXEL_REPRESENTATION, 0),
        DataElement::new(
            tags::FRAME_INCREMENT_POINTER,
            VR::AT,
            PrimitiveValue::from(tags::FRAME_TIME),
        ),
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels)),
    ] {
        obj.put(e);
    }
    let file = obj.with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))?;
    file.write_to_file(path)?;
    Ok(())
}

/// Render one clip: hands each grey frame (`width × height` bytes, row major) to `push`.
fn render(
    spec: &SynthSpec,
    clip: &Clip,
    push: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (w, h) = (spec.width as usize, spec.height as usize);
    let mut rng = StdRng::seed_from_u64(clip.seed);
    // Static speckle: exponential intensities (fully developed speckle), smoothed over 3×3 so
    // the grains span a few pixels like the point-spread function of a probe.
    let raw: Vec<f64> = (0..w * h)
        .map(|_| -(1.0 - rng.random::<f64>()).ln())
        .collect();
    let mut speckle = vec![0.0f64; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0.0;
            let mut n = 0.0;
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    s += raw[yy * w + xx];
                    n += 1.0;
                }
            }
            speckle[y * w + x] = s / n;
        }
    }
    // The sector: apex at the top centre, ±40°, reaching 95 % of the height.
    let (ax, ay) = (w as f64 / 2.0, 2.0);
    let reach = 0.95 * h as f64;
    let half_angle = 40f64.to_radians();
    let p = &clip.patient;

    let frames = (spec.seconds * f64::from(spec.fps)).round().max(1.0) as usize;
    let mut luma = vec![0u8; w * h];
    for f in 0..frames {
        let t = f as f64 / f64::from(spec.fps);
        let c = contraction(t, clip.bpm, clip.phase);
        let rx = p.radii.0 * (1.0 - p.shortening * c);
        let ry = p.radii.1 * (1.0 - 0.6 * p.shortening * c);
        // The wall keeps its mass, so it thickens as the chamber shrinks.
        let wall = p.wall * (1.0 + 0.8 * p.shortening * c);
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f64 - ax, y as f64 - ay);
                let r = (dx * dx + dy * dy).sqrt();
                let i = y * w + x;
                if r > reach || dx.atan2(dy).abs() > half_angle {
                    luma[i] = 0;
                    continue;
                }
                let (u, v) = ((x as f64 - p.centre.0) / rx, (y as f64 - p.centre.1) / ry);
                let d = (u * u + v * v).sqrt();
                let echo = if d < 1.0 {
                    0.05
                } else if (d - 1.0) * rx.min(ry) < wall {
                    0.85
                } else {
                    0.32
                };
                let depth = 1.0 - 0.45 * r / reach;
                let value =
                    p.gain * depth * echo * speckle[i] + clip.noise * (rng.random::<f64>() - 0.5);
                luma[i] = (value.clamp(0.0, 1.0) * 235.0) as u8;
            }
        }
        push(&luma)?;
    }
    Ok(())
}

/// A planned dataset: what each video will be, and how to render it.
pub struct Synth {
    spec: SynthSpec,
    clips: Vec<Clip>,
    /// In class, patient, clip order.
    pub videos: Vec<SynthVideo>,
}

impl Synth {
    pub fn new(spec: &SynthSpec) -> anyhow::Result<Self> {
        spec.validate()?;
        let (classes, clips) = plan(spec);
        let videos = clips
            .iter()
            .map(|clip| {
                let label = classes[clip.patient.class].label.clone();
                let id = &clip.patient.id;
                let path = match spec.format {
                    SynthFormat::Mp4 => format!("{label}/{id}_{}.mp4", clip.index),
                    // Named as PACS exports name files: not by the patient (the Patient ID is
                    // inside); `im-c<class>-p<patient>-<clip>`.
                    SynthFormat::Dicom => {
                        let short = id.split_once('-').map_or(id.as_str(), |(_, r)| r);
                        format!("{label}/im-{short}-{}.dcm", clip.index)
                    }
                };
                SynthVideo {
                    path,
                    label,
                    patient_id: clip.patient.id.clone(),
                    bpm: (clip.bpm * 10.0).round() / 10.0,
                }
            })
            .collect();
        Ok(Self {
            spec: spec.clone(),
            clips,
            videos,
        })
    }

    pub fn spec(&self) -> &SynthSpec {
        &self.spec
    }

    /// Render video `i`: each grey frame (`width × height` bytes) goes to `push`.
    pub fn render(
        &self,
        i: usize,
        push: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        render(&self.spec, &self.clips[i], push)
    }

    /// Run `each(i)` for every video, on every core; the first error wins.
    pub fn for_each_video(
        &self,
        each: impl Fn(usize) -> anyhow::Result<()> + Sync,
    ) -> anyhow::Result<()> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(self.videos.len()))
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= self.videos.len() {
                                return Ok(());
                            }
                            each(i)?;
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("synth thread panicked"))
        })
    }
}

/// Write the dataset as `<out>/<label>/<patient>_<clip>.mp4` plus `<out>/labels.csv`, encoding
/// on every core. Returns what was written, in class, patient, clip order.
pub fn write_folder(spec: &SynthSpec, out: &Path) -> anyhow::Result<Vec<SynthVideo>> {
    let synth = Synth::new(spec)?;
    for v in &synth.videos {
        let dir = out.join(&v.label);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    synth.for_each_video(|i| {
        let v = &synth.videos[i];
        let path = out.join(&v.path);
        encode(spec, &synth.clips[i], &v.label, &path)
            .with_context(|| format!("writing {}", path.display()))
    })?;
    let mut csv = csv::Writer::from_path(out.join("labels.csv"))?;
    if spec.format == SynthFormat::Dicom {
        // The patient is in each object's Patient ID.
        csv.write_record(["path", "label"])?;
        for v in &synth.videos {
            csv.write_record([&v.path, &v.label])?;
        }
    } else {
        csv.write_record(["path", "label", "patient_id"])?;
        for v in &synth.videos {
            csv.write_record([&v.path, &v.label, &v.patient_id])?;
        }
    }
    csv.flush()?;
    Ok(synth.videos)
}

/// Zip a folder written by [`write_folder`] (videos stored, not recompressed).
pub fn zip_folder(dir: &Path, videos: &[SynthVideo], zip_path: &Path) -> anyhow::Result<()> {
    use zip::write::SimpleFileOptions;
    let file = std::fs::File::create(zip_path)
        .with_context(|| format!("creating {}", zip_path.display()))?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let names =
        std::iter::once("labels.csv".to_string()).chain(videos.iter().map(|v| v.path.clone()));
    for name in names {
        z.start_file(name.as_str(), stored)?;
        z.write_all(&std::fs::read(dir.join(&name))?)?;
    }
    z.finish()?.flush()?;
    Ok(())
}

/// Write the dataset to `out`: a folder, or a `.zip` archive when the name ends in `.zip`.
pub fn write(spec: &SynthSpec, out: &Path) -> anyhow::Result<Vec<SynthVideo>> {
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
    {
        let staging = tempdir_next_to(out)?;
        let result = write_folder(spec, &staging)
            .and_then(|videos| zip_folder(&staging, &videos, out).map(|()| videos));
        let _ = std::fs::remove_dir_all(&staging);
        result
    } else {
        write_folder(spec, out)
    }
}

fn tempdir_next_to(file: &Path) -> anyhow::Result<PathBuf> {
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = parent.join(format!(".vidtune-synth-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_disjoint_bands() {
        for n in 2..=8 {
            let c = rate_classes(n);
            assert_eq!(c.len(), n as usize);
            for pair in c.windows(2) {
                assert!(pair[0].bpm.1 < pair[1].bpm.0, "{pair:?}");
            }
        }
    }

    #[test]
    fn slow_hearts_rest_and_fast_hearts_do_not() {
        // Share of time the chamber is moving, over 6 s sampled at 1 kHz.
        let moving = |bpm: f64| {
            (0..6000)
                .filter(|&i| contraction(i as f64 / 1000.0, bpm, 0.3) > 0.01)
                .count() as f64
                / 6000.0
        };
        let (brady, normal, tachy) = (moving(44.0), moving(76.0), moving(140.0));
        assert!(brady < normal && normal < tachy, "{brady} {normal} {tachy}");
        assert!(tachy > 0.55 && brady < 0.45, "{brady} {tachy}");
    }

    #[test]
    fn same_seed_same_plan_and_patients_keep_their_class() {
        let spec = SynthSpec::default();
        let (_, a) = plan(&spec);
        let (_, b) = plan(&spec);
        assert_eq!(a.len(), 3 * 8 * 2);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.bpm, x.seed), (y.bpm, y.seed));
        }
        let classes = rate_classes(3);
        for clip in &a {
            let (lo, hi) = classes[clip.patient.class].bpm;
            assert!((lo..=hi).contains(&clip.bpm));
        }
    }

    #[test]
    fn written_videos_decode_with_their_length_and_labels_csv_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            classes: 2,
            patients: 1,
            clips: 2,
            seconds: 2.0,
            width: 64,
            height: 48,
            fps: 30,
            seed: 3,
            format: SynthFormat::Mp4,
        };
        let videos = write_folder(&spec, dir.path()).unwrap();
        assert_eq!(videos.len(), 4);
        let csv = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
        assert_eq!(csv.lines().count(), 5);
        for v in &videos {
            assert!(csv.contains(&format!("{},{},{}", v.path, v.label, v.patient_id)));
            let cache = dir.path().join("cache.bin");
            let info = crate::media::decode::ingest_video(
                &dir.path().join(&v.path),
                &cache,
                &crate::media::decode::CacheSpec::default(),
                &crate::media::decode::Limits::default(),
            )
            .unwrap();
            assert_eq!((info.width, info.height), (64, 48));
            assert!((info.duration_s - 2.0).abs() < 0.05, "{info:?}");
        }
        // Patients keep their clips in one class, and the two clips differ.
        assert_eq!(videos[0].patient_id, videos[1].patient_id);
        let (a, b) = (
            std::fs::read(dir.path().join(&videos[0].path)).unwrap(),
            std::fs::read(dir.path().join(&videos[1].path)).unwrap(),
        );
        assert_ne!(a, b);
    }

    #[test]
    fn dicom_loops_carry_their_patient_class_and_timing_and_decode_like_the_mp4s() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            classes: 2,
            patients: 2,
            clips: 1,
            seconds: 1.0,
            width: 64,
            height: 48,
            fps: 20,
            seed: 3,
            format: SynthFormat::Dicom,
        };
        let videos = write_folder(&spec, dir.path()).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
        assert!(csv.starts_with("path,label\n"), "{csv}");
        let key = "00112233445566778899aabbccddeeff";
        let keys = crate::media::dicom::Pseudonyms::from_hex(key).unwrap();
        for v in &videos {
            assert!(v.path.ends_with(".dcm"), "{}", v.path);
            let job = crate::media::dicom::DicomJob {
                deid_key: Some(key.into()),
                label_attribute: Some("SeriesDescription".into()),
                ..Default::default()
            };
            let info = crate::media::decode::ingest_any(
                &dir.path().join(&v.path),
                &dir.path().join("cache.bin"),
                &crate::media::decode::CacheSpec::default(),
                &crate::media::decode::Limits::default(),
                &job,
            )
            .unwrap();
            assert_eq!((info.width, info.height, info.frames), (64, 48, 20));
            assert!((info.fps - 20.0).abs() < 1e-6, "{info:?}");
            let d = info.dicom.unwrap();
            assert_eq!(d.label.as_deref(), Some(v.label.as_str()));
            assert_eq!(d.patient, Some(keys.patient(&v.patient_id)));
            assert!(d.removed.iter().any(|k| k == "PatientName"), "{d:?}");
        }
    }
}
