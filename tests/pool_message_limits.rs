//! Arguments and results near the 2 GiB a message carries: what fits goes
//! through, what does not fails alone with an error that says so, the same
//! way for every `n_jobs`.

use serde_bytes::ByteBuf;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct NoModel {
    unused: u8,
}

const GIB: usize = 1 << 30;

/// A zeroed buffer: the kernel maps zero pages until someone writes, so
/// only the copies procpool makes cost memory.
fn zeros(len: usize) -> ByteBuf {
    ByteBuf::from(vec![0u8; len])
}

fn length(_: &ArchivedNoModel, bytes: ByteBuf) -> usize {
    bytes.len()
}

/// Returns `len` zero bytes.
fn make(_: &ArchivedNoModel, len: usize) -> ByteBuf {
    zeros(len)
}

fn echo_len(bytes: ByteBuf) -> usize {
    bytes.len()
}

#[test]
fn an_argument_over_2_gib_fails_alone_for_1_and_2_jobs() {
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    for n_jobs in [1, 2] {
        let mut inv = procpool::invoker(&store, length, n_jobs).unwrap();
        let args = vec![zeros(10), zeros(2 * GIB + 1), zeros(20)];
        let results: Vec<_> = inv.map(args).collect();
        assert_eq!(results.len(), 3, "n_jobs = {n_jobs}");
        assert_eq!(results[0].as_ref().unwrap(), &10);
        assert_eq!(results[2].as_ref().unwrap(), &20);
        let err = results[1].as_ref().unwrap_err();
        assert!(err.is_serialization(), "n_jobs = {n_jobs}: {err}");
        assert_eq!(err.task_index(), 1);
        assert!(
            err.to_string().contains("argument too large to send"),
            "n_jobs = {n_jobs}: {err}"
        );
    }
}

#[test]
fn run_sp_refuses_an_argument_over_2_gib_before_starting_a_process() {
    let err = procpool::run_sp(echo_len, zeros(2 * GIB + 1)).unwrap_err();
    assert!(err.is_serialization(), "{err}");
    assert!(
        err.to_string().contains("argument too large to send"),
        "{err}"
    );
}

#[test]
fn a_result_over_2_gib_fails_alone_and_the_worker_lives_on() {
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    for n_jobs in [1, 2] {
        let mut inv = procpool::invoker(&store, make, n_jobs).unwrap();
        let pids = inv.worker_pids();
        let results: Vec<_> = inv.map([5, 2 * GIB, 7]).collect();
        assert_eq!(
            inv.worker_pids(),
            pids,
            "n_jobs = {n_jobs}: a worker was replaced"
        );
        assert_eq!(results[0].as_ref().unwrap().len(), 5, "n_jobs = {n_jobs}");
        assert_eq!(results[2].as_ref().unwrap().len(), 7, "n_jobs = {n_jobs}");
        let err = results[1].as_ref().unwrap_err();
        assert!(err.is_serialization(), "n_jobs = {n_jobs}: {err}");
        assert!(!err.is_crash(), "n_jobs = {n_jobs}: {err}");
        assert!(
            err.to_string().contains("result too large to send"),
            "n_jobs = {n_jobs}: {err}"
        );
    }
}

#[test]
fn arguments_that_would_overfill_a_batch_start_the_next_one() {
    // Automatic batches hold about 1 MiB of arguments: of these (100 KiB to
    // 900 KiB), many fit only alone, and every one must come back right.
    let store = procpool::persist(&NoModel { unused: 0 }).unwrap();
    let sizes: Vec<usize> = (0..60).map(|i| (100 + (i * 337) % 800) << 10).collect();
    let args = || {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ByteBuf::from(vec![i as u8; n]))
    };
    let expected: Vec<u64> = args()
        .map(|b| checksum(&NoModel { unused: 0 }, b))
        .collect();
    for n_jobs in [1, 2] {
        let mut inv = procpool::invoker(&store, checksum_archived, n_jobs).unwrap();
        for _ in 0..2 {
            let got: Vec<u64> = inv.map(args()).collect::<Result<_, _>>().unwrap();
            assert_eq!(got, expected, "n_jobs = {n_jobs}");
        }
    }
}

fn checksum(_: &NoModel, bytes: ByteBuf) -> u64 {
    bytes.iter().fold(bytes.len() as u64, |h, &b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    })
}

fn checksum_archived(_: &ArchivedNoModel, bytes: ByteBuf) -> u64 {
    checksum(&NoModel { unused: 0 }, bytes)
}
