//! The agent's view of the API: a watch per inventory and policy kind into typed stores of slim
//! objects ([`super::stores`]), read by the same readers `check` uses for files (the inventory's
//! `from_api`, the policy parsers), so the live path and the file path cannot disagree.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams, PartialObjectMeta},
    runtime::{WatchStreamExt, reflector::Store, watcher},
};

use super::{
    judge::Generations,
    stores::{Interner, Shared, Sink, Stores, Unreadable, watch},
};
use crate::{
    error::FieldError,
    input::Document,
    inventory::{NamespaceInfo, NodeInfo, PodInfo, ServiceInfo, SliceInfo},
};

/// The policy kinds of the other engines: watched only where their API is served.
const POLICY_KINDS: [(&str, &str, &str, &str); 5] = [
    ("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies"),
    ("cilium.io", "v2", "CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies"),
    ("projectcalico.org", "v3", "NetworkPolicy", "networkpolicies"),
    ("projectcalico.org", "v3", "GlobalNetworkPolicy", "globalnetworkpolicies"),
    ("policy.networking.k8s.io", "v1alpha2", "ClusterNetworkPolicy", "clusternetworkpolicies"),
];

/// How often an engine's API that is not served is looked for again (installed later).
const PROBE_PERIOD: Duration = Duration::from_secs(300);

/// The cluster's objects as the agent's stores hold them now.
#[derive(Clone)]
pub struct LiveInventory {
    stores: Stores,
    /// Bumped on every change of an inventory kind, and of a policy kind.
    generation: Arc<AtomicU64>,
    policy_generation: Arc<AtomicU64>,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Keeps only what the readers use before an object reaches a store: the agent holds every
/// pod of the cluster, and managed fields, annotations (`last-applied-configuration`) and most
/// of a pod's spec would multiply its memory.
fn slim(kind: &str) -> impl FnMut(&mut DynamicObject) + use<> {
    let pod = kind == "Pod";
    move |o: &mut DynamicObject| {
        o.managed_fields_mut().clear();
        o.annotations_mut().clear();
        if !pod {
            return;
        }
        let keep = |v: &serde_json::Value, fields: &[&str]| -> serde_json::Value {
            fields.iter().filter_map(|f| v.get(*f).map(|x| (f.to_string(), x.clone()))).collect()
        };
        let spec = o.data.get("spec").cloned().unwrap_or_default();
        let containers = |key: &str| -> Option<serde_json::Value> {
            let list = spec.get(key)?.as_array()?;
            Some(list.iter().map(|c| keep(c, &["name", "ports"])).collect())
        };
        let mut slim_spec = keep(&spec, &["nodeName", "hostNetwork", "serviceAccountName"]);
        for key in ["containers", "initContainers"] {
            if let Some(c) = containers(key) {
                slim_spec[key] = c;
            }
        }
        let status = o.data.get("status").map(|s| keep(s, &["phase", "podIP", "podIPs"]));
        o.data["spec"] = slim_spec;
        if let Some(s) = status {
            o.data["status"] = s;
        }
    }
}

/// The policy kinds, and whether its API is optional (an engine's, served only where it is
/// installed).
fn policy_kinds() -> Vec<(ApiResource, bool)> {
    std::iter::once((ApiResource::erase::<NetworkPolicy>(&()), false))
        .chain(POLICY_KINDS.map(|(g, v, k, p)| (resource(g, v, k, p), true)))
        .collect()
}

/// Every kind the inventory and the policy readers take, and whether its API is optional.
fn kinds() -> Vec<(ApiResource, bool)> {
    let inventory = [
        ApiResource::erase::<Namespace>(&()),
        ApiResource::erase::<Node>(&()),
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
    ];
    inventory.into_iter().map(|ar| (ar, false)).chain(policy_kinds()).collect()
}

fn document(ar: &ApiResource, o: &DynamicObject) -> Document {
    let mut v = serde_json::to_value(o).unwrap_or_default();
    // List items come without their type; the readers dispatch on it.
    v["apiVersion"] = ar.api_version.clone().into();
    v["kind"] = ar.kind.clone().into();
    Document { origin: format!("live {}", ar.plural), value: v }
}

/// The inventory and policy objects, listed once (for the CLI's `--from-cluster`).
pub async fn list_documents(client: &Client) -> anyhow::Result<Vec<Document>> {
    let mut out = Vec::new();
    for (ar, optional) in kinds() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list(&ListParams::default()).await {
            Ok(list) => out.extend(list.items.into_iter().map(|mut o| {
                slim(&ar.kind)(&mut o);
                document(&ar, &o)
            })),
            Err(kube::Error::Api(s)) if optional && s.code == 404 => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("listing {} ({})", ar.plural, ar.api_version))),
        }
    }
    Ok(out)
}

impl LiveInventory {
    /// Starts one watch per kind (on the current tokio runtime), each into its typed store.
    pub fn start(client: &Client) -> LiveInventory {
        let generation = Arc::new(AtomicU64::new(0));
        let policy_generation = Arc::new(AtomicU64::new(0));
        let unreadable = Unreadable::default();
        let sinks = Sinks { generation: Arc::clone(&generation), unreadable: unreadable.clone() };
        let policy_sinks = Sinks { generation: Arc::clone(&policy_generation), unreadable };
        let mut stores = Stores::default();
        let now = || futures::future::ready(());
        let c = client.clone();
        let namespace = |o| Ok(Some(NamespaceInfo::from_api(o)));
        watch(Api::<Namespace>::all(c.clone()), "Namespace".into(), sinks.to(&stores.namespaces), namespace, now());
        let labels = Interner::default();
        let pod = move |o| PodInfo::from_api(o).map(|p| Some(PodInfo { labels: labels.intern(p.labels.clone()), ..p }));
        watch(Api::<Pod>::all(c.clone()), "Pod".into(), sinks.to(&stores.pods), pod, now());
        let services = sinks.to(&stores.services);
        watch(Api::<Service>::all(c.clone()), "Service".into(), services, kept(ServiceInfo::from_api), now());
        watch(Api::<Node>::all(c.clone()), "Node".into(), sinks.to(&stores.nodes), kept(NodeInfo::from_api), now());
        let slices = sinks.to(&stores.slices);
        watch(Api::<EndpointSlice>::all(c.clone()), "EndpointSlice".into(), slices, SliceInfo::from_api, now());
        for (ar, optional) in policy_kinds() {
            let store = Shared::default();
            stores.policies.push((optional, Arc::clone(&store)));
            let api: Api<DynamicObject> = Api::all_with(c.clone(), &ar);
            let served = {
                let (client, api, ar) = (c.clone(), api.clone(), ar.clone());
                async move {
                    if optional {
                        wait_until_served(&client, &api, &ar).await;
                    }
                }
            };
            let kind = ar.kind.clone();
            let read = move |o: DynamicObject| {
                let doc = document(&ar, &o);
                crate::policy::from_documents(vec![doc])
                    .map(|(found, _)| Some(found))
                    .map_err(|e| FieldError::whole(e.to_string()))
            };
            watch(api, kind, policy_sinks.to(&store), read, served);
        }
        LiveInventory { stores, generation, policy_generation }
    }

    /// Changes so far: the agent rebuilds its inventory only when they moved.
    pub fn generations(&self) -> Generations {
        Generations {
            inventory: self.generation.load(Ordering::Relaxed),
            policies: self.policy_generation.load(Ordering::Relaxed),
        }
    }

    /// Whether the initial list of every always-served kind has arrived.
    pub fn synced(&self) -> bool {
        self.stores.synced()
    }

    /// The inventory and the policies now (the objects are shared with the stores).
    pub fn snapshot(&self) -> (crate::inventory::Inventory, Vec<crate::policy::Policy>) {
        self.stores.snapshot()
    }
}

/// Makes the sinks of one agent's stores: one generation, one record of unreadable objects.
struct Sinks {
    generation: Arc<AtomicU64>,
    unreadable: Unreadable,
}

impl Sinks {
    fn to<T>(&self, store: &Shared<T>) -> Sink<T> {
        Sink { store: Arc::clone(store), generation: Arc::clone(&self.generation), unreadable: self.unreadable.clone() }
    }
}

/// A reader whose every object is kept.
fn kept<K, T>(read: fn(K) -> Result<T, FieldError>) -> impl Fn(K) -> Result<Option<T>, FieldError> {
    move |o| read(o).map(Some)
}

/// Whether a store's first list has completed (without waiting).
pub(super) fn ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

/// Waits until `ar` is served; says so once. A CustomResourceDefinition for it wakes the
/// wait at once (a metadata-only watch on that one CRD's name); an API served by aggregation
/// (Calico's API server) has no CRD, so the API is also looked for every [`PROBE_PERIOD`].
async fn wait_until_served(client: &Client, api: &Api<DynamicObject>, ar: &ApiResource) {
    let crds: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={}.{}", ar.plural, ar.group));
    let mut crd = std::pin::pin!(watcher(crds, config).applied_objects());
    let mut said = false;
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {
                tracing::info!("{} ({}) is served: watching it", ar.kind, ar.api_version);
                return;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                if !said {
                    tracing::info!(
                        "{} ({}) is not served here: watching for its CRD, and looking again every {}",
                        ar.kind,
                        ar.api_version,
                        humantime::format_duration(PROBE_PERIOD)
                    );
                    said = true;
                }
            }
            Err(e) => tracing::warn!("looking for {} ({}): {e}", ar.kind, ar.api_version),
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_PERIOD) => {}
            Some(Ok(_)) = crd.next() => {
                // Its CRD exists; the API is served once the CRD is established (about a second).
                tracing::info!("a CRD for {} appeared", ar.plural);
                tokio::time::sleep(CRD_ESTABLISH_WAIT).await;
                while let Some(Ok(_)) = futures::FutureExt::now_or_never(crd.next()).flatten() {}
            }
        }
    }
}

/// How long to let a new CRD become established before listing its kind again.
const CRD_ESTABLISH_WAIT: Duration = Duration::from_secs(1);

/// A pod to audit, as the attach reconciler records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodRef {
    pub target: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
}

impl PodRef {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The object reference Events are attached to.
    pub fn object_ref(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(<Pod as k8s_openapi::Resource>::API_VERSION.into()),
            kind: Some(<Pod as k8s_openapi::Resource>::KIND.into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    /// A slimmed pod still reads as the same pod (ports, addresses, node, account).
    #[test]
    fn a_slimmed_pod_reads_the_same() {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(5000)},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "sa", "restartPolicy": "Always",
                "containers": [{"name": "c", "image": "img", "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "192.0.2.9", "podIPs": [{"ip": "192.0.2.9"}],
                "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let ar = ApiResource::erase::<Pod>(&());
        let mut o: DynamicObject = serde_json::from_value(pod).unwrap();
        slim("Pod")(&mut o);
        let doc = document(&ar, &o);
        assert!(doc.value.to_string().len() < 600, "{}", doc.value);
        let (inv, rest) = Inventory::from_documents(vec![doc]).unwrap();
        assert!(rest.is_empty());
        let p = inv.pod_by_ip("192.0.2.9".parse().unwrap()).unwrap();
        assert_eq!((p.node_name.as_deref(), p.service_account.as_deref()), (Some("n1"), Some("sa")));
        assert_eq!(p.named_port("http", crate::model::Protocol::Tcp), Some(8080));
        assert_eq!(p.labels["app"], "x");
    }
}
