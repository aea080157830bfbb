//! A real PostgreSQL 15 server on a free 127.0.0.1 port, its clients (psql,
//! pgbench) and a Python interpreter with psycopg 3. The server and its data
//! directory are removed on drop.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server
//! programs run as the `postgres` OS user (`runuser -u postgres --`) and the
//! server's directory belongs to that user; otherwise they run as the current
//! user. Clients connect over TCP as the database superuser `postgres`
//! (`--auth=trust`, no password).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{children_of, collect_pipe, send_signal, spawn, wait_with_timeout};
use crate::servers::python_interpreter;
use crate::util::{free_port, poll_until, TempDir};

/// Where Debian's postgresql-15 package installs the server programs and the
/// real client binaries (`/usr/bin/psql` is a Perl wrapper that execs them).
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The OS user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";

/// The database [`Postgres::start`] creates; clients connect to it.
pub const DATABASE: &str = "app";

/// How long the server may take to start (`pg_ctl -t`).
const START_TIMEOUT_SECS: u32 = 10;

/// How long one client or server command (initdb, psql, pgbench -i ...) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "install PostgreSQL 15 (apt-get install postgresql, or `cargo xtask setup`)";

/// A PostgreSQL 15 server (`initdb` + `pg_ctl start`) listening on
/// 127.0.0.1:<free port> only (plus a Unix socket in its data directory), with
/// fsync off, and the database `app`. Drop stops it (`pg_ctl -m immediate
/// stop`, SIGKILL if that fails) and removes its directory.
pub struct Postgres {
    port: u16,
    /// `sslmode=require` in the connection strings: the server has `ssl=on`.
    tls: bool,
    pgbench_initialized: OnceLock<()>,
    // Dropped after `Drop::drop` stopped the server.
    dir: TempDir,
}

impl Postgres {
    /// Creates a cluster in a fresh temp dir, starts it on a free port and
    /// creates the database `app`; takes about 1-2 s. Panics (with the server
    /// log when there is one) if any step fails or the server is not ready
    /// within 10 s.
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// The same with `ssl=on` (a self-signed certificate made by `openssl req` in the data
    /// directory), and clients connecting with `sslmode=require`.
    pub fn start_tls() -> Postgres {
        Postgres::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let started = Instant::now();
        let initdb = server_program("initdb");
        let pg_ctl = server_program("pg_ctl");
        let dir = TempDir::new("postgres");
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg(format!("{SERVER_USER}:{SERVER_USER}")).arg(dir.path());
            expect_success(&mut chown, "chown the PostgreSQL dir", String::new);
        }
        // From here on, dropping `postgres` stops whatever was started.
        let mut postgres = Postgres { port: 0, tls, pgbench_initialized: OnceLock::new(), dir };
        let data = postgres.data_dir();

        let mut command = postgres.server_command(&initdb);
        command.arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "--no-sync", "--no-locale", "-E", "UTF8"]);
        expect_success(&mut command, "initdb", String::new);
        if tls {
            postgres.make_certificate();
        }

        // Chosen only now, so another test is unlikely to take it before the server binds it.
        postgres.port = free_port();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off -c ssl={}",
            postgres.port,
            data.display(),
            if tls { "on" } else { "off" }
        );
        let timeout = START_TIMEOUT_SECS.to_string();
        let mut command = postgres.server_command(&pg_ctl);
        command.arg("-D").arg(&data).arg("-l").arg(postgres.log_path()).arg("-o").arg(options);
        command.args(["-w", "-t", &timeout, "start"]);
        expect_success(&mut command, "pg_ctl start", || postgres.log());

        let mut create = Command::new(client_program("psql"));
        create
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(postgres.conninfo_for("postgres"))
            .args(["-c", &format!("CREATE DATABASE {DATABASE}")]);
        expect_success(&mut create, "psql CREATE DATABASE", || postgres.log());
        eprintln!("postgres: started on port {} in {:?}", postgres.port, started.elapsed());
        postgres
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid (backends are its children), from `postmaster.pid`.
    pub fn pid(&self) -> u32 {
        self.postmaster_pid().unwrap_or_else(|| panic!("no postmaster.pid in {}", self.data_dir().display()))
    }

    /// `host=127.0.0.1 port=<port> user=postgres dbname=app`: a libpq
    /// connection string, accepted by psql, pgbench and psycopg.
    pub fn conninfo(&self) -> String {
        self.conninfo_for(DATABASE)
    }

    fn conninfo_for(&self, database: &str) -> String {
        let sslmode = if self.tls { " sslmode=require" } else { "" };
        format!("host=127.0.0.1 port={} user=postgres dbname={database}{sslmode}", self.port)
    }

    /// `server.crt` and `server.key` in the data directory, owned by the server's user.
    fn make_certificate(&self) {
        let data = self.data_dir();
        let mut openssl = Command::new("openssl");
        openssl
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
            .arg(data.join("server.key"))
            .arg("-out")
            .arg(data.join("server.crt"));
        expect_success(&mut openssl, "openssl req (server certificate)", String::new);
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg(format!("{SERVER_USER}:{SERVER_USER}")).arg(data.join("server.key")).arg(data.join("server.crt"));
            expect_success(&mut chown, "chown the certificate", String::new);
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("600").arg(data.join("server.key"));
        expect_success(&mut chmod, "chmod the key", String::new);
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        self.dir.read("server.log")
    }

    /// `psql -X -q -v ON_ERROR_STOP=0 -d <conninfo> -c <sql>` (the real
    /// binary, not Debian's Perl wrapper, so its pid is psql's from the
    /// start), not yet spawned. `sql` goes to the server in one simple-protocol
    /// Query message; psql prints every statement's result (aligned, with
    /// headers) and exits non-zero if the last statement failed.
    pub fn psql_command(&self, sql: &str) -> Command {
        let mut command = Command::new(client_program("psql"));
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=0", "-d"])
            .arg(self.conninfo())
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        command
    }

    /// Runs [`Postgres::psql_command`] to the end: (exit success, stdout, stderr).
    pub fn psql(&self, sql: &str) -> (bool, String, String) {
        let output = run_to_end(&mut self.psql_command(sql), "psql");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.success(), text(&output.stdout), text(&output.stderr))
    }

    /// `pgbench -i -s 1` into `app` (100 000 accounts), the first time only.
    pub fn pgbench_init(&self) {
        self.pgbench_initialized.get_or_init(|| {
            let mut command = Command::new(client_program("pgbench"));
            command.args(["-i", "-s", "1", "-q"]).args(self.pgbench_connection());
            expect_success(&mut command, "pgbench -i", || self.log());
        });
    }

    /// `pgbench -n -M <mode> -S -c 1 -j 1 -t <transactions>` against `app`
    /// (select-only; `mode` is simple, extended or prepared), not yet spawned.
    /// Runs [`Postgres::pgbench_init`] first.
    pub fn pgbench_command(&self, mode: &str, transactions: u32) -> Command {
        self.pgbench_init();
        let mut command = Command::new(client_program("pgbench"));
        command
            .args(["-n", "-M", mode, "-S", "-c", "1", "-j", "1", "-t", &transactions.to_string()])
            .args(self.pgbench_connection())
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        command
    }

    fn pgbench_connection(&self) -> Vec<String> {
        let port = self.port.to_string();
        ["-h", "127.0.0.1", "-p", &port, "-U", "postgres", DATABASE].map(String::from).to_vec()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// `program`, as the `postgres` OS user when we are root, in the server's dir.
    fn server_command(&self, program: &Path) -> Command {
        let mut command = if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", SERVER_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(pid) = self.postmaster_pid() else { return }; // never started
        let mut stop = self.server_command(&Path::new(BIN_DIR).join("pg_ctl"));
        stop.arg("-D").arg(self.data_dir()).args(["-m", "immediate", "-w", "-t", "10", "stop"]);
        match stop.stdout(Stdio::null()).output() {
            Ok(output) if output.status.success() => return,
            Ok(output) => eprintln!(
                "warning: pg_ctl stop failed ({}): {}; killing postmaster {pid}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot run pg_ctl stop: {e}; killing postmaster {pid}"),
        }
        if !is_postgres_process(pid) {
            return;
        }
        let backends = children_of(pid);
        send_signal(pid, libc::SIGKILL);
        for backend in backends {
            send_signal(backend, libc::SIGKILL);
        }
        if !poll_until(Duration::from_secs(5), || !is_postgres_process(pid)) {
            eprintln!("warning: postmaster {pid} still exists after SIGKILL");
        }
    }
}

fn is_postgres_process(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
}

/// Path of a Python interpreter that can `import psycopg` (psycopg 3 on the
/// system libpq5, not psycopg-binary's bundled copy): [`python_interpreter`],
/// checked once. Panics saying how to install psycopg otherwise.
pub fn psycopg_python() -> &'static Path {
    static CHECKED: OnceLock<()> = OnceLock::new();
    let python = python_interpreter();
    CHECKED.get_or_init(|| require_psycopg(python));
    python
}

fn require_psycopg(python: &Path) {
    let script = "import psycopg; print(psycopg.__version__, psycopg.pq.__impl__)";
    let output = Command::new(python)
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("run {} to check for psycopg: {e}", python.display()));
    let install = format!(
        "install it with `cargo xtask setup` or `{} -m pip install psycopg` (it loads the system libpq5: apt-get install libpq5)",
        python.display()
    );
    assert!(
        output.status.success(),
        "{} cannot import psycopg: {}\n{install}",
        python.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let implementation = stdout.split_whitespace().nth(1).unwrap_or_default();
    assert_ne!(
        implementation,
        "binary",
        "psycopg under {} uses psycopg-binary's bundled libpq, not the system libpq5: \
         `{0} -m pip uninstall psycopg-binary`",
        python.display()
    );
}

/// A server program of PostgreSQL 15, or a panic saying how to install it.
fn server_program(name: &str) -> PathBuf {
    let path = Path::new(BIN_DIR).join(name);
    assert!(path.is_file(), "{} is missing: {INSTALL_HINT}", path.display());
    path
}

/// The real client binary in [`BIN_DIR`], else `name` from PATH.
fn client_program(name: &str) -> PathBuf {
    let path = Path::new(BIN_DIR).join(name);
    if path.is_file() {
        path
    } else {
        PathBuf::from(name)
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `command` with piped stdout and stderr until it exits; panics if it
/// cannot start or runs longer than [`COMMAND_TIMEOUT`] (it is then killed).
fn run_to_end(command: &mut Command, what: &str) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn(command, what);
    let stdout = collect_pipe(child.stdout.take().expect("piped stdout"));
    let stderr = collect_pipe(child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_with_timeout(&mut child, COMMAND_TIMEOUT) else {
        send_signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
        panic!("{what} ({command:?}) did not finish within {COMMAND_TIMEOUT:?}");
    };
    let join = |pipe: std::thread::JoinHandle<String>| pipe.join().expect("pipe reader thread").into_bytes();
    Output { status, stdout: join(stdout), stderr: join(stderr) }
}

/// [`run_to_end`], panicking with the output and `context()` (the server log)
/// unless the command succeeds.
fn expect_success(command: &mut Command, what: &str, context: impl FnOnce() -> String) -> Output {
    let output = run_to_end(command, what);
    if !output.status.success() {
        let context = context();
        let context = if context.is_empty() { String::new() } else { format!("\nserver log:\n{context}") };
        panic!(
            "{what} failed ({}): {command:?}\nstdout:\n{}\nstderr:\n{}{context}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}
