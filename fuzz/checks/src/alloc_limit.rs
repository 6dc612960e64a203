//! A global allocator that aborts on any single allocation larger than [`ALLOC_LIMIT`].
//!
//! A length field that sizes a buffer before it is checked against a limit shows up
//! as one huge allocation. Without a sanitizer libFuzzer's `-malloc_limit_mb` cannot
//! see it, and a huge zeroed allocation costs no memory until touched, so the RSS
//! limit misses it too; this catches it in the fuzz binaries and in the replay test
//! alike. The largest legitimate buffers are the 32 MiB protocol payloads.

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation any parser may make.
pub const ALLOC_LIMIT: usize = 64 << 20;

struct Limited;

#[global_allocator]
static GLOBAL: Limited = Limited;

#[cold]
fn too_big(size: usize) -> ! {
    // No allocation from here on: write the message from a stack buffer.
    let mut buf = [0u8; 96];
    let head = b"longhorn-fuzz-checks: allocation of ";
    let tail = b" bytes exceeds ALLOC_LIMIT (unbounded length field?)\n";
    let mut digits = [0u8; 20];
    let mut n = size;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    for part in [&head[..], &digits[i..], &tail[..]] {
        let take = part.len().min(buf.len() - len);
        buf[len..len + take].copy_from_slice(&part[..take]);
        len += take;
    }
    // SAFETY: writes `len` initialised bytes of `buf` to stderr.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, len);
    }
    std::process::abort()
}

// SAFETY: every call is forwarded unchanged to the system allocator after the size
// check, which only ever aborts.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            too_big(layout.size());
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            too_big(layout.size());
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            too_big(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}
