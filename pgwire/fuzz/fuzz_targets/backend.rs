//! Arbitrary bytes as a server stream: framing and parsing must reject or accept, never panic;
//! every accepted message must decode again to itself after encoding, and re-encode to exactly the
//! frame it came from unless it is an authentication request whose data is deliberately dropped.
//!
//! Run: `cd pgwire/fuzz && cargo +nightly fuzz run backend`

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis_pgwire::{
    decode_frame, encode_backend, parse_backend, Authentication, BackendMessage,
};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(raw)) = decode_frame(&mut buf, 1 << 16) {
        let Ok(msg) = parse_backend(&raw) else {
            continue;
        };
        let mut again = BytesMut::new();
        encode_backend(&msg, &mut again);
        if !matches!(
            msg,
            BackendMessage::Authentication(Authentication::Unsupported(_))
        ) {
            assert_eq!(again.as_ref(), raw.frame.as_ref());
        }
        let reframed = decode_frame(&mut again, 1 << 16).ok().flatten();
        let reparsed = reframed.as_ref().map(parse_backend);
        assert_eq!(reparsed, Some(Ok(msg)));
    }
});
