//! A picture of a check report: the audited workload in the middle, each peer around it, one
//! arrow per flow from initiator to server, red where the policy cuts it, dashed where the
//! matrix does not expect it. As Graphviz DOT, and as a self-contained HTML page with inline SVG
//! (no tools needed to open it).

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    check::{FlowVerdict, Report},
    model::Direction,
};

struct Edge<'a> {
    v: &'a FlowVerdict,
    peer: String,
}

fn edges(r: &Report) -> (String, Vec<Edge<'_>>) {
    let mut workload = String::from("workload");
    let mut out = Vec::new();
    for v in &r.verdicts {
        let (w, p) = match v.direction {
            Direction::Egress => (&v.src, &v.dst),
            Direction::Ingress => (&v.dst, &v.src),
        };
        workload = w.identity.clone();
        // Line one: who; line two: the DNS names the workload resolved for it.
        let mut peer = format!("{} {}", p.identity, p.ip);
        if !p.names.is_empty() {
            peer = format!("{peer}\n{}", p.names.join(", "));
        }
        out.push(Edge { v, peer });
    }
    (workload, out)
}

fn label(v: &FlowVerdict) -> String {
    let port = v.dst.port.map(|p| format!("/{p}")).unwrap_or_default();
    let row = v.matrix.row.clone().unwrap_or_else(|| "unexpected".into());
    format!("{}{port} · {row}", v.protocol)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn dot(r: &Report, title: &str) -> String {
    let (workload, edges) = edges(r);
    let mut s = format!(
        "digraph flows {{\n  label=\"{}\";\n  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\"];\n",
        title.replace('"', "'")
    );
    let _ = writeln!(s, "  \"{}\" [style=filled, fillcolor=\"#dbeafe\"];", workload.replace('"', "'"));
    for e in &edges {
        let (from, to) = match e.v.direction {
            Direction::Egress => (&workload, &e.peer),
            Direction::Ingress => (&e.peer, &workload),
        };
        let color = if e.v.allowed { "#15803d" } else { "#dc2626" };
        let style = if e.v.matrix.unexpected { "dashed" } else { "solid" };
        let _ = writeln!(
            s,
            "  \"{}\" -> \"{}\" [label=\"{}{}\", color=\"{color}\", fontcolor=\"{color}\", style={style}];",
            from.replace('"', "'").replace('\n', "\\n"),
            to.replace('"', "'").replace('\n', "\\n"),
            label(e.v),
            if e.v.allowed { "" } else { " · CUT" }
        );
    }
    s += "}\n";
    s
}

pub fn html(r: &Report, title: &str) -> String {
    let (workload, edges) = edges(r);
    // One position per distinct peer, on a circle around the workload.
    let mut peers: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &edges {
        let n = peers.len();
        peers.entry(&e.peer).or_insert(n);
    }
    let (w, h) = (1400.0, 860.0);
    let (cx, cy, rx, ry) = (w / 2.0, h / 2.0, 440.0, 340.0);
    let pos = |i: usize| {
        let a = std::f64::consts::TAU * i as f64 / peers.len().max(1) as f64 - std::f64::consts::FRAC_PI_2;
        (cx + rx * a.cos(), cy + ry * a.sin())
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <defs><marker id=\"ok\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#15803d\"/></marker>\
         <marker id=\"cut\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#dc2626\"/></marker></defs>\n"
    );
    for (k, e) in edges.iter().enumerate() {
        let (px, py) = pos(peers[e.peer.as_str()]);
        let ((x1, y1), (x2, y2)) = match e.v.direction {
            Direction::Egress => ((cx, cy), (px, py)),
            Direction::Ingress => ((px, py), (cx, cy)),
        };
        // Stop short of the boxes.
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        let (sx, sy, ex, ey) = (x1 + dx / len * 60.0, y1 + dy / len * 30.0, x2 - dx / len * 60.0, y2 - dy / len * 30.0);
        let (color, marker) = if e.v.allowed { ("#15803d", "ok") } else { ("#dc2626", "cut") };
        let dash = if e.v.matrix.unexpected { " stroke-dasharray=\"6 4\"" } else { "" };
        let _ = writeln!(
            svg,
            "<line x1=\"{sx:.0}\" y1=\"{sy:.0}\" x2=\"{ex:.0}\" y2=\"{ey:.0}\" stroke=\"{color}\" stroke-width=\"2\"{dash} marker-end=\"url(#{marker})\"/>"
        );
        let (lx, ly) = ((sx + ex) / 2.0, (sy + ey) / 2.0 - 4.0 + (k % 2) as f64 * 14.0);
        let _ = writeln!(
            svg,
            "<text x=\"{lx:.0}\" y=\"{ly:.0}\" fill=\"{color}\" text-anchor=\"middle\">{}{}</text>",
            esc(&label(e.v)),
            if e.v.allowed { "" } else { " · CUT" }
        );
    }
    let node = |svg: &mut String, x: f64, y: f64, text: &str, fill: &str| {
        let lines: Vec<&str> = text.lines().collect();
        let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64 * 6.4 + 16.0;
        let height = 10.0 + 15.0 * lines.len() as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{:.0}\" y=\"{:.0}\" width=\"{width:.0}\" height=\"{height:.0}\" rx=\"5\" fill=\"{fill}\" stroke=\"#475569\"/>",
            x - width / 2.0,
            y - height / 2.0
        );
        for (i, line) in lines.iter().enumerate() {
            let ty = y - height / 2.0 + 17.0 + 15.0 * i as f64;
            let _ = writeln!(svg, "<text x=\"{x:.0}\" y=\"{ty:.0}\" text-anchor=\"middle\">{}</text>", esc(line));
        }
    };
    node(&mut svg, cx, cy, &workload, "#dbeafe");
    for (peer, i) in &peers {
        let (x, y) = pos(*i);
        node(&mut svg, x, y, peer, "#f8fafc");
    }
    svg += "</svg>\n";
    let mut rows = String::new();
    for v in &r.verdicts {
        let _ = writeln!(
            rows,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{} → {}</td><td>{}</td><td>{}</td></tr>",
            if v.allowed { "ok" } else { "cut" },
            v.index,
            v.direction,
            esc(&label(v)),
            esc(&format!("{} {}", v.src.identity, v.src.ip)),
            esc(&format!("{} {}", v.dst.identity, v.dst.ip)),
            if v.allowed { "allowed" } else { "CUT" },
            esc(&v.reason)
        );
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;margin:2em}} td{{padding:2px 8px;vertical-align:top}} tr.cut td{{color:#dc2626}}\
         </style></head><body>\n<h1>{t}</h1>\n<p>Green: allowed; red: cut by the policy; dashed: not expected by the \
         required-traffic matrix. Arrows point from the side that opened the connection.</p>\n{svg}\n<table>\n\
         <tr><th>#</th><th>direction</th><th>flow</th><th>from → to</th><th>verdict</th><th>why</th></tr>\n{rows}</table>\n</body></html>\n",
        t = esc(title)
    )
}
