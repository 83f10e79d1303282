//! What an operator installs and reads first, checked with the real binary
//! and the repository's real files: `--version`, shell completions, man
//! pages, the sample config `examples/lb.toml`, and the systemd unit
//! `examples/tcplb.service`, whose commands are run as written (and which
//! `systemd-analyze verify` checks where it is installed).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_tcplb");

fn tcplb(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file of the repository.
fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
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

#[test]
fn the_sample_config_checks_out_as_shipped_and_with_tls_uncommented() {
    let sample = repo_file("examples/lb.toml");
    let out = tcplb(&["check", sample.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (2 upstreams"));

    // Its settings to uncomment (`#` then a key or a table, as the file's
    // opening says) make a valid mTLS config with `certs init`'s files.
    let dir = TempDir::new("sample-tls");
    let uncommented: String = std::fs::read_to_string(&sample)
        .unwrap()
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if !rest.starts_with([' ', '#']) && !rest.is_empty() => rest,
            _ => line,
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    assert!(uncommented.contains("\n[tls]\n"), "{uncommented}");
    std::fs::write(dir.join("lb.toml"), &uncommented).unwrap();
    let certs = dir.join("certs");
    let out = tcplb(&[
        "certs",
        "init",
        "--dir",
        certs.to_str().unwrap(),
        "--client",
        "alice",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = tcplb(&["check", dir.join("lb.toml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (3 upstreams"));
}

/// The unit's `Key=value` lines of section `[section]`, comments left out.
fn unit_lines(unit: &str, section: &str) -> Vec<(String, String)> {
    let header = format!("[{section}]");
    unit.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.split_once('=').unwrap();
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// Where the README's install puts the binary, and the config the unit runs.
const INSTALLED: &str = "/usr/local/bin/tcplb";
const UNIT_CONFIG: &str = "/etc/tcplb/lb.toml";

/// A command line of the unit, with the installed binary and config
/// replaced by the built binary and `config`: (program, arguments).
fn unit_command(line: &str, config: &Path) -> (String, Vec<String>) {
    let mut words = line.split_whitespace().map(|w| match w {
        INSTALLED => BIN.to_string(),
        UNIT_CONFIG => config.to_str().unwrap().to_string(),
        w => w.to_string(),
    });
    (words.next().unwrap(), words.collect())
}

#[test]
fn the_systemd_unit_runs_as_written() {
    let unit = std::fs::read_to_string(repo_file("examples/tcplb.service")).unwrap();
    let service = unit_lines(&unit, "Service");
    let exec = |key: &str| {
        let (_, value) = service
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key}= in the unit"));
        assert!(
            value.starts_with(&format!("{INSTALLED} ")) && value.contains(UNIT_CONFIG),
            "{key}={value}: not the installed binary on {UNIT_CONFIG}"
        );
        value.clone()
    };
    let (start_pre, start, reload) = (exec("ExecStartPre"), exec("ExecStart"), exec("ExecReload"));

    let h1 = spawn_host("h1", Behavior::Named);
    let h2 = spawn_host("h2", Behavior::Named);
    let dir = TempDir::new("unit");
    let config = dir.join("lb.toml");
    let upstream = |host: SocketAddr| {
        format!("[[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{host}\"]\n")
    };
    std::fs::write(
        &config,
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{}", upstream(h1.addr)),
    )
    .unwrap();
    let run = |line: &str| {
        let (program, args) = unit_command(line, &config);
        Command::new(program).args(args).output().unwrap()
    };

    let out = run(&start_pre);
    assert!(out.status.success(), "ExecStartPre: {}", text(&out.stderr));
    let (program, args) = unit_command(&start, &config);
    assert_eq!(program, BIN);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = Binary::start(&args);
    let app = bin.listen_addr_of("app");
    let admin = bin.admin_addr();
    let greeting = || {
        let mut c = TcpStream::connect(app).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        read_line(&mut c)
    };
    assert_eq!(greeting(), "h1");

    // `systemctl reload` after an edit: taken, and done when it returns.
    let deployed = |host| format!("[admin]\nlisten = \"{admin}\"\n\n{}", upstream(host));
    std::fs::write(&config, deployed(h2.addr)).unwrap();
    let out = run(&reload);
    assert!(out.status.success(), "ExecReload: {}", text(&out.stderr));
    assert_eq!(greeting(), "h2");
    // An edit the running tcplb rejects: the reload fails, with the reason.
    let rejected = format!("{}\n[defaults]\nidle_timeout = 5\n", deployed(h1.addr));
    std::fs::write(&config, rejected).unwrap();
    let out = run(&reload);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("reload rejected") && err.contains("`idle_timeout`"),
        "{err}"
    );
    assert_eq!(greeting(), "h2");
    // One that is not even TOML: the address to ask is not known, so
    // nothing is asked, and the reload fails all the same.
    let broken = format!("{}name = \"again\"\n", deployed(h1.addr));
    std::fs::write(&config, broken).unwrap();
    let out = run(&reload);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("nothing reloaded") && err.contains("duplicate key"),
        "{err}"
    );
    assert_eq!(greeting(), "h2");

    if installed("systemd-analyze", "--version") {
        // Its own check: keys, sections, that the commands exist, and
        // that Documentation=man:tcplb(1) is found (in pages made here).
        let pages = dir.join("man/man1");
        assert!(
            tcplb(&["man", "--dir", pages.to_str().unwrap()])
                .status
                .success()
        );
        let copy = dir.join("tcplb.service");
        std::fs::write(&copy, unit.replace(INSTALLED, BIN)).unwrap();
        let out = Command::new("systemd-analyze")
            .env("MANPATH", dir.join("man"))
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            text(&out.stderr)
        );
    } else {
        println!("systemd-analyze is not installed: the unit was not verified by systemd");
    }
}
