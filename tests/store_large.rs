//! A model larger than 2 GiB persists, shares and reads correctly.

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Big {
    bytes: Vec<u8>,
}

fn read_at(model: &ArchivedBig, at: u64) -> u8 {
    model.bytes[at as usize]
}

#[test]
fn a_model_over_2_gib_works() {
    let len: usize = (2usize << 30) + (64 << 20);
    let mut bytes = vec![0u8; len];
    for (i, b) in bytes.iter_mut().enumerate().step_by(4096) {
        *b = (i / 4096 % 251) as u8;
    }
    bytes[len - 1] = 0xAB;
    let store = procpool::persist(&Big { bytes }).unwrap();
    assert!(store.archive_len() > len);
    let mut inv = procpool::invoker(&store, read_at, 2).unwrap();
    let probes = [
        0u64,
        4096 * 1000,
        (len - 4096 * 3) as u64 / 4096 * 4096,
        (len - 1) as u64,
    ];
    let got: Vec<u8> = inv.map(probes).collect::<Result<_, _>>().unwrap();
    let want: Vec<u8> = probes
        .iter()
        .map(|&p| {
            if p as usize == len - 1 {
                0xAB
            } else {
                (p / 4096 % 251) as u8
            }
        })
        .collect();
    assert_eq!(got, want);
}
