//! `netaudit agent` (the DaemonSet's process) and `netaudit report` (the cluster-wide view from
//! the FlowReports the agents publish).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use netaudit::{
    agent::{
        attach,
        config::{Config, File, Mode, Target},
        look,
        manifests::{METRICS_PORT, STATE_DIR},
        reports, run,
    },
    capture::{Capture, DEFAULT_MAX_FLOWS, Persist},
    model::FlowFile,
};

use super::{check_output, record::parse_duration, write_atomically};

/// The agent's pin directory on the node's bpffs.
const PIN_DIR: &str = "/sys/fs/bpf/netaudit";
/// The loopback port the flows are served on (for `kubectl port-forward`).
const FLOWS_PORT: u16 = 9465;

#[derive(clap::Args)]
pub struct Args {
    /// A config file (YAML or JSON) with the same settings in kebab-case (`targets:` as a list of
    /// {name, namespace, selector}); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A workload to audit: NAME=NAMESPACE/LABEL-SELECTOR (repeatable), e.g.
    /// `ssc=flux-system/app.kubernetes.io/name=stageset-controller`.
    #[arg(long = "target", value_name = "TARGET", env = "NETAUDIT_TARGETS", value_delimiter = ';')]
    targets: Vec<Target>,
    /// learn: record and propose; watch: also judge every new flow and raise drift alerts.
    #[arg(long, value_enum, env = "NETAUDIT_MODE")]
    mode: Option<Mode>,
    /// Watch mode: the chart's values; the policies the chart renders from them count as in
    /// force (beside the live policy objects).
    #[arg(long, value_name = "FILE")]
    values: Option<PathBuf>,
    /// Required-traffic matrix for another workload (default: the built-in one).
    #[arg(long, value_name = "FILE")]
    matrix: Option<PathBuf>,
    /// The kubelet's cgroup root (default: the cgroup2 mount).
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
    /// Where maps and links are pinned (a bpffs): the recording survives the agent.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Where the agent keeps its state on the node.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Capacity of the in-kernel flow map (all pods of this node together).
    #[arg(long)]
    max_flows: Option<u32>,
    /// /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The flows, read-only (`kubectl port-forward`). Keep it on loopback: flow data is sensitive.
    #[arg(long, value_name = "ADDR")]
    flows_listen: Option<SocketAddr>,
    /// How often flows are drained, enriched and judged.
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// The least time between two updates of one pod's FlowReport.
    #[arg(long, value_parser = parse_duration)]
    report_interval: Option<Duration>,
    /// Do not publish FlowReports.
    #[arg(long)]
    no_reports: bool,
    /// Uninstalling: detach everything earlier agents left pinned, remove their state, and exit.
    #[arg(long)]
    cleanup: bool,
}

fn config(a: Args) -> Result<Config> {
    let file = match &a.config {
        Some(p) => File::load(p)?,
        None => File::default(),
    };
    Ok(Config {
        node_name: a.node_name.or(file.node_name).unwrap_or_default(),
        targets: if a.targets.is_empty() { file.targets } else { a.targets },
        mode: a.mode.or(file.mode).unwrap_or(Mode::Learn),
        values: a.values.or(file.values),
        matrix: a.matrix.or(file.matrix),
        cgroup_root: a.cgroup_root.or(file.cgroup_root),
        pin_dir: a.pin_dir.or(file.pin_dir).unwrap_or_else(|| PIN_DIR.into()),
        state_dir: a.state_dir.or(file.state_dir).unwrap_or_else(|| STATE_DIR.into()),
        max_flows: a.max_flows.or(file.max_flows).unwrap_or(DEFAULT_MAX_FLOWS),
        listen: a.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], METRICS_PORT))),
        flows_listen: a
            .flows_listen
            .or(file.flows_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], FLOWS_PORT))),
        interval: a.interval.or(file.interval).unwrap_or(Duration::from_secs(5)),
        report_interval: a.report_interval.or(file.report_interval).unwrap_or(Duration::from_secs(60)),
        publish: !a.no_reports && file.publish.unwrap_or(true),
    })
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cleanup = a.cleanup;
    let config = config(a)?;
    if cleanup {
        let persist = Persist { pin_dir: config.pin_dir.clone(), state_dir: config.state_dir.clone() };
        Capture::remove_persisted(&persist)?;
        for f in [attach::PODS_FILE, look::SEEN_FILE] {
            let _ = std::fs::remove_file(config.state_dir.join(f));
        }
        say!(
            "netaudit: removed the pins under {} and the state in {}",
            config.pin_dir.display(),
            config.state_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    run::run(config)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Only this namespace's FlowReports (default: all namespaces).
    #[arg(long, short)]
    namespace: Option<String>,
    /// Only the reports of this target workload (the agent's --target name).
    #[arg(long)]
    target: Option<String>,
    /// Write the merged flow file here (atomically) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// The flows all agents published, as one flow file (for `check`, `propose`, `graph`).
pub fn run_report(a: ReportArgs) -> Result<ExitCode> {
    if let Some(out) = &a.output {
        check_output("--output", out)?;
    }
    let file = fetch_flows(a.namespace.as_deref(), a.target.as_deref())?;
    let json = file.to_json();
    match &a.output {
        Some(p) => {
            write_atomically(p, &json)?;
            say!("netaudit: wrote {}", p.display());
        }
        None => super::emit(&json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Lists the inventory and policy objects once through the API.
pub fn fetch_documents() -> Result<Vec<netaudit::input::Document>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = kube::Client::try_default().await.context("configuring the Kubernetes client (KUBECONFIG)")?;
        netaudit::agent::cluster::list_documents(&client).await
    })
}

/// Reads and merges the FlowReports through the API (KUBECONFIG or in-cluster); says what it
/// found on stderr, truncated reports included.
pub fn fetch_flows(namespace: Option<&str>, target: Option<&str>) -> Result<FlowFile> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let fetched = runtime.block_on(async {
        let client = kube::Client::try_default().await.context("configuring the Kubernetes client (KUBECONFIG)")?;
        reports::fetch(&client, namespace, target).await
    })?;
    if fetched.is_empty() {
        anyhow::bail!(
            "no FlowReports{}{}: is the agent running with --target for this workload?",
            namespace.map(|n| format!(" in namespace {n}")).unwrap_or_default(),
            target.map(|t| format!(" of target {t}")).unwrap_or_default()
        );
    }
    let mut nodes: Vec<&str> = fetched.iter().map(|f| f.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    say!("netaudit: {} FlowReports from {} node(s): {}", fetched.len(), nodes.len(), nodes.join(", "));
    for f in fetched.iter().filter(|f| f.truncated > 0) {
        say!(
            "netaudit: WARNING: FlowReport {} left out {} of its quietest flows (object size limit); the agent's \
             /flows endpoint on node {} has them all",
            f.id,
            f.truncated,
            f.node
        );
    }
    let truncated: u64 = fetched.iter().map(|f| f.truncated).sum();
    let mut file = FlowFile::merge(fetched.into_iter().map(|f| f.flows));
    // Left out of a report is lost to this reader: say so where every consumer looks.
    file.losses.flows += truncated;
    Ok(file)
}
