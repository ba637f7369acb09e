//! Packaging: the Debian package built by cargo-deb from the binary under test (contents,
//! modes, conffiles, maintainer scripts, and the packaged files used the way the device
//! will), and the Yocto layer (lint clean with oelint-adv, crate list in step with
//! Cargo.lock, every file the recipe installs present).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo;

fn required() -> bool {
    std::env::var_os("OCTD_REQUIRE_MOSQUITTO").is_some()
}

fn tool_available(program: &str, args: &[&str], why: &str) -> bool {
    let ok = Command::new(program).args(args).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(!required(), "{program} is required in CI ({why}); scripts/test.sh installs it");
        eprintln!("SKIP: {program} not installed ({why})");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn debian_package_holds_the_appliance_and_its_scripts_are_sound() {
    if !tool_available("cargo-deb", &["--version"], "builds the .deb")
        || !tool_available("dpkg-deb", &["--version"], "reads it")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("octd.deb");
    // The binary under test (dev profile), stripped by cargo-deb; `cargo deb` alone makes the
    // release package from the same metadata.
    run(Command::new("cargo")
        .current_dir(repo())
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "-o"])
        .arg(&deb));

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/octd",
        "./usr/lib/systemd/system/octd.service",
        "./etc/octd/octd.toml",
        "./etc/octd/root.json",
        "./usr/share/octd/channel/metadata/timestamp.json",
        "./usr/share/octd/systemd/octd-gpu.conf",
        "./usr/share/doc/octd/field-operations.md",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} missing from the package:\n{listing}");
    }
    let (name, version) = common::shipped_model();
    let bundle = format!(".octd-model-{name}-{version}.tar.gz");
    assert!(listing.lines().any(|l| l.contains(&bundle)), "the default model bundle {bundle}");
    let config_line = listing.lines().find(|l| l.ends_with("./etc/octd/octd.toml")).unwrap();
    assert!(config_line.starts_with("-rw-r-----"), "the configuration may hold a password: {config_line}");

    let control = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let fields = std::fs::read_to_string(control.join("control")).unwrap();
    assert!(
        fields.contains("Package: octd") && fields.lines().any(|l| l.starts_with("Depends:") && l.contains("adduser")),
        "{fields}"
    );
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/octd/octd.toml") && conffiles.lines().any(|l| l == "/etc/octd/root.json")
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group") && postinst.contains("octd"), "postinst creates the user");
    assert!(postinst.contains("deb-systemd-helper"), "the unit is enabled through debhelper's snippet:\n{postinst}");
    assert!(!postinst.contains("#DEBHELPER#"), "the debhelper token was substituted");
    for script in ["postinst", "postrm", "prerm"] {
        let path = control.join(script);
        if path.exists() {
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o111, 0o111, "{script} executable");
            run(Command::new("sh").arg("-n").arg(&path));
        }
    }
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert!(postrm.contains("purge") && postrm.contains("/var/lib/octd"));

    // Unpacked into a throwaway root, the package's own files work together: the binary runs,
    // accepts the packaged configuration, and verifies the packaged channel with the packaged root.
    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let octd = root.join("usr/bin/octd");
    assert!(run(Command::new(&octd).arg("--version")).contains("octd"));
    let checked = run(Command::new(&octd).args(["config", "check", "--config"]).arg(root.join("etc/octd/octd.toml")));
    assert!(checked.contains("/var/lib/octd") && checked.contains("/srv/octd/inbox"), "{checked}");
    let verified = run(Command::new(&octd)
        .current_dir(dir.path())
        .args(["bundle", "verify", "--repository"])
        .arg(root.join("usr/share/octd/channel"))
        .arg("--root")
        .arg(root.join("etc/octd/root.json")));
    assert!(verified.contains(&common::shipped_model().1), "{verified}");
    assert_eq!(
        std::fs::read_to_string(root.join("usr/lib/systemd/system/octd.service")).unwrap(),
        std::fs::read_to_string(repo().join("systemd/octd.service")).unwrap()
    );

    install_in_a_throwaway_root(&deb, dir.path());
}

/// `dpkg -i` then `dpkg --purge` for real, inside a chroot whose root is an overlay of this
/// machine's (writes land in a temporary upper layer; a private mount namespace drops the
/// overlay with the process), so the maintainer scripts run as on a device while this
/// machine gets no user and no files. Needs root and overlayfs; skipped (with a message)
/// where those are not available.
fn install_in_a_throwaway_root(deb: &Path, dir: &Path) {
    let is_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let on_path =
        |p: &str| std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).exists()));
    // The chroot is this machine's root: the package's dependencies must be installed here.
    let needed = ["unshare", "chroot", "dpkg", "adduser", "deb-systemd-helper"];
    if !is_root || needed.iter().any(|p| !on_path(p)) {
        eprintln!("SKIP: installing the .deb in a throwaway root needs root and {needed:?}");
        return;
    }
    let host_user = || Command::new("getent").args(["passwd", "octd"]).output().is_ok_and(|o| o.status.success());
    let host_had_user = host_user();
    let host_had_state = Path::new("/var/lib/octd").exists();
    let ov = dir.join("overlay");
    for d in ["upper", "work", "merged"] {
        std::fs::create_dir_all(ov.join(d)).unwrap();
    }
    let script = format!(
        r#"set -e
mount -t overlay overlay -o lowerdir=/,upperdir={ov}/upper,workdir={ov}/work {ov}/merged || exit 77
cp {deb} {ov}/merged/root/octd.deb
chroot {ov}/merged sh -ec '
  dpkg -i /root/octd.deb
  echo "user: $(getent passwd octd)"
  echo "state: $(stat -c "%U:%G %a" /var/lib/octd)"
  echo "inbox: $(stat -c "%U:%G %a" /srv/octd/inbox)"
  echo "config: $(stat -c "%U:%G %a" /etc/octd/octd.toml)"
  echo "enabled: $(readlink /etc/systemd/system/multi-user.target.wants/octd.service)"
  octd doctor --config /etc/octd/octd.toml > /root/doctor.txt && echo "doctor: ok" || {{ cat /root/doctor.txt; echo "doctor: failed"; }}
  dpkg --purge octd
  test ! -e /var/lib/octd && echo "purged: state removed"
  test ! -e /usr/bin/octd && echo "purged: binary removed"
'
"#,
        ov = ov.display(),
        deb = deb.display()
    );
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.code() == Some(77) {
        eprintln!("SKIP: no overlayfs here for a throwaway root:\n{text}");
        return;
    }
    assert!(out.status.success(), "install in the throwaway root failed:\n{text}");
    assert!(
        text.contains("user: octd:x:") && text.contains("/usr/sbin/nologin"),
        "postinst created the system user:\n{text}"
    );
    assert!(text.contains("state: octd:octd 750"), "{text}");
    assert!(text.contains("inbox: octd:octd 750"), "{text}");
    assert!(text.contains("config: root:octd 640"), "{text}");
    assert!(
        text.contains("enabled: /lib/systemd/system/octd.service")
            || text.contains("enabled: /usr/lib/systemd/system/octd.service"),
        "{text}"
    );
    assert!(text.contains("doctor: ok"), "the freshly installed device passes doctor:\n{text}");
    assert!(text.contains("purged: state removed") && text.contains("purged: binary removed"), "{text}");
    assert!(!text.contains("Warning"), "maintainer scripts warned:\n{text}");
    // And this machine is untouched.
    assert_eq!(host_user(), host_had_user, "the host's users changed");
    assert_eq!(Path::new("/var/lib/octd").exists(), host_had_state, "the host's /var/lib changed");
}

#[test]
fn yocto_crate_list_matches_cargo_lock() {
    run(Command::new("python3").arg(repo().join("scripts/yocto-crates.py")).arg("--check"));
}

#[test]
fn yocto_recipe_installs_files_that_exist() {
    let recipe = std::fs::read_to_string(repo().join("yocto-layer/meta-octd/recipes-octd/octd/octd_0.1.0.bb")).unwrap();
    let mut checked = 0;
    for word in recipe.split_whitespace() {
        let Some(rel) = word.strip_prefix("${S}/") else { continue };
        let pattern = repo().join(rel);
        let found = if rel.ends_with('*') || rel.ends_with("*.json") {
            let (dir, suffix) = rel.rsplit_once('/').unwrap();
            let suffix = suffix.trim_start_matches('*');
            std::fs::read_dir(repo().join(dir))
                .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(suffix)))
        } else {
            pattern.is_file()
        };
        assert!(found, "the recipe installs {rel}, which is not in the tree");
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} installed files found in the recipe");
    let layer = std::fs::read_to_string(repo().join("yocto-layer/meta-octd/conf/layer.conf")).unwrap();
    for var in ["BBFILE_COLLECTIONS", "BBFILE_PATTERN_octd", "LAYERSERIES_COMPAT_octd", "LAYERDEPENDS_octd"] {
        assert!(layer.contains(var), "layer.conf lacks {var}");
    }
}

#[test]
fn yocto_layer_is_lint_clean() {
    let oelint: PathBuf = repo().join(".venv/bin/oelint-adv");
    if !oelint.exists() {
        assert!(!required(), "oelint-adv is required in CI (trainer/requirements.txt, installed by scripts/test.sh)");
        eprintln!("SKIP: .venv/bin/oelint-adv not installed (run scripts/test.sh)");
        return;
    }
    let layer = repo().join("yocto-layer/meta-octd");
    let recipes: Vec<PathBuf> = ["recipes-octd/octd/octd_0.1.0.bb", "recipes-core/packagegroups/packagegroup-octd.bb"]
        .iter()
        .map(|r| layer.join(r))
        .collect();
    // HOMEPAGE reachability needs the network, which tests do not have.
    let out = Command::new(&oelint)
        .args(["--quiet", "--suppress", "oelint.vars.homepageping"])
        .args(&recipes)
        .current_dir(Path::new(&layer))
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let problems: Vec<&str> = report.lines().filter(|l| l.contains(":error:") || l.contains(":warning:")).collect();
    assert!(problems.is_empty(), "oelint-adv:\n{}", problems.join("\n"));
}
