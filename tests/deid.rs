//! De-identification suite: identity planted in every place a scanner puts it, through the
//! real `octd deidentify` command, and none of it may survive.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::dicom::{self as fixture, Pixels, Spec};
use common::{assert_no_phi, shared_oct_images};
use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::{open_file, InMemDicomObject};
use serde_json::Value as Json;

struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new(extra_config: &str) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("octd.toml"),
            format!("[device]\nstate_dir = \"{}\"\n{extra_config}", dir.path().join("state").display()),
        )
        .unwrap();
        Bench { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Runs `octd deidentify`; returns its JSON lines.
    fn deidentify(&self, inputs: &[PathBuf]) -> Vec<Json> {
        let out = Command::new(env!("CARGO_BIN_EXE_octd"))
            .arg("--config")
            .arg(self.path("octd.toml"))
            .arg("deidentify")
            .args(inputs)
            .arg("--out")
            .arg(self.path("out"))
            .output()
            .unwrap();
        assert!(out.status.success(), "octd deidentify failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_no_phi(&out.stderr, "stderr of octd deidentify");
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn real_frames(n: usize, width: u32, height: u32) -> Option<Vec<Vec<u8>>> {
    let images = shared_oct_images()?;
    Some(images.iter().cycle().take(n).map(|(p, _)| fixture::grey_frame(p, width, height)).collect())
}

/// Every element at every depth, for structural checks.
fn walk(obj: &InMemDicomObject, visit: &mut dyn FnMut(&dicom_object::mem::InMemElement)) {
    for e in obj.iter() {
        visit(e);
        if let Value::Sequence(seq) = e.value() {
            for item in seq.items() {
                walk(item, visit);
            }
        }
    }
}

fn pixel_bytes(path: &Path) -> Vec<u8> {
    let obj = open_file(path).unwrap();
    obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().into_owned()
}

#[test]
fn dicom_identity_is_removed_at_every_depth_and_pixels_are_kept() {
    let Some(frames) = real_frames(1, 512, 496) else { return };
    let bench = Bench::new("");
    let input = fixture::build(Spec::plain(
        fixture::OPT_SOP_CLASS,
        Pixels::Native { width: 512, height: 496, frames: frames.clone() },
    ));
    let input_path = bench.write("DOE_JOHN_MRN8675309.dcm", &input);
    let lines = bench.deidentify(std::slice::from_ref(&input_path));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["input"], input_path.to_str().unwrap());
    let output = PathBuf::from(lines[0]["output"].as_str().expect("an output path"));
    let scan_id = lines[0]["scan_id"].as_str().unwrap();
    assert_eq!(output.file_name().unwrap().to_str().unwrap(), format!("{scan_id}.dcm"), "named by scan id only");

    let bytes = std::fs::read(&output).unwrap();
    assert_no_phi(&bytes, "de-identified DICOM");
    for uid in [fixture::STUDY_UID, fixture::SOP_UID, "1.2.826.0.1.3680043.8.498.30303"] {
        assert!(!bytes.windows(uid.len()).any(|w| w == uid.as_bytes()), "original UID {uid} survived");
    }

    let obj = open_file(&output).unwrap();
    let text = |tag| obj.element(tag).unwrap().to_str().unwrap().trim().to_string();
    assert_eq!(text(tags::PATIENT_IDENTITY_REMOVED), "YES");
    assert!(!text(tags::DEIDENTIFICATION_METHOD).is_empty());
    let code_seq = obj.element(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE).unwrap();
    let item = &code_seq.items().unwrap()[0];
    assert_eq!(item.element(tags::CODE_VALUE).unwrap().to_str().unwrap().trim(), "113100");
    assert_eq!(text(tags::PATIENT_NAME), "");
    assert!(text(tags::PATIENT_ID).starts_with("OCTD-"), "patient id is a keyed pseudonym");
    assert!(obj.element(tags::PATIENT_ADDRESS).is_err());
    assert!(obj.element(tags::REFERENCED_STUDY_SEQUENCE).is_err());
    // Geometry, laterality and pixels are kept.
    assert_eq!(text(tags::IMAGE_LATERALITY), "R");
    assert_eq!(obj.element(tags::ROWS).unwrap().to_int::<u32>().unwrap(), 496);
    assert_eq!(obj.element(tags::COLUMNS).unwrap().to_int::<u32>().unwrap(), 512);
    assert_eq!(pixel_bytes(&output), frames.concat());
    // UIDs: pseudonyms under 2.25, meta consistent with the data set.
    let study = text(tags::STUDY_INSTANCE_UID);
    assert!(study.starts_with("2.25.") && study.len() <= 64, "{study}");
    assert_eq!(obj.meta().media_storage_sop_instance_uid().trim_end_matches('\0'), text(tags::SOP_INSTANCE_UID));
    assert_eq!(text(tags::SOP_CLASS_UID), fixture::OPT_SOP_CLASS, "standard UIDs are kept");
    assert!(obj.meta().source_application_entity_title().is_none());
    // No private attribute, overlay or date left at any depth.
    let mut offending = Vec::new();
    walk(&obj, &mut |e| {
        let t = e.tag();
        // A date is either empty or the profile's dummy (Type 1 attributes keep one).
        let date_with_value = matches!(e.vr(), dicom_core::VR::DA | dicom_core::VR::DT)
            && !e.to_str().map(|s| s.trim().is_empty() || s.trim().starts_with("19000101")).unwrap_or(true);
        if t.group() % 2 == 1 || t.group() == 0x6000 || date_with_value {
            offending.push(t);
        }
    });
    assert!(offending.is_empty(), "left behind: {offending:?}");
    // Nested sequences that are kept are cleaned item by item.
    let source = &obj.element(tags::SOURCE_IMAGE_SEQUENCE).unwrap().items().unwrap()[0];
    let referenced = source.element(tags::REFERENCED_SOP_INSTANCE_UID).unwrap().to_str().unwrap();
    assert!(referenced.starts_with("2.25."));

    // Same device key, same input -> same pseudonyms (longitudinal linkage for the clinic).
    let again = bench.deidentify(&[input_path]);
    let obj2 = open_file(again[0]["output"].as_str().unwrap()).unwrap();
    assert_eq!(obj2.element(tags::STUDY_INSTANCE_UID).unwrap().to_str().unwrap().trim(), study);
    assert_ne!(again[0]["output"], lines[0]["output"], "each run is a new scan id");
}

#[test]
fn multiframe_jpeg_and_rle_volumes_decode_and_deidentify() {
    let Some(frames) = real_frames(4, 256, 248) else { return };
    let Some(images) = shared_oct_images() else { return };
    let bench = Bench::new("");
    let rle = bench.write(
        "rle.dcm",
        &fixture::build(Spec::plain(
            fixture::OPT_SOP_CLASS,
            Pixels::Rle { width: 256, height: 248, frames: frames.clone() },
        )),
    );
    let jpeg_bytes = std::fs::read(&images[0].0).unwrap();
    let dims = image::image_dimensions(&images[0].0).unwrap();
    let jpeg = bench.write(
        "jpeg.dcm",
        &fixture::build(Spec::plain(
            fixture::SC_SOP_CLASS,
            Pixels::Jpeg { width: dims.0, height: dims.1, jpeg: jpeg_bytes },
        )),
    );
    let deflated = bench.write(
        "deflated.dcm",
        &fixture::build(Spec::plain(
            fixture::OPT_SOP_CLASS,
            Pixels::Deflated { width: 256, height: 248, frames: frames.clone() },
        )),
    );
    let lines = bench.deidentify(&[rle, jpeg, deflated]);
    assert_eq!(lines[0]["frames"], 4, "{:?}", lines[0]);
    assert_eq!(lines[1]["frames"], 1, "{:?}", lines[1]);
    assert_eq!(lines[2]["frames"], 4, "{:?}", lines[2]);
    for line in &lines {
        let out = std::fs::read(line["output"].as_str().unwrap()).unwrap();
        assert_no_phi(&out, "de-identified encapsulated DICOM");
    }
    // RLE round trip: the decoded volume equals the frames we encoded.
    use dicom_pixeldata::PixelDecoder;
    let obj = open_file(lines[0]["output"].as_str().unwrap()).unwrap();
    assert_eq!(obj.decode_pixel_data().unwrap().data(), frames.concat().as_slice());
    // Inference reads the compressed artefact one frame at a time and sees the same pixels.
    let grey = octd::infer::frames::load(Path::new(lines[0]["output"].as_str().unwrap())).unwrap();
    assert_eq!(grey.len(), frames.len());
    for (g, f) in grey.iter().zip(&frames) {
        assert_eq!((g.width, g.height), (256, 248));
        assert!(g.pixels.iter().zip(f).all(|(&v, &p)| (v - f32::from(p) / 255.0).abs() < 1e-6));
    }
    // Deflated input is written back as explicit VR little endian, pixels unchanged.
    let obj = open_file(lines[2]["output"].as_str().unwrap()).unwrap();
    assert_eq!(obj.meta().transfer_syntax().trim_end_matches('\0'), fixture::EXPLICIT_LE);
    assert_eq!(obj.decode_pixel_data().unwrap().data(), frames.concat().as_slice());
}

#[test]
fn burned_in_annotation_is_masked_or_refused() {
    let Some(frames) = real_frames(2, 128, 128) else { return };
    let build = || {
        fixture::build(Spec {
            sop_class: fixture::OPT_SOP_CLASS,
            pixels: Pixels::Native { width: 128, height: 128, frames: frames.clone() },
            burned_in: true,
            manufacturer: "BurnCo",
        })
    };
    let refused = Bench::new("");
    let lines = refused.deidentify(&[refused.write("b.dcm", &build())]);
    assert_eq!(lines[0]["code"], "burned_in_annotation", "{:?}", lines[0]);

    let masked = Bench::new("[[deid.burned_in_masks]]\nmanufacturer = \"burnco\"\nrects = [[0, 0, 128, 10]]\n");
    let lines = masked.deidentify(&[masked.write("b.dcm", &build())]);
    let out = PathBuf::from(lines[0]["output"].as_str().expect("masked output"));
    let pixels = pixel_bytes(&out);
    for f in 0..2 {
        let frame = &pixels[f * 128 * 128..(f + 1) * 128 * 128];
        assert!(frame[..128 * 10].iter().all(|&p| p == 0), "mask applied to frame {f}");
        assert_eq!(&frame[128 * 10..], &frames[f][128 * 10..], "rest of frame {f} untouched");
    }
    let obj = open_file(&out).unwrap();
    assert_eq!(obj.element(tags::BURNED_IN_ANNOTATION).unwrap().to_str().unwrap().trim(), "NO");
}

/// Insert APP1/Exif-like and COM segments carrying identity right after SOI.
fn jpeg_with_metadata(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut segment = |marker: u8, body: &[u8]| {
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
    };
    let mut exif = b"Exif\0\0MM\0*\0\0\0\x08".to_vec();
    exif.extend_from_slice(b"Artist DOE^JOHN MRN8675309 born 19450704");
    segment(0xE1, &exif);
    segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta>742 Evergreen Terrace, Springfield</x:xmpmeta>");
    segment(0xFE, b"Patient DOE_JOHN ACC-99887766");
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn image_metadata_is_stripped_and_pixels_survive() {
    let Some(images) = shared_oct_images() else { return };
    let bench = Bench::new("");
    let original = std::fs::read(&images[5].0).unwrap();
    let tagged = jpeg_with_metadata(&original);
    assert!(tagged.windows(8).any(|w| w == b"DOE^JOHN"));
    let input = bench.write("DOE_JOHN 19450704.jpeg", &tagged);
    let lines = bench.deidentify(&[input]);
    let out = PathBuf::from(lines[0]["output"].as_str().unwrap());
    // Kept byte for byte without its metadata segments: no larger than the original, and
    // its compressed image data is the original's.
    assert_eq!(out.extension().unwrap(), "jpg");
    let bytes = std::fs::read(&out).unwrap();
    assert_no_phi(&bytes, "de-identified JPEG");
    assert!(bytes.len() <= original.len(), "{} > {}", bytes.len(), original.len());
    let scan_data = |jpeg: &[u8]| {
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("a scan");
        jpeg[sos..].to_vec()
    };
    assert_eq!(scan_data(&bytes), scan_data(&original), "the scan and its data untouched");
    let decoded_in = image::load_from_memory(&original).unwrap().to_luma8();
    let decoded_out = image::open(&out).unwrap().to_luma8();
    assert_eq!(decoded_in.dimensions(), decoded_out.dimensions());
    assert_eq!(decoded_in.as_raw(), decoded_out.as_raw(), "the same pixels");
}

#[test]
fn every_shared_jpeg_is_kept_byte_for_byte_with_the_same_pixels() {
    let Some(images) = shared_oct_images() else { return };
    let limits = octd::deid::InputLimits::from(&octd::config::IngestConfig::default());
    let deid = octd::deid::Deidentifier::new(octd::secret::DeviceSecret::ephemeral(), Vec::new(), limits);
    for (path, _) in &images {
        let original = std::fs::read(path).unwrap();
        let tagged = jpeg_with_metadata(&original);
        let out = deid.deidentify_bytes(tagged).unwrap();
        assert_eq!(out.extension, "jpg", "{}", path.display());
        assert_no_phi(&out.artifact, "a de-identified JPEG");
        let pixels = out.pixels.expect("pixels for inference").into_image().unwrap();
        let from_artifact = image::load_from_memory(&out.artifact).unwrap();
        let from_original = image::load_from_memory(&original).unwrap();
        assert_eq!(pixels.as_bytes(), from_artifact.as_bytes(), "inference sees what is kept");
        assert_eq!(from_artifact.as_bytes(), from_original.as_bytes(), "{}", path.display());
    }
}

#[test]
fn an_rle_segment_that_decodes_short_is_refused_where_pixels_are_decoded() {
    // A sound header whose one segment decodes to 10 of the 4096 bytes a frame needs: the
    // toolkit's RLE adapter indexes past what it decoded and panics (fuzzing finding 5).
    // Classification decodes every frame; the panic is caught and the input refused.
    let bench = Bench::new("");
    let mut segment = fixture::rle_frame(&vec![128u8; 64 * 64])[..64].to_vec();
    segment.push(9);
    segment.extend_from_slice(&[7u8; 10]);
    segment.push(0x80);
    let bytes = fixture::build(Spec::plain(
        fixture::OPT_SOP_CLASS,
        Pixels::RleFragments { width: 64, height: 64, fragments: vec![segment] },
    ));
    let input = bench.write("rle-short-segment.dcm", &bytes);
    let out = Command::new(env!("CARGO_BIN_EXE_octd"))
        .arg("--config")
        .arg(bench.path("octd.toml"))
        .args(["classify", "--json", "--model"])
        .arg(common::repo().join("models/default"))
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "classify survives the decoder's panic: {}", String::from_utf8_lossy(&out.stderr));
    let line: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["code"], "corrupt", "{line}");
}

#[test]
fn bad_inputs_get_clear_reasons() {
    let bench = Bench::new("[ingest]\nmax_frames = 64\n");
    let mut cases: Vec<(PathBuf, &str)> = vec![
        (bench.write("empty.jpeg", b""), "empty"),
        (bench.write("notes.jpeg", b"this is a text file, not a scan\n"), "not_an_image"),
    ];
    let frame = vec![128u8; 64 * 64];
    let native = |frames: Vec<Vec<u8>>| {
        fixture::build(Spec::plain(fixture::OPT_SOP_CLASS, Pixels::Native { width: 64, height: 64, frames }))
    };
    // Pixel data shorter than declared: declare 2 frames, carry 1.
    let mut short = native(vec![frame.clone()]);
    let pos = short.windows(5).position(|w| w == b"IS\x02\x001").unwrap() + 4;
    short[pos] = b'2';
    cases.push((bench.write("short.dcm", &short), "pixel_data_short"));
    // Decompression bomb: 100 frames declared against a limit of 64, nothing allocated.
    let mut bomb = native(vec![frame.clone()]);
    let pos = bomb.windows(5).position(|w| w == b"IS\x02\x001").unwrap();
    bomb.splice(pos..pos + 6, b"IS\x04\x00100 ".iter().copied());
    cases.push((bench.write("bomb.dcm", &bomb), "over_limits"));
    // Unknown transfer syntax.
    let unknown = native(vec![frame.clone()]);
    let ts = fixture::EXPLICIT_LE.as_bytes();
    let pos = unknown.windows(ts.len()).position(|w| w == ts).unwrap();
    let mut unknown = unknown;
    unknown[pos..pos + ts.len()].copy_from_slice(b"1.2.840.10008.9.9.9");
    cases.push((bench.write("unknown-ts.dcm", &unknown), "unsupported_transfer_syntax"));
    // Hostile RLE headers, which the toolkit reads unchecked (fuzzing finding 5: an index out
    // of bounds in its RLE adapter). A segment count far past the fragment: the toolkit
    // would reserve 4 bytes per declared segment and slice past the end.
    let rle = |fragments: Vec<Vec<u8>>| {
        fixture::build(Spec::plain(fixture::OPT_SOP_CLASS, Pixels::RleFragments { width: 64, height: 64, fragments }))
    };
    let mut many_segments = fixture::rle_frame(&frame);
    many_segments[..4].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    cases.push((bench.write("rle-segments.dcm", &rle(vec![many_segments])), "corrupt"));
    // A fragment shorter than the 64-byte header.
    cases.push((bench.write("rle-stub.dcm", &rle(vec![vec![1, 0, 0, 0, 64, 0, 0, 0]])), "corrupt"));
    // Truncated DICOM: cut inside the pixel data.
    let whole = native(vec![frame.clone()]);
    cases.push((bench.write("cut.dcm", &whole[..whole.len() - 1000]), "truncated"));
    if let Some(images) = shared_oct_images() {
        let jpeg = std::fs::read(&images[0].0).unwrap();
        cases.push((bench.write("cut.jpeg", &jpeg[..jpeg.len() / 2]), "truncated"));
        let mut png = Vec::new();
        image::open(&images[0].0)
            .unwrap()
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let mid = png.len() / 2;
        png[mid..mid + 64].iter_mut().for_each(|b| *b ^= 0x5A);
        cases.push((bench.write("corrupt.png", &png), "corrupt"));
    }
    let inputs: Vec<PathBuf> = cases.iter().map(|(p, _)| p.clone()).collect();
    let lines = bench.deidentify(&inputs);
    assert_eq!(lines.len(), cases.len(), "one line per input, good or bad");
    for ((path, code), line) in cases.iter().zip(&lines) {
        assert_eq!(line["input"], path.to_str().unwrap());
        assert!(line["error"].as_str().is_some_and(|e| !e.is_empty()), "{line}");
        let got = line["code"].as_str().unwrap();
        // A cut can surface as "truncated" or as "corrupt" depending on where it falls.
        let ok = got == *code || (*code == "truncated" && got == "corrupt");
        assert!(ok, "{}: expected {code}, got {line}", path.display());
    }
}

#[test]
fn sixteen_bit_tiff_and_rgb_bmp_keep_their_pixels() {
    let Some(images) = shared_oct_images() else { return };
    let bench = Bench::new("");
    let grey = image::open(&images[2].0).unwrap().to_luma8();
    let (w, h) = grey.dimensions();
    let sixteen = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(w, h, |x, y| {
        image::Luma([(u16::from(grey.get_pixel(x, y).0[0]) * 257).saturating_sub(3)])
    });
    let tiff = bench.path("DOE_JOHN.tiff");
    sixteen.save(&tiff).unwrap();
    let rgb = image::RgbImage::from_fn(w, h, |x, y| {
        let v = grey.get_pixel(x, y).0[0];
        image::Rgb([v, v / 2, 255 - v])
    });
    let bmp = bench.path("DOE_JOHN.bmp");
    rgb.save(&bmp).unwrap();
    let lines = bench.deidentify(&[tiff, bmp]);
    let tiff_out = image::open(lines[0]["output"].as_str().unwrap()).unwrap();
    assert_eq!(tiff_out.as_luma16().expect("16-bit kept").as_raw(), sixteen.as_raw());
    let bmp_out = image::open(lines[1]["output"].as_str().unwrap()).unwrap();
    assert_eq!(bmp_out.as_rgb8().expect("RGB kept").as_raw(), rgb.as_raw());
}

/// dciodvfy's complaints about one file ("Error - ..." lines), without the file's own name.
fn validator_errors(path: &Path) -> Option<Vec<String>> {
    let out = match Command::new("dciodvfy").arg("-new").arg(path).output() {
        Ok(out) => out,
        Err(_) => {
            assert!(
                std::env::var_os("OCTD_REQUIRE_DCIODVFY").is_none(),
                "dciodvfy (Debian package dicom3tools) is required here"
            );
            eprintln!("skipping: dciodvfy (dicom3tools) is not installed");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Some(text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect())
}

#[test]
fn deidentified_opt_objects_keep_every_type1_attribute_and_pass_the_validator() {
    let Some(frames) = real_frames(4, 64, 48) else { return };
    let bench = Bench::new("");
    for (name, n) in [("single.dcm", 1), ("volume.dcm", 4)] {
        let input = bench.write(name, &fixture::opt_object(64, 48, &frames[..n]));
        let Some(before) = validator_errors(&input) else { return };
        // dciodvfy's OPT rules contradict each other on one point: the OPT module requires
        // the concatenation attributes (Type 1, fixed values), the multi-frame module refuses
        // them outside a concatenation. Those complaints are the fixture's only ones.
        let inherent = |e: &String| e.contains("Concatenation");
        assert!(before.iter().all(inherent), "the fixture itself must be a valid OPT object: {before:#?}");
        let report = bench.deidentify(&[input]);
        let output = PathBuf::from(report[0]["output"].as_str().expect("de-identified"));
        let after = validator_errors(&output).unwrap();
        let new: Vec<&String> = after.iter().filter(|e| !before.contains(e)).collect();
        assert!(new.is_empty(), "{name}: de-identification broke the object: {new:#?}");
        let bytes = std::fs::read(&output).unwrap();
        assert_no_phi(&bytes, name);
        for planted in ["20240101", "101010", "SN-DOE-JOHN-42"] {
            assert!(!bytes.windows(planted.len()).any(|w| w == planted.as_bytes()), "{name}: {planted} survived");
        }
        let obj = open_file(&output).unwrap();
        let text = |tag| obj.element(tag).ok().and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()));
        assert_eq!(text(tags::CONTENT_DATE).as_deref(), Some("19000101"), "Type 1 Content Date gets a dummy");
        assert_eq!(text(tags::CONTENT_TIME).as_deref(), Some("000000"));
        assert_eq!(text(tags::ACQUISITION_DATE_TIME).as_deref(), Some("19000101000000"));
        assert_eq!(text(tags::DEVICE_SERIAL_NUMBER).as_deref(), Some("REMOVED"));
        assert_eq!(text(tags::STUDY_DATE).as_deref(), Some(""), "Type 2 dates are emptied");
        // Nested: the per-frame acquisition date-times are dummies, not gone.
        let mut frame_times = Vec::new();
        walk(&obj, &mut |e| {
            if e.tag() == tags::FRAME_ACQUISITION_DATE_TIME {
                frame_times.push(e.to_str().unwrap().trim().to_string());
            }
        });
        assert_eq!(frame_times, vec!["19000101000000".to_string(); n], "{name}");
    }
}

#[test]
fn deidentify_writes_deidentified_objects_of_other_modalities_and_non_image_iods() {
    let bench = Bench::new("");
    let objects = [
        ("ct.dcm", fixture::other_modality("1.2.840.10008.5.1.4.1.1.2", "CT")),
        ("mr.dcm", fixture::other_modality("1.2.840.10008.5.1.4.1.1.4", "MR")),
        ("rtstruct.dcm", fixture::other_modality("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")),
    ];
    let inputs: Vec<PathBuf> = objects.iter().map(|(name, bytes)| bench.write(name, bytes)).collect();
    let report = bench.deidentify(&inputs);
    for ((name, _), line) in objects.iter().zip(&report) {
        let output = PathBuf::from(line["output"].as_str().unwrap_or_else(|| panic!("{name} refused: {line}")));
        let bytes = std::fs::read(&output).unwrap();
        assert_no_phi(&bytes, name);
        let obj = open_file(&output).unwrap();
        let removed = obj.element(tags::PATIENT_IDENTITY_REMOVED).unwrap().to_str().unwrap().trim().to_string();
        assert_eq!(removed, "YES", "{name}");
        assert_ne!(obj.element(tags::STUDY_INSTANCE_UID).unwrap().to_str().unwrap().trim(), fixture::STUDY_UID);
        if *name == "ct.dcm" {
            // 12-bit CT pixels come through unchanged.
            let original = open_file(&inputs[0]).unwrap();
            assert_eq!(
                pixel_bytes(&output),
                original.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().into_owned()
            );
        }
    }
}

#[test]
fn the_pixels_handed_to_inference_are_the_artefacts_pixels() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let secret = octd::secret::DeviceSecret::load_or_create(dir.path()).unwrap();
    let limits = octd::deid::InputLimits::from(&octd::config::IngestConfig::default());
    let deid = octd::deid::Deidentifier::new(secret, Vec::new(), limits);
    // A JPEG B-scan, and the same pixels as 16-bit grey and as RGB PNGs.
    let jpeg = std::fs::read(&images[0].0).unwrap();
    let grey = image::load_from_memory(&jpeg).unwrap();
    let mut inputs = vec![jpeg];
    for image in [image::DynamicImage::ImageLuma16(grey.to_luma16()), image::DynamicImage::ImageRgb8(grey.to_rgb8())] {
        let mut png = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        inputs.push(png);
    }
    for input in inputs {
        let out = deid.deidentify_bytes(input).unwrap();
        let pixels = out.pixels.clone().expect("a 2-D image hands its pixels over");
        let handed = octd::infer::frames::from_image(&pixels.into_image().unwrap());
        let written = octd::infer::frames::from_image(&image::load_from_memory(&out.artifact).unwrap());
        assert_eq!(handed, written, "inference sees exactly what the artefact holds");
    }
}
