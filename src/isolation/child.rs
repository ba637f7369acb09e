//! `octd worker`: the decoder worker. Confines itself, then de-identifies one input after
//! another from its stdin, answering on its stdout. It holds no file, socket or store: if a
//! decoder crashes, hangs or exhausts memory, only this process is lost.

use std::io::Write;
use std::panic::AssertUnwindSafe;

use super::protocol::{self, Done, Header, Setup};
use super::sandbox;
use crate::deid::{DeidError, Deidentifier};
use crate::scan::EventKind;
use crate::secret::DeviceSecret;

/// Exit statuses of the worker; the daemon reads them.
pub const EXIT_PROTOCOL: i32 = 3;
pub const EXIT_SANDBOX: i32 = 4;

/// Runs the worker; returns its exit status.
pub fn serve(memory_bytes: u64) -> i32 {
    let cpu_hard = sandbox::cpu_hard_limit();
    let sandbox = match sandbox::confine(memory_bytes) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "octd worker: cannot confine itself: {e}");
            return EXIT_SANDBOX;
        }
    };
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let hello = Header::Hello { pid: std::process::id(), sandbox };
    if protocol::write_frame(&mut output, &hello, &[]).is_err() {
        return EXIT_PROTOCOL;
    }
    let setup = match protocol::read_frame(&mut input, 0) {
        Ok(Some((Header::Setup(setup), _))) => setup,
        _ => return EXIT_PROTOCOL,
    };
    let Some(deid) = deidentifier(&setup) else { return EXIT_PROTOCOL };
    let max_blob = setup.limits.max_file_bytes;
    loop {
        let (cpu_seconds, bytes) = match protocol::read_frame(&mut input, max_blob) {
            Ok(None) => return 0,
            Ok(Some((Header::Job { cpu_seconds }, bytes))) => (cpu_seconds, bytes),
            Ok(Some(_)) | Err(_) => return EXIT_PROTOCOL,
        };
        if let Err(e) = sandbox::cpu_budget(cpu_seconds, cpu_hard) {
            let _ = writeln!(std::io::stderr(), "octd worker: {e}");
            return EXIT_SANDBOX;
        }
        if setup.fault_injection {
            inject_fault(&bytes);
        }
        // A panic in a decoder is that input's fault: refuse it and keep serving.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| deid.deidentify_bytes(bytes)));
        let written = match outcome {
            Ok(Ok(out)) => {
                let pixels = out.pixels.as_ref().map(|p| protocol::PixelsHeader {
                    artifact_len: out.artifact.len() as u64,
                    width: p.width,
                    height: p.height,
                    layout: p.layout,
                });
                let done = Done {
                    kind: out.kind,
                    extension: out.extension.to_string(),
                    frames: out.frames,
                    identifiers: out.identifiers,
                    study_uid: out.study_uid,
                    laterality: out.laterality,
                    pixels,
                };
                let decoded = out.pixels.as_ref().map_or(&[][..], |p| &p.bytes[..]);
                protocol::write_frame_parts(&mut output, &Header::Done(done), &[&out.artifact, decoded])
            }
            Ok(Err(e)) => protocol::write_frame(&mut output, &refusal(&e), &[]),
            Err(_) => {
                let header = Header::Refused {
                    code: super::codes::PROCESSOR_CRASHED.into(),
                    detail: "a decoder panicked on this input".into(),
                    kind: EventKind::Rejected,
                };
                protocol::write_frame(&mut output, &header, &[])
            }
        };
        if written.is_err() {
            return EXIT_PROTOCOL;
        }
    }
}

fn deidentifier(setup: &Setup) -> Option<Deidentifier> {
    let bytes = hex::decode(&setup.secret_hex).ok()?;
    let secret: [u8; 32] = bytes.try_into().ok()?;
    Some(Deidentifier::new(DeviceSecret::from_bytes(secret), setup.masks.clone(), setup.limits))
}

fn refusal(e: &DeidError) -> Header {
    Header::Refused { code: e.code().into(), detail: e.to_string(), kind: e.event_kind() }
}

/// Faults on demand, for the tests that prove a dying decoder costs only its scan: an input
/// holding `OCTD-FAULT:<kind>` makes the worker fail that way. Only when the daemon runs
/// with `OCTD_FAULT_INJECTION=1`; a field device never does.
fn inject_fault(bytes: &[u8]) {
    const MARK: &[u8] = b"OCTD-FAULT:";
    let Some(at) = bytes.windows(MARK.len()).position(|w| w == MARK) else { return };
    let rest = &bytes[at + MARK.len()..];
    let word: Vec<u8> = rest.iter().take(16).copied().take_while(u8::is_ascii_lowercase).collect();
    match word.as_slice() {
        b"abort" => std::process::abort(),
        b"panic" => panic!("injected decoder panic"),
        b"stack" => {
            #[allow(unconditional_recursion)]
            fn deeper(n: u64, pad: &mut [u8; 4096]) -> u64 {
                pad[(n % 4096) as usize] = n as u8;
                let mut next = [0u8; 4096];
                deeper(n + 1, std::hint::black_box(&mut next)) + u64::from(pad[0])
            }
            let mut pad = [0u8; 4096];
            std::hint::black_box(deeper(0, &mut pad));
        }
        b"oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut chunk = vec![1u8; 64 << 20];
                chunk[0] = hoard.len() as u8;
                hoard.push(std::hint::black_box(chunk));
            }
        }
        b"hang" => loop {
            std::hint::black_box(0u64);
        },
        b"sleep" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        b"escape" => {
            // Try what a compromised decoder would: read a file, open a socket.
            let file = std::fs::read("/etc/hostname").is_ok() || std::fs::read("/proc/self/status").is_ok();
            let socket =
                std::net::TcpStream::connect("127.0.0.1:9").is_ok() || std::net::UdpSocket::bind("127.0.0.1:0").is_ok();
            if file || socket {
                panic!("the sandbox let a decoder open a file or a socket");
            }
        }
        _ => {}
    }
}
