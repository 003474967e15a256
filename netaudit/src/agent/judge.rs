//! The judge (watch mode): each look, the flows that are new or grew since they were last judged
//! are resolved, checked against the policies in force (plus the chart's, from its values) and
//! the matrix, and handed to the drift detector. Verdicts are kept per flow, so a look costs in
//! proportion to what changed, not to the flow map.
//!
//! When the policies change, every flow is judged again at once. When only the inventory changes
//! (pods come and go all day in a busy cluster), the verdicts of flows that did not change are
//! judged again at most every [`REJUDGE_PERIOD`]: a verdict that a changed label or backend
//! turns is at most that late.

use std::{
    collections::hash_map::Entry,
    hash::BuildHasher,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt, fast::FixedState};

use super::drift::{Alert, Detector};
use crate::{
    capture::Changed,
    chart::{Chart, Release, Values},
    check::{Check, FlowVerdict, Report},
    error::InputError,
    inventory::{Inventory, PodInfo},
    matrix::Matrix,
    model::{Flow, FlowFile},
    policy::{
        Policy,
        evaluate::Selections,
        lint::{self, Finding},
    },
};

/// What a flow's verdict depends on in the flow (not its counters), as a 128-bit hash: a look at
/// a full flow map looks every flow up, so the map's entries stay small (a full map's index fits
/// in cache) and hashing is fast and non-cryptographic (the flows are the audited pods' own
/// traffic). Two flows sharing a key would share a verdict; at 128 bits that is beyond any
/// real chance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key(u128);

impl Key {
    fn of(f: &Flow) -> Key {
        // The DNS names too: names learned later can change an FQDN verdict.
        let parts = (f.direction, f.protocol, f.src.ip, f.dst.ip, f.dst.port, f.internal, &f.cgroup, &f.dst.names);
        let half = |seed| u128::from(FixedState::with_seed(seed).hash_one(parts));
        Key(half(1) << 64 | half(2))
    }
}

/// A judged flow: the packets it had when judged, and where its verdict is.
#[derive(Clone, Copy, Debug)]
struct Judged {
    packets: u64,
    verdict: usize,
}

/// The policies in force for `release`, rendered and linted again only when they changed.
fn in_force<'a>(
    kept: &'a mut Option<InForce>,
    values: Option<&Values>,
    inventory: &Inventory,
    policies: &[Policy],
    generations: Generations,
    release: Release,
) -> Result<&'a InForce, InputError> {
    let stale = kept.as_ref().is_none_or(|f| f.generations != generations || f.release != release);
    if stale {
        let chart = values.cloned().map(|values| Chart { values, release: release.clone() });
        let mut all = policies.to_vec();
        if let Some(c) = &chart {
            all.extend(c.policies()?);
        }
        let lint = lint::lint(&all, inventory);
        *kept = Some(InForce { generations, release, chart, policies: all, lint, selections: Selections::default() });
    }
    Ok(kept.as_ref().expect("just set"))
}

/// The policies a look judges with (the cluster's plus the chart's), and the lint of them:
/// kept until the cluster or the release changes.
struct InForce {
    generations: Generations,
    release: Release,
    chart: Option<Chart>,
    policies: Vec<Policy>,
    lint: Vec<Finding>,
    /// Which policies select which pod: valid as long as the inventory they were read from.
    selections: Selections,
}

/// The longest an unchanged flow's verdict may lag an inventory change.
pub const REJUDGE_PERIOD: Duration = Duration::from_secs(30);

/// What a verdict was judged against: the generations of the inventory and of the policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generations {
    pub inventory: u64,
    pub policies: u64,
}

pub struct Judge {
    values: Option<Values>,
    matrix: Matrix,
    pub detector: Detector,
    /// Per flow: the packets it had when judged, and its verdict (in `verdicts`).
    judged_flows: HashMap<Key, Judged>,
    verdicts: Vec<FlowVerdict>,
    in_force: Option<InForce>,
    /// What the kept verdicts were judged against, and when every flow was last judged.
    judged: Option<(Generations, Instant)>,
    /// The last report's parts that are not per flow (summary, lint, unused rows, notes).
    last: Option<Report>,
    /// The capture's number of the snapshot last judged (its `Changed::seq`).
    last_snapshot: Option<u64>,
}

/// What a look judges against: the inventory and the policies in the cluster, and their
/// generations.
#[derive(Clone, Copy)]
pub struct Against<'a> {
    pub inventory: &'a Inventory,
    pub policies: &'a [Policy],
    pub generations: Generations,
}

/// One look's result.
pub struct Look {
    pub alerts: Vec<Alert>,
    /// How many flows were judged (the rest kept their verdicts).
    pub judged: usize,
}

impl Judge {
    pub fn new(values: Option<Values>, matrix: Matrix, detector: Detector) -> Judge {
        let (judged_flows, verdicts) = (HashMap::new(), Vec::new());
        let (in_force, judged, last, last_snapshot) = (None, None, None, None);
        Judge { values, matrix, detector, judged_flows, verdicts, in_force, judged, last, last_snapshot }
    }

    /// Judges what changed in `file`; `audited` are the pods the flows come from (the chart's
    /// release is read from them). `changed`, the capture's word on which flows changed since
    /// its snapshot before, spares looking every flow up when that snapshot was the last one
    /// judged.
    pub fn look<'p>(
        &mut self,
        file: &FlowFile,
        changed: Option<&Changed>,
        against: Against<'_>,
        audited: impl IntoIterator<Item = &'p PodInfo>,
        now: Instant,
    ) -> Result<Look, InputError> {
        let Against { inventory, policies, generations } = against;
        let last_snapshot = self.last_snapshot.take();
        let everything = match self.judged {
            None => true,
            Some((g, _)) if g.policies != generations.policies => true,
            Some((g, at)) => g.inventory != generations.inventory && now.duration_since(at) >= REJUDGE_PERIOD,
        };
        if everything {
            self.judged_flows.clear();
            self.verdicts.clear();
            self.judged = Some((generations, now));
        }
        let hint = changed.filter(|c| !everything && last_snapshot.is_some_and(|s| c.seq == s + 1));
        let to_judge = self.to_judge(file, hint.and_then(|c| c.flows.as_deref()));
        // Kept only once this look's verdicts are: an error leaves the next look to look all.
        let seq = changed.map(|c| c.seq);
        if to_judge.is_empty() {
            self.last_snapshot = seq;
            return Ok(Look { alerts: Vec::new(), judged: 0 });
        }
        let subset = FlowFile { flows: to_judge, sources: Vec::new(), ..file.clone_header() };
        let mut audited = audited.into_iter().peekable();
        let fallback = audited.peek().map_or("default".to_string(), |p| p.namespace.clone());
        let (release, _) = Release::infer(None, None, audited, &fallback);
        let f = in_force(&mut self.in_force, self.values.as_ref(), inventory, policies, generations, release)?;
        let check = Check { inventory, policies: &f.policies, chart: f.chart.as_ref(), matrix: &self.matrix };
        let mut report = check.run_kept(&subset, f.lint.clone(), Some(&f.selections))?;
        let alerts = self.detector.observe(&subset, &report, now);
        for v in report.verdicts.drain(..) {
            let f = &subset.flows[v.index];
            let packets = f.packets.max(1);
            match self.judged_flows.entry(Key::of(f)) {
                Entry::Occupied(mut j) => {
                    j.get_mut().packets = packets;
                    self.verdicts[j.get().verdict] = v;
                }
                Entry::Vacant(j) => {
                    j.insert(Judged { packets, verdict: self.verdicts.len() });
                    self.verdicts.push(v);
                }
            }
        }
        let judged = subset.flows.len();
        self.last = Some(report);
        self.last_snapshot = seq;
        Ok(Look { alerts, judged })
    }

    /// The flows of `file` new or grown since judged: of `changed` (indexes into `file`) when
    /// the capture said which changed, else of every flow.
    fn to_judge(&self, file: &FlowFile, changed: Option<&[usize]>) -> Vec<Flow> {
        let unjudged = |f: &&Flow| self.judged_flows.get(&Key::of(f)).is_none_or(|j| j.packets < f.packets.max(1));
        match changed {
            Some(indexes) => indexes.iter().filter_map(|&i| file.flows.get(i)).filter(unjudged).cloned().collect(),
            None => file.flows.iter().filter(unjudged).cloned().collect(),
        }
    }

    /// The report over every flow of `file` judged so far, in its order (for `/report`): built
    /// when asked for, not every look.
    pub fn report(&self, file: &FlowFile) -> Option<Report> {
        let last = self.last.as_ref()?;
        let mut verdicts = Vec::with_capacity(file.flows.len());
        for (index, f) in file.flows.iter().enumerate() {
            if let Some(j) = self.judged_flows.get(&Key::of(f)) {
                let mut v = self.verdicts[j.verdict].clone();
                v.index = index;
                verdicts.push(v);
            }
        }
        Some(Report::assemble(verdicts, last, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::drift::{Limits, tests::flow};

    /// Egress on, DNS only: every flow to 443 is cut.
    fn judge() -> (Judge, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("values.yaml");
        std::fs::write(&p, "networkPolicy: {enabled: true, egress: {enabled: true}}\n").unwrap();
        let values = Values::load(&p).unwrap();
        (Judge::new(Some(values), Matrix::default_matrix(), Detector::new(Limits::default())), dir)
    }

    #[test]
    fn only_what_changed_is_judged_until_the_cluster_moves() {
        let (mut j, _dir) = judge();
        let inv = Inventory::default();
        let t0 = Instant::now();
        let g = Generations { inventory: 1, policies: 1 };
        let look = |j: &mut Judge, flows: &[Flow], g, t| {
            let file = FlowFile::new(flows.to_vec());
            let against = Against { inventory: &inv, policies: &[], generations: g };
            j.look(&file, None, against, std::iter::empty(), t).unwrap()
        };
        let mut flows = vec![flow("192.0.2.7", 443, 3), flow("192.0.2.8", 443, 1)];
        let first = look(&mut j, &flows, g, t0);
        assert_eq!((first.judged, first.alerts.len()), (2, 2));
        assert_eq!(look(&mut j, &flows, g, t0).judged, 0, "nothing changed");
        flows[0] = flow("192.0.2.7", 443, 9);
        flows.push(flow("192.0.2.9", 443, 1));
        assert_eq!(look(&mut j, &flows, g, t0).judged, 2, "one grew, one is new");
        // A pod changed somewhere: unchanged flows keep their verdicts for a while...
        let moved = Generations { inventory: 2, ..g };
        assert_eq!(look(&mut j, &flows, moved, t0 + Duration::from_secs(1)).judged, 0);
        // ...and are judged again once the period is over.
        assert_eq!(look(&mut j, &flows, moved, t0 + REJUDGE_PERIOD).judged, 3);
        // A policy change re-judges everything at once.
        let policy = Generations { policies: 2, ..moved };
        assert_eq!(look(&mut j, &flows, policy, t0 + REJUDGE_PERIOD).judged, 3);
        // The report covers every flow, in the file's order.
        let report = j.report(&FlowFile::new(flows.clone())).unwrap();
        let indexes: Vec<usize> = report.verdicts.iter().map(|v| v.index).collect();
        assert_eq!((indexes, report.summary.cut, report.summary.flows), (vec![0, 1, 2], 3, 3));
    }

    /// With the capture's word on what changed since its snapshot before, only those flows are
    /// looked at; after a snapshot the judge did not see, every flow is again.
    #[test]
    fn the_captures_changed_flows_are_looked_at_when_it_follows_the_last_judged_snapshot() {
        let (mut j, _dir) = judge();
        let inv = Inventory::default();
        let against =
            Against { inventory: &inv, policies: &[], generations: Generations { inventory: 1, policies: 1 } };
        let mut look = |flows: &[Flow], seq, changed: Option<Vec<usize>>| {
            let file = FlowFile::new(flows.to_vec());
            let changed = Changed { seq, flows: changed };
            j.look(&file, Some(&changed), against, std::iter::empty(), Instant::now()).unwrap().judged
        };
        let mut flows = vec![flow("192.0.2.7", 443, 3), flow("192.0.2.8", 443, 1)];
        assert_eq!(look(&flows, 1, None), 2);
        flows[0] = flow("192.0.2.7", 443, 4);
        flows[1] = flow("192.0.2.8", 443, 2);
        assert_eq!(look(&flows, 2, Some(vec![1])), 1, "only the flow the capture says changed");
        assert_eq!(look(&flows, 4, Some(vec![])), 1, "snapshot 3 was not judged: every flow is looked at");
    }
}
