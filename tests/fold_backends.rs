//! The parallel fold: one test body, run on every backend (sequential,
//! threads, processes), which must all give the same results.

use procpool::{Mapper, ParallelMap, Processes, Sequential, Threads};

fn add(sum: u64, x: u64) -> u64 {
    sum + x
}

/// (sum, chunks begun): each chunk starts from `(0, 1)`, so the second
/// field counts how often the identity was used.
fn add_counting(acc: (u64, u64), x: u64) -> (u64, u64) {
    (acc.0 + x, acc.1)
}

fn merge(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

fn panic_on_777(sum: u64, x: u64) -> u64 {
    if x == 777 {
        panic!("777 is not welcome");
    }
    sum + x
}

fn square(x: u64) -> u64 {
    x * x
}

fn suite<B: ParallelMap>(backend: &mut B) {
    // The seed's example: 1..=1,000,000 by `+`.
    let total = procpool::fold(backend, add, 1..=1_000_000u64, 0, 10_000, add).unwrap();
    assert_eq!(total, 500_000_500_000);

    for chunk in [1, 3, 64, 1_000, 20_000] {
        let (sum, chunks) =
            procpool::fold(backend, add_counting, 0..10_000u64, (0, 1), chunk, merge).unwrap();
        assert_eq!(sum, 49_995_000, "chunk {chunk}");
        assert_eq!(
            chunks,
            10_000u64.div_ceil(chunk as u64),
            "identity once per chunk"
        );
    }

    // Empty input gives the identity, for any chunk size.
    for chunk in [1, 5] {
        let empty = procpool::fold(backend, add, std::iter::empty(), 42, chunk, add).unwrap();
        assert_eq!(empty, 42);
    }

    // A chunk size of 0 is refused, with the reason.
    let err = procpool::fold(backend, add, 0..10u64, 0, 0, add).unwrap_err();
    assert!(err.to_string().contains("chunk_size"), "{err}");

    // A panic in the operation fails the fold with the chunk's index.
    let err = procpool::fold(backend, panic_on_777, 0..1_000u64, 0, 100, add).unwrap_err();
    assert!(err.is_panic(), "{err}");
    assert_eq!(err.task_index(), 7, "{err}");
    assert_eq!(err.panic_message(), Some("777 is not welcome"));

    // The backend as a plain map, in input order.
    let squares = backend
        .map(Mapper::new(square), (0..100).collect())
        .unwrap();
    assert_eq!(squares, (0..100u64).map(square).collect::<Vec<_>>());
}

#[test]
fn sequential() {
    suite(&mut Sequential);
}

#[test]
fn threads() {
    suite(&mut Threads::new(1));
    suite(&mut Threads::new(3));
}

#[test]
fn processes() {
    suite(&mut Processes::new(1));
    suite(&mut Processes::new(2));
    suite(&mut Processes::new(4));
}
