//! The wall clock events and sessions are stamped with, and the host name every event
//! carries.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 before 1970, which a clock set that far back would mean).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The kernel's host name, read once.
pub fn hostname() -> Arc<str> {
    static HOST: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().into())
            .unwrap_or_else(|_| "".into())
    })
    .clone()
}

pub fn now_secs() -> u64 {
    now_ms() / 1000
}
