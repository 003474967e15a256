//! `netaudit check` (flows × policies → verdicts) and `netaudit lint` (the policies alone).
//! Exit codes: 0 nothing cut, 1 some flow cut (lint: an error-level finding), 2 any error.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use netaudit::{
    check::{Check, FlowVerdict, Report},
    error::InputError,
    load::{ChartSource, Loaded},
    matrix::Matrix,
    model::FlowFile,
    policy::{
        self,
        lint::{Finding, Severity},
    },
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// The cluster and the chart's values: shared by `check`, `lint` and `propose`.
#[derive(clap::Args)]
pub struct Cluster {
    /// Cluster objects: what `kubectl get namespaces,pods,services,endpointslices,nodes,networkpolicies
    /// -A -o yaml` prints (a List), a multi-document YAML stream, or JSON. Policies in it are used.
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// The stageset-controller chart's values: the policies the chart renders from them are used.
    #[arg(long, value_name = "FILE")]
    values: Option<PathBuf>,
    /// Helm release name (default: from the controller pod in the inventory, else stageset-controller).
    #[arg(long)]
    release: Option<String>,
    /// Release namespace (default: from the controller pod in the inventory, else default).
    #[arg(long)]
    pub namespace: Option<String>,
}

/// Where policies come from: the cluster (and values), plus manifests.
#[derive(clap::Args)]
pub struct Sources {
    #[command(flatten)]
    cluster: Cluster,
    /// Read the cluster from the API (KUBECONFIG or in-cluster config): its inventory and live
    /// policies (unless --inventory is given), and for `check` the flows the agents published
    /// in FlowReports (unless --flows is given). --values and --policy still add candidates.
    #[arg(long)]
    from_cluster: bool,
    /// Rendered or live policy manifests (repeatable): NetworkPolicy, CiliumNetworkPolicy,
    /// Calico NetworkPolicy, ClusterNetworkPolicy.
    #[arg(long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub struct Args {
    /// The flow file (from `netaudit record`, or hand-written).
    #[arg(long, value_name = "FILE", required_unless_present = "from_cluster")]
    flows: Option<PathBuf>,
    #[command(flatten)]
    sources: Sources,
    /// With --from-cluster: only the FlowReports of this target workload (the agent's --target name).
    #[arg(long, requires = "from_cluster")]
    target: Option<String>,
    /// Required-traffic matrix for another workload (default: the built-in stageset-controller one).
    #[arg(long, value_name = "FILE")]
    matrix: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::Args)]
pub struct LintArgs {
    #[command(flatten)]
    sources: Sources,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

fn load(s: &Sources) -> Result<Loaded> {
    load_cluster(&s.cluster, &s.policies, s.from_cluster)
}

/// Reads the cluster (`--inventory`; else, with `from_cluster`, the objects listed from the
/// API), `policy_files` and the chart context (rendering the chart's policies).
pub fn load_cluster(s: &Cluster, policy_files: &[PathBuf], from_cluster: bool) -> Result<Loaded> {
    let mut loaded = match &s.inventory {
        Some(p) => Loaded::from_inventory_file(p)?,
        None if from_cluster => Loaded::from_documents(super::agent::fetch_documents()?)?,
        None => Loaded::default(),
    };
    for path in policy_files {
        loaded.add_policy_file(path)?;
    }
    let chart =
        ChartSource { values: s.values.as_deref(), release: s.release.as_deref(), namespace: s.namespace.as_deref() };
    loaded.add_chart(chart)?;
    Ok(loaded)
}

pub fn run(args: Args) -> Result<ExitCode> {
    let flows = match &args.flows {
        Some(path) => FlowFile::read(path)?,
        None => super::agent::fetch_flows(args.sources.cluster.namespace.as_deref(), args.target.as_deref())?,
    };
    let loaded = load(&args.sources)?;
    let matrix = match &args.matrix {
        Some(p) => Matrix::load(p)?,
        None => Matrix::default_matrix(),
    };
    let check = Check {
        inventory: &loaded.inventory,
        policies: &loaded.policies,
        chart: loaded.chart.as_ref(),
        matrix: &matrix,
    };
    let mut report = check.run(&flows)?;
    report.notes.splice(0..0, loaded.all_notes());
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&report).context("serializing the report")? + "\n",
        Format::Table => table(&report, &matrix),
    };
    super::emit(&text)?;
    Ok(if report.summary.cut > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

pub fn run_lint(args: LintArgs) -> Result<ExitCode> {
    let loaded = load(&args.sources)?;
    if loaded.policies.is_empty() {
        let msg = "no policies to lint: give --policy, --values, an --inventory holding policies, or --from-cluster";
        return Err(InputError::usage(msg).into());
    }
    let findings = policy::lint::lint(&loaded.policies, &loaded.inventory);
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&findings)? + "\n",
        Format::Table if findings.is_empty() => format!("no findings in {} policies\n", loaded.policies.len()),
        Format::Table => findings.iter().map(finding_line).collect(),
    };
    super::emit(&text)?;
    let errors = findings.iter().any(|f| f.severity == Severity::Error);
    Ok(if errors { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn finding_line(f: &Finding) -> String {
    let sev = match f.severity {
        Severity::Error => "ERROR",
        Severity::Warning => "warning",
    };
    format!("{sev} [{}] {}\n    {}\n    fix: {}\n", f.code, f.policy, f.message, f.fix)
}

fn table(r: &Report, matrix: &Matrix) -> String {
    let mut out = String::new();
    let s = &r.summary;
    out += &format!(
        "{} {} of {} flows cut, {} allowed; {} unexpected; {} policies\n\n",
        if s.cut > 0 { "CUT:" } else { "OK:" },
        s.cut,
        s.flows,
        s.allowed,
        s.unexpected,
        s.policies
    );
    let mut order: Vec<&FlowVerdict> = r.verdicts.iter().collect();
    // Cut flows first, then input order.
    order.sort_by_key(|v| (v.allowed, v.index));
    for v in order {
        let port = v.dst.port.map(|p| format!("/{p}")).unwrap_or_default();
        let row = v.matrix.label();
        let names = |n: &Vec<String>| if n.is_empty() { String::new() } else { format!(" [{}]", n.join(", ")) };
        out += &format!(
            "{:<5} #{:<3} {:<7} {}{}  {} ({}) -> {} ({}){}  row: {}\n",
            if v.allowed { "ok" } else { "CUT" },
            v.index,
            v.direction.to_string(),
            v.protocol,
            port,
            v.src.ip,
            v.src.identity,
            v.dst.ip,
            v.dst.identity,
            names(&v.dst.names),
            row
        );
        if let Some(svc) = &v.service {
            out += &format!("      service: {}\n", svc.note);
        }
        out += &format!("      why: {}\n", v.reason);
        if let Some(fix) = &v.fix {
            out += &format!("      fix: {fix}\n");
        }
    }
    if !r.unexpected.is_empty() {
        out += "\nUnexpected flows (no enabled row of the matrix expects them):\n";
        for i in &r.unexpected {
            let v = &r.verdicts[*i];
            let why = v.matrix.why.clone().unwrap_or_default();
            out += &format!("  #{i} {} {} -> {}:{}: {why}\n", v.protocol, v.src.ip, v.dst.ip, v.dst.port.unwrap_or(0));
        }
    }
    if !r.unused_rows.is_empty() {
        out += &format!("\nMatrix rows no flow used ({}):\n", matrix.origin);
        for u in &r.unused_rows {
            out += &format!("  {:<18} {} — {}\n", u.id, u.description, u.advice);
        }
    }
    if !r.lint.is_empty() {
        out += "\nPolicy lint:\n";
        for f in &r.lint {
            for line in finding_line(f).lines() {
                out += &format!("  {line}\n");
            }
        }
    }
    if r.losses.any() {
        out += &format!("\nLosses while recording: {}\n", r.losses);
    }
    if !r.notes.is_empty() {
        out += "\nNotes:\n";
        for n in &r.notes {
            out += &format!("  {n}\n");
        }
    }
    out
}
