//! Builds the eBPF programs (ebpf/probes) with the nightly toolchain and bpf-linker, so the agent
//! embeds them. `cargo xtask setup` installs what this needs.
//!
//! `AYA_BUILD_SKIP=1` skips that build (aya-build's switch): the fuzz targets set it, as they
//! link the agent's library but never load programs. An empty object then stands in for the
//! programs, so the library still compiles; an agent built so fails to load them.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/probes");
    println!("cargo:rerun-if-changed={}", concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/abi"));
    aya_build::build_ebpf(
        [aya_build::Package { name: "zerotel-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )?;
    let object = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?).join("zerotel");
    if !object.exists() {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}
