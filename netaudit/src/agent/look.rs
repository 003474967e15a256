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
    judge::{Generations, Judge},
    metrics::{LossLabels, Metrics, ProgramLabels},
    run::Common,
};
use crate::{inventory::Inventory, model::FlowFile, policy::Policy};

/// Watch mode's record of the flows already judged, in the state directory.
pub const SEEN_FILE: &str = "agent-seen.json";
const SEEN_SAVE_PERIOD: Duration = Duration::from_secs(30);

/// One look's flows, for the publisher.
pub struct Looked {
    /// All audited pods' flows.
    pub file: Arc<FlowFile>,
    /// Each audited pod's own.
    pub pods: Vec<(PodRef, Arc<FlowFile>)>,
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

    /// Drains, enriches, splits and (watch mode) judges the flows.
    async fn look(&mut self, last: bool) -> Result<Looked> {
        self.refresh_cluster();
        let file = self.common.capture.lock().expect("not poisoned").snapshot()?;
        let (file, pods) =
            enrich_and_split(file, &self.cluster.inventory, &self.common.audited.read().expect("not poisoned"));
        self.export_counts(&file, &pods);

        // Judging before the first lists arrived would take every peer for an unknown address;
        // the flows wait in the kernel's map meanwhile.
        let synced = self.live.synced();
        if let Some(judge) = self.judge.clone().filter(|_| synced) {
            self.judge(&judge, &file, &pods, last)?;
        }
        // Events owed, also from looks while the API server was away.
        self.recorder.flush(&self.common.audited, &self.common.metrics).await;
        let pods = pods.into_iter().map(|(p, f)| (p, Arc::new(f))).collect();
        Ok(Looked { file: Arc::new(file), pods, synced, last })
    }

    /// Watch mode: judges what changed, raises the alerts, keeps the detector's record.
    fn judge(&mut self, judge: &Mutex<Judge>, file: &FlowFile, pods: &[(PodRef, FlowFile)], last: bool) -> Result<()> {
        let now = Instant::now();
        let inventory = &self.cluster.inventory;
        let audited = pods.iter().filter_map(|(p, _)| inventory.pod(&p.namespace, &p.name));
        let (alerts, seen, suppressed) = {
            let mut j = judge.lock().expect("not poisoned");
            let look = match j.look(file, inventory, &self.cluster.policies, self.live.generations(), audited, now) {
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

    fn export_counts(&self, file: &FlowFile, pods: &[(PodRef, FlowFile)]) {
        for t in self.common.targets.iter() {
            let n: usize = pods.iter().filter(|(p, _)| p.target == t.name).map(|(_, f)| f.flows.len()).sum();
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

/// A drained flow file made into a look's: every address named from the inventory, and the
/// flows of each pod ever audited as its own flow file.
pub fn enrich_and_split(
    mut file: FlowFile,
    inventory: &Inventory,
    audited: &BTreeMap<String, PodRef>,
) -> (FlowFile, Vec<(PodRef, FlowFile)>) {
    inventory.enrich(&mut file);
    let pods = split(&file, audited);
    (file, pods)
}

/// The flows of each pod ever audited, as its own flow file.
fn split(file: &FlowFile, audited: &BTreeMap<String, PodRef>) -> Vec<(PodRef, FlowFile)> {
    let mut by_cgroup: foldhash::HashMap<&str, Vec<crate::model::Flow>> = Default::default();
    for f in &file.flows {
        if let Some(c) = f.cgroup.as_deref().filter(|c| audited.contains_key(*c)) {
            by_cgroup.entry(c).or_default().push(f.clone());
        }
    }
    let mut out: Vec<(PodRef, FlowFile)> = Vec::new();
    for (cgroup, pod) in audited {
        let flows = by_cgroup.remove(cgroup.as_str()).unwrap_or_default();
        let sources = file.sources.iter().filter(|s| &s.cgroup == cgroup).cloned().collect();
        let f = FlowFile { flows, sources, ..file.clone_header() };
        // A pod's containers may share a cgroup path with an earlier pod of the same UID only
        // in theory; merge rather than overwrite.
        match out.iter_mut().find(|(p, _)| p.uid == pod.uid) {
            Some((_, existing)) => *existing = FlowFile::merge([std::mem::take(existing), f]),
            None => out.push((pod.clone(), f)),
        }
    }
    out
}
