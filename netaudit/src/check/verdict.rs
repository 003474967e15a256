//! One resolved flow judged: at each of its targets (a Service's backends, or the recorded
//! destination), with the cutting ends, the reason and a fix merged into one verdict.

use std::collections::BTreeSet;

use super::{
    BackendVerdict, EndpointView, FlowVerdict, ServiceView,
    fix::{Cut, fix},
};
use crate::{
    inventory::Inventory,
    matrix::Classification,
    model::Direction,
    policy::{
        Engine,
        evaluate::{Conn, Evaluator, SideVerdict},
    },
    resolve::{Party, ResolvedFlow},
};

/// The policy verdict of `r`, with its matrix classification still to be filled in.
pub(super) fn judge(r: &ResolvedFlow<'_>, ev: &Evaluator<'_>, engine: Option<Engine>, inv: &Inventory) -> FlowVerdict {
    let f = r.flow;
    let mut out = FlowVerdict {
        index: r.index,
        protocol: f.protocol,
        src: view(&r.src, None, None),
        dst: view(&r.dst, f.dst.port, r.service.map(|s| s.service.id())),
        direction: r.direction,
        allowed: true,
        decided_by: Vec::new(),
        reason: String::new(),
        sides: Vec::new(),
        service: r.service.map(|s| ServiceView {
            service: s.service.id(),
            port: f.dst.port.unwrap_or(0),
            note: String::new(),
        }),
        backends: Vec::new(),
        matrix: Classification { row: None, also: Vec::new(), unexpected: false, why: None },
        fix: None,
    };
    if f.internal {
        out.reason = "both ends are inside the audited pod: no network policy applies".into();
        return out;
    }
    if let (Some(svc), Some(view)) = (r.service, out.service.as_mut()) {
        view.note = if svc.via_backends {
            let list: Vec<String> =
                r.targets.iter().map(|t| format!("{}:{}", t.party.ip, t.port.unwrap_or(0))).collect();
            format!(
                "ClusterIP {}:{} is judged at its backends {} (policy sees the backend after DNAT)",
                f.dst.ip,
                f.dst.port.unwrap_or(0),
                list.join(", ")
            )
        } else {
            let why = match svc.port {
                None => {
                    format!("{}/{} is not a port of Service {}", f.protocol, f.dst.port.unwrap_or(0), svc.service.id())
                }
                Some(_) => format!("Service {} has no ready endpoints in the inventory", svc.service.id()),
            };
            format!("{why}: judged against the ClusterIP itself, which policy engines do not match reliably")
        };
    }
    if r.via_backends() {
        judge_backends(&mut out, r, ev, engine, inv);
    } else {
        judge_single(&mut out, r, ev, engine, inv);
    }
    out
}

fn view(p: &Party<'_>, port: Option<u16>, service: Option<String>) -> EndpointView {
    EndpointView {
        ip: p.ip,
        port,
        identity: service.map(|s| format!("Service {s}")).unwrap_or_else(|| p.identity()),
        names: p.names.to_vec(),
    }
}

/// A flow that reached its recorded destination (no Service, or one without backends).
fn judge_single(
    out: &mut FlowVerdict,
    r: &ResolvedFlow<'_>,
    ev: &Evaluator<'_>,
    engine: Option<Engine>,
    inv: &Inventory,
) {
    let c = Conn { protocol: r.flow.protocol, src: r.src, dst: r.dst, port: r.flow.dst.port };
    let v = ev.judge(&c);
    out.allowed = v.allowed;
    if v.sides.is_empty() {
        out.reason = "no end of the connection is a pod: no policy applies".into();
    } else if v.allowed {
        out.decided_by = v.sides.iter().map(|s| s.side).collect();
        out.reason = v.sides.iter().map(|s| s.reason.as_str()).collect::<Vec<_>>().join("; ");
    } else {
        let cut: Vec<&SideVerdict> = v.sides.iter().filter(|s| !s.allowed).collect();
        out.decided_by = cut.iter().map(|s| s.side).collect();
        out.reason = cut.iter().map(|s| s.reason.as_str()).collect::<Vec<_>>().join("; ");
        let cut = Cut {
            engine,
            direction: r.direction,
            side: cut[0],
            src: &c.src,
            dst: &c.dst,
            protocol: c.protocol,
            port: c.port,
        };
        out.fix = Some(fix(&cut, inv));
    }
    out.sides = v.sides;
}

/// A Service flow, judged at every backend: cut when any backend cuts it (the dataplane may send
/// the next connection to that one).
fn judge_backends(
    out: &mut FlowVerdict,
    r: &ResolvedFlow<'_>,
    ev: &Evaluator<'_>,
    engine: Option<Engine>,
    inv: &Inventory,
) {
    let mut cut_reasons = Vec::new();
    let mut decided = BTreeSet::new();
    for t in &r.targets {
        let c = Conn { protocol: r.flow.protocol, src: r.src, dst: t.party, port: t.port };
        let v = ev.judge(&c);
        let port = t.port.unwrap_or(0);
        for s in v.sides.iter().filter(|s| !s.allowed) {
            decided.insert(s.side);
            cut_reasons.push(format!("backend {}:{port}: {}", t.party.ip, s.reason));
            if out.fix.is_none() {
                let cut = Cut {
                    engine,
                    direction: r.direction,
                    side: s,
                    src: &r.src,
                    dst: &t.party,
                    protocol: c.protocol,
                    port: t.port,
                };
                out.fix = Some(fix(&cut, inv));
            }
        }
        out.backends.push(BackendVerdict { ip: t.party.ip, port, identity: t.party.identity(), verdict: v });
    }
    out.allowed = cut_reasons.is_empty();
    if out.allowed {
        let first = &out.backends[0].verdict.sides;
        out.reason = first
            .first()
            .map(|s| s.reason.clone())
            .unwrap_or_else(|| "no end of the connection is a pod: no policy applies".into());
        out.decided_by = first.iter().map(|s| s.side).collect();
    } else {
        out.reason = cut_reasons.join("; ");
        out.decided_by = decided.into_iter().collect::<Vec<Direction>>();
    }
}
