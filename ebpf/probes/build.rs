//! bpf-linker must be on PATH: `cargo xtask setup` installs it. Fail early with that hint.
fn main() {
    if which::which("bpf-linker").is_err() {
        println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`");
    }
}
