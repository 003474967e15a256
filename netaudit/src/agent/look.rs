//! The look: every `interval` it drains the capture, enriches the flows from the live
//! inventory, splits them per audited pod and, in watch mode, has the [`Judge`] judge what
//! changed and the [`Recorder`] raise the alerts. Each look goes to the publisher; the DNS ring
//! is drained every [`TICK`] in between so answers do not pile up.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::watch;

use super::{
    attach::TICK,
    cluster::{LiveInventory, PodRef},
    events::Recorder,
    judge::{Against, Generations, Judge},
    metrics::{LossLabels, Metrics, ProgramLabels},
    run::Common,
};
use crate::{capture::Changed, inventory::Inventory, model::FlowFile, policy::Policy};

/// Watch mode's record of the flows already judged, in the state directory.
pub const SEEN_FILE: &str = "agent-seen.json";
const SEEN_SAVE_PERIOD: Duration = Duration::from_secs(30);

/// One look's flows, for the publisher.
pub struct Looked {
    /// All audited pods' flows.
    pub file: Arc<FlowFile>,
    /// Each pod ever audited, and the cgroups its flows are under: its own flow file is
    /// [`FlowFile::of_cgroups`] of `file`, made when it is needed, not every look.
    pub pods: Vec<AuditedPod>,
    /// Whether the inventory's first lists had arrived (before, every peer is unknown).
    pub synced: bool,
    /// The look on the way out.
    pub last: bool,
}

/// The live inventory and policies, rebuilt when the stores moved.
#[derive(Default)]
struct Cluster {
    generation: Option<Generations>,
    inventory: Inventory,
    policies: Vec<Policy>,
}

pub struct Looker {
    common: Common,
    /// Watch mode: judges new flows; shared with `/report`.
    judge: Option<Arc<Mutex<Judge>>>,
    recorder: Recorder,
    interval: Duration,
    seen_file: std::path::PathBuf,
    live: LiveInventory,
    cluster: Cluster,
    /// What was last written to [`SEEN_FILE`], and when.
    saved_seen: (String, Option<Instant>),
}

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

impl Looker {
    pub fn new(
        common: Common,
        judge: Option<Arc<Mutex<Judge>>>,
        recorder: Recorder,
        interval: Duration,
        state_dir: &std::path::Path,
        live: LiveInventory,
    ) -> Looker {
        let seen_file = state_dir.join(SEEN_FILE);
        let (cluster, saved_seen) = (Cluster::default(), (String::new(), None));
        Looker { common, judge, recorder, interval, seen_file, live, cluster, saved_seen }
    }

    /// Looks every `interval` until `stop` turns true, then once more (`last`) and returns.
    pub async fn run(
        mut self,
        looks: watch::Sender<Option<Arc<Looked>>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(TICK);
        let mut last_look: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            self.common.capture.lock().expect("not poisoned").poll()?;
            self.common.published.write().expect("not poisoned").last_loop = Some(Instant::now());
            if last_look.is_none_or(|t| t.elapsed() >= self.interval) {
                last_look = Some(Instant::now());
                let looked = self.look(false).await?;
                looks.send_replace(Some(Arc::new(looked)));
            }
        }
        let looked = self.look(true).await?;
        looks.send_replace(Some(Arc::new(looked)));
        Ok(())
    }

    /// Takes the inventory and policies from the stores when they moved.
    fn refresh_cluster(&mut self) {
        let generation = self.live.generations();
        if self.cluster.generation == Some(generation) {
            return;
        }
        (self.cluster.inventory, self.cluster.policies) = self.live.snapshot();
        self.cluster.generation = Some(generation);
        release_freed_memory();
    }

    /// Drains and enriches the flows and (watch mode) judges what changed.
    async fn look(&mut self, last: bool) -> Result<Looked> {
        self.refresh_cluster();
        let (mut file, changed) = self.common.capture.lock().expect("not poisoned").snapshot_changed()?;
        self.cluster.inventory.enrich(&mut file);
        let pods = audited_pods(&self.common.audited.read().expect("not poisoned"));
        self.export_counts(&file, &pods);

        // Judging before the first lists arrived would take every peer for an unknown address;
        // the flows wait in the kernel's map meanwhile.
        let synced = self.live.synced();
        if let Some(judge) = self.judge.clone().filter(|_| synced) {
            self.judge(&judge, &file, &changed, &pods, last)?;
        }
        // Events owed, also from looks while the API server was away.
        self.recorder.flush(&self.common.audited, &self.common.metrics).await;
        Ok(Looked { file: Arc::new(file), pods, synced, last })
    }

    /// Watch mode: judges what changed, raises the alerts, keeps the detector's record.
    fn judge(
        &mut self,
        judge: &Mutex<Judge>,
        file: &FlowFile,
        changed: &Changed,
        pods: &[AuditedPod],
        last: bool,
    ) -> Result<()> {
        let now = Instant::now();
        let inventory = &self.cluster.inventory;
        let audited = pods.iter().filter_map(|p| inventory.pod(&p.pod.namespace, &p.pod.name));
        let (alerts, seen, suppressed) = {
            let mut j = judge.lock().expect("not poisoned");
            let against = Against { inventory, policies: &self.cluster.policies, generations: self.live.generations() };
            let look = match j.look(file, Some(changed), against, audited, now) {
                Ok(look) => look,
                Err(e) => {
                    tracing::warn!("judging the flows: {e:#}");
                    return Ok(());
                }
            };
            // Saved right after alerts were raised (so a restart does not repeat them), else at
            // most every SEEN_SAVE_PERIOD (the record grows with the flow map, so it is not
            // even serialized more often): a SIGKILL loses at most that much of the quiet part.
            let due = self.saved_seen.1.is_none_or(|t| t.elapsed() >= SEEN_SAVE_PERIOD);
            let seen = (!look.alerts.is_empty() || due || last).then(|| j.detector.seen_json(now));
            (look.alerts, seen, j.detector.suppressed.clone())
        };
        for a in alerts {
            self.recorder.raise(a, &self.common.audited, &self.common.metrics);
        }
        let audited = self.common.audited.read().expect("not poisoned");
        for (cgroup, n) in &suppressed {
            if let Some(p) = audited.get(cgroup) {
                self.common.metrics.alerts_suppressed.get_or_create(&Metrics::target(&p.target)).set(*n as i64);
            }
        }
        if let Some(seen) = seen {
            if seen != self.saved_seen.0 {
                crate::output::write_atomically(&self.seen_file, &seen)?;
                self.saved_seen.0 = seen;
            }
            self.saved_seen.1 = Some(now);
        }
        Ok(())
    }

    fn export_counts(&self, file: &FlowFile, pods: &[AuditedPod]) {
        let per_cgroup = flows_per_cgroup(file);
        for t in self.common.targets.iter() {
            let cgroups = pods.iter().filter(|p| p.pod.target == t.name).flat_map(|p| &p.cgroups);
            let n: usize = cgroups.filter_map(|c| per_cgroup.get(c.as_str())).sum();
            self.common.metrics.flows.get_or_create(&Metrics::target(&t.name)).set(n as i64);
        }
        let l = &file.losses;
        for (what, n) in [
            ("flows", l.flows),
            ("packets", l.packets),
            ("bytes", l.bytes),
            ("dns_events", l.dns_events),
            ("unparsed_packets", l.unparsed_packets),
        ] {
            self.common.metrics.lost.get_or_create(&LossLabels { what: what.into() }).set(n as i64);
        }
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1");
        self.common.metrics.program_stats_enabled.set(i64::from(enabled));
        if let Ok(stats) = self.common.capture.lock().expect("not poisoned").program_stats() {
            for (name, time, runs) in stats {
                let l = ProgramLabels { program: name.into() };
                self.common.metrics.program_run_seconds.get_or_create(&l).set(time.as_secs_f64());
                self.common.metrics.program_runs.get_or_create(&l).set(runs as i64);
            }
        }
    }
}

/// A pod ever audited, and the cgroups its flows are recorded under.
#[derive(Clone, Debug)]
pub struct AuditedPod {
    pub pod: PodRef,
    pub cgroups: Vec<String>,
}

/// The pods ever audited (`audited`: by cgroup), each with its cgroups: a pod's containers may
/// share a cgroup path with an earlier pod of the same UID only in theory, but then they are one.
pub fn audited_pods(audited: &BTreeMap<String, PodRef>) -> Vec<AuditedPod> {
    let mut out: Vec<AuditedPod> = Vec::new();
    for (cgroup, pod) in audited {
        match out.iter_mut().find(|p| p.pod.uid == pod.uid) {
            Some(p) => p.cgroups.push(cgroup.clone()),
            None => out.push(AuditedPod { pod: pod.clone(), cgroups: vec![cgroup.clone()] }),
        }
    }
    out
}

/// How many flows each cgroup has. A drained file comes sorted by cgroup (the flows of one
/// sharing its name), so this counts runs and looks each run up once.
fn flows_per_cgroup(file: &FlowFile) -> foldhash::HashMap<&str, usize> {
    let mut out: foldhash::HashMap<&str, usize> = Default::default();
    let mut cgroups = file.flows.iter().filter_map(|f| f.cgroup.as_ref()).peekable();
    while let Some(c) = cgroups.next() {
        let mut n = 1;
        while cgroups.next_if(|next| std::sync::Arc::ptr_eq(next, c) || next == &c).is_some() {
            n += 1;
        }
        *out.entry(&**c).or_default() += n;
    }
    out
}
