//! A peer that announces huge lengths or counts costs no memory: with a counting global
//! allocator, no decoder call on such input allocates more than a few KiB, whatever the claimed
//! size. This binary holds a single test so no other test's allocations are counted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use common::*;
use portcullis_pgwire::{decode_frame, decode_startup, parse_backend, parse_frontend};

/// Records the largest single allocation request.
struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is updated.
#[allow(
    unsafe_code,
    reason = "a global allocator is an unsafe impl; this one counts allocation sizes for the test"
)]
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout (see `alloc`/`realloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which we pass on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns the largest single allocation it made.
fn largest_allocation_during(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    f();
    LARGEST.load(Ordering::SeqCst)
}

const LIMIT: usize = 16 * 1024;

#[test]
fn claimed_lengths_and_counts_are_never_allocated() {
    // Inputs are built before measuring.
    let frames: Vec<(&str, BytesMut)> = vec![
        (
            "frame claiming 2 GiB",
            BytesMut::from(&b"d\x7f\xff\xff\xff"[..]),
        ),
        (
            "frame claiming 4 GiB",
            BytesMut::from(&b"d\xff\xff\xff\xff"[..]),
        ),
        (
            "frame claiming 60 MiB (under max)",
            BytesMut::from(&b"d\x03\xc0\x00\x00abc"[..]),
        ),
    ];
    for (name, mut buf) in frames {
        let largest = largest_allocation_during(|| {
            let _ = decode_frame(&mut buf, usize::MAX);
        });
        assert!(largest < LIMIT, "{name}: allocated {largest} bytes");
    }

    let startups: Vec<(&str, BytesMut)> = vec![
        (
            "startup claiming 2 GiB",
            BytesMut::from(&b"\x7f\xff\xff\xff\x00\x03\x00\x00"[..]),
        ),
        (
            "startup claiming the maximum",
            BytesMut::from(&b"\x00\x00\x27\x10\x00\x03\x00\x00"[..]),
        ),
    ];
    for (name, mut buf) in startups {
        let largest = largest_allocation_during(|| {
            let _ = decode_startup(&mut buf);
        });
        assert!(largest < LIMIT, "{name}: allocated {largest} bytes");
    }

    let bodies = [
        (
            "DataRow with 65535 columns claimed",
            framed(b'D', b"\xff\xff\x00\x00\x00\x01a"),
        ),
        (
            "DataRow value claiming 2 GiB",
            framed(b'D', b"\x00\x01\x7f\xff\xff\xffab"),
        ),
        (
            "RowDescription with 65535 fields claimed",
            framed(b'T', b"\xff\xffid\x00"),
        ),
        (
            "ParameterDescription with 65535 types claimed",
            framed(b't', b"\xff\xff\x00\x00\x00\x17"),
        ),
        (
            "CopyOutResponse with 65535 columns claimed",
            framed(b'H', b"\x00\xff\xff\x00\x00"),
        ),
        (
            "NegotiateProtocolVersion with 2^31-1 options claimed",
            framed(b'v', b"\x00\x00\x00\x00\x7f\xff\xff\xffa\x00"),
        ),
        (
            "Parse with 65535 types claimed",
            framed(b'P', b"\x00\x00\xff\xff"),
        ),
        (
            "Bind with 65535 formats claimed",
            framed(b'B', b"\x00\x00\xff\xff\x00\x00"),
        ),
        (
            "Bind with 65535 values claimed",
            framed(b'B', b"\x00\x00\x00\x00\xff\xff"),
        ),
        (
            "FunctionCall with 65535 args claimed",
            framed(b'F', b"\x00\x00\x00\x01\x00\x00\xff\xff"),
        ),
    ];
    for (name, bytes) in bodies {
        let raw = frame_one(&bytes);
        let largest = largest_allocation_during(|| {
            assert!(parse_backend(&raw).is_err() || parse_frontend(&raw).is_err());
            let _ = parse_frontend(&raw);
        });
        assert!(largest < LIMIT, "{name}: allocated {largest} bytes");
    }
}
