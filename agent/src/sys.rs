//! The one module with `unsafe` and raw syscalls. Each block says why it is sound;
//! everything else in the agent is safe Rust. Syscalls `nix` wraps safely (user lookup,
//! euid, umask, mount) are called through nix where they are used; what is here is what
//! nix lacks.

#![allow(
    unsafe_code,
    reason = "the agent's one module for raw syscalls; the workspace denies unsafe everywhere else"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_NETNS_COOKIE` (Linux 5.14); not in every libc crate version, and nix has no socket
/// option for it (its `sockopt` list stops short of it), so the getsockopt is ours.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: fd is a live socket; value and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The reader of the kernel programs' log ring (aya-log), owned by whoever pumps it.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Registers the kernel log reader with the tokio reactor. Not a syscall nix could wrap:
/// tokio's registration of a borrowed fd is what is unsafe here.
pub fn async_kernel_log(
    logger: KernelLogger,
) -> io::Result<tokio::io::unix::AsyncFd<KernelLogger>> {
    // SAFETY: the logger owns its ring buffer map fd for its whole lifetime and
    // `as_raw_fd` always returns that same fd; the AsyncFd owns the logger.
    unsafe { tokio::io::unix::AsyncFd::register(logger) }.map_err(|e| e.into_parts().1)
}

/// Gives the heap's free memory back to the system. Start-up parses the kernel's BTF and
/// the eBPF object, the policies and the catalog, and frees most of it; glibc keeps freed
/// heap pages resident until told, which was about 15 MB of an idle agent's 35 MB.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and only returns free pages of glibc's own
    // arenas to the kernel; it is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn netns_cookie_is_readable_for_a_fresh_socket() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsFd;
        assert!(netns_cookie(s.as_fd()).unwrap() > 0);
    }
}
