//! `check`: every recorded flow resolved, judged against the policies in force and classified
//! against the required-traffic matrix. Service traffic is judged at its backends (EndpointSlice
//! addresses and target ports), as the dataplane enforces it after kube-proxy's DNAT. The
//! per-flow verdict is [`verdict`]'s, the fix hints [`fix`]'s.

mod fix;
mod verdict;

use std::{collections::BTreeSet, net::IpAddr};

use serde::Serialize;

use crate::{
    chart::{Chart, default_values},
    error::InputError,
    inventory::Inventory,
    matrix::{Classification, Matrix, UnusedRow},
    model::{Direction, FlowFile, Losses, Protocol},
    policy::{
        Policy,
        evaluate::{ConnVerdict, Evaluator, Selections, SideVerdict},
        lint::{self, Finding},
    },
    resolve::Resolver,
};

/// Everything `check` judges with.
pub struct Check<'a> {
    pub inventory: &'a Inventory,
    pub policies: &'a [Policy],
    /// The chart context, when its values are known: the audited pod's identity, the engine the
    /// fixes are spelled in, and the values the matrix's conditions read (else the defaults).
    pub chart: Option<&'a Chart>,
    pub matrix: &'a Matrix,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub verdicts: Vec<FlowVerdict>,
    pub summary: Summary,
    /// Indexes of flows no enabled matrix row expects.
    pub unexpected: Vec<usize>,
    pub unused_rows: Vec<UnusedRow>,
    pub lint: Vec<Finding>,
    pub losses: Losses,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub flows: usize,
    pub allowed: usize,
    pub cut: usize,
    pub unexpected: usize,
    pub policies: usize,
}

impl Summary {
    /// The counts over `verdicts`, and the indexes of the unexpected flows.
    fn of(verdicts: &[FlowVerdict], policies: usize) -> (Summary, Vec<usize>) {
        let unexpected: Vec<usize> = verdicts.iter().filter(|v| v.matrix.unexpected).map(|v| v.index).collect();
        let summary = Summary {
            flows: verdicts.len(),
            allowed: verdicts.iter().filter(|v| v.allowed).count(),
            cut: verdicts.iter().filter(|v| !v.allowed).count(),
            unexpected: unexpected.len(),
            policies,
        };
        (summary, unexpected)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointView {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `pod ns/name`, `node name`, `Service ns/name`, or `external`.
    pub identity: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendVerdict {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: String,
    #[serde(flatten)]
    pub verdict: ConnVerdict,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub service: String,
    pub port: u16,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowVerdict {
    /// Position in the input flow file.
    pub index: usize,
    pub protocol: Protocol,
    pub src: EndpointView,
    pub dst: EndpointView,
    /// From the audited workload's side: egress when it opened the connection.
    pub direction: Direction,
    pub allowed: bool,
    /// The end(s) whose verdict decided: the cutting ends for a cut flow, else the judged ends.
    pub decided_by: Vec<Direction>,
    pub reason: String,
    /// Per judged end (absent when judged per Service backend).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sides: Vec<SideVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendVerdict>,
    pub matrix: Classification,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Report {
    /// A report over `verdicts` (of `file`'s flows, each judged in some earlier report) with the
    /// parts that are not per flow (lint, notes, policies) from `last`, the latest of them.
    pub fn assemble(verdicts: Vec<FlowVerdict>, last: &Report, file: &FlowFile) -> Report {
        let (summary, unexpected) = Summary::of(&verdicts, last.summary.policies);
        // Unused over all flows: what no earlier report used, less what any verdict uses now.
        let used = |id: &str| verdicts.iter().any(|v| !v.matrix.unexpected && v.matrix.row.as_deref() == Some(id));
        let unused_rows = last.unused_rows.iter().filter(|u| !used(&u.id)).cloned().collect();
        Report {
            summary,
            unexpected,
            unused_rows,
            lint: last.lint.clone(),
            losses: file.losses,
            notes: last.notes.clone(),
            verdicts,
        }
    }
}

impl Check<'_> {
    pub fn run(&self, flows: &FlowFile) -> Result<Report, InputError> {
        self.run_linted(flows, lint::lint(self.policies, self.inventory))
    }

    /// [`Check::run`] with the policies' lint findings already known (they depend on the
    /// policies and the inventory, not on the flows: the agent lints once per change).
    pub fn run_linted(&self, flows: &FlowFile, lint: Vec<Finding>) -> Result<Report, InputError> {
        self.run_kept(flows, lint, None)
    }

    /// [`Check::run_linted`] reusing `selections` (of the same policies and inventory).
    pub fn run_kept(
        &self,
        flows: &FlowFile,
        lint: Vec<Finding>,
        selections: Option<&Selections>,
    ) -> Result<Report, InputError> {
        let inv = self.inventory;
        let resolver = Resolver::new(inv, self.chart, &flows.flows)?;
        let mut notes = resolver.notes.clone();
        let ev = Evaluator::with_selections(inv, self.policies, selections);
        let engine = self.chart.map(Chart::engine);
        let values = self.chart.map(|c| &c.values).unwrap_or(default_values());
        let mut verdicts = Vec::with_capacity(flows.flows.len());
        let mut used = BTreeSet::new();
        for (index, f) in flows.flows.iter().enumerate() {
            let r = resolver.resolve(index, f);
            let mut v = verdict::judge(&r, &ev, engine, inv);
            v.matrix = self.matrix.classify(&r, inv, values)?;
            if let Some(row) = &v.matrix.row
                && !v.matrix.unexpected
            {
                used.insert(row.clone());
            }
            verdicts.push(v);
        }
        let (summary, unexpected) = Summary::of(&verdicts, self.policies.len());
        if flows.losses.any() {
            notes.push(
                "the flow file reports losses: some traffic was not recorded, so this check may miss cuts".to_string(),
            );
        }
        Ok(Report {
            verdicts,
            summary,
            unexpected,
            unused_rows: self.matrix.unused(&used, values)?,
            lint,
            losses: flows.losses,
            notes,
        })
    }
}
