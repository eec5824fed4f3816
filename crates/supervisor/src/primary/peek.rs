//! The peeking room (`--policy sticky --sticky-key header:NAME`): a connection's affinity key is
//! the first address in a header of its first request, read with `MSG_PEEK` so that the worker
//! still reads the request exactly as the client sent it.
//!
//! A connection waits here, registered with the reactor, until its request head is complete
//! (`\r\n\r\n`), and at most [`PEEK_TIMEOUT`] or [`MAX_HEAD`] bytes: a slow client never blocks
//! the loop (each peek is one non-blocking `recv`, driven by readiness), and garbage, an
//! oversized head, a client that sends nothing or a head without the header all get the
//! fallback — the client's address — never a stall or a drop. Fallbacks are counted.

#![forbid(unsafe_code)]

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::task::Context;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::dispatch::mix;
use super::Conn;

/// Longest request head looked at.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Longest a connection waits for its request head.
pub(crate) const PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection whose request head is awaited.
pub(crate) struct Peeking {
    /// A duplicate of the connection's fd, registered with the reactor while we wait.
    fd: AsyncFd<TcpStream>,
    conn: Conn,
    deadline: Instant,
}

/// What peeking found.
pub(crate) enum Peeked {
    /// Not complete yet: wait for more.
    Pending,
    /// The header's key.
    Key(Conn),
    /// No key from the header (absent, garbage, too long, end of file, error): the client's
    /// address.
    Fallback(Conn),
}

impl Peeking {
    /// Starts waiting for `conn`'s request head. The reactor watches a duplicate of its fd, so
    /// that if it cannot (out of fds or watches) the connection goes on with its address key.
    pub(crate) fn new(conn: Conn) -> Result<Peeking, (Conn, io::Error)> {
        let watch = match conn
            .stream
            .try_clone()
            .and_then(|dup| crate::sys::register(dup, Interest::READABLE))
        {
            Ok(w) => w,
            Err(e) => return Err((conn, e)),
        };
        let deadline = conn.sent_at + PEEK_TIMEOUT;
        Ok(Peeking {
            fd: watch,
            conn,
            deadline,
        })
    }

    /// The connection waiting (an upgrade carries it and waits again in the new image).
    pub(crate) fn conn(&self) -> &Conn {
        &self.conn
    }

    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> bool {
        self.fd.poll_read_ready(cx).is_ready()
    }

    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Gives the connection back, with `key` (or its address key); the watch is dropped.
    fn finish(self, key: Option<u64>) -> Conn {
        let mut c = self.conn;
        if let Some(key) = key {
            c.key = key;
        }
        c
    }

    /// Gives up waiting: the fallback key.
    pub(crate) fn fallback(self) -> Conn {
        self.finish(None)
    }

    /// Peeks at what has arrived; `header` is the lowercase header name.
    pub(crate) fn peek(self, header: &str, buf: &mut [u8]) -> (Option<Peeking>, Peeked) {
        let buf = &mut buf[..MAX_HEAD];
        let r = self.fd.try_io(Interest::READABLE, |s| {
            let n = recv(
                s.as_raw_fd(),
                buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            if n > 0 && n < MAX_HEAD && find_head_end(&buf[..n]).is_none() {
                // Incomplete: clear the readiness so that only new data wakes us.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (Some(self), Peeked::Pending),
            Ok(n) if n > 0 => {
                match find_head_end(&buf[..n]).and_then(|end| header_key(&buf[..end], header)) {
                    Some(key) => (None, Peeked::Key(self.finish(Some(key)))),
                    None => (None, Peeked::Fallback(self.fallback())),
                }
            }
            // End of file, an error, or a head over MAX_HEAD: the worker sees it as it is.
            _ => (None, Peeked::Fallback(self.fallback())),
        }
    }
}

/// Where the request head ends (just before `\r\n\r\n`).
fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The key of the first address in header `name` (lowercase) of a request head.
fn header_key(head: &[u8], name: &str) -> Option<u64> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let request = lines.next()?;
    if !request.contains(" HTTP/") {
        return None;
    }
    for line in lines {
        let (k, v) = line.split_once(':')?;
        if k.trim().eq_ignore_ascii_case(name) {
            let first = v.split(',').next()?.trim();
            if first.is_empty() {
                return None;
            }
            // FNV-1a over the address text, then mixed.
            let h = first.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            return Some(mix(h));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_address_of_the_header_is_the_key() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1, 10.9.9.9\r\n";
        let a = header_key(head, "x-forwarded-for").unwrap();
        let b = header_key(
            b"POST /a HTTP/1.1\r\nx-forwarded-for:10.0.0.1\r\n",
            "x-forwarded-for",
        )
        .unwrap();
        assert_eq!(a, b, "same first address, same key");
        let c = header_key(
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.2\r\n",
            "x-forwarded-for",
        );
        assert_ne!(Some(a), c);
    }

    #[test]
    fn no_header_garbage_or_empty_values_have_no_key() {
        assert_eq!(
            header_key(b"GET / HTTP/1.1\r\nHost: x\r\n", "x-forwarded-for"),
            None
        );
        assert_eq!(header_key(b"\x16\x03\x01 garbage", "x-forwarded-for"), None);
        assert_eq!(
            header_key(
                b"GET / HTTP/1.1\r\nX-Forwarded-For: \r\n",
                "x-forwarded-for"
            ),
            None
        );
        assert_eq!(
            header_key(b"GET / HTTP/1.1\r\nbroken line\r\n", "x-forwarded-for"),
            None
        );
    }

    #[test]
    fn the_head_ends_at_the_blank_line() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
            Some(20)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
