//! The `payload-gateway` command.

mod alloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use payload_gateway::app::Gateway;
use payload_gateway::config::{Config, LogFormat};

/// A gRPC sidecar that encrypts, compresses and offloads Temporal payloads.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded defaults run.
    #[arg(long, short, env = "PGW_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print a new random 32-byte key, base64, for a key file or env var.
    Keygen,
    /// Key management.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Offloaded objects.
    Storage {
        #[command(subcommand)]
        action: StorageCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StorageCommand {
    /// Mark and sweep: delete (with --delete) the objects of the drivers' write buckets that
    /// no history visibility lists (open executions, closed ones within retention) references
    /// and that are older than the grace period. Any history that cannot be read stops it
    /// before anything is deleted (exit 1).
    Gc {
        /// Namespace whose objects are collected (repeatable).
        #[arg(
            long = "namespace",
            short = 'n',
            required_unless_present = "all_namespaces"
        )]
        namespaces: Vec<String>,
        /// Every namespace the upstream lists, and every object under v0/.
        #[arg(long, conflicts_with = "namespaces")]
        all_namespaces: bool,
        /// Only report what would be deleted (the default).
        #[arg(long, conflicts_with = "delete")]
        dry_run: bool,
        /// Delete unreferenced objects past the grace period.
        #[arg(long)]
        delete: bool,
        /// Grace period for unreferenced objects, e.g. 36h or 10s (default: the namespace's
        /// retention plus one day).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Report, per key id, how many payloads, executions and stored objects it still
    /// protects at the upstream (every execution visibility lists, open and closed). Run it
    /// before retiring a key.
    Audit {
        /// Namespace to audit (repeatable). Default: every namespace the upstream lists.
        #[arg(long = "namespace", short = 'n')]
        namespaces: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Before any thread exists: the allocator settings that return memory after a load.
    let tuning = alloc::tune();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Keygen) => keygen(),
        Some(Command::Keys {
            action: KeysCommand::Audit { namespaces, json },
        }) => keys_audit(cli.config, &namespaces, json),
        Some(Command::Storage {
            action:
                StorageCommand::Gc {
                    namespaces,
                    all_namespaces,
                    dry_run: _,
                    delete,
                    grace,
                    json,
                },
        }) => storage_gc(
            cli.config,
            payload_gateway::audit::gc::GcOptions {
                namespaces,
                all_namespaces,
                delete,
                grace,
            },
            json,
        ),
        None => run(cli.config, tuning),
    }
}

/// Validates `file` the way start does (every key, certificate, token variable, JWKS and
/// storage driver is loaded) and prints the effective configuration and, per namespace, the
/// effective policy.
fn check_config(file: &std::path::Path) -> ExitCode {
    let config = match payload_gateway::app::load_config(Some(file)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("payload-gateway: config error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("payload-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(payload_gateway::app::check(&config)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("payload-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    match toml::to_string_pretty(&config) {
        Ok(text) => print!("{text}"),
        Err(e) => eprintln!("payload-gateway: cannot render config: {e}"),
    }
    println!("\n# Effective policy per namespace (what start would apply)");
    if !report.rewrites {
        println!(
            "# no namespace encrypts, compresses or offloads: payloads are forwarded as they are"
        );
    }
    if report.would_generate_dev_key {
        println!(
            "# no keys configured: start generates a development key at {}",
            config.encryption.dev_key_file.display()
        );
    }
    for p in &report.policies {
        let namespace = p
            .namespace
            .as_deref()
            .unwrap_or("(default: every other namespace and requests without one)");
        let encryption = match &p.encrypt_key {
            Some(key) => format!("encrypt with key {key:?}"),
            None => "NOT ENCRYPTED (exempt)".to_owned(),
        };
        println!(
            "# {namespace}: {encryption}; compress: {}; unknown methods forwarded: {:?}; unknown Any types forwarded: {:?}",
            p.compress, p.forward_unknown_methods, p.forward_unknown_any_types
        );
    }
    ExitCode::SUCCESS
}

fn keygen() -> ExitCode {
    match payload_gateway::codec::generate_key_base64() {
        Ok(key) => {
            println!("{key}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("payload-gateway: cannot generate a key: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A report an offline command prints: as text, or as JSON with `--json`.
trait Report: serde::Serialize {
    fn render(&self) -> String;
}

impl Report for payload_gateway::audit::AuditReport {
    fn render(&self) -> String {
        payload_gateway::audit::AuditReport::render(self)
    }
}

impl Report for payload_gateway::audit::gc::GcReport {
    fn render(&self) -> String {
        payload_gateway::audit::gc::GcReport::render(self)
    }
}

/// `keys audit`: reads the upstream with the gateway's own connection settings and stores.
fn keys_audit(config_path: Option<PathBuf>, namespaces: &[String], json: bool) -> ExitCode {
    offline_command(config_path, "keys audit", json, |config| async move {
        payload_gateway::audit::run(&config, namespaces).await
    })
}

/// `storage gc`: mark and sweep with the gateway's own upstream settings and drivers.
fn storage_gc(
    config_path: Option<PathBuf>,
    options: payload_gateway::audit::gc::GcOptions,
    json: bool,
) -> ExitCode {
    offline_command(config_path, "storage gc", json, |config| async move {
        payload_gateway::audit::gc::run(&config, &options).await
    })
}

/// Loads the config, runs `job` on a small runtime and prints its report: exit 2 for a config
/// error, 1 when the job fails.
fn offline_command<R, E, F, Fut>(
    config_path: Option<PathBuf>,
    name: &str,
    json: bool,
    job: F,
) -> ExitCode
where
    R: Report,
    E: std::fmt::Display,
    F: FnOnce(payload_gateway::config::Config) -> Fut,
    Fut: std::future::Future<Output = Result<R, E>>,
{
    let config = match payload_gateway::app::load_config(config_path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("payload-gateway: config error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("payload-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job(config)) {
        Ok(report) if json => match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("payload-gateway: cannot render the report: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("payload-gateway: {name} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<PathBuf>, tuning: alloc::Tuning) -> ExitCode {
    let config = match payload_gateway::app::load_config(config_path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("payload-gateway: config error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    match tuning {
        alloc::Tuning::Applied => match alloc::start_trimmer() {
            Ok(()) => tracing::debug!(
                mmap_threshold = alloc::MMAP_THRESHOLD,
                trim_threshold = alloc::TRIM_THRESHOLD,
                arena_max = alloc::arena_max(),
                trim_interval = ?alloc::TRIM_INTERVAL,
                "glibc malloc tuned to return memory after a load"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the malloc trim thread: memory may stay resident after a load")
            }
        },
        alloc::Tuning::OperatorSettings => {
            tracing::info!("glibc malloc settings from the environment kept as they are")
        }
        alloc::Tuning::Refused => {
            tracing::warn!(
                "glibc refused the malloc settings: memory may stay resident after a load"
            )
        }
        alloc::Tuning::NotGlibc => {}
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.proxy.worker_threads > 0 {
        runtime.worker_threads(config.proxy.worker_threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("payload-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let gateway = match Gateway::bind(&config).await {
            Ok(gateway) => gateway,
            Err(e) => {
                eprintln!("payload-gateway: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(codec) = gateway.codec() {
            tokio::spawn(reload_on_sighup(config_path, codec));
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_termination().await;
            tracing::info!("shutdown requested");
            let _ = stop.send(true);
        });
        gateway.run(stopped).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Re-reads the configuration on every SIGHUP and swaps in its keys; a bad file keeps the keys
/// in use and logs why.
async fn reload_on_sighup(
    config_path: Option<PathBuf>,
    codec: std::sync::Arc<payload_gateway::codec::PayloadCodec>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler: key reload disabled");
        return;
    };
    while hangup.recv().await.is_some() {
        let reloaded = payload_gateway::app::load_config(config_path.as_deref())
            .and_then(|config| codec.reload(&config));
        match reloaded {
            Ok(()) => tracing::info!("SIGHUP: keys reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: reload refused, keeping the current keys")
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn wait_for_termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
