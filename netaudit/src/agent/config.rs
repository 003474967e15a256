//! What the agent is told: its node, the workloads to audit, the mode, where state lives. From
//! flags and environment (the CLI) or a config file (`--config`, YAML or JSON, same field names
//! in kebab-case); flags win.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;

use crate::error::{FieldError, InputError};

/// A workload to audit: the pods of `namespace` that match `selector` (a label selector as
/// kubectl takes it: `app.kubernetes.io/name=stageset-controller,tier!=canary`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A short name for metrics, reports and logs.
    pub name: String,
    pub namespace: String,
    pub selector: String,
}

impl FromStr for Target {
    type Err = FieldError;
    /// `NAME=NAMESPACE/SELECTOR`, e.g. `ssc=flux-system/app.kubernetes.io/name=stageset-controller`.
    fn from_str(s: &str) -> Result<Target, FieldError> {
        let usage = "write a target as NAME=NAMESPACE/LABEL-SELECTOR, e.g. \
                     ssc=flux-system/app.kubernetes.io/name=stageset-controller";
        let (name, rest) =
            s.split_once('=').ok_or_else(|| FieldError::whole(format!("`{s}`: no `=` after the name; {usage}")))?;
        let (namespace, selector) = rest
            .split_once('/')
            .ok_or_else(|| FieldError::whole(format!("`{s}`: no `/` after the namespace; {usage}")))?;
        let t = Target { name: name.into(), namespace: namespace.into(), selector: selector.into() };
        t.validate().map_err(|e| FieldError::whole(format!("`{s}`: {e}; {usage}")))?;
        Ok(t)
    }
}

impl Target {
    fn validate(&self) -> Result<(), FieldError> {
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns_label(&self.name) {
            return Err(FieldError::new("name", format!("`{}` must be a DNS label (a-z, 0-9, -)", self.name)));
        }
        if !dns_label(&self.namespace) {
            return Err(FieldError::new("namespace", format!("`{}` is not a namespace name", self.namespace)));
        }
        if self.selector.trim().is_empty() {
            return Err(FieldError::new(
                "selector",
                "an empty selector would audit every pod of the namespace; name the workload's labels",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Accumulate flows; the proposal is always available.
    Learn,
    /// Also judge every new flow against the policies in force and the matrix; raise drift alerts.
    Watch,
}

impl Mode {
    /// As the flag and the config file spell it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Learn => "learn",
            Mode::Watch => "watch",
        }
    }
}

/// The agent's whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub targets: Vec<Target>,
    pub mode: Mode,
    /// Watch mode: the chart's values, whose rendered policies count as in force (beside the
    /// live policy objects).
    pub values: Option<PathBuf>,
    /// Another workload's required-traffic matrix.
    pub matrix: Option<PathBuf>,
    /// The kubelet's cgroup root (default: the cgroup2 mount).
    pub cgroup_root: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_flows: u32,
    /// `/metrics` and `/healthz`.
    pub listen: SocketAddr,
    /// The flows, read-only; loopback unless the operator insists (flow data is sensitive).
    pub flows_listen: SocketAddr,
    /// How often flows are drained, enriched and (watch) judged.
    pub interval: Duration,
    /// The least time between two updates of one pod's FlowReport.
    pub report_interval: Duration,
    /// Publish FlowReports (needs the CRD).
    pub publish: bool,
}

/// The config file: every field optional; flags override.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    pub node_name: Option<String>,
    #[serde(default)]
    pub targets: Vec<Target>,
    pub mode: Option<Mode>,
    pub values: Option<PathBuf>,
    pub matrix: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub max_flows: Option<u32>,
    pub listen: Option<SocketAddr>,
    pub flows_listen: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde_opt")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub report_interval: Option<Duration>,
    pub publish: Option<bool>,
}

impl File {
    pub fn load(path: &std::path::Path) -> Result<File, InputError> {
        let origin = path.display().to_string();
        let values = crate::input::read_values(path)?;
        let [value] = values.as_slice() else {
            return Err(InputError::new(origin, format!("expected one document, found {}", values.len())));
        };
        let file: File = crate::input::from_value(value).map_err(|mut e| {
            e.message += " (fields: see `netaudit agent --help`)";
            InputError::at(&origin, None, e)
        })?;
        for (i, t) in file.targets.iter().enumerate() {
            t.validate().map_err(|e| InputError::at(&origin, None, e.within(&format!("targets[{i}]"))))?;
        }
        Ok(file)
    }
}

/// Durations in the config file as `30s`, `5m`.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}"))))
            .transpose()
    }
}

impl Config {
    /// Checks what can be checked before touching the kernel or the API.
    pub fn validate(&self) -> Result<(), InputError> {
        if self.node_name.is_empty() {
            return Err(InputError::usage(
                "no node name: set NODE_NAME (the DaemonSet passes spec.nodeName) or --node-name",
            ));
        }
        if self.targets.is_empty() {
            return Err(InputError::usage(
                "no target workload: give --target NAME=NAMESPACE/SELECTOR (repeatable) or `targets:` in --config",
            ));
        }
        let mut names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(InputError::usage(format!("target `{}` is given twice; target names must differ", w[0])));
        }
        if self.values.is_some() && self.mode == Mode::Learn {
            return Err(InputError::usage("--values is for watch mode (the policies in force); add --mode watch"));
        }
        if self.interval.is_zero() {
            return Err(InputError::usage("--interval must be above zero"));
        }
        if !self.flows_listen.ip().is_loopback() {
            tracing::warn!(
                "serving flows on {} (not loopback): flow data is sensitive; protect that port by NetworkPolicy",
                self.flows_listen
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_selectors_holding_slashes_and_equals() {
        let t: Target = "ssc=flux-system/app.kubernetes.io/name=stageset-controller,tier!=canary".parse().unwrap();
        assert_eq!(t.name, "ssc");
        assert_eq!(t.namespace, "flux-system");
        assert_eq!(t.selector, "app.kubernetes.io/name=stageset-controller,tier!=canary");
        let e = "flux-system/app=x".parse::<Target>().unwrap_err().to_string();
        assert!(e.contains("NAME=NAMESPACE/LABEL-SELECTOR"), "{e}");
        assert!("x=ns/".parse::<Target>().unwrap_err().to_string().contains("empty selector"));
        assert!("X=ns/a=b".parse::<Target>().unwrap_err().to_string().contains("DNS label"));
    }

    #[test]
    fn the_config_file_names_the_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.yaml");
        std::fs::write(&p, "targets:\n- {name: ssc, namespace: flux-system, selector: app=x}\nintervall: 5s\n")
            .unwrap();
        let e = File::load(&p).unwrap_err().to_string();
        assert!(e.contains("agent.yaml") && e.contains("intervall"), "{e}");
        std::fs::write(&p, "targets:\n- {name: ssc, namespace: flux-system, selector: app=x}\ninterval: 5 parsecs\n")
            .unwrap();
        let e = File::load(&p).unwrap_err().to_string();
        assert!(e.contains("interval") && e.contains("5 parsecs"), "{e}");
        std::fs::write(&p, "targets:\n- {name: ssc, namespace: flux-system, selector: app=x}\nmode: watch\n").unwrap();
        let f = File::load(&p).unwrap();
        assert_eq!((f.targets.len(), f.mode), (1, Some(Mode::Watch)));
    }
}
