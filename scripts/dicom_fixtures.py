#!/usr/bin/env python3
"""Writes small multi-frame DICOM Part-10 test files and OUTDIR/manifest.json.

    python scripts/dicom_fixtures.py OUTDIR [--only NAME,...] [--patients N] [--seed S]
                                            [--no-verify] [--list]

Run it with the venv's python ($VIDTUNE_TORCH_VENV/bin/python: pydicom, numpy, Pillow; scripts/setup
installs them); the video fixtures need the `ffmpeg` CLI (libx264, mpeg2video) and verification
`ffprobe`.

Every fixture is a cine of FRAMES frames, COLS x ROWS pixels: the left half is one flat colour whose
expected RGB after a correct decode (photometric conversion, palette, VOI window, inversion) is
`left_rgb` in the manifest (compare the mean over `sample_region`, within `left_rgb_tolerance` per
channel); the right half is black with a white vertical bar moving `rightward` or `leftward` (the
manifest's `label`, alternating over fixtures so that a set of them can train a 2-class model).

Patient/study attributes hold obvious fake PHI (PatientName Doe^Jane^Fixture, PatientID
PID-FIXTURE-0001, ...) listed per fixture in `phi`, so that a de-identification test can grep for
them; a private element repeats the patient name. Fixtures are spread round-robin over --patients
patients; each patient has one study, each fixture is one series in it.

UIDs are pydicom.uid.generate_uid values derived from --seed (default "vidtune"), so a rerun writes
the same UIDs; --seed random draws fresh ones. The script verifies what it wrote (pydicom re-read and
pixel decode where pydicom can, ffmpeg decode of the video streams) unless --no-verify.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

try:
    import numpy as np
    from PIL import Image
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, generate_uid
except ImportError as _e:  # pragma: no cover
    sys.exit(f"{_e}: run this with $VIDTUNE_TORCH_VENV/bin/python (scripts/setup installs pydicom)")

ROWS, COLS, FRAMES = 64, 96, 16
HALF = COLS // 2
BAR_W, BAR_STEP = 8, 2
FPS = 25.0
# Where to average the left colour: inside the left half and inside the us_regions region, away from
# the edges (lossy codecs bleed across the half boundary). [x0, y0, x1, y1), x = column.
SAMPLE_REGION = [12, 20, 40, 52]
LEFT_RGB = (200, 80, 40)  # colour fixtures
LEFT_GRAY = 160  # 8-bit grey fixtures
FRAGMENT_SIZE = 512  # for the fragmentable H.264 fixture

TS = {
    "explicit_le": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_baseline": "1.2.840.10008.1.2.4.50",
    "mpeg2_mpml": "1.2.840.10008.1.2.4.100",
    "h264_hp41": "1.2.840.10008.1.2.4.102",
    "h264_hp41_fragmentable": "1.2.840.10008.1.2.4.102.1",
}
SOP = {
    "us_mf": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "us": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage (single frame)
    "sc_mf_byte": "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "sc_mf_word": "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "vl_endo_video": "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image Storage
}
MODALITY = {"us_mf": "US", "us": "US", "sc_mf_byte": "OT", "sc_mf_word": "OT", "vl_endo_video": "ES"}

PATIENTS = [
    ("PID-FIXTURE-0001", "Doe^Jane^Fixture", "19700101", "F"),
    ("PID-FIXTURE-0002", "Roe^Richard^Fixture", "19800202", "M"),
    ("PID-FIXTURE-0003", "Poe^Edgar^Fixture", "19900303", "M"),
    ("PID-FIXTURE-0004", "Moe^Mary^Fixture", "20000404", "F"),
]


# ---------------------------------------------------------------------------------------------
# Frames


def rgb_frames(direction: str, left=LEFT_RGB, bar=(255, 255, 255)) -> np.ndarray:
    """(FRAMES, ROWS, COLS, 3) uint8: left half `left`, right half black with a moving bar."""
    a = np.zeros((FRAMES, ROWS, COLS, 3), np.uint8)
    a[:, :, :HALF] = left
    for f, x in enumerate(bar_positions(direction)):
        a[f, :, x : x + BAR_W] = bar
    return a


def bar_positions(direction: str) -> list[int]:
    lo, hi = HALF + 4, COLS - 4 - BAR_W  # travel (FRAMES-1)*BAR_STEP = 30 <= hi - lo = 36
    if direction == "rightward":
        return [lo + f * BAR_STEP for f in range(FRAMES)]
    return [hi - f * BAR_STEP for f in range(FRAMES)]


def gray_frames(direction: str, left: int, bg: int, bar: int, dtype=np.uint8) -> np.ndarray:
    a = np.full((FRAMES, ROWS, COLS), bg, dtype)
    a[:, :, :HALF] = left
    for f, x in enumerate(bar_positions(direction)):
        a[f, :, x : x + BAR_W] = bar
    return a


def rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    """PS3.3 C.7.6.3.1.2 YBR_FULL (full range, BT.601 coefficients)."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.2990 * r + 0.5870 * g + 0.1140 * b
    cb = -0.1687 * r - 0.3313 * g + 0.5000 * b + 128
    cr = 0.5000 * r - 0.4187 * g - 0.0813 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


def ybr_full_422_bytes(rgb: np.ndarray) -> bytes:
    """Native YBR_FULL_422: per horizontal pixel pair Y1 Y2 Cb Cr (chroma = mean of the pair)."""
    ybr = rgb_to_ybr_full(rgb).astype(np.uint16)
    f, h, w, _ = ybr.shape
    pairs = ybr.reshape(f, h, w // 2, 2, 3)
    out = np.empty((f, h, w // 2, 4), np.uint8)
    out[..., 0] = pairs[..., 0, 0]
    out[..., 1] = pairs[..., 1, 0]
    out[..., 2] = (pairs[..., 0, 1] + pairs[..., 1, 1] + 1) // 2
    out[..., 3] = (pairs[..., 0, 2] + pairs[..., 1, 2] + 1) // 2
    return out.tobytes()


def burn_in_text(a: np.ndarray, region) -> None:
    """Bright glyph-like blocks outside the ultrasound region (top band and right margin)."""
    x0, y0, x1, y1 = region
    rng = random.Random(7)
    for gx in range(2, COLS - 4, 5):  # a "line of text" in the band above the region
        for gy in range(2, y0 - 2):
            for dx in range(4):
                if rng.random() < 0.55:
                    a[:, gy, gx + dx] = 255
    a[:, y0 + 4 : y1 - 4 : 3, x1 + 2 : COLS - 1] = 255  # a "scale" right of the region


# ---------------------------------------------------------------------------------------------
# Datasets


class Ctx:
    def __init__(self, seed: str, patients: int):
        self.seed = seed
        self.patients = PATIENTS[:patients]
        self.rnd = random.Random(seed)

    def uid(self, *parts) -> UID:
        if self.seed == "random":
            return generate_uid()
        return generate_uid(entropy_srcs=[self.seed, *map(str, parts)])

    def patient(self, i: int) -> dict:
        pid, name, birth, sex = self.patients[i % len(self.patients)]
        n = int(pid[-4:])
        return {
            "index": i % len(self.patients),
            "patient_id": pid,
            "patient_name": name,
            "birth_date": birth,
            "sex": sex,
            "accession_number": f"ACC-FIXTURE-{n:04d}",
            "study_id": f"STUDY-FIX-{n:04d}",
            "other_patient_id": f"MRN-FIXTURE-{n:04d}",
            "study_uid": self.uid("study", pid),
        }


def base_dataset(ctx: Ctx, p: dict, name: str, sop_key: str, series_no: int, instance_no=1,
                 series_uid=None, sop_uid=None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SOP[sop_key]
    ds.SOPInstanceUID = sop_uid or ctx.uid("sop", name, instance_no)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = f"1016{series_no % 60:02d}"
    ds.AcquisitionDateTime = f"20240102101600.{series_no:06d}"
    ds.AccessionNumber = p["accession_number"]
    ds.Modality = MODALITY[sop_key]
    ds.Manufacturer = "Vidtune Fixture Devices"
    ds.InstitutionName = "Fixture General Hospital"
    ds.InstitutionAddress = "1 Fixture Street, Testville"
    ds.InstitutionalDepartmentName = "Fixture Cardiology"
    ds.StationName = "FIXTURE-STN-01"
    ds.ReferringPhysicianName = "Referrer^Robert^Fixture"
    ds.PerformingPhysicianName = "Performer^Paula^Fixture"
    ds.OperatorsName = "Operator^Otto^Fixture"
    ds.StudyDescription = "Fixture echo study"
    ds.SeriesDescription = f"fixture {name}"
    ds.PatientName = p["patient_name"]
    ds.PatientID = p["patient_id"]
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = p["other_patient_id"]
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    ds.PatientBirthDate = p["birth_date"]
    ds.PatientSex = p["sex"]
    ds.PatientAge = "054Y"
    ds.PatientAddress = "42 Fixture Lane, Testville"
    ds.PatientTelephoneNumbers = "+1-555-0100"
    ds.DeviceSerialNumber = "SN-FIXTURE-0001"
    ds.StudyInstanceUID = p["study_uid"]
    ds.SeriesInstanceUID = series_uid or ctx.uid("series", name)
    ds.StudyID = p["study_id"]
    ds.SeriesNumber = series_no
    ds.InstanceNumber = instance_no
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # A private element carrying PHI (de-identification should drop private groups).
    block = ds.private_block(0x0009, "VIDTUNE FIXTURE", create=True)
    block.add_new(0x01, "LO", p["patient_name"])
    return ds


def set_pixels(ds: Dataset, *, photometric, spp, bits=8, stored=None, planar=None, frames=FRAMES,
               signed=False):
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = photometric
    if spp > 1:
        ds.PlanarConfiguration = 0 if planar is None else planar
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames is not None:
        ds.NumberOfFrames = frames


def set_timing(ds: Dataset, timing: str, fps=FPS) -> dict:
    """Writes the timing attributes; returns {cine_rate, frame_time, frame_time_vector} as written."""
    out = {"cine_rate": None, "frame_time": None, "frame_time_vector": None}
    ft = round(1000.0 / fps, 3)
    if timing in ("both", "frame_time"):
        ds.FrameTime = ft
        ds.FrameIncrementPointer = 0x00181063
        out["frame_time"] = ft
    if timing in ("both", "cine_rate"):
        ds.CineRate = int(round(fps))
        out["cine_rate"] = int(round(fps))
    if timing == "frame_time_vector":
        # PS3.3 C.7.6.5.1.2: the first value is 0 (no increment before the first frame).
        vec = [0.0] + [ft] * (FRAMES - 1)
        ds.FrameTimeVector = vec
        ds.FrameIncrementPointer = 0x00181065
        out["frame_time_vector"] = vec
    return out


def save(ds: Dataset, path: str, ts: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationVersionName = "VIDTUNE_FIXT_1"
    ds.file_meta = meta
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def set_encapsulated(ds: Dataset, value: bytes) -> None:
    ds.PixelData = value
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def encapsulate_fragments(stream: bytes, size: int) -> tuple[bytes, int]:
    """Empty Basic Offset Table, then `stream` cut into items of at most `size` bytes (even)."""
    if len(stream) % 2:
        stream += b"\x00"
    out = bytearray(b"\xfe\xff\x00\xe0\x00\x00\x00\x00")
    n = 0
    for i in range(0, len(stream), size):
        chunk = stream[i : i + size]
        out += b"\xfe\xff\x00\xe0" + len(chunk).to_bytes(4, "little") + chunk
        n += 1
    return bytes(out), n


# ---------------------------------------------------------------------------------------------
# ffmpeg


def ffmpeg_encode(frames: np.ndarray, args: list[str], suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out" + suffix)
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{COLS}x{ROWS}", "-r", str(int(FPS)), "-i", "-",
               "-color_primaries", "smpte170m", "-color_trc", "smpte170m",
               "-colorspace", "smpte170m", "-color_range", "tv", *args, out]
        subprocess.run(cmd, input=frames.tobytes(), check=True)
        with open(out, "rb") as f:
            return f.read()


def ffmpeg_decode(stream: bytes) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.bin")
        with open(src, "wb") as f:
            f.write(stream)
        r = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", src,
                            "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                           capture_output=True, check=True)
        probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                                "stream=codec_name,width,height,profile", "-of", "json", src],
                               capture_output=True, check=True, text=True)
    info = json.loads(probe.stdout)["streams"][0]
    w, h = info["width"], info["height"]
    return np.frombuffer(r.stdout, np.uint8).reshape(-1, h, w, 3), info


# ---------------------------------------------------------------------------------------------
# Fixtures: each builder returns (dataset, transfer syntax, manifest extras)


def fx_native_mono2(ds, d):
    set_pixels(ds, photometric="MONOCHROME2", spp=1)
    ds.PixelData = gray_frames(d, LEFT_GRAY, 0, 255).tobytes()
    return TS["explicit_le"], {"left_rgb": [LEFT_GRAY] * 3, "tolerance": 0}


def fx_native_mono1(ds, d):
    set_pixels(ds, photometric="MONOCHROME1", spp=1)
    # MONOCHROME1: 0 is white. Stored left = 160 displays as 255-160 = 95; the background is stored
    # 255 (displays black) and the bar 0 (displays white), so the rendered video matches the others.
    ds.PixelData = gray_frames(d, LEFT_GRAY, 255, 0).tobytes()
    return TS["explicit_le"], {
        "left_rgb": [255 - LEFT_GRAY] * 3, "tolerance": 1, "stored_left_value": LEFT_GRAY,
        "conformant": False,
        "notes": "MONOCHROME1 is not allowed by the Multi-frame Grayscale Byte SC IOD (no multi-frame "
                 "IOD allows it); decoders must still invert: displayed = 255 - stored.",
    }


def fx_native_mono16(ds, d):
    set_pixels(ds, photometric="MONOCHROME2", spp=1, bits=16, stored=12)
    stored = 2560
    ds.PixelData = gray_frames(d, stored, 0, 4095, np.uint16).astype("<u2").tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 2048
    ds.WindowCenterWidthExplanation = "FIXTURE"
    # PS3.3 C.11.2.1.2.1 linear: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    windowed = ((stored - (2048 - 0.5)) / (2048 - 1) + 0.5) * 255  # 191.3
    return TS["explicit_le"], {
        "left_rgb": [round(windowed)] * 3, "tolerance": 2, "stored_left_value": stored,
        "expected_gray": {"with_window": round(windowed),
                          "without_window_shift": stored >> 4,
                          "without_window_minmax": round(stored / 4095 * 255)},
        "notes": "BitsAllocated 16, BitsStored 12; stored left 2560, background 0, bar 4095. "
                 "WindowCenter 2048 / WindowWidth 2048 (linear) gives left grey 191; ignoring the "
                 "window, a 12-bit>>4 shift or min/max scaling gives 160 / 159.",
    }


def fx_native_rgb(ds, d):
    set_pixels(ds, photometric="RGB", spp=3, planar=0)
    ds.PixelData = rgb_frames(d).tobytes()
    return TS["explicit_le"], {"left_rgb": list(LEFT_RGB), "tolerance": 0}


def fx_native_rgb_planar(ds, d):
    set_pixels(ds, photometric="RGB", spp=3, planar=1)
    ds.PixelData = np.ascontiguousarray(rgb_frames(d).transpose(0, 3, 1, 2)).tobytes()
    return TS["explicit_le"], {"left_rgb": list(LEFT_RGB), "tolerance": 0,
                               "notes": "Planar Configuration 1: per frame RRR..GGG..BBB."}


def fx_native_ybr_full(ds, d):
    set_pixels(ds, photometric="YBR_FULL", spp=3, planar=0)
    ds.PixelData = rgb_to_ybr_full(rgb_frames(d)).tobytes()
    return TS["explicit_le"], {"left_rgb": list(LEFT_RGB), "tolerance": 3,
                               "notes": "Full-range BT.601 YCbCr, PS3.3 C.7.6.3.1.2."}


def fx_native_ybr_full_422(ds, d):
    set_pixels(ds, photometric="YBR_FULL_422", spp=3, planar=0)
    ds.PixelData = ybr_full_422_bytes(rgb_frames(d))
    return TS["explicit_le"], {"left_rgb": list(LEFT_RGB), "tolerance": 3,
                               "notes": "Native YBR_FULL_422: Rows*Columns*2 bytes per frame, "
                                        "Y1 Y2 Cb Cr per horizontal pixel pair."}


def fx_palette(ds, d):
    set_pixels(ds, photometric="PALETTE COLOR", spp=1)
    left_index, bar_index = 37, 255
    lut = np.zeros((256, 3), np.uint16)
    ramp = np.arange(256, dtype=np.uint32)
    lut[:, 0], lut[:, 1], lut[:, 2] = ramp * 257, (255 - ramp) * 257, (ramp * 7 % 256) * 257
    lut[0] = (0, 0, 0)
    lut[left_index] = [c * 257 for c in LEFT_RGB]
    lut[bar_index] = (65535, 65535, 65535)
    for i, kw in enumerate(["Red", "Green", "Blue"]):
        setattr(ds, f"{kw}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{kw}PaletteColorLookupTableData", lut[:, i].astype("<u2").tobytes())
    ds.PixelData = gray_frames(d, left_index, 0, bar_index).tobytes()
    return TS["explicit_le"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 0, "stored_left_value": left_index,
        "notes": "8-bit indices; LUT descriptors [256, 0, 16]; 16-bit entries (value*257); index 37 is "
                 "the left colour, 0 black, 255 white. 8-bit output = entry >> 8.",
    }


def fx_rle(ds, d):
    from pydicom.uid import RLELossless

    set_pixels(ds, photometric="RGB", spp=3, planar=0)
    ds.PixelData = rgb_frames(d).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(TS["explicit_le"])
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    return TS["rle"], {"left_rgb": list(LEFT_RGB), "tolerance": 0,
                       "encapsulation": {"container": "rle", "basic_offset_table": "present",
                                         "fragments": FRAMES}}


def jpeg_frames(frames: np.ndarray) -> list[bytes]:
    out = []
    for fr in frames:
        buf = io.BytesIO()
        Image.fromarray(fr, "RGB").save(buf, "JPEG", quality=92, subsampling=1)  # 1 = 4:2:2
        out.append(buf.getvalue())
    return out


def fx_jpeg(ds, d, bot=True):
    set_pixels(ds, photometric="YBR_FULL_422", spp=3, planar=0)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    set_encapsulated(ds, encapsulate(jpeg_frames(rgb_frames(d)), has_bot=bot))
    return TS["jpeg_baseline"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 6,
        "encapsulation": {"container": "jpeg", "basic_offset_table": "present" if bot else "empty",
                          "fragments": FRAMES},
        "notes": "One JPEG (JFIF, YCbCr 4:2:2, Pillow quality 92) per frame, one fragment per frame.",
    }


def fx_jpeg_empty_bot(ds, d):
    return fx_jpeg(ds, d, bot=False)


def video_common(ds, lossy_method):
    set_pixels(ds, photometric="YBR_PARTIAL_420", spp=3, planar=0)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = lossy_method


X264 = ["-c:v", "libx264", "-profile:v", "high", "-level:v", "4.1", "-pix_fmt", "yuv420p",
        "-preset", "veryfast", "-crf", "16", "-g", "8", "-x264-params", "log-level=error"]


def fx_h264(ds, d):
    video_common(ds, "ISO_14496_10")
    stream = ffmpeg_encode(rgb_frames(d), [*X264, "-f", "mpegts"], ".ts")
    set_encapsulated(ds, encapsulate([stream], has_bot=False))
    return TS["h264_hp41"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 10,
        "encapsulation": {"container": "mpeg-ts", "basic_offset_table": "empty", "fragments": 1},
        "notes": "PS3.5 8.2.7: one fragment holds the whole bit stream, empty Basic Offset Table, "
                 "container MPEG-2 Transport Stream (or MP4). libx264 High profile, yuv420p, 25 fps.",
    }


def fx_h264_fragmentable(ds, d):
    video_common(ds, "ISO_14496_10")
    stream = ffmpeg_encode(rgb_frames(d), [*X264, "-movflags", "+faststart", "-f", "mp4"], ".mp4")
    value, n = encapsulate_fragments(stream, FRAGMENT_SIZE)
    set_encapsulated(ds, value)
    return TS["h264_hp41_fragmentable"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 10,
        "encapsulation": {"container": "mp4", "basic_offset_table": "empty", "fragments": n,
                          "fragment_size": FRAGMENT_SIZE},
        "notes": "Fragmentable H.264 transfer syntax (…4.102.1): the MP4 (faststart) stream is cut into "
                 f"{FRAGMENT_SIZE}-byte fragments; concatenate all fragments to get the stream.",
    }


def fx_h264_annexb(ds, d):
    video_common(ds, "ISO_14496_10")
    stream = ffmpeg_encode(rgb_frames(d), [*X264, "-f", "h264"], ".h264")
    set_encapsulated(ds, encapsulate([stream], has_bot=False))
    return TS["h264_hp41"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 10, "conformant": False,
        "encapsulation": {"container": "annexb", "basic_offset_table": "empty", "fragments": 1},
        "notes": "Raw Annex-B H.264 elementary stream (no container) in one fragment: not what PS3.5 "
                 "8.2.7 asks for (MPEG-TS or MP4) but seen in the wild; probe the stream format.",
    }


def fx_mpeg2(ds, d):
    video_common(ds, "ISO_13818_2")
    stream = ffmpeg_encode(rgb_frames(d), ["-c:v", "mpeg2video", "-profile:v", "main",
                                           "-level:v", "main", "-pix_fmt", "yuv420p", "-q:v", "2",
                                           "-g", "8", "-f", "vob"], ".mpg")
    set_encapsulated(ds, encapsulate([stream], has_bot=False))
    return TS["mpeg2_mpml"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 10,
        "encapsulation": {"container": "mpeg-ps", "basic_offset_table": "empty", "fragments": 1},
        "notes": "PS3.5 8.2.5: one fragment, empty Basic Offset Table, container not constrained "
                 "(TS, PS, ES, PES or MP4); this one is an MPEG-2 Program Stream (ffmpeg -f vob).",
    }


def fx_us_regions(ds, d):
    set_pixels(ds, photometric="RGB", spp=3, planar=0)
    region = (4, 12, 87, 59)  # MinX0, MinY0, MaxX1, MaxY1 (inclusive)
    a = rgb_frames(d)
    burn_in_text(a, region)
    ds.PixelData = a.tobytes()
    ds.BurnedInAnnotation = "YES"
    r = Dataset()
    r.RegionSpatialFormat = 1  # 2D
    r.RegionDataType = 1  # tissue
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = region
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3  # cm
    r.PhysicalDeltaX = r.PhysicalDeltaY = 0.05
    r.ReferencePixelX0, r.ReferencePixelY0 = 0, 0
    ds.SequenceOfUltrasoundRegions = Sequence([r])
    return TS["explicit_le"], {
        "left_rgb": list(LEFT_RGB), "tolerance": 0, "burned_in": True,
        "us_region": {"min_x0": region[0], "min_y0": region[1], "max_x1": region[2],
                      "max_y1": region[3], "inclusive": True},
        "notes": "Bright (255,255,255) text-like pixels at rows 2..9 (above the region) and a scale "
                 "right of the region (columns 89..94); inside the region the usual picture. The "
                 "moving bar spans all rows, so part of it lies outside the region too.",
    }


def timing_fixture(timing, fps, expected):
    def build(ds, d):
        ts, extra = fx_native_rgb(ds, d)
        extra["timing"] = timing
        extra["timing_fps"] = fps
        extra["expected_fps"] = expected
        return ts, extra
    return build


FIXTURES = {
    # name: (builder, sop class key)
    "native_mono2": (fx_native_mono2, "sc_mf_byte"),
    "native_mono1": (fx_native_mono1, "sc_mf_byte"),
    "native_mono16": (fx_native_mono16, "sc_mf_word"),
    "native_rgb": (fx_native_rgb, "us_mf"),
    "native_rgb_planar": (fx_native_rgb_planar, "us_mf"),
    "native_ybr_full": (fx_native_ybr_full, "us_mf"),
    "native_ybr_full_422": (fx_native_ybr_full_422, "us_mf"),
    "palette": (fx_palette, "us_mf"),
    "rle": (fx_rle, "us_mf"),
    "jpeg_baseline": (fx_jpeg, "us_mf"),
    "jpeg_baseline_empty_bot": (fx_jpeg_empty_bot, "us_mf"),
    "h264": (fx_h264, "vl_endo_video"),
    "h264_fragmentable": (fx_h264_fragmentable, "vl_endo_video"),
    "h264_annexb": (fx_h264_annexb, "vl_endo_video"),
    "mpeg2": (fx_mpeg2, "vl_endo_video"),
    "timing_cine_rate": (timing_fixture("cine_rate", 30.0, 30.0), "us_mf"),
    "timing_frame_time": (timing_fixture("frame_time", 20.0, 20.0), "us_mf"),
    "timing_frame_time_vector": (timing_fixture("frame_time_vector", 10.0, 10.0), "us_mf"),
    "timing_none": (timing_fixture("none", None, None), "us_mf"),
    "us_regions": (fx_us_regions, "us_mf"),
    "single_frame_series": (None, "us"),
}
SERIES_LEN = 8


def phi_of(p: dict) -> list[str]:
    return [p["patient_name"], p["patient_id"], p["birth_date"], p["accession_number"],
            p["other_patient_id"], p["study_id"], "Fixture General Hospital",
            "1 Fixture Street, Testville", "Fixture Cardiology", "FIXTURE-STN-01",
            "Referrer^Robert^Fixture", "Performer^Paula^Fixture", "Operator^Otto^Fixture",
            "42 Fixture Lane, Testville", "+1-555-0100", "SN-FIXTURE-0001"]


def entry_common(name, p, ds, ts, frames, direction, extra) -> dict:
    e = {
        "name": name,
        "path": None,
        "kind": "multiframe",
        "sop_class_uid": ds.SOPClassUID,
        "modality": ds.Modality,
        "transfer_syntax": ts,
        "photometric": ds.PhotometricInterpretation,
        "samples_per_pixel": int(ds.SamplesPerPixel),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "planar_configuration": int(ds.PlanarConfiguration) if "PlanarConfiguration" in ds else None,
        "rows": ROWS,
        "cols": COLS,
        "frames": frames,
        "timing": None,
        "expected_fps": FPS,
        "left_rgb": extra.pop("left_rgb"),
        "left_rgb_tolerance": extra.pop("tolerance"),
        "sample_region": SAMPLE_REGION,
        "label": direction,
        "bar": {"direction": direction, "width": BAR_W, "step_px_per_frame": BAR_STEP,
                "x_per_frame": bar_positions(direction)[:frames], "rgb": [255, 255, 255]},
        "patient_id": p["patient_id"],
        "patient_name": p["patient_name"],
        "birth_date": p["birth_date"],
        "accession_number": p["accession_number"],
        "study_date": "20240102",
        "study_uid": p["study_uid"],
        "series_uid": ds.SeriesInstanceUID,
        "sop_uid": ds.SOPInstanceUID,
        "burned_in": False,
        "us_region": None,
        "encapsulation": None,
        "conformant": True,
        "pydicom_decodable": True,
        "notes": "",
        "phi": phi_of(p),
    }
    e.update(extra)
    return e


def build_all(outdir: str, names: list[str], ctx: Ctx) -> list[dict]:
    manifest = []
    all_names = list(FIXTURES)
    for name in names:
        i = all_names.index(name)
        builder, sop_key = FIXTURES[name]
        p = ctx.patient(i)
        direction = "rightward" if i % 2 == 0 else "leftward"
        if name == "single_frame_series":
            manifest.append(build_series(outdir, name, sop_key, p, direction, i + 1, ctx))
            continue
        ds = base_dataset(ctx, p, name, sop_key, series_no=i + 1)
        ts, extra = builder(ds, direction)
        timing = extra.pop("timing", "both")
        fps = extra.pop("timing_fps", FPS)
        written = set_timing(ds, timing, fps if fps else FPS)
        if sop_key == "vl_endo_video":
            ds.PreferredPlaybackSequencing = 0
        rel = f"{name}.dcm"
        save(ds, os.path.join(outdir, rel), ts)
        e = entry_common(name, p, ds, ts, FRAMES, direction, extra)
        e["path"] = rel
        e["timing"] = written
        if e["encapsulation"] is None and ts != TS["explicit_le"]:
            e["encapsulation"] = {}
        if ts in (TS["h264_hp41"], TS["h264_hp41_fragmentable"], TS["mpeg2_mpml"]):
            e["pydicom_decodable"] = False
        manifest.append(e)
    return manifest


def build_series(outdir, name, sop_key, p, direction, series_no, ctx) -> dict:
    series_uid = ctx.uid("series", name)
    frames = rgb_frames(direction)[:SERIES_LEN]
    d = os.path.join(outdir, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    order = list(range(1, SERIES_LEN + 1))
    random.Random(ctx.seed + name).shuffle(order)
    instances = []
    for k, inst in enumerate(order):
        ds = base_dataset(ctx, p, name, sop_key, series_no, instance_no=inst, series_uid=series_uid)
        set_pixels(ds, photometric="RGB", spp=3, planar=0, frames=None)
        ds.PixelData = frames[inst - 1].tobytes()
        # Acquisition order also in the content/acquisition time, 40 ms apart (25 fps).
        ds.ContentTime = ds.AcquisitionTime = f"101600.{(inst - 1) * 40000:06d}"
        fname = f"IMG{(k * 7919 + 13) % 9973:05d}.dcm"  # names that sort differently from order
        rel = f"{name}/{fname}"
        save(ds, os.path.join(outdir, rel), TS["explicit_le"])
        instances.append({"path": rel, "instance_number": inst, "sop_uid": ds.SOPInstanceUID})
    instances.sort(key=lambda x: x["path"])
    e = entry_common(name, p, ds, TS["explicit_le"], SERIES_LEN, direction,
                     {"left_rgb": list(LEFT_RGB), "tolerance": 0})
    e.update({
        "path": name, "kind": "series", "sop_uid": None, "instances": instances,
        "timing": {"cine_rate": None, "frame_time": None, "frame_time_vector": None},
        "expected_fps": None,
        "notes": f"{SERIES_LEN} single-frame US images, one series; frame k is InstanceNumber k "
                 "(file names are shuffled). No Frame Time/Cine Rate: fps is the server default; "
                 "Content/Acquisition Time step 40 ms.",
    })
    return e


# ---------------------------------------------------------------------------------------------
# Verification


def rendered_rgb(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """pydicom pixel_array -> display RGB (uint8), per the photometric interpretation."""
    from pydicom.pixels import apply_color_lut, apply_voi_lut

    pi = ds.PhotometricInterpretation
    if arr.ndim == 2 or (arr.ndim == 3 and ds.SamplesPerPixel == 3 and arr.shape[-1] == 3
                         and int(ds.get("NumberOfFrames", 1)) == 1):
        arr = arr[None]
    if pi == "PALETTE COLOR":
        return (apply_color_lut(arr, ds) >> 8).astype(np.uint8)
    if pi.startswith("MONOCHROME"):
        if "WindowCenter" in ds:  # pydicom windows onto 0 .. 2**BitsStored - 1
            g = apply_voi_lut(arr, ds) * 255.0 / (2 ** int(ds.BitsStored) - 1)
        else:
            g = arr.astype(np.float64)
        g = np.rint(np.asarray(g, np.float64)).clip(0, 255).astype(np.uint8)
        if pi == "MONOCHROME1":
            g = 255 - g
        return np.repeat(g[..., None], 3, -1)
    return arr.astype(np.uint8)  # pydicom converts YBR_* to RGB itself (as_rgb default)


def check_frames(name, rgb: np.ndarray, e: dict, errors: list[str]) -> None:
    x0, y0, x1, y1 = e["sample_region"]
    if rgb.shape[0] != e["frames"]:
        errors.append(f"{name}: decoded {rgb.shape[0]} frames, manifest says {e['frames']}")
    mean = rgb[:, y0:y1, x0:x1].reshape(-1, 3).mean(0)
    dev = np.abs(mean - np.array(e["left_rgb"])).max()
    e.setdefault("_verified", {})["left_rgb_mean"] = [round(float(m), 2) for m in mean]
    if dev > e["left_rgb_tolerance"]:
        errors.append(f"{name}: left colour {mean.round(1).tolist()} vs {e['left_rgb']} "
                      f"(tolerance {e['left_rgb_tolerance']})")
    # The bar: brightest column band in the right half moves the labelled way.
    right = rgb[:, y0:y1, HALF:].astype(np.float64).mean((1, 3))
    xs = right.argmax(1)
    moved = xs[-1] - xs[0]
    if (moved > 0) != (e["label"] == "rightward") or moved == 0:
        errors.append(f"{name}: bar moves {moved:+d}px, label {e['label']}")


def verify(outdir: str, manifest: list[dict]) -> list[str]:
    errors: list[str] = []
    for e in manifest:
        name = e["name"]
        try:
            if e["kind"] == "series":
                dss = [pydicom.dcmread(os.path.join(outdir, i["path"])) for i in e["instances"]]
                dss.sort(key=lambda ds: int(ds.InstanceNumber))
                rgb = np.stack([rendered_rgb(ds, ds.pixel_array)[0] for ds in dss])
                check_frames(name, rgb, e, errors)
                continue
            path = os.path.join(outdir, e["path"])
            with open(path, "rb") as f:
                head = f.read(132)
            if head[128:132] != b"DICM":
                errors.append(f"{name}: no DICM preamble")
            ds = pydicom.dcmread(path)
            if ds.file_meta.TransferSyntaxUID != e["transfer_syntax"]:
                errors.append(f"{name}: transfer syntax {ds.file_meta.TransferSyntaxUID}")
            if e["pydicom_decodable"]:
                check_frames(name, rendered_rgb(ds, ds.pixel_array), e, errors)
            else:
                from pydicom.encaps import generate_fragments

                frags = list(generate_fragments(ds.PixelData))[1:]  # [0] is the Basic Offset Table
                bot_len = int.from_bytes(ds.PixelData[4:8], "little")
                if bot_len != 0:
                    errors.append(f"{name}: Basic Offset Table not empty")
                if len(frags) != e["encapsulation"]["fragments"]:
                    errors.append(f"{name}: {len(frags)} fragments")
                rgb, info = ffmpeg_decode(b"".join(frags))
                e["_verified"] = {"codec": info.get("codec_name"), "profile": info.get("profile")}
                check_frames(name, rgb, e, errors)
        except Exception as ex:  # noqa: BLE001 - report every fixture
            errors.append(f"{name}: {type(ex).__name__}: {ex}")
    return errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--only", help="comma-separated fixture names")
    ap.add_argument("--patients", type=int, default=3, help="distinct patients (1-4, default 3)")
    ap.add_argument("--seed", default="vidtune", help='UID seed; "random" for fresh UIDs')
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the fixture names and exit")
    a = ap.parse_args()
    if a.list:
        print("\n".join(FIXTURES))
        return 0
    if not a.outdir:
        ap.error("OUTDIR is required")
    if not 1 <= a.patients <= len(PATIENTS):
        ap.error(f"--patients must be 1..{len(PATIENTS)}")
    names = list(FIXTURES)
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in FIXTURES]
        if unknown:
            ap.error(f"unknown fixture(s): {', '.join(unknown)} (see --list)")
    t0 = time.monotonic()
    os.makedirs(a.outdir, exist_ok=True)
    manifest = build_all(a.outdir, names, Ctx(a.seed, a.patients))
    errors = [] if a.no_verify else verify(a.outdir, manifest)
    for e in manifest:
        e.pop("_verified", None)
    with open(os.path.join(a.outdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(manifest)} fixtures to {a.outdir} in {time.monotonic() - t0:.1f}s"
          + ("" if a.no_verify else f", verified ({len(errors)} errors)"), file=sys.stderr)
    for err in errors:
        print("error: " + err, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
