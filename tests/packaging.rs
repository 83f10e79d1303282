//! What an operator installs and reads first, checked with the real
//! binary: `--version`, shell completions and man pages.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_tcplb");

fn tcplb(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("tcplb-packaging-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `program` runs here (optional tools are checked when present).
fn installed(program: &str, version_flag: &str) -> bool {
    Command::new(program)
        .arg(version_flag)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The subcommands `tcplb --help` lists.
fn subcommands() -> Vec<String> {
    let help = text(&tcplb(&["--help"]).stdout);
    let list = help
        .split("Commands:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no Commands: in\n{help}"));
    let names: Vec<String> = list
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 6, "{names:?}");
    names
}

#[test]
fn version_prints_the_package_version() {
    let out = tcplb(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        format!("tcplb {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    // Loads the script into bash and asks its completion function, as
    // bash does on Tab: (words so far) -> candidates.
    let complete = |words: &str| {
        let script = format!(
            "source <(\"$0\" completions bash) || exit 1\n\
             COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n\
             _tcplb tcplb \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let out = Command::new("bash")
            .args(["-c", &script, BIN])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut words: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
        words.sort();
        words
    };
    assert_eq!(complete("tcplb rel"), ["reload"]);
    assert_eq!(complete("tcplb certs init --ca"), ["--ca-cert", "--ca-key"]);
    assert_eq!(complete("tcplb completions z"), ["zsh"]);
}

#[test]
fn zsh_and_fish_scripts_cover_every_subcommand() {
    for (shell, opening) in [("zsh", "#compdef tcplb"), ("fish", "complete -c tcplb")] {
        let out = tcplb(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains(opening), "{shell}:\n{script}");
        for name in subcommands() {
            assert!(script.contains(&name), "{shell}: no {name}");
        }
        // A syntax check where the shell is installed.
        if installed(shell, "--version") {
            let file = TempDir::new(&format!("completion-{shell}"));
            std::fs::write(file.join("tcplb"), &script).unwrap();
            let check = Command::new(shell)
                .arg("-n")
                .arg(file.join("tcplb"))
                .output()
                .unwrap();
            assert!(check.status.success(), "{shell}: {}", text(&check.stderr));
        } else {
            println!("{shell} is not installed: its script's syntax was not checked");
        }
    }
}

#[test]
fn man_pages_document_every_subcommand_and_flag() {
    let out = tcplb(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH tcplb 1"), "{page}");
    // roff escapes the dashes of flags.
    for flag in [
        "config",
        "listen",
        "host",
        "admin",
        "idle\\-timeout",
        "max\\-connections",
    ] {
        assert!(
            page.contains(&format!("\\fB\\-\\-{flag}\\fR")),
            "no --{flag}"
        );
    }
    let dir = TempDir::new("man");
    let pages = dir.join("man1");
    let out = tcplb(&["man", "--dir", pages.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut names = vec!["tcplb".to_string()];
    names.extend(subcommands().iter().map(|s| format!("tcplb-{s}")));
    names.push("tcplb-certs-init".to_string());
    for name in &names {
        let file = pages.join(format!("{name}.1"));
        let roff = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(roff.contains(&format!(".TH {name} 1")), "{name}");
    }
    assert!(
        std::fs::read_to_string(pages.join("tcplb-certs-init.1"))
            .unwrap()
            .contains("\\-\\-ca\\-cert")
    );
    // Rendered by man(1) without a warning, where it is installed.
    if installed("man", "--version") {
        let rendered = Command::new("man")
            .env("MANWIDTH", "80")
            .arg("-l")
            .arg(pages.join("tcplb.1"))
            .output()
            .unwrap();
        assert!(rendered.status.success() && rendered.stderr.is_empty());
        let rendered = text(&rendered.stdout);
        assert!(rendered.contains("tcplb-reload(1)"), "{rendered}");
    } else {
        println!("man is not installed: the page was not rendered");
    }
}
