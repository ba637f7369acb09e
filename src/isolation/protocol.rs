//! The framed, versioned protocol between the daemon and its decoder worker, over the
//! worker's stdin and stdout.
//!
//! A frame is `OCTW`, a version byte, the header's length (u32 LE), the blob's length
//! (u64 LE), a JSON header, then the blob (input bytes or the de-identified artefact).
//! Both lengths are checked against limits before anything is allocated.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::config::BurnedInMask;
use crate::deid::InputLimits;
use crate::scan::{EventKind, InputKind};

pub const MAGIC: [u8; 4] = *b"OCTW";
pub const VERSION: u8 = 1;
/// Largest JSON header either side sends.
pub const MAX_HEADER: u32 = 1 << 20;
const PREFIX: usize = 4 + 1 + 4 + 8;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other side closed the pipe")]
    Closed,
    #[error("bad frame: {0}")]
    BadFrame(String),
}

/// What goes over the pipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Header {
    /// Worker -> daemon, once the sandbox is in place.
    Hello { pid: u32, sandbox: String },
    /// Daemon -> worker, once: what de-identification needs. The device secret travels here,
    /// never in arguments or the environment.
    Setup(Setup),
    /// Daemon -> worker: de-identify the blob.
    Job { cpu_seconds: u64 },
    /// Worker -> daemon: the blob is the artefact.
    Done(Done),
    /// Worker -> daemon: the input was refused (a `DeidError`, or a caught panic).
    Refused { code: String, detail: String, kind: EventKind },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub secret_hex: String,
    pub masks: Vec<BurnedInMask>,
    pub limits: InputLimits,
    /// Test builds of a device only (`OCTD_FAULT_INJECTION=1` in the daemon's environment).
    pub fault_injection: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    pub kind: InputKind,
    pub extension: String,
    pub frames: u32,
    pub identifiers: BTreeMap<String, String>,
    pub study_uid: Option<String>,
    pub laterality: Option<String>,
    /// A 2-D image's decoded pixels follow the artefact in the blob (`artifact_len` bytes,
    /// then these): inference takes them instead of decoding the artefact again.
    #[serde(default)]
    pub pixels: Option<PixelsHeader>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PixelsHeader {
    pub artifact_len: u64,
    pub width: u32,
    pub height: u32,
    pub layout: crate::deid::PixelLayout,
}

pub fn encode(header: &Header, blob: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let json = serde_json::to_vec(header).map_err(|e| ProtocolError::BadFrame(e.to_string()))?;
    let mut out = Vec::with_capacity(PREFIX + json.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// The lengths a frame prefix declares, checked.
pub fn parse_prefix(prefix: &[u8; PREFIX], max_blob: u64) -> Result<(usize, usize), ProtocolError> {
    if prefix[..4] != MAGIC {
        return Err(ProtocolError::BadFrame("no frame magic".into()));
    }
    if prefix[4] != VERSION {
        return Err(ProtocolError::BadFrame(format!("protocol version {} (this side speaks {VERSION})", prefix[4])));
    }
    let header = u32::from_le_bytes([prefix[5], prefix[6], prefix[7], prefix[8]]);
    let mut blob = [0u8; 8];
    blob.copy_from_slice(&prefix[9..17]);
    let blob = u64::from_le_bytes(blob);
    if header > MAX_HEADER {
        return Err(ProtocolError::BadFrame(format!("header of {header} bytes")));
    }
    if blob > max_blob {
        return Err(ProtocolError::BadFrame(format!("blob of {blob} bytes, over {max_blob}")));
    }
    let blob = usize::try_from(blob).map_err(|_| ProtocolError::BadFrame("blob too large".into()))?;
    Ok((header as usize, blob))
}

pub fn decode_header(json: &[u8]) -> Result<Header, ProtocolError> {
    serde_json::from_slice(json).map_err(|e| ProtocolError::BadFrame(format!("header: {e}")))
}

/// Blocking write (the worker side).
pub fn write_frame(to: &mut impl Write, header: &Header, blob: &[u8]) -> Result<(), ProtocolError> {
    write_frame_parts(to, header, &[blob])
}

/// As [`write_frame`], the blob given in parts (written one after the other, not joined).
pub fn write_frame_parts(to: &mut impl Write, header: &Header, parts: &[&[u8]]) -> Result<(), ProtocolError> {
    let json = serde_json::to_vec(header).map_err(|e| ProtocolError::BadFrame(e.to_string()))?;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut prefix = Vec::with_capacity(PREFIX + json.len());
    prefix.extend_from_slice(&MAGIC);
    prefix.push(VERSION);
    prefix.extend_from_slice(&(json.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(total as u64).to_le_bytes());
    prefix.extend_from_slice(&json);
    to.write_all(&prefix)?;
    for part in parts {
        to.write_all(part)?;
    }
    to.flush()?;
    Ok(())
}

/// Blocking read (the worker side). `Ok(None)` when the pipe closed between frames.
pub fn read_frame(from: &mut impl Read, max_blob: u64) -> Result<Option<(Header, Vec<u8>)>, ProtocolError> {
    let mut prefix = [0u8; PREFIX];
    match from.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (header_len, blob_len) = parse_prefix(&prefix, max_blob)?;
    let mut json = vec![0u8; header_len];
    from.read_exact(&mut json)?;
    let mut blob = Vec::new();
    blob.try_reserve_exact(blob_len).map_err(|_| ProtocolError::BadFrame(format!("cannot hold {blob_len} bytes")))?;
    from.take(blob_len as u64).read_to_end(&mut blob)?;
    if blob.len() != blob_len {
        return Err(ProtocolError::Closed);
    }
    Ok(Some((decode_header(&json)?, blob)))
}

/// Async read (the daemon side).
pub async fn read_frame_async(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    max_blob: u64,
) -> Result<(Header, Vec<u8>), ProtocolError> {
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; PREFIX];
    from.read_exact(&mut prefix).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => ProtocolError::Io(e),
    })?;
    let (header_len, blob_len) = parse_prefix(&prefix, max_blob)?;
    let mut json = vec![0u8; header_len];
    from.read_exact(&mut json).await.map_err(|_| ProtocolError::Closed)?;
    let mut blob = Vec::new();
    blob.try_reserve_exact(blob_len).map_err(|_| ProtocolError::BadFrame(format!("cannot hold {blob_len} bytes")))?;
    blob.resize(blob_len, 0);
    from.read_exact(&mut blob).await.map_err(|_| ProtocolError::Closed)?;
    Ok((decode_header(&json)?, blob))
}

/// Async write (the daemon side).
pub async fn write_frame_async(
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    header: &Header,
    blob: &[u8],
) -> Result<(), ProtocolError> {
    use tokio::io::AsyncWriteExt;
    to.write_all(&encode(header, blob)?).await?;
    to.write_all(blob).await?;
    to.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Header::Job { cpu_seconds: 5 }, b"pixels").unwrap();
        let (header, blob) = read_frame(&mut buf.as_slice(), 100).unwrap().unwrap();
        assert!(matches!(header, Header::Job { cpu_seconds: 5 }));
        assert_eq!(blob, b"pixels");
        assert!(matches!(read_frame(&mut buf.as_slice(), 3), Err(ProtocolError::BadFrame(_))));
        let mut other_version = buf.clone();
        other_version[4] = 9;
        assert!(matches!(read_frame(&mut other_version.as_slice(), 100), Err(ProtocolError::BadFrame(_))));
        assert!(read_frame(&mut [].as_slice(), 100).unwrap().is_none());
        assert!(matches!(read_frame(&mut &buf[..buf.len() - 2], 100), Err(ProtocolError::Closed)));
    }
}
