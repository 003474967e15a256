//! `netaudit record`: attach, record until the duration ends or SIGINT/SIGTERM, write the flow
//! file atomically.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use netaudit::{
    capture::{Capture, CaptureConfig, DEFAULT_MAX_FLOWS, Persist, cgroup},
    model::FlowFile,
};

use super::{InputError, check_output, write_atomically};

#[derive(clap::Args)]
pub struct Args {
    /// cgroup v2 directory to audit (repeatable). Its descendants are audited too.
    #[arg(long, value_name = "DIR", required_unless_present = "pid", conflicts_with = "pid")]
    cgroup: Vec<PathBuf>,
    /// Audit the cgroup this process is in.
    #[arg(long)]
    pid: Option<u32>,
    /// How long to record: seconds, or a duration such as 30s, 5m, 1h. Without it, until
    /// SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Write the flow file here (atomically); stdout when absent.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Capacity of the in-kernel flow map; flows beyond it are counted as lost.
    #[arg(long, default_value_t = DEFAULT_MAX_FLOWS)]
    max_flows: u32,
    /// Keep recording across a crash: pin the maps and links here (on a bpffs). A killed
    /// recorder's programs keep counting; the next `record` with the same directories resumes.
    #[arg(long, value_name = "DIR", requires = "state_dir")]
    pin_dir: Option<PathBuf>,
    /// With --pin-dir: where DNS names and the window's start are kept across restarts.
    #[arg(long, value_name = "DIR", requires = "pin_dir")]
    state_dir: Option<PathBuf>,
}

pub fn parse_duration(s: &str) -> Result<Duration, netaudit::error::FieldError> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        netaudit::error::FieldError::whole(format!("`{s}` is not a duration ({e}); use seconds or e.g. 30s, 5m"))
    })
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cgroups = match args.pid {
        Some(pid) => {
            vec![cgroup::cgroup_of_pid(pid).map_err(|e| InputError::new(format!("--pid {pid}"), format!("{e:#}")))?]
        }
        None => args.cgroup.clone(),
    };
    if let Some(out) = &args.output {
        check_output("--output", out)?;
    }
    // Bad paths are the user's to fix (exit 2), so check them before anything else.
    let mount = cgroup::cgroup2_mount()?;
    let cgroups = cgroups
        .iter()
        .map(|dir| cgroup::validate(dir, &mount).map_err(|e| InputError::new("--cgroup", format!("{e:#}"))))
        .collect::<Result<Vec<_>, _>>()?;
    cgroup::reject_nesting(&cgroups).map_err(|e| InputError::new("--cgroup", format!("{e:#}")))?;
    netaudit::capture::preflight()?;
    let persist = match (&args.pin_dir, &args.state_dir) {
        (Some(pin_dir), Some(state_dir)) => {
            if !pin_dir.is_dir() {
                let flag = format!("--pin-dir {}", pin_dir.display());
                return Err(InputError::new(flag, "no such directory (mount a bpffs there)").into());
            }
            Some(Persist { pin_dir: pin_dir.clone(), state_dir: state_dir.clone() })
        }
        _ => None,
    };
    let config = CaptureConfig { cgroups, max_flows: args.max_flows, persist };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handlers")?;
    }
    let mut capture = Capture::start(&config)?;
    for s in capture.sources() {
        say!("netaudit: recording cgroup {} (id {})", s.cgroup, s.cgroup_id);
    }

    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_progress = Instant::now() - Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) && args.duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(100));
        capture.poll()?;
        if tty && last_progress.elapsed() >= Duration::from_millis(500) {
            last_progress = Instant::now();
            let p = capture.progress()?;
            let remaining = args
                .duration
                .map(|d| format!(", {}s left", d.saturating_sub(started.elapsed()).as_secs()))
                .unwrap_or_default();
            let lost = if p.losses.any() {
                format!(
                    ", LOST {} flows / {} packets / {} DNS answers",
                    p.losses.flows, p.losses.packets, p.losses.dns_events
                )
            } else {
                String::new()
            };
            let _ = write!(
                std::io::stderr(),
                "\r\x1b[Krecording {}s{remaining} · {} flows{lost}",
                started.elapsed().as_secs(),
                p.flows
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        say!("");
    }
    let file = capture.stop()?;
    report(&file);
    write_output(&file, args.output.as_ref())?;
    Ok(ExitCode::SUCCESS)
}

fn report(file: &FlowFile) {
    say!("netaudit: recorded {} flows", file.flows.len());
    let l = &file.losses;
    if l.any() {
        say!(
            "netaudit: WARNING: not everything was recorded: {} flows ({} packets, {} bytes) lost to a full flow map \
             (raise --max-flows), {} DNS answers lost, {} packets unparsed",
            l.flows,
            l.packets,
            l.bytes,
            l.dns_events,
            l.unparsed_packets
        );
    }
}

fn write_output(file: &FlowFile, output: Option<&PathBuf>) -> Result<()> {
    let json = file.to_json();
    match output {
        Some(path) => {
            write_atomically(path, &json)?;
            say!("netaudit: wrote {}", path.display());
        }
        None => super::emit(&json)?,
    }
    Ok(())
}
