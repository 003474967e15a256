//! FlowReports (`flowreports.netaudit.dev/v1alpha1`): each agent publishes the flows of each pod
//! it audits into one object named after the pod, in the pod's namespace, by server-side apply.
//! `netaudit report` and `propose --from-cluster` read them back across nodes and replicas.
//!
//! Like a PolicyReport, a FlowReport is written by its producer only: its data sits at the top
//! level, no spec/status split. An object must stay well below etcd's 1.5 MiB limit, so a report
//! holds the busiest flows that fit and says how many were left out (`truncated`), never silently.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use super::{
    cluster::PodRef,
    manifests::{FLOW_REPORTS, GROUP},
};
use crate::{capture::rfc3339, model::FlowFile};

pub const KIND: &str = "FlowReport";
pub const VERSION: &str = "v1alpha1";
/// Labels that let `netaudit report` select one workload's reports, or one node's.
pub const TARGET_LABEL: &str = "netaudit.dev/target";
pub const NODE_LABEL: &str = "netaudit.dev/node";
/// The agent's field manager for server-side apply.
pub const MANAGER: &str = "netaudit-agent";
/// What the flows of one report may take (etcd refuses objects over 1.5 MiB).
pub const MAX_FLOW_BYTES: usize = 900 * 1024;

pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: FLOW_REPORTS.into(),
    }
}

/// The report object for one pod: its busiest flows within [`MAX_FLOW_BYTES`].
pub fn report_object(pod: &PodRef, node: &str, file: &FlowFile) -> Value {
    let mut flows = file.flows.clone();
    flows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.packets.cmp(&a.packets)));
    let mut kept = Vec::new();
    let mut size = 0;
    for f in flows {
        let n = serde_json::to_string(&f).map(|s| s.len()).unwrap_or(usize::MAX);
        if size + n > MAX_FLOW_BYTES {
            break;
        }
        size += n;
        kept.push(f);
    }
    let truncated = file.flows.len() - kept.len();
    let bounded = FlowFile { flows: kept, ..file.clone() };
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "labels": {TARGET_LABEL: pod.target, NODE_LABEL: node},
        },
        "pod": pod.name,
        "podUID": pod.uid,
        "node": node,
        "target": pod.target,
        "updated": rfc3339(std::time::SystemTime::now()),
        "flowCount": file.flows.len(),
        "truncated": truncated,
        "flows": bounded,
    })
}

/// Creates or updates the pod's report (server-side apply: the agent owns every field).
pub async fn publish(client: &Client, pod: &PodRef, node: &str, file: &FlowFile) -> kube::Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &pod.namespace, &api_resource());
    let object = report_object(pod, node, file);
    api.patch(&pod.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object)).await?;
    Ok(())
}

/// One report read back.
pub struct Fetched {
    /// `namespace/name`
    pub id: String,
    pub node: String,
    pub truncated: u64,
    pub flows: FlowFile,
}

/// Reads the reports of a namespace (or all), optionally of one target workload.
pub async fn fetch(client: &Client, namespace: Option<&str>, target: Option<&str>) -> anyhow::Result<Vec<Fetched>> {
    let ar = api_resource();
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let mut params = ListParams::default();
    if let Some(t) = target {
        params = params.labels(&format!("{TARGET_LABEL}={t}"));
    }
    let list = api.list(&params).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
            "the API serves no {FLOW_REPORTS}.{GROUP}: install the agent's bundle (deploy/netaudit.yaml) first"
        ),
        e => anyhow::Error::new(e).context(format!("listing {FLOW_REPORTS}.{GROUP}")),
    })?;
    let mut out = Vec::new();
    for o in list {
        let id =
            format!("{}/{}", o.metadata.namespace.as_deref().unwrap_or(""), o.metadata.name.as_deref().unwrap_or(""));
        let flows: FlowFile = serde_json::from_value(o.data.get("flows").cloned().unwrap_or(Value::Null))
            .map_err(|e| anyhow::anyhow!("FlowReport {id}: `flows` is not a flow file: {e}"))?;
        out.push(Fetched {
            node: o.data.get("node").and_then(Value::as_str).unwrap_or("").to_string(),
            truncated: o.data.get("truncated").and_then(Value::as_u64).unwrap_or(0),
            id,
            flows,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Flow, Losses, Protocol};

    #[test]
    fn a_report_keeps_the_busiest_flows_that_fit_and_counts_the_rest() {
        let flow = |i: u32| {
            let mut f = Flow::new(
                Protocol::Tcp,
                "192.0.2.1".parse().unwrap(),
                std::net::Ipv4Addr::from(0xc633_6400 + i).into(),
                Some(443),
            )
            .with_dst_names(vec![format!("host-{i}.example.com"); 4])
            .with_connections(1);
            (f.packets, f.bytes, f.packets_from_src) = (1, u64::from(i), 1);
            f
        };
        let file = FlowFile {
            version: 1,
            window: None,
            sources: vec![],
            losses: Losses::default(),
            flows: (0..20_000).map(flow).collect(),
        };
        let pod = PodRef { target: "ssc".into(), namespace: "ns".into(), name: "p".into(), uid: "u".into(), qos: None };
        let o = report_object(&pod, "node-a", &file);
        let kept = o["flows"]["flows"].as_array().unwrap();
        assert!(serde_json::to_string(&o).unwrap().len() < 1024 * 1024);
        assert_eq!(o["flowCount"], 20_000);
        assert_eq!(o["truncated"].as_u64().unwrap() as usize, 20_000 - kept.len());
        assert!(kept.len() > 1000, "{}", kept.len());
        // The busiest first.
        assert_eq!(kept[0]["bytes"], 19_999);
        assert_eq!(o["metadata"]["labels"][TARGET_LABEL], "ssc");
    }
}
