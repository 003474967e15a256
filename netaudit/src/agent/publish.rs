//! The publisher: each look's flows go to the HTTP listeners at once and, when changed, to the
//! pods' FlowReports (each at most once per `report_interval`; all changed ones on the way out).
//! It also probes the API server and says on `/readyz` what the agent still waits for.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use kube::Client;
use tokio::sync::watch;

use super::{
    attach::{Attacher, TICK},
    cluster::LiveInventory,
    look::{AuditedPod, Looked},
    reports,
    run::Common,
};

/// How often the API server's reachability is probed (`GET /version`) for `/readyz`.
const API_PROBE_PERIOD: Duration = Duration::from_secs(5);

pub struct Publisher {
    pub common: Common,
    pub client: Client,
    pub node: String,
    /// Write FlowReports (the CRD is installed).
    pub reports: bool,
    pub report_interval: Duration,
    /// The longest one API call may take.
    pub timeout: Duration,
}

/// Why the API server is unreachable, if it is (as last probed).
type Reachability = Option<String>;

impl Publisher {
    /// Publishes every look until the last one (the look task's on the way out).
    pub async fn run(
        self,
        mut looks: watch::Receiver<Option<Arc<Looked>>>,
        attach: Arc<Attacher>,
        live: LiveInventory,
    ) -> Result<()> {
        let mut reported: HashMap<String, (String, Instant)> = HashMap::new();
        let mut api: (Reachability, Option<Instant>) = (None, None);
        let mut ticker = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                changed = looks.changed() => {
                    // The look task is gone without a last look: it failed, and says why.
                    if changed.is_err() {
                        return Ok(());
                    }
                    let Some(looked) = looks.borrow_and_update().clone() else { continue };
                    {
                        let mut p = self.common.published.write().expect("not poisoned");
                        p.flows = Arc::clone(&looked.file);
                        p.pods = looked.pods.iter().map(|a| (a.pod.id(), a.cgroups.clone())).collect();
                    }
                    if self.reports && (looked.synced || looked.last) {
                        self.write_reports(&looked, &mut reported).await;
                    }
                    if looked.last {
                        return Ok(());
                    }
                }
                _ = ticker.tick() => {
                    if api.1.is_none_or(|t| t.elapsed() >= API_PROBE_PERIOD) {
                        api = (self.probe_api(api.0).await, Some(Instant::now()));
                    }
                }
            }
            let not_ready = match (attach.synced(), live.synced(), &api.0) {
                (_, _, Some(why)) => Some(format!("the API server is unreachable: {why}")),
                (true, true, None) => None,
                (false, _, None) => Some("waiting for the first list of target pods".into()),
                (true, false, None) => Some("waiting for the first lists of the inventory".into()),
            };
            self.common.published.write().expect("not poisoned").not_ready = not_ready;
        }
    }

    /// Whether the API server answers: recording goes on without it, but `/readyz` says so,
    /// and Events and FlowReports wait for it.
    async fn probe_api(&self, before: Reachability) -> Reachability {
        let why = match tokio::time::timeout(self.timeout, self.client.apiserver_version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {}", humantime::format_duration(self.timeout))),
        };
        match (&before, &why) {
            (None, Some(w)) => tracing::warn!("the API server is unreachable (recording goes on): {w}"),
            (Some(_), None) => tracing::info!("the API server is reachable again"),
            _ => {}
        }
        why
    }

    /// Writes the FlowReports whose flows changed. Per pod: the flows last written, and when.
    async fn write_reports(&self, looked: &Looked, reported: &mut HashMap<String, (String, Instant)>) {
        for AuditedPod { pod, cgroups } in &looked.pods {
            // Not due yet: nothing to build (a pod's file, its JSON) at all.
            if let Some((_, at)) = reported.get(&pod.uid)
                && !looked.last
                && at.elapsed() < self.report_interval
            {
                continue;
            }
            let file = looked.file.of_cgroups(cgroups);
            // The window's end moves every time: compare the flows alone.
            let fingerprint = serde_json::to_string(&file.flows).unwrap_or_default();
            if reported.get(&pod.uid).is_some_and(|(before, _)| *before == fingerprint) {
                continue;
            }
            let written = tokio::time::timeout(self.timeout, reports::publish(&self.client, pod, &self.node, &file));
            // Not recorded as reported on failure: written again after the next look.
            match written.await {
                Ok(Ok(())) => {
                    self.common.metrics.reports_published.inc();
                    reported.insert(pod.uid.clone(), (fingerprint, Instant::now()));
                }
                Ok(Err(e)) => {
                    self.common.metrics.report_errors.inc();
                    tracing::warn!(pod = %pod.id(), "writing the FlowReport (retried): {e}");
                }
                Err(_) => {
                    self.common.metrics.report_errors.inc();
                    let within = humantime::format_duration(self.timeout);
                    tracing::warn!(pod = %pod.id(), "writing the FlowReport: no answer within {within} (retried)");
                }
            }
        }
    }
}
