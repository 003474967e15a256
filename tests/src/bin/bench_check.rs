//! `cargo xtask bench check`: how fast `check` judges flows, against a baseline in the same run.
//!
//! A synthetic cluster (100 namespaces × 20 pods, 100 Services with EndpointSlices, 10 nodes) and
//! 1 000 NetworkPolicies (10 per namespace: pod selectors with matchExpressions, namespace
//! selectors, ipBlocks with except, numeric and named ports, endPort ranges), and 100 000 flows
//! (pod→pod, pod→Service ClusterIP, pod→external, node→pod), generated deterministically.
//! Each round runs the whole `Check::run` (enrichment, Service translation, evaluation, matrix,
//! lint) with the 1 000 policies and, as the baseline, with none. Median of 5 rounds.
//! No root needed.

use std::time::Instant;

use anyhow::Result;
use netaudit::{check::Check, inventory::Inventory, matrix::Matrix, policy};
use netaudit_tests::synthetic::{FLOWS, Lcg, NAMESPACES, cluster, flows};

const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut rng = Lcg(42);
    let docs = cluster(&mut rng);
    let t = Instant::now();
    let (inv, rest) = Inventory::from_documents(docs)?;
    let (policies, _) = policy::from_documents(rest)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let flows = flows(&mut rng);
    let matrix = Matrix::default_matrix();
    let run = |policies: &[policy::Policy]| -> Result<(f64, usize)> {
        let check = Check { inventory: &inv, policies, chart: None, matrix: &matrix };
        let t = Instant::now();
        let report = check.run(&flows)?;
        Ok((t.elapsed().as_secs_f64(), report.summary.cut))
    };
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut cut = 0;
    for _ in 0..ROUNDS {
        let (s, c) = run(&[])?;
        without.push(s);
        let (s, c2) = run(&policies)?;
        with.push(s);
        assert_eq!(c, 0, "no policy cuts nothing");
        cut = c2;
    }
    let (w, wo) = (median(with), median(without));
    println!("netaudit bench check — {} CPUs, median of {ROUNDS} rounds", std::thread::available_parallelism()?.get());
    println!();
    println!(
        "  cluster: {} pods, {} namespaces, 100 Services, 10 nodes; {} policies (built in {load_ms:.0} ms)",
        inv.pods.len(),
        NAMESPACES,
        policies.len()
    );
    println!("  flows:   {FLOWS} (50% pod→pod, 20% pod→ClusterIP, 20% pod→external, 10% node→pod)");
    println!();
    println!("  check, no policies (baseline)   {:>8.0} ms   {:>10.0} flows/s", wo * 1e3, FLOWS as f64 / wo);
    println!(
        "  check, {} policies            {:>8.0} ms   {:>10.0} flows/s   ({cut} cut)",
        policies.len(),
        w * 1e3,
        FLOWS as f64 / w
    );
    println!(
        "  cost of the policies            {:>8.0} ms   ({:.2} µs per flow)",
        (w - wo) * 1e3,
        (w - wo) / FLOWS as f64 * 1e6
    );
    Ok(())
}
