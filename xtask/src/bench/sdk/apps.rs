//! The two apps of `bench sdk` and the SDK each is compared with: installing the runtime
//! packages once under the target dir (never into the system's Python or Node), and starting an
//! app as it is or under its SDK's auto-instrumentation.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::{
    bench::{
        http1,
        proc::{self, children_of, free_port, Guard},
    },
    signals,
    util::{self, display, find_cmd, run_checked},
};

const FLASK_APP: &str = include_str!("app.py");
const NODE_APP: &str = include_str!("app.js");

/// Pinned, so every run measures the same SDK; bump together (distro, instrumentation and SDK
/// versions are released in lockstep: instrumentation 0.66b1 goes with SDK 1.45.1).
const PYTHON_REQUIREMENTS: &[&str] = &[
    "flask==3.1.3",
    "gunicorn==23.0.0",
    "opentelemetry-sdk==1.45.1",
    "opentelemetry-distro==0.66b1",
    "opentelemetry-exporter-otlp-proto-http==1.45.1",
    "opentelemetry-instrumentation-flask==0.66b1",
];
/// The newest auto-instrumentations-node that still runs on Node 20 (0.82 wants Node >= 22.15);
/// the other two are its peer dependencies.
const NODE_PACKAGES: &[&str] = &[
    "@opentelemetry/auto-instrumentations-node@0.81.2",
    "@opentelemetry/api@1.9.1",
    "@opentelemetry/core@2.12.1",
];
/// What `node --require` preloads: the SDK set up from OTEL_* variables, every instrumentation on.
const NODE_REGISTER: &str = "@opentelemetry/auto-instrumentations-node/register";
/// Written after a successful install: the package list it installed.
const STAMP: &str = ".zerotel-bench-installed";

/// Longest wait for an app to answer its first request (the SDKs import a lot at start-up).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an app may take to exit after SIGTERM (the SDKs flush their last spans then).
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The one route both apps serve.
pub const PATH: &str = "/users/42";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flask,
    Node,
}

pub struct App {
    pub kind: Kind,
    /// Its runtime packages: the venv, or the npm prefix.
    install_dir: PathBuf,
    /// Its source, written from the copy embedded in xtask.
    source: PathBuf,
}

/// How one app's install went.
#[derive(Serialize)]
pub struct Install {
    pub app: &'static str,
    pub dir: PathBuf,
    /// Seconds spent installing; None when everything was already there.
    pub seconds: Option<f64>,
    pub packages: &'static [&'static str],
    /// `Python 3.11.7`, `node v20.20.2`.
    pub runtime: String,
}

impl App {
    /// The app of `kind`, its source written to `work_dir`, its packages under `bench_dir`.
    pub fn new(kind: Kind, bench_dir: &Path, work_dir: &Path) -> Result<Self> {
        let (dir, file, text) = match kind {
            Kind::Flask => ("sdk-venv", "app.py", FLASK_APP),
            Kind::Node => ("sdk-node", "app.js", NODE_APP),
        };
        let source = work_dir.join(file);
        fs::write(&source, text).with_context(|| format!("cannot write {}", source.display()))?;
        Ok(Self {
            kind,
            install_dir: bench_dir.join(dir),
            source,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Flask => "flask",
            Kind::Node => "node",
        }
    }

    /// The SDK this app is compared with, as a user would name it.
    pub fn sdk_name(&self) -> &'static str {
        match self.kind {
            Kind::Flask => "opentelemetry-instrument (OpenTelemetry Python)",
            Kind::Node => "@opentelemetry/auto-instrumentations-node",
        }
    }

    /// What serves the app.
    pub fn server_name(&self) -> &'static str {
        match self.kind {
            Kind::Flask => "Flask under gunicorn (1 sync worker)",
            Kind::Node => "Node `http` module",
        }
    }

    fn packages(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Flask => PYTHON_REQUIREMENTS,
            Kind::Node => NODE_PACKAGES,
        }
    }

    // ---- install ----

    /// Installs the app's packages unless the last install left exactly these; timed, so the
    /// report can say what a first run costs.
    pub fn install(&self) -> Result<Install> {
        let packages = self.packages();
        let seconds = if self.installed()? {
            None
        } else {
            eprintln!(
                "bench sdk: installing {} into {}",
                packages.join(" "),
                self.install_dir.display()
            );
            let started = Instant::now();
            match self.kind {
                Kind::Flask => self.install_python(),
                Kind::Node => self.install_node(),
            }?;
            fs::write(self.install_dir.join(STAMP), stamp(packages))?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "bench sdk: installed the {} packages in {seconds:.1} s",
                self.name()
            );
            Some(seconds)
        };
        Ok(Install {
            app: self.name(),
            dir: self.install_dir.clone(),
            seconds,
            packages,
            runtime: self.runtime_version(),
        })
    }

    fn installed(&self) -> Result<bool> {
        let marker = match self.kind {
            Kind::Flask => self.venv_bin("opentelemetry-instrument"),
            Kind::Node => self
                .install_dir
                .join("node_modules/@opentelemetry/auto-instrumentations-node/package.json"),
        };
        let recorded = fs::read_to_string(self.install_dir.join(STAMP)).unwrap_or_default();
        Ok(marker.exists() && recorded == stamp(self.packages()))
    }

    fn install_python(&self) -> Result<()> {
        if !self.venv_bin("python").exists() {
            run_checked(
                Command::new("python3")
                    .arg("-m")
                    .arg("venv")
                    .arg(&self.install_dir),
            )
            .with_context(|| {
                format!(
                    "cannot create the venv {} (Debian: apt-get install python3-venv)",
                    self.install_dir.display()
                )
            })?;
        }
        let mut pip = Command::new(self.venv_bin("python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_REQUIREMENTS);
        run_checked(&mut pip).with_context(|| {
            format!(
                "installing the OpenTelemetry Python SDK, Flask and gunicorn into {} failed: \
                 pip needs network access to PyPI (the bench installs them on its first run)",
                self.install_dir.display()
            )
        })
    }

    fn install_node(&self) -> Result<()> {
        let npm = find_cmd("npm").context("npm is not installed (it comes with Node.js)")?;
        fs::create_dir_all(&self.install_dir)
            .with_context(|| format!("cannot create {}", self.install_dir.display()))?;
        let mut cmd = Command::new(npm);
        cmd.arg("install")
            .arg("--prefix")
            .arg(&self.install_dir)
            .args(["--no-audit", "--no-fund", "--loglevel=error"])
            .args(NODE_PACKAGES);
        run_checked(&mut cmd).with_context(|| {
            format!(
                "installing @opentelemetry/auto-instrumentations-node into {} failed: npm needs \
                 network access to registry.npmjs.org (the bench installs it on its first run)",
                self.install_dir.display()
            )
        })
    }

    fn venv_bin(&self, name: &str) -> PathBuf {
        self.install_dir.join("bin").join(name)
    }

    fn runtime_version(&self) -> String {
        let (program, arg) = match self.kind {
            Kind::Flask => (self.venv_bin("python"), "--version"),
            Kind::Node => ("node".into(), "--version"),
        };
        let version = util::any_output_of(&program, &[arg]).unwrap_or_else(|| "unknown".into());
        match self.kind {
            Kind::Flask => version,
            Kind::Node => format!("node {version}"),
        }
    }

    // ---- running ----

    /// The app on 127.0.0.1:`port`; under its SDK exporting OTLP/HTTP to `sdk_endpoint` when
    /// given. OTEL_* variables of xtask's own environment are dropped: only what the bench
    /// sets configures the SDK.
    fn command(&self, port: u16, sdk_endpoint: Option<&str>) -> Result<Command> {
        let mut cmd = match self.kind {
            Kind::Flask => {
                let gunicorn = self.venv_bin("gunicorn");
                let mut cmd = match sdk_endpoint {
                    Some(_) => {
                        let mut c = Command::new(self.venv_bin("opentelemetry-instrument"));
                        c.arg(gunicorn);
                        c
                    }
                    None => Command::new(gunicorn),
                };
                let dir = self.source.parent().context("app.py has no directory")?;
                cmd.args([
                    "--workers",
                    "1",
                    "--worker-class",
                    "sync",
                    "--log-level",
                    "warning",
                ])
                .arg("--bind")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--chdir")
                .arg(dir)
                .arg("app:app");
                cmd
            }
            Kind::Node => {
                let mut cmd = Command::new(find_cmd("node").context("node is not installed")?);
                if sdk_endpoint.is_some() {
                    cmd.args(["--require", NODE_REGISTER]);
                }
                // --require resolves from the working directory: the npm prefix.
                cmd.arg(&self.source).current_dir(&self.install_dir);
                cmd
            }
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PORT", port.to_string());
        if let Some(endpoint) = sdk_endpoint {
            cmd.envs(sdk_env(self.kind, endpoint));
        }
        Ok(cmd)
    }

    /// Starts the app and waits until it answers [`PATH`] with 200.
    pub fn start(&self, sdk_endpoint: Option<&str>, log: PathBuf) -> Result<Server> {
        let port = free_port()?;
        let mut cmd = self.command(port, sdk_endpoint)?;
        let out =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        let mut server = Server {
            name: self.name(),
            guard: Guard::new(self.name(), child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        server
            .wait_ready()
            .with_context(|| format!("`{}` did not come up", display(&cmd)))?;
        Ok(server)
    }
}

/// The SDK's configuration, all from the standard OTEL_* variables: traces only, exported
/// OTLP/HTTP protobuf (what the bench's sink takes, and what the agent sends) without
/// compression, through the default batch span processor.
fn sdk_env(kind: Kind, endpoint: &str) -> Vec<(&'static str, String)> {
    let service = match kind {
        Kind::Flask => "bench-flask",
        Kind::Node => "bench-node",
    };
    let mut env: Vec<(&'static str, String)> = [
        ("OTEL_SERVICE_NAME", service),
        ("OTEL_TRACES_EXPORTER", "otlp"),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_LOGS_EXPORTER", "none"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
    ]
    .map(|(k, v)| (k, v.to_string()))
    .into();
    if kind == Kind::Node {
        // The default list adds the cloud detectors (GCP, AWS, Azure, Alibaba), which query
        // metadata endpoints that do not exist here; they cost start-up only, not requests.
        env.push(("OTEL_NODE_RESOURCE_DETECTORS", "env,host,os,process".into()));
    }
    env
}

/// The stamp's text for `packages`.
fn stamp(packages: &[&str]) -> String {
    packages.iter().map(|p| format!("{p}\n")).collect()
}

/// A running app; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    name: &'static str,
    guard: Guard,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    /// The process and its children (gunicorn's worker): what the agent is told to trace.
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.guard.pid();
        std::iter::once(pid).chain(children_of(pid)).collect()
    }

    /// CPU seconds used so far by the app's processes (threads included).
    pub fn cpu_seconds(&self) -> Result<f64> {
        self.pids().into_iter().map(proc::cpu_seconds).sum()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let answer = http1::get(self.addr, PATH, Duration::from_secs(5));
            match answer {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => bail!("GET {PATH} answered {status}: {body}"),
                Err(_) => {}
            }
            self.guard.ensure_running(&self.log)?;
            signals::check()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer GET {PATH} within {READY_TIMEOUT:?}; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    proc::tail(&self.log, 30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait for the exit (the SDKs export their last spans on the way); true when
    /// it exited 0.
    pub fn stop(&mut self) -> bool {
        let clean = self.guard.stop(STOP_GRACE);
        if !clean {
            eprintln!(
                "bench sdk: warning: {} did not exit cleanly; its log {}:\n{}",
                self.name,
                self.log.display(),
                proc::tail(&self.log, 10)
            );
        }
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(kind: Kind) -> App {
        App {
            kind,
            install_dir: PathBuf::from("/t/bench/sdk-x"),
            source: PathBuf::from("/w/app.src"),
        }
    }

    fn env_of(cmd: &Command, key: &str) -> Option<String> {
        cmd.get_envs()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| Some(v?.to_string_lossy().into_owned()))
    }

    #[test]
    fn flask_command_lines() {
        let plain = app(Kind::Flask).command(8000, None).unwrap();
        assert_eq!(
            display(&plain),
            "/t/bench/sdk-x/bin/gunicorn --workers 1 --worker-class sync --log-level warning \
             --bind 127.0.0.1:8000 --chdir /w app:app"
        );
        assert_eq!(env_of(&plain, "OTEL_TRACES_EXPORTER"), None);
        let sdk = app(Kind::Flask)
            .command(8000, Some("http://127.0.0.1:9"))
            .unwrap();
        assert!(display(&sdk).starts_with(
            "/t/bench/sdk-x/bin/opentelemetry-instrument /t/bench/sdk-x/bin/gunicorn --workers 1"
        ));
        assert_eq!(
            env_of(&sdk, "OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(),
            Some("http/protobuf")
        );
        assert_eq!(
            env_of(&sdk, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(env_of(&sdk, "OTEL_NODE_RESOURCE_DETECTORS"), None);
    }

    #[test]
    fn node_command_lines() {
        let Some(node) = find_cmd("node") else { return };
        let sdk = app(Kind::Node)
            .command(8000, Some("http://127.0.0.1:9"))
            .unwrap();
        assert_eq!(
            display(&sdk),
            format!("{} --require {NODE_REGISTER} /w/app.src", node.display())
        );
        assert_eq!(sdk.get_current_dir(), Some(Path::new("/t/bench/sdk-x")));
        assert_eq!(env_of(&sdk, "PORT").as_deref(), Some("8000"));
        assert_eq!(
            env_of(&sdk, "OTEL_METRICS_EXPORTER").as_deref(),
            Some("none")
        );
        let plain = app(Kind::Node).command(8000, None).unwrap();
        assert_eq!(display(&plain), format!("{} /w/app.src", node.display()));
    }

    #[test]
    fn stamp_lists_packages() {
        assert_eq!(stamp(&["a==1", "b==2"]), "a==1\nb==2\n");
    }
}
