//! `netaudit demo`: the whole story in a lab on this machine. Builds the lab (see
//! `netaudit::lab`), starts the stand-in controller (its apiserver watch opens before recording),
//! records it with the real eBPF programs, then runs the real `check` and `propose` on what was
//! recorded and prints the flow table, the unexpected flows and unused rows, the proposed
//! allowlist, and what the chart documentation's example egress block would cut. Everything the
//! lab created is removed at the end, on failure and on Ctrl-C.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netaudit::{
    capture::{Capture, CaptureConfig},
    chart::{Chart, Values},
    check::{Check, Report},
    graph,
    inventory::Inventory,
    matrix::Matrix,
    policy::Engine,
    propose::{self, Options, render},
};

use netaudit_lab::{self as lab, Lab, host::Actor};

use super::{InputError, write_atomically};

#[derive(clap::Args)]
pub struct Args {
    /// Policy engine to propose for.
    #[arg(long, default_value = "kubernetes", value_parser = |s: &str| s.parse::<Engine>())]
    engine: Engine,
    /// Where to write the artefacts (created if missing); a fresh temporary directory when absent.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// How long to record after the controller starts its work.
    #[arg(long, default_value = "4s", value_parser = super::record::parse_duration)]
    window: Duration,
}

fn say(s: &str) {
    say!("demo: {s}");
}

pub fn run(args: Args) -> Result<ExitCode> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(InputError::usage(
            "the demo needs root (network namespaces, a cgroup, eBPF programs): run it with sudo",
        )
        .into());
    }
    if std::process::Command::new("nft").arg("--version").output().is_err() {
        let msg = "the demo needs nftables for the lab's ClusterIP DNAT: apt-get install nftables";
        return Err(InputError::usage(msg).into());
    }
    netaudit::capture::preflight()?;
    let dir = match &args.output_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| InputError::new(format!("--output-dir {}", d.display()), e.to_string()))?;
            d.clone()
        }
        None => tempfile::Builder::new().prefix("netaudit-demo-").tempdir()?.keep(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }
    let tag = std::process::id().to_string();
    let values_path = dir.join("values.yaml");
    write_atomically(&values_path, lab::CONTROLLER_VALUES)?;
    let values = Values::load(&values_path)?;

    say(&format!(
        "building the lab (network namespaces na-pod-{tag} and na-cluster-{tag}, cgroup netaudit-demo-{tag})"
    ));
    let lab = Lab::build(&tag)?;
    let flows = record(&lab, &values, &args, &stop)?;
    let capture_id = lab.cgroup.path.display().to_string();
    drop(lab);
    say("lab removed");
    write_atomically(&dir.join("flows.json"), &flows.to_json())?;

    let inventory_path = dir.join("inventory.yaml");
    let release =
        netaudit::chart::Release { name: netaudit::chart::CHART_NAME.into(), namespace: "stageset-system".into() };
    write_atomically(&inventory_path, &lab::inventory_yaml(&values, &release)?)?;
    let (inventory, _) = Inventory::load(&inventory_path)?;
    let matrix = Matrix::default_matrix();

    // What the chart documentation's example egress block would cut.
    let example_path = dir.join("docs-example-values.yaml");
    write_atomically(&example_path, &lab::docs_example_values())?;
    let example = Values::load(&example_path)?;
    let example = Chart { values: example, release: release.clone() };
    let policies = example.policies()?;
    let check = Check { inventory: &inventory, policies: &policies, chart: Some(&example), matrix: &matrix };
    let report = check.run(&flows)?;
    write_atomically(&dir.join("check-docs-example.json"), &(serde_json::to_string_pretty(&report)? + "\n"))?;

    let opts = Options { engine: args.engine, include_unexpected: false, aggregate: None };
    let chart = Chart { values, release };
    let proposal = propose::propose(&flows, &inventory, Some(&chart), &matrix, &opts)?;
    let proposal_yaml = render::values_yaml(&proposal)?;
    write_atomically(&dir.join("proposal-values.yaml"), &proposal_yaml)?;
    write_atomically(
        &dir.join("proposal-manifests.yaml"),
        &render::manifests_yaml(&render::manifests(&proposal, &chart.values, None)?)?,
    )?;
    write_atomically(&dir.join("proposal.json"), &(serde_json::to_string_pretty(&proposal)? + "\n"))?;
    let title =
        format!("netaudit demo: flows of {} (checked against the chart docs' example egress block)", capture_id);
    write_atomically(&dir.join("flows.dot"), &graph::dot(&report, &title))?;
    write_atomically(&dir.join("flows.html"), &graph::html(&report, &title))?;

    let text = summary(&report, &proposal_yaml, args.engine, &dir);
    write_atomically(&dir.join("report.txt"), &text)?;
    super::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the lab's processes, records the learning window, and stops them.
fn record(lab: &Lab, values: &Values, args: &Args, stop: &AtomicBool) -> Result<netaudit::model::FlowFile> {
    let exe = std::env::current_exe().context("finding the netaudit binary")?;
    let mut actor_args = vec!["lab-actor".to_string(), String::new()];
    for (name, port) in values.enabled_ports() {
        actor_args.push(format!("{name}={port}"));
    }
    let with_role = |role: &str| {
        let mut a = actor_args.clone();
        a[1] = role.to_string();
        a
    };
    let mut cluster = Actor::spawn("cluster", &exe, &with_role("cluster"), &lab.cluster, None)?;
    cluster.expect("ready")?;
    let mut controller = Actor::spawn("controller", &exe, &with_role("controller"), &lab.pod, Some(&lab.cgroup.path))?;
    controller.expect("watching")?;
    say(&format!(
        "the stand-in controller (pid {}) serves its ports and opened its apiserver watch to {}:443 before recording",
        controller.pid(),
        lab::SERVICES[0].cluster_ip
    ));
    let mut capture = Capture::start(&CaptureConfig::new(vec![lab.cgroup.path.clone()]))?;
    say(&format!("recording {} with the eBPF programs for {}s", lab.cgroup.path.display(), args.window.as_secs()));
    controller.send("go")?;
    cluster.send("clients")?;
    controller.expect("done")?;
    cluster.expect("done")?;
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    while started.elapsed() < args.window {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted; the lab was removed");
        }
        std::thread::sleep(Duration::from_millis(200));
        capture.poll()?;
        if tty {
            let p = capture.progress()?;
            let _ = write!(
                std::io::stderr(),
                "\r\x1b[Kdemo: recording {}s of {}s · {} flows",
                started.elapsed().as_secs(),
                args.window.as_secs(),
                p.flows
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        say!("");
    }
    let flows = capture.stop()?;
    say(&format!("recorded {} flows", flows.flows.len()));
    if flows.losses.any() {
        say(&format!("WARNING: losses while recording: {}", flows.losses));
    }
    Ok(flows)
}

fn summary(r: &Report, proposal_yaml: &str, engine: Engine, dir: &Path) -> String {
    let mut s = String::new();
    s += &format!("\n== Recorded flows ({}) ==\n", r.verdicts.len());
    for v in &r.verdicts {
        let port = v.dst.port.map(|p| format!("/{p}")).unwrap_or_default();
        let names = if v.dst.names.is_empty() { String::new() } else { format!(" [{}]", v.dst.names.join(", ")) };
        let row = v.matrix.label();
        s += &format!(
            "  {:<7} {:<9} {} ({}) -> {} ({}){names}   row: {row}\n",
            v.direction.to_string(),
            format!("{}{port}", v.protocol),
            v.src.ip,
            v.src.identity,
            v.dst.ip,
            v.dst.identity,
        );
        if let Some(svc) = &v.service {
            s += &format!("            {}\n", svc.note);
        }
    }
    s += "\n== Unexpected flows (no enabled row of the required-traffic matrix expects them) ==\n";
    if r.unexpected.is_empty() {
        s += "  none\n";
    }
    for i in &r.unexpected {
        let v = &r.verdicts[*i];
        s += &format!(
            "  #{i} {} {} -> {}:{}: {}\n",
            v.protocol,
            v.src.ip,
            v.dst.ip,
            v.dst.port.unwrap_or(0),
            v.matrix.why.clone().unwrap_or_default()
        );
    }
    s += "\n== Matrix rows no flow used ==\n";
    if r.unused_rows.is_empty() {
        s += "  none\n";
    }
    for u in &r.unused_rows {
        s += &format!("  {:<18} {} — {}\n", u.id, u.description, u.advice);
    }
    s += &format!("\n== Proposed allowlist ({engine} engine, as chart values) ==\n{proposal_yaml}");
    let cut: Vec<_> = r.verdicts.iter().filter(|v| !v.allowed).collect();
    s += &format!(
        "\n== What the chart documentation's example egress block would cut ({} of {} flows) ==\n",
        cut.len(),
        r.verdicts.len()
    );
    s += "  (DNS to kube-system, the apiserver as an ipBlock on 443, flux-system, an S3 CIDR on 443, an OTLP address on 4317)\n";
    for v in cut {
        s += &format!(
            "  CUT #{} {} {} -> {}:{} ({}) row: {}\n      why: {}\n",
            v.index,
            v.protocol,
            v.src.ip,
            v.dst.ip,
            v.dst.port.unwrap_or(0),
            v.dst.identity,
            v.matrix.row.as_deref().unwrap_or("unexpected"),
            v.reason
        );
        if let Some(f) = &v.fix {
            s += &format!("      fix: {f}\n");
        }
    }
    s += &format!(
        "\n== Artefacts in {} ==\n  flows.json  inventory.yaml  values.yaml  docs-example-values.yaml  check-docs-example.json\n  \
         proposal-values.yaml  proposal-manifests.yaml  proposal.json  flows.dot  flows.html (open in a browser)  report.txt\n",
        dir.display()
    );
    s
}
