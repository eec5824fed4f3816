//! The worker library against a fake primary over a real `SOCK_SEQPACKET` pair, with real TCP
//! connections handed over by `SCM_RIGHTS`: what the primary sees on the channel and what the
//! application sees on the listener.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{local_listener, pair, tcp_pair, DEADLINE, F};
use roundhouse_proto::frame::Stats;
use roundhouse_proto::Recipient;
use roundhouse_worker::{is_drained, Closed, Worker};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

fn tokio_stream(s: std::net::TcpStream) -> tokio::net::TcpStream {
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(s).unwrap()
}

#[tokio::test]
async fn ready_is_sent_once() {
    let (mut p, w) = pair(1);
    w.ready();
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));
    // The next frame is not a second READY (a heartbeat comes within a second).
    assert_eq!(p.recv().await, Some(F::Heartbeat));
}

#[tokio::test]
async fn conns_are_acked_before_the_application_reads_them() {
    let (mut p, w) = pair(1);
    let mut listener = w.take_listener().unwrap();
    assert!(w.take_listener().is_none(), "the listener is taken once");
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));

    let l = local_listener();
    let (mut c1, s1) = tcp_pair(&l);
    let (mut c2, s2) = tcp_pair(&l);
    c1.write_all(b"one").unwrap();
    c2.write_all(b"two").unwrap();
    p.send_conns(&[(11, &s1), (12, &s2)]).await;

    assert_eq!(p.recv_significant().await, Some(F::Ack(vec![11, 12])));
    // At the ack, nothing has been read: the bytes are still in the socket (our copy of the fd
    // shares the socket with the worker's).
    let mut peek = [0u8; 8];
    assert_eq!(s1.peek(&mut peek).unwrap(), 3);
    assert_eq!(&peek[..3], b"one");
    assert_eq!(s2.peek(&mut peek).unwrap(), 3);

    // The application gets them in order, with the primary's ids and peer addresses.
    for (want_id, want_peer, want_data, client) in [
        (11, c1.local_addr().unwrap(), b"one", &mut c1),
        (12, c2.local_addr().unwrap(), b"two", &mut c2),
    ] {
        let (mut conn, peer) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
        assert_eq!(conn.conn_id(), Some(want_id));
        assert_eq!(peer, want_peer);
        assert_eq!(conn.peer_addr(), want_peer);
        assert_eq!(conn.listener_index(), 0);
        let mut got = [0u8; 3];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, want_data);
        conn.write_all(b"reply").await.unwrap();
        let _ = client;
    }
    let mut c1 = tokio_stream(c1);
    let mut got = [0u8; 5];
    c1.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"reply");
}

#[tokio::test]
async fn conns_wait_for_their_ack_when_the_primary_does_not_read() {
    let (mut p, w) = pair(1);
    let mut listener = w.take_listener().unwrap();
    // Fill the channel towards the primary with messages it does not read, so the ACK queues.
    let big = json!({ "pad": "x".repeat(60_000) });
    for _ in 0..10 {
        w.send(Recipient::Primary, &big).unwrap();
    }
    let l = local_listener();
    let (mut c, s) = tcp_pair(&l);
    c.write_all(b"data").unwrap();
    p.send_conns(&[(1, &s)]).await;

    // Not handed to the application while its ACK is unwritten, and its bytes stay unread.
    assert!(
        timeout(Duration::from_millis(300), listener.accept())
            .await
            .is_err(),
        "a connection was handed over before its ACK was written"
    );
    let mut peek = [0u8; 8];
    assert_eq!(s.peek(&mut peek).unwrap(), 4);

    // The primary reads: the messages, then the ACK, then the connection is handed over.
    for _ in 0..10 {
        assert!(matches!(
            p.recv().await,
            Some(F::Message(Recipient::Primary, _))
        ));
    }
    assert_eq!(p.recv().await, Some(F::Ack(vec![1])));
    let (conn, _) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    assert_eq!(conn.conn_id(), Some(1));
}

#[tokio::test]
async fn drain_serves_acked_conns_then_refuses_new_ones() {
    let (mut p, w) = pair(3);
    let mut listener = w.take_listener().unwrap();
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));
    assert!(!w.is_draining());

    let l = local_listener();
    let (_c1, s1) = tcp_pair(&l);
    // CONNS then DRAIN back to back, before the application accepted anything.
    p.send_conns(&[(1, &s1)]).await;
    p.send_drain().await;
    assert_eq!(p.recv_significant().await, Some(F::Ack(vec![1])));
    timeout(DEADLINE, w.draining()).await.unwrap();
    assert!(w.is_draining());

    // The connection acknowledged before the drain is still handed over, then the stream ends.
    let (conn, _) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    assert_eq!(conn.conn_id(), Some(1));
    let e = timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap_err();
    assert!(is_drained(&e), "{e}");
    assert!(is_drained(&listener.accept().await.unwrap_err()));

    // Connections that still arrive are refused, every id, in one frame per batch.
    let (_c2, s2) = tcp_pair(&l);
    let (_c3, s3) = tcp_pair(&l);
    p.send_conns(&[(2, &s2), (3, &s3)]).await;
    assert_eq!(p.recv_significant().await, Some(F::Refuse(vec![2, 3])));
    drop(conn);
}

#[tokio::test]
async fn stats_report_connections_and_requests_coalesced() {
    let (mut p, w) = pair(1);
    let mut listener = w.take_listener().unwrap();
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));

    let l = local_listener();
    let (_c, s) = tcp_pair(&l);
    p.send_conns(&[(1, &s)]).await;
    let (conn, _) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    for _ in 0..3 {
        w.count_request();
    }
    drop(conn);
    let want = Stats {
        accepted: 1,
        closed: 1,
        requests: 3,
    };
    p.wait_stats(want).await;
    assert_eq!(w.stats(), want);

    // A flood of requests over ~0.5 s produces a handful of STATS frames, not one per request.
    let start = Instant::now();
    let flood = {
        let w = w.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                for _ in 0..100 {
                    w.count_request();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let frames = p
        .wait_stats(Stats {
            requests: 5003,
            ..want
        })
        .await;
    flood.await.unwrap();
    let allowed = (start.elapsed().as_millis() / 100) as usize + 2;
    assert!(
        (2..=allowed).contains(&frames),
        "{frames} STATS frames in {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn flush_sends_the_last_stats_at_once() {
    let (mut p, w) = pair(1);
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));
    // A first STATS, so the next one is rate-limited.
    w.count_request();
    p.wait_stats(Stats {
        requests: 1,
        ..Stats::default()
    })
    .await;
    w.count_request();
    timeout(Duration::from_millis(50), w.flush())
        .await
        .expect("flush waited for the rate limit");
    assert_eq!(
        p.recv().await,
        Some(F::Stats(Stats {
            requests: 2,
            ..Stats::default()
        }))
    );
}

#[tokio::test]
async fn heartbeat_after_a_second_of_silence() {
    let (mut p, w) = pair(1);
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));
    let start = Instant::now();
    assert_eq!(p.recv().await, Some(F::Heartbeat));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "heartbeat after {waited:?}"
    );
}

#[tokio::test]
async fn messages_both_ways() {
    let (mut p, w) = pair(4);
    let mut messages = w.take_messages().unwrap();
    assert!(w.take_messages().is_none());

    // Delivered before anyone asked, and after.
    p.send_message(0, &json!({"ping": 1})).await;
    p.send_message(2, &json!(["a", 2])).await;
    let m = timeout(DEADLINE, messages.recv()).await.unwrap().unwrap();
    assert_eq!(
        (m.from, m.sender(), &m.value),
        (0, Recipient::Primary, &json!({"ping": 1}))
    );
    let m = timeout(DEADLINE, messages.recv()).await.unwrap().unwrap();
    assert_eq!(
        (m.from, m.sender(), &m.value),
        (2, Recipient::Worker(2), &json!(["a", 2]))
    );

    for to in [Recipient::Primary, Recipient::Worker(3), Recipient::All] {
        w.send(to, &json!({"pong": 1, "worker_id": 4})).unwrap();
        assert_eq!(
            p.recv_significant().await,
            Some(F::Message(to, json!({"pong": 1, "worker_id": 4})))
        );
    }

    let huge = json!("x".repeat(70_000));
    assert!(matches!(
        w.send(Recipient::Primary, &huge),
        Err(roundhouse_worker::SendError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn end_of_file_closes_the_worker() {
    let (p, w) = pair(1);
    let mut listener = w.take_listener().unwrap();
    let mut messages = w.take_messages().unwrap();
    drop(p);
    assert_eq!(timeout(DEADLINE, w.closed()).await.unwrap(), Closed::Eof);
    let e = timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(!is_drained(&e));
    assert!(messages.recv().await.is_none());
    assert!(w.is_draining());
    timeout(DEADLINE, w.draining()).await.unwrap();
}

#[tokio::test]
async fn malformed_frame_from_the_primary_is_a_protocol_error() {
    let (p, w) = pair(1);
    // An unknown kind.
    p.send_raw(&[0x7f, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    match timeout(DEADLINE, w.closed()).await.unwrap() {
        Closed::Protocol(e) => assert!(e.contains("unknown frame kind"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Closed::Protocol(String::new()).exit_code(),
        70,
        "a worker under roundhouse exits 70 on this"
    );

    // A CONNS frame whose fd count disagrees with its records.
    let (p, w) = pair(1);
    let l = local_listener();
    let (_c, s) = tcp_pair(&l);
    let mut b = Vec::new();
    roundhouse_proto::frame::encode_conns_header(&mut b, 2);
    for id in [1, 2] {
        roundhouse_proto::ConnRecord {
            id,
            listener: 0,
            peer: s.peer_addr().unwrap(),
        }
        .encode(&mut b);
    }
    use std::os::fd::AsRawFd;
    p.send_raw(&b, &[s.as_raw_fd()]).await;
    assert!(matches!(
        timeout(DEADLINE, w.closed()).await.unwrap(),
        Closed::Protocol(_)
    ));
}

#[tokio::test]
async fn inherited_listeners_are_accepted_on_and_closed_at_drain() {
    use roundhouse_proto::sys::seqpacket_pair;
    let (pfd, wfd) = seqpacket_pair().unwrap();
    let l = local_listener();
    let addr = l.local_addr().unwrap();
    let w = Worker::builder(wfd, 2)
        .policy(roundhouse_worker::Policy::ReusePort)
        .listeners(vec![l])
        .start()
        .unwrap();
    let mut p = common::Primary::new(pfd);
    let mut listener = w.take_listener().unwrap();
    assert_eq!(listener.local_addrs(), vec![addr]);
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));

    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut conn, peer) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(conn.conn_id(), None);
    client.write_all(b"hi").await.unwrap();
    let mut got = [0u8; 2];
    conn.read_exact(&mut got).await.unwrap();
    w.count_request();
    drop(conn);
    p.wait_stats(Stats {
        accepted: 1,
        closed: 1,
        requests: 1,
    })
    .await;

    p.send_drain().await;
    let e = timeout(DEADLINE, listener.accept())
        .await
        .unwrap()
        .unwrap_err();
    assert!(is_drained(&e));
    // Our copy was the only one: the port no longer accepts.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "the listener is still open after the drain"
    );
}

#[test]
fn starting_outside_a_runtime_is_a_clear_error() {
    let (_p, w) = roundhouse_proto::sys::seqpacket_pair().unwrap();
    let e = Worker::from_fd(w, 1).unwrap_err();
    assert!(matches!(e, roundhouse_worker::Error::NoRuntime), "{e}");
}
