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
