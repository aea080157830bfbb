//! Builds the eBPF programs (ebpf/probes) with the nightly toolchain and bpf-linker, so the agent
//! embeds them. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/probes");
    println!("cargo:rerun-if-changed={}", concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/abi"));
    aya_build::build_ebpf(
        [aya_build::Package { name: "zerotel-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
