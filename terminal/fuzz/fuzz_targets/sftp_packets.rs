//! Arbitrary bytes as both directions of an SFTP channel: never a panic and never a buffer
//! past the limit; the framer hands back exactly the bytes it took in, cut at the lengths
//! the packets declare, however the input is split; and every packet the agent writes
//! itself (a STATUS, a VERSION, a REALPATH) decodes to what it was written from.
//!
//! Run: `cd terminal/fuzz && cargo +nightly fuzz run sftp_packets`

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_terminal::sftp::{
    realpath, status, version, ClientPacket, Framer, Op, ServerPacket, MAX_PACKET,
};

fuzz_target!(|data: &[u8]| {
    // The first byte chooses where the stream is split into two messages.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split).min(stream.len());
    let mut framer = Framer::default();
    let mut framed = Vec::new();
    let mut failed = false;
    for part in [&stream[..cut], &stream[cut..]] {
        framer.push(part);
        loop {
            match framer.next_packet() {
                Ok(Some(packet)) => {
                    assert!(packet.len() <= MAX_PACKET + 4);
                    let _ = ClientPacket::decode(&packet);
                    let _ = ServerPacket::decode(&packet);
                    framed.extend_from_slice(&packet);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(framer.pending() <= stream.len());
    }
    if !failed {
        assert_eq!(&stream[..framed.len()], &framed[..]);
        assert_eq!(framed.len() + framer.pending(), stream.len());
    }

    let message = String::from_utf8_lossy(stream);
    let id = u32::from(split);
    let s = status(id, 3, &message);
    assert_eq!(
        ServerPacket::decode(&s),
        Ok(ServerPacket::Status {
            id,
            code: 3,
            message: message.as_bytes()
        })
    );
    let v = version(3, &[(stream, stream)]);
    assert_eq!(
        ServerPacket::decode(&v),
        Ok(ServerPacket::Version {
            version: 3,
            extensions: vec![(stream, stream)]
        })
    );
    let r = realpath(id, stream);
    assert_eq!(
        ClientPacket::decode(&r),
        Ok(ClientPacket::Request {
            id,
            op: Op::Realpath { path: stream }
        })
    );
});
