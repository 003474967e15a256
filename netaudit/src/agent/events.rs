//! Drift alerts as `events.k8s.io/v1` Events on the audited pod: one Event per alert, created.
//!
//! Not kube's `Recorder`: it folds every Event with the same reason on the same object into one
//! series (its key has neither the note nor the flow), so a second cut flow on a pod would only
//! bump the first one's count, and nobody would read which flow it was. The drift detector
//! already deduplicates and rate-limits; what reaches here is meant to be seen.

use k8s_openapi::{
    api::events::v1::Event,
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use std::{collections::VecDeque, time::Duration};

use kube::{Api, Client, api::PostParams};

use super::{
    attach::Audited,
    cluster::PodRef,
    drift::{Alert, AlertKind},
    metrics::Metrics,
};

/// Who writes the Events (`reportingController`), as `kubectl get events -o wide` shows it.
pub const REPORTING_CONTROLLER: &str = "netaudit-agent";

pub struct EventWriter {
    client: Client,
    /// `reportingInstance`: the node's agent.
    instance: String,
}

impl EventWriter {
    pub fn new(client: Client, node: &str) -> EventWriter {
        EventWriter { client, instance: format!("{REPORTING_CONTROLLER}-{node}") }
    }

    /// Creates a Warning Event on `pod`.
    pub async fn warn(&self, pod: &PodRef, reason: &str, note: String) -> kube::Result<()> {
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(event_name(&pod.name, now)),
                namespace: Some(pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(reason.into()),
            action: Some("Audit".into()),
            note: Some(note),
            regarding: Some(pod.object_ref()),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &pod.namespace).create(&PostParams::default(), &event).await?;
        Ok(())
    }
}

/// Events that could not be written (the API unreachable) wait here and are retried every look;
/// beyond this many the oldest are dropped and counted.
const PENDING_EVENTS_MAX: usize = 1000;

/// The drift alerts' way out: a log line, a metric, and an Event on the pod, retried while the
/// API server cannot be reached.
pub struct Recorder {
    writer: EventWriter,
    /// Drift alerts whose Event could not be written yet.
    pending: VecDeque<Alert>,
    /// The longest one write may take (the look waits for it).
    timeout: Duration,
}

impl Recorder {
    pub fn new(writer: EventWriter, timeout: Duration) -> Recorder {
        Recorder { writer, pending: VecDeque::new(), timeout }
    }

    /// Says `a` and queues its Event (the caller writes the queue with [`Recorder::flush`]).
    pub fn raise(&mut self, a: Alert, audited: &Audited, metrics: &Metrics) {
        let Some(pod) = audited.read().expect("not poisoned").get(&a.pod).cloned() else { return };
        metrics.alert(&pod.target, a.kind);
        let (_, what) = alert_words(a.kind);
        tracing::warn!(
            alert = %a.kind,
            pod = %pod.id(),
            target_workload = %pod.target,
            flow = %a.flow,
            reason = %a.reason,
            fix = a.fix.as_deref().unwrap_or(""),
            "drift: {what}"
        );
        self.pending.push_back(a);
        if self.pending.len() > PENDING_EVENTS_MAX {
            self.pending.pop_front();
            metrics.event_errors.inc();
        }
    }

    /// Writes the Events still owed, oldest first; stops at the first failure (the API server
    /// is away: the rest wait for the next look).
    pub async fn flush(&mut self, audited: &Audited, metrics: &Metrics) {
        while let Some(a) = self.pending.front() {
            let Some(pod) = audited.read().expect("not poisoned").get(&a.pod).cloned() else {
                self.pending.pop_front();
                continue;
            };
            let (reason, note) = event(a);
            let written = tokio::time::timeout(self.timeout, self.writer.warn(&pod, reason, note)).await;
            match written {
                Ok(Ok(())) => {
                    metrics.events_published.inc();
                    self.pending.pop_front();
                }
                // The server refuses this Event as it is: retrying cannot help, and would hold
                // up every Event behind it.
                Ok(Err(kube::Error::Api(status))) if matches!(status.code, 400 | 404 | 409 | 422) => {
                    metrics.event_errors.inc();
                    tracing::error!(pod = %pod.id(), "the API server refused the Event (dropped): {}", status.message);
                    self.pending.pop_front();
                }
                Ok(Err(e)) => {
                    metrics.event_errors.inc();
                    tracing::warn!(pod = %pod.id(), pending = self.pending.len(), "writing the Event (kept, retried): {e}");
                    return;
                }
                Err(_) => {
                    metrics.event_errors.inc();
                    tracing::warn!(pod = %pod.id(), pending = self.pending.len(), "writing the Event timed out (kept, retried)");
                    return;
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

/// `<pod>.<nanoseconds, hex>`, as kubelet and kube's Recorder name Events: unique per pod and
/// instant, a valid name (the pod part shortened so the whole fits 253 characters).
fn event_name(pod: &str, now: Timestamp) -> String {
    let suffix = format!(".{:x}", now.as_nanosecond());
    let mut end = pod.len().min(253 - suffix.len());
    while !pod.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", pod[..end].trim_end_matches(['.', '-']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_valid_and_distinct() {
        let t = Timestamp::from_nanosecond(1_764_582_000_123_456_789).unwrap();
        assert_eq!(event_name("ssc-0", t), format!("ssc-0.{:x}", 1_764_582_000_123_456_789i128));
        let long = "a".repeat(253);
        let name = event_name(&long, t);
        assert!(name.len() <= 253 && name.ends_with(&format!("{:x}", 1_764_582_000_123_456_789i128)));
        assert_ne!(
            event_name("p", t),
            event_name("p", t.checked_add(k8s_openapi::jiff::SignedDuration::from_nanos(1)).unwrap())
        );
    }
}
