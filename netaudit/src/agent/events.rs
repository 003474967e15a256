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
use kube::{Api, Client, api::PostParams};

use super::cluster::PodRef;

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
