//! The shipped unit file, checked by systemd's own tools: `systemd-analyze verify` (syntax,
//! directives, the executable) and `systemd-analyze security` (exposure, goal <= 2.0).

mod common;

use std::path::PathBuf;
use std::process::Command;

fn analyze_available() -> bool {
    let ok = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("OCTD_REQUIRE_MOSQUITTO").is_none(),
            "systemd-analyze is required in CI (scripts/test.sh installs the systemd package)"
        );
        eprintln!("SKIP: systemd-analyze not installed");
    }
    ok
}

/// The unit with ExecStart pointing at the binary under test (verify checks it exists),
/// or None (after saying why) where systemd-analyze is missing.
fn unit_under_test() -> Option<(tempfile::TempDir, PathBuf)> {
    if !analyze_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::repo().join("systemd/octd.service")).unwrap();
    let text = text.replace("ExecStart=/usr/bin/octd", &format!("ExecStart={}", env!("CARGO_BIN_EXE_octd")));
    let path = dir.path().join("octd.service");
    std::fs::write(&path, text).unwrap();
    Some((dir, path))
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some((_dir, unit)) = unit_under_test() else { return };
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    // verify reports unknown directives and bad values as warnings with exit 0 on some versions.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("octd.service")).collect();
    assert!(ours.is_empty(), "warnings about the unit:\n{}", ours.join("\n"));
}

#[test]
fn unit_exposure_is_at_most_2() {
    let Some((_dir, unit)) = unit_under_test() else { return };
    let out =
        Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&unit).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("no figure in:\n{text}"));
    let figure: f64 = line.split(':').nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    eprintln!("systemd-analyze security: {}", line.trim());
    assert!(figure <= 2.0, "exposure {figure} > 2.0:\n{text}");
}

#[test]
fn unit_declares_what_the_daemon_relies_on() {
    let text = std::fs::read_to_string(common::repo().join("systemd/octd.service")).unwrap();
    let has = |line: &str| text.lines().any(|l| l.trim() == line);
    assert!(has("Type=notify"));
    assert!(has("Restart=on-failure"));
    assert!(has(&format!("RestartPreventExitStatus={}", octd::EXIT_CONFIG)), "config errors must not restart-loop");
    assert!(text.lines().any(|l| l.starts_with("WatchdogSec=")));
    assert!(
        has("User=octd")
            && has("StateDirectory=octd")
            && has("ConfigurationDirectory=octd")
            && has("LogsDirectory=octd")
    );
    assert!(has("ProtectSystem=strict") && has("NoNewPrivileges=yes") && has("CapabilityBoundingSet="));
}

#[test]
fn a_configuration_error_exits_with_the_code_systemd_will_not_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("octd.toml");
    std::fs::write(&config, "[ingest]\nsettle = \"0s\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_octd")).args(["run", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(octd::EXIT_CONFIG), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ingest.settle"));
}
