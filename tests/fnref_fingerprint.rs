//! The build fingerprint follows the build, not the file: a copy of this
//! very binary elsewhere (another inode, another modification time, as on
//! another machine) has the same fingerprint, and a binary of another build
//! (here: this one with a byte of its build-id changed) has another.

use std::path::Path;
use std::process::Command;

const PRINT_ENV: &str = "PROCPOOL_TEST_PRINT_FINGERPRINT";
const PRINTER: &str = "print_fingerprint_when_asked";

/// Prints this process's fingerprint when run as a child by the tests below.
#[test]
fn print_fingerprint_when_asked() {
    if std::env::var_os(PRINT_ENV).is_some() {
        println!("fingerprint={}", procpool_worker::fnref::fingerprint());
    }
}

fn fingerprint_of(exe: &Path) -> u64 {
    // Another test's child, forked while our copy was open for writing,
    // may hold it open until it executes: retry that, a bounded while.
    let mut tries = 0;
    let out = loop {
        match Command::new(exe)
            .args([PRINTER, "--exact", "--nocapture", "--test-threads=1"])
            .env(PRINT_ENV, "1")
            .output()
        {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other.unwrap(),
        }
    };
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| Some(l.split_once("fingerprint=")?.1))
        .unwrap_or_else(|| panic!("no fingerprint in {stdout:?}"))
        .parse()
        .unwrap()
}

/// A copy of this test binary in `dir`, changed by `change` first.
fn copy_of_this_binary(dir: &Path, change: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let me = std::env::current_exe().unwrap();
    let mut bytes = std::fs::read(&me).unwrap();
    change(&mut bytes);
    let copy = dir.join("copy-of-this-test");
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&copy, &bytes).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

#[test]
fn a_copy_of_the_same_binary_has_the_same_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_of_this_binary(dir.path(), |_| {});
    let mine = procpool_worker::fnref::fingerprint();
    assert_eq!(fingerprint_of(&std::env::current_exe().unwrap()), mine);
    assert_eq!(fingerprint_of(&copy), mine);
}

#[test]
fn another_build_has_another_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let id = procpool_worker::fnref::build_id().expect("this binary has a build-id");
    let copy = copy_of_this_binary(dir.path(), |bytes| {
        let at = bytes
            .windows(id.len())
            .position(|w| w == id.as_slice())
            .expect("the build-id is in the file");
        bytes[at] ^= 0xff;
    });
    assert_ne!(fingerprint_of(&copy), procpool_worker::fnref::fingerprint());
}
