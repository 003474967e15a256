//! Watch mode's judgement: each time the agent looks, the flows that are new or grew since the
//! last look are taken from `check`'s report; a flow the policies in force cut, or one the matrix
//! does not expect, raises a drift alert. Alerts are deduplicated (the same flow and reason at
//! most once per `dedupe` window) and rate-limited per pod (at most `per_pod` per `period`; the
//! rest are counted, never silently lost), so an Event stream stays readable.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    check::{FlowVerdict, Report},
    model::{Flow, FlowFile},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// The policies in force drop this flow.
    Cut,
    /// No enabled row of the required-traffic matrix expects it.
    Unexpected,
}

/// As logs name it (`alert=Cut`).
impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AlertKind::Cut => "Cut",
            AlertKind::Unexpected => "Unexpected",
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// The audited cgroup (pod) the flow belongs to.
    pub pod: String,
    /// `egress TCP 10.0.0.5 -> 10.96.0.1:443`
    pub flow: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub dedupe: Duration,
    pub per_pod: u32,
    pub period: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { dedupe: Duration::from_secs(3600), per_pod: 10, period: Duration::from_secs(60) }
    }
}

/// A flow as the detector and the judge know it: its cgroup and its key (not its counters).
pub type FlowId = (Option<String>, String);

pub struct Detector {
    limits: Limits,
    /// Packets seen per flow at the last look.
    seen: HashMap<FlowId, u64>,
    /// When each (flow, kind) last raised an alert.
    alerted: HashMap<(FlowId, AlertKind), Instant>,
    /// Per pod: the start of the current period and the alerts raised in it.
    budget: HashMap<String, (Instant, u32)>,
    /// Alerts dropped by the rate limit (per pod), for a metric and a summary line.
    pub suppressed: HashMap<String, u64>,
}

pub fn flow_id(f: &Flow) -> FlowId {
    let key = format!("{:?} {} {} {} {:?}", f.direction, f.protocol, f.src.ip, f.dst.ip, f.dst.port);
    (f.cgroup.as_deref().map(str::to_string), key)
}

fn describe(v: &FlowVerdict) -> String {
    let port = v.dst.port.map(|p| format!(":{p}")).unwrap_or_default();
    format!("{} {} {} -> {}{port}", v.direction, v.protocol, v.src.ip, v.dst.ip)
}

impl Detector {
    pub fn new(limits: Limits) -> Detector {
        Detector {
            limits,
            seen: HashMap::new(),
            alerted: HashMap::new(),
            budget: HashMap::new(),
            suppressed: HashMap::new(),
        }
    }

    /// What the detector has seen (flows and their packet counts), for the next agent: without
    /// it a restarted agent would take every old flow for a new one and alert again.
    /// Alerts raised within the dedupe window go too (as their age), so a grown flow is not
    /// alerted again just because the agent restarted.
    pub fn seen_json(&self, now: Instant) -> String {
        let seen: Vec<(&FlowId, &u64)> = self.seen.iter().collect();
        let alerted: Vec<(&(FlowId, AlertKind), u64)> = self
            .alerted
            .iter()
            .map(|(k, t)| (k, now.duration_since(*t).as_secs()))
            .filter(|(_, age)| Duration::from_secs(*age) < self.limits.dedupe)
            .collect();
        serde_json::json!({"seen": seen, "alerted": alerted}).to_string()
    }

    /// Restores what [`Detector::seen_json`] wrote; an unreadable record is ignored (at worst
    /// some alerts are raised again).
    pub fn restore_seen(&mut self, json: &str, now: Instant) {
        #[derive(serde::Deserialize)]
        struct Saved {
            seen: Vec<(FlowId, u64)>,
            alerted: Vec<((FlowId, AlertKind), u64)>,
        }
        if let Ok(saved) = serde_json::from_str::<Saved>(json) {
            self.seen.extend(saved.seen);
            for (key, age) in saved.alerted {
                if let Some(t) = now.checked_sub(Duration::from_secs(age)) {
                    self.alerted.insert(key, t);
                }
            }
        }
    }

    /// The alerts for the flows of `flows` that are new or grew since the last call; `report` is
    /// `check`'s report for the same flow file.
    pub fn observe(&mut self, flows: &FlowFile, report: &Report, now: Instant) -> Vec<Alert> {
        let mut out = Vec::new();
        for v in &report.verdicts {
            let f = &flows.flows[v.index];
            let fid = flow_id(f);
            let before = self.seen.insert(fid.clone(), f.packets.max(1));
            if before.is_some_and(|p| p >= f.packets.max(1)) {
                continue;
            }
            let mut kinds = Vec::new();
            if !v.allowed {
                kinds.push((AlertKind::Cut, v.reason.clone()));
            }
            if v.matrix.unexpected {
                kinds.push((AlertKind::Unexpected, v.matrix.why.clone().unwrap_or_default()));
            }
            for (kind, reason) in kinds {
                let key = (fid.clone(), kind);
                if self.alerted.get(&key).is_some_and(|t| now.duration_since(*t) < self.limits.dedupe) {
                    continue;
                }
                let pod = f.cgroup.as_deref().unwrap_or("unknown").to_string();
                let (start, count) = self.budget.entry(pod.clone()).or_insert((now, 0));
                if now.duration_since(*start) >= self.limits.period {
                    (*start, *count) = (now, 0);
                }
                if *count >= self.limits.per_pod {
                    *self.suppressed.entry(pod).or_default() += 1;
                    continue;
                }
                *count += 1;
                self.alerted.insert(key, now);
                out.push(Alert { kind, pod, flow: describe(v), reason, fix: v.fix.clone() });
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        chart::{Chart, Release, Values},
        check::Check,
        inventory::Inventory,
        matrix::Matrix,
        model::{Direction, Losses, Protocol},
    };

    /// An egress TCP flow of pod `/pod-a` (10.0.0.5) to `dst:port`.
    pub(crate) fn flow(dst: &str, port: u16, packets: u64) -> Flow {
        Flow::new(Protocol::Tcp, "10.0.0.5".parse().unwrap(), dst.parse().unwrap(), Some(port))
            .with_direction(Direction::Egress)
            .with_traffic((packets, packets * 100), (0, 0))
            .with_connections(1)
            .in_cgroup("/pod-a")
    }

    /// Egress on, DNS only: every flow to port 443 is cut, and port 22 is also unexpected.
    fn report(flows: &FlowFile) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("values.yaml");
        std::fs::write(&p, "networkPolicy: {enabled: true, egress: {enabled: true}}\n").unwrap();
        let values = Values::load(&p).unwrap();
        let release = Release { name: "stageset-controller".into(), namespace: "default".into() };
        let chart = Chart { values, release };
        let policies = chart.policies().unwrap();
        let inv = Inventory::default();
        let matrix = Matrix::default_matrix();
        Check { inventory: &inv, policies: &policies, chart: Some(&chart), matrix: &matrix }.run(flows).unwrap()
    }

    fn file(flows: Vec<Flow>) -> FlowFile {
        FlowFile { version: 1, window: None, sources: vec![], losses: Losses::default(), flows }
    }

    #[test]
    fn new_and_grown_flows_alert_once_per_window() {
        let mut d = Detector::new(Limits::default());
        let t0 = Instant::now();
        let f1 = file(vec![flow("192.0.2.7", 443, 3), flow("192.0.2.9", 22, 1)]);
        let a = d.observe(&f1, &report(&f1), t0);
        let kinds: Vec<_> = a.iter().map(|x| (x.flow.clone(), x.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("egress TCP 10.0.0.5 -> 192.0.2.7:443".into(), AlertKind::Cut),
                ("egress TCP 10.0.0.5 -> 192.0.2.9:22".into(), AlertKind::Cut),
                ("egress TCP 10.0.0.5 -> 192.0.2.9:22".into(), AlertKind::Unexpected),
            ]
        );
        assert!(a[0].fix.as_deref().unwrap().contains("192.0.2.7/32"));
        // Nothing new: nothing to say. Grown within the dedupe window: still nothing.
        assert!(d.observe(&f1, &report(&f1), t0 + Duration::from_secs(5)).is_empty());
        let f2 = file(vec![flow("192.0.2.7", 443, 9), flow("192.0.2.9", 22, 1)]);
        assert!(d.observe(&f2, &report(&f2), t0 + Duration::from_secs(10)).is_empty());
        // Grown after the window: alerted again.
        let f3 = file(vec![flow("192.0.2.7", 443, 12), flow("192.0.2.9", 22, 1)]);
        assert_eq!(d.observe(&f3, &report(&f3), t0 + Duration::from_secs(3700)).len(), 1);
    }

    #[test]
    fn a_restored_detector_does_not_alert_again_for_old_flows() {
        let t0 = Instant::now();
        let f1 = file(vec![flow("192.0.2.7", 443, 3)]);
        let mut d = Detector::new(Limits::default());
        assert_eq!(d.observe(&f1, &report(&f1), t0).len(), 1);
        let mut next = Detector::new(Limits::default());
        next.restore_seen(&d.seen_json(t0), t0);
        assert!(next.observe(&f1, &report(&f1), t0).is_empty());
        // Grown while no agent ran, within the dedupe window: still nothing. A flow that appeared
        // while no agent ran alerts.
        let f2 = file(vec![flow("192.0.2.7", 443, 9), flow("192.0.2.8", 443, 1)]);
        let a = next.observe(&f2, &report(&f2), t0);
        assert_eq!(a.iter().map(|a| a.flow.as_str()).collect::<Vec<_>>(), ["egress TCP 10.0.0.5 -> 192.0.2.8:443"]);
    }

    #[test]
    fn a_burst_is_rate_limited_per_pod_and_counted() {
        let mut d = Detector::new(Limits { per_pod: 5, ..Limits::default() });
        let t0 = Instant::now();
        let burst = file((1..=40).map(|i| flow(&format!("192.0.2.{i}"), 443, 1)).collect());
        assert_eq!(d.observe(&burst, &report(&burst), t0).len(), 5);
        assert_eq!(d.suppressed["/pod-a"], 35);
        // The next period has a fresh budget.
        let more = file((41..=50).map(|i| flow(&format!("192.0.2.{i}"), 443, 1)).collect());
        assert_eq!(d.observe(&more, &report(&more), t0 + Duration::from_secs(61)).len(), 5);
    }
}
