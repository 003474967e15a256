//! The eBPF toolchain: the nightly's rust-src (for `-Z build-std=core`) and a bpf-linker linked
//! against the nightly's own libLLVM, so the linker reads exactly the bitcode rustc writes.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::say;

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What later cargo invocations need: a PATH that finds bpf-linker.
pub struct Env {
    pub path: OsString,
}

struct Nightly {
    commit: String,
    llvm_major: String,
    sysroot: PathBuf,
}

pub fn bootstrap(root: &Path) -> Result<Env> {
    let nightly = nightly()?;
    ensure_rust_src()?;
    let linker_dir = ensure_bpf_linker(root, &nightly)?;
    let bin = linker_dir.join("bin");
    let old = std::env::var_os("PATH").unwrap_or_default();
    // Unchanged when it already leads: a PATH that differs from one run to the next makes
    // cargo rebuild every crate whose build script watches it.
    let path = if std::env::split_paths(&old).next().is_some_and(|first| first == bin) {
        old
    } else {
        std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&old)))
            .context("PATH holds a directory with a `:` in its name")?
    };
    Ok(Env { path })
}

fn nightly() -> Result<Nightly> {
    let out = Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]).output().context(
        "running `rustc +nightly -vV`: is rustup installed? The eBPF crate needs a nightly toolchain \
         (fix: `rustup toolchain install nightly`)",
    )?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: `rustc +nightly -vV` failed: {} (fix: `rustup toolchain install nightly`)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("`rustc +nightly -vV` printed no `{name}` line; got:\n{text}"))
    };
    let commit = field("commit-hash:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_string();
    let out = Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    say(&format!("nightly rustc {} with LLVM {llvm}", &commit[..commit.len().min(9)]));
    Ok(Nightly { commit, llvm_major, sysroot })
}

fn ensure_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim().starts_with("rust-src")) {
        return Ok(());
    }
    say("adding rust-src to the nightly toolchain (needed for -Z build-std=core)");
    let status = Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]).status()?;
    if !status.success() {
        bail!("`rustup component add rust-src --toolchain nightly` failed; run it by hand and retry");
    }
    Ok(())
}

/// Builds bpf-linker once per nightly (keyed by commit and LLVM major) under target/.
fn ensure_bpf_linker(root: &Path, nightly: &Nightly) -> Result<PathBuf> {
    let key = format!("{}-llvm{}", &nightly.commit[..nightly.commit.len().min(12)], nightly.llvm_major);
    let dir = root.join("target").join("bpf-linker").join(key);
    let bin = dir.join("bin").join("bpf-linker");
    if bin.is_file() && Command::new(&bin).arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
        return Ok(dir);
    }

    // The nightly ships libLLVM.so.<ver>-rust-<version>; bpf-linker's build wants lib/libLLVM.so.
    let libdir = nightly.sysroot.join("lib");
    let lib = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{}", nightly.llvm_major)))
        .with_context(|| {
            format!(
                "the nightly at {} ships no libLLVM.so.{}*; bpf-linker needs the nightly's own LLVM \
                 (fix: reinstall the nightly with `rustup toolchain install nightly --force`)",
                libdir.display(),
                nightly.llvm_major
            )
        })?;
    let prefix = dir.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&lib), &link).with_context(|| format!("linking {}", link.display()))?;
    }

    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} into {} (once, ~1 min)",
        nightly.llvm_major,
        dir.display()
    ));
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{}", nightly.llvm_major)])
        .arg("--root")
        .arg(&dir)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running `cargo install bpf-linker`")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed; it needs crates.io and the nightly's libLLVM at {} \
             (does bpf-linker {BPF_LINKER_VERSION} offer the feature llvm-{}?)",
            libdir.join(&lib).display(),
            nightly.llvm_major
        );
    }
    Ok(dir)
}

/// The system tools the real-kernel tests and the demo lab use: `ip` (iproute2: network
/// namespaces, veth), `nft` (nftables: the lab's ClusterIP DNAT) and `openssl` (the local
/// control plane's certificates). Installed from Debian when
/// missing and we are root; otherwise the error says what to install.
pub fn system_packages() -> Result<()> {
    let have = |tool: &str| Command::new(tool).arg("-V").output().is_ok();
    let missing: Vec<&str> = [("ip", "iproute2"), ("nft", "nftables"), ("openssl", "openssl")]
        .into_iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root || Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "missing system packages {}: install them (e.g. apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    say(&format!(
        "installing {} from Debian (network namespaces, the lab's DNAT, the control plane's certificates)",
        missing.join(", ")
    ));
    let ok = |args: &[&str]| {
        Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status().is_ok_and(|s| s.success())
    };
    if !ok(&["update", "-qq"]) || !ok(&[&["install", "-y", "-qq"][..], &missing].concat()) {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
