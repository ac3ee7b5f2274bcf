//! The heap witness of the model runs: a global allocator that counts, per thread, the bytes
//! live that were allocated while that thread was *inside a world* ([`inside`]): building the
//! system under test, applying an op to it, dropping it. Each block carries the number of the
//! thread that allocated it in a header of its own, so it is uncounted wherever it is freed
//! (a view handed back to the harness, a buffer dropped on another thread); blocks allocated
//! by the harness between ops (the model, the generator) are never counted. What a world
//! leaves live once it is dropped is what it leaked.
//!
//! Install it in a test binary (or the checker's) with
//! `#[global_allocator] static HEAP: WorldAllocator = WorldAllocator;`; without it, [`live`]
//! is `None` and the runs skip the check. Threads other than the one running the world
//! (tokio's blocking pool, a delegate's thread on real sockets) allocate uncounted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering::Relaxed};

/// Bytes a dropped world may leave live, for what lives for the thread or the process once
/// first used and is made on a world's first use (hyper's cached `Date` header, tokio's and
/// rustls' lazy globals, a thread's first `Vec` of thread-local destructors): a few hundred
/// bytes in practice. A per-task or per-session leak of seed 004's kind (a task's record, a
/// cache, a TLS store) is kilobytes per case and well past it.
pub const WORLD_BOUND: isize = 4 * 1024;

/// Threads that can be told apart; the rest share the last slot (still counted, mixed).
const SLOTS: usize = 512;

static LIVE: [AtomicIsize; SLOTS] = [const { AtomicIsize::new(0) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(1);
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's slot (0: not yet given one).
    static SLOT: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread is inside a world now.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// The header before each block: the slot that counted it (0: none).
const HEADER: usize = 16;

/// The global allocator of the heap witness (see the module's docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct WorldAllocator;

/// Run `f` inside a world: what it allocates is counted for this thread until freed.
pub fn inside<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag however `f` ends, a panic included.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INSIDE.set(self.0);
        }
    }
    let _restore = Restore(INSIDE.replace(true));
    f()
}

/// Run `f` outside any world, inside one or not: what it allocates is never counted. The
/// simulated network's pipes grow so: the bytes in flight are the network's, not the world's
/// client, and the witness of what the client holds must not see them.
pub fn outside<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = INSIDE.try_with(|inside| inside.set(self.0));
        }
    }
    let _restore = Restore(
        INSIDE
            .try_with(|inside| inside.replace(false))
            .unwrap_or(false),
    );
    f()
}

/// Bytes live that this thread allocated inside a world; `None` if the allocator is not the
/// global one.
pub fn live() -> Option<isize> {
    INSTALLED.load(Relaxed).then(|| LIVE[slot()].load(Relaxed))
}

fn slot() -> usize {
    SLOT.try_with(|slot| {
        if slot.get() == 0 {
            slot.set(NEXT_SLOT.fetch_add(1, Relaxed).min(SLOTS - 1));
        }
        slot.get()
    })
    .unwrap_or(SLOTS - 1)
}

/// The slot to count a block made now in, or 0.
fn counting() -> usize {
    match INSIDE.try_with(Cell::get) {
        Ok(true) => slot(),
        _ => 0,
    }
}

/// The layout of a block with room for the header, and where the caller's part begins.
fn padded(layout: Layout) -> Option<(Layout, usize)> {
    let offset = HEADER.max(layout.align());
    let size = layout.size().checked_add(offset)?;
    let whole = Layout::from_size_align(size, layout.align().max(HEADER)).ok()?;
    Some((whole, offset))
}

// SAFETY: each block is `System`'s, `offset` bytes larger at the front; the caller gets the
// part after the header, aligned as asked (the offset is a multiple of the alignment), and
// hands the same pointer and layout back, from which the whole block is found again.
unsafe impl GlobalAlloc for WorldAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Relaxed);
        let Some((whole, offset)) = padded(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `whole` has a non-zero size (it includes the header).
        let block = unsafe { System.alloc(whole) };
        if block.is_null() {
            return block;
        }
        let slot = counting();
        if slot != 0 {
            LIVE[slot].fetch_add(layout.size() as isize, Relaxed);
        }
        // SAFETY: `offset >= HEADER` bytes precede the caller's part, inside the block, and
        // the header's place is aligned for a `usize` (offset and block are multiples of 16).
        unsafe {
            let ptr = block.add(offset);
            ptr.sub(HEADER).cast::<usize>().write(slot);
            ptr
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (whole, offset) = padded(layout).expect("the layout it was allocated with");
        // SAFETY: `ptr` came from `alloc` with `layout`: its header is just before it, and the
        // block begins `offset` bytes before it.
        unsafe {
            let slot = ptr.sub(HEADER).cast::<usize>().read();
            if slot != 0 {
                LIVE[slot].fetch_sub(layout.size() as isize, Relaxed);
            }
            System.dealloc(ptr.sub(offset), whole);
        }
    }
}
