//! A stand-in Kubernetes API server on 127.0.0.1, left only for the agent's memory benchmark
//! (`tests/src/bin/bench_agent.rs`), which feeds it a synthetic cluster of up to 13 000 objects
//! in seconds. Every agent *test* runs against the real etcd + kube-apiserver
//! (`tests/src/cluster.rs`); the benchmark moves there too, and this file goes, once writing
//! that many objects through the real API is quick enough to repeat per round.
//!
//! It serves the objects it is given over real HTTP with the API's paths, list and watch
//! semantics (resourceVersions, paginated lists, chunked watch streams, label and field
//! selectors), and takes creates, patches and deletes. Kinds it is not told about answer 404.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// A kind the server serves.
#[derive(Clone, Debug)]
pub struct Kind {
    /// `api/v1` or `apis/<group>/<version>`.
    pub prefix: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl Kind {
    fn api_version(&self) -> String {
        self.prefix.trim_start_matches("api/").trim_start_matches("apis/").to_string()
    }
}

/// The kinds of a plain cluster plus the agent's FlowReports (no Cilium, Calico or
/// ClusterNetworkPolicy API: those answer 404).
pub const KINDS: [Kind; 8] = [
    Kind { prefix: "api/v1", plural: "namespaces", kind: "Namespace", namespaced: false },
    Kind { prefix: "api/v1", plural: "nodes", kind: "Node", namespaced: false },
    Kind { prefix: "api/v1", plural: "pods", kind: "Pod", namespaced: true },
    Kind { prefix: "api/v1", plural: "services", kind: "Service", namespaced: true },
    Kind { prefix: "apis/discovery.k8s.io/v1", plural: "endpointslices", kind: "EndpointSlice", namespaced: true },
    Kind { prefix: "apis/networking.k8s.io/v1", plural: "networkpolicies", kind: "NetworkPolicy", namespaced: true },
    Kind { prefix: "apis/events.k8s.io/v1", plural: "events", kind: "Event", namespaced: true },
    Kind { prefix: "apis/netaudit.dev/v1alpha1", plural: "flowreports", kind: "FlowReport", namespaced: true },
];

type Key = (String, String, String); // (plural, namespace, name)

struct Change {
    rv: u64,
    key: Key,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    changes: Vec<Change>,
    requests: Vec<String>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct FakeApiserver {
    pub addr: SocketAddr,
    state: Shared,
    stop: Arc<AtomicBool>,
}

fn kind_of(v: &Value) -> Option<&'static Kind> {
    let api_version = v["apiVersion"].as_str()?;
    KINDS.iter().find(|k| k.kind == v["kind"].as_str().unwrap_or("") && k.api_version() == api_version)
}

fn key_of(kind: &Kind, v: &Value) -> Key {
    let ns = if kind.namespaced { v["metadata"]["namespace"].as_str().unwrap_or("default") } else { "" };
    (kind.plural.to_string(), ns.to_string(), v["metadata"]["name"].as_str().unwrap_or("").to_string())
}

impl State {
    /// Stores `v` with a new resourceVersion and records the change for watchers.
    fn store(&mut self, key: Key, mut v: Value) -> Value {
        self.rv += 1;
        let existed = self.objects.contains_key(&key);
        let meta = &mut v["metadata"];
        meta["resourceVersion"] = self.rv.to_string().into();
        if meta.get("uid").is_none() {
            meta["uid"] = format!("00000000-0000-4000-8000-{:012}", self.rv).into();
        }
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = "2026-11-24T00:00:00Z".into();
        }
        let type_ = if existed { "MODIFIED" } else { "ADDED" };
        self.objects.insert(key.clone(), v.clone());
        self.changes.push(Change { rv: self.rv, key, type_, object: v.clone() });
        v
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut v = self.objects.remove(key)?;
        self.rv += 1;
        v["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.changes.push(Change { rv: self.rv, key: key.clone(), type_: "DELETED", object: v.clone() });
        Some(v)
    }
}

impl FakeApiserver {
    /// Serves `objects` (of [`KINDS`]) on a free loopback port.
    pub fn start(objects: Vec<Value>) -> FakeApiserver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake apiserver");
        let addr = listener.local_addr().unwrap();
        let state: Shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let server = FakeApiserver { addr, state: Arc::clone(&state), stop: Arc::new(AtomicBool::new(false)) };
        for o in objects {
            server.apply(o);
        }
        let stop = Arc::clone(&server.stop);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let _ = serve(conn, &state, &stop);
                });
            }
        });
        server
    }

    /// Creates or replaces an object (watchers see ADDED or MODIFIED).
    pub fn apply(&self, v: Value) -> Value {
        let kind = kind_of(&v).unwrap_or_else(|| panic!("the fake apiserver does not serve {}", v["kind"]));
        let (lock, cv) = &*self.state;
        let stored = lock.lock().unwrap().store(key_of(kind, &v), v);
        cv.notify_all();
        stored
    }

    /// Deletes an object (watchers see DELETED).
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().remove(&(plural.into(), namespace.into(), name.into())).expect("deleting a stored object");
        cv.notify_all();
    }

    /// The stored objects of one kind.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let state = self.state.0.lock().unwrap();
        state.objects.iter().filter(|((p, _, _), _)| p == plural).map(|(_, v)| v.clone()).collect()
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap().requests.clone()
    }

    /// Waits until `pred` holds for the stored objects of `plural`.
    pub fn wait_for(&self, plural: &str, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let objects = self.objects(plural);
            if pred(&objects) {
                return objects;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; {plural}: {objects:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: default}}\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut length = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), decode(v))
        })
        .collect();
    Some(Request { method, path: path.to_string(), query, body })
}

/// Percent-decoding of a query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex =
            b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(w: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

/// Where a path points: the kind, the namespace (if any), the name (if any).
fn route(path: &str) -> Option<(&'static Kind, Option<String>, Option<String>)> {
    let rest = path.trim_start_matches('/');
    let kind_prefix = KINDS.iter().map(|k| k.prefix).find(|p| rest.starts_with(&format!("{p}/")))?;
    let segs: Vec<&str> = rest[kind_prefix.len() + 1..].split('/').collect();
    let (ns, plural, name) = match segs.as_slice() {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let kind = KINDS.iter().find(|k| k.prefix == kind_prefix && k.plural == plural)?;
    Some((kind, ns.map(str::to_string), name.map(str::to_string)))
}

/// Equality-based label selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`), as the agent sends them.
fn labels_match(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
        if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        }
    })
}

/// Field selectors on dotted paths (`spec.nodeName=worker`).
fn fields_match(selector: &str, v: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (path, want) = term.split_once('=').unwrap_or((term, ""));
        let got = path.split('.').try_fold(v, |v, p| v.get(p)).and_then(Value::as_str);
        got == Some(want)
    })
}

fn selected(req: &Request, kind: &Kind, ns: &Option<String>, key: &Key, v: &Value) -> bool {
    key.0 == kind.plural
        && ns.as_ref().is_none_or(|n| *n == key.1)
        && req.query.get("labelSelector").is_none_or(|s| labels_match(s, &v["metadata"]["labels"]))
        && req.query.get("fieldSelector").is_none_or(|s| fields_match(s, v))
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn serve(conn: TcpStream, state: &Shared, stop: &AtomicBool) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let Some(req) = read_request(&mut reader) else { return Ok(()) };
    let query: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let (lock, cv) = &**state;
    lock.lock().unwrap().requests.push(format!("{} {}?{}", req.method, req.path, query.join("&")));
    let Some((kind, ns, name)) = route(&req.path) else {
        return respond(
            &mut w,
            404,
            &status(404, "NotFound", format!("the server could not find the requested resource ({})", req.path)),
        );
    };
    let body: Option<Value> = serde_json::from_slice(&req.body).ok();
    match (req.method.as_str(), name) {
        ("GET", None) if req.query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let since: u64 = req.query.get("resourceVersion").and_then(|r| r.parse().ok()).unwrap_or(0);
            let timeout = req.query.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(290u64).min(290);
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )?;
            w.flush()?;
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let mut sent = since;
            let mut guard = lock.lock().unwrap();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let lines: Vec<String> = guard
                    .changes
                    .iter()
                    .filter(|c| c.rv > sent && selected(&req, kind, &ns, &c.key, &c.object))
                    .map(|c| json!({"type": c.type_, "object": c.object}).to_string() + "\n")
                    .collect();
                sent = guard.rv;
                drop(guard);
                for l in lines {
                    write!(w, "{:x}\r\n{l}\r\n", l.len())?;
                }
                w.flush()?;
                guard = lock.lock().unwrap();
                if guard.rv == sent {
                    guard = cv.wait_timeout(guard, Duration::from_millis(500)).unwrap().0;
                }
            }
            drop(guard);
            write!(w, "0\r\n\r\n")
        }
        ("GET", None) => {
            // Paginated as the API server does (`limit`, `continue`): clients see pages, never
            // the whole collection in one body.
            let s = lock.lock().unwrap();
            let all: Vec<&Value> =
                s.objects.iter().filter(|(k, v)| selected(&req, kind, &ns, k, v)).map(|(_, v)| v).collect();
            let start: usize = req.query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
            let limit: usize =
                req.query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
            let end = start.saturating_add(limit).min(all.len());
            let mut metadata = json!({"resourceVersion": s.rv.to_string()});
            if end < all.len() {
                metadata["continue"] = end.to_string().into();
            }
            let list = json!({
                "apiVersion": kind.api_version(), "kind": format!("{}List", kind.kind),
                "metadata": metadata, "items": all[start.min(end)..end],
            });
            drop(s);
            respond(&mut w, 200, &list)
        }
        ("GET", Some(name)) => {
            let key = (kind.plural.to_string(), ns.unwrap_or_default(), name.clone());
            match lock.lock().unwrap().objects.get(&key) {
                Some(v) => respond(&mut w, 200, v),
                None => respond(&mut w, 404, &status(404, "NotFound", format!("{} \"{name}\" not found", kind.plural))),
            }
        }
        ("POST", None) => {
            let Some(mut v) = body else {
                return respond(&mut w, 400, &status(400, "BadRequest", "no JSON body".into()));
            };
            if v["metadata"]["name"].is_null() {
                let prefix = v["metadata"]["generateName"].as_str().unwrap_or("obj-").to_string();
                let n = lock.lock().unwrap().rv + 1;
                v["metadata"]["name"] = format!("{prefix}{n:05}").into();
            }
            if let Some(ns) = &ns {
                v["metadata"]["namespace"] = ns.clone().into();
            }
            let key = key_of(kind, &v);
            let stored = lock.lock().unwrap().store(key, v);
            cv.notify_all();
            respond(&mut w, 201, &stored)
        }
        ("PATCH" | "PUT", Some(name)) => {
            let Some(patch) = body else {
                return respond(&mut w, 400, &status(400, "BadRequest", "no JSON body".into()));
            };
            let key = (kind.plural.to_string(), ns.clone().unwrap_or_default(), name.clone());
            let apply = req.query.contains_key("fieldManager") && req.method == "PATCH";
            let mut s = lock.lock().unwrap();
            let current = s.objects.get(&key).cloned();
            let next = match (current, req.method.as_str()) {
                (Some(mut cur), "PATCH") => {
                    merge(&mut cur, &patch);
                    cur
                }
                (None, "PATCH") if !apply => {
                    return respond(
                        &mut w,
                        404,
                        &status(404, "NotFound", format!("{} \"{name}\" not found", kind.plural)),
                    );
                }
                _ => patch,
            };
            let stored = s.store(key, next);
            drop(s);
            cv.notify_all();
            respond(&mut w, 200, &stored)
        }
        ("DELETE", Some(name)) => {
            let key = (kind.plural.to_string(), ns.unwrap_or_default(), name.clone());
            let removed = lock.lock().unwrap().remove(&key);
            cv.notify_all();
            match removed {
                Some(v) => respond(&mut w, 200, &v),
                None => respond(&mut w, 404, &status(404, "NotFound", format!("{} \"{name}\" not found", kind.plural))),
            }
        }
        _ => respond(&mut w, 405, &status(405, "MethodNotAllowed", format!("{} {}", req.method, req.path))),
    }
}
