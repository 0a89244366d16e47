//! `StartMethod::fork()` at work: pools and isolated calls forked straight
//! from this process. The method refuses a multi-threaded process, and the
//! test harness runs tests on threads of their own, so this test has no
//! harness: `main` runs the checks on the only thread, and a failed check
//! panics, which fails `cargo test`.

mod common;

use common::*;

fn double(n: u64) -> u64 {
    n * 2
}

fn abort_now(_: ()) -> u64 {
    std::process::abort()
}

fn main() {
    // No `procpool::init()`: the fork server's reader thread would make this
    // process multi-threaded, and the fork method would refuse.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one struct we own; it only lowers a limit.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    // SAFETY: this program starts no thread of its own while pools fork.
    let method = unsafe { procpool::StartMethod::fork() };

    let store = procpool::persist(&small()).unwrap();
    let mut inv = procpool::InvokerBuilder::new(&store, add_offset)
        .n_jobs(2)
        .start_method(method)
        .build()
        .unwrap();
    let got: Vec<u64> = inv.map(0..1_000u64).collect::<Result<_, _>>().unwrap();
    assert_eq!(got, (0..1_000).map(add_offset_serial).collect::<Vec<_>>());
    inv.shutdown();

    let isolated = procpool::Isolated::new(double).start_method(method);
    assert_eq!(isolated.run(21).unwrap(), 42);
    let err = procpool::Isolated::new(abort_now)
        .start_method(method)
        .run(())
        .unwrap_err();
    assert!(err.is_crash(), "{err}");
    assert_eq!(err.signal(), Some(libc::SIGABRT), "{err}");
    println!("fork start method: pools and isolated calls work");
}
