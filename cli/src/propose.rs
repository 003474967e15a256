//! `netaudit propose`: recorded flows → the smallest allowlist, as chart values, manifests or
//! JSON. Output goes to stdout or, atomically, to `--output`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use netaudit::{
    chart::default_values,
    error::{FieldError, InputError},
    matrix::Matrix,
    model::FlowFile,
    policy::Engine,
    propose::{self, Aggregate, Options, render},
};

use super::{
    check::{Cluster, load_cluster},
    check_output, emit, write_atomically,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// A `networkPolicy:` block for the chart's values, with a comment per rule.
    Values,
    /// The complete objects the chart renders with those values.
    Manifests,
    /// The proposal as data.
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// The flow file recorded in the learning window.
    #[arg(long, value_name = "FILE", required_unless_present = "from_cluster", conflicts_with = "from_cluster")]
    flows: Option<PathBuf>,
    /// Take the flows from the FlowReports the agents published (all nodes and replicas), and the
    /// inventory from the API unless --inventory is given (KUBECONFIG or in-cluster).
    #[arg(long)]
    from_cluster: bool,
    /// With --from-cluster: only the FlowReports of this target workload (the agent's --target name).
    #[arg(long, requires = "from_cluster")]
    target: Option<String>,
    #[command(flatten)]
    cluster: Cluster,
    /// Policy engine to propose for (default: `networkPolicy.engine` of --values).
    #[arg(long, value_parser = parse_engine)]
    engine: Option<Engine>,
    #[arg(long, value_enum, default_value_t = Format::Values)]
    format: Format,
    /// Required-traffic matrix for another workload (default: the built-in stageset-controller one).
    #[arg(long, value_name = "FILE")]
    matrix: Option<PathBuf>,
    /// Widen addresses into prefixes: `prefix=24` (IPv4), `prefix6=64`, `min=N` (only when N
    /// addresses share the prefix; default 2). Without it nothing is widened beyond what was seen.
    #[arg(long, value_parser = parse_aggregate, value_name = "POLICY")]
    aggregate: Option<Aggregate>,
    /// Allowlist flows the matrix does not expect too (they are always listed).
    #[arg(long)]
    include_unexpected: bool,
    /// Write here (atomically) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

fn parse_engine(s: &str) -> Result<Engine, FieldError> {
    s.parse()
}

fn parse_aggregate(s: &str) -> Result<Aggregate, FieldError> {
    s.parse()
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(out) = &args.output {
        check_output("--output", out)?;
    }
    let flows = match &args.flows {
        Some(path) => FlowFile::read(path)?,
        None => super::agent::fetch_flows(args.cluster.namespace.as_deref(), args.target.as_deref())?,
    };
    let loaded = load_cluster(&args.cluster, &[], args.from_cluster)?;
    let engine = match (args.engine, &loaded.chart) {
        (Some(e), _) => e,
        (None, Some(c)) => c.engine(),
        (None, None) => {
            let msg = "give --engine (kubernetes, cilium, calico, clusterNetworkPolicy) or --values";
            return Err(InputError::usage(msg).into());
        }
    };
    let matrix = match &args.matrix {
        Some(p) => Matrix::load(p)?,
        None => Matrix::default_matrix(),
    };
    let opts = Options { engine, include_unexpected: args.include_unexpected, aggregate: args.aggregate };
    let mut proposal = propose::propose(&flows, &loaded.inventory, loaded.chart.as_ref(), &matrix, &opts)?;
    proposal.notes.splice(0..0, loaded.all_notes());
    let text = match args.format {
        Format::Values => render::values_yaml(&proposal)?,
        Format::Manifests => render::manifests_yaml(&render::manifests(
            &proposal,
            loaded.chart.as_ref().map_or(default_values(), |c| &c.values),
            None,
        )?)?,
        Format::Json => serde_json::to_string_pretty(&proposal)? + "\n",
    };
    match &args.output {
        None => emit(&text)?,
        Some(out) => write_atomically(out, &text)?,
    }
    Ok(ExitCode::SUCCESS)
}
