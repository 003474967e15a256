//! `cargo xtask <command>`: the build plumbing. Every command bootstraps the eBPF toolchain
//! first (nightly rust-src, a bpf-linker built against the nightly's own LLVM), so each works on
//! a fresh machine of the kind DESIGN.md describes.

mod toolchain;

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
            cargo(&root, &env, &["build", "--release", "--package", "netaudit", "--bin", "netaudit"], &[])?;
            let bin = root.join("target/release/netaudit");
            say(&format!("running {} demo {}", bin.display(), rest.join(" ")));
            let status = Command::new(&bin).arg("demo").args(rest).status().context("running the demo")?;
            if !status.success() {
                bail!("the demo failed ({status})");
            }
        }
        "build" => {
            let env = toolchain::bootstrap(&root)?;
            cargo(&root, &env, &["build", "--release", "--package", "netaudit", "--bin", "netaudit"], rest)?;
            say(&format!("built {}", root.join("target/release/netaudit").display()));
        }
        "test" => {
            toolchain::system_packages()?;
            let env = toolchain::bootstrap(&root)?;
            // The CLI tests run the real binary.
            cargo(&root, &env, &["build", "--release", "--package", "netaudit", "--bin", "netaudit"], &[])?;
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
            cargo(&root, &env, &["build", "--release", "--package", "netaudit", "--bin", "netaudit"], &[])?;
            for bin in bins {
                cargo(&root, &env, &["run", "--release", "--package", "netaudit-tests", "--bin", bin], &[])?;
            }
        }
        "help" | "-h" | "--help" => eprint!("{USAGE}"),
        other => {
            eprint!("{USAGE}");
            bail!("unknown command `{other}`");
        }
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
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}
