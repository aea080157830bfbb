//! `cargo xtask setup`: makes the toolchain and the test peers present, idempotently.
//! Every step checks first and only acts (rustup, cargo install, apt-get) when the check fails,
//! so the no-op path costs a few process spawns.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cargo_cmd,
    util::{self, cargo_home, find_cmd, run_checked, stdout_of},
};

/// The bpf-linker release that builds against an external libLLVM (platform.md recipe).
const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

/// Commands the integration tests and benches drive, and the Debian packages providing them.
const PEER_CMDS: &[&str] = &[
    "nginx",
    "wrk",
    "curl",
    "h2load",
    "nghttp",
    "nghttpd",
    "hyperfine",
    "go",
    "pg_ctlcluster",
    "kcat",
];
const PEER_PKGS: &[&str] = &[
    "nginx",
    "wrk",
    "nghttp2-client",
    // nghttpd: a plain HTTP/2 (h2c) server for the HTTP/2 spans.
    "nghttp2-server",
    "curl",
    "openssl",
    "hyperfine",
    // Go net/http is one of the three runtimes of the propagation end-to-end test.
    "golang-go",
    // grpc-go 1.33 sources for GOPATH builds (the gRPC tests' Go server and client).
    "golang-google-grpc-dev",
    // A real PostgreSQL server: wire traffic must pass propagation untouched.
    "postgresql",
    // A Kafka client on the system librdkafka, older than confluent-kafka's (other API versions).
    "kcat",
];
/// Packages that install no command, checked by a path they install.
const PEER_PATHS: &[(&str, &str)] = &[(
    "/usr/share/gocode/src/google.golang.org/grpc",
    "golang-google-grpc-dev",
)];
/// Preinstalled on the platform; we only check them.
const PREINSTALLED: &[(&str, &str)] = &[
    ("python3", "install Python 3 (apt-get install python3)"),
    (
        "node",
        "install Node.js >= 20 (e.g. apt-get install nodejs)",
    ),
];

#[derive(Clone, Copy)]
pub struct Opts {
    /// Also install the Debian peers (nginx, wrk, ...) used by `test` and `bench`.
    pub peers: bool,
}

pub fn run(opts: Opts) -> Result<()> {
    let nightly = Nightly::detect()?;
    ensure_rust_src(&nightly)?;
    let linker = ensure_bpf_linker(&nightly)?;
    if opts.peers {
        ensure_peers()?;
    }
    ensure_tracefs();
    eprintln!(
        "setup: ok (nightly LLVM {}, rust-src, bpf-linker {linker}{})",
        nightly.llvm_major,
        if opts.peers { ", peers" } else { "" }
    );
    Ok(())
}

struct Nightly {
    sysroot: PathBuf,
    llvm_major: u32,
}

impl Nightly {
    fn detect() -> Result<Self> {
        if rustc_nightly(&["-vV"]).is_err() {
            eprintln!("setup: installing the {NIGHTLY} toolchain (rustup toolchain install)");
            run_checked(Command::new("rustup").args([
                "toolchain", "install", NIGHTLY, "--profile", "minimal", "--component", "rust-src",
            ]))
            .context("cannot install the nightly toolchain the eBPF crate needs: check rustup and network access")?;
        }
        let verbose = rustc_nightly(&["-vV"])?;
        let llvm_major = parse_llvm_major(&verbose).with_context(|| {
            format!("no `LLVM version: N.x` in `rustc +{NIGHTLY} -vV`:\n{verbose}")
        })?;
        let sysroot = PathBuf::from(rustc_nightly(&["--print", "sysroot"])?);
        Ok(Self {
            sysroot,
            llvm_major,
        })
    }
}

fn rustc_nightly(args: &[&str]) -> Result<String> {
    stdout_of(Command::new("rustc").arg(format!("+{NIGHTLY}")).args(args))
}

/// `LLVM version: 22.1.4` -> 22.
fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.trim().strip_prefix("LLVM version:"))?;
    version.trim().split('.').next()?.parse().ok()
}

fn ensure_rust_src(nightly: &Nightly) -> Result<()> {
    if nightly.sysroot.join("lib/rustlib/src").is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to {NIGHTLY} (the eBPF build uses -Z build-std=core)");
    run_checked(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("cannot add rust-src to the nightly toolchain: run `rustup component add rust-src --toolchain nightly` by hand")
}

// ---- bpf-linker ----

/// Makes sure bpf-linker runs and was built for the nightly's LLVM major; returns its version.
fn ensure_bpf_linker(nightly: &Nightly) -> Result<String> {
    let want = nightly.llvm_major;
    let reason = match installed_bpf_linker()? {
        Some((version, Some(major))) if major == want => return Ok(version),
        Some((version, Some(major))) => {
            format!("bpf-linker {version} is built for LLVM {major}, the {NIGHTLY} rustc uses LLVM {want}")
        }
        Some((version, None)) => {
            format!("cannot tell which LLVM bpf-linker {version} was built for")
        }
        None => "bpf-linker is missing or does not start (its libLLVM may be gone)".to_string(),
    };
    eprintln!("setup: {reason}");
    install_bpf_linker(nightly)?;
    match installed_bpf_linker()? {
        Some((version, _)) => Ok(version),
        None => bail!("bpf-linker was installed but `bpf-linker --version` still fails"),
    }
}

fn bpf_linker_path() -> Result<PathBuf> {
    Ok(find_cmd("bpf-linker").unwrap_or(cargo_home()?.join("bin/bpf-linker")))
}

/// (version, LLVM major if known) of a working bpf-linker, None when absent or broken.
fn installed_bpf_linker() -> Result<Option<(String, Option<u32>)>> {
    let Ok(out) = stdout_of(Command::new(bpf_linker_path()?).arg("--version")) else {
        return Ok(None);
    };
    // `bpf-linker 0.13.0`; the binary does not print its LLVM version.
    let version = out
        .split_whitespace()
        .nth(1)
        .unwrap_or("unknown")
        .to_string();
    let major = llvm_major_from_cargo_record()?.or(llvm_major_from_stamp(&version)?);
    Ok(Some((version, major)))
}

/// cargo records the features of every `cargo install` in $CARGO_HOME/.crates2.json;
/// bpf-linker's `llvm-N` feature is the LLVM it links.
fn llvm_major_from_cargo_record() -> Result<Option<u32>> {
    let Ok(text) = fs::read_to_string(cargo_home()?.join(".crates2.json")) else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let Some(installs) = json.get("installs").and_then(|v| v.as_object()) else {
        return Ok(None);
    };
    Ok(installs
        .iter()
        .filter(|(key, _)| key.starts_with("bpf-linker "))
        .flat_map(|(_, v)| {
            v.get("features")
                .and_then(|f| f.as_array())
                .into_iter()
                .flatten()
        })
        .filter_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
        .next())
}

fn stamp_path() -> Result<PathBuf> {
    Ok(llvm_prefix()?.join("stamp"))
}

/// Fallback record written by our own install: `llvm_major=22` and `bpf_linker=0.13.0` lines.
fn llvm_major_from_stamp(version: &str) -> Result<Option<u32>> {
    let Ok(text) = fs::read_to_string(stamp_path()?) else {
        return Ok(None);
    };
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
    };
    if field("bpf_linker") != Some(version) {
        return Ok(None);
    }
    Ok(field("llvm_major").and_then(|m| m.trim().parse().ok()))
}

/// Where bpf-linker's build finds libLLVM (LLVM_PREFIX/lib): symlinks to the nightly's own copy,
/// because Debian has no matching LLVM dev package.
fn llvm_prefix() -> Result<PathBuf> {
    Ok(cargo_home()?.join("bpf-linker-llvm"))
}

fn install_bpf_linker(nightly: &Nightly) -> Result<()> {
    let major = nightly.llvm_major;
    let version =
        std::env::var("ZEROTEL_BPF_LINKER_VERSION").unwrap_or_else(|_| BPF_LINKER_VERSION.into());
    let prefix = llvm_prefix()?;
    link_nightly_libllvm(&nightly.sysroot, &prefix.join("lib"))?;
    eprintln!(
        "setup: installing bpf-linker {version} (feature llvm-{major}, LLVM_PREFIX={}); takes about 70 s",
        prefix.display()
    );
    let feature = format!("llvm-{major}");
    let mut cmd = cargo_cmd::cargo();
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        &version,
        "--locked",
        "--force",
    ])
    .args(["--no-default-features", "--features", &feature])
    .env("LLVM_PREFIX", &prefix);
    run_checked(&mut cmd).with_context(|| {
        format!(
            "installing bpf-linker failed. Check network access to crates.io and that bpf-linker \
             {version} has the feature `{feature}` (a newer nightly LLVM may need a newer bpf-linker: \
             set ZEROTEL_BPF_LINKER_VERSION=<version> and rerun `cargo xtask setup`)"
        )
    })?;
    let stamp = format!("llvm_major={major}\nbpf_linker={version}\n");
    fs::write(stamp_path()?, stamp).context("cannot write the bpf-linker stamp file")
}

/// `$prefix/libLLVM.so` and `$prefix/<soname>` -> `$sysroot/lib/libLLVM.so.<...>`.
fn link_nightly_libllvm(sysroot: &Path, prefix_lib: &Path) -> Result<()> {
    let lib_dir = sysroot.join("lib");
    let soname = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.contains(".so"))
        .with_context(|| {
            format!(
                "no libLLVM in {}: reinstall the nightly toolchain",
                lib_dir.display()
            )
        })?;
    fs::create_dir_all(prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link); // replace a stale link to an older nightly
        std::os::unix::fs::symlink(lib_dir.join(&soname), &link)
            .with_context(|| format!("cannot create the symlink {}", link.display()))?;
    }
    Ok(())
}

// ---- cargo-fuzz ----

/// The cargo-fuzz release `cargo xtask fuzz` installs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Makes sure `cargo +nightly fuzz` runs, installing cargo-fuzz with the nightly when it does not.
pub fn ensure_cargo_fuzz() -> Result<()> {
    Nightly::detect()?;
    if cargo_fuzz_runs() {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install, with {NIGHTLY}); takes a few minutes");
    let mut install = Command::new("cargo");
    install.args([
        &format!("+{NIGHTLY}"),
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]);
    run_checked(&mut install).context(
        "installing cargo-fuzz failed: check network access to crates.io, or install it by hand \
         (cargo +nightly install cargo-fuzz --locked)",
    )?;
    if !cargo_fuzz_runs() {
        bail!("cargo-fuzz was installed but `cargo +{NIGHTLY} fuzz --version` still fails");
    }
    Ok(())
}

fn cargo_fuzz_runs() -> bool {
    Command::new("cargo")
        .args([&format!("+{NIGHTLY}"), "fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

// ---- Debian peers ----

fn ensure_peers() -> Result<()> {
    for (cmd, hint) in PREINSTALLED {
        if find_cmd(cmd).is_none() {
            bail!("`{cmd}` is not installed: {hint}");
        }
    }
    ensure_pip_peers()?;
    let mut missing: Vec<&str> = PEER_CMDS
        .iter()
        .copied()
        .filter(|c| find_cmd(c).is_none())
        .collect();
    missing.extend(missing_peer_paths());
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "setup: missing {}: installing {} with apt-get",
        missing.join(", "),
        PEER_PKGS.join(" ")
    );
    apt_install().context(
        "installing the test peers with apt-get failed: check network access to the Debian mirrors, \
         or install them by hand: apt-get install nginx wrk nghttp2-client nghttp2-server curl openssl hyperfine \
         golang-go golang-google-grpc-dev postgresql kcat",
    )?;
    let mut still: Vec<&str> = PEER_CMDS
        .iter()
        .copied()
        .filter(|c| find_cmd(c).is_none())
        .collect();
    still.extend(missing_peer_paths());
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

/// The packages of [`PEER_PATHS`] whose path is missing.
fn missing_peer_paths() -> impl Iterator<Item = &'static str> {
    PEER_PATHS
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, package)| *package)
}

/// Commands installed from PyPI, checked by presence on PATH: kubernetes-validate validates the
/// deploy/ manifests offline against real Kubernetes schemas.
const PIP_PEERS: &[(&str, &str)] = &[("kubernetes-validate", "kubernetes-validate==1.37.0")];
/// Python modules installed from PyPI, checked by `python3` finding them: psycopg 3 is the Python
/// PostgreSQL client of the tests (plain, not `[binary]`: it loads the system libpq5 that comes
/// with postgresql). There is no Kafka broker package: confluent-kafka's bundled librdkafka holds
/// a mock cluster, a real Kafka-protocol broker, and is also a client; kafka-python is the pure
/// Python client, in 2.x (3.x cannot talk to the mock broker). grpcio is the Python gRPC server
/// and client of the gRPC tests (raw-bytes handlers: no grpcio-tools or protoc needed).
const PIP_MODULES: &[(&str, &str)] = &[
    ("psycopg", "psycopg==3.3.9"),
    ("confluent_kafka", "confluent-kafka==2.16.1"),
    ("kafka", "kafka-python==2.3.3"),
    ("grpc", "grpcio==1.85.1"),
];

fn ensure_pip_peers() -> Result<()> {
    for (cmd, requirement) in PIP_PEERS {
        if find_cmd(cmd).is_some() {
            continue;
        }
        eprintln!("setup: missing {cmd}: installing {requirement} with pip");
        pip_install(requirement)?;
        if find_cmd(cmd).is_none() {
            bail!(
                "{cmd} is still not on PATH after pip install: add pip's script directory to PATH"
            );
        }
    }
    for (module, requirement) in PIP_MODULES {
        if python_finds_module(module)? {
            continue;
        }
        eprintln!(
            "setup: python3 cannot find the module {module}: installing {requirement} with pip"
        );
        pip_install(requirement)?;
        if !python_finds_module(module)? {
            bail!(
                "python3 still cannot find the module {module} after pip install: \
                 check which python3 pip installed into"
            );
        }
    }
    Ok(())
}

fn pip_install(requirement: &str) -> Result<()> {
    run_checked(Command::new("python3").args(["-m", "pip", "install", "--quiet", requirement])).with_context(|| {
        format!("installing {requirement} with pip failed: install it by hand (python3 -m pip install '{requirement}')")
    })
}

/// Whether `python3` finds `module`, without importing it: importing psycopg loads libpq, which
/// apt installs only after the pip peers.
fn python_finds_module(module: &str) -> Result<bool> {
    let script =
        "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)";
    let status = util::status_of(Command::new("python3").args(["-c", script, module]))?;
    Ok(status.success())
}

fn apt_install() -> Result<()> {
    run_checked(util::as_root("apt-get")?.arg("update"))?;
    let mut install = util::as_root("apt-get")?;
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(PEER_PKGS);
    run_checked(&mut install)
}

// ---- tracefs ----

const TRACEFS: &str = "/sys/kernel/tracing";

/// aya's tracepoint attach needs tracefs; the agent mounts it too, so failure only warns.
fn ensure_tracefs() {
    if tracefs_mounted() {
        return;
    }
    if !util::is_root() {
        eprintln!(
            "setup: note: tracefs is not mounted at {TRACEFS}; the agent (run as root) mounts it"
        );
        return;
    }
    eprintln!("setup: mounting tracefs at {TRACEFS}");
    if let Err(e) = mount_tracefs() {
        eprintln!("setup: warning: cannot mount tracefs at {TRACEFS}: {e:#}");
    }
}

fn tracefs_mounted() -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&TRACEFS) && f.get(2) == Some(&"tracefs")
            })
        })
        .unwrap_or(false)
}

fn mount_tracefs() -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).context("path with NUL");
    let (src, target, fstype) = (c("tracefs")?, c(TRACEFS)?, c("tracefs")?);
    // SAFETY: valid NUL-terminated strings, null data is allowed for tracefs.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0"), None);
    }
}
