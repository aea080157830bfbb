//! OpenSSL uprobes: `SSL_read`, `SSL_write` and their `_ex` forms, on every libssl a traced
//! process maps and on a program that exports them itself (node links OpenSSL statically), found
//! in /proc/PID/maps. Rescanned every [`RESCAN`], and as soon as a process starts being traced or
//! runs a new program: processes traced later and libraries loaded later (dlopen) are picked up,
//! and the probes of processes no longer traced are detached.
//!
//! A shared library gets probes per traced process (an untraced process calling the same libssl
//! pays nothing): on every libssl it maps, and on the host's libssl even before it maps it, so
//! that a traced process that execs a short-lived client (a shell running curl or psql) is covered
//! from the client's first call (the probes follow the task across exec). A program that exports
//! OpenSSL is probed once for every process running it (the kernel drops the calls of untraced
//! ones): attaching takes tens of milliseconds per probe here, and a short-lived node client
//! would be done before its own were in place. When every process is traced, or exclude rules
//! alone decide (nearly every process is), each file is probed once for all of them.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    programs::{
        uprobe::{UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use object::{Object, ObjectSymbol};

use super::{program, ProbeError};

/// How often traced processes are looked at again.
pub const RESCAN: Duration = Duration::from_secs(1);

/// Where distributions keep the system libssl (Debian/Ubuntu multiarch, Fedora/RHEL, Alpine...).
const HOST_LIBSSL: [&str; 8] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/usr/lib/libssl.so.3",
    "/lib/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib64/libssl.so.1.1",
    "/usr/lib/libssl.so.1.1",
];
/// Executables whose symbol tables are remembered (past it, they are read again).
const MAX_PROGRAMS: usize = 4096;
/// (entry program, symbol): every one also gets the shared return program.
const FUNCTIONS: [(&str, &str); 4] = [
    ("zt_ssl_read", "SSL_read"),
    ("zt_ssl_write", "SSL_write"),
    ("zt_ssl_read_ex", "SSL_read_ex"),
    ("zt_ssl_write_ex", "SSL_write_ex"),
];
const RETURN: &str = "zt_ssl_return";

/// Where the probes are attached.
#[derive(Default)]
pub struct TlsProbes {
    /// Links per (process, object file); process 0 when the probes fire for every process.
    attached: HashMap<(u32, FileId), Vec<(&'static str, UProbeLinkId)>>,
    /// Whether an executable exports `SSL_write`, by file: ELF symbol tables are read once.
    exports: HashMap<FileId, bool>,
    /// The thread-group id of each traced task id (TRACED_PIDS holds both).
    tgids: HashMap<u32, Option<u32>>,
}

/// What of OpenSSL a process maps.
#[derive(Default)]
struct SslObjects {
    /// Every libssl.
    libraries: Vec<PathBuf>,
    /// Its executable, when that exports `SSL_write`.
    program: Option<PathBuf>,
}

/// A file, whoever's mount namespace it is seen through: (device, inode).
type FileId = (u64, u64);

impl TlsProbes {
    /// Load the uprobe programs (attached later, per object).
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        for name in FUNCTIONS.iter().map(|(name, _)| *name).chain([RETURN]) {
            super::load_once(uprobe(ebpf, name)?.load()).map_err(|source| ProbeError::Program { program: name, tracepoint: "uprobe".into(), source })?;
        }
        Ok(Self::default())
    }

    /// Attach to what the traced tasks (`tasks`: process or thread ids; None: every process)
    /// map now, and detach what no traced process needs any more.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, tasks: Option<&HashSet<u32>>) {
        let host: Vec<PathBuf> = HOST_LIBSSL.iter().map(PathBuf::from).filter(|path| path.exists()).collect();
        let mut wanted: Vec<(u32, PathBuf)> = Vec::new();
        match tasks {
            Some(tasks) => {
                for pid in self.processes_of(tasks) {
                    let objects = self.ssl_objects(pid);
                    // A program with OpenSSL inside never uses the host's libssl itself.
                    let host = if objects.program.is_some() { &[][..] } else { &host[..] };
                    wanted.extend(host.iter().chain(&objects.libraries).map(|library| (pid, library.clone())));
                    wanted.extend(objects.program.map(|program| (0, program)));
                }
            }
            None => {
                wanted.extend(host.iter().map(|object| (0, object.clone())));
                for pid in all_processes() {
                    let objects = self.ssl_objects(pid);
                    wanted.extend(objects.libraries.into_iter().chain(objects.program).map(|object| (0, object)));
                }
            }
        }
        let mut keep = HashSet::new();
        let mut changed = false;
        for (pid, object) in wanted {
            let Ok(meta) = std::fs::metadata(&object) else { continue };
            let key = (pid, (meta.dev(), meta.ino()));
            if keep.insert(key) && !self.attached.contains_key(&key) {
                changed = true;
                let scope = std::num::NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
                self.attached.insert(key, attach(ebpf, &object, scope, pid));
            }
        }
        let stale: Vec<(u32, FileId)> = self.attached.keys().filter(|key| !keep.contains(*key)).copied().collect();
        changed |= !stale.is_empty();
        for key in stale {
            if let Some(links) = self.attached.remove(&key) {
                detach(ebpf, links);
            }
        }
        if changed {
            let processes: HashSet<u32> = self.attached.keys().map(|(pid, _)| *pid).collect();
            log::info!("TLS: OpenSSL uprobes on {} objects of {} processes", self.attached.len(), processes.len());
        }
    }

    /// The processes among traced task ids.
    fn processes_of(&mut self, tasks: &HashSet<u32>) -> HashSet<u32> {
        self.tgids.retain(|task, _| tasks.contains(task));
        tasks.iter().filter_map(|&task| *self.tgids.entry(task).or_insert_with(|| tgid_of(task))).collect()
    }

    /// The OpenSSL objects process `pid` maps, as paths the agent can open.
    fn ssl_objects(&mut self, pid: u32) -> SslObjects {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let in_root = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
        let mut objects = SslObjects::default();
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            objects.libraries = mapped_files(&maps).filter(|path| is_libssl(path)).map(in_root).collect();
            objects.libraries.dedup(); // a library's mappings are adjacent
        }
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            let exe = in_root(&exe);
            if let Ok(meta) = std::fs::metadata(&exe) {
                if self.exports.len() >= MAX_PROGRAMS {
                    self.exports.clear();
                }
                if *self.exports.entry((meta.dev(), meta.ino())).or_insert_with(|| exports_ssl(&exe)) {
                    objects.program = Some(exe);
                }
            }
        }
        objects
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    program(ebpf, name)?
        .try_into()
        .map_err(|source| ProbeError::Program { program: name, tracepoint: "uprobe".into(), source })
}

/// Attach every function the object has (for process `pid`, or all when `scope` says so); one it
/// lacks (`_ex` before OpenSSL 1.1.1) is skipped.
fn attach(ebpf: &mut Ebpf, object: &Path, scope: UProbeScope, pid: u32) -> Vec<(&'static str, UProbeLinkId)> {
    let mut links = Vec::new();
    for (entry, symbol) in FUNCTIONS {
        for program in [entry, RETURN] {
            let attached = uprobe(ebpf, program).and_then(|probe| {
                probe
                    .attach(symbol, object, scope)
                    .map_err(|source| ProbeError::Program { program, tracepoint: format!("{}:{symbol}", object.display()), source })
            });
            match attached {
                Ok(link) => links.push((program, link)),
                Err(e) => {
                    log::debug!("TLS: pid {pid}: {e}");
                    break;
                }
            }
        }
    }
    if !links.is_empty() {
        log::debug!("TLS: OpenSSL uprobes on {} (pid {pid}, {} links)", object.display(), links.len());
    }
    links
}

fn detach(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (program, link) in links {
        if let Ok(probe) = uprobe(ebpf, program) {
            // A process that exited took its probes with it: a failed detach is fine.
            let _ = probe.detach(link);
        }
    }
}

/// The file paths of a /proc/PID/maps text (its sixth column), deleted files excluded.
fn mapped_files(maps: &str) -> impl Iterator<Item = &Path> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with('/'))
        .map(Path::new)
}

/// `libssl.so`, `libssl.so.3`, `libssl.so.1.1`...
fn is_libssl(path: &Path) -> bool {
    path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with("libssl.so"))
}

/// Whether an executable defines `SSL_write` (node does; most programs do not). Read through a
/// cache of the parts the parser asks for: a program can be 100 MB, its symbol tables are not.
fn exports_ssl(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else { return false };
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else { return false };
    elf.dynamic_symbols().chain(elf.symbols()).any(|symbol| symbol.is_definition() && symbol.name() == Ok("SSL_write"))
}

fn tgid_of(task: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{task}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("Tgid:")?.trim().parse().ok())
}

fn all_processes() -> HashSet<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return HashSet::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != me)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_libssl_in_the_maps() {
        let maps = "\
55d0c0a00000-55d0c0a2b000 r--p 00000000 fe:01 1311 /usr/sbin/nginx
7f3a1c000000-7f3a1c09a000 r--p 00000000 fe:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f3a1c09a000-7f3a1c0f0000 r-xp 0009a000 fe:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f3a1d000000-7f3a1d010000 r-xp 00000000 fe:01 3333 /opt/app/lib/libssl.so.1.1
7f3a1e000000-7f3a1e010000 r-xp 00000000 fe:01 4444 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7ffd5a000000-7ffd5a021000 rw-p 00000000 00:00 0 [stack]
7f3a1f000000-7f3a1f001000 rw-p 00000000 00:00 0
";
        let mut ssl: Vec<&Path> = mapped_files(maps).filter(|p| is_libssl(p)).collect();
        ssl.dedup();
        assert_eq!(ssl, [Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3"), Path::new("/opt/app/lib/libssl.so.1.1")]);
    }

    #[test]
    fn tells_programs_that_export_openssl() {
        // The test binary itself links no OpenSSL.
        assert!(!exports_ssl(&std::env::current_exe().unwrap()));
        assert!(!exports_ssl(Path::new("/nonexistent")));
        if let Some(libssl) = ["/usr/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/aarch64-linux-gnu/libssl.so.3"]
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
        {
            assert!(exports_ssl(libssl));
        }
    }
}
