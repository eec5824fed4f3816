//! Property tests of the frame decoders: the CI-sized fuzz run (issue 7, item 1).
//!
//! For any bytes and any number of attached fds, `decode_worker_frame` (what the primary runs on
//! every frame a worker sends) and `decode_primary_frame` (what a worker runs) never panic, and
//! what they accept is canonical (see `support/canonical.rs`). Inputs come three ways: raw
//! arbitrary bytes (up to past the 64 KiB maximum), a valid 8-byte header with an arbitrary body
//! (to get past the header checks into each kind's decoder), and valid frames of every kind with
//! a few mutations (bit flips, truncation, appended bytes, wrong fd counts). Valid frames must
//! round-trip exactly.
//!
//! Cases per property: 1000 by default (a few seconds in a debug build); set `PROPTEST_CASES`
//! for a longer run. The coverage-guided fuzzer is `cargo +nightly fuzz run` in `../fuzz`
//! (docs/reliability.md).

mod support;

use proptest::collection::vec;
use proptest::prelude::*;
use roundhouse_proto::frame::{self, kind, ConnRecord, PrimaryFrame, Recipient, Stats};
use support::canonical::{check_primary_frame, check_worker_frame, encode_primary};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Lengths that matter: empty, around the header, small bodies, and around the 64 KiB limit.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..64,
        3 => 64usize..2048,
        1 => (frame::MAX_FRAME - 64)..(frame::MAX_FRAME + 64),
    ]
}

/// Arbitrary bytes: element by element when short (so failures shrink well), from a seeded
/// generator when long (64 KiB of per-byte value trees would dominate the run time).
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    length().prop_flat_map(|n| {
        if n <= 2048 {
            vec(any::<u8>(), n).boxed()
        } else {
            any::<u64>().prop_map(move |seed| noise(seed, n)).boxed()
        }
    })
}

/// `n` pseudo-random bytes from `seed` (xorshift64*).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// An fd count as `recvmsg` could report it: mostly 0 or small, sometimes past `CONNS_MAX`.
fn fds() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 4 => 1usize..=33, 1 => 34usize..=253]
}

/// A JSON text: a small tree of objects, arrays, strings and numbers, serialized.
fn json() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            vec(("[a-z]{0,8}", inner), 0..8)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
    .prop_map(|v| serde_json::to_vec(&v).expect("serialize"))
}

/// A valid worker → primary frame, encoded.
fn worker_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just({
            let mut b = Vec::new();
            frame::encode_ready(&mut b);
            b
        }),
        (any::<bool>(), vec(any::<u64>(), 1..=frame::ACK_MAX_IDS)).prop_map(|(refuse, ids)| {
            let mut b = Vec::new();
            frame::encode_ids(&mut b, refuse, &ids);
            b
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, c, r)| {
            let mut b = Vec::new();
            let s = Stats {
                accepted: a,
                closed: c,
                requests: r,
            };
            frame::encode_stats(&mut b, s);
            b
        }),
        Just({
            let mut b = Vec::new();
            frame::encode_heartbeat(&mut b);
            b
        }),
        (any::<u32>(), json()).prop_map(|(to, j)| {
            let mut b = Vec::new();
            frame::encode_message_from_worker(&mut b, Recipient::from_wire(to), &j);
            b
        }),
    ]
}

fn record() -> impl Strategy<Value = ConnRecord> {
    (
        any::<u64>(),
        any::<u16>(),
        any::<bool>(),
        any::<[u8; 16]>(),
        any::<u16>(),
    )
        .prop_map(|(id, listener, v6, a, port)| {
            let ip: std::net::IpAddr = if v6 {
                std::net::Ipv6Addr::from(a).into()
            } else {
                std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()
            };
            ConnRecord {
                id,
                listener,
                peer: std::net::SocketAddr::new(ip, port),
            }
        })
}

/// A valid primary → worker frame, encoded, with the number of fds it must carry.
fn primary_frame() -> impl Strategy<Value = (Vec<u8>, usize)> {
    prop_oneof![
        vec(record(), 1..=frame::CONNS_MAX).prop_map(|recs| {
            let mut b = Vec::new();
            frame::encode_conns_header(&mut b, recs.len());
            for r in &recs {
                r.encode(&mut b);
            }
            (b, recs.len())
        }),
        Just({
            let mut b = Vec::new();
            frame::encode_drain(&mut b);
            (b, 0)
        }),
        (any::<u32>(), json()).prop_map(|(from, j)| {
            let mut b = Vec::new();
            frame::encode_message_to_worker(&mut b, from, &j);
            (b, 0)
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Set(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..40).prop_map(Mutation::Append),
    ]
}

fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        match m {
            Mutation::Flip(i, x) if !b.is_empty() => {
                let n = b.len();
                // Bias towards the header, where most of the checks are.
                let at = if i % 2 == 0 { i % n.min(16) } else { i % n };
                b[at] ^= x;
            }
            Mutation::Set(i, x) if !b.is_empty() => {
                let n = b.len();
                b[i % n] = *x;
            }
            Mutation::Truncate(i) => {
                let n = b.len();
                b.truncate(i % (n + 1));
            }
            Mutation::Append(extra) => b.extend_from_slice(extra),
            _ => {}
        }
    }
    b
}

/// Every kind byte that means something, plus neighbours and junk.
fn kind_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        8 => prop::sample::select(vec![
            kind::CONNS,
            kind::DRAIN,
            kind::MESSAGE_TO_WORKER,
            kind::READY,
            kind::ACK,
            kind::REFUSE,
            kind::STATS,
            kind::HEARTBEAT,
            kind::MESSAGE_FROM_WORKER,
        ]),
        1 => any::<u8>(),
    ]
}

/// Arguments near the boundaries of every count, version and id.
fn arg() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..=3,
        prop::sample::select(vec![
            31,
            32,
            33,
            1023,
            1024,
            1025,
            frame::TO_ALL,
            u32::MAX - 1
        ]),
        any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_either_decoder(buf in bytes(), n in fds()) {
        check_worker_frame(&buf, n);
        check_primary_frame(&buf, n);
    }

    #[test]
    fn a_valid_header_with_any_body_never_panics(
        k in kind_byte(),
        a in arg(),
        body in prop_oneof![
            3 => vec(any::<u8>(), 0..300),
            1 => json(),
        ],
        n in fds(),
    ) {
        let mut buf = vec![k, 0, 0, 0];
        buf.extend_from_slice(&a.to_le_bytes());
        buf.extend_from_slice(&body);
        check_worker_frame(&buf, n);
        check_primary_frame(&buf, n);
    }

    #[test]
    fn valid_worker_frames_round_trip_and_mutants_never_panic(
        buf in worker_frame(),
        muts in vec(mutation(), 1..4),
        n in fds(),
    ) {
        let f = frame::decode_worker_frame(&buf, 0);
        prop_assert!(f.is_ok(), "valid frame rejected: {:?}", f);
        check_worker_frame(&buf, 0);
        // The same frame with fds attached is malformed.
        if n > 0 {
            prop_assert!(frame::decode_worker_frame(&buf, n).is_err());
        }
        let bad = mutate(buf, &muts);
        check_worker_frame(&bad, 0);
        check_worker_frame(&bad, n);
        check_primary_frame(&bad, n);
    }

    #[test]
    fn valid_primary_frames_round_trip_and_mutants_never_panic(
        (buf, want) in primary_frame(),
        muts in vec(mutation(), 1..4),
        n in fds(),
    ) {
        let f = frame::decode_primary_frame(&buf, want);
        prop_assert!(f.is_ok(), "valid frame rejected: {:?}", f);
        prop_assert_eq!(encode_primary(&f.unwrap()), buf.clone());
        if n != want {
            prop_assert!(frame::decode_primary_frame(&buf, n).is_err());
        }
        let bad = mutate(buf, &muts);
        check_primary_frame(&bad, want);
        check_primary_frame(&bad, n);
        check_worker_frame(&bad, n);
    }
}

/// The decoded records of a valid CONNS frame are the ones encoded, in order.
#[test]
fn conns_records_survive_the_round_trip() {
    proptest!(config(), |(recs in vec(record(), 1..=frame::CONNS_MAX))| {
        let mut b = Vec::new();
        frame::encode_conns_header(&mut b, recs.len());
        for r in &recs {
            r.encode(&mut b);
        }
        match frame::decode_primary_frame(&b, recs.len()) {
            Ok(PrimaryFrame::Conns(list)) => {
                prop_assert_eq!(list.iter().collect::<Vec<_>>(), recs);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    });
}
