//! The one module with `unsafe` and raw syscalls. Each block says why it is sound;
//! everything else in the agent is safe Rust.

#![allow(
    unsafe_code,
    reason = "the agent's one module for raw syscalls; the workspace denies unsafe everywhere else"
)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

/// `SO_NETNS_COOKIE` (Linux 5.14); not in every libc crate version.
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

/// Mounts bpffs at `path` (like other eBPF daemons do when the boot did not).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = path_cstring(path)?;
    let fstype = c"bpf";
    let source = c"bpf";
    // SAFETY: every pointer is a valid NUL-terminated string for the call; data is null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The user name of `uid` through NSS (so LDAP/SSSD users resolve too).
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain data; zeroed is a valid initial value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: pwd, buf and result are valid for writes for the sizes given; the strings
        // in pwd point into buf, which outlives their use below.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: pw_name is a NUL-terminated string inside buf.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Sets the process's umask and returns the previous one; tests prove that state files do
/// not depend on it.
#[cfg(test)]
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches no memory; it changes only the process's mask.
    unsafe { libc::umask(mask) }
}

/// The reader of the kernel programs' log ring (aya-log), owned by whoever pumps it.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Registers the kernel log reader with the tokio reactor.
pub fn async_kernel_log(
    logger: KernelLogger,
) -> io::Result<tokio::io::unix::AsyncFd<KernelLogger>> {
    // SAFETY: the logger owns its ring buffer map fd for its whole lifetime and
    // `as_raw_fd` always returns that same fd; the AsyncFd owns the logger.
    unsafe { tokio::io::unix::AsyncFd::register(logger) }.map_err(|e| e.into_parts().1)
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn root_user_resolves_by_uid() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn netns_cookie_is_readable_for_a_fresh_socket() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsFd;
        assert!(netns_cookie(s.as_fd()).unwrap() > 0);
    }
}
