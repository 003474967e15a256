//! The agent's view of the cluster: one typed store per watched kind, holding the inventory's
//! slim objects ([`PodInfo`], [`ServiceInfo`], …, parsed [`Policy`]s), updated one watch event at
//! a time. An object is read once, when it changes; the API's full object is dropped right
//! after, so memory follows the slim objects, not the cluster's YAML. Inventories built from the
//! stores share the objects (`Arc`), they do not copy them.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::StreamExt;
use kube::{
    ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    error::FieldError,
    inventory::{Inventory, Labels},
    policy::Policy,
};

/// Objects per list page. The API's objects are read whole before they are slimmed, and every
/// kind lists at once: small pages keep that transient memory small, so the heap the slim objects
/// stay in does not grow to the size of five pages of full objects (client-go's 500 did).
const LIST_PAGE: u32 = 100;

/// One kind's slim objects by `namespace/name`, replaced whole on a relist.
#[derive(Debug)]
pub struct Store<T> {
    live: HashMap<String, Arc<T>>,
    /// A relist in progress: the objects listed so far.
    relist: Option<HashMap<String, Arc<T>>>,
    /// Whether a first list completed.
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store { live: HashMap::new(), relist: None, synced: false }
    }
}

impl<T> Store<T> {
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.live.values()
    }

    /// Applies one watch event; `read` turns the API's object into the slim one (none: the
    /// object is not kept, e.g. a slice that belongs to no Service, or one that cannot be read).
    fn apply<K: ResourceExt>(&mut self, event: watcher::Event<K>, read: &mut impl FnMut(&str, K) -> Option<T>) {
        let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
        match event {
            watcher::Event::Apply(o) => {
                let k = key(&o);
                match read(&k, o) {
                    Some(t) => drop(self.live.insert(k, Arc::new(t))),
                    None => drop(self.live.remove(&k)),
                }
            }
            watcher::Event::Delete(o) => drop(self.live.remove(&key(&o))),
            watcher::Event::Init => self.relist = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                let k = key(&o);
                if let (Some(t), Some(relist)) = (read(&k, o), self.relist.as_mut()) {
                    relist.insert(k, Arc::new(t));
                }
            }
            watcher::Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.live = relist;
                }
                self.synced = true;
            }
        }
    }
}

/// A store shared between its watch task and the agent's loop.
pub type Shared<T> = Arc<RwLock<Store<T>>>;

/// Objects that could not be read, by `kind namespace/name`: each said once.
#[derive(Clone, Default)]
pub struct Unreadable(Arc<Mutex<HashSet<String>>>);

impl Unreadable {
    fn say(&self, what: String, e: &FieldError) {
        if self.0.lock().expect("not poisoned").insert(what.clone()) {
            tracing::warn!("skipping an object the agent cannot read: live {what}: {e}");
        }
    }
}

/// Where a watch puts what it reads.
pub struct Sink<T> {
    pub store: Shared<T>,
    /// Bumped on every change: the agent rebuilds its inventory only when it moved.
    pub generation: Arc<AtomicU64>,
    pub unreadable: Unreadable,
}

/// One copy of each distinct label set: a workload's replicas carry the same labels, and the
/// agent holds every pod of the cluster.
#[derive(Default)]
pub struct Interner(std::sync::Mutex<(HashSet<Arc<Labels>>, usize)>);

impl Interner {
    pub fn intern(&self, labels: Arc<Labels>) -> Arc<Labels> {
        let mut guard = self.0.lock().expect("not poisoned");
        let (known, purge_at) = &mut *guard;
        if let Some(same) = known.get(&*labels) {
            return Arc::clone(same);
        }
        // Label sets no pod holds any more go once the set has doubled since the last purge.
        if known.len() >= *purge_at {
            known.retain(|l| Arc::strong_count(l) > 1);
            *purge_at = (known.len() * 2).max(1024);
        }
        known.insert(Arc::clone(&labels));
        labels
    }
}

/// Watches `api` (objects of `kind`) into the sink, reading each changed object with `read`.
/// `before` runs first (an engine's API: until it is served). Runs until the runtime stops.
pub fn watch<K, T>(
    api: kube::Api<K>,
    kind: String,
    sink: Sink<T>,
    read: impl Fn(K) -> Result<Option<T>, FieldError> + Send + 'static,
    before: impl Future<Output = ()> + Send + 'static,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
    T: Send + Sync + 'static,
{
    tokio::spawn(async move {
        before.await;
        let Sink { store, generation, unreadable } = sink;
        let what = kind.clone();
        let mut read = move |key: &str, o: K| match read(o) {
            Ok(t) => t,
            Err(e) => {
                unreadable.say(format!("{what} {key}"), &e);
                None
            }
        };
        let config = watcher::Config::default().page_size(LIST_PAGE);
        let mut events = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    store.write().expect("not poisoned").apply(event, &mut read);
                    generation.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(kind = %kind, "watching: {e}"),
            }
        }
    });
}

/// The inventory kinds' stores, and the policy kinds' (one per kind: a relist of one kind must
/// not drop another's).
#[derive(Clone, Default)]
pub struct Stores {
    pub namespaces: Shared<crate::inventory::NamespaceInfo>,
    pub pods: Shared<crate::inventory::PodInfo>,
    pub services: Shared<crate::inventory::ServiceInfo>,
    pub nodes: Shared<crate::inventory::NodeInfo>,
    pub slices: Shared<crate::inventory::SliceInfo>,
    /// Per policy kind: whether its API is optional (an engine's), and its store.
    pub policies: Vec<(bool, Shared<Vec<Policy>>)>,
}

impl Stores {
    /// An inventory of what the stores hold now, and the policies: the objects are shared.
    pub fn snapshot(&self) -> (Inventory, Vec<Policy>) {
        let mut b = Inventory::builder();
        self.namespaces.read().expect("not poisoned").values().for_each(|o| b.add_namespace(o.clone()));
        self.pods.read().expect("not poisoned").values().for_each(|o| b.add_pod(o.clone()));
        self.services.read().expect("not poisoned").values().for_each(|o| b.add_service(o.clone()));
        self.nodes.read().expect("not poisoned").values().for_each(|o| b.add_node(o.clone()));
        self.slices.read().expect("not poisoned").values().for_each(|o| b.add_slice(o.clone()));
        let mut policies = Vec::new();
        for (_, store) in &self.policies {
            policies.extend(store.read().expect("not poisoned").values().flat_map(|p| p.iter().cloned()));
        }
        (b.build(), policies)
    }

    /// Whether the first list of every always-served kind has arrived.
    pub fn synced(&self) -> bool {
        let core = [
            self.namespaces.read().expect("not poisoned").synced(),
            self.pods.read().expect("not poisoned").synced(),
            self.services.read().expect("not poisoned").synced(),
            self.nodes.read().expect("not poisoned").synced(),
            self.slices.read().expect("not poisoned").synced(),
        ];
        core.into_iter().all(|s| s)
            && self
                .policies
                .iter()
                .filter(|(optional, _)| !optional)
                .all(|(_, s)| s.read().expect("not poisoned").synced())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;
    use crate::inventory::Labels;

    fn pod(name: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    /// Replicas share one label set; sets no pod holds any more are dropped.
    #[test]
    fn label_sets_are_shared_and_released() {
        let interner = Interner::default();
        let set = |app: &str| Arc::new(Labels::from([("app".to_string(), app.to_string())]));
        let (a, b) = (interner.intern(set("x")), interner.intern(set("x")));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        for i in 0..2000 {
            interner.intern(set(&i.to_string()));
        }
        let known = interner.0.lock().unwrap().0.len();
        assert!(known < 1100, "unused sets are purged: {known} kept");
    }

    #[test]
    fn events_keep_the_store_exact_and_a_relist_replaces_it() {
        let mut s: Store<crate::inventory::PodInfo> = Store::default();
        let mut read = |_: &str, p: Pod| crate::inventory::PodInfo::from_api(p).ok();
        s.apply(watcher::Event::Init, &mut read);
        s.apply(watcher::Event::InitApply(pod("a", "192.0.2.1")), &mut read);
        assert!(!s.synced() && s.is_empty(), "a list in progress is not the store yet");
        s.apply(watcher::Event::InitDone, &mut read);
        s.apply(watcher::Event::Apply(pod("b", "192.0.2.2")), &mut read);
        s.apply(watcher::Event::Apply(pod("a", "192.0.2.3")), &mut read);
        assert_eq!(s.len(), 2);
        assert!(s.values().any(|p| p.name == "a" && p.ips == ["192.0.2.3".parse::<std::net::IpAddr>().unwrap()]));
        s.apply(watcher::Event::Delete(pod("b", "")), &mut read);
        // After a relist only what it listed remains (a deletion missed during an outage).
        s.apply(watcher::Event::Init, &mut read);
        s.apply(watcher::Event::InitApply(pod("c", "192.0.2.4")), &mut read);
        s.apply(watcher::Event::InitDone, &mut read);
        let names: Vec<_> = s.values().map(|p| p.name.clone()).collect();
        assert_eq!((names, s.synced()), (vec!["c".to_string()], true));
    }
}
