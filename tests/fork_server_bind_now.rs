//! The fork server binds every dynamic symbol at start (`LD_BIND_NOW`), so
//! that workers need not. A program may load a library with a symbol that
//! nothing defines and never call it; binding everything fails for such a
//! program, and the fork server must then start without binding everything.

use std::process::Command;

fn double(n: u64) -> u64 {
    n * 2
}

#[test]
fn child_program_with_an_unbound_symbol() {
    if std::env::var_os("UNBOUND_CHILD").is_none() {
        return;
    }
    assert_eq!(procpool::run_sp(double, 21).unwrap(), 42);
    println!("isolated call with an unbound symbol: ok");
}

#[test]
fn a_program_with_an_unbound_symbol_still_gets_a_fork_server() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("unbound.c");
    let library = dir.path().join("libunbound.so");
    std::fs::write(
        &source,
        "extern void procpool_test_nowhere(void);\n\
         void procpool_test_never_called(void) { procpool_test_nowhere(); }\n",
    )
    .unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("this test needs a C compiler (cc)");
    assert!(built.success(), "cc failed: {built}");

    // The premise: binding everything at start refuses this library.
    let eager = Command::new("/bin/true")
        .env("LD_PRELOAD", &library)
        .env("LD_BIND_NOW", "1")
        .output()
        .unwrap();
    assert!(
        !eager.status.success(),
        "LD_BIND_NOW did not refuse the library"
    );

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_program_with_an_unbound_symbol",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("UNBOUND_CHILD", "1")
        .env("LD_PRELOAD", &library)
        .env_remove("LD_BIND_NOW")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("isolated call with an unbound symbol: ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
