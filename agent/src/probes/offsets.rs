//! Kernel struct field offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`), so the
//! kernel programs can walk task -> fd -> socket on any kernel version without CO-RE.

use zerotel_abi::KernelOffsets;

use super::ProbeError;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Resolve every offset the programs need, or say which field is missing.
pub fn resolve() -> Result<KernelOffsets, ProbeError> {
    let bytes = std::fs::read(VMLINUX_BTF).map_err(|e| ProbeError::Btf(format!("{VMLINUX_BTF}: {e}")))?;
    let btf = Btf::parse(&bytes).map_err(|e| ProbeError::Btf(format!("{VMLINUX_BTF}: {e}")))?;
    let at = |ty: &str, field: &str| {
        btf.field_offset(ty, field).ok_or_else(|| ProbeError::Btf(format!("no field {ty}.{field} in the kernel's BTF")))
    };
    // struct sock starts with its sock_common: the programs add no base offset.
    if at("sock", "__sk_common")? != 0 {
        return Err(ProbeError::Btf("sock.__sk_common is not at offset 0".into()));
    }
    Ok(KernelOffsets {
        task_files: at("task_struct", "files")?,
        files_fdt: at("files_struct", "fdt")?,
        fdt_max_fds: at("fdtable", "max_fds")?,
        fdt_fd: at("fdtable", "fd")?,
        file_inode: at("file", "f_inode")?,
        file_private_data: at("file", "private_data")?,
        inode_mode: at("inode", "i_mode")?,
        socket_type: at("socket", "type")?,
        socket_sk: at("socket", "sk")?,
        sk_family: at("sock_common", "skc_family")?,
        sk_daddr: at("sock_common", "skc_daddr")?,
        sk_rcv_saddr: at("sock_common", "skc_rcv_saddr")?,
        sk_dport: at("sock_common", "skc_dport")?,
        sk_num: at("sock_common", "skc_num")?,
        sk_v6_daddr: at("sock_common", "skc_v6_daddr")?,
        sk_v6_rcv_saddr: at("sock_common", "skc_v6_rcv_saddr")?,
    })
}

/// Just enough of the BTF format (kernel Documentation/bpf/btf.rst) to find struct member
/// offsets: a full parser keeps tens of MiB alive for a few lookups at start-up.
struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset of each type record in `types`, by type id - 1.
    records: Vec<u32>,
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

impl<'a> Btf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, &'static str> {
        if u16_at(bytes, 0) != Some(0xeb9f) {
            return Err("not little-endian BTF");
        }
        let header = |i: usize| u32_at(bytes, 8 + 4 * i).ok_or("truncated header");
        let hdr_len = u32_at(bytes, 4).ok_or("truncated header")? as usize;
        let (type_off, type_len, str_off, str_len) = (header(0)?, header(1)?, header(2)?, header(3)?);
        let section = |off: u32, len: u32| bytes.get(hdr_len + off as usize..hdr_len + off as usize + len as usize);
        let types = section(type_off, type_len).ok_or("type section out of bounds")?;
        let strings = section(str_off, str_len).ok_or("string section out of bounds")?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while at < types.len() {
            records.push(at as u32);
            at += 12 + extra_len(types, at).ok_or("unknown BTF kind")?;
        }
        Ok(Self { types, strings, records })
    }

    fn field_offset(&self, ty: &str, field: &str) -> Option<u32> {
        let id = self.struct_named(ty)?;
        let bits = self.find_member(id, field, 0)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The complete struct named `name` (forward declarations have no members).
    fn struct_named(&self, name: &str) -> Option<u32> {
        (1..=self.records.len() as u32).find(|&id| {
            let (kind, vlen) = self.kind(id).unwrap_or((0, 0));
            kind == KIND_STRUCT && vlen > 0 && self.name(self.u32(id, 0).unwrap_or(0)) == Some(name)
        })
    }

    /// Bit offset of `field` in struct/union `id`, looking through anonymous members.
    fn find_member(&self, id: u32, field: &str, depth: u8) -> Option<u32> {
        if depth > 4 {
            return None;
        }
        self.members(id)?.into_iter().find_map(|m| {
            let name = self.name(m.name_off)?;
            if name == field {
                return Some(m.bit_offset);
            }
            if !name.is_empty() {
                return None;
            }
            let inner = self.strip_modifiers(m.type_id)?;
            self.find_member(inner, field, depth + 1).map(|bits| m.bit_offset + bits)
        })
    }

    fn members(&self, id: u32) -> Option<Vec<Member>> {
        let (kind, vlen) = self.kind(id)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let kind_flag = self.u32(id, 4)? >> 31 == 1;
        let base = *self.records.get(id as usize - 1)? as usize + 12;
        (0..vlen as usize)
            .map(|i| {
                let at = base + 12 * i;
                let offset = u32_at(self.types, at + 8)?;
                // With kind_flag the top 8 bits hold a bitfield size, the rest the bit offset.
                let bit_offset = if kind_flag { offset & 0x00ff_ffff } else { offset };
                Some(Member { name_off: u32_at(self.types, at)?, type_id: u32_at(self.types, at + 4)?, bit_offset })
            })
            .collect()
    }

    fn strip_modifiers(&self, mut id: u32) -> Option<u32> {
        for _ in 0..8 {
            match self.kind(id)?.0 {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = self.u32(id, 8)?,
                _ => return Some(id),
            }
        }
        None
    }

    fn kind(&self, id: u32) -> Option<(u32, u32)> {
        let info = self.u32(id, 4)?;
        Some(((info >> 24) & 0x1f, info & 0xffff))
    }

    /// A u32 field of type `id`'s 12-byte header.
    fn u32(&self, id: u32, field_offset: usize) -> Option<u32> {
        let at = *self.records.get(id.checked_sub(1)? as usize)? as usize;
        u32_at(self.types, at + field_offset)
    }

    fn name(&self, offset: u32) -> Option<&str> {
        let rest = self.strings.get(offset as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }
}

/// Bytes that follow a type's 12-byte header, by kind.
fn extra_len(types: &[u8], at: usize) -> Option<usize> {
    let info = u32_at(types, at + 4)?;
    let vlen = (info & 0xffff) as usize;
    Some(match (info >> 24) & 0x1f {
        1 => 4,                   // INT
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // PTR FWD TYPEDEF VOLATILE CONST RESTRICT FUNC FLOAT TYPE_TAG
        3 => 12,                  // ARRAY
        4 | 5 => 12 * vlen,       // STRUCT UNION
        6 => 8 * vlen,            // ENUM
        13 => 8 * vlen,           // FUNC_PROTO
        14 => 4,                  // VAR
        15 => 12 * vlen,          // DATASEC
        17 => 4,                  // DECL_TAG
        19 => 12 * vlen,          // ENUM64
        _ => return None,
    })
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_this_kernel() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI needs {VMLINUX_BTF}");
            return;
        }
        let o = resolve().expect("offsets");
        // Garbage never panics the reader.
        assert!(Btf::parse(b"not btf").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 255, 255, 255, 255]).is_err());
        assert!(o.task_files > 0 && o.socket_sk > 0);
        // skc_daddr and skc_rcv_saddr are the first two words of sock_common on every kernel.
        assert_eq!((o.sk_daddr, o.sk_rcv_saddr), (0, 4));
    }
}
