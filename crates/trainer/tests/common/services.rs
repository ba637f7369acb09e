//! Real backing services for the fleet path: PostgreSQL from the Debian package, started as
//! its unprivileged `postgres` user on a free port in a scratch cluster, and an
//! S3-compatible server (moto's server mode, from the pinned Python requirements).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, repo};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn skip<T>(var: &str, why: &str) -> Option<T> {
    assert!(!required(var), "{why}, and {var}=1 requires it");
    eprintln!("SKIPPED: {why}; set {var}=1 to require it");
    None
}

fn wait_port(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// A scratch cluster owned by `postgres` under `dir`, trust authentication on loopback.
    pub fn start(dir: &Path) -> Option<Postgres> {
        const VAR: &str = "OCTD_REQUIRE_POSTGRES";
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("initdb").exists()).max());
        let Some(bin) = bin else { return skip(VAR, "PostgreSQL (Debian package postgresql) is not installed") };
        // PostgreSQL refuses to run as root: root hands the cluster to the package's
        // unprivileged `postgres` user; anyone else runs it as themselves.
        let root = is_root();
        let run_as = |args: &[&str]| -> bool {
            let mut cmd = if root { Command::new("runuser") } else { Command::new(args[0]) };
            if root {
                cmd.args(["-u", "postgres", "--"]).arg(args[0]);
            }
            cmd.args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        };
        let data = dir.join("pgdata");
        std::fs::create_dir_all(dir).unwrap();
        if root {
            if !Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status().is_ok_and(|s| s.success()) {
                return skip(VAR, "cannot hand a folder to the postgres user");
            }
            // Every folder above must let postgres through.
            let mut up = dir.parent();
            while let Some(p) = up {
                let _ = Command::new("chmod").arg("o+x").arg(p).status();
                up = p.parent();
            }
        }
        let initdb = bin.join("initdb");
        if !run_as(&[initdb.to_str().unwrap(), "-D", data.to_str().unwrap(), "-A", "trust", "-U", "octd"]) {
            return skip(VAR, "initdb failed as the postgres user");
        }
        let port = free_port();
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", dir.display());
        let pg_ctl = bin.join("pg_ctl");
        let log = dir.join("postgres.log");
        if !run_as(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]) {
            return skip(
                VAR,
                &format!("PostgreSQL did not start: {}", std::fs::read_to_string(&log).unwrap_or_default()),
            );
        }
        Some(Postgres { dir: dir.to_path_buf(), bin, port })
    }

    pub fn url(&self) -> String {
        format!("postgres://octd@127.0.0.1:{}/postgres", self.port)
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("pgdata");
        let mut cmd = if is_root() { Command::new("runuser") } else { Command::new(&pg_ctl) };
        if is_root() {
            cmd.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        }
        let _ = cmd
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// moto's S3-compatible server on a free port, with one bucket.
pub struct S3 {
    child: Child,
    pub port: u16,
}

impl S3 {
    pub fn start(bucket: &str) -> Option<S3> {
        const VAR: &str = "OCTD_REQUIRE_S3";
        let server = repo().join(".venv/bin/moto_server");
        if !server.exists() {
            return skip(VAR, "no .venv/bin/moto_server (pip install -r trainer/requirements.txt)");
        }
        let port = free_port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let s3 = S3 { child, port };
        if !wait_port(port) {
            return skip(VAR, "moto_server did not start");
        }
        // CreateBucket: a plain PUT (moto accepts unsigned requests).
        let reply = super::http(port, "PUT", &format!("/{bucket}"), &[], b"");
        assert_eq!(reply.status, 200, "create bucket: {reply:?}");
        Some(s3)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
