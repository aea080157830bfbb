//! Kernel struct field offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`), so the
//! kernel programs can walk task -> fd -> socket on any kernel version without CO-RE.

use btf_rs::{Btf, BtfType, Member, Type};
use zerotel_abi::KernelOffsets;

use super::ProbeError;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Resolve every offset the programs need, or say which field is missing.
pub fn resolve() -> Result<KernelOffsets, ProbeError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| ProbeError::Btf(format!("{VMLINUX_BTF}: {e}")))?;
    let at = |ty: &str, field: &str| field_offset(&btf, ty, field);
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
    .and_then(|o| {
        // struct sock starts with its sock_common: the programs add no base offset.
        match at("sock", "__sk_common")? {
            0 => Ok(o),
            other => Err(ProbeError::Btf(format!("sock.__sk_common at offset {other}, expected 0"))),
        }
    })
}

/// Byte offset of `field` in struct `ty`, looking through anonymous structs and unions.
fn field_offset(btf: &Btf, ty: &str, field: &str) -> Result<u32, ProbeError> {
    let missing = || ProbeError::Btf(format!("no field {ty}.{field} in the kernel's BTF"));
    let types = btf.resolve_types_by_name(ty).map_err(|_| missing())?;
    let members = types.iter().find_map(|t| match t {
        Type::Struct(s) if !s.members.is_empty() => Some(&s.members),
        _ => None,
    });
    let bits = members.and_then(|m| find_member(btf, m, field, 0)).ok_or_else(missing)?;
    if bits % 8 != 0 {
        return Err(ProbeError::Btf(format!("{ty}.{field} is a bitfield")));
    }
    Ok(bits / 8)
}

fn find_member(btf: &Btf, members: &[Member], field: &str, depth: u8) -> Option<u32> {
    if depth > 4 {
        return None;
    }
    members.iter().find_map(|m| {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            return Some(m.bit_offset());
        }
        if !name.is_empty() {
            return None;
        }
        let inner = match btf.resolve_chained_type(m as &dyn BtfType).ok()? {
            Type::Struct(s) => s.members,
            Type::Union(u) => u.members,
            _ => return None,
        };
        find_member(btf, &inner, field, depth + 1).map(|bits| m.bit_offset() + bits)
    })
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
        assert!(o.task_files > 0 && o.socket_sk > 0);
        // skc_daddr and skc_rcv_saddr are the first two words of sock_common on every kernel.
        assert_eq!((o.sk_daddr, o.sk_rcv_saddr), (0, 4));
    }
}
