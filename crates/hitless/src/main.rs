//! The `hitless` command: appliance agent, local lab, in-service upgrade, status, the engine
//! simulator, benchmarks and image tooling.

use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};

mod bench;
mod image_cmd;
mod lab;
mod ops;
mod sim;
mod witness_cmd;

/// Upgrade the software of a running high-availability appliance pair without a hit.
#[derive(Parser, Debug)]
#[command(name = "hitless", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing env-filter syntax); defaults to $HITLESS_LOG or "info".
    #[arg(long, global = true)]
    log: Option<String>,
    /// The credential for the agents' API: a tokens file (lines `ROLE TOKEN`, mode 0600)
    /// whose first operator token, else first token, is presented. Without it, the lab's
    /// tokens file is used for the lab's agents.
    #[arg(long, global = true, env = "HITLESS_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the appliance daemon.
    Agent {
        /// The agent's TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// A local pair of appliances on this machine.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Show appliances, instances, versions, roles, epoch and sync lag.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Run an in-service software upgrade to an image, with live progress.
    Upgrade {
        /// The target image directory (holding manifest.toml).
        #[arg(long)]
        to: PathBuf,
        /// Stop before the commit: the pair waits for `hitless commit` or `hitless rollback`
        /// (the rollback timer reverts it if neither comes).
        #[arg(long)]
        no_commit: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Abort the running upgrade (rolls back to the running version).
    Abort {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Roll back the running upgrade, also after the primary appliance is done.
    Rollback {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Commit an upgrade that waits for the operator's acceptance.
    Commit {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resume an ISSU that needs the operator (after the cause it names is dealt with).
    Resume {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run the ISSU engine against a simulated pair.
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Build and inspect OS images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run the builtin witness daemon, the third vote of appliance pairs.
    Witness(witness_cmd::WitnessArgs),
    /// Tokens for the agents' API.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a fresh random token (32 bytes from the system's random source) as a line of a
    /// tokens file, `ROLE TOKEN`: append it to the agents' tokens file, or keep it in a file
    /// of your own (mode 0600) for `--token-file`.
    New {
        /// `read` (status and progress) or `operator` (everything, upgrades included).
        #[arg(long, default_value = "read", value_parser = role_parser())]
        role: hitless_agent::auth::Role,
    },
}

/// `--role`: the roles of a tokens file, listed in the help.
fn role_parser() -> impl clap::builder::TypedValueParser<Value = hitless_agent::auth::Role> {
    clap::builder::PossibleValuesParser::new(["read", "operator"])
        .try_map(|s| s.parse::<hitless_agent::auth::Role>())
}

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The agent API address (host:port); defaults to the lab's primary agent.
    #[arg(long, env = "HITLESS_API")]
    api: Option<String>,
}

#[derive(Subcommand, Debug)]
enum LabCommand {
    /// Start a pair of appliance agents on this machine, serving kvd v1.
    Up(LabUpArgs),
    /// Stop the lab and remove its run directory.
    Down {
        /// The lab's run directory.
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Show the lab's appliances and instances.
    Status {
        /// The lab's run directory.
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The main job: bring the lab up, upgrade it under client load, verify, tear it down.
    Issu(LabIssuArgs),
    /// Run `lab issu` once per fault (by default every fault kind, each at a step where it
    /// hurts) and print one table: result, writes lost, client errors, outage, where control
    /// and the service address ended.
    Faults(LabFaultsArgs),
    /// Run clients through a seeded schedule of faults (and ISSUs) and check that no
    /// acknowledged write was lost and no two instances acknowledged at once.
    Check(lab::LabCheckArgs),
    /// Cut the two-host lab's network as a partition fault does (`partition-peers`,
    /// `isolate-primary`, `isolate-secondary`, `one-way-primary`, `isolate-witness`), until
    /// `hitless lab heal`.
    Partition {
        /// The partition.
        #[arg(value_parser = partition_parser())]
        kind: hitless_netlab::Partition,
        /// Heal it by itself after this many milliseconds (the command waits).
        #[arg(long = "for", value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        hold_ms: Option<u64>,
        /// The lab's run directory.
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Heal the two-host lab's network (remove the partition in place).
    Heal {
        /// The lab's run directory.
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

/// The partition names, listed in the help.
fn partition_parser() -> impl clap::builder::TypedValueParser<Value = hitless_netlab::Partition> {
    clap::builder::PossibleValuesParser::new(hitless_netlab::Partition::ALL.map(|p| p.name()))
        .try_map(|s| hitless_netlab::Partition::parse(&s))
}

#[derive(Args, Debug, Clone)]
pub struct LabUpArgs {
    /// The lab's run directory.
    #[arg(long, default_value = lab::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Hypervisor backend for the instances: `process` (processes in their own namespaces
    /// and cgroups) or `qemu` (QEMU virtual machines booting their own kernel).
    #[arg(long, default_value_t = Backend::Process, value_parser = backend_parser())]
    pub backend: Backend,
    /// The client protocol kvd's images declare in their service contract: `resp` (requests
    /// held over a switchover and replayed after a failover) or `opaque` (bytes relayed,
    /// connections drained over a switchover, nothing replayed).
    #[arg(long, default_value_t = hitless_image::Protocol::Resp)]
    pub protocol: hitless_image::Protocol,
    /// Where the appliances run: `netns` (one network namespace per appliance and one for
    /// clients, on a bridge, addresses in 198.18.0.0/24; the default where namespaces can be
    /// made: root, `ip` and `nft` installed) or `loopback` (everything on this host's
    /// loopback).
    #[arg(long, value_enum)]
    pub hosts: Option<lab::Hosts>,
    /// Memory limit of each instance in MiB (default: 512 for processes, 256 for QEMU guests;
    /// `hitless lab issu` sizes it for the state it loads with --keys).
    #[arg(long)]
    pub instance_memory_mib: Option<u64>,
    /// The pair's witness: `builtin` (`hitless witness` on the witness host), `etcd`
    /// (/usr/bin/etcd there) or `none` (a partition can lose acknowledged writes).
    #[arg(long, value_enum, default_value_t = lab::WitnessKind::Builtin)]
    pub witness: lab::WitnessKind,
    /// Heartbeats the agents may miss before one takes the other for lost (`[heartbeat]
    /// misses`; heartbeats every 50 ms for processes, 100 ms for QEMU guests). Default:
    /// processes 5 with a witness (a false detection there costs an outage, never a write) and
    /// 6 without; QEMU guests 20.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub heartbeat_misses: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct LabFaultsArgs {
    /// The run directory each run uses in turn.
    #[arg(long, default_value = lab::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Hypervisor backend.
    #[arg(long, default_value_t = Backend::Process, value_parser = backend_parser())]
    pub backend: Backend,
    /// Where the appliances run (see `lab up --hosts`).
    #[arg(long, value_enum)]
    pub hosts: Option<lab::Hosts>,
    /// A fault to run, KIND@STEP (repeatable; default: every kind once).
    #[arg(long)]
    pub fault: Vec<String>,
    /// The pair's witness in every run (see `lab up --witness`).
    #[arg(long, value_enum)]
    pub witness: Option<lab::WitnessKind>,
    /// Print the rows as one JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct LabIssuArgs {
    #[command(flatten)]
    pub up: LabUpArgs,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Inject a real fault: KIND@STEP (see `hitless sim issu --list-faults`).
    #[arg(long)]
    pub fault: Option<String>,
    /// Keep the lab running after the report (tear it down with `hitless lab down`).
    #[arg(long)]
    pub keep: bool,
    /// State loaded through the service address before the ISSU: this many distinct keys
    /// (`key:0`, `key:1`, ...), read back (all, or 10,000 at random) after it.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pub keys: u64,
    /// Size in bytes of each loaded value.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub value_size: u64,
    /// Parallel connections of redis-benchmark during the ISSU (its `-c`).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clients: u32,
}

/// The hypervisor backend of the lab's instances (one type from the agent's configuration to
/// the vmm crate).
pub use hitless_vmm::BackendKind as Backend;

/// `--backend`: the names `Backend` displays and parses, listed in the help.
fn backend_parser() -> impl clap::builder::TypedValueParser<Value = Backend> {
    clap::builder::PossibleValuesParser::new(["process", "qemu"]).try_map(|s| s.parse::<Backend>())
}

#[derive(Subcommand, Debug)]
enum SimCommand {
    /// Simulate an ISSU, optionally with a fault, and print its timeline.
    Issu {
        /// Inject a fault: KIND@STEP.
        #[arg(long)]
        fault: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// List every KIND@STEP accepted by --fault.
        #[arg(long)]
        list_faults: bool,
        /// Run every KIND@STEP of the catalog and print one line per case and a summary.
        #[arg(long, conflicts_with_all = ["fault", "list_faults"])]
        all: bool,
        /// With --all: the engine decides through a (simulated) witness; the summary also
        /// counts the losses of the same cases without one.
        #[arg(long, requires = "all")]
        witness: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// State replication throughput, ack latency and bulk transfer on loopback.
    Sync {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// What attaching a standby costs the writers of an active holding a large state.
    Attach {
        /// State sizes to measure, in records (comma-separated), side by side in one run.
        #[arg(long, value_delimiter = ',', default_values_t = vec![10_000u64, 1_000_000, 5_000_000])]
        keys: Vec<u64>,
        /// Value bytes per record.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build an image directory from a service binary.
    Build {
        /// "process" or "vm".
        #[arg(long, default_value = "process")]
        kind: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Image name.
        #[arg(long)]
        name: String,
        /// Image version.
        #[arg(long)]
        version: String,
        /// The service binary.
        #[arg(long)]
        binary: PathBuf,
        /// Replicated schema: SERVICE=WRITES:READS[,READS...] (e.g. kvd=2:1,2).
        #[arg(long)]
        schema: String,
        /// Client protocol of the service: resp, length-prefixed or opaque.
        #[arg(long, default_value = "resp")]
        protocol: String,
        /// Port the service listens on inside a VM guest.
        #[arg(long, default_value_t = 6379)]
        service_port: u16,
        /// Port state sync listens on inside a VM guest.
        #[arg(long, default_value_t = 7000)]
        sync_port: u16,
        /// One argument of the entrypoint's template (repeat, in order); placeholders:
        /// {instance_id} {service_listen} {sync_listen} {service_port} {sync_port} {control}
        /// {ha_grace_ms}. Without any, the reference service kvd's arguments.
        #[arg(long = "arg", allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Verify and describe an image directory.
    Inspect {
        /// The image directory.
        dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(filter: Option<&str>, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("HITLESS_LOG").ok())
        .unwrap_or_else(|| default.to_owned());
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Commands that only print what they compute (no sockets, no child processes) end quietly when
/// their reader goes away (`hitless sim issu --json | head -1`), as Unix filters do, instead of
/// panicking on the broken pipe. The others keep SIGPIPE ignored: a peer closing a socket is an
/// error they handle, not a reason to die.
fn quiet_on_closed_stdout(command: &Command) {
    if matches!(
        command,
        Command::Sim { .. } | Command::Image { .. } | Command::Token { .. }
    ) {
        // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any thread
        // is spawned; no handler of ours is replaced.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    ops::use_token_file(cli.token_file.clone());
    quiet_on_closed_stdout(&cli.command);
    // Benchmarks and the simulator print figures; the libraries' progress logs would bury them.
    let quiet = matches!(cli.command, Command::Bench { .. } | Command::Sim { .. });
    init_tracing(cli.log.as_deref(), if quiet { "warn" } else { "info" });
    let result = match cli.command {
        Command::Agent { config } => ops::agent(&config),
        Command::Lab { command } => match command {
            LabCommand::Up(args) => lab::up(&args),
            LabCommand::Down { dir } => lab::down(&dir),
            LabCommand::Status { dir, json } => lab::status(&dir, json),
            LabCommand::Issu(args) => lab::issu(&args),
            LabCommand::Faults(args) => lab::faults(&args),
            LabCommand::Check(args) => lab::check(&args),
            LabCommand::Partition { kind, hold_ms, dir } => {
                lab::partition(&dir, kind, hold_ms.map(std::time::Duration::from_millis))
            }
            LabCommand::Heal { dir } => lab::heal_cmd(&dir),
        },
        Command::Status { api, json } => ops::status(&api, json),
        Command::Upgrade { to, no_commit, api } => ops::upgrade(&api, &to, no_commit),
        Command::Abort { api } => ops::operator(&api, "abort"),
        Command::Rollback { api } => ops::operator(&api, "rollback"),
        Command::Commit { api } => ops::operator(&api, "commit"),
        Command::Resume { api } => ops::operator(&api, "resume"),
        Command::Sim { command } => match command {
            SimCommand::Issu {
                fault,
                json,
                list_faults,
                all,
                witness,
            } => {
                if all {
                    sim::run_all_with(json, witness)
                } else {
                    sim::run(fault, json, list_faults)
                }
            }
        },
        Command::Bench { command } => match command {
            BenchCommand::Sync { json } => bench::run_sync(json),
            BenchCommand::Attach {
                keys,
                value_size,
                json,
            } => bench::run_attach(&keys, value_size, json),
        },
        Command::Image { command } => match command {
            ImageCommand::Build {
                kind,
                out,
                name,
                version,
                binary,
                schema,
                protocol,
                service_port,
                sync_port,
                args,
            } => image_cmd::build(
                &kind,
                &out,
                &name,
                &version,
                &binary,
                &schema,
                &image_cmd::ContractArgs {
                    protocol,
                    service_port,
                    sync_port,
                    args,
                },
            ),
            ImageCommand::Inspect { dir, json } => image_cmd::inspect(&dir, json),
        },
        Command::Witness(args) => witness_cmd::run(&args),
        Command::Token {
            command: TokenCommand::New { role },
        } => {
            println!("{role} {}", hitless_agent::auth::generate());
            Ok(())
        }
    };
    if let Err(err) = result {
        eprintln!("error: {}", error_text(&err));
        std::process::exit(1);
    }
}

/// The error and its causes in one line, each cause once: library errors name their source in
/// their own message, so a cause whose text is already there is not repeated.
pub(crate) fn error_text(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_of_an_error_is_printed_once() {
        let missing = std::path::Path::new("/nonexistent/agent.toml");
        let read = hitless_agent::config::AgentConfig::load(missing).unwrap_err();
        let err = anyhow::Error::new(read).context("starting the agent");
        // anyhow's own rendering repeats the OS error the library error already names.
        assert_eq!(format!("{err:#}").matches("(os error 2)").count(), 2);
        let text = error_text(&err);
        assert_eq!(
            text,
            "starting the agent: cannot read the configuration file /nonexistent/agent.toml: No such file or directory (os error 2)"
        );
        // A cause its parent does not name is kept.
        let err = anyhow::anyhow!("disk full").context("writing the journal");
        assert_eq!(error_text(&err), "writing the journal: disk full");
    }

    #[test]
    fn every_command_a_stuck_engine_names_runs_as_printed() {
        for cmd in hitless_core::RESUME_COMMANDS {
            let stuck = hitless_core::Stuck {
                reason: "test".into(),
                resume_with: cmd.into(),
                first: Some("checking the pair".into()),
            };
            let hint = stuck.hint();
            let printed = hint.split('`').nth(1).expect("the hint quotes the command");
            let argv: Vec<&str> = printed.split_whitespace().collect();
            assert_eq!(argv[0], "hitless", "{hint}");
            let cli = Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("`{printed}` does not parse: {e}"));
            let named = match cli.command {
                Command::Resume { .. } => "resume",
                Command::Rollback { .. } => "rollback",
                other => panic!("`{printed}` runs {other:?}"),
            };
            assert_eq!(named, cmd);
        }
    }

    #[test]
    fn token_new_takes_read_or_operator_defaults_to_read_and_any_command_a_token_file() {
        use hitless_agent::auth::Role;
        let role = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Token {
                command: TokenCommand::New { role },
            }) => Ok(role),
            Ok(other) => panic!("{argv:?} runs {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(role(&["hitless", "token", "new"]), Ok(Role::Read));
        assert_eq!(
            role(&["hitless", "token", "new", "--role", "operator"]),
            Ok(Role::Operator)
        );
        let e = role(&["hitless", "token", "new", "--role", "admin"]).unwrap_err();
        assert!(e.contains("read") && e.contains("operator"), "{e}");
        let cli = Cli::try_parse_from(["hitless", "upgrade", "--to", "/img", "--token-file", "/t"])
            .unwrap();
        assert_eq!(cli.token_file, Some(PathBuf::from("/t")));
    }

    #[test]
    fn lab_backend_flag_takes_process_or_qemu_and_defaults_to_process() {
        let backend = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Lab {
                command: LabCommand::Up(up),
            }) => Ok(up.backend),
            Ok(other) => panic!("{argv:?} runs {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(backend(&["hitless", "lab", "up"]), Ok(Backend::Process));
        assert_eq!(
            backend(&["hitless", "lab", "up", "--backend", "process"]),
            Ok(Backend::Process)
        );
        assert_eq!(
            backend(&["hitless", "lab", "up", "--backend", "qemu"]),
            Ok(Backend::Qemu)
        );
        let e = backend(&["hitless", "lab", "up", "--backend", "kvm"]).unwrap_err();
        assert!(
            e.contains("kvm") && e.contains("process") && e.contains("qemu"),
            "{e}"
        );
    }
}
