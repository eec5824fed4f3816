//! The one place file descriptors cross the channel.
//!
//! `sendmsg`/`recvmsg` are called directly (through `libc`) with stack buffers for the control
//! data, because the hot path sends a batch of fds per frame and must not allocate, and because
//! the receive side needs two things the convenience crates do not give: `MSG_CMSG_CLOEXEC`
//! (close-on-exec never travels with an fd) and an honest report of `MSG_CTRUNC`, with every fd
//! that did arrive turned into an [`OwnedFd`] so nothing leaks. Both calls are non-blocking
//! (`MSG_DONTWAIT`); callers drive them from tokio readiness.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::frame::CONNS_MAX;

/// Room in the control buffer: enough for [`CONNS_MAX`] fds plus slack, so a peer that attaches
/// a few more than allowed is seen (and its fds closed) rather than silently truncated.
const MAX_RECV_FDS: usize = CONNS_MAX + 8;
const CMSG_BUF: usize = 512;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// Creates the channel: an `AF_UNIX` `SOCK_SEQPACKET` pair, both ends close-on-exec and
/// non-blocking. The primary keeps one end; the other is moved into the child by the spawner.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid 2-element array; on success the kernel wrote two new fds that
    // nothing else owns, and we take ownership of each exactly once.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: both fds are fresh and owned by us alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Creates an `AF_UNIX` `SOCK_STREAM` pair (close-on-exec, non-blocking): the channel for
/// Node.js workers, whose IPC is a byte stream of JSON lines.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: as in `seqpacket_pair`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by us alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one frame with `fds` attached (at most [`MAX_RECV_FDS`]). Never blocks and never raises
/// `SIGPIPE`: a full channel is `WouldBlock`, a closed one `BrokenPipe`.
pub fn send_frame(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_RECV_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one frame",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cmsg = CmsgBuf([0; CMSG_BUF]);
    // SAFETY: a zeroed msghdr is a valid "no name, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is aligned, `space <= CMSG_BUF` (checked by the fd bound
        // above), and CMSG_FIRSTHDR/CMSG_DATA point inside it. The fds are borrowed: the kernel
        // duplicates them into the message; ownership stays with the caller.
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(hdr),
                payload as usize,
            );
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What one [`recv_frame`] saw besides the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes of the frame copied into the buffer (0 = end of file).
    pub len: usize,
    /// The frame was longer than the buffer (`MSG_TRUNC`): it is oversized.
    pub truncated: bool,
    /// Some fds did not arrive (`MSG_CTRUNC`): the receiver is out of fds or the control buffer
    /// was too small. The fds that did arrive are in the output vector all the same.
    pub fds_truncated: bool,
}

/// Receives one frame into `buf`, pushing every received fd (close-on-exec) into `fds` as an
/// [`OwnedFd`]. `fds` is cleared first; reuse it to avoid allocating. Never blocks.
pub fn recv_frame(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<RecvMeta> {
    fds.clear();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = MaybeUninit::<CmsgBuf>::zeroed();
    // SAFETY: a zeroed msghdr is valid; we fill in the buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = CMSG_BUF as _;
    // SAFETY: all pointers in `msg` point at live, writable buffers of the stated sizes.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel set msg_controllen to the bytes of control data it wrote; the CMSG_*
    // macros walk only within that. Every SCM_RIGHTS fd is a fresh descriptor installed in our
    // table by this call and owned by nobody else, so each becomes an OwnedFd exactly once —
    // including when MSG_CTRUNC is set, so none leaks.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(hdr);
                let header_len = data as usize - hdr as usize;
                let count =
                    ((*hdr).cmsg_len as usize).saturating_sub(header_len) / size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    Ok(RecvMeta {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Clears `O_NONBLOCK` on `fd` (for the worker's end of a channel).
pub fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own has no memory-safety requirements.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, PrimaryFrame};
    use std::os::fd::AsFd;

    #[test]
    fn fds_travel_with_their_frame_and_arrive_cloexec() {
        let (a, b) = seqpacket_pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c1 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let c2 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut out = Vec::new();
        frame::encode_conns_header(&mut out, 2);
        for (i, c) in [&c1, &c2].iter().enumerate() {
            frame::ConnRecord {
                id: i as u64 + 1,
                listener: 0,
                peer: c.local_addr().unwrap(),
            }
            .encode(&mut out);
        }
        send_frame(a.as_fd(), &out, &[c1.as_raw_fd(), c2.as_raw_fd()]).unwrap();
        let mut buf = vec![0u8; frame::MAX_FRAME];
        let mut fds = Vec::new();
        let meta = recv_frame(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(meta.len, out.len());
        assert!(!meta.truncated && !meta.fds_truncated);
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0);
        }
        match frame::decode_primary_frame(&buf[..meta.len], fds.len()).unwrap() {
            PrimaryFrame::Conns(list) => assert_eq!(list.len(), 2),
            f => panic!("{f:?}"),
        }
        // Nothing more queued: WouldBlock, not a hang.
        let e = recv_frame(b.as_fd(), &mut buf, &mut fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // Peer closed: a zero-length read.
        drop(a);
        assert_eq!(recv_frame(b.as_fd(), &mut buf, &mut fds).unwrap().len, 0);
    }

    #[test]
    fn oversized_frame_is_reported_truncated() {
        let (a, b) = seqpacket_pair().unwrap();
        send_frame(a.as_fd(), &[1u8; 100], &[]).unwrap();
        let mut small = [0u8; 10];
        let mut fds = Vec::new();
        let meta = recv_frame(b.as_fd(), &mut small, &mut fds).unwrap();
        assert!(meta.truncated);
    }
}
