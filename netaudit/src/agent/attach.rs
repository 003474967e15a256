//! The attach reconciler: one kube-runtime `Controller` per target over that target's pods on
//! this node. A pod is attached once its cgroup exists (requeued until then), detached when it
//! finishes; a sweep every [`TICK`] detaches pods the stores no longer hold (deletions carry no
//! reconcile) and, once every pod of the first lists was reconciled, releases the pins of pods
//! that went while no agent ran.
//!
//! The record of which cgroup was which pod ([`PODS_FILE`]) outlives the pods: their flows keep
//! their names in reports.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller,
        controller::{self, Action},
        reflector::Store,
        watcher,
    },
};
use tokio::sync::watch;

use super::{
    cgroups::{QosClass, find_pod_cgroup},
    cluster::PodRef,
    metrics::Metrics,
    run::Common,
};

/// The agent's record of which audited cgroup was which pod, in the state directory.
pub const PODS_FILE: &str = "agent-pods.json";
/// How often pods whose cgroup does not exist yet are looked at again, and how often the sweep runs.
pub const TICK: Duration = Duration::from_millis(500);
/// How long a pod whose cgroup could not be attached waits before the next try.
const RETRY: Duration = Duration::from_secs(2);

/// Why one pod could not be attached (said once per distinct message, retried after [`RETRY`]).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching to pod {pod} (cgroup {cgroup}): {message}")]
    Attach { pod: String, cgroup: PathBuf, message: String },
    #[error("recording the audited pods in {path}: {message}")]
    Record { path: PathBuf, message: String },
}

/// Every pod ever audited (gone ones too: their flows stay), by cgroup path as flows name it.
/// Written by the reconciler, read by the look and the publisher.
pub type Audited = Arc<RwLock<BTreeMap<String, PodRef>>>;

/// What the reconciler changes as pods come and go.
#[derive(Default)]
struct State {
    /// Audited now: cgroup directory → pod.
    attached: BTreeMap<PathBuf, PodRef>,
    /// Pods whose cgroup could not be attached, with the error said.
    failing: HashMap<String, String>,
    /// Pods reconciled at least once (the pins are pruned once every listed pod was).
    reconciled: HashSet<String>,
    pruned: bool,
}

pub struct Attacher {
    common: Common,
    cgroup_root: PathBuf,
    pods_file: PathBuf,
    state: Mutex<State>,
    /// One store per target, filled by its controller.
    stores: Mutex<Vec<(String, Store<Pod>)>>,
}

impl Attacher {
    /// `common.audited` holds what [`load_audited`] read from `state_dir`.
    pub fn new(common: Common, cgroup_root: PathBuf, state_dir: &Path) -> Attacher {
        let pods_file = state_dir.join(PODS_FILE);
        Attacher { common, cgroup_root, pods_file, state: Mutex::default(), stores: Mutex::default() }
    }

    /// Whether every target's first list has arrived (before that, "no pods" means "not yet").
    pub fn synced(&self) -> bool {
        let stores = self.stores.lock().expect("not poisoned");
        stores.len() == self.common.targets.len() && stores.iter().all(|(_, s)| super::cluster::ready(s))
    }

    /// Runs the controllers and the sweep until `stop` turns true.
    pub async fn run(self: Arc<Self>, client: Client, node: String, stop: watch::Receiver<bool>) -> Result<()> {
        let mut runs = Vec::new();
        for t in self.common.targets.iter() {
            let api: Api<Pod> = Api::namespaced(client.clone(), &t.namespace);
            let config = watcher::Config::default().fields(&format!("spec.nodeName={node}")).labels(&t.selector);
            let controller = Controller::new(api, config).graceful_shutdown_on(stopped(stop.clone()));
            self.stores.lock().expect("not poisoned").push((t.name.clone(), controller.store()));
            let target = t.name.clone();
            let run = controller.run(move |pod, me| reconcile(pod, me, target.clone()), retry, Arc::clone(&self));
            runs.push(run.boxed());
        }
        // Each controller's stream ends once `stop` turned true (its running reconciles finished).
        let mut results = futures::stream::select_all(runs);
        let mut sweep = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                result = results.next() => match result {
                    None => return Ok(()),
                    Some(result) => self.said(result),
                },
                _ = sweep.tick() => self.sweep()?,
            }
        }
    }

    /// What a controller reported: failures were said by the reconciler; the rest is routine.
    fn said(&self, result: Result<(kube::runtime::reflector::ObjectRef<Pod>, Action), ControllerError>) {
        match result {
            Ok(_) | Err(controller::Error::ObjectNotFound(_) | controller::Error::ReconcilerFailed(..)) => {}
            Err(e) => tracing::warn!("watching the target pods: {e}"),
        }
    }

    /// Attaches `pod` once its cgroup exists; detaches it when it finished.
    fn reconcile_pod(&self, pod: &Pod, target: &str) -> Result<Action, AttachError> {
        let Some(wanted) = wanted(pod, target) else {
            if let Some(uid) = &pod.metadata.uid {
                self.detach(|p| &p.uid == uid);
            }
            return Ok(Action::await_change());
        };
        let uid = wanted.uid.clone();
        let action = self.attach(wanted);
        // Marked after the attempt: the pins a pod's earlier run left are taken over by its
        // attach, never released by the sweep in between.
        self.state.lock().expect("not poisoned").reconciled.insert(uid);
        action
    }

    fn attach(&self, wanted: PodRef) -> Result<Action, AttachError> {
        if self.state.lock().expect("not poisoned").attached.values().any(|p| p.uid == wanted.uid) {
            return Ok(Action::await_change());
        }
        let qos = wanted.qos.as_deref().and_then(|q| q.parse::<QosClass>().ok());
        // No cgroup yet: the pod is still being created.
        let Some(dir) = find_pod_cgroup(&self.cgroup_root, &wanted.uid, qos) else {
            tracing::debug!(pod = %wanted.id(), "no cgroup yet");
            return Ok(Action::requeue(TICK));
        };
        let added = self.common.capture.lock().expect("not poisoned").add_cgroup(&dir);
        match added {
            Ok(source) => {
                tracing::info!(pod = %wanted.id(), target_workload = %wanted.target, cgroup = %dir.display(), "attached");
                let mut state = self.state.lock().expect("not poisoned");
                state.failing.remove(&wanted.uid);
                state.attached.insert(dir, wanted.clone());
                drop(state);
                self.common.audited.write().expect("not poisoned").insert(source.cgroup, wanted);
                self.save_audited()?;
                self.count_attached();
                Ok(Action::await_change())
            }
            Err(e) => {
                let message = format!("{e:#}");
                let mut state = self.state.lock().expect("not poisoned");
                if state.failing.get(&wanted.uid) != Some(&message) {
                    self.common.metrics.attach_errors.get_or_create(&Metrics::target(&wanted.target)).inc();
                    tracing::error!(pod = %wanted.id(), cgroup = %dir.display(), "cannot attach: {message}");
                    state.failing.insert(wanted.uid.clone(), message.clone());
                }
                Err(AttachError::Attach { pod: wanted.id(), cgroup: dir, message })
            }
        }
    }

    /// Detaches the attached pods `gone` picks.
    fn detach(&self, gone: impl Fn(&PodRef) -> bool) {
        let dirs: Vec<PathBuf> = {
            let state = self.state.lock().expect("not poisoned");
            state.attached.iter().filter(|(_, p)| gone(p)).map(|(d, _)| d.clone()).collect()
        };
        for dir in dirs {
            let Some(pod) = self.state.lock().expect("not poisoned").attached.remove(&dir) else { continue };
            let removed = self.common.capture.lock().expect("not poisoned").remove_cgroup(&dir);
            if let Err(e) = removed {
                tracing::error!(pod = %pod.id(), cgroup = %dir.display(), "detaching: {e:#}");
            }
            tracing::info!(pod = %pod.id(), "detached (the pod is gone; its flows stay)");
        }
        self.count_attached();
    }

    /// Level-triggered cleanup once the stores are synced: pods no store holds any more are
    /// detached; the first time every listed pod was reconciled, stale pins are released.
    fn sweep(&self) -> Result<()> {
        if !self.synced() {
            return Ok(());
        }
        let wanted: HashSet<String> = {
            let stores = self.stores.lock().expect("not poisoned");
            let pods = stores.iter().flat_map(|(t, s)| s.state().into_iter().filter_map(|p| wanted(&p, t)));
            pods.map(|p| p.uid).collect()
        };
        self.detach(|p| !wanted.contains(&p.uid));
        let mut state = self.state.lock().expect("not poisoned");
        if !state.pruned && wanted.iter().all(|uid| state.reconciled.contains(uid)) {
            state.pruned = true;
            drop(state);
            // Pods that went while no agent ran: release what was pinned for them.
            for id in self.common.capture.lock().expect("not poisoned").prune_pins()? {
                tracing::info!(cgroup_id = id, "released the pins of a pod that is gone");
            }
        }
        Ok(())
    }

    fn count_attached(&self) {
        let state = self.state.lock().expect("not poisoned");
        for t in self.common.targets.iter() {
            let n = state.attached.values().filter(|p| p.target == t.name).count();
            self.common.metrics.attached_pods.get_or_create(&Metrics::target(&t.name)).set(n as i64);
        }
    }

    fn save_audited(&self) -> Result<(), AttachError> {
        let record = |message: String| AttachError::Record { path: self.pods_file.clone(), message };
        let json = serde_json::to_string_pretty(&*self.common.audited.read().expect("not poisoned"))
            .map_err(|e| record(e.to_string()))?;
        crate::output::write_atomically(&self.pods_file, &json).map_err(|e| record(e.to_string()))
    }
}

type ControllerError = controller::Error<AttachError, watcher::Error>;

async fn reconcile(pod: Arc<Pod>, me: Arc<Attacher>, target: String) -> Result<Action, AttachError> {
    tracing::debug!(pod = %pod.name_any(), uid = ?pod.metadata.uid, "reconciling");
    me.reconcile_pod(&pod, &target)
}

fn retry(_pod: Arc<Pod>, _error: &AttachError, _me: Arc<Attacher>) -> Action {
    Action::requeue(RETRY)
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The pod to audit, if `pod` is one: running or about to (finished pods have no processes left).
fn wanted(pod: &Pod, target: &str) -> Option<PodRef> {
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodRef {
        target: target.into(),
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.metadata.uid.clone()?,
        qos: status.and_then(|s| s.qos_class.clone()),
    })
}

/// The record of pods audited by earlier runs, in `state_dir`.
pub fn load_audited(state_dir: &Path) -> Result<Audited> {
    let path = &state_dir.join(PODS_FILE);
    let pods: BTreeMap<String, PodRef> = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not the agent's record of audited pods; remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }?;
    Ok(Arc::new(RwLock::new(pods)))
}
