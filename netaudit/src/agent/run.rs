//! `netaudit agent`'s loop. Level-triggered: every tick it compares the target pods the API lists
//! on this node with the cgroups it audits and attaches or detaches; every `interval` it drains
//! the flows, enriches them from the live inventory, publishes them (HTTP, metrics), and in watch
//! mode judges the new ones; every `report_interval` it writes changed FlowReports.
//!
//! Restart safety comes from the capture's persistence (pinned maps and links, state on the
//! node) plus this loop's own record of which cgroup was which pod (`agent-pods.json`): SIGTERM
//! leaves everything pinned for the next agent (an upgrade), SIGKILL loses nothing either.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use kube::Client;
use prometheus_client::registry::Registry;

use super::{
    cgroups::{QosClass, find_pod_cgroup},
    cluster::{LiveInventory, PodRef, TargetPods},
    config::{Config, Mode},
    drift::{Alert, AlertKind, Detector, Limits},
    events::EventWriter,
    http::{self, Published, Shared},
    judge::{Generations, Judge},
    metrics::{LossLabels, Metrics, ProgramLabels},
    reports,
};
use crate::{
    capture::{Capture, CaptureConfig, Persist, cgroup},
    chart::Values,
    error::InputError,
    inventory::Inventory,
    matrix::Matrix,
    model::FlowFile,
    policy::Policy,
};

/// Hands memory the allocator holds free back to the system. The watches' list pages are large
/// and short-lived, the stores' objects small and long-lived: without this, glibc keeps the
/// pages' memory (interleaved with live objects) as resident.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The agent's record of which audited cgroup was which pod, in the state directory.
pub const PODS_FILE: &str = "agent-pods.json";
/// Watch mode's record of the flows already judged, in the state directory.
pub const SEEN_FILE: &str = "agent-seen.json";
const TICK: Duration = Duration::from_millis(500);
const SEEN_SAVE_PERIOD: Duration = Duration::from_secs(30);
/// How often the API server's reachability is probed (`GET /version`) for `/readyz`.
const API_PROBE_PERIOD: Duration = Duration::from_secs(5);
/// The longest one API call may hold the loop (the capture is drained in between): an
/// unreachable server that drops packets would otherwise stall it for the client's timeouts.
const API_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Events that could not be written (the API unreachable) wait here and are retried every look;
/// beyond this many the oldest are dropped and counted.
const PENDING_EVENTS_MAX: usize = 1000;

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<()> {
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(Agent::start(config)?.run())
}

/// The live inventory and policies, rebuilt when the reflectors moved.
#[derive(Default)]
struct Cluster {
    generation: Option<Generations>,
    inventory: Inventory,
    policies: Vec<Policy>,
}

struct Agent {
    config: Config,
    capture: Capture,
    cgroup_root: PathBuf,
    /// Audited now: cgroup directory → pod.
    attached: BTreeMap<PathBuf, PodRef>,
    /// Every pod audited (also gone ones: their flows stay), by cgroup path as flows name it.
    known: BTreeMap<String, PodRef>,
    /// Pods whose cgroup could not be attached, with the error said (once).
    failing: HashMap<String, String>,
    /// Watch mode: judges new flows; shared with `/report`.
    judge: Option<Arc<Mutex<Judge>>>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    shared: Shared,
    /// What was last written to [`SEEN_FILE`], and when.
    saved_seen: (String, Option<Instant>),
    /// Per pod: the flows last published in its FlowReport, and when.
    reported: HashMap<String, (String, Instant)>,
    cluster: Cluster,
    /// Drift alerts whose Event could not be written yet.
    pending_events: VecDeque<Alert>,
    /// When the API server was last probed, and why it is unreachable if it is.
    api: (Option<Instant>, Option<String>),
}

impl Agent {
    /// Everything that can fail on bad input or a missing privilege fails here, before the loop.
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
        let known = load_known(&config.state_dir.join(PODS_FILE))?;
        let mut detector = Detector::new(Limits::default());
        if let Ok(seen) = std::fs::read_to_string(config.state_dir.join(SEEN_FILE)) {
            detector.restore_seen(&seen, Instant::now());
        }
        let judge = (config.mode == Mode::Watch).then(|| Arc::new(Mutex::new(Judge::new(values, matrix, detector))));
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        Ok(Agent {
            capture,
            cgroup_root,
            attached: BTreeMap::new(),
            known,
            failing: HashMap::new(),
            metrics,
            registry: Arc::new(registry),
            shared: Arc::new(RwLock::new(Published {
                not_ready: Some("waiting for the first lists from the API server".into()),
                judge: judge.clone(),
                ..Published::default()
            })),
            judge,
            saved_seen: (String::new(), None),
            reported: HashMap::new(),
            cluster: Cluster::default(),
            pending_events: VecDeque::new(),
            api: (None, None),
            config,
        })
    }

    async fn run(mut self) -> Result<()> {
        http::serve(self.config.listen, self.config.flows_listen, Arc::clone(&self.registry), Arc::clone(&self.shared))
            .await?;
        let client = Client::try_default()
            .await
            .context("configuring the Kubernetes client (in-cluster service account, or KUBECONFIG)")?;
        let inventory = LiveInventory::start(&client);
        let targets = TargetPods::start(&client, &self.config.node_name, &self.config.targets);
        let events = EventWriter::new(client.clone(), &self.config.node_name);
        tracing::info!(
            node = %self.config.node_name,
            mode = ?self.config.mode,
            targets = ?self.config.targets.iter().map(|t| format!("{}={}/{}", t.name, t.namespace, t.selector)).collect::<Vec<_>>(),
            "agent started"
        );
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut ticker = tokio::time::interval(TICK);
        let mut last_look: Option<Instant> = None;
        let mut pruned = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
            let synced = targets.synced();
            if synced {
                self.reconcile(&targets.wanted())?;
                if !pruned {
                    // Pods that went while no agent ran: release what was pinned for them.
                    for id in self.capture.prune_pins()? {
                        tracing::info!(cgroup_id = id, "released the pins of a pod that is gone");
                    }
                    pruned = true;
                }
            }
            self.capture.poll()?;
            self.probe_api(&client).await;
            {
                let mut p = self.shared.write().expect("not poisoned");
                p.last_loop = Some(Instant::now());
                p.not_ready = match (synced, inventory.synced(), &self.api.1) {
                    (_, _, Some(why)) => Some(format!("the API server is unreachable: {why}")),
                    (true, true, None) => None,
                    (false, _, None) => Some("waiting for the first list of target pods".into()),
                    (true, false, None) => Some("waiting for the first lists of the inventory".into()),
                };
            }
            if last_look.is_none_or(|t| t.elapsed() >= self.config.interval) {
                last_look = Some(Instant::now());
                self.look(&client, &inventory, &events, false).await?;
            }
        }
        tracing::info!("stopping: the capture stays pinned for the next agent");
        self.look(&client, &inventory, &events, true).await?;
        self.capture.suspend()
    }

    /// Attaches to wanted pods not audited yet; detaches from audited pods no longer wanted.
    fn reconcile(&mut self, wanted: &[PodRef]) -> Result<()> {
        for pod in wanted {
            tracing::debug!(pod = %pod.id(), uid = %pod.uid, "wanted");
            if self.attached.values().any(|p| p.uid == pod.uid) {
                continue;
            }
            let qos = pod.qos.as_deref().and_then(|q| q.parse::<QosClass>().ok());
            // No cgroup yet: the pod is still being created; looked for again next tick.
            let Some(dir) = find_pod_cgroup(&self.cgroup_root, &pod.uid, qos) else {
                tracing::debug!(pod = %pod.id(), "no cgroup yet");
                continue;
            };
            match self.capture.add_cgroup(&dir) {
                Ok(source) => {
                    tracing::info!(pod = %pod.id(), target_workload = %pod.target, cgroup = %dir.display(), "attached");
                    self.failing.remove(&pod.uid);
                    self.attached.insert(dir, pod.clone());
                    self.known.insert(source.cgroup, pod.clone());
                    self.save_known()?;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failing.get(&pod.uid) != Some(&msg) {
                        self.metrics.attach_errors.get_or_create(&Metrics::target(&pod.target)).inc();
                        tracing::error!(pod = %pod.id(), cgroup = %dir.display(), "cannot attach: {msg}");
                        self.failing.insert(pod.uid.clone(), msg);
                    }
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .attached
            .iter()
            .filter(|(_, p)| !wanted.iter().any(|w| w.uid == p.uid))
            .map(|(d, _)| d.clone())
            .collect();
        for dir in gone {
            let pod = self.attached.remove(&dir).expect("listed");
            self.capture.remove_cgroup(&dir).with_context(|| format!("detaching from pod {}", pod.id()))?;
            tracing::info!(pod = %pod.id(), "detached (the pod is gone; its flows stay)");
        }
        for t in &self.config.targets {
            let n = self.attached.values().filter(|p| p.target == t.name).count();
            self.metrics.attached_pods.get_or_create(&Metrics::target(&t.name)).set(n as i64);
        }
        Ok(())
    }

    fn save_known(&self) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.known)?;
        Ok(crate::output::write_atomically(&self.config.state_dir.join(PODS_FILE), &json)?)
    }

    /// Takes the inventory and policies from the stores when they moved (objects the stores
    /// could not read were skipped there, and said once).
    fn refresh_cluster(&mut self, live: &LiveInventory) {
        let generation = live.generations();
        if self.cluster.generation == Some(generation) {
            return;
        }
        (self.cluster.inventory, self.cluster.policies) = live.snapshot();
        self.cluster.generation = Some(generation);
        release_freed_memory();
    }

    /// Drains, enriches, publishes and (watch mode) judges the flows.
    async fn look(&mut self, client: &Client, live: &LiveInventory, events: &EventWriter, last: bool) -> Result<()> {
        self.refresh_cluster(live);
        let mut file = self.capture.snapshot()?;
        self.cluster.inventory.enrich(&mut file);
        let per_pod = self.split(&file);

        for t in &self.config.targets {
            let n: usize = per_pod.iter().filter(|(p, _)| p.target == t.name).map(|(_, f)| f.flows.len()).sum();
            self.metrics.flows.get_or_create(&Metrics::target(&t.name)).set(n as i64);
        }
        self.export_capture_health(&file);

        // Judging or publishing before the first lists arrived would take every peer for an
        // unknown address; the flows wait in the kernel's map meanwhile.
        let synced = live.synced();
        if let Some(judge) = self.judge.clone().filter(|_| synced) {
            self.judge(&judge, live, &file, &per_pod, events, last).await?;
        }

        // Events owed from looks while the API server was away.
        self.write_pending_events(events).await;
        {
            let mut p = self.shared.write().expect("not poisoned");
            p.flows = Arc::new(file);
            p.pods = per_pod.iter().map(|(pod, f)| (pod.id(), Arc::new(f.clone()))).collect();
        }
        if self.config.publish && (synced || last) {
            self.publish(client, &per_pod, last).await;
        }
        Ok(())
    }

    /// Watch mode: judges what changed, raises the alerts, keeps the detector's record.
    async fn judge(
        &mut self,
        judge: &Mutex<Judge>,
        live: &LiveInventory,
        file: &FlowFile,
        per_pod: &[(PodRef, FlowFile)],
        events: &EventWriter,
        last: bool,
    ) -> Result<()> {
        let now = Instant::now();
        let inventory = &self.cluster.inventory;
        let audited = per_pod.iter().filter_map(|(p, _)| inventory.pod(&p.namespace, &p.name));
        let (alerts, seen, suppressed) = {
            let mut j = judge.lock().expect("not poisoned");
            let look = match j.look(file, inventory, &self.cluster.policies, live.generations(), audited, now) {
                Ok(look) => look,
                Err(e) => {
                    tracing::warn!("judging the flows: {e:#}");
                    return Ok(());
                }
            };
            // Saved right after alerts were raised (so a restart does not repeat them), else at
            // most every SEEN_SAVE_PERIOD (the record grows with the flow map): a SIGKILL loses
            // at most that much of the quiet part.
            let due = self.saved_seen.1.is_none_or(|t| t.elapsed() >= SEEN_SAVE_PERIOD);
            let seen = (!look.alerts.is_empty() || due || last).then(|| j.detector.seen_json(now));
            (look.alerts, seen, j.detector.suppressed.clone())
        };
        for a in alerts {
            self.raise(events, a).await;
        }
        for (cgroup, n) in &suppressed {
            if let Some(p) = self.known.get(cgroup) {
                self.metrics.alerts_suppressed.get_or_create(&Metrics::target(&p.target)).set(*n as i64);
            }
        }
        // The record is serialized at most once per period even when it did not change (it
        // grows with the flow map), and written only when it did.
        if let Some(seen) = seen {
            if seen != self.saved_seen.0 {
                crate::output::write_atomically(&self.config.state_dir.join(SEEN_FILE), &seen)?;
                self.saved_seen.0 = seen;
            }
            self.saved_seen.1 = Some(now);
        }
        Ok(())
    }

    /// The flows of each pod ever audited, as its own flow file.
    fn split(&self, file: &FlowFile) -> Vec<(PodRef, FlowFile)> {
        let mut out: Vec<(PodRef, FlowFile)> = Vec::new();
        for (cgroup, pod) in &self.known {
            let flows: Vec<_> = file.flows.iter().filter(|f| f.cgroup.as_deref() == Some(cgroup)).cloned().collect();
            let sources = file.sources.iter().filter(|s| &s.cgroup == cgroup).cloned().collect();
            // A pod's containers may share a cgroup path with an earlier pod of the same UID
            // only in theory; merge rather than overwrite.
            let f = FlowFile { flows, sources, ..file.clone() };
            match out.iter_mut().find(|(p, _)| p.uid == pod.uid) {
                Some((_, existing)) => *existing = FlowFile::merge([std::mem::replace(existing, f.clone()), f]),
                None => out.push((pod.clone(), f)),
            }
        }
        out
    }

    fn export_capture_health(&self, file: &FlowFile) {
        let l = &file.losses;
        for (what, n) in [
            ("flows", l.flows),
            ("packets", l.packets),
            ("bytes", l.bytes),
            ("dns_events", l.dns_events),
            ("unparsed_packets", l.unparsed_packets),
        ] {
            self.metrics.lost.get_or_create(&LossLabels { what: what.into() }).set(n as i64);
        }
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1");
        self.metrics.program_stats_enabled.set(i64::from(enabled));
        if let Ok(stats) = self.capture.program_stats() {
            for (name, time, runs) in stats {
                let l = ProgramLabels { program: name.into() };
                self.metrics.program_run_seconds.get_or_create(&l).set(time.as_secs_f64());
                self.metrics.program_runs.get_or_create(&l).set(runs as i64);
            }
        }
    }

    /// Whether the API server answers (every [`API_PROBE_PERIOD`]): recording goes on without
    /// it, but `/readyz` says so, and Events and FlowReports wait for it.
    async fn probe_api(&mut self, client: &Client) {
        if self.api.0.is_some_and(|t| t.elapsed() < API_PROBE_PERIOD) {
            return;
        }
        self.api.0 = Some(Instant::now());
        let why = match tokio::time::timeout(API_CALL_TIMEOUT, client.apiserver_version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {}", humantime::format_duration(API_CALL_TIMEOUT))),
        };
        match (&self.api.1, &why) {
            (None, Some(w)) => tracing::warn!("the API server is unreachable (recording goes on): {w}"),
            (Some(_), None) => tracing::info!("the API server is reachable again"),
            _ => {}
        }
        self.api.1 = why;
    }

    /// A drift alert: a log line, a metric, and an Event on the pod (retried while the API
    /// server cannot be reached).
    async fn raise(&mut self, events: &EventWriter, a: Alert) {
        let Some(pod) = self.known.get(&a.pod) else { return };
        self.metrics.alert(&pod.target, a.kind);
        let (_, what) = alert_words(a.kind);
        tracing::warn!(
            alert = ?a.kind,
            pod = %pod.id(),
            target_workload = %pod.target,
            flow = %a.flow,
            reason = %a.reason,
            fix = a.fix.as_deref().unwrap_or(""),
            "drift: {what}"
        );
        self.pending_events.push_back(a);
        if self.pending_events.len() > PENDING_EVENTS_MAX {
            self.pending_events.pop_front();
            self.metrics.event_errors.inc();
        }
        self.write_pending_events(events).await;
    }

    /// Writes the Events still owed, oldest first; stops at the first failure (the API server
    /// is away: the rest wait for the next look).
    async fn write_pending_events(&mut self, events: &EventWriter) {
        while let Some(a) = self.pending_events.front() {
            let Some(pod) = self.known.get(&a.pod) else {
                self.pending_events.pop_front();
                continue;
            };
            let (reason, note) = event(a);
            let published = tokio::time::timeout(API_CALL_TIMEOUT, events.warn(pod, reason, note)).await;
            match published {
                Ok(Ok(())) => {
                    self.metrics.events_published.inc();
                    self.pending_events.pop_front();
                }
                // The server refuses this Event as it is: retrying cannot help, and would hold
                // up every Event behind it.
                Ok(Err(kube::Error::Api(status))) if matches!(status.code, 400 | 404 | 409 | 422) => {
                    self.metrics.event_errors.inc();
                    tracing::error!(pod = %pod.id(), "the API server refused the Event (dropped): {}", status.message);
                    self.pending_events.pop_front();
                }
                Ok(Err(e)) => {
                    self.metrics.event_errors.inc();
                    tracing::warn!(pod = %pod.id(), pending = self.pending_events.len(), "writing the Event (kept, retried): {e}");
                    return;
                }
                Err(_) => {
                    self.metrics.event_errors.inc();
                    tracing::warn!(pod = %pod.id(), pending = self.pending_events.len(), "writing the Event timed out (kept, retried)");
                    return;
                }
            }
        }
    }

    /// Writes the FlowReports whose flows changed, each at most once per `report_interval`
    /// (and all changed ones on the way out).
    async fn publish(&mut self, client: &Client, per_pod: &[(PodRef, FlowFile)], last: bool) {
        for (pod, file) in per_pod {
            // The window's end moves every time: compare the flows alone.
            let fingerprint = serde_json::to_string(&file.flows).unwrap_or_default();
            if let Some((before, at)) = self.reported.get(&pod.uid)
                && (*before == fingerprint || (!last && at.elapsed() < self.config.report_interval))
            {
                continue;
            }
            let written =
                tokio::time::timeout(API_CALL_TIMEOUT, reports::publish(client, pod, &self.config.node_name, file));
            // Not recorded as reported on failure: written again on the next look.
            match written.await {
                Ok(Ok(())) => {
                    self.metrics.reports_published.inc();
                    self.reported.insert(pod.uid.clone(), (fingerprint, Instant::now()));
                }
                Ok(Err(e)) => {
                    self.metrics.report_errors.inc();
                    tracing::warn!(pod = %pod.id(), "writing the FlowReport (retried): {e}");
                }
                Err(_) => {
                    self.metrics.report_errors.inc();
                    tracing::warn!(pod = %pod.id(), "writing the FlowReport: no answer within {} (retried)", humantime::format_duration(API_CALL_TIMEOUT));
                }
            }
        }
    }
}

/// An alert's Event reason and what it means.
fn alert_words(kind: AlertKind) -> (&'static str, &'static str) {
    match kind {
        AlertKind::Cut => ("FlowCut", "the policies in force cut this flow"),
        AlertKind::Unexpected => ("UnexpectedFlow", "the required-traffic matrix does not expect this flow"),
    }
}

/// The reason and note of a drift alert's Warning Event.
fn event(a: &Alert) -> (&'static str, String) {
    let (reason, what) = alert_words(a.kind);
    let mut note = format!("{}: {what}: {}", a.flow, a.reason);
    if let Some(fix) = &a.fix {
        note += &format!(" Fix: {fix}");
    }
    // The API caps an Event's note at 1 kB.
    if note.len() > 1000 {
        let mut end = 997;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note += "...";
    }
    (reason, note)
}

fn load_known(path: &Path) -> Result<BTreeMap<String, PodRef>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not the agent's record of audited pods; remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
