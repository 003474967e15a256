//! Commands. The exit-code contract, for every command: 0 nothing cut; 1 some flow cut (`lint`:
//! an error-level finding); 2 any error — bad input and failures alike. A closed stdout
//! (`netaudit check … | head`) is not an error: the rest of the output is dropped quietly and the
//! code stays the verdict's. A closed or broken stderr is never fatal.

/// `say!("…", args)`: a line for the user on stderr, through [`say`] (never panics).
macro_rules! say {
    ($($t:tt)*) => { $crate::say(format_args!($($t)*)) };
}

mod agent;
mod check;
mod demo;
mod propose;
mod record;

use std::{
    io::{ErrorKind, Write},
    process::ExitCode,
};

use anyhow::{Context, Result};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "netaudit",
    version,
    about = "eBPF runtime traffic auditor for Kubernetes workloads",
    after_help = "Exit codes, every command: 0 nothing cut; 1 some flow cut (lint: an error-level finding); \
                  2 any error (bad input, an unwritable output, an API error). A closed stdout (`| head`) \
                  keeps the verdict's code."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing env-filter syntax), e.g. `debug`.
    #[arg(long, global = true, env = "NETAUDIT_LOG", default_value = "warn")]
    log: String,
    /// Log line format: text, or json (one object per line, for log pipelines).
    #[arg(long, global = true, env = "NETAUDIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Record the flows of processes in cgroups (or of one process) into a flow file.
    Record(record::Args),
    /// Judge recorded flows against policies (manifests, live objects, or the chart's values) and
    /// the required-traffic matrix. Exit 0: nothing cut; 1: some flow cut; 2: any error.
    Check(check::Args),
    /// Lint policies: objects the API server rejects, rules that do not do what they look like.
    Lint(check::LintArgs),
    /// Propose the smallest egress/ingress allowlist that admits the recorded flows, per engine,
    /// as chart values, manifests or JSON.
    Propose(propose::Args),
    /// Run the whole story in a lab on this machine (root): record a stand-in controller with the
    /// real eBPF programs, then check and propose on what was recorded.
    Demo(demo::Args),
    /// The DaemonSet agent: audit the target workloads' pods on this node (attach as they come,
    /// detach as they go), publish their flows (FlowReports, HTTP, metrics) and, in watch mode,
    /// raise drift alerts (Events, metrics, log lines).
    Agent(agent::Args),
    /// The flows the agents published as FlowReports, merged across nodes and replicas into one
    /// flow file (for check, propose, graph).
    Report(agent::ReportArgs),
    /// Print the agent's install bundle (Namespace, RBAC, FlowReport CRD, DaemonSet, its own
    /// NetworkPolicy) as YAML: the source of deploy/netaudit.yaml.
    Manifests(ManifestsArgs),
    /// A process of the demo lab (internal).
    #[command(hide = true)]
    LabActor { role: String, args: Vec<String> },
}

pub use netaudit::{
    error::InputError,
    output::{check_output, write_atomically},
};

/// Exit code for any error.
const EXIT_ERROR: u8 = 2;

/// Writes a command's output to stdout. A reader that went away (`| head`) is not an error:
/// what it did not want is dropped, and the command's verdict stands.
pub fn emit(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()).and_then(|()| std::io::stdout().flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// A line for the user on stderr (progress, what was written). Unlike `eprintln!` it never
/// panics: a closed or broken stderr loses the line, not the command.
pub fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[derive(clap::Args)]
struct ManifestsArgs {
    #[arg(long, default_value = "netaudit")]
    namespace: String,
    /// The agent's image (default: this version's).
    #[arg(long)]
    image: Option<String>,
    /// The apiserver's endpoint address range, for the agent's own egress policy (repeatable;
    /// default: any address, on the apiserver port only).
    #[arg(long = "apiserver-cidr", value_name = "CIDR")]
    apiserver_cidrs: Vec<ipnet::IpNet>,
    /// The apiserver's endpoint port (not the Service's 443).
    #[arg(long, default_value_t = 6443)]
    apiserver_port: u16,
    /// The namespace allowed to scrape the agent's metrics.
    #[arg(long, default_value = "monitoring")]
    metrics_from_namespace: String,
    /// A workload to audit, NAME=NAMESPACE/LABEL-SELECTOR (repeatable; default: the
    /// stageset-controller in stageset-system).
    #[arg(long = "target", value_name = "TARGET")]
    targets: Vec<netaudit::agent::config::Target>,
    /// The agent's mode.
    #[arg(long, value_enum, default_value_t = netaudit::agent::config::Mode::Learn)]
    mode: netaudit::agent::config::Mode,
    /// Watch mode: the chart's values; shipped as a ConfigMap, the agent judges flows against
    /// the policy the chart renders from them (before it is applied).
    #[arg(long, value_name = "FILE")]
    values: Option<std::path::PathBuf>,
}

fn manifests(a: ManifestsArgs) -> Result<ExitCode> {
    use netaudit::agent::{
        config::Mode,
        manifests::{Options, bundle_yaml},
    };
    let defaults = Options::default();
    let values = match &a.values {
        None => None,
        Some(_) if a.mode != Mode::Watch => {
            return Err(
                InputError::usage("--values is for watch mode (the policies in force); add --mode watch").into()
            );
        }
        Some(p) => {
            // Checked now, not on every node at start.
            netaudit::chart::Values::load(p)?;
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
    };
    let o = Options {
        namespace: a.namespace,
        image: a.image.unwrap_or(defaults.image),
        apiserver_cidrs: if a.apiserver_cidrs.is_empty() {
            defaults.apiserver_cidrs
        } else {
            a.apiserver_cidrs.iter().map(|c| c.trunc().to_string()).collect()
        },
        apiserver_port: a.apiserver_port,
        metrics_from_namespace: a.metrics_from_namespace,
        targets: if a.targets.is_empty() {
            defaults.targets
        } else {
            a.targets.iter().map(|t| format!("{}={}/{}", t.name, t.namespace, t.selector)).collect()
        },
        mode: a.mode.name().to_string(),
        values,
    };
    emit(&bundle_yaml(&o)?)?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_ERROR } else { 0 });
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Record(args) => record::run(args),
        Command::Check(args) => check::run(args),
        Command::Lint(args) => check::run_lint(args),
        Command::Propose(args) => propose::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Manifests(args) => manifests(args),
        Command::Agent(args) => agent::run(args),
        Command::Report(args) => agent::run_report(args),
        Command::LabActor { role, args } => netaudit_lab::actors::run(&role, &args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            say!("netaudit: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
