//! What a running agent occupies: its resident memory (from /proc) and how many entries each of
//! its eBPF hash maps holds (read through the bpf(2) syscall, by map id).
//!
//! The map ids come from the agent's own file descriptors (`/proc/<pid>/fdinfo`), so only the
//! maps of that agent are counted, whatever else is loaded in the kernel. Counting walks the keys
//! with `BPF_MAP_GET_NEXT_KEY`, which needs no knowledge of the value types.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `VmRSS` of `pid` in KiB: resident memory now.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// `VmHWM` of `pid` in KiB: the peak resident memory since the process started.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}:\n{status}"))
}

/// One eBPF map an agent holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentMap {
    pub id: u32,
    /// The map's name as the kernel keeps it (at most 15 bytes of the object's symbol name).
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub max_entries: u32,
}

/// `BPF_MAP_TYPE_HASH`, `BPF_MAP_TYPE_LRU_HASH`: the maps whose entries come and go.
const HASH_MAP_TYPES: [u32; 2] = [1, 9];

impl AgentMap {
    pub fn is_hash(&self) -> bool {
        HASH_MAP_TYPES.contains(&self.map_type)
    }
}

/// Every eBPF map `pid` holds a file descriptor of, by map id.
pub fn agent_maps(pid: u32) -> Vec<AgentMap> {
    let mut ids: Vec<u32> = map_ids_of(pid);
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter().filter_map(|id| map_info(id).ok()).collect()
}

/// Entries of each hash map of `pid`, by map name (see [`count_entries`] for the bound).
pub fn hash_map_entries(pid: u32) -> BTreeMap<String, u64> {
    agent_maps(pid)
        .into_iter()
        .filter(AgentMap::is_hash)
        .filter_map(|map| Some((map.name.clone(), count_entries(&map).ok()?)))
        .collect()
}

/// The `map_id:` of every `anon_inode:bpf-map` descriptor in `/proc/<pid>/fdinfo`.
fn map_ids_of(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    entries
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("map_id:")?.trim().parse().ok())
        })
        .collect()
}

// bpf(2) commands and the parts of `union bpf_attr` / `struct bpf_map_info` used here
// (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_int = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
/// Open maps read-only: counting never needs more.
const BPF_F_RDONLY: u32 = 1 << 3;

/// `union bpf_attr`, zero-filled beyond the fields a command uses (the kernel insists).
#[repr(C, align(8))]
struct Attr([u32; 32]);

/// The head of `struct bpf_map_info`, up to and including `name`: the kernel copies no more
/// than the length it is given.
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

fn bpf(command: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size given; the pointers it
    // holds (set by the callers) point at live buffers of the sizes the kernel expects.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn map_fd(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 32]);
    attr.0[0] = id;
    attr.0[2] = BPF_F_RDONLY;
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn map_info(id: u32) -> io::Result<AgentMap> {
    let fd = map_fd(id)?;
    let mut info = MapInfoHead::default();
    let mut attr = Attr([0; 32]);
    attr.0[0] = fd.as_raw_fd() as u32;
    attr.0[1] = std::mem::size_of::<MapInfoHead>() as u32;
    let address = &mut info as *mut MapInfoHead as u64;
    (attr.0[2], attr.0[3]) = (address as u32, (address >> 32) as u32);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let name_len = info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.name.len());
    Ok(AgentMap {
        id: info.id,
        name: String::from_utf8_lossy(&info.name[..name_len]).into_owned(),
        map_type: info.map_type,
        key_size: info.key_size,
        max_entries: info.max_entries,
    })
}

/// How many keys `map` holds now. Bounded by twice `max_entries`: a walk that overlaps deletions
/// may restart from the first key (the kernel's answer for a key that vanished), so a count taken
/// while the map changes is approximate; a count of a quiet map is exact.
pub fn count_entries(map: &AgentMap) -> io::Result<u64> {
    let fd = map_fd(map.id)?;
    let mut key = vec![0u8; map.key_size as usize];
    let mut next = vec![0u8; map.key_size as usize];
    let limit = u64::from(map.max_entries) * 2;
    let mut count = 0;
    while count < limit {
        let mut attr = Attr([0; 32]);
        attr.0[0] = fd.as_raw_fd() as u32;
        // The first call passes no key: "give me the first one".
        let key_address = if count == 0 { 0 } else { key.as_ptr() as u64 };
        let next_address = next.as_mut_ptr() as u64;
        (attr.0[2], attr.0[3]) = (key_address as u32, (key_address >> 32) as u32);
        (attr.0[4], attr.0[5]) = (next_address as u32, (next_address >> 32) as u32);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut key, &mut next);
        count += 1;
    }
    Ok(count)
}

/// The TCP addresses `pid` listens on (IPv4 and IPv6), from /proc/net/tcp{,6} and the socket
/// inodes among its file descriptors.
pub fn listening_addresses(pid: u32) -> Vec<SocketAddr> {
    let inodes = socket_inodes(pid);
    let mut addresses = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_else(|e| panic!("read {table}: {e}"));
        addresses.extend(
            text.lines()
                .skip(1)
                .filter_map(|line| listening_entry(line, &inodes)),
        );
    }
    addresses
}

fn socket_inodes(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    entries
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`: the local address of a
/// LISTEN (0A) line whose inode is one of `inodes`.
fn listening_entry(line: &str, inodes: &[u64]) -> Option<SocketAddr> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (
        fields.get(1)?,
        fields.get(3)?,
        fields.get(9)?.parse::<u64>().ok()?,
    );
    if *state != "0A" || !inodes.contains(&inode) {
        return None;
    }
    parse_proc_address(local)
}

/// `0100007F:24F8` (IPv4) or 32 hex digits `:PORT` (IPv6): each 32-bit word in host order.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..address.len() / 8)
        .map(|i| u32::from_str_radix(&address[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let pid = std::process::id();
        let (now, peak) = (rss_kib(pid), peak_rss_kib(pid));
        assert!(now > 0 && peak >= now, "VmRSS {now} KiB, VmHWM {peak} KiB");
    }

    #[test]
    fn parses_proc_net_addresses() {
        let v4 = parse_proc_address("0100007F:24F8").expect("IPv4");
        assert_eq!(v4, "127.0.0.1:9464".parse().unwrap());
        let v6 = parse_proc_address("00000000000000000000000001000000:0050").expect("IPv6");
        assert_eq!(v6, "[::1]:80".parse().unwrap());
    }

    #[test]
    fn finds_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert!(listening_addresses(std::process::id()).contains(&addr));
    }

    #[test]
    fn a_process_without_maps_has_none() {
        assert!(agent_maps(std::process::id()).is_empty());
    }
}
