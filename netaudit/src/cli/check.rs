//! `netaudit check` (flows × policies → verdicts) and `netaudit lint` (the policies alone).
//! Exit codes: 0 nothing cut, 1 some flow cut (lint: an error-level finding), 2 any error.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use netaudit::{
    chart::{CHART_NAME, Release, Values},
    check::{Check, FlowVerdict, Report},
    error::InputError,
    input,
    inventory::Inventory,
    matrix::Matrix,
    model::FlowFile,
    policy::{
        self, Policy,
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

/// Everything read from the sources.
pub struct Loaded {
    pub inventory: Inventory,
    pub policies: Vec<Policy>,
    pub values: Values,
    pub values_given: bool,
    pub release: Release,
    pub notes: Vec<String>,
}

fn load(s: &Sources) -> Result<Loaded> {
    load_cluster(&s.cluster, &s.policies, s.from_cluster)
}

/// Reads the cluster (`--inventory`; else, with `from_cluster`, the objects listed from the
/// API), the values (rendering the chart's policies) and `policy_files`.
pub fn load_cluster(s: &Cluster, policy_files: &[PathBuf], from_cluster: bool) -> Result<Loaded> {
    let mut notes = Vec::new();
    let (mut inventory, rest) = match &s.inventory {
        Some(p) => Inventory::load(p)?,
        None if from_cluster => {
            let mut inv = Inventory::default();
            let rest = inv.add_documents(super::agent::fetch_documents()?)?;
            inv.index();
            (inv, rest)
        }
        None => (Inventory::default(), Vec::new()),
    };
    let (mut policies, skipped) = policy::from_documents(rest)?;
    for d in &skipped {
        inventory.note_skipped(d);
    }
    for path in policy_files {
        let docs = input::read_objects(path)?;
        let (found, rest) = policy::from_documents(docs)?;
        if found.is_empty() {
            return Err(InputError::new(format!("--policy {}", path.display()), "holds no policy objects").into());
        }
        policies.extend(found);
        for d in &rest {
            inventory.note_skipped(d);
        }
    }
    let (values, values_given) = match &s.values {
        Some(p) => (Values::load(p)?, true),
        None => (Values::defaults(), false),
    };
    // The release: flags, else the controller pod the inventory holds.
    let found =
        inventory.pods.iter().find(|p| p.labels.get("app.kubernetes.io/name").map(String::as_str) == Some(CHART_NAME));
    let release = Release {
        name: s
            .release
            .clone()
            .or_else(|| found.and_then(|p| p.labels.get("app.kubernetes.io/instance").cloned()))
            .unwrap_or_else(|| CHART_NAME.to_string()),
        namespace: s
            .namespace
            .clone()
            .or_else(|| found.map(|p| p.namespace.clone()))
            .unwrap_or_else(|| "default".into()),
    };
    if values_given {
        if s.release.is_none() && found.is_none() {
            notes.push(format!(
                "release name not given and no controller pod in the inventory: using `{}`",
                release.name
            ));
        }
        if s.namespace.is_none() && found.is_none() {
            notes.push(format!(
                "release namespace not given and no controller pod in the inventory: using `{}`",
                release.namespace
            ));
        }
        let rendered = values.render(&release)?;
        if rendered.is_empty() {
            notes.push(format!("{}: networkPolicy.enabled is false: the chart renders no policy", values.origin));
        }
        policies.extend(policy::from_documents(rendered)?.0);
    }
    notes.extend(inventory.notes.iter().cloned());
    Ok(Loaded { inventory, policies, values, values_given, release, notes })
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
        values: &loaded.values,
        values_given: loaded.values_given,
        release: &loaded.release,
        matrix: &matrix,
    };
    let mut report = check.run(&flows)?;
    report.notes.splice(0..0, loaded.notes);
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
            format!("{:?}", v.direction).to_lowercase(),
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
        out += &format!("\nLosses while recording: {:?}\n", r.losses);
    }
    if !r.notes.is_empty() {
        out += "\nNotes:\n";
        for n in &r.notes {
            out += &format!("  {n}\n");
        }
    }
    out
}
