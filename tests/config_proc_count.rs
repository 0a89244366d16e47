//! `proc_count` and what workers inherit. One test: it changes the environment.

mod common;

use common::*;

fn worker_env(_: &ArchivedSmall, name: String) -> Option<String> {
    std::env::var(&name).ok()
}

fn isolated_env(name: String) -> Option<String> {
    std::env::var(&name).ok()
}

#[test]
fn proc_count_forms_and_worker_environment() {
    // SAFETY: this binary's only test runs alone, and no other thread
    // reads the environment meanwhile; the same holds for every
    // set_var/remove_var below.
    unsafe { std::env::remove_var("PROCPOOL_NUM_PROCS") };
    let cpus = procpool::available_cpus();
    assert!(cpus >= 1);
    assert_eq!(procpool::proc_count(1, None, 0).unwrap(), cpus);
    assert_eq!(procpool::proc_count(2, None, 0).unwrap(), (cpus / 2).max(1));
    assert_eq!(procpool::proc_count(1, Some(1), 0).unwrap(), 1);
    assert_eq!(procpool::proc_count(cpus * 4, None, 0).unwrap(), 1);
    assert_eq!(procpool::proc_count(1, Some(1), 1).unwrap(), cpus);
    assert_eq!(procpool::proc_count(1, None, 2).unwrap(), 1);
    assert!(procpool::proc_count(0, None, 0).is_err());
    assert!(procpool::proc_count(1, Some(0), 0).is_err());

    // SAFETY: this test alone changes the environment, on this thread.
    unsafe { std::env::set_var("PROCPOOL_NUM_PROCS", "8") };
    assert_eq!(
        procpool::proc_count(2, Some(4), 0).unwrap(),
        8,
        "the variable wins over max_default"
    );
    assert_eq!(procpool::proc_count(2, None, 1).unwrap(), 1);

    // SAFETY: this test alone changes the environment, on this thread.
    unsafe { std::env::set_var("PROCPOOL_NUM_PROCS", "8,2") };
    assert_eq!(procpool::proc_count(2, None, 0).unwrap(), 8);
    assert_eq!(procpool::proc_count(2, None, 1).unwrap(), 2);
    assert_eq!(procpool::proc_count(2, None, 2).unwrap(), 1);

    for bad in ["0", "abc", "-2", "", "3,x"] {
        // SAFETY: this test alone changes the environment, on this thread.
        unsafe { std::env::set_var("PROCPOOL_NUM_PROCS", bad) };
        let err = procpool::proc_count(2, None, 0).unwrap_err();
        assert_eq!(err.source_name(), "PROCPOOL_NUM_PROCS");
        assert_eq!(err.value(), bad);
        assert!(
            err.to_string()
                .starts_with(&format!("invalid PROCPOOL_NUM_PROCS value {bad:?}: ")),
            "{err}"
        );
    }

    // Workers run one level down, with thread counts set for native libraries.
    // SAFETY: this test alone changes the environment, on this thread.
    unsafe {
        std::env::set_var("PROCPOOL_NUM_PROCS", "2,3");
        std::env::remove_var("OMP_NUM_THREADS");
        std::env::set_var("MKL_NUM_THREADS", "5");
    }
    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::invoker(&store, worker_env, 2).unwrap();
    let names = [
        "PROCPOOL_NUM_PROCS",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "RAYON_NUM_THREADS",
    ];
    let got: Vec<Option<String>> = inv
        .map(names.iter().map(|s| s.to_string()))
        .collect::<Result<_, _>>()
        .unwrap();
    let want = ["3", "3", "3", "5", "3"].map(|s| Some(s.to_string()));
    assert_eq!(got, want);
    drop(inv);
    // An isolated call's process too (it starts from a spare that set
    // placeholders for these variables while it waited).
    let got: Vec<Option<String>> = names
        .iter()
        .map(|name| procpool::run_sp(isolated_env, name.to_string()).unwrap())
        .collect();
    assert_eq!(got, want);

    // A malformed variable stops an invoker that relies on it.
    // SAFETY: this test alone changes the environment, on this thread.
    unsafe { std::env::set_var("PROCPOOL_NUM_PROCS", "abc") };
    let err = procpool::InvokerBuilder::new(&store, worker_env)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("PROCPOOL_NUM_PROCS"), "{err}");
    // SAFETY: this test alone changes the environment, on this thread.
    unsafe { std::env::remove_var("PROCPOOL_NUM_PROCS") };
}
