//! Arbitrary bytes as a segment file: the parser must reject or accept, never panic, and never
//! accept a segment whose records do not chain; and as the tail of a compressed segment, whose
//! seal trailer is read back only when it re-encodes to the same bytes.
//!
//! Run: `cd audit-store/fuzz && cargo +nightly fuzz run segment_reader`

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_audit_store::format::{parse_line, Line};
use portcullis_audit_store::{check_segment_bytes, encode_trailer, trailer_seal, SigningKey};

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        if let Ok(Line::Record(record)) = parse_line(line) {
            // Events are non-empty JSON values: hashing any accepted record must be fine.
            assert!(!record.event.is_empty());
            let _ = record.computed_hash();
        }
    }
    let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
    if let Ok(summary) = check_segment_bytes(data, Some(&key)) {
        // Accepted with a key: every seal present was signed by that key.
        assert!(summary.seal.map_or(true, |s| s.signature_is_valid(&key)));
    }
    let _ = check_segment_bytes(data, None);
    // As the tail of a compressed segment: a seal is read only from a trailer that encodes
    // back to exactly the bytes it was read from.
    if let Some(seal) = trailer_seal(data) {
        let mut trailer = Vec::new();
        encode_trailer(&mut trailer, &seal);
        assert!(data.ends_with(&trailer));
    }
});
