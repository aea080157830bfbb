//! Byte offsets of the kernel struct fields the programs read, resolved by the agent from the running
//! kernel's BTF and handed over as a global. This replaces CO-RE, which aya-ebpf does not offer.

/// Offsets in bytes. A zero `task_files` means "not resolved": socket lookups are then skipped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// task_struct.files (struct files_struct *)
    pub task_files: u32,
    /// files_struct.fdt (struct fdtable *)
    pub files_fdt: u32,
    /// fdtable.max_fds (unsigned int)
    pub fdt_max_fds: u32,
    /// fdtable.fd (struct file **)
    pub fdt_fd: u32,
    /// file.f_inode (struct inode *)
    pub file_inode: u32,
    /// file.private_data (void *; struct socket * for sockets)
    pub file_private_data: u32,
    /// inode.i_mode (umode_t)
    pub inode_mode: u32,
    /// socket.type (short)
    pub socket_type: u32,
    /// socket.sk (struct sock *)
    pub socket_sk: u32,
    /// sock.__sk_common.skc_family (unsigned short)
    pub sk_family: u32,
    /// sock.__sk_common.skc_daddr (__be32)
    pub sk_daddr: u32,
    /// sock.__sk_common.skc_rcv_saddr (__be32)
    pub sk_rcv_saddr: u32,
    /// sock.__sk_common.skc_dport (__be16)
    pub sk_dport: u32,
    /// sock.__sk_common.skc_num (__u16, host order)
    pub sk_num: u32,
    /// sock.__sk_common.skc_v6_daddr (struct in6_addr)
    pub sk_v6_daddr: u32,
    /// sock.__sk_common.skc_v6_rcv_saddr (struct in6_addr)
    pub sk_v6_rcv_saddr: u32,
}
