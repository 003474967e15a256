//! `cargo xtask <command>`: the build plumbing. Every command bootstraps the eBPF toolchain
//! first (nightly rust-src, a bpf-linker built against the nightly's own LLVM), so each works on
//! a fresh machine of the kind DESIGN.md describes.

mod toolchain;

use xtask::controlplane;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command> [args...]

commands:
  demo [args] bootstrap, build, then run `netaudit demo` (root): the whole story in a lab on
              this machine; args go to the demo (e.g. --engine cilium --output-dir DIR)
  bootstrap   add rust-src to the nightly toolchain and build bpf-linker (cached under target/)
  build       bootstrap, then build target/release/netaudit with the eBPF object embedded
  test        bootstrap, then run the whole test suite (real-kernel tests need root)
  cluster up [--dir DIR]
              build (once, cached) and start a local Kubernetes control plane on loopback:
              etcd + kube-apiserver from their Go modules, TLS, RBAC, audit log; prints
              `kubeconfig: PATH` last and leaves both running (DIR: target/cluster)
  cluster down [--dir DIR]
              stop it and remove DIR
  cluster build
              only build kube-apiserver, kubectl and etcd (target/k8s/)
  bench [kernel|check|agent]
              bootstrap, then run the benchmarks and print the figures: `kernel` (the eBPF
              programs, root), `check` (flows x policies), `agent` (memory and start-up vs.
              cluster size, root); all when not named
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some(command) = args.first() else {
        eprint!("{USAGE}");
        bail!("no command given");
    };
    let rest = &args[1..];
    let root = workspace_root();
    match command.as_str() {
        "bootstrap" => {
            toolchain::bootstrap(&root)?;
        }
        "demo" => {
            toolchain::system_packages()?;
            let env = toolchain::bootstrap(&root)?;
            cargo(&root, &env, &["build", "--release", "--package", "netaudit-cli", "--bin", "netaudit"], &[])?;
            let bin = root.join("target/release/netaudit");
            say(&format!("running {} demo {}", bin.display(), rest.join(" ")));
            let status = Command::new(&bin).arg("demo").args(rest).status().context("running the demo")?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
        }
        "build" => {
            let env = toolchain::bootstrap(&root)?;
            cargo(&root, &env, &["build", "--release", "--package", "netaudit-cli", "--bin", "netaudit"], rest)?;
            say(&format!("built {}", root.join("target/release/netaudit").display()));
        }
        "test" => {
            toolchain::system_packages()?;
            let env = toolchain::bootstrap(&root)?;
            // The agent tests start private control planes from these binaries.
            controlplane::build(&root, &say)?;
            // The CLI tests run the real binary.
            cargo(&root, &env, &["build", "--release", "--package", "netaudit-cli", "--bin", "netaudit"], &[])?;
            // One profile for everything: the release build that `build` makes, so the
            // dependency graph compiles once on a small machine.
            cargo(&root, &env, &["test", "--release", "--workspace", "--exclude", "netaudit-ebpf"], rest)?;
        }
        "bench" => {
            let env = toolchain::bootstrap(&root)?;
            let which = rest.first().map(String::as_str);
            let bins: &[&str] = match which {
                None => &["netaudit-bench-check", "netaudit-bench", "netaudit-bench-agent"],
                Some("check") => &["netaudit-bench-check"],
                Some("kernel") => &["netaudit-bench"],
                Some("agent") => &["netaudit-bench-agent"],
                Some(other) => bail!("unknown benchmark `{other}`: use kernel, check or agent"),
            };
            // The agent benchmark runs the real binary.
            cargo(&root, &env, &["build", "--release", "--package", "netaudit-cli", "--bin", "netaudit"], &[])?;
            for bin in bins {
                cargo(&root, &env, &["run", "--release", "--package", "netaudit-tests", "--bin", bin], &[])?;
            }
        }
        "cluster" => cluster(&root, rest)?,
        "help" | "-h" | "--help" => eprint!("{USAGE}"),
        other => {
            eprint!("{USAGE}");
            bail!("unknown command `{other}`");
        }
    }
    Ok(())
}

/// `cluster up|down|build [--dir DIR]`.
fn cluster(root: &Path, args: &[String]) -> Result<()> {
    let (action, rest) = args.split_first().context("cluster: say `up`, `down` or `build`")?;
    let dir = match rest {
        [] => root.join("target/cluster"),
        [flag, dir] if flag == "--dir" => PathBuf::from(dir),
        _ => bail!("cluster {action}: unexpected arguments {rest:?} (only --dir DIR)"),
    };
    match action.as_str() {
        "build" => {
            toolchain::system_packages()?;
            controlplane::build(root, &say)?;
        }
        "up" => {
            toolchain::system_packages()?;
            let bins = controlplane::build(root, &say)?;
            say(&format!(
                "starting etcd {} and kube-apiserver {} in {}",
                bins.etcd_version,
                bins.kubernetes_version,
                dir.display()
            ));
            let started = std::time::Instant::now();
            let cp = controlplane::ControlPlane::start(&bins, &dir)?;
            say(&format!(
                "ready in {:.1?}: {} (audit log: {})",
                started.elapsed(),
                cp.server,
                cp.audit_log().display()
            ));
            say(&format!("kubectl: {}", bins.kubectl.display()));
            say(&format!(
                "stop it with `cargo xtask cluster down{}`",
                rest.iter().map(|a| format!(" {a}")).collect::<String>()
            ));
            println!("kubeconfig: {}", cp.kubeconfig().display());
            cp.detach();
        }
        "down" => controlplane::down(&dir, &say)?,
        other => bail!("cluster: unknown action `{other}` (up, down or build)"),
    }
    Ok(())
}

/// Runs cargo (stable, the workspace default) with the bootstrap's PATH.
fn cargo(root: &Path, env: &toolchain::Env, args: &[&str], extra: &[String]) -> Result<()> {
    say(&format!("cargo {} {}", args.join(" "), extra.join(" ")));
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
        .current_dir(root)
        .args(args)
        .args(extra)
        .env("PATH", &env.path)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub(crate) fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn workspace_root() -> PathBuf {
    controlplane::workspace_root()
}
