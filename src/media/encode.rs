//! Write H.264 MP4 files with FFmpeg's libraries (libx264), for the synthetic datasets.
//!
//! Frames are given as 8-bit luma planes (ultrasound is grey), so the chroma planes are constant.
use std::path::Path;

use anyhow::{Context, anyhow};
use ffmpeg_next as ff;

/// An open MP4 being written one grey frame at a time.
pub struct Mp4Writer {
    octx: ff::format::context::Output,
    encoder: ff::encoder::Video,
    frame: ff::frame::Video,
    enc_tb: ff::Rational,
    stream_tb: ff::Rational,
    next_pts: i64,
    width: usize,
    height: usize,
}

impl Mp4Writer {
    /// `width` and `height` must be even (4:2:0 chroma); `gop` is the keyframe interval in frames.
    pub fn create(
        path: &Path,
        width: u32,
        height: u32,
        fps: u32,
        gop: u32,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            width >= 16 && height >= 16 && width.is_multiple_of(2) && height.is_multiple_of(2),
            "frame size must be even and at least 16×16, not {width}×{height}"
        );
        ff::init().context("initialising FFmpeg")?;
        // libx264 reports its settings and statistics at info level; keep stderr for errors.
        ff::util::log::set_level(ff::util::log::Level::Error);
        let mut octx = ff::format::output_as(path, "mp4")
            .with_context(|| format!("creating {}", path.display()))?;
        let codec = ff::encoder::find_by_name("libx264")
            .or_else(|| ff::encoder::find(ff::codec::Id::H264))
            .ok_or_else(|| anyhow!("this FFmpeg has no H.264 encoder (libx264)"))?;
        let global_header = octx
            .format()
            .flags()
            .contains(ff::format::Flags::GLOBAL_HEADER);
        let mut encoder = ff::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()?;
        let enc_tb = ff::Rational(1, fps as i32);
        encoder.set_width(width);
        encoder.set_height(height);
        encoder.set_format(ff::format::Pixel::YUV420P);
        encoder.set_time_base(enc_tb);
        encoder.set_frame_rate(Some(ff::Rational(fps as i32, 1)));
        encoder.set_gop(gop);
        if global_header {
            encoder.set_flags(ff::codec::Flags::GLOBAL_HEADER);
        }
        let mut opts = ff::Dictionary::new();
        opts.set("preset", "veryfast");
        opts.set("crf", "20");
        // One encoder thread: many files are written in parallel instead.
        opts.set("threads", "1");
        let encoder = encoder
            .open_as_with(codec, opts)
            .context("opening the H.264 encoder")?;
        {
            let mut ost = octx.add_stream(codec)?;
            ost.set_parameters(&encoder);
            ost.set_time_base(enc_tb);
        }
        octx.write_header().context("writing the MP4 header")?;
        let stream_tb = octx.stream(0).expect("added above").time_base();
        let mut frame = ff::frame::Video::new(ff::format::Pixel::YUV420P, width, height);
        for plane in 1..3 {
            frame.data_mut(plane).fill(128);
        }
        Ok(Self {
            octx,
            encoder,
            frame,
            enc_tb,
            stream_tb,
            next_pts: 0,
            width: width as usize,
            height: height as usize,
        })
    }

    /// Append one frame given as `width × height` luma bytes, row-major.
    pub fn push_gray(&mut self, luma: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            luma.len() == self.width * self.height,
            "frame has {} bytes, expected {}",
            luma.len(),
            self.width * self.height
        );
        let stride = self.frame.stride(0);
        let plane = self.frame.data_mut(0);
        for (y, row) in luma.chunks_exact(self.width).enumerate() {
            plane[y * stride..y * stride + self.width].copy_from_slice(row);
        }
        self.frame.set_pts(Some(self.next_pts));
        self.next_pts += 1;
        self.encoder.send_frame(&self.frame)?;
        self.drain()
    }

    /// Flush the encoder and write the MP4 index.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.encoder.send_eof()?;
        self.drain()?;
        self.octx
            .write_trailer()
            .context("writing the MP4 trailer")?;
        Ok(())
    }

    fn drain(&mut self) -> anyhow::Result<()> {
        let mut packet = ff::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            packet.rescale_ts(self.enc_tb, self.stream_tb);
            packet.write_interleaved(&mut self.octx)?;
        }
        Ok(())
    }
}
