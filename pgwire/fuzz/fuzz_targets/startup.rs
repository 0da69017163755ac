//! Arbitrary bytes as the first message of a connection: the decoder must reject or accept, never
//! panic, and an accepted request must re-encode to exactly the bytes it came from and decode
//! again to itself.
//!
//! Run: `cd pgwire/fuzz && cargo +nightly fuzz run startup`

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_pgwire::{decode_startup, encode_startup_request};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(msg)) = decode_startup(&mut buf) {
        let consumed = data.len() - buf.len();
        let mut again = BytesMut::new();
        encode_startup_request(&msg, &mut again);
        assert_eq!(again.as_ref(), &data[..consumed]);
        assert_eq!(decode_startup(&mut again), Ok(Some(msg)));
        assert!(again.is_empty());
    }
});
