//! The agent's two HTTP listeners (hyper): `/metrics`, `/healthz` and `/readyz` for Prometheus and the
//! kubelet, and — on a separate, loopback-bound listener for `kubectl port-forward` — the flows
//! themselves (`/flows`, `/flows/<namespace>/<pod>`, `/report`), read-only. Flow data is
//! sensitive, so it never shares the port the cluster can reach.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
};

use anyhow::Context;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

use super::judge::Judge;
use crate::model::FlowFile;

/// What the listeners serve, replaced by the agent's loop after each look. Serialized when
/// asked for: a look at a full flow map must not pay for JSON nobody reads.
#[derive(Default)]
pub struct Published {
    /// All audited pods' flows.
    pub flows: Arc<FlowFile>,
    /// Per pod (`namespace/name`): the cgroups its flows are under (in `flows`).
    pub pods: BTreeMap<String, Vec<String>>,
    /// Watch mode: the judge, whose verdicts make the report.
    pub judge: Option<Arc<Mutex<Judge>>>,
    /// Why the agent is not ready (its first lists have not arrived), if it is not.
    pub not_ready: Option<String>,
    /// When the agent's loop last went round: `/healthz` fails when it is stuck.
    pub last_loop: Option<std::time::Instant>,
}

/// A loop that has not gone round for this long is stuck.
const STUCK: std::time::Duration = std::time::Duration::from_secs(60);

pub type Shared = Arc<RwLock<Published>>;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn metrics_route(path: &str, registry: &Registry, shared: &Shared) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding metrics: {e}\n")),
            }
        }
        "/healthz" => match shared.read().expect("not poisoned").last_loop {
            Some(t) if t.elapsed() < STUCK => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            _ => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "the agent's loop is not running\n".into()),
        },
        "/readyz" => match &shared.read().expect("not poisoned").not_ready {
            None => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

fn flows_route(path: &str, shared: &Shared) -> Response<Full<Bytes>> {
    let p = shared.read().expect("not poisoned");
    let json = "application/json";
    match path {
        "/flows" => reply(StatusCode::OK, json, p.flows.to_json()),
        "/report" => {
            let report = p.judge.as_ref().map(|j| j.lock().expect("not poisoned").report(&p.flows));
            match report {
                Some(Some(r)) => match serde_json::to_string_pretty(&r) {
                    Ok(text) => reply(StatusCode::OK, json, text + "\n"),
                    Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
                },
                Some(None) => reply(StatusCode::NOT_FOUND, "text/plain", "no report yet: nothing judged\n".into()),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "no report: the agent judges flows in --mode watch only\n".into(),
                ),
            }
        }
        _ => match path.strip_prefix("/flows/").and_then(|id| p.pods.get(id)) {
            Some(cgroups) => reply(StatusCode::OK, json, p.flows.of_cgroups(cgroups).to_json()),
            None => {
                let pods: Vec<&str> = p.pods.keys().map(String::as_str).collect();
                reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("not found: /flows, /flows/<namespace>/<pod> (audited: {}), /report\n", pods.join(", ")),
                )
            }
        },
    }
}

/// Binds both listeners now (a port in use is an error at start, not later) and serves them on
/// the current runtime.
pub async fn serve(
    metrics: SocketAddr,
    flows: SocketAddr,
    registry: Arc<Registry>,
    shared: Shared,
) -> anyhow::Result<()> {
    let m =
        tokio::net::TcpListener::bind(metrics).await.with_context(|| format!("listening on {metrics} (--listen)"))?;
    let f =
        tokio::net::TcpListener::bind(flows).await.with_context(|| format!("listening on {flows} (--flows-listen)"))?;
    tracing::info!("metrics on http://{metrics}/metrics, flows on http://{flows}/flows");
    let s = shared.clone();
    spawn_listener(m, move |path| metrics_route(path, &registry, &s));
    spawn_listener(f, move |path| flows_route(path, &shared));
    Ok(())
}

fn spawn_listener<F>(listener: tokio::net::TcpListener, route: F)
where
    F: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let route = Arc::new(route);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let route = Arc::clone(&route);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let route = Arc::clone(&route);
                    async move {
                        Ok::<_, Infallible>(if req.method() == hyper::Method::GET {
                            route(req.uri().path())
                        } else {
                            reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "read-only: GET only\n".into())
                        })
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}
