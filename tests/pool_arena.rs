//! Large arguments and results travel through each worker's shared arena
//! instead of its pipe, and fall back to the pipe when the arena has no
//! room. Whatever path each batch takes, every byte must arrive as sent, in
//! both directions; and a worker that dies with batches in its arena loses
//! only the task it was running.

use serde_bytes::ByteBuf;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct NoModel {
    unused: u8,
}

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// `len` bytes that depend on `seed` and on their position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Checks that the argument arrived as sent, then answers with
/// `answer_len` bytes of another pattern.
fn check_and_answer(
    _: &ArchivedNoModel,
    (seed, bytes, answer_len): (u64, ByteBuf, usize),
) -> ByteBuf {
    assert!(
        bytes.as_slice() == pattern(seed, bytes.len()).as_slice(),
        "argument {seed} ({} bytes) arrived changed",
        bytes.len()
    );
    ByteBuf::from(pattern(!seed, answer_len))
}

/// Sizes on both sides of the arena threshold (16 KiB), small and large.
const SIZES: [usize; 8] = [
    0,
    100,
    16 * KIB - 40,
    16 * KIB + 1,
    300 * KIB,
    3 * MIB,
    24,
    900 * KIB,
];

fn args(n: usize) -> Vec<(u64, ByteBuf, usize)> {
    (0..n)
        .map(|i| {
            let len = SIZES[i % SIZES.len()];
            let answer = SIZES[(i * 3 + 1) % SIZES.len()];
            (i as u64, ByteBuf::from(pattern(i as u64, len)), answer)
        })
        .collect()
}

fn check_results(
    results: Vec<Result<ByteBuf, procpool::TaskError>>,
    args: &[(u64, ByteBuf, usize)],
    what: &str,
) {
    assert_eq!(results.len(), args.len(), "{what}");
    for ((seed, _, answer_len), result) in args.iter().zip(results) {
        let bytes = result.unwrap_or_else(|e| panic!("{what}: task {seed}: {e}"));
        assert!(
            bytes.as_slice() == pattern(!seed, *answer_len).as_slice(),
            "{what}: result {seed} ({} bytes) arrived changed",
            bytes.len()
        );
    }
}

#[test]
fn every_byte_arrives_through_arena_and_pipe_alike() {
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    let args = args(160);
    // The default arena; a small one (a 32nd of the memory limit: 8 MiB a
    // side), where 3 MiB batches and results often find no room and take
    // the pipe; and batches of 4 tasks, some over the small arena's size.
    let cases = [
        (
            "default arena",
            procpool::InvokerBuilder::new(&store, check_and_answer).n_jobs(2),
        ),
        (
            "small arena",
            procpool::InvokerBuilder::new(&store, check_and_answer)
                .n_jobs(2)
                .memory_limit(256 * MIB as u64),
        ),
        (
            "batches of 4, small arena",
            procpool::InvokerBuilder::new(&store, check_and_answer)
                .n_jobs(2)
                .memory_limit(256 * MIB as u64)
                .chunk_size(4),
        ),
        (
            "workers started by re-executing",
            procpool::InvokerBuilder::new(&store, check_and_answer)
                .n_jobs(2)
                .start_method(procpool::StartMethod::Spawn),
        ),
    ];
    for (what, builder) in cases {
        let mut inv = builder.build().unwrap();
        // Twice on the same workers: spans are released and used again.
        for round in 0..2 {
            let results: Vec<_> = inv.map(args.clone()).collect();
            check_results(results, &args, &format!("{what}, round {round}"));
        }
        let mut unordered: Vec<_> = inv.map_unordered(args.clone()).collect();
        unordered.sort_by_key(|(index, _)| *index);
        let results = unordered.into_iter().map(|(_, r)| r).collect();
        check_results(results, &args, &format!("{what}, unordered"));
    }
}

#[test]
fn an_argument_larger_than_the_arena_takes_the_pipe() {
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    let mut inv = procpool::invoker(&store, check_and_answer, 2).unwrap();
    let args = vec![
        (1, ByteBuf::from(pattern(1, 70 * MIB)), 70 * MIB),
        (2, ByteBuf::from(pattern(2, 40 * KIB)), 40 * KIB),
        (3, ByteBuf::from(pattern(3, 65 * MIB)), 10),
    ];
    let results: Vec<_> = inv.map(args.clone()).collect();
    check_results(results, &args, "larger than the arena");
}

/// Aborts on task 13; otherwise `check_and_answer`.
fn abort_on_13(model: &ArchivedNoModel, arg: (u64, ByteBuf, usize)) -> ByteBuf {
    if arg.0 == 13 {
        std::process::abort();
    }
    check_and_answer(model, arg)
}

#[test]
fn a_worker_dying_with_batches_in_its_arena_loses_only_its_task() {
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    let mut inv = procpool::invoker(&store, abort_on_13, 2).unwrap();
    let args: Vec<_> = (0..40u64)
        .map(|i| (i, ByteBuf::from(pattern(i, 200 * KIB)), 100 * KIB))
        .collect();
    let results: Vec<_> = inv.map(args.clone()).collect();
    assert_eq!(results.len(), 40);
    for ((seed, _, answer_len), result) in args.iter().zip(results) {
        if *seed == 13 {
            let err = result.unwrap_err();
            assert!(err.is_crash(), "{err}");
            assert_eq!(err.signal(), Some(libc::SIGABRT), "{err}");
            continue;
        }
        let bytes = result.unwrap_or_else(|e| panic!("task {seed}: {e}"));
        assert!(bytes.as_slice() == pattern(!seed, *answer_len).as_slice());
    }
    // The replacement worker has an arena of its own and works.
    let again: Vec<_> = args.iter().filter(|a| a.0 != 13).cloned().collect();
    let results: Vec<_> = inv.map(again.clone()).collect();
    check_results(results, &again, "after the crash");
}

/// Resident kilobytes of a worker's status-page region (its arena), from
/// `/proc/PID/smaps`.
fn arena_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_region = false;
    let mut total = 0;
    for line in smaps.lines() {
        // A mapping's header starts with its address range; its fields follow.
        let is_header = line.split_whitespace().next().is_some_and(|range| {
            range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        if is_header {
            in_region = line.contains("memfd:procpool-status");
        }
        if in_region && let Some(rest) = line.strip_prefix("Rss:") {
            total += rest
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .unwrap();
        }
    }
    total
}

#[test]
fn large_batches_use_the_arena_and_small_ones_do_not() {
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    let mut inv = procpool::invoker(&store, check_and_answer, 2).unwrap();
    let small: Vec<_> = (0..2000u64)
        .map(|i| (i, ByteBuf::from(pattern(i, 8)), 8))
        .collect();
    let results: Vec<_> = inv.map(small.clone()).collect();
    check_results(results, &small, "small");
    for pid in inv.worker_pids() {
        let kib = arena_rss_kib(pid);
        assert!(
            kib <= 8,
            "worker {pid}: {kib} KiB resident after small tasks only"
        );
    }
    let large: Vec<_> = (0..16u64)
        .map(|i| (i, ByteBuf::from(pattern(i, MIB)), MIB))
        .collect();
    let results: Vec<_> = inv.map(large.clone()).collect();
    check_results(results, &large, "large");
    for pid in inv.worker_pids() {
        // At least one batch and one result of 1 MiB each went through it.
        let kib = arena_rss_kib(pid);
        assert!(
            kib >= 2048,
            "worker {pid}: only {kib} KiB of its arena resident"
        );
        // Spans are reused: 16 batches of 1 MiB keep a few MiB, not 32.
        assert!(
            kib <= 8 * 1024,
            "worker {pid}: {kib} KiB of its arena resident"
        );
    }
}
