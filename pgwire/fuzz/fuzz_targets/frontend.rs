//! Arbitrary bytes as a client stream after startup: framing and parsing must reject or accept,
//! never panic, and every accepted message must re-encode to exactly the frame it came from.
//!
//! Run: `cd pgwire/fuzz && cargo +nightly fuzz run frontend`

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_pgwire::{decode_frame, encode_frontend, parse_frontend};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(raw)) = decode_frame(&mut buf, 1 << 16) {
        let Ok(msg) = parse_frontend(&raw) else {
            continue;
        };
        let mut again = BytesMut::new();
        encode_frontend(&msg, &mut again);
        assert_eq!(again.as_ref(), raw.frame.as_ref());
        let reframed = decode_frame(&mut again, 1 << 16).ok().flatten();
        let reparsed = reframed.as_ref().map(parse_frontend);
        assert_eq!(reparsed, Some(Ok(msg)));
    }
});
