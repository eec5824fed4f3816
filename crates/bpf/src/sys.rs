//! The one module that makes syscalls: `bpf(2)` commands, the two reuseport socket options,
//! `SO_COOKIE`, and the read-only mapping of a counter map.
//!
//! Every call takes its fds as [`BorrowedFd`] and returns new ones as [`OwnedFd`] (close-on-exec:
//! the kernel opens every BPF object fd with `O_CLOEXEC`), so nothing here owns anything it was
//! lent and nothing it creates can leak. The `union bpf_attr` variants are spelled out as
//! `#[repr(C)]` structs holding only the fields used, in the kernel's order; the kernel zero-fills
//! the rest of the union when told a shorter size. Their layout is checked against the header's
//! offsets by the tests at the bottom.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::insn::Insn;

// `enum bpf_cmd`.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;

// `enum bpf_map_type`.
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

/// Map flag: the map's values can be `mmap`ed (ARRAY maps, Linux 5.5).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `enum bpf_prog_type`.
pub const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// `enum bpf_attach_type`: select a listener for a new connection, and also for a connection
/// queued on a listener that is closing (Linux 5.14).
pub const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

/// `log_level` bits: 1 = the verifier's instruction-by-instruction log, 4 = its statistics.
pub const BPF_LOG_LEVEL1: u32 = 1;
pub const BPF_LOG_STATS: u32 = 4;

// `asm-generic/socket.h`; spelled out so the crate does not depend on which libc version exports
// them for which target.
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
const SO_COOKIE: libc::c_int = 57;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// `union bpf_attr` for `BPF_MAP_CREATE` (up to `map_name`).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_MAP_*_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_PROG_LOAD` (up to `expected_attach_type`).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// An object name for the kernel (shown by `bpftool`): at most 15 bytes plus the NUL.
fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// `bpf(cmd, attr, sizeof *attr)`; a non-negative result is returned as is.
///
/// # Safety
/// `attr` must be the `bpf_attr` variant `cmd` expects, and every pointer stored in it must be
/// valid, for the access the command makes, for the duration of the call.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees `attr` is what `cmd` reads (and its embedded pointers valid);
    // the size passed is exactly the size of the struct we lend, so the kernel reads no further.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Creates a map; the new fd is ours alone.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        map_name: object_name(name),
        ..Default::default()
    };
    // SAFETY: MapCreateAttr is the BPF_MAP_CREATE layout and holds no pointers.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr)? };
    // SAFETY: on success BPF_MAP_CREATE returns a new fd (O_CLOEXEC) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `map[key] = value` with `BPF_ANY` (create or replace). For a `REUSEPORT_SOCKARRAY` the value
/// is the listener's fd as a u64; the kernel stores the socket, not the fd. `K` and `V` must be
/// exactly the map's key and value sizes (the kernel reads that many bytes from each pointer):
/// the callers, all in this crate, pass the types the maps were created with.
pub fn map_update<K: Copy, V: Copy>(map: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        ..Default::default()
    };
    // SAFETY: MapElemAttr is the BPF_MAP_UPDATE_ELEM layout; `key` and `value` point at live
    // values of the map's key and value sizes (see above), read by the kernel during the call
    // only.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr)? };
    Ok(())
}

/// Deletes `map[key]` (only meaningful for the sockarray; ARRAY entries cannot be deleted).
pub fn map_delete_u32_key(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        ..Default::default()
    };
    // SAFETY: MapElemAttr is the BPF_MAP_DELETE_ELEM layout; `key` points at a live u32 read by
    // the kernel during the call only.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr)? };
    Ok(())
}

/// Loads a program. With `log = Some((level, buf))` the verifier writes its log into `buf` (NUL
/// terminated); a log that does not fit makes the load fail with `ENOSPC`.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[Insn],
    license: &CStr,
    name: &str,
    log: Option<(u32, &mut [u8])>,
) -> io::Result<OwnedFd> {
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: object_name(name),
        expected_attach_type,
        ..Default::default()
    };
    if let Some((level, buf)) = log {
        attr.log_level = level;
        attr.log_size = buf.len().min(u32::MAX as usize) as u32;
        attr.log_buf = buf.as_mut_ptr() as u64;
    }
    // SAFETY: ProgLoadAttr is the BPF_PROG_LOAD layout; `insns` (insn_cnt 8-byte `struct
    // bpf_insn`s, see insn::Insn), `license` (NUL-terminated) and the log buffer (log_size bytes,
    // writable) are borrowed for the whole call and the kernel keeps no pointer to them after it.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr)? };
    // SAFETY: on success BPF_PROG_LOAD returns a new fd (O_CLOEXEC) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn setsockopt_int(sock: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `sock` is a live fd for the call (borrowed); the option value is a c_int on our
    // stack whose size we pass; the kernel copies it and keeps no pointer.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_ATTACH_REUSEPORT_EBPF`: the program becomes the selector of the reuseport group `sock`
/// belongs to (the group holds its own reference to the program).
pub fn attach_reuseport_prog(sock: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(sock, SO_ATTACH_REUSEPORT_EBPF, prog.as_raw_fd())
}

/// `SO_DETACH_REUSEPORT_BPF` (Linux 5.8): the group goes back to selecting by hash.
pub fn detach_reuseport_prog(sock: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(sock, SO_DETACH_REUSEPORT_BPF, 0)
}

/// `SO_COOKIE`: the socket's unique, never reused 64-bit id, to tell whether a slot's listener is
/// still the socket we put in the map (fd numbers are reused; cookies are not).
pub fn socket_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is live for the call; `cookie`/`len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A read-only, shared mapping of a `BPF_F_MMAPABLE` ARRAY map's values: the program's counters,
/// read without a syscall. Element `i` starts at byte `i * round_up(value_size, 8)`.
pub struct MapView {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value (unmapped once, in Drop); it is
// only read, through atomic loads, so it may be read from and moved to any thread.
unsafe impl Send for MapView {}
// SAFETY: as above: shared access is atomic loads only.
unsafe impl Sync for MapView {}

impl MapView {
    /// Maps the first `len` bytes of `map`'s values, read-only.
    pub fn new(map: BorrowedFd<'_>, len: usize) -> io::Result<MapView> {
        // SAFETY: a fresh mapping at an address of the kernel's choosing (no existing memory is
        // affected); `map` is live for the call and the mapping keeps its own reference to the
        // map, so it stays valid after the fd is closed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p as *mut u8).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(MapView { ptr, len })
    }

    /// The u64 at byte `offset` (8-aligned), read atomically: the program updates it with atomic
    /// adds on other CPUs while we read.
    pub fn load_u64(&self, offset: usize) -> u64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "offset {offset} outside the view"
        );
        // SAFETY: the offset is in bounds and 8-aligned (mmap returns a page-aligned address); the
        // memory is mapped for as long as `self` lives, and every writer (the BPF program's
        // atomic adds) writes it atomically, so an AtomicU64 view of it is sound.
        let cell = unsafe { &*(self.ptr.as_ptr().add(offset) as *const AtomicU64) };
        cell.load(Ordering::Relaxed)
    }
}

impl Drop for MapView {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and were given; nothing borrows the
        // mapping beyond `self` (load_u64 returns values, not references).
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// Offsets from `include/uapi/linux/bpf.h` (`union bpf_attr`) on Linux 6.18.
    #[test]
    fn attr_layouts_match_the_uapi_header() {
        assert_eq!(offset_of!(MapCreateAttr, map_flags), 16);
        assert_eq!(offset_of!(MapCreateAttr, map_name), 28);
        assert_eq!(size_of::<MapCreateAttr>(), 44);
        assert_eq!(offset_of!(MapElemAttr, key), 8);
        assert_eq!(offset_of!(MapElemAttr, value), 16);
        assert_eq!(offset_of!(MapElemAttr, flags), 24);
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_level), 24);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, prog_ifindex), 64);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
    }

    #[test]
    fn object_names_are_truncated_and_nul_terminated() {
        let n = object_name("a_very_long_object_name");
        assert_eq!(&n[..15], b"a_very_long_obj");
        assert_eq!(n[15], 0);
    }
}
