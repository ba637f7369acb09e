//! De-identification: the only stage that reads scanner bytes. Its output — a DICOM object
//! cleaned by the PS3.15 Annex E Basic profile, a JPEG with nothing but its image segments
//! (`jpeg`), or a PNG with nothing but pixels — is all
//! that later stages see. It also enforces the input limits, so a malformed or hostile file
//! is refused here, before any large allocation.

mod dicom;
mod jpeg;
pub use dicom::read_checked;
pub mod profile;
pub mod walk;

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader};

use crate::config::{BurnedInMask, IngestConfig};
use crate::scan::{EventKind, InputKind, ScanId};
use crate::secret::DeviceSecret;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeidError {
    #[error("input is empty (zero bytes)")]
    Empty,
    #[error("input is {size} bytes, over the limit of {limit}")]
    FileTooLarge { size: u64, limit: u64 },
    #[error("not an image: content is none of DICOM, JPEG, PNG, TIFF or BMP")]
    NotAnImage,
    #[error("DICOM object has no image: {0}")]
    NoPixelData(String),
    #[error("unsupported transfer syntax {0}")]
    UnsupportedTransferSyntax(String),
    #[error("declared image size is over the limits (possible decompression bomb): {0}")]
    OverLimits(String),
    #[error("pixel data is shorter than declared: {found} of {declared} bytes")]
    PixelDataShort { declared: u64, found: u64 },
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("burned-in annotation and no pixel mask configured for this scanner model")]
    BurnedInAnnotation,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl DeidError {
    /// Every code [`DeidError::code`] returns (the decoder worker's refusals are checked
    /// against it).
    pub const CODES: &'static [&'static str] = &[
        "empty",
        "file_too_large",
        "not_an_image",
        "no_pixel_data",
        "unsupported_transfer_syntax",
        "over_limits",
        "pixel_data_short",
        "truncated",
        "corrupt",
        "burned_in_annotation",
        "io_error",
    ];

    /// Stable, machine-readable reason for events and quarantine records.
    pub fn code(&self) -> &'static str {
        match self {
            DeidError::Empty => "empty",
            DeidError::FileTooLarge { .. } => "file_too_large",
            DeidError::NotAnImage => "not_an_image",
            DeidError::NoPixelData(_) => "no_pixel_data",
            DeidError::UnsupportedTransferSyntax(_) => "unsupported_transfer_syntax",
            DeidError::OverLimits(_) => "over_limits",
            DeidError::PixelDataShort { .. } => "pixel_data_short",
            DeidError::Truncated(_) => "truncated",
            DeidError::Corrupt(_) => "corrupt",
            DeidError::BurnedInAnnotation => "burned_in_annotation",
            DeidError::Io(_) => "io_error",
        }
    }

    /// Policy refusals are "quarantined"; inputs that cannot be read are "rejected".
    pub fn event_kind(&self) -> EventKind {
        match self {
            DeidError::BurnedInAnnotation => EventKind::Quarantined,
            _ => EventKind::Rejected,
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct InputLimits {
    pub max_file_bytes: u64,
    pub max_frame_pixels: u64,
    pub max_frames: u32,
    pub max_decoded_bytes: u64,
}

impl From<&IngestConfig> for InputLimits {
    fn from(c: &IngestConfig) -> Self {
        InputLimits {
            max_file_bytes: c.max_file_bytes,
            max_frame_pixels: c.max_frame_pixels,
            max_frames: c.max_frames,
            max_decoded_bytes: c.max_decoded_bytes,
        }
    }
}

/// What de-identification produced. Holds no identity except `identifiers`, which goes
/// straight into the sealed linkage table.
#[derive(Debug, Clone)]
pub struct Deidentified {
    pub kind: InputKind,
    /// Path of the written de-identified artefact.
    pub artifact: PathBuf,
    pub frames: u32,
    pub identifiers: BTreeMap<String, String>,
    /// Keyed-hash pseudonym of the StudyInstanceUID.
    pub study_uid: Option<String>,
    pub laterality: Option<String>,
}

/// De-identification done in memory: the artefact's bytes, not yet written anywhere (the
/// decoder worker has no file system; the daemon writes what it returns).
#[derive(Debug, Clone, PartialEq)]
pub struct DeidOutput {
    pub kind: InputKind,
    /// `dcm`, `jpg` or `png`: the artefact's file name is `<scan_id>.<extension>`.
    pub extension: &'static str,
    pub artifact: Vec<u8>,
    pub frames: u32,
    pub identifiers: BTreeMap<String, String>,
    pub study_uid: Option<String>,
    pub laterality: Option<String>,
    /// A 2-D image's pixels exactly as its artefact holds them, for inference: the
    /// artefact is written for the record, not decoded again (None for DICOM).
    pub pixels: Option<DecodedPixels>,
}

/// How a de-identified image's pixels are laid out (the PNG's colour type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelLayout {
    Luma8,
    Luma16,
    Rgb8,
    Rgb16,
}

impl PixelLayout {
    pub fn bytes_per_pixel(self) -> u64 {
        match self {
            PixelLayout::Luma8 => 1,
            PixelLayout::Luma16 => 2,
            PixelLayout::Rgb8 => 3,
            PixelLayout::Rgb16 => 6,
        }
    }
}

/// Decoded pixels in this machine's byte order (they never leave it: worker to daemon).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedPixels {
    pub width: u32,
    pub height: u32,
    pub layout: PixelLayout,
    pub bytes: Vec<u8>,
}

impl DecodedPixels {
    fn from_image(image: DynamicImage) -> Option<DecodedPixels> {
        let (width, height) = (image.width(), image.height());
        let layout = match &image {
            DynamicImage::ImageLuma8(_) => PixelLayout::Luma8,
            DynamicImage::ImageLuma16(_) => PixelLayout::Luma16,
            DynamicImage::ImageRgb8(_) => PixelLayout::Rgb8,
            DynamicImage::ImageRgb16(_) => PixelLayout::Rgb16,
            _ => return None,
        };
        Some(DecodedPixels { width, height, layout, bytes: image.into_bytes() })
    }

    /// The image again; None when the bytes do not fill it (a worker gone wrong).
    pub fn into_image(self) -> Option<DynamicImage> {
        let (w, h) = (self.width, self.height);
        let words =
            |bytes: Vec<u8>| -> Vec<u16> { bytes.chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]])).collect() };
        match self.layout {
            PixelLayout::Luma8 => image::GrayImage::from_raw(w, h, self.bytes).map(DynamicImage::ImageLuma8),
            PixelLayout::Rgb8 => image::RgbImage::from_raw(w, h, self.bytes).map(DynamicImage::ImageRgb8),
            PixelLayout::Luma16 => image::ImageBuffer::from_raw(w, h, words(self.bytes)).map(DynamicImage::ImageLuma16),
            PixelLayout::Rgb16 => image::ImageBuffer::from_raw(w, h, words(self.bytes)).map(DynamicImage::ImageRgb16),
        }
    }
}

impl DeidOutput {
    /// Write the artefact atomically into `out_dir` as `<scan_id>.<extension>`.
    pub fn write(mut self, out_dir: &Path, scan_id: ScanId) -> Result<Deidentified, DeidError> {
        let bytes = std::mem::take(&mut self.artifact);
        self.write_from(&bytes, out_dir, scan_id)
    }

    /// As [`DeidOutput::write`], with the artefact's bytes held elsewhere (read by inference
    /// while they are written).
    pub fn write_from(self, bytes: &[u8], out_dir: &Path, scan_id: ScanId) -> Result<Deidentified, DeidError> {
        std::fs::create_dir_all(out_dir)?;
        let artifact = out_dir.join(format!("{scan_id}.{}", self.extension));
        crate::fsutil::write_atomic(&artifact, bytes)?;
        Ok(Deidentified {
            kind: self.kind,
            artifact,
            frames: self.frames,
            identifiers: self.identifiers,
            study_uid: self.study_uid,
            laterality: self.laterality,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Deidentifier {
    secret: DeviceSecret,
    masks: Vec<BurnedInMask>,
    limits: InputLimits,
    scope: Scope,
}

/// What DICOM objects are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Images the classifier can read (8/16-bit, 1 or 3 samples), pixels decoded in full to
    /// prove them whole: the daemon and `octd classify`.
    #[default]
    OctImages,
    /// Any object the toolkit parses: other modalities and non-image IODs (`octd deidentify`,
    /// research exports). Pixels, when there are any, are bounded and carried over as they
    /// are; they are decoded only to apply a burned-in mask.
    AnyObject,
}

impl Deidentifier {
    pub fn new(secret: DeviceSecret, masks: Vec<BurnedInMask>, limits: InputLimits) -> Self {
        Deidentifier { secret, masks, limits, scope: Scope::OctImages }
    }

    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Read `input` within the size limit.
    pub fn read_input(&self, input: &Path) -> Result<Vec<u8>, DeidError> {
        read_input_within(input, &self.limits)
    }

    /// De-identify `input` into `out_dir/<scan_id>.{dcm,jpg,png}`, in this process (the one-shot
    /// commands; the daemon runs [`Deidentifier::deidentify_bytes`] in its decoder worker).
    /// The artefact is written atomically, so it either exists whole or not at all.
    pub fn deidentify(&self, input: &Path, out_dir: &Path, scan_id: ScanId) -> Result<Deidentified, DeidError> {
        let bytes = self.read_input(input)?;
        self.deidentify_bytes(bytes)?.write(out_dir, scan_id)
    }

    /// De-identify a whole input held in memory; the input is dropped as soon as it is parsed
    /// or decoded.
    pub fn deidentify_bytes(&self, bytes: Vec<u8>) -> Result<DeidOutput, DeidError> {
        if bytes.is_empty() {
            return Err(DeidError::Empty);
        }
        if bytes.len() as u64 > self.limits.max_file_bytes {
            return Err(DeidError::FileTooLarge { size: bytes.len() as u64, limit: self.limits.max_file_bytes });
        }
        let kind = InputKind::sniff(&bytes[..bytes.len().min(132)]).ok_or(DeidError::NotAnImage)?;
        if kind == InputKind::Dicom {
            let out = dicom::deidentify(bytes, &self.secret, &self.masks, &self.limits, self.scope)?;
            return Ok(DeidOutput {
                kind,
                extension: "dcm",
                artifact: out.artifact,
                frames: out.frames,
                identifiers: out.identifiers,
                study_uid: out.study_uid,
                laterality: out.laterality,
                pixels: None,
            });
        }
        let (extension, artifact, pixels) = deidentify_image(bytes, kind, &self.limits)?;
        Ok(DeidOutput {
            kind,
            extension,
            artifact,
            frames: 1,
            identifiers: BTreeMap::new(),
            study_uid: None,
            laterality: None,
            pixels,
        })
    }
}

/// Read a whole input, its size checked before a byte is read (and again while reading: the
/// file may still be growing).
pub fn read_input_within(input: &Path, limits: &InputLimits) -> Result<Vec<u8>, DeidError> {
    let size = std::fs::metadata(input)?.len();
    if size == 0 {
        return Err(DeidError::Empty);
    }
    if size > limits.max_file_bytes {
        return Err(DeidError::FileTooLarge { size, limit: limits.max_file_bytes });
    }
    // Reserved at the size seen, so reading does not grow the buffer by doubling (`take`
    // hides the file's size from `read_to_end`).
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    std::fs::File::open(input)?.take(limits.max_file_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(DeidError::FileTooLarge { size: bytes.len() as u64, limit: limits.max_file_bytes });
    }
    Ok(bytes)
}

/// A 2-D image as its artefact (extension and bytes) and its decoded pixels, for inference.
/// A JPEG keeps its compressed image byte for byte, without its metadata segments (`jpeg`):
/// no encode, and the one decode is of the artefact itself, so inference sees exactly what
/// is kept. Anything else is decoded and re-encoded as PNG: only pixels survive, so EXIF,
/// XMP, IPTC, comments, PNG text chunks and ICC profiles are all gone.
fn deidentify_image(
    bytes: Vec<u8>,
    kind: InputKind,
    limits: &InputLimits,
) -> Result<(&'static str, Vec<u8>, Option<DecodedPixels>), DeidError> {
    let format = match kind {
        InputKind::Jpeg => ImageFormat::Jpeg,
        InputKind::Png => ImageFormat::Png,
        InputKind::Tiff => ImageFormat::Tiff,
        InputKind::Bmp => ImageFormat::Bmp,
        InputKind::Dicom => return Err(DeidError::NotAnImage),
    };
    if kind == InputKind::Jpeg {
        if !jpeg_has_end_marker(&bytes) {
            return Err(DeidError::Truncated("JPEG has no end-of-image marker".into()));
        }
        // Kept only when the kept bytes decode as they are; otherwise the input is decoded
        // and re-encoded, its own decoding errors deciding.
        if let Some(stripped) = jpeg::strip_metadata(&bytes) {
            if let Ok(image) = decode_within(&stripped, format, limits) {
                drop(bytes);
                return match image {
                    DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => {
                        Ok(("jpg", stripped, DecodedPixels::from_image(image)))
                    }
                    // A layout inference does not take as it is: the pixels as PNG.
                    _ => reencode_png(image),
                };
            }
        }
    }
    reencode_png(decode_within(&bytes, format, limits)?)
}

/// Decode an image within the limits, its size checked before any pixel is.
fn decode_within(bytes: &[u8], format: ImageFormat, limits: &InputLimits) -> Result<DynamicImage, DeidError> {
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| DeidError::Corrupt(format!("image header: {}", toolkit_words(e))))?;
    check_frame_limits(width.into(), height.into(), 1, 8, limits)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(width);
    decode_limits.max_image_height = Some(height);
    decode_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(decode_limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => DeidError::OverLimits(toolkit_words(l)),
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DeidError::Truncated(toolkit_words(io))
        }
        other => DeidError::Corrupt(format!("image data: {}", toolkit_words(other))),
    })
}

/// The pixels alone, as PNG, in a layout inference takes.
fn reencode_png(image: DynamicImage) -> Result<(&'static str, Vec<u8>, Option<DecodedPixels>), DeidError> {
    let image = match image {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgb16(_) => image,
        DynamicImage::ImageLumaA8(_) => DynamicImage::ImageLuma8(image.to_luma8()),
        DynamicImage::ImageLumaA16(_) => DynamicImage::ImageLuma16(image.to_luma16()),
        DynamicImage::ImageRgba16(_) | DynamicImage::ImageRgb32F(_) | DynamicImage::ImageRgba32F(_) => {
            DynamicImage::ImageRgb16(image.to_rgb16())
        }
        _ => DynamicImage::ImageRgb8(image.to_rgb8()),
    };
    // Fast deflate: the encode was the costliest step of a B-scan (docs/benchmarks.md); the
    // file is somewhat larger, the pixels the same.
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        &mut png,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    image.write_with_encoder(encoder).map_err(|e| DeidError::Corrupt(format!("re-encoding: {e}")))?;
    Ok(("png", png, DecodedPixels::from_image(image)))
}

/// A de-identified JPEG artefact's pixels as PNG: what the uplink sends (the trainer's
/// contract carries PNG and DICOM). One encoder, one setting, so the same bytes every time.
pub fn png_of_jpeg(jpeg: &[u8]) -> Result<Vec<u8>, DeidError> {
    let image = image::load_from_memory_with_format(jpeg, ImageFormat::Jpeg)
        .map_err(|e| DeidError::Corrupt(format!("image data: {}", toolkit_words(e))))?;
    let mut png = Cursor::new(Vec::new());
    image.write_to(&mut png, ImageFormat::Png).map_err(|e| DeidError::Corrupt(format!("re-encoding: {e}")))?;
    Ok(png.into_inner())
}

/// Width and height as a 2-D artefact's own header states them (`png`: IHDR; `jpg`: the
/// frame header), without decoding it; None for anything else or a header that is not there.
pub fn image_dimensions(extension: &str, artifact: &[u8]) -> Option<(u32, u32)> {
    match extension {
        "png" => artifact
            .get(16..24)
            .filter(|_| artifact.get(12..16) == Some(b"IHDR".as_slice()))
            .map(|b| (u32::from_be_bytes([b[0], b[1], b[2], b[3]]), u32::from_be_bytes([b[4], b[5], b[6], b[7]]))),
        "jpg" => jpeg::frame_size(artifact),
        _ => None,
    }
}

/// A JPEG cut short still decodes (to a grey tail) with most decoders, so look for EOI.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let trimmed = bytes.iter().rposition(|&b| b != 0).map(|i| &bytes[..=i]).unwrap_or(&[]);
    trimmed.ends_with(&[0xFF, 0xD9])
}

fn check_frame_limits(
    width: u64,
    height: u64,
    frames: u64,
    bytes_per_pixel: u64,
    limits: &InputLimits,
) -> Result<(), DeidError> {
    if width == 0 || height == 0 {
        return Err(DeidError::Corrupt(format!("image is {width}x{height}")));
    }
    if width.saturating_mul(height) > limits.max_frame_pixels {
        return Err(DeidError::OverLimits(format!(
            "{width}x{height} pixels per frame, limit {}",
            limits.max_frame_pixels
        )));
    }
    if frames > u64::from(limits.max_frames) {
        return Err(DeidError::OverLimits(format!("{frames} frames, limit {}", limits.max_frames)));
    }
    let decoded = width.saturating_mul(height).saturating_mul(frames).saturating_mul(bytes_per_pixel);
    if decoded > limits.max_decoded_bytes {
        return Err(DeidError::OverLimits(format!("{decoded} decoded bytes, limit {}", limits.max_decoded_bytes)));
    }
    Ok(())
}

/// A decoding library's error message as a quarantine detail: its own words are kept, but
/// anything it quotes from the input (a value, a name) is cut, since the input is PHI until
/// de-identified; control characters go and the length is bounded.
pub(crate) fn toolkit_words(error: impl std::fmt::Display) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    for c in error.to_string().chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push('…');
                out.push(c);
            }
            Some(_) => {}
            None if matches!(c, '\'' | '"' | '`') => {
                quote = Some(c);
                out.push(c);
            }
            None if c.is_control() => out.push(' '),
            None => out.push(c),
        }
        if out.chars().count() >= 200 {
            out.push('…');
            break;
        }
    }
    out
}

/// A transfer syntax UID as a detail: the UID when it is one, else no text from the input.
pub(crate) fn uid_words(uid: &str) -> String {
    let is_uid = !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if is_uid {
        uid.to_string()
    } else {
        "(not a UID)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InputLimits {
        InputLimits::from(&IngestConfig::default())
    }

    #[test]
    fn every_code_is_listed() {
        let all = [
            DeidError::Empty,
            DeidError::FileTooLarge { size: 2, limit: 1 },
            DeidError::NotAnImage,
            DeidError::NoPixelData(String::new()),
            DeidError::UnsupportedTransferSyntax(String::new()),
            DeidError::OverLimits(String::new()),
            DeidError::PixelDataShort { declared: 2, found: 1 },
            DeidError::Truncated(String::new()),
            DeidError::Corrupt(String::new()),
            DeidError::BurnedInAnnotation,
            DeidError::Io(std::io::Error::other("x")),
        ];
        let codes: Vec<&str> = all.iter().map(DeidError::code).collect();
        assert_eq!(codes, DeidError::CODES);
    }

    #[test]
    fn jpeg_end_marker_tolerates_padding() {
        assert!(jpeg_has_end_marker(&[0xFF, 0xD8, 0xFF, 0xD9]));
        assert!(jpeg_has_end_marker(&[0xFF, 0xD8, 0xFF, 0xD9, 0, 0]));
        assert!(!jpeg_has_end_marker(&[0xFF, 0xD8, 0x12, 0x34]));
    }

    #[test]
    fn frame_limits_refuse_bombs_before_decoding() {
        let l = limits();
        assert!(check_frame_limits(512, 496, 1, 1, &l).is_ok());
        assert!(matches!(check_frame_limits(100_000, 100_000, 1, 1, &l), Err(DeidError::OverLimits(_))));
        assert!(matches!(check_frame_limits(512, 512, 100_000, 1, &l), Err(DeidError::OverLimits(_))));
        assert!(matches!(check_frame_limits(0, 512, 1, 1, &l), Err(DeidError::Corrupt(_))));
    }

    #[test]
    fn png_reencoding_drops_text_chunks() {
        let mut img = image::GrayImage::new(8, 8);
        img.put_pixel(3, 3, image::Luma([200]));
        let mut plain = Vec::new();
        DynamicImage::ImageLuma8(img).write_to(&mut Cursor::new(&mut plain), ImageFormat::Png).unwrap();
        // splice a tEXt chunk with a name after IHDR (8 signature + 25 IHDR bytes)
        let mut text = Vec::new();
        let data = b"Author\0DOE^JANE";
        text.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc_input = b"tEXt".to_vec();
        crc_input.extend_from_slice(data);
        text.extend_from_slice(&crc_input);
        text.extend_from_slice(&crc32(&crc_input).to_be_bytes());
        let mut with_text = plain[..33].to_vec();
        with_text.extend_from_slice(&text);
        with_text.extend_from_slice(&plain[33..]);
        assert!(with_text.windows(8).any(|w| w == b"DOE^JANE"));
        let (_, out, _) = deidentify_image(with_text, InputKind::Png, &limits()).unwrap();
        assert!(!out.windows(8).any(|w| w == b"DOE^JANE"));
        let back = image::load_from_memory(&out).unwrap().to_luma8();
        assert_eq!(back.get_pixel(3, 3).0[0], 200);
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
