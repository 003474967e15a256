//! The judging stages' inputs, gathered one way for every caller: the cluster's objects (an
//! inventory file, or what the API lists), policy manifests, and the chart context (values and
//! release). `check`, `lint` and `propose` load through it; the agent shares its pieces
//! ([`Release::infer`], [`Chart::policies`]).

use std::path::Path;

use crate::{
    chart::{Chart, Release, Values},
    error::InputError,
    input::{self, Document},
    inventory::Inventory,
    policy::{self, Policy},
};

/// What the judging stages read.
#[derive(Debug, Default)]
pub struct Loaded {
    pub inventory: Inventory,
    /// Policies in force: from the cluster, the manifests and the chart.
    pub policies: Vec<Policy>,
    pub chart: Option<Chart>,
    /// What the reader of a report must know about the inputs.
    pub notes: Vec<String>,
}

/// Where the chart's context comes from.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChartSource<'a> {
    /// The values file; none: no chart context.
    pub values: Option<&'a Path>,
    /// The release name and namespace; none: from the controller pod in the inventory.
    pub release: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

impl Loaded {
    /// The cluster from its objects: inventory kinds and policies are read, other kinds noted
    /// as skipped.
    pub fn from_documents(docs: Vec<Document>) -> Result<Loaded, InputError> {
        let (mut inventory, rest) = Inventory::from_documents(docs)?;
        let (policies, skipped) = policy::from_documents(rest)?;
        for d in &skipped {
            inventory.note_skipped(d);
        }
        Ok(Loaded { inventory, policies, chart: None, notes: Vec::new() })
    }

    /// The cluster from an inventory file.
    pub fn from_inventory_file(path: &Path) -> Result<Loaded, InputError> {
        Loaded::from_documents(input::read_objects(path)?)
    }

    /// Adds the policies of a manifest file (`--policy`); a file without any is an error.
    pub fn add_policy_file(&mut self, path: &Path) -> Result<(), InputError> {
        let (found, rest) = policy::from_documents(input::read_objects(path)?)?;
        if found.is_empty() {
            return Err(InputError::new(format!("--policy {}", path.display()), "holds no policy objects"));
        }
        self.policies.extend(found);
        for d in &rest {
            self.inventory.note_skipped(d);
        }
        Ok(())
    }

    /// Loads the chart context, when values are given, and adds the policies it renders.
    pub fn add_chart(&mut self, source: ChartSource<'_>) -> Result<(), InputError> {
        let Some(path) = source.values else { return Ok(()) };
        let values = Values::load(path)?;
        let (release, notes) =
            Release::infer(source.release, source.namespace, self.inventory.pods.iter().map(|p| &**p), "default");
        self.notes.extend(notes);
        let chart = Chart { values, release };
        let rendered = chart.policies()?;
        if !chart.values.chart.network_policy.enabled {
            self.notes
                .push(format!("{}: networkPolicy.enabled is false: the chart renders no policy", chart.values.origin));
        }
        self.policies.extend(rendered);
        self.chart = Some(chart);
        Ok(())
    }

    /// The inventory's own notes after those of loading, for the report.
    pub fn all_notes(&self) -> Vec<String> {
        self.notes.iter().chain(&self.inventory.notes).cloned().collect()
    }
}
