//! Witnesses the implementation cannot fake (DESIGN.md, "Observability"): the heap, counted by
//! a global allocator; the download directory, listed from the file system; and the client's
//! sockets, as the kernel lists them (or, on a simulated network, as the network counts them).
//! The others, connections as the server sees them and the delegate, are the stage's counts
//! and a `Weak` held by the test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A global allocator over [`System`] that counts the live heap: bytes, allocations, and the
/// peak of bytes.
///
/// It counts every thread in the process (the test harness, the runtime's workers, other
/// tests), so a heap-baseline test needs a test binary of its own (a file of its own under
/// `tests/`), run once to warm up (runtime, lazy statics, thread-locals), then measured from
/// the baseline taken after the warm-up:
///
/// ```
/// use leakproof_check::witness::CountingAllocator;
///
/// #[global_allocator]
/// static ALLOC: CountingAllocator = CountingAllocator::new();
/// ```
#[derive(Debug, Default)]
pub struct CountingAllocator {
    live_bytes: AtomicUsize,
    live_allocations: AtomicUsize,
    peak_bytes: AtomicUsize,
}

impl CountingAllocator {
    /// A counter at zero; `const` so that it can be a `static`.
    pub const fn new() -> CountingAllocator {
        CountingAllocator {
            live_bytes: AtomicUsize::new(0),
            live_allocations: AtomicUsize::new(0),
            peak_bytes: AtomicUsize::new(0),
        }
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes.load(Relaxed)
    }

    /// Allocations not yet freed.
    pub fn live_allocations(&self) -> usize {
        self.live_allocations.load(Relaxed)
    }

    /// The most bytes live at once since the start or the last [`reset_peak`](Self::reset_peak).
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes.load(Relaxed)
    }

    /// Starts a new peak from the bytes live now.
    pub fn reset_peak(&self) {
        self.peak_bytes.store(self.live_bytes(), Relaxed);
    }

    fn grew(&self, bytes: usize) {
        let live = self.live_bytes.fetch_add(bytes, Relaxed) + bytes;
        self.peak_bytes.fetch_max(live, Relaxed);
    }

    fn shrank(&self, bytes: usize) {
        self.live_bytes.fetch_sub(bytes, Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds counting, which neither allocates nor touches the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            self.live_allocations.fetch_add(1, Relaxed);
            self.grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            self.live_allocations.fetch_add(1, Relaxed);
            self.grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        self.live_allocations.fetch_sub(1, Relaxed);
        self.shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        // On failure the old block is still live and unchanged: nothing to count.
        if !new.is_null() {
            if new_size >= layout.size() {
                self.grew(new_size - layout.size());
            } else {
                self.shrank(layout.size() - new_size);
            }
        }
        new
    }
}

/// Whether the directory has no entry at all, file or subdirectory.
pub fn empty_dir(path: impl AsRef<Path>) -> io::Result<bool> {
    Ok(fs::read_dir(path)?.next().transpose()?.is_none())
}

/// Every file under the directory, recursively, sorted: what a download left behind.
pub fn files_in(path: impl AsRef<Path>) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![path.as_ref().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// How many TCP sockets this process holds open whose remote end is `port` on loopback: the
/// client ends of the connections to a stage listening there, as the kernel sees them
/// (`/proc/self/fd` and `/proc/net/tcp`, `/proc/net/tcp6`). The stage's own ends have `port` as
/// their local port and do not count. Unlike the stage's count of closed connections, which
/// lags while the stage's tasks read, this holds at the very moment it is asked: a promise
/// that every socket is closed can be checked when it is made. Linux only.
pub fn client_sockets_to(port: u16) -> io::Result<usize> {
    count_sockets(|remote, _| remote == port)
}

/// How many TCP sockets this process holds open to the stage whose `peers` these are: as
/// [`client_sockets_to`], and only those whose own end the stage accepted. A socket of an
/// earlier stage that had the same port (a pooled connection still closing after its stage
/// went) is not one of them. For a stage on a simulated network, the client ends of its HTTP
/// listener's connections that the client has not dropped, as the network counts them: the
/// same witness, held as exactly.
pub fn client_sockets_of(peers: &crate::stage::Peers) -> io::Result<usize> {
    if let Some(tally) = peers.simulated() {
        return Ok(usize::try_from(tally.client_ends_alive()).unwrap_or(usize::MAX));
    }
    count_sockets(|remote, local| remote == peers.port() && peers.accepted_from(local))
}

/// The TCP sockets of this process whose `(remote port, local port)` `select` says.
fn count_sockets(select: impl Fn(u16, u16) -> bool) -> io::Result<usize> {
    let mut ours = std::collections::HashSet::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        // An fd closed while we list is simply not ours any more.
        let Ok(link) = fs::read_link(entry?.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            ours.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue; // no IPv6 on this machine
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(9))
            else {
                continue;
            };
            let port = |address: &str| {
                address
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            };
            let (Some(remote), Some(local)) = (port(remote), port(local)) else {
                continue;
            };
            if select(remote, local) && ours.contains(*inode) {
                count += 1;
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_socket_counts_while_it_is_open_and_not_a_moment_longer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(client_sockets_to(port).unwrap(), 0);
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(
            client_sockets_to(port).unwrap(),
            1,
            "the server's end does not count"
        );
        drop(client);
        assert_eq!(
            client_sockets_to(port).unwrap(),
            0,
            "closed is gone at once"
        );
        drop(server);
    }

    #[test]
    fn a_directory_is_empty_until_a_file_is_left_in_it() {
        let dir = std::env::temp_dir().join(format!("leakproof-witness-{}", std::process::id()));
        fs::create_dir_all(dir.join("nested")).unwrap();
        let empty_but_for_a_dir = (empty_dir(&dir).unwrap(), files_in(&dir).unwrap());

        fs::write(dir.join("nested/download.tmp"), b"x").unwrap();
        let with_a_file = files_in(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();

        assert_eq!(empty_but_for_a_dir, (false, vec![]));
        assert_eq!(with_a_file, vec![dir.join("nested/download.tmp")]);
        assert!(
            empty_dir(&dir).is_err(),
            "a missing directory is an error, not empty"
        );
    }
}
