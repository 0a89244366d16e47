//! A parent that runs many threads of its own starts and uses pools safely.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[test]
fn sixteen_busy_threads_and_fifty_pools() {
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..16)
        .map(|i| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = i as u64;
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // Allocate and lock: the state a careless fork would copy mid-change.
                    held.push(vec![x as u8; 1024]);
                    if held.len() > 64 {
                        held.clear();
                    }
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let store = procpool::persist(&small()).unwrap();
    for round in 0..50u64 {
        let mut inv = procpool::invoker(&store, add_offset, 2).unwrap();
        let got: Vec<u64> = inv
            .map(round..round + 100)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            (round..round + 100)
                .map(add_offset_serial)
                .collect::<Vec<_>>()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in busy {
        t.join().unwrap();
    }
}

/// Errors that `?` turns into a boxed error one can send between threads.
type AnyError = Box<dyn std::error::Error + Send + Sync>;

#[test]
fn threads_share_one_store_and_hand_invokers_back() {
    let store = procpool::persist(&small()).unwrap();
    // Four pools over the same store at once, each made on its own thread.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || -> Result<_, AnyError> {
                let mut inv = procpool::invoker(&store, add_offset, 2)?;
                let got = inv
                    .map(t * 1000..t * 1000 + 500)
                    .collect::<Result<Vec<u64>, _>>()?;
                Ok((got, inv))
            })
        })
        .collect();
    for (t, thread) in (0..4u64).zip(threads) {
        let (got, mut inv) = thread.join().unwrap().unwrap();
        let want: Vec<u64> = (t * 1000..t * 1000 + 500).map(add_offset_serial).collect();
        assert_eq!(got, want);
        // The invoker came back to this thread with its workers, and serves
        // another map here.
        let pids = inv.worker_pids();
        assert_eq!(pids.len(), 2);
        let again: Vec<u64> = inv.map(0..50).collect::<Result<_, _>>().unwrap();
        assert_eq!(again, (0..50).map(add_offset_serial).collect::<Vec<_>>());
        assert_eq!(inv.worker_pids(), pids);
    }
}
