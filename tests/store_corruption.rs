//! Damaged, truncated, wrong-type and wrong-version store files are refused
//! with an error that names the problem.

mod common;

use common::*;
use procpool::{ModelStore, StoreError};
use procpool_worker::store_format::HEADER_LEN;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Other {
    names: Vec<String>,
}

fn write_store() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.pstore");
    procpool::persist_to_path(&small(), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (dir, path, bytes)
}

fn load_bytes(path: &std::path::Path, bytes: &[u8]) -> Result<ModelStore<Small>, StoreError> {
    std::fs::write(path, bytes).unwrap();
    ModelStore::<Small>::load(path)
}

/// Recomputes the header checksum the way the format defines it, so a test
/// can make a header that is intact but says something else.
fn reseal_header(bytes: &mut [u8]) {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&bytes[..48]);
    h.update(&[0u8; 8]);
    h.update(&bytes[56..HEADER_LEN]);
    let sum = h.digest();
    bytes[48..56].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn a_good_store_round_trips() {
    let (_dir, path, _) = write_store();
    let store = ModelStore::<Small>::load(&path).unwrap();
    assert_eq!(store.archived().offset, 7);
    assert_eq!(store.archived().values.len(), 100);
    // SAFETY: nobody writes this temporary file while the store is alive.
    let mapped = unsafe { ModelStore::<Small>::open_mapped(&path) }.unwrap();
    assert_eq!(mapped.archived().values[99], 99.0);
    let mut inv = procpool::invoker(&mapped, add_offset, 2).unwrap();
    let got: Vec<u64> = inv.map(0..100u64).collect::<Result<_, _>>().unwrap();
    assert_eq!(got, (0..100).map(add_offset_serial).collect::<Vec<_>>());
}

#[test]
fn every_flipped_byte_is_caught() {
    let (_dir, path, bytes) = write_store();
    // Every byte of the header region and every byte of the archive.
    let positions: Vec<usize> = (0..bytes.len())
        .step_by(7)
        .chain([HEADER_LEN - 1, bytes.len() - 1])
        .collect();
    for pos in positions {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x01;
        let err = load_bytes(&path, &bad)
            .err()
            .unwrap_or_else(|| panic!("flip at byte {pos} was not caught"));
        assert!(err.is_corrupted(), "byte {pos}: {err}");
    }
    let mut bad = bytes.clone();
    bad[HEADER_LEN + 10] ^= 0xff;
    let err = load_bytes(&path, &bad).err().unwrap();
    assert!(
        err.to_string()
            .starts_with("store archive is corrupted (checksum "),
        "{err}"
    );
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(
        load_bytes(&path, &bad).err().unwrap().to_string(),
        "not a procpool model store (bad magic bytes)"
    );
    let mut bad = bytes;
    bad[100] ^= 1;
    assert_eq!(
        load_bytes(&path, &bad).err().unwrap().to_string(),
        "store header is corrupted (header checksum mismatch)"
    );
}

#[test]
fn truncated_and_padded_files_are_refused() {
    let (_dir, path, bytes) = write_store();
    for len in [0, 10, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
        let err = load_bytes(&path, &bytes[..len]).err().unwrap();
        assert!(err.is_truncated(), "length {len}: {err}");
    }
    let err = load_bytes(&path, &bytes[..bytes.len() - 4]).err().unwrap();
    assert!(err.to_string().starts_with("store is truncated: "), "{err}");
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    let err = load_bytes(&path, &longer).err().unwrap();
    assert!(err.to_string().contains("trailing data"), "{err}");
}

#[test]
fn wrong_type_is_refused_with_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.pstore");
    procpool::persist_to_path(
        &Other {
            names: vec!["a".into()],
        },
        &path,
    )
    .unwrap();
    let err = ModelStore::<Small>::load(&path).err().unwrap();
    assert!(err.is_type_mismatch(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("Other") && msg.contains("Small"), "{msg}");
    // A schema version is part of the type check.
    procpool::persist_to_path(&small(), &path).unwrap();
    let err = ModelStore::<Small>::load_with_schema(&path, 3)
        .err()
        .unwrap();
    assert!(err.is_type_mismatch(), "{err}");
}

#[test]
fn wrong_version_and_format_flags_are_refused() {
    let (_dir, path, bytes) = write_store();
    let mut v2 = bytes.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    reseal_header(&mut v2);
    let err = load_bytes(&path, &v2).err().unwrap();
    assert!(err.is_version_mismatch(), "{err}");
    assert_eq!(
        err.to_string(),
        "store format version 2 is not supported (this build reads version 1)"
    );
    let mut flags = bytes;
    flags[16] ^= 0xff;
    reseal_header(&mut flags);
    let err = load_bytes(&path, &flags).err().unwrap();
    assert!(err.is_version_mismatch(), "{err}");
}

#[test]
fn an_archive_with_a_valid_checksum_but_bad_structure_is_refused() {
    let (_dir, path, bytes) = write_store();
    // Point the root's vector far outside the archive, then make both
    // checksums agree: only rkyv's validation can catch this.
    let mut bad = bytes;
    let len = bad.len();
    for b in &mut bad[len - 16..len - 8] {
        *b = 0x7f;
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&bad[HEADER_LEN..]);
    bad[40..48].copy_from_slice(&sum.to_le_bytes());
    reseal_header(&mut bad);
    let err = load_bytes(&path, &bad).err().unwrap();
    assert!(err.is_corrupted(), "{err}");
    assert!(
        err.to_string().starts_with("store archive is invalid: "),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_an_io_error_naming_the_path() {
    let err = ModelStore::<Small>::load("/nonexistent/model.pstore")
        .err()
        .unwrap();
    assert!(err.is_io());
    assert!(
        err.to_string()
            .starts_with("cannot read the model store /nonexistent/model.pstore: "),
        "{err}"
    );
}

#[test]
fn the_shared_memory_is_sealed() {
    let store = procpool::persist(&small()).unwrap();
    // Writing through a new descriptor of the same memfd must fail.
    let pid = std::process::id();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap();
    let mut found = false;
    for entry in fds.flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().contains("memfd:procpool-model") {
            found = true;
            let path = format!("/proc/{pid}/fd/{}", entry.file_name().to_string_lossy());
            let err = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| {
                    use std::io::Write;
                    f.write_all(b"x")
                });
            assert!(err.is_err(), "a sealed store accepted a write");
        }
    }
    assert!(found);
    drop(store);
}

#[test]
fn a_saved_store_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saved.pstore");
    let store = procpool::persist(&small()).unwrap();
    store.save(&path).unwrap();
    let loaded = ModelStore::<Small>::load(&path).unwrap();
    assert_eq!(loaded.archived().offset, 7);
    assert_eq!(loaded.archive_len(), store.archive_len());
}
