//! `tcplb certs init`, the real binary writing real files: key modes, an
//! existing CA kept unless `--force`, more certificates from an existing
//! CA, and the quick start's printed config.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tcplb-certs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tcplb ARGS` under umask 022, the common default, so that a file
/// written without an explicit mode comes out 0644 whatever the test
/// runner's umask is.
fn tcplb(args: &[&str]) -> Output {
    Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_tcplb"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn every_key_is_written_readable_by_its_owner_only() {
    let dir = TempDir::new("modes");
    // A key left by an earlier run, readable by everyone: replaced by a
    // file created 0600, not kept with its old mode.
    std::fs::write(dir.join("bob.key"), "old").unwrap();
    std::fs::set_permissions(dir.join("bob.key"), PermissionsExt::from_mode(0o644)).unwrap();
    let out = tcplb(&[
        "certs",
        "init",
        "--dir",
        dir.arg(),
        "--client",
        "alice",
        "--client",
        "spiffe://example.org/bob",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for key in ["ca.key", "server.key", "alice.key", "bob.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    assert_ne!(std::fs::read_to_string(dir.join("bob.key")).unwrap(), "old");
    for cert in ["ca.pem", "server.pem", "alice.pem", "bob.pem"] {
        assert_eq!(mode(&dir.join(cert)), 0o644, "{cert}");
    }
}

/// `openssl verify` of `cert` against `ca` for `purpose` (sslclient or
/// sslserver): whether a peer trusting `ca` accepts it.
fn verifies(ca: &Path, cert: &Path, purpose: &str) -> bool {
    Command::new("openssl")
        .args(["verify", "-purpose", purpose, "-CAfile"])
        .args([ca, cert])
        .output()
        .expect("openssl is installed (.ci/run installs it)")
        .status
        .success()
}

#[test]
fn an_existing_ca_is_kept_unless_forced() {
    let dir = TempDir::new("keep-ca");
    let init = |extra: &[&str]| {
        let mut args = vec!["certs", "init", "--dir", dir.arg(), "--client", "alice"];
        args.extend_from_slice(extra);
        tcplb(&args)
    };
    assert!(init(&[]).status.success());
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let ca_key = std::fs::read(dir.join("ca.key")).unwrap();

    let again = init(&[]);
    assert_eq!(again.status.code(), Some(1));
    let err = text(&again.stderr);
    let named = format!("{}: already exists", dir.join("ca.pem").display());
    assert!(err.contains(&named), "{err}");
    assert!(
        err.contains("--ca-cert") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), ca_key);
    assert!(verifies(
        &dir.join("ca.pem"),
        &dir.join("alice.pem"),
        "sslclient"
    ));

    // Only the key left: still refused, and that file is the one named.
    std::fs::remove_file(dir.join("ca.pem")).unwrap();
    let err = text(&init(&[]).stderr);
    let named = format!("{}: already exists", dir.join("ca.key").display());
    assert!(err.contains(&named), "{err}");
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();

    let forced = init(&["--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
}

#[test]
fn more_certificates_are_issued_from_an_existing_ca() {
    let dir = TempDir::new("more");
    let first = tcplb(&["certs", "init", "--dir", dir.arg(), "--client", "alice"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let ca = dir.join("ca.pem");
    let (ca_arg, key_arg) = (ca.to_str().unwrap(), dir.join("ca.key"));
    let ca_pem = std::fs::read(&ca).unwrap();
    let server_pem = std::fs::read(dir.join("server.pem")).unwrap();

    let more = tcplb(&[
        "certs",
        "init",
        "--dir",
        dir.arg(),
        "--ca-cert",
        ca_arg,
        "--ca-key",
        key_arg.to_str().unwrap(),
        "--client",
        "carol",
        "--client",
        "spiffe://example.org/dave",
    ]);
    assert!(more.status.success(), "{}", text(&more.stderr));
    assert_eq!(std::fs::read(&ca).unwrap(), ca_pem, "the CA is kept");
    // Without --server-name, the server's certificate is left alone.
    assert_eq!(std::fs::read(dir.join("server.pem")).unwrap(), server_pem);
    for client in ["alice", "carol", "dave"] {
        let cert = dir.join(&format!("{client}.pem"));
        assert!(verifies(&ca, &cert, "sslclient"), "{client}");
        assert_eq!(mode(&dir.join(&format!("{client}.key"))), 0o600);
    }
    let rules = text(&more.stdout);
    assert!(rules.contains("identity = \"carol\""), "{rules}");
    assert!(!rules.contains("\n[tls]\n"), "{rules}");

    // A second server certificate, for another name, from the same CA.
    let other = TempDir::new("more-server");
    let server = tcplb(&[
        "certs",
        "init",
        "--dir",
        other.arg(),
        "--ca-cert",
        ca_arg,
        "--ca-key",
        key_arg.to_str().unwrap(),
        "--server-name",
        "lb2.example.org",
    ]);
    assert!(server.status.success(), "{}", text(&server.stderr));
    assert!(verifies(&ca, &other.join("server.pem"), "sslserver"));
    assert!(!other.join("ca.pem").exists() && !other.join("ca.key").exists());
}

#[test]
fn a_ca_key_that_is_not_the_cas_is_refused_and_nothing_is_written() {
    let dir = TempDir::new("wrong-key");
    let first = tcplb(&["certs", "init", "--dir", dir.arg(), "--client", "alice"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let wrong = dir.join("alice.key");
    let out = tcplb(&[
        "certs",
        "init",
        "--dir",
        dir.arg(),
        "--ca-cert",
        dir.join("ca.pem").to_str().unwrap(),
        "--ca-key",
        wrong.to_str().unwrap(),
        "--client",
        "carol",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}: ", wrong.display())) && err.contains("not that CA's key"),
        "{err}"
    );
    assert!(!dir.join("carol.pem").exists() && !dir.join("carol.key").exists());
}

#[test]
fn the_printed_config_of_the_quick_start_checks_out() {
    // As the README's quick start: `certs init ... > lb.toml`, then
    // `tcplb check lb.toml`, in the same folder.
    let dir = TempDir::new("quick-start");
    let out = Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .current_dir(&dir.0)
        .args(["certs", "init", "--dir", "certs", "--client", "alice"])
        .args(["--client", "spiffe://example.org/bob"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(dir.join("lb.toml"), &out.stdout).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .current_dir(&dir.0)
        .args(["check", "lb.toml"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        text(&check.stderr),
        text(&out.stdout)
    );
    let config = text(&out.stdout);
    for needle in [
        "cert = \"certs/server.pem\"",
        "identity = \"spiffe://example.org/bob\"",
        "openssl s_client",
    ] {
        assert!(config.contains(needle), "no {needle:?} in:\n{config}");
    }
}
