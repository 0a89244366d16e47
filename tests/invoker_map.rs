//! `invoker(..).map(..)` against real worker processes.

mod common;

use common::*;

#[test]
fn map_matches_serial_for_1_2_and_4_jobs() {
    let store = procpool::persist(&small()).unwrap();
    let expected: Vec<u64> = (0..10_000u64).map(add_offset_serial).collect();
    for n_jobs in [1, 2, 4] {
        let mut inv = procpool::invoker(&store, add_offset, n_jobs).unwrap();
        let got: Vec<u64> = inv.map(0..10_000u64).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, expected, "n_jobs = {n_jobs}");
    }
}
