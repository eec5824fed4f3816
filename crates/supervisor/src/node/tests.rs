//! Unit tests of the node module.
use super::*;
use std::net::SocketAddr;

fn rec(id: u64, listener: u16) -> ConnRecord {
    ConnRecord {
        id,
        listener,
        peer: "127.0.0.1:5555".parse::<SocketAddr>().unwrap(),
    }
}

fn events(c: &mut NodeCodec, data: &[u8]) -> Vec<Result<NodeEvent, String>> {
    c.feed(data).unwrap();
    std::iter::from_fn(|| c.next_event()).collect()
}

fn one(data: &[u8]) -> Result<NodeEvent, String> {
    let mut c = NodeCodec::new();
    let mut evs = events(&mut c, data);
    assert_eq!(evs.len(), 1, "{evs:?}");
    evs.remove(0)
}

#[test]
fn conn_line_is_one_json_handle_message() {
    let mut c = NodeCodec::new();
    let mut out = Vec::new();
    assert!(c.encode_conn(&mut out, &rec(42, 1)));
    assert_eq!(out.last(), Some(&b'\n'));
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["cmd"], "NODE_HANDLE");
    assert_eq!(v["type"], "net.Native");
    assert_eq!(v["msg"]["cmd"], "NODE_ROUNDHOUSE_CONN");
    assert_eq!(v["msg"]["id"], 42);
    assert_eq!(v["msg"]["listener"], 1);
    assert_eq!(c.handle_in_flight(), Some(42));
}

#[test]
fn one_handle_in_flight_until_ack_or_nack() {
    let mut c = NodeCodec::new();
    let mut out = Vec::new();
    assert!(c.encode_conn(&mut out, &rec(1, 0)));
    let before = out.len();
    assert!(!c.encode_conn(&mut out, &rec(2, 0)));
    assert_eq!(
        out.len(),
        before,
        "nothing written while a handle is in flight"
    );
    assert_eq!(
        events(&mut c, b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"),
        vec![Ok(NodeEvent::HandleAck(1))]
    );
    assert_eq!(c.handle_in_flight(), None);
    assert!(c.encode_conn(&mut out, &rec(2, 0)));
    assert_eq!(
        events(&mut c, b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n"),
        vec![Ok(NodeEvent::HandleNack(2))]
    );
    assert!(c.encode_conn(&mut out, &rec(3, 0)));
}

#[test]
fn handle_answer_without_handle_in_flight_is_an_error() {
    assert!(one(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n").is_err());
    assert!(one(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n").is_err());
}

#[test]
fn shim_messages_decode() {
    assert_eq!(
        one(b"{\"cmd\":\"NODE_ROUNDHOUSE_READY\",\"version\":1}\n"),
        Ok(NodeEvent::Ready)
    );
    assert_eq!(
        one(b"{\"cmd\":\"NODE_ROUNDHOUSE_ACK\",\"ids\":[7,8]}\n"),
        Ok(NodeEvent::Ack(vec![7, 8]))
    );
    assert_eq!(
        one(b"{\"cmd\":\"NODE_ROUNDHOUSE_REFUSE\",\"ids\":[9]}\n"),
        Ok(NodeEvent::Refuse(vec![9]))
    );
    assert_eq!(
        one(b"{\"cmd\":\"NODE_ROUNDHOUSE_STATS\",\"accepted\":3,\"closed\":2,\"requests\":10}\n"),
        Ok(NodeEvent::Stats(Stats {
            accepted: 3,
            closed: 2,
            requests: 10
        }))
    );
    assert_eq!(
        one(b"{\"cmd\":\"NODE_ROUNDHOUSE_HEARTBEAT\"}\n"),
        Ok(NodeEvent::Heartbeat)
    );
    assert_eq!(
        one(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{}}\n"),
        Ok(NodeEvent::WorkerHandle)
    );
}

#[test]
fn bad_shim_messages_are_errors() {
    for line in [
        &b"{\"cmd\":\"NODE_ROUNDHOUSE_READY\",\"version\":2}\n"[..],
        b"{\"cmd\":\"NODE_ROUNDHOUSE_READY\"}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_ACK\",\"ids\":[]}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_ACK\",\"ids\":[-1]}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_ACK\",\"ids\":[1.5]}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_ACK\"}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_STATS\",\"accepted\":1,\"closed\":1}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_SEND\",\"to\":-1,\"message\":1}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_SEND\",\"to\":4294967295,\"message\":1}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_SEND\",\"to\":\"everyone\",\"message\":1}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_SEND\",\"to\":1}\n",
        b"not json\n",
        b"\n",
        b"{\"a\":1}{\"b\":2}\n",
    ] {
        assert!(one(line).is_err(), "{}", String::from_utf8_lossy(line));
    }
    let mut ids = String::from("{\"cmd\":\"NODE_ROUNDHOUSE_ACK\",\"ids\":[");
    ids.push_str(&vec!["1"; ACK_MAX_IDS + 1].join(","));
    ids.push_str("]}\n");
    assert!(one(ids.as_bytes()).is_err());
}

#[test]
fn app_messages_go_to_the_primary_verbatim() {
    for line in [
        &b"{\"ping\":1,\"x\":[1,2.5,\"a\\nb\"]}"[..],
        b"42",
        b"\"str\"",
        b"null",
        b"[1,2]",
        b"{\"cmd\":\"reload\"}",
        b"{\"cmd\":\"NODE_\"}",
    ] {
        let mut data = line.to_vec();
        data.push(b'\n');
        assert_eq!(
            one(&data),
            Ok(NodeEvent::Message {
                to: Recipient::Primary,
                json: line.to_vec()
            })
        );
    }
}

#[test]
fn node_escaped_lone_surrogates_become_replacement_characters() {
    // Node's JSON.stringify writes a lone surrogate as an escape; that is a legitimate
    // process.send() and must not kill the worker.
    assert_eq!(
        one(b"{\"s\":\"a\\ud800b\\uDFFF\\ud83d\\ude00\\\\ud800\"}\n"),
        Ok(NodeEvent::Message {
            to: Recipient::Primary,
            json: b"{\"s\":\"a\\ufffdb\\ufffd\\ud83d\\ude00\\\\ud800\"}".to_vec()
        })
    );
    assert_eq!(
        one(b"{\"cmd\":\"NODE_ROUNDHOUSE_SEND\",\"to\":\"all\",\"message\":\"\\udc00\"}\n"),
        Ok(NodeEvent::Message {
            to: Recipient::All,
            json: "\"\u{fffd}\"".as_bytes().to_vec()
        })
    );
    assert_eq!(replace_lone_surrogates(b"{\"a\":\"\\ud83d\\ude00\"}"), None);
    assert_eq!(
        replace_lone_surrogates(b"{\"a\\\"\\ud800\":1}").as_deref(),
        Some(&b"{\"a\\\"\\ufffd\":1}"[..])
    );
    // Still not JSON: still an error.
    assert!(one(b"{\"s\":\"\\ud800\"\n").is_err());
}

#[test]
fn send_maps_recipients() {
    let cases: [(&[u8], Recipient); 3] = [
        (b"0", Recipient::Primary),
        (b"3", Recipient::Worker(3)),
        (b"\"all\"", Recipient::All),
    ];
    for (to, want) in cases {
        let mut line = b"{\"cmd\":\"NODE_ROUNDHOUSE_SEND\",\"to\":".to_vec();
        line.extend_from_slice(to);
        line.extend_from_slice(b",\"message\":{\"ping\":\"p\"}}\n");
        assert_eq!(
            one(&line),
            Ok(NodeEvent::Message {
                to: want,
                json: b"{\"ping\":\"p\"}".to_vec()
            })
        );
    }
}

#[test]
fn other_internal_messages_are_ignored() {
    let mut c = NodeCodec::new();
    assert_eq!(
        events(
            &mut c,
            b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\"}\n{\"cmd\":\"NODE_ROUNDHOUSE_HEARTBEAT\"}\n"
        ),
        vec![Ok(NodeEvent::Heartbeat)]
    );
}

#[test]
fn lines_split_and_joined_across_reads() {
    let mut c = NodeCodec::new();
    let stream = b"{\"cmd\":\"NODE_ROUNDHOUSE_READY\",\"version\":1}\n{\"cmd\":\"NODE_ROUNDHOUSE_ACK\",\"ids\":[1]}\n{\"x\":1}\n";
    let mut got = Vec::new();
    for chunk in stream.chunks(7) {
        got.extend(events(&mut c, chunk));
    }
    assert_eq!(
        got,
        vec![
            Ok(NodeEvent::Ready),
            Ok(NodeEvent::Ack(vec![1])),
            Ok(NodeEvent::Message {
                to: Recipient::Primary,
                json: b"{\"x\":1}".to_vec()
            })
        ]
    );
    assert_eq!(c.next_event(), None);
    // All of it at once.
    let mut c = NodeCodec::new();
    assert_eq!(events(&mut c, stream), got);
}

#[test]
fn oversized_lines_are_errors() {
    let mut c = NodeCodec::new();
    let big = vec![b' '; MAX_LINE];
    c.feed(&big).unwrap();
    assert!(c.feed(b" ").is_err(), "partial line over the bound");

    let mut c = NodeCodec::new();
    let mut line = vec![b' '; MAX_LINE + 1];
    line.push(b'\n');
    // A complete line in one read: feed sees no partial line, next_event rejects it.
    c.feed(&line).unwrap();
    assert!(matches!(c.next_event(), Some(Err(_))));
}

#[test]
fn drain_and_handle_ack_lines() {
    let mut out = Vec::new();
    NodeCodec::encode_drain(&mut out);
    NodeCodec::encode_handle_ack(&mut out);
    assert_eq!(
        out,
        b"{\"cmd\":\"NODE_ROUNDHOUSE_DRAIN\"}\n{\"cmd\":\"NODE_HANDLE_ACK\"}\n"
    );
}

#[test]
fn messages_to_the_app() {
    let mut out = Vec::new();
    NodeCodec::encode_message(&mut out, 2, b"{\n  \"ping\": \"a\\nb\"\n}").unwrap();
    assert_eq!(out, b"{   \"ping\": \"a\\nb\" }\n");
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["ping"], "a\nb");

    // Node would route this one to its internals: wrapped for the shim.
    let mut out = Vec::new();
    NodeCodec::encode_message(&mut out, 0, b"{\"cmd\":\"NODE_HANDLE\"}").unwrap();
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["cmd"], "NODE_ROUNDHOUSE_MSG");
    assert_eq!(v["from"], 0);
    assert_eq!(v["message"]["cmd"], "NODE_HANDLE");

    let mut out = Vec::new();
    assert!(NodeCodec::encode_message(&mut out, 0, b"{\"a\":").is_err());
    assert!(out.is_empty());
}

#[test]
fn warn_lines_are_consumed_and_bad_ones_are_protocol_errors() {
    let mut c = NodeCodec::new();
    let evs = events(
        &mut c,
        b"{\"cmd\":\"NODE_ROUNDHOUSE_WARN\",\"worker\":2,\"pid\":77,\"message\":\"the app listens on /tmp/x.sock itself\"}\n{\"cmd\":\"NODE_ROUNDHOUSE_HEARTBEAT\"}\n",
    );
    assert_eq!(
        evs,
        vec![Ok(NodeEvent::Heartbeat)],
        "the warning is no event"
    );
    assert_eq!(c.warnings, 1);
    for bad in [
        &b"{\"cmd\":\"NODE_ROUNDHOUSE_WARN\",\"pid\":77,\"message\":\"x\"}\n"[..],
        b"{\"cmd\":\"NODE_ROUNDHOUSE_WARN\",\"worker\":-1,\"pid\":77,\"message\":\"x\"}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_WARN\",\"worker\":1,\"pid\":77}\n",
        b"{\"cmd\":\"NODE_ROUNDHOUSE_WARN\",\"worker\":1,\"pid\":\"77\",\"message\":\"x\"}\n",
    ] {
        assert!(one(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn a_flood_of_warnings_is_capped() {
    let mut c = NodeCodec::new();
    let line = b"{\"cmd\":\"NODE_ROUNDHOUSE_WARN\",\"worker\":1,\"pid\":7,\"message\":\"again\"}\n";
    for _ in 0..1000 {
        assert!(events(&mut c, line).is_empty());
    }
    assert_eq!(
        c.warnings, 1000,
        "counted, though only MAX_WARNINGS are logged"
    );
}

#[test]
fn warning_text_is_one_bounded_line() {
    assert_eq!(warning_text("a\nb\u{1b}[31mc"), "a b [31mc");
    let long = "x".repeat(MAX_WARNING_CHARS + 10);
    let t = warning_text(&long);
    assert_eq!(t.chars().count(), MAX_WARNING_CHARS + 1);
    assert!(t.ends_with('…'));
    assert_eq!(
        warning_text(&"y".repeat(MAX_WARNING_CHARS)).chars().count(),
        MAX_WARNING_CHARS
    );
}
