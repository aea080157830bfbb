//! zerotel's developer tasks: `cargo xtask <setup|build|run|test|fuzz|bench>` (alias in .cargo/config.toml).

mod bench;
mod cargo_cmd;
mod fuzz;
mod run;
mod setup;
mod signals;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "zerotel developer tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker, nginx/wrk/...); fast when already done.
    Setup,
    /// Build the agent (`cargo build -p zerotel`) and print the binary's path.
    Build {
        /// Optimized build (target/release).
        #[arg(long)]
        release: bool,
    },
    /// Build and run the agent as root: `cargo xtask run [--release] -- [agent args]`.
    Run {
        /// Run the optimized build.
        #[arg(long)]
        release: bool,
        /// Arguments for the agent.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Unit tests, then the integration tests against the built agent:
    /// `cargo xtask test [-- CARGO_TEST_ARGS [-- TEST_BINARY_ARGS]]`.
    Test {
        /// Seconds each fuzz target runs between the unit and integration tests (0: none).
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        fuzz_seconds: u64,
        /// Passed to both `cargo test` runs; after a second `--`, to the test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets of the parsers (nightly; installs cargo-fuzz on first use):
    /// `cargo xtask fuzz [TARGET...] [--seconds N] [-- LIBFUZZER_ARGS]`.
    Fuzz(fuzz::FuzzArgs),
    /// Traced-vs-untraced benchmarks (root): `cargo xtask bench [NAME...] [--rounds N] ...`.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().cmd) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Setup => setup::run(setup::Opts { peers: true }).map(|()| 0),
        Cmd::Build { release } => {
            setup::run(setup::Opts { peers: false })?;
            let exe = cargo_cmd::build_agent(release)?;
            println!("{}", exe.display());
            Ok(0)
        }
        Cmd::Run { release, args } => run::run(release, &args),
        Cmd::Test { fuzz_seconds, args } => test::run(fuzz_seconds, &args),
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::Bench(args) => bench::run(args).map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
            .unwrap()
            .cmd
    }

    #[test]
    fn trailing_args_keep_inner_separator() {
        let Cmd::Test { fuzz_seconds, args } = parse(&["test", "--", "spans", "--", "--nocapture"])
        else {
            panic!()
        };
        assert_eq!(args, ["spans", "--", "--nocapture"]);
        assert_eq!(fuzz_seconds, fuzz::TEST_SECONDS);
        let Cmd::Run { release, args } = parse(&["run", "--release", "--", "--pid", "1"]) else {
            panic!()
        };
        assert!(release);
        assert_eq!(args, ["--pid", "1"]);
    }

    #[test]
    fn fuzz_args() {
        let Cmd::Fuzz(f) = parse(&[
            "fuzz",
            "kafka",
            "http2",
            "--seconds",
            "600",
            "--",
            "-max_len=9",
        ]) else {
            panic!()
        };
        assert_eq!(
            (f.targets, f.seconds),
            (vec!["kafka".to_string(), "http2".into()], 600)
        );
        assert_eq!(f.libfuzzer_args, ["-max_len=9"]);
        let Cmd::Fuzz(f) = parse(&["fuzz"]) else {
            panic!()
        };
        assert_eq!((f.targets.len(), f.seconds), (0, fuzz::DEFAULT_SECONDS));
    }

    #[test]
    fn bench_defaults() {
        let Cmd::Bench(b) = parse(&["bench", "http"]) else {
            panic!()
        };
        assert_eq!(
            (b.rounds, b.duration, b.connections, b.threads),
            (3, 10, 50, 2)
        );
        assert_eq!(b.names, ["http"]);
    }
}
