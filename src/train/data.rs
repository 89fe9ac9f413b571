//! Clips from the training cache: which frames and which crop each clip uses (decided on the
//! training thread from the epoch's seeded RNG, so runs and resumes are reproducible), background
//! threads that read the bytes ahead of the model, and the tensor transform.
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use rand::{Rng, RngExt};
use tch::{Device, Kind, Tensor};

use crate::backbone::{Preprocessing, Sampling};
use crate::media::cache::CacheReader;

/// One accepted video of the dataset.
#[derive(Debug, Clone)]
pub struct Item {
    pub cache: PathBuf,
    pub frames: u32,
    pub label: usize,
}

/// How clips are cut.
#[derive(Debug, Clone)]
pub struct ClipSpec {
    pub frames: u32,
    pub stride: u32,
    pub sampling: Sampling,
    /// Short side after resizing, before cropping.
    pub short_side: i64,
    pub crop: i64,
    pub crop_scale: [f64; 2],
    pub flip: bool,
}

impl ClipSpec {
    /// Clips of `prep`'s size taking every `stride`-th frame, without augmentation: what
    /// evaluation and serving cut, and what training cuts before its crop jitter and flips.
    pub fn new(prep: &Preprocessing, stride: u32) -> Self {
        Self {
            frames: prep.frames as u32,
            stride: stride.max(1),
            sampling: prep.sampling,
            short_side: prep.resize[0].max(prep.crop),
            crop: prep.crop,
            crop_scale: [1.0, 1.0],
            flip: false,
        }
    }
}

/// One clip to load: the video, its frame indices and where to crop.
#[derive(Debug, Clone)]
pub struct Plan {
    pub item: usize,
    pub indices: Vec<u32>,
    /// Crop window as fractions of the resized frame: y, x, height, width.
    pub window: [f64; 4],
    pub flip: bool,
}

fn consecutive(total: u32, spec: &ClipSpec, start: impl FnOnce(u32) -> u32) -> Vec<u32> {
    let span = (spec.frames - 1) * spec.stride + 1;
    let first = if total >= span {
        start(total - span)
    } else {
        0
    };
    (0..spec.frames)
        .map(|j| (first + j * spec.stride).min(total.saturating_sub(1)))
        .collect()
}

fn segments(total: u32, frames: u32, offset: impl Fn(u32, f64) -> f64) -> Vec<u32> {
    let seg = total as f64 / frames as f64;
    (0..frames)
        .map(|j| ((j as f64 * seg + offset(j, seg)).floor() as u32).min(total.saturating_sub(1)))
        .collect()
}

/// A training clip: random position in time and space, optional flip.
pub fn train_plan(
    rng: &mut impl Rng,
    item: usize,
    total: u32,
    spec: &ClipSpec,
    frame_hw: (i64, i64),
) -> Plan {
    let indices = match spec.sampling {
        Sampling::Consecutive => consecutive(total, spec, |room| rng.random_range(0..=room)),
        Sampling::Segments => {
            let offs: Vec<f64> = (0..spec.frames).map(|_| rng.random::<f64>()).collect();
            segments(total, spec.frames, |j, seg| offs[j as usize] * seg)
        }
    };
    let (h, w) = resized(frame_hw, spec.short_side);
    let (ch, cw) = if spec.crop_scale == [1.0, 1.0] {
        (spec.crop.min(h) as f64, spec.crop.min(w) as f64)
    } else {
        let area = rng.random_range(spec.crop_scale[0]..=spec.crop_scale[1]) * (h * w) as f64;
        let side = area.sqrt().min(h.min(w) as f64);
        (side, side)
    };
    let y = rng.random::<f64>() * (h as f64 - ch);
    let x = rng.random::<f64>() * (w as f64 - cw);
    let flip = spec.flip && rng.random::<bool>();
    Plan {
        item,
        indices,
        window: [y / h as f64, x / w as f64, ch / h as f64, cw / w as f64],
        flip,
    }
}

/// Evaluation clip `clip` of `clips`: evenly spaced in time, centre crop, no flip.
pub fn eval_plan(
    item: usize,
    total: u32,
    spec: &ClipSpec,
    frame_hw: (i64, i64),
    clip: u32,
    clips: u32,
) -> Plan {
    let indices = match spec.sampling {
        Sampling::Consecutive => consecutive(total, spec, |room| {
            if clips <= 1 {
                room / 2
            } else {
                ((clip as f64) * room as f64 / (clips - 1) as f64).round() as u32
            }
        }),
        Sampling::Segments => segments(total, spec.frames, |_, seg| {
            seg * (clip as f64 + 0.5) / clips as f64
        }),
    };
    let (h, w) = resized(frame_hw, spec.short_side);
    let (ch, cw) = (spec.crop.min(h) as f64, spec.crop.min(w) as f64);
    Plan {
        item,
        indices,
        window: [
            (h as f64 - ch) / 2.0 / h as f64,
            (w as f64 - cw) / 2.0 / w as f64,
            ch / h as f64,
            cw / w as f64,
        ],
        flip: false,
    }
}

/// Frame size after resizing the short side to `short`.
pub fn resized((h, w): (i64, i64), short: i64) -> (i64, i64) {
    if h <= w {
        (short, ((w as f64) * short as f64 / h as f64).round() as i64)
    } else {
        (((h as f64) * short as f64 / w as f64).round() as i64, short)
    }
}

/// Frames of one clip as read from the cache: `[T, H, W, 3]` uint8.
pub struct RawClip {
    /// The frames, unless a loader for a CUDA device staged them in `pinned` instead.
    pub data: Vec<u8>,
    pub frames: i64,
    pub height: i64,
    pub width: i64,
    /// The frames as a `[T, H, W, 3]` uint8 tensor in page-locked host memory, which
    /// [`to_batch`] copies to the device without blocking the training thread.
    pub pinned: Option<Tensor>,
}

/// Reads batches on background threads, `depth` batches ahead, delivered in order.
pub struct Loader {
    receivers: Vec<Receiver<anyhow::Result<Vec<RawClip>>>>,
    next: usize,
    total: usize,
}

impl Loader {
    pub fn start(
        items: Arc<Vec<Item>>,
        batches: Vec<Vec<Plan>>,
        threads: usize,
        depth: usize,
    ) -> Self {
        Self::start_for(Device::Cpu, items, batches, threads, depth)
    }

    /// As [`Loader::start`], for batches that go to `device`: for a CUDA device the loader
    /// threads stage each clip in pinned host memory, so that the copy to the device neither
    /// waits for the training thread nor makes it wait.
    pub fn start_for(
        device: Device,
        items: Arc<Vec<Item>>,
        batches: Vec<Vec<Plan>>,
        threads: usize,
        depth: usize,
    ) -> Self {
        let pin = device.is_cuda().then_some(device);
        let threads = threads.clamp(1, batches.len().max(1));
        let total = batches.len();
        let mut per_thread: Vec<Vec<(usize, Vec<Plan>)>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, b) in batches.into_iter().enumerate() {
            per_thread[i % threads].push((i, b));
        }
        let mut receivers = Vec::with_capacity(threads);
        for work in per_thread {
            let (tx, rx): (SyncSender<_>, _) = sync_channel(depth.max(1));
            let items = items.clone();
            std::thread::spawn(move || {
                for (_, plans) in work {
                    let batch = plans
                        .iter()
                        .map(|p| read_clip(&items[p.item], &p.indices, pin))
                        .collect();
                    if tx.send(batch).is_err() {
                        return; // the consumer stopped (cancel, error)
                    }
                }
            });
            receivers.push(rx);
        }
        Self {
            receivers,
            next: 0,
            total,
        }
    }
}

impl Iterator for Loader {
    type Item = anyhow::Result<Vec<RawClip>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(
            rx.recv()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a loader thread died"))),
        )
    }
}

fn read_clip(item: &Item, indices: &[u32], pin: Option<Device>) -> anyhow::Result<RawClip> {
    let mut reader = CacheReader::open(&item.cache)?;
    let mut data = Vec::new();
    reader.read_frames(indices, &mut data)?;
    let (frames, height, width) = (
        indices.len() as i64,
        reader.header.height as i64,
        reader.header.width as i64,
    );
    let pinned = match pin {
        Some(device) => {
            let t = Tensor::f_from_data_size(&data, &[frames, height, width, 3], Kind::Uint8)?;
            match t.f_pin_memory(device) {
                Ok(p) => {
                    data = Vec::new();
                    Some(p)
                }
                // Page-locked memory is a speed-up, not a need: the clip goes as it is.
                Err(e) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        eprintln!(
                            "warning: no pinned host memory ({e}); clips are copied synchronously"
                        )
                    });
                    None
                }
            }
        }
        None => None,
    };
    Ok(RawClip {
        data,
        frames,
        height,
        width,
        pinned,
    })
}

/// Turn raw clips into the model's input `[N, 3, T, crop, crop]` on `device`.
///
/// On a CUDA device the uint8 frames are copied over as they are (asynchronously from pinned
/// memory) and cut there; when no resizing is needed (the cache already has the short side the
/// model wants, and the crop has the model's size) crop and flip stay in uint8, so the only
/// float work is the normalisation of the finished batch.
pub fn to_batch(
    clips: &[RawClip],
    plans: &[Plan],
    spec: &ClipSpec,
    prep: &Preprocessing,
    device: tch::Device,
) -> Tensor {
    if device.is_cuda() {
        return to_batch_on(clips, plans, spec, prep, device);
    }
    let tensors: Vec<Tensor> = clips
        .iter()
        .zip(plans)
        .map(|(c, p)| {
            let x = Tensor::from_data_size(&c.data, &[c.frames, c.height, c.width, 3], Kind::Uint8)
                .to_device(device)
                .permute([0, 3, 1, 2])
                .to_kind(Kind::Float); // [T, 3, H, W]
            let (h, w) = resized((c.height, c.width), spec.short_side);
            let x = if (h, w) != (c.height, c.width) {
                x.upsample_bilinear2d([h, w], false, None, None)
            } else {
                x
            };
            let [fy, fx, fh, fw] = p.window;
            let (y0, x0) = (
                (fy * h as f64).round() as i64,
                (fx * w as f64).round() as i64,
            );
            let (ch, cw) = (
                ((fh * h as f64).round() as i64).max(1),
                ((fw * w as f64).round() as i64).max(1),
            );
            let x = x
                .narrow(2, y0.min(h - ch), ch)
                .narrow(3, x0.min(w - cw), cw);
            let x = if (ch, cw) != (spec.crop, spec.crop) {
                x.upsample_bilinear2d([spec.crop, spec.crop], false, None, None)
            } else {
                x
            };
            let x = if p.flip { x.flip([3]) } else { x };
            x.permute([0, 2, 3, 1]) // [T, H, W, 3] for the shared normalisation
        })
        .collect();
    let stacked = Tensor::stack(&tensors, 0); // [N, T, H, W, 3] float in 0..255
    prep.normalise(&stacked)
}

/// The crop window of `p` in a frame resized to `(h, w)`: top, left, height, width in pixels.
fn window_px(p: &Plan, (h, w): (i64, i64)) -> (i64, i64, i64, i64) {
    let [fy, fx, fh, fw] = p.window;
    let (ch, cw) = (
        ((fh * h as f64).round() as i64).max(1),
        ((fw * w as f64).round() as i64).max(1),
    );
    let (y0, x0) = (
        (fy * h as f64).round() as i64,
        (fx * w as f64).round() as i64,
    );
    (y0.min(h - ch), x0.min(w - cw), ch, cw)
}

/// [`to_batch`] on a CUDA device: the same clips, cut on the device.
fn to_batch_on(
    clips: &[RawClip],
    plans: &[Plan],
    spec: &ClipSpec,
    prep: &Preprocessing,
    device: tch::Device,
) -> Tensor {
    let tensors: Vec<Tensor> = clips
        .iter()
        .zip(plans)
        .map(|(c, p)| {
            let host = match &c.pinned {
                Some(t) => t.shallow_clone(),
                None => {
                    Tensor::from_data_size(&c.data, &[c.frames, c.height, c.width, 3], Kind::Uint8)
                }
            };
            // From pinned memory this copy is queued on the stream and returns at once.
            let x = host.to_device_(device, Kind::Uint8, true, false); // [T, H, W, 3] uint8
            let (h, w) = resized((c.height, c.width), spec.short_side);
            let (y0, x0, ch, cw) = window_px(p, (h, w));
            if (h, w) == (c.height, c.width) && (ch, cw) == (spec.crop, spec.crop) {
                let x = x.narrow(1, y0, ch).narrow(2, x0, cw);
                return if p.flip { x.flip([2]) } else { x };
            }
            // Resizing interpolates: in float, in the order of the CPU path.
            let x = x.permute([0, 3, 1, 2]).to_kind(Kind::Float); // [T, 3, H, W]
            let x = if (h, w) != (c.height, c.width) {
                x.upsample_bilinear2d([h, w], false, None, None)
            } else {
                x
            };
            let x = x.narrow(2, y0, ch).narrow(3, x0, cw);
            let x = if (ch, cw) != (spec.crop, spec.crop) {
                x.upsample_bilinear2d([spec.crop, spec.crop], false, None, None)
            } else {
                x
            };
            let x = if p.flip { x.flip([3]) } else { x };
            x.permute([0, 2, 3, 1])
        })
        .collect();
    // Clips cut in uint8 and clips resized in float differ in kind: one kind for the stack.
    let kind = if tensors.iter().all(|t| t.kind() == Kind::Uint8) {
        Kind::Uint8
    } else {
        Kind::Float
    };
    let tensors: Vec<Tensor> = tensors.into_iter().map(|t| t.to_kind(kind)).collect();
    prep.normalise(&Tensor::stack(&tensors, 0)) // [N, T, H, W, 3] in 0..255
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn spec(sampling: Sampling) -> ClipSpec {
        ClipSpec {
            frames: 4,
            stride: 2,
            sampling,
            short_side: 128,
            crop: 112,
            crop_scale: [1.0, 1.0],
            flip: false,
        }
    }

    #[test]
    fn clips_stay_inside_the_video_and_short_videos_repeat_the_last_frame() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let p = train_plan(&mut rng, 0, 20, &spec(Sampling::Consecutive), (128, 171));
            assert!(p.indices.iter().all(|&i| i < 20));
            assert!(p.indices.windows(2).all(|w| w[1] == w[0] + 2));
        }
        let p = eval_plan(0, 3, &spec(Sampling::Consecutive), (128, 171), 0, 1);
        assert_eq!(p.indices, [0, 2, 2, 2]);
        let first = eval_plan(0, 40, &spec(Sampling::Consecutive), (128, 171), 0, 3);
        let last = eval_plan(0, 40, &spec(Sampling::Consecutive), (128, 171), 2, 3);
        assert_eq!(first.indices[0], 0);
        assert_eq!(*last.indices.last().unwrap(), 39);
        let seg = eval_plan(0, 40, &spec(Sampling::Segments), (128, 171), 0, 1);
        assert_eq!(seg.indices, [5, 15, 25, 35]);
    }

    #[test]
    fn the_same_seed_plans_the_same_clips() {
        let plan = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            train_plan(&mut rng, 0, 100, &spec(Sampling::Consecutive), (128, 171))
        };
        assert_eq!(plan(7).indices, plan(7).indices);
        assert_eq!(plan(7).window, plan(7).window);
    }

    /// A clip of 6 frames, 10 × 14, whose bytes all differ.
    fn clip() -> RawClip {
        let (t, h, w) = (6, 10, 14);
        RawClip {
            data: (0..t * h * w * 3).map(|i| (i * 7 % 251) as u8).collect(),
            frames: t,
            height: h,
            width: w,
            pinned: None,
        }
    }

    #[test]
    fn clips_cut_in_uint8_equal_clips_cut_in_float() {
        // What a CUDA device runs, here on the CPU: crops and flips without resizing stay in
        // uint8, the rest goes the float way; both give the CPU path's batch exactly.
        let prep = crate::backbone::Arch::R3d18.preprocessing();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (short_side, crop, crop_scale) in [
            (10, 8, [1.0, 1.0]),
            (10, 8, [0.4, 0.9]),
            (12, 8, [1.0, 1.0]),
        ] {
            let spec = ClipSpec {
                frames: 4,
                stride: 1,
                sampling: Sampling::Consecutive,
                short_side,
                crop,
                crop_scale,
                flip: true,
            };
            let plans: Vec<Plan> = (0..6)
                .map(|_| train_plan(&mut rng, 0, 6, &spec, (10, 14)))
                .collect();
            assert!(plans.iter().any(|p| p.flip) && plans.iter().any(|p| !p.flip));
            let clips: Vec<RawClip> = plans.iter().map(|_| clip()).collect();
            let cpu = to_batch(&clips, &plans, &spec, &prep, Device::Cpu);
            let cut = to_batch_on(&clips, &plans, &spec, &prep, Device::Cpu);
            assert_eq!(cpu.size(), [6, 3, 6, 8, 8]);
            assert!(
                cpu.equal(&cut),
                "short side {short_side}, crop scale {crop_scale:?}"
            );
        }
    }
}
