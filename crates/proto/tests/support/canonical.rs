//! What "a frame decoded" must mean, shared by the property tests (`tests/fuzz_frames.rs`) and
//! the cargo-fuzz targets (`fuzz/fuzz_targets/`, which include this file by path).
//!
//! The decoders are strict (docs/protocol.md section 3: exact lengths, zero reserved bytes, known
//! kinds, exact fd counts), so every frame they accept has exactly one encoding: re-encoding the
//! decoded value must give back the very bytes that were decoded. A decoder that ignored a
//! reserved byte, trailing data or a wrong count would break that.

use roundhouse_proto::frame::{self, PrimaryFrame, WorkerFrame};
use roundhouse_proto::PROTOCOL_VERSION;

/// The canonical encoding of a decoded worker → primary frame.
pub fn encode_worker(f: &WorkerFrame<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    match *f {
        WorkerFrame::Ready { version } => {
            assert_eq!(
                version, PROTOCOL_VERSION,
                "READY with another version decoded"
            );
            frame::encode_ready(&mut b);
        }
        WorkerFrame::Ack(ids) => frame::encode_ids(&mut b, false, &ids.iter().collect::<Vec<_>>()),
        WorkerFrame::Refuse(ids) => {
            frame::encode_ids(&mut b, true, &ids.iter().collect::<Vec<_>>())
        }
        WorkerFrame::Stats(s) => frame::encode_stats(&mut b, s),
        WorkerFrame::Heartbeat => frame::encode_heartbeat(&mut b),
        WorkerFrame::Message { to, json } => frame::encode_message_from_worker(&mut b, to, json),
    }
    b
}

/// The canonical encoding of a decoded primary → worker frame.
pub fn encode_primary(f: &PrimaryFrame<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    match *f {
        PrimaryFrame::Conns(list) => {
            let recs: Vec<_> = list.iter().collect();
            assert_eq!(
                recs.len(),
                list.len(),
                "a validated record failed to decode"
            );
            let ids: Vec<u64> = list.ids().collect();
            assert_eq!(ids, recs.iter().map(|r| r.id).collect::<Vec<_>>());
            frame::encode_conns_header(&mut b, recs.len());
            for r in &recs {
                r.encode(&mut b);
            }
        }
        PrimaryFrame::Drain => frame::encode_drain(&mut b),
        PrimaryFrame::Message { from, json } => frame::encode_message_to_worker(&mut b, from, json),
    }
    b
}

/// Decodes `buf` (with `fds` fds attached) as the primary does; whatever is accepted must be
/// canonical and carry no fds. Panics (a finding) otherwise; never panics for rejected input.
pub fn check_worker_frame(buf: &[u8], fds: usize) {
    if let Ok(f) = frame::decode_worker_frame(buf, fds) {
        assert_eq!(fds, 0, "a worker frame with {fds} fds was accepted: {f:?}");
        assert!(buf.len() <= frame::MAX_FRAME);
        assert_eq!(
            encode_worker(&f),
            buf,
            "accepted a non-canonical frame {f:?}"
        );
        // Every recipient must be able to hold an accepted message as a value (H5: `1e999`).
        if let frame::WorkerFrame::Message { json, .. } = f {
            assert!(
                serde_json::from_slice::<serde_json::Value>(json).is_ok(),
                "accepted a message no recipient can parse: {f:?}"
            );
        }
    }
}

/// Decodes `buf` (with `fds` fds attached) as a worker does; whatever is accepted must be
/// canonical and carry exactly the fds its kind says.
pub fn check_primary_frame(buf: &[u8], fds: usize) {
    if let Ok(f) = frame::decode_primary_frame(buf, fds) {
        let expected = match f {
            PrimaryFrame::Conns(list) => list.len(),
            _ => 0,
        };
        assert_eq!(fds, expected, "accepted {fds} fds for {f:?}");
        assert!(buf.len() <= frame::MAX_FRAME);
        assert_eq!(
            encode_primary(&f),
            buf,
            "accepted a non-canonical frame {f:?}"
        );
    }
}
