//! `axum::serve` on a worker's `Listener` (feature `axum`): requests served over handed
//! connections, and a graceful stop once the accept stream has drained.

#![cfg(feature = "axum")]

mod common;

use std::io::{Read, Write};

use common::{local_listener, pair, tcp_pair, DEADLINE, F};
use tokio::time::timeout;

#[tokio::test]
async fn axum_serves_handed_connections_and_stops_after_the_drain() {
    let (mut p, w) = pair(5);
    let listener = w.take_listener().unwrap();
    let done = listener.drained();
    let counter = w.clone();
    let router = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            counter.count_request();
            async { "hello from axum\n" }
        }),
    );
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(done)
            .await
    });
    w.ready();
    assert_eq!(p.recv().await, Some(F::Ready));

    let l = local_listener();
    let (mut c, s) = tcp_pair(&l);
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    p.send_conns(&[(1, &s)]).await;
    assert_eq!(p.recv_significant().await, Some(F::Ack(vec![1])));
    drop(s);
    let resp = tokio::task::spawn_blocking(move || {
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        resp
    })
    .await
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("hello from axum\n"), "{resp}");

    p.send_drain().await;
    timeout(DEADLINE, server)
        .await
        .expect("axum did not stop after the drain")
        .unwrap()
        .unwrap();
    assert_eq!(w.stats().requests, 1);
}
