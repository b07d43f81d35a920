//! Issue 10: what a receive queue really holds. 3,000 one-byte messages
//! arrive over TCP, each in its own read, at a server whose application
//! reads nothing. Each item is a slice of the link's read buffer, and
//! before issue 10 each kept a whole buffer alive (11–23 MiB for 3,000
//! bytes of payload). Now the items queued behind others are copied out,
//! and what the process holds stays close to what the queue counts.
//!
//! Its own test binary: it counts every live heap byte of the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use tether::link::{TcpConnector, TcpListener};
use tether::{Config, Server, StableConduit};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_items_a_slow_application_keeps_hold_what_they_count() {
    const N: u64 = 3_000;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::<u8>::new(listener, Config::default());
    let client = StableConduit::<u8>::connect(TcpConnector::new(addr), Config::default())
        .await
        .unwrap();
    let session = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    // A first burst, so that the link's read buffer has grown to its full
    // chunk, as on any busy link; the application reads none of it.
    for i in 0..200u64 {
        client.send(&(i as u8)).await.unwrap();
    }
    let wait_received = |n: u64| {
        let session = &session;
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while session.stats().frames_received < n {
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
            })
            .await
            .expect("the server stopped receiving")
        }
    };
    wait_received(200).await;
    let before = live();
    let queued_before = session.stats().recv_queue_bytes;
    // One message per read: the next is sent once the last was queued.
    for i in 0..N {
        client.send(&(i as u8)).await.unwrap();
        wait_received(201 + i).await;
    }
    let held = live() - before;
    let counted = session.stats().recv_queue_bytes - queued_before;
    println!(
        "{N} one-byte messages: the queue counts {counted} bytes; the process holds {held} \
         bytes more ({} per message)",
        held / N as isize
    );
    assert_eq!(counted as u64, N * 65, "each item counts 1 + 64 bytes");
    // Both sides of the session live in this process: the client's replay
    // buffer holds the same 3,000 frames (unacknowledged: nothing was
    // consumed). Before issue 10 this was 11-23 MiB.
    assert!(
        held < 1 << 20,
        "3,000 one-byte messages hold {held} bytes (the queue counts {counted})"
    );
    drop(session);
    drop(client);
}
