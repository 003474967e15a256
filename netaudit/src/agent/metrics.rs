//! The agent's Prometheus metrics (prometheus-client, OpenMetrics text). Cardinality stays
//! bounded: labels are target workloads, alert kinds and program names, never flows or peers.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::drift::AlertKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub target: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LossLabels {
    /// flows, packets, bytes, dns_events, unparsed_packets
    pub what: String,
}

#[derive(Default)]
pub struct Metrics {
    pub flows: Family<TargetLabels, Gauge>,
    pub alerts: Family<AlertLabels, Counter>,
    pub alerts_suppressed: Family<TargetLabels, Gauge>,
    pub attached_pods: Family<TargetLabels, Gauge>,
    pub attach_errors: Family<TargetLabels, Counter>,
    pub lost: Family<LossLabels, Gauge>,
    pub program_run_seconds: Family<ProgramLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub program_runs: Family<ProgramLabels, Gauge>,
    pub program_stats_enabled: Gauge,
    pub reports_published: Counter,
    pub report_errors: Counter,
    pub events_published: Counter,
    pub event_errors: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("netaudit");
        r.register("flows", "Flows recorded for the target's pods on this node", self.flows.clone());
        r.register("alerts", "Drift alerts raised (kind: cut or unexpected)", self.alerts.clone());
        r.register(
            "alerts_suppressed",
            "Drift alerts withheld by the per-pod rate limit (counted, not raised)",
            self.alerts_suppressed.clone(),
        );
        r.register(
            "attached_pods",
            "Target pods whose cgroup the programs are attached to",
            self.attached_pods.clone(),
        );
        r.register("attach_errors", "Failures to attach to a target pod", self.attach_errors.clone());
        r.register(
            "lost",
            "Data the kernel side could not record (a full flow map, a full DNS ring): nonzero means incomplete flows",
            self.lost.clone(),
        );
        r.register(
            "program_run_seconds",
            "Kernel time spent in each program since load (needs kernel.bpf_stats_enabled=1)",
            self.program_run_seconds.clone(),
        );
        r.register(
            "program_runs",
            "Runs of each program since load (needs kernel.bpf_stats_enabled=1)",
            self.program_runs.clone(),
        );
        r.register(
            "program_stats_enabled",
            "1 when the kernel counts program run time (sysctl kernel.bpf_stats_enabled)",
            self.program_stats_enabled.clone(),
        );
        r.register("flow_reports_published", "FlowReport updates written to the API", self.reports_published.clone());
        r.register("flow_report_errors", "FlowReport updates the API refused", self.report_errors.clone());
        r.register("events_published", "Kubernetes Events written for drift alerts", self.events_published.clone());
        r.register("event_errors", "Kubernetes Events the API refused", self.event_errors.clone());
    }

    pub fn alert(&self, target: &str, kind: AlertKind) {
        let kind = match kind {
            AlertKind::Cut => "cut",
            AlertKind::Unexpected => "unexpected",
        };
        self.alerts.get_or_create(&AlertLabels { target: target.into(), kind: kind.into() }).inc();
    }

    pub fn target(target: &str) -> TargetLabels {
        TargetLabels { target: target.into() }
    }
}
