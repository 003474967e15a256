//! `netaudit agent`: three cooperating tasks over the capture and the API's stores, joined with
//! `try_join!` — the attach reconciler ([`super::attach`]: pods come and go), the look
//! ([`super::look`]: drain, enrich, judge, alert) and the publisher ([`super::publish`]: HTTP
//! and FlowReports). SIGTERM/SIGINT stops the reconciler, has the look look once more and the
//! publisher write that, and leaves the capture pinned.
//!
//! Restart safety comes from the capture's persistence (pinned maps and links, state on the
//! node) plus the reconciler's record of which cgroup was which pod: SIGTERM leaves everything
//! pinned for the next agent (an upgrade), SIGKILL loses nothing either.

use std::{
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::{
    attach::{self, Attacher, Audited},
    cluster::LiveInventory,
    config::{Config, Mode, Target},
    drift::{Detector, Limits},
    events::{EventWriter, Recorder},
    http::{self, Published},
    judge::Judge,
    look::{Looker, SEEN_FILE},
    metrics::Metrics,
    publish::Publisher,
};
use crate::{
    capture::{Capture, CaptureConfig, Persist, cgroup},
    chart::Values,
    error::InputError,
    matrix::Matrix,
};

/// The longest one API call may hold a task: an unreachable server that drops packets would
/// otherwise stall it for the client's timeouts.
const API_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<()> {
    config.validate()?;
    limit_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(Agent::start(config)?.run())
}

/// One glibc arena per thread that ever contended lets each keep its own free memory: the
/// watches' list pages are parsed on whichever worker runs them, so every arena ends up holding
/// pages' worth of free space between long-lived objects. Two arenas (one per worker) suffice.
fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// What the tasks share.
#[derive(Clone)]
pub struct Common {
    pub capture: Arc<Mutex<Capture>>,
    pub audited: Audited,
    pub metrics: Arc<Metrics>,
    /// What the HTTP listeners serve.
    pub published: http::Shared,
    pub targets: Arc<[Target]>,
}

/// The agent between its checks and its tasks.
struct Agent {
    config: Config,
    common: Common,
    cgroup_root: std::path::PathBuf,
    judge: Option<Arc<Mutex<Judge>>>,
    registry: Arc<Registry>,
}

impl Agent {
    /// Everything that can fail on bad input or a missing privilege fails here, before the tasks.
    fn start(config: Config) -> Result<Agent> {
        let values = config.values.as_deref().map(Values::load).transpose()?;
        let matrix = match &config.matrix {
            Some(p) => Matrix::load(p)?,
            None => Matrix::default_matrix(),
        };
        let cgroup_root = match &config.cgroup_root {
            Some(r) => {
                let mount = cgroup::cgroup2_mount()?;
                cgroup::validate(r, &mount).map_err(|e| InputError::new("--cgroup-root", format!("{e:#}")))?
            }
            None => cgroup::cgroup2_mount()?,
        };
        // The pin directory is the agent's own folder on the node's bpffs, made on first start
        // (only there: never a stray directory on another filesystem).
        if !config.pin_dir.is_dir() {
            let parent = config.pin_dir.parent().unwrap_or(Path::new("/"));
            crate::capture::check_bpffs(parent)
                .and_then(|()| std::fs::create_dir(&config.pin_dir).map_err(Into::into))
                .map_err(|e| InputError::new(format!("--pin-dir {}", config.pin_dir.display()), format!("{e:#}")))?;
        }
        crate::capture::preflight()?;
        let persist = Persist { pin_dir: config.pin_dir.clone(), state_dir: config.state_dir.clone() };
        let capture =
            Capture::start(&CaptureConfig { cgroups: vec![], max_flows: config.max_flows, persist: Some(persist) })?;
        let audited = attach::load_audited(&config.state_dir)?;
        let mut detector = Detector::new(Limits::default());
        if let Ok(seen) = std::fs::read_to_string(config.state_dir.join(SEEN_FILE)) {
            detector.restore_seen(&seen, Instant::now());
        }
        let judge = (config.mode == Mode::Watch).then(|| Arc::new(Mutex::new(Judge::new(values, matrix, detector))));
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let published = Arc::new(RwLock::new(Published {
            not_ready: Some("waiting for the first lists from the API server".into()),
            judge: judge.clone(),
            ..Published::default()
        }));
        let common = Common {
            capture: Arc::new(Mutex::new(capture)),
            audited,
            metrics,
            published,
            targets: config.targets.clone().into(),
        };
        Ok(Agent { config, common, cgroup_root, judge, registry: Arc::new(registry) })
    }

    async fn run(self) -> Result<()> {
        let Agent { config, common, cgroup_root, judge, registry } = self;
        http::serve(config.listen, config.flows_listen, registry, Arc::clone(&common.published)).await?;
        let client = Client::try_default()
            .await
            .context("configuring the Kubernetes client (in-cluster service account, or KUBECONFIG)")?;
        let live = LiveInventory::start(&client);
        tracing::info!(
            node = %config.node_name,
            mode = %config.mode.name(),
            targets = %config.targets.iter().map(|t| format!("{}={}/{}", t.name, t.namespace, t.selector)).collect::<Vec<_>>().join(" "),
            "agent started"
        );
        let (stop_tx, stop) = watch::channel(false);
        let (looks_tx, looks) = watch::channel(None);
        let attacher = Arc::new(Attacher::new(common.clone(), cgroup_root, &config.state_dir));
        let recorder = Recorder::new(EventWriter::new(client.clone(), &config.node_name), API_CALL_TIMEOUT);
        let looker = Looker::new(common.clone(), judge, recorder, config.interval, &config.state_dir, live.clone());
        let publisher = Publisher {
            common: common.clone(),
            client: client.clone(),
            node: config.node_name.clone(),
            reports: config.publish,
            report_interval: config.report_interval,
            timeout: API_CALL_TIMEOUT,
        };
        tokio::try_join!(
            stop_on_signal(stop_tx),
            Arc::clone(&attacher).run(client, config.node_name.clone(), stop.clone()),
            looker.run(looks_tx, stop),
            publisher.run(looks, attacher, live),
        )?;
        tracing::info!("stopped: the capture stays pinned for the next agent");
        common.capture.lock().expect("not poisoned").suspend()
    }
}

/// Turns `stop` true on SIGTERM or SIGINT.
async fn stop_on_signal(stop: watch::Sender<bool>) -> Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
    stop.send_replace(true);
    Ok(())
}
