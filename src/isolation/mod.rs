//! Decoders run isolated: every byte from the scanner is parsed, decoded and de-identified
//! in a worker process (`octd worker`, this same binary re-executed) behind an address-space
//! limit, a CPU-time limit per scan, a wall-clock timeout and a seccomp sandbox. A crash,
//! abort, stack overflow, exhausted memory or hang kills the worker, not the daemon: the
//! scan gets a reason (`processor_crashed`, `timeout`, `memory_limit`) and the next scan a
//! fresh worker.

pub mod child;
pub mod protocol;
pub mod sandbox;

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use self::protocol::{Header, ProtocolError, Setup};
use crate::config::BurnedInMask;
use crate::deid::{DeidOutput, InputLimits};
use crate::scan::{EventKind, InputKind};
use crate::secret::DeviceSecret;

/// The quarantine codes of a scan that cost its worker (re-exported by
/// `pipeline::quarantine::codes`).
pub mod codes {
    /// The decoder worker died on this input (crash, abort, stack overflow, panic).
    pub const PROCESSOR_CRASHED: &str = "processor_crashed";
    /// Decoding took longer than its wall-clock or CPU budget.
    pub const TIMEOUT: &str = "timeout";
    /// Decoding needed more memory than the worker may have.
    pub const MEMORY_LIMIT: &str = "memory_limit";
}

/// Environment switch for the fault-injection inputs of the tests (see `child`).
pub const FAULT_INJECTION_ENV: &str = "OCTD_FAULT_INJECTION";
/// Longest refusal detail passed on from the worker.
const MAX_DETAIL: usize = 400;
/// Bytes of the worker's stderr kept, to tell an exhausted allocator from other deaths.
const STDERR_TAIL: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IsolationError {
    /// The input was refused by de-identification: quarantine it with this reason.
    #[error("{detail}")]
    Refused { code: String, detail: String, kind: EventKind },
    /// The worker died or was killed on this input: quarantine it with this reason.
    #[error("{detail}")]
    Killed { code: &'static str, detail: String },
    /// No worker could be started or spoken to: the device's problem, not the scan's.
    #[error("decoder worker: {0}")]
    Unavailable(String),
}

impl IsolationError {
    pub fn code(&self) -> &str {
        match self {
            IsolationError::Refused { code, .. } => code,
            IsolationError::Killed { code, .. } => code,
            IsolationError::Unavailable(_) => "worker_unavailable",
        }
    }
}

/// How decoder workers are started and limited.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub program: PathBuf,
    pub memory_bytes: u64,
    pub cpu_seconds: u64,
    pub timeout: Duration,
    pub secret: DeviceSecret,
    pub masks: Vec<BurnedInMask>,
    pub limits: InputLimits,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr_tail: Arc<Mutex<VecDeque<u8>>>,
    /// Ends when the worker's stderr closes: its last words are then in `stderr_tail`.
    stderr_reader: tokio::task::JoinHandle<()>,
}

/// One decoder worker process, started ahead of the first scan (`warm_up`) or by it, and again
/// by the next scan after each death.
pub struct Decoder {
    settings: Arc<WorkerSettings>,
    running: Option<Running>,
    fault_injection: bool,
    sandbox_logged: bool,
}

impl Decoder {
    pub fn new(settings: Arc<WorkerSettings>) -> Decoder {
        let fault_injection = std::env::var(FAULT_INJECTION_ENV).is_ok_and(|v| v == "1");
        Decoder { settings, running: None, fault_injection, sandbox_logged: false }
    }

    async fn start(&mut self) -> Result<&mut Running, IsolationError> {
        // A worker that died while idle (the kernel's OOM killer, an operator) is replaced
        // here, so its death is not blamed on the next scan.
        if let Some(running) = self.running.as_mut() {
            if !matches!(running.child.try_wait(), Ok(None)) {
                tracing::warn!("the decoder worker died while idle; starting a new one");
                self.running = None;
            }
        }
        if self.running.is_none() {
            let s = &self.settings;
            let mut child = Command::new(&s.program)
                .arg("worker")
                .arg("--memory-bytes")
                .arg(s.memory_bytes.to_string())
                .env_clear()
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| IsolationError::Unavailable(format!("cannot start {}: {e}", s.program.display())))?;
            let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(IsolationError::Unavailable("worker pipes missing".into()));
            };
            let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
            let tail = stderr_tail.clone();
            let stderr_reader = tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                    for &b in &buf[..n] {
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(b);
                    }
                }
            });
            let hello = tokio::time::timeout(Duration::from_secs(30), protocol::read_frame_async(&mut stdout, 0))
                .await
                .map_err(|_| IsolationError::Unavailable("the worker did not say hello within 30 s".into()))?;
            let sandbox = match hello {
                Ok((Header::Hello { sandbox, .. }, _)) => sandbox,
                Ok(_) => return Err(IsolationError::Unavailable("the worker spoke out of turn".into())),
                Err(e) => {
                    // Close its stdin and stop it first: a worker waiting for its setup
                    // would never exit on its own.
                    drop(stdin);
                    let _ = child.start_kill();
                    let status = child.wait().await.ok().and_then(|s| s.code());
                    return Err(IsolationError::Unavailable(format!(
                        "the worker did not start ({e}; exit status {status:?})"
                    )));
                }
            };
            if !self.sandbox_logged {
                tracing::info!(sandbox = %sandbox, memory_bytes = s.memory_bytes, "decoder worker confined");
                self.sandbox_logged = true;
            }
            let setup = Header::Setup(Setup {
                secret_hex: hex::encode(s.secret.bytes()),
                masks: s.masks.clone(),
                limits: s.limits,
                fault_injection: self.fault_injection,
            });
            protocol::write_frame_async(&mut stdin, &setup, &[])
                .await
                .map_err(|e| IsolationError::Unavailable(format!("worker setup: {e}")))?;
            self.running = Some(Running { child, stdin, stdout, stderr_tail, stderr_reader });
        }
        self.running.as_mut().ok_or_else(|| IsolationError::Unavailable("no worker".into()))
    }

    /// Start the worker before the first scan needs it: a scan then waits for no process
    /// start (about 3 ms here), the first ones after a restart included.
    pub async fn warm_up(&mut self) -> Result<(), IsolationError> {
        self.start().await.map(|_| ())
    }

    /// De-identify `input` in the worker.
    pub async fn deidentify(&mut self, input: Vec<u8>) -> Result<DeidOutput, IsolationError> {
        let cpu_seconds = self.settings.cpu_seconds;
        let timeout = self.settings.timeout;
        // The artefact can outgrow its input (a masked, decompressed DICOM object).
        let max_blob = self.settings.limits.max_decoded_bytes.saturating_add(self.settings.limits.max_file_bytes);
        let running = self.start().await?;
        let exchange = async {
            protocol::write_frame_async(&mut running.stdin, &Header::Job { cpu_seconds }, &input).await?;
            drop(input);
            protocol::read_frame_async(&mut running.stdout, max_blob).await
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        match outcome {
            Ok(Ok((Header::Done(done), mut artifact))) => {
                // What goes into results and events must be what octd itself would write,
                // whatever a worker gone wrong says.
                let uid_ok = done.study_uid.as_ref().is_none_or(|u| {
                    u.len() <= 64 && !u.is_empty() && u.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                });
                let laterality_ok = done.laterality.as_deref().is_none_or(|l| matches!(l, "R" | "L" | "B" | "U"));
                // Decoded pixels follow the artefact: only for a 2-D image, within the limits,
                // of the artefact's own size (PNG or JPEG header), and exactly as many bytes as
                // that size says.
                let limits = &self.settings.limits;
                let pixels = match done.pixels {
                    None => Ok(None),
                    Some(_) if done.kind == crate::scan::InputKind::Dicom => Err(()),
                    Some(p) => {
                        let size = u64::from(p.width)
                            .checked_mul(u64::from(p.height))
                            .and_then(|n| n.checked_mul(p.layout.bytes_per_pixel()))
                            .filter(|&n| n > 0 && n <= limits.max_decoded_bytes);
                        let artifact_size = usize::try_from(p.artifact_len)
                            .ok()
                            .and_then(|n| artifact.get(..n))
                            .and_then(|a| crate::deid::image_dimensions(&done.extension, a));
                        let fits = artifact_size == Some((p.width, p.height))
                            && size.and_then(|n| p.artifact_len.checked_add(n)) == Some(artifact.len() as u64);
                        match fits {
                            true => {
                                let bytes = artifact.split_off(p.artifact_len as usize);
                                // The received buffer's capacity held the pixels too: let it go.
                                artifact.shrink_to_fit();
                                Ok(Some(crate::deid::DecodedPixels {
                                    width: p.width,
                                    height: p.height,
                                    layout: p.layout,
                                    bytes,
                                }))
                            }
                            false => Err(()),
                        }
                    }
                };
                let Ok(pixels) = pixels else {
                    self.kill().await;
                    return Err(IsolationError::Killed {
                        code: codes::PROCESSOR_CRASHED,
                        detail: "the worker's answer did not hold together".into(),
                    });
                };
                if !uid_ok || !laterality_ok {
                    self.kill().await;
                    return Err(IsolationError::Killed {
                        code: codes::PROCESSOR_CRASHED,
                        detail: "the worker's answer did not hold together".into(),
                    });
                }
                Ok(DeidOutput {
                    kind: done.kind,
                    extension: extension(done.kind, &done.extension)?,
                    artifact,
                    frames: done.frames,
                    identifiers: done.identifiers,
                    study_uid: done.study_uid,
                    laterality: done.laterality,
                    pixels,
                })
            }
            Ok(Ok((Header::Refused { code, detail, kind }, _))) => {
                let known = crate::deid::DeidError::CODES.contains(&code.as_str()) || code == codes::PROCESSOR_CRASHED;
                if !known || !matches!(kind, EventKind::Rejected | EventKind::Quarantined) {
                    self.kill().await;
                    return Err(IsolationError::Killed {
                        code: codes::PROCESSOR_CRASHED,
                        detail: "the worker refused the input with a reason octd does not know".into(),
                    });
                }
                let detail: String = detail.chars().filter(|c| !c.is_control()).take(MAX_DETAIL).collect();
                Err(IsolationError::Refused { code, detail, kind })
            }
            Ok(Ok(_)) => {
                self.kill().await;
                Err(IsolationError::Killed {
                    code: codes::PROCESSOR_CRASHED,
                    detail: "the worker spoke out of turn".into(),
                })
            }
            Ok(Err(ProtocolError::BadFrame(why))) => {
                self.kill().await;
                Err(IsolationError::Killed { code: codes::PROCESSOR_CRASHED, detail: format!("bad answer: {why}") })
            }
            Ok(Err(_)) => Err(self.death().await),
            Err(_) => {
                self.kill().await;
                Err(IsolationError::Killed {
                    code: codes::TIMEOUT,
                    detail: format!("decoding took longer than {} s; the worker was stopped", timeout.as_secs()),
                })
            }
        }
    }

    async fn kill(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.start_kill();
            let _ = running.child.wait().await;
        }
    }

    /// The worker closed its pipe: find out how it died.
    async fn death(&mut self) -> IsolationError {
        let Some(mut running) = self.running.take() else {
            return IsolationError::Unavailable("no worker".into());
        };
        let status = match tokio::time::timeout(Duration::from_secs(5), running.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = running.child.start_kill();
                running.child.wait().await.ok()
            }
        };
        // The worker is gone, so its stderr closes: wait for the reader to have it all.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut running.stderr_reader).await;
        let tail: Vec<u8> = running.stderr_tail.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        let said = |needle: &[u8]| tail.windows(needle.len()).any(|w| w == needle);
        let signal = status.and_then(|s| s.signal());
        // Never the worker's own words in the reason: they may quote the input.
        if said(b"memory allocation of") {
            return IsolationError::Killed {
                code: codes::MEMORY_LIMIT,
                detail: format!(
                    "decoding needed more than the worker's {} MiB address space",
                    self.settings.memory_bytes >> 20
                ),
            };
        }
        match signal {
            Some(libc::SIGXCPU) => IsolationError::Killed {
                code: codes::TIMEOUT,
                detail: format!(
                    "decoding used more than {} s of CPU; the kernel stopped the worker",
                    self.settings.cpu_seconds
                ),
            },
            Some(libc::SIGKILL) => IsolationError::Killed {
                code: codes::MEMORY_LIMIT,
                detail: "the worker was killed (SIGKILL), as the kernel does when memory runs out".into(),
            },
            Some(sig) => IsolationError::Killed {
                code: codes::PROCESSOR_CRASHED,
                detail: format!(
                    "the decoder worker died of signal {sig}{}",
                    if said(b"overflowed its stack") { " (stack overflow)" } else { "" }
                ),
            },
            // The worker's own exits: it could not confine itself or lost the protocol. The
            // device's problem, not this scan's.
            None if matches!(status.and_then(|s| s.code()), Some(child::EXIT_SANDBOX | child::EXIT_PROTOCOL)) => {
                IsolationError::Unavailable(format!(
                    "the decoder worker gave up (exit status {:?}); see its sandbox and protocol",
                    status.and_then(|s| s.code())
                ))
            }
            None => IsolationError::Killed {
                code: codes::PROCESSOR_CRASHED,
                detail: format!("the decoder worker exited with status {:?}", status.and_then(|s| s.code())),
            },
        }
    }
}

fn extension(kind: InputKind, claimed: &str) -> Result<&'static str, IsolationError> {
    match (kind, claimed) {
        (InputKind::Dicom, "dcm") => Ok("dcm"),
        (InputKind::Dicom, _) => Err(IsolationError::Killed {
            code: codes::PROCESSOR_CRASHED,
            detail: format!("the worker named a DICOM artefact {claimed:?}"),
        }),
        (InputKind::Jpeg, "jpg") => Ok("jpg"),
        (_, "png") => Ok("png"),
        _ => Err(IsolationError::Killed {
            code: codes::PROCESSOR_CRASHED,
            detail: format!("the worker named an image artefact {claimed:?}"),
        }),
    }
}
