//! The kernel programs' object file, as handed to the loader.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use zerotel_abi::names;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zerotel"));

/// Map types (linux/bpf.h), the first field of a map definition in the `maps` section.
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;

/// Object bytes, 8-byte aligned as the ELF reader needs them.
pub enum Loadable {
    AsBuilt(&'static [u8]),
    /// A patched copy: words, and the length in bytes.
    Patched(Vec<u64>, usize),
}

impl Loadable {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::AsBuilt(bytes) => bytes,
            // SAFETY: the words own at least `len` initialised bytes, and u8 has no alignment.
            Self::Patched(words, len) => unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) },
        }
    }
}

/// The object to load: as built when propagation is on, else with INJECT_SOCKS declared a plain
/// hash map. The kernel lets only CAP_NET_ADMIN create a sockhash, and aya creates every map of an
/// object before any program loads: an agent without that capability could not trace at all,
/// though only the propagation programs, not loaded then, use the map.
pub fn with_propagation(propagate: bool) -> Loadable {
    if propagate {
        return Loadable::AsBuilt(OBJECT);
    }
    match map_type_at(OBJECT, names::INJECT_SOCKS) {
        Some(at) if read_u32(OBJECT, at) == Some(BPF_MAP_TYPE_SOCKHASH) => {
            let mut bytes = OBJECT.to_vec();
            bytes[at..at + 4].copy_from_slice(&BPF_MAP_TYPE_HASH.to_le_bytes());
            let len = bytes.len();
            let words = bytes.chunks(8).map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            });
            Loadable::Patched(words.collect(), len)
        }
        _ => {
            log::warn!("{} is not a sockhash in the object: loading it as built (needs CAP_NET_ADMIN)", names::INJECT_SOCKS);
            Loadable::AsBuilt(OBJECT)
        }
    }
}

/// Where the type of map `name` sits in the ELF file: its symbol's offset in the `maps` section.
fn map_type_at(elf: &[u8], name: &str) -> Option<usize> {
    let file = object::File::parse(elf).ok()?;
    let symbol = file.symbols().find(|symbol| symbol.name() == Ok(name))?;
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    if section.name() != Ok("maps") {
        return None;
    }
    let (start, size) = section.file_range()?;
    let end = symbol.address().checked_add(4)?;
    (end <= size).then(|| usize::try_from(start + symbol.address()).ok())?
}

/// eBPF objects are little-endian (bpfel).
fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_propagation_the_sockhash_becomes_a_plain_hash_and_nothing_else_changes() {
        let at = map_type_at(OBJECT, names::INJECT_SOCKS).expect("INJECT_SOCKS in the maps section");
        assert_eq!(read_u32(OBJECT, at), Some(BPF_MAP_TYPE_SOCKHASH));
        let patched = with_propagation(false);
        let bytes = patched.bytes();
        assert_eq!(read_u32(bytes, at), Some(BPF_MAP_TYPE_HASH));
        assert_eq!(bytes.len(), OBJECT.len());
        assert_eq!(bytes.iter().zip(OBJECT).filter(|(a, b)| a != b).count(), 1, "only the type's low byte differs");
        assert_eq!(bytes.as_ptr().align_offset(8), 0);
        assert_eq!(with_propagation(true).bytes().as_ptr(), OBJECT.as_ptr());
    }
}
