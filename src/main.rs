//! The `tcplb` command: parses flags, builds a [`Config`], and runs the
//! library's [`Proxy`] on the main thread.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, CommandFactory, Parser, Subcommand};
use tcplb::ClientRule;
use tcplb::config::{self, check_settings, parse_duration, parse_size};
use tcplb::error::{ConfigError, Problem, Warning};
use tcplb::tls::TlsSettings;
use tcplb::{AccessLog, Config, Error, Proxy, Relay, Settings, certs, demo};

/// A single-threaded, least-connections TCP load balancer.
///
/// Quick mode:  tcplb --listen 127.0.0.1:7000 --host 127.0.0.1:9001 --host 127.0.0.1:9002
/// Config mode: tcplb --config lb.toml
/// Reload it:   tcplb reload --config lb.toml
/// Try it:      tcplb demo
/// mTLS:        tcplb certs init --dir certs --client alice
#[derive(Debug, Parser)]
#[command(
    name = "tcplb",
    version,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file: print every error and warning with its line, exit non-zero on an error.
    Check {
        /// The TOML config file to check.
        file: PathBuf,
        /// Fail on warnings too (what is valid but will likely not work as meant).
        #[arg(long)]
        strict: bool,
    },
    /// Start three built-in echo hosts and tcplb in front of them on 127.0.0.1, plain and mTLS.
    // The demo runs with its own connection cap (it bounds the demo hosts'
    // threads), so its help states that default, not [defaults]'.
    #[command(mut_arg("max_connections", |arg| arg.help(format!(
        "Connections relayed at once; the excess gets `ERROR overloaded` [default: {}]",
        demo::DEMO_MAX_CONNECTIONS
    ))))]
    Demo {
        /// Address of the demo's plain-TCP upstream.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7777")]
        listen: String,
        /// Address of the demo's mTLS upstream (certificates are made at start).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7778")]
        tls_listen: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Development certificates for mTLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print a shell completion script, e.g. `tcplb completions bash > /etc/bash_completion.d/tcplb`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page tcplb(1), or write it and one page per subcommand to a folder.
    Man {
        /// Write tcplb.1, tcplb-check.1, tcplb-reload.1, ... into this folder instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Ask a running tcplb to reload its config file, and wait for the outcome.
    ///
    /// Sends POST /reload to its admin listener. Exits 0 once the new config
    /// is in force; 1, with the reason, if tcplb rejected it (the running
    /// config stays) or did not answer; 2 if no admin address is given or
    /// found. For systemd's ExecReload=.
    Reload {
        /// The running tcplb's admin listener (its --admin or [admin] listen).
        #[arg(long, value_name = "ADDR", required_unless_present = "config")]
        admin: Option<String>,
        /// Take the admin address from this config file's [admin] listen (the rest of the file is not checked here).
        #[arg(short, long, value_name = "FILE", conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// How long to wait for the outcome.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA, a server certificate and client certificates, and print the config that uses them.
    ///
    /// What it prints is a TOML config (its notes are comments): `> lb.toml`
    /// saves it. An existing CA in DIR is kept: issue more certificates from
    /// it with --ca-cert/--ca-key, or replace it with --force.
    Init {
        /// Directory to write the PEM files to (created if missing).
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// Name (DNS or IP) the server certificate is for; repeat for more
        /// [default: localhost and 127.0.0.1 with a new CA; none with --ca-cert].
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// A client to issue a certificate for (DNS name or URI SAN); repeat for more.
        #[arg(
            long = "client",
            value_name = "NAME",
            required_unless_present = "ca_cert"
        )]
        clients: Vec<String>,
        /// Sign with this existing CA certificate instead of making a new CA (with --ca-key).
        #[arg(long, value_name = "FILE", requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The existing CA's private key (with --ca-cert).
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Replace an existing ca.pem and ca.key in DIR (what the old CA signed stops being accepted).
        #[arg(long, conflicts_with = "ca_cert")]
        force: bool,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Config file (TOML) describing one or more upstreams.
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["listen", "hosts"])]
    config: Option<PathBuf>,
    /// Quick mode: the address clients connect to (e.g. 127.0.0.1:7000).
    #[arg(short, long, value_name = "ADDR", requires = "hosts")]
    listen: Option<String>,
    /// Quick mode: a host behind tcplb (IPv4, [IPv6] or name, with port); repeat for more.
    #[arg(long = "host", value_name = "ADDR", requires = "listen")]
    hosts: Vec<String>,
    /// Quick mode: the upstream's name in logs.
    #[arg(long, value_name = "NAME", default_value = "default")]
    name: String,
    /// Admin listener for GET /metrics, GET /status and POST /reload (overrides [admin]).
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    #[command(flatten)]
    settings: SettingsArgs,
}

/// Flags that override `[defaults]` (in every mode).
#[derive(Clone, Debug, Args)]
struct SettingsArgs {
    /// Time allowed for a connect to one host before trying the next [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// Close a connection after this long with no bytes either way [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Close a half-closed connection after this long without traffic [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    half_close_timeout: Option<Duration>,
    /// On SIGINT/SIGTERM, let live connections finish for this long [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// Connections relayed at once; the excess gets `ERROR overloaded` [default: 10000].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Bytes buffered per direction while data is in flight (e.g. 16KiB) [default: 16KiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    buffer_size: Option<usize>,
    /// Buffer a direction moves up to once it streams in bulk [default: 64KiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    bulk_buffer_size: Option<usize>,
    /// Fixed kernel send and receive buffer of every relayed socket [default: autotuned].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    socket_buffer: Option<usize>,
    /// Bytes a relayed socket may hold written but unsent (TCP_NOTSENT_LOWAT), or `off` [default: 64KiB].
    #[arg(long, value_name = "SIZE|off", value_parser = parse_unsent_limit)]
    unsent_limit: Option<UnsentLimit>,
    /// Worker threads, each with its own poll loop, or `auto` for one per core [default: 1].
    #[arg(long, value_name = "N", value_parser = parse_workers)]
    workers: Option<usize>,
    /// Access line format: `text`, or `json` for one JSON object per line [default: text].
    #[arg(long, value_name = "FORMAT", value_parser = parse_access_log)]
    access_log: Option<AccessLog>,
    /// How plain TCP pairs relay: `splice` (zero-copy, through kernel pipes), `copy` (through buffers), or `auto` (copy, then splice once a direction streams) [default: auto].
    #[arg(long, value_name = "MODE", value_parser = parse_relay)]
    relay: Option<Relay>,
    /// Kernel pipes the spliced relay may hold at once (two descriptors each); 0 turns splicing off [default: 1024].
    #[arg(long, value_name = "N")]
    max_pipes: Option<usize>,
}

/// `--access-log`: `text` or `json`.
fn parse_access_log(text: &str) -> Result<AccessLog, String> {
    AccessLog::from_name(text)
        .ok_or_else(|| format!("`{text}` is not an access log format: `text` or `json`"))
}

/// `--relay`: one of the `relay` values.
fn parse_relay(text: &str) -> Result<Relay, String> {
    Relay::from_name(text)
        .ok_or_else(|| format!("`{text}` is not a relay mode: {}", Relay::NAMES.join(", ")))
}

/// `--workers`: a number from 1 to 1024, or `auto`.
/// `--unsent-limit`: a size, or `off`.
#[derive(Debug, Clone, Copy)]
struct UnsentLimit(Option<usize>);

fn parse_unsent_limit(text: &str) -> Result<UnsentLimit, String> {
    if text == "off" {
        return Ok(UnsentLimit(None));
    }
    match parse_size(text) {
        Ok(n) => Ok(UnsentLimit(Some(n))),
        Err(_) => Err(format!(
            "`{text}` is neither a size (such as 64KiB) nor `off`"
        )),
    }
}

fn parse_workers(text: &str) -> Result<usize, String> {
    if text == "auto" {
        return Ok(Settings::auto_workers());
    }
    match text.parse::<usize>() {
        Ok(n @ 1..=1024) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of workers from 1 to 1024, or `auto`"
        )),
    }
}

impl SettingsArgs {
    fn apply(&self, mut s: Settings) -> Settings {
        s.connect_timeout = self.connect_timeout.unwrap_or(s.connect_timeout);
        s.idle_timeout = self.idle_timeout.unwrap_or(s.idle_timeout);
        s.half_close_timeout = self.half_close_timeout.unwrap_or(s.half_close_timeout);
        s.drain_timeout = self.drain_timeout.unwrap_or(s.drain_timeout);
        s.max_connections = self.max_connections.unwrap_or(s.max_connections);
        s.buffer_size = self.buffer_size.unwrap_or(s.buffer_size);
        s.bulk_buffer_size = self.bulk_buffer_size.unwrap_or(s.bulk_buffer_size);
        s.socket_buffer = self.socket_buffer.or(s.socket_buffer);
        s.unsent_limit = self.unsent_limit.map_or(s.unsent_limit, |u| u.0);
        s.workers = self.workers.unwrap_or(s.workers);
        s.access_log = self.access_log.unwrap_or(s.access_log);
        s.relay = self.relay.unwrap_or(s.relay);
        s.max_pipes = self.max_pipes.unwrap_or(s.max_pipes);
        s
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // env_logger's own format (with millisecond timestamps), except for
    // JSON access lines, which are written bare: one object per line.
    let mut text = env_logger::fmt::ConfigurableFormat::default();
    text.timestamp(Some(env_logger::fmt::TimestampPrecision::Millis));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            if record.target() == tcplb::ACCESS_JSON_TARGET {
                writeln!(buf, "{}", record.args())
            } else {
                text.format(buf, record)
            }
        })
        .init();
    let result = match cli.command {
        Some(Command::Check { file, strict }) => return check(&file, strict),
        Some(Command::Demo {
            listen,
            tls_listen,
            settings,
        }) => run_demo(&listen, &tls_listen, &settings),
        Some(Command::Certs(CertsCommand::Init {
            dir,
            server_names,
            clients,
            ca_cert,
            ca_key,
            force,
        })) => {
            let ca = match (ca_cert, ca_key) {
                (Some(cert), Some(key)) => certs::Ca::Existing { cert, key },
                _ => certs::Ca::New { replace: force },
            };
            certs_init(certs::Request {
                dir,
                ca,
                server_names,
                clients,
            })
        }
        Some(Command::Completions { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tcplb", &mut script);
            return print_out(&script);
        }
        Some(Command::Man { dir: None }) => {
            let mut page = Vec::new();
            return match clap_mangen::Man::new(man_command()).render(&mut page) {
                Ok(()) => print_out(&page),
                Err(e) => {
                    eprintln!("tcplb: cannot render the man page: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Man { dir: Some(dir) }) => man_pages(&dir),
        Some(Command::Reload {
            admin,
            config,
            timeout,
        }) => return reload(admin.as_deref(), config.as_deref(), timeout),
        None => serve(&cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcplb: {e}");
            ExitCode::from(match e {
                Error::Config(_) | Error::ReadConfig { .. } => 2,
                _ => 1,
            })
        }
    }
}

/// `tcplb check`: the config's errors, or its warnings (which `strict`
/// makes fatal), as serving would see them, TLS files included.
fn check(file: &Path, strict: bool) -> ExitCode {
    let loaded = Config::load(file).and_then(|mut config| {
        if let Some(tls) = &config.tls {
            let (_, warnings) = tls.load(SystemTime::now())?;
            config.warnings.extend(warnings);
        }
        if let Some(tls) = config.cluster.as_ref().and_then(|c| c.tls.as_ref()) {
            tls.client_config()?;
        }
        Ok(config)
    });
    match loaded {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("{warning}");
            }
            if strict && !config.warnings.is_empty() {
                eprintln!(
                    "{}: failed with --strict ({})",
                    file.display(),
                    config.summary()
                );
                return ExitCode::FAILURE;
            }
            println!("{}: ok ({})", file.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a closed pipe or a full disk is an
/// error to report, not a panic.
fn print_out(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcplb: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The command line as man pages show it: the same, except that the
/// example lines of the top-level help become paragraphs, which roff would
/// otherwise run together.
fn man_command() -> clap::Command {
    let cmd = Cli::command();
    let about = cmd.get_long_about().map(|a| a.to_string());
    match about {
        Some(about) => cmd.long_about(about.replace('\n', "\n\n")),
        None => cmd,
    }
}

/// `tcplb man --dir DIR`: tcplb.1 and a page per subcommand.
fn man_pages(dir: &Path) -> Result<(), Error> {
    let setup = |source| Error::Setup {
        what: "the man pages",
        source,
    };
    std::fs::create_dir_all(dir).map_err(setup)?;
    clap_mangen::generate_to(man_command(), dir).map_err(setup)?;
    println!("man pages written to {}", dir.display());
    Ok(())
}

/// `tcplb reload`: 0 once the new config is in force, 1 if it was rejected
/// or tcplb did not answer, 2 if there is no address to ask.
fn reload(admin: Option<&str>, config: Option<&Path>, timeout: Duration) -> ExitCode {
    let addr = match (admin, config) {
        (Some(admin), _) => config::resolve(admin).map_err(|why| format!("--admin {admin}: {why}")),
        (None, Some(file)) => match Config::admin_address(file) {
            Ok(Some(addr)) => Ok(addr),
            Ok(None) => Err(format!(
                "{} has no [admin] listen address to ask; give the running tcplb's with --admin ADDR",
                file.display()
            )),
            Err(e) => Err(format!(
                "nothing reloaded: the admin address to ask cannot be read from {}:\n{e}",
                file.display()
            )),
        },
        (None, None) => unreachable!("clap requires --admin or --config"),
    };
    let addr = match addr {
        Ok(addr) => addr,
        Err(why) => {
            eprintln!("tcplb: {why}");
            return ExitCode::from(2);
        }
    };
    match tcplb::admin::client::reload(addr, timeout) {
        Ok(answer) => {
            println!("tcplb on {addr}: {answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcplb: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Command-line setting overrides are checked like the file's values
/// (and warned about like them).
fn with_overrides(mut config: Config, args: &SettingsArgs) -> Result<Config, Error> {
    config.settings = args.apply(config.settings);
    let problems = check_settings(&config.settings);
    if !problems.is_empty() {
        return Err(command_line_errors(problems));
    }
    let buffer = config.settings.buffer_size;
    if let Some(bulk) = args.bulk_buffer_size.filter(|&bulk| bulk < buffer) {
        config.warnings.push(Warning {
            at: "command line".to_string(),
            message: format!(
                "--bulk-buffer-size {bulk} is below buffer_size ({buffer}): bulk buffers are {buffer} bytes, so there is no bulk upgrade"
            ),
        });
    }
    Ok(config)
}

fn serve(args: &ServeArgs) -> Result<(), Error> {
    let config = match (&args.config, &args.listen) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(listen)) => Config::quick(&args.name, listen, &args.hosts, Settings::default())
            .map_err(Error::Config)?,
        (None, None) => {
            eprintln!(
                "tcplb: nothing to serve: give --config FILE, or --listen ADDR with --host ADDR \
                 (see --help); to try it out, run `tcplb demo`"
            );
            std::process::exit(2);
        }
    };
    let admin = match &args.admin {
        Some(admin) => Some(
            config::resolve(admin)
                .map_err(|why| command_line_error(format!("--admin {admin}: {why}")))?,
        ),
        None => None,
    };
    // The flags override the file at start and at every reload alike.
    let settings = args.settings.clone();
    let adjust = move |config: Config| {
        let mut config = with_overrides(config, &settings)?;
        config.admin = admin.or(config.admin);
        Ok(config)
    };
    let config = adjust(config)?;
    let mut proxy = Proxy::bind(&config)?;
    if let Some(path) = &args.config {
        proxy.set_config_path(path.clone());
        proxy.set_config_adjust(adjust);
    }
    proxy.handle_signals()?;
    proxy.run()
}

fn command_line_error(message: String) -> Error {
    command_line_errors([message])
}

fn command_line_errors(messages: impl IntoIterator<Item = String>) -> Error {
    Error::Config(ConfigError {
        origin: "command line".to_string(),
        problems: messages
            .into_iter()
            .map(|message| Problem {
                line: 0,
                column: 0,
                message,
            })
            .collect(),
    })
}

fn certs_init(mut request: certs::Request) -> Result<(), Error> {
    let new_ca = matches!(request.ca, certs::Ca::New { .. });
    if new_ca && request.server_names.is_empty() {
        request.server_names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    }
    if request.server_names.is_empty() && request.clients.is_empty() {
        eprintln!("tcplb: nothing to issue: give --client NAME or --server-name NAME");
        std::process::exit(2);
    }
    let written = certs::init(&request)?;
    print!("{}", certs_config(&request, &written));
    Ok(())
}

/// What `certs init` prints: a TOML config that uses what it wrote (or,
/// with no server certificate, the client rules to add), its notes as
/// comments, so that `> lb.toml` saves a config `tcplb check` accepts.
fn certs_config(request: &certs::Request, written: &certs::Written) -> String {
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push('\n');
    };
    let made = match &written.ca_key {
        Some(_) => "a new development CA",
        None => "certificates from the CA",
    };
    line(&format!(
        "# tcplb certs init: {made}, in {}:",
        request.dir.display()
    ));
    match &written.ca_key {
        Some(key) => line(&format!(
            "#   CA: {} (its key {}: keep it to issue more with --ca-cert/--ca-key)",
            written.ca.display(),
            key.display()
        )),
        None => line(&format!("#   CA: {} (kept as it is)", written.ca.display())),
    }
    if let Some(server) = &written.server {
        line(&format!(
            "#   server ({}): {} {}",
            request.server_names.join(", "),
            server.cert.display(),
            server.key.display()
        ));
    }
    for (name, files) in &written.clients {
        line(&format!(
            "#   client {name}: {} {}",
            files.cert.display(),
            files.key.display()
        ));
    }
    line("#");
    match &written.server {
        Some(server) => {
            line("# A config that uses them; save it in this folder (`> lb.toml`), as its");
            line("# paths are relative to the config file's folder. Then: tcplb check lb.toml");
            line("");
            line("[tls]");
            line(&format!("cert = {}", toml_string(&server.cert)));
            line(&format!("key = {}", toml_string(&server.key)));
            line(&format!("client_ca = {}", toml_string(&written.ca)));
            line("");
            line("[[upstream]]");
            line("name = \"app\"");
            line("listen = \"127.0.0.1:7443\"");
            line("hosts = [\"127.0.0.1:9001\"]");
        }
        None => line(&format!(
            "# Rules for the new clients, to add to the config whose [tls] client_ca is {}:",
            written.ca.display()
        )),
    }
    for (name, _) in &written.clients {
        line("");
        line("[[client]]");
        line(&format!("identity = {}", toml_string(name)));
        line("upstreams = [\"app\"]");
        line("rate = 10");
    }
    if let (Some(_), Some((name, files))) = (&written.server, written.clients.first()) {
        line("");
        line(&format!("# Try it as {name} (the input ends with Ctrl-D):"));
        line(&format!(
            "#   openssl s_client -quiet -no_ign_eof -nocommands -connect 127.0.0.1:7443 -cert {} -key {} -CAfile {}",
            files.cert.display(),
            files.key.display(),
            written.ca.display()
        ));
    }
    out
}

/// A TOML basic string of `text`: quotes, backslashes and control
/// characters escaped.
fn toml_string(text: impl AsRef<std::ffi::OsStr>) -> String {
    let text = text.as_ref().to_string_lossy();
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn run_demo(listen: &str, tls_listen: &str, args: &SettingsArgs) -> Result<(), Error> {
    let mut hosts = Vec::new();
    for n in 1..=3 {
        let name = format!("host-{n}");
        let addr = demo::spawn_host(&name).map_err(|source| Error::Setup {
            what: "the demo hosts",
            source,
        })?;
        hosts.push(addr.to_string());
    }
    let dir = DemoDir(std::env::temp_dir().join(format!("tcplb-demo-{}", std::process::id())));
    let written = certs::init(&certs::Request {
        dir: dir.0.clone(),
        // The directory is this run's own; one a killed run left behind is replaced.
        ca: certs::Ca::New { replace: true },
        server_names: vec!["localhost".to_string(), "127.0.0.1".to_string()],
        clients: vec!["alice".to_string()],
    })?;
    let server = written
        .server
        .clone()
        .expect("the demo's server certificate");
    let defaults = Settings {
        max_connections: demo::DEMO_MAX_CONNECTIONS,
        ..Settings::default()
    };
    let mut config = Config::quick("demo", listen, &hosts, defaults).map_err(Error::Config)?;
    let mut secure = config.upstreams[0].clone();
    secure.name = "demo-mtls".to_string();
    secure.listen = config::resolve(tls_listen)
        .map_err(|why| command_line_error(format!("--tls-listen {tls_listen}: {why}")))?;
    secure.tls = true;
    config.upstreams.push(secure);
    config.tls = Some(TlsSettings {
        cert: server.cert,
        key: server.key,
        client_ca: written.ca.clone(),
        crl: Vec::new(),
        handshake_timeout: TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshakes: TlsSettings::DEFAULT_MAX_HANDSHAKES,
        max_handshakes_per_source: TlsSettings::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        places: Default::default(),
    });
    config.clients = vec![ClientRule {
        identity: "alice".to_string(),
        upstreams: vec!["demo-mtls".to_string()],
        rate: 10.0,
        burst: 20,
        max_connections: None,
    }];
    let config = with_overrides(config, args)?;
    let mut proxy = Proxy::bind(&config)?;
    proxy.handle_signals()?;
    let addr = proxy.listen_addr("demo").expect("the demo upstream exists");
    let tls_addr = proxy
        .listen_addr("demo-mtls")
        .expect("the mTLS upstream exists");
    let (_, alice) = &written.clients[0];
    println!(
        "tcplb demo: three echo hosts ({}) behind tcplb on {addr}",
        hosts.join(", ")
    );
    println!(
        "Each connection goes to the host with the fewest connections; the host greets you and echoes your lines."
    );
    // Both commands end at the end of their input (Ctrl-D): nc -N sends
    // its FIN then reads what is left; s_client -quiet alone would never end.
    println!(
        "Try it from another terminal:  nc -N {} {}",
        addr.ip(),
        addr.port()
    );
    println!();
    println!("The same hosts over mutual TLS on {tls_addr}, for the client identity `alice` only");
    println!("(certificates made for this run in {}):", dir.0.display());
    println!(
        "  openssl s_client -quiet -no_ign_eof -nocommands -connect {tls_addr} -cert {} -key {} -CAfile {}",
        alice.cert.display(),
        alice.key.display(),
        written.ca.display()
    );
    println!("Ctrl-D ends a client's input; Ctrl-C here stops the demo.");
    proxy.run()
}

/// The demo's certificate directory, removed however the demo ends: a
/// signal, or a start that failed (a port taken) after the keys were written.
struct DemoDir(PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
