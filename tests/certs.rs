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
