//! Builds the eBPF object (netaudit-ebpf's bin, for bpfel-unknown-none on the nightly) into
//! OUT_DIR, where `capture` embeds it. Needs bpf-linker on PATH: `cargo xtask build` provides it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.parent().context("workspace root")?.join("netaudit-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var_os("AYA_BUILD_SKIP").is_none() && which("bpf-linker").is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH; the eBPF programs cannot be linked. \
             Build through `cargo xtask build` / `cargo xtask test`, which bootstrap it \
             (or put target/bpf-linker/<nightly>/bin on PATH)"
        ));
    }
    let package = aya_build::Package {
        name: "netaudit-ebpf",
        root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}
