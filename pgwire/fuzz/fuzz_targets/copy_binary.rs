//! Arbitrary bytes as one binary COPY payload from the server, with and without the file
//! header: splitting must accept or reject, never panic, and every tuple it reads must be
//! written back to exactly the bytes it came from.
//!
//! Run: `cd pgwire/fuzz && cargo +nightly fuzz run copy_binary`

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_pgwire::{join_binary_tuple, split_binary, BinaryPart, BINARY_TRAILER};

fuzz_target!(|data: &[u8]| {
    for header in [false, true] {
        let Ok(parts) = split_binary(data, header) else {
            continue;
        };
        let mut again = Vec::with_capacity(data.len());
        for part in &parts {
            match part {
                BinaryPart::Header(h) => again.extend_from_slice(h),
                BinaryPart::Trailer => again.extend_from_slice(&BINARY_TRAILER),
                BinaryPart::Tuple(values) => {
                    assert!(join_binary_tuple(values, &mut again).is_ok());
                }
            }
        }
        assert_eq!(again, data);
    }
});
