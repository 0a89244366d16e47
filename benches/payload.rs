//! Large arguments and results: how fast bytes move through `run_sp` and a
//! pool.
//!
//! `cargo bench --bench payload` prints a table, then as its last line one
//! JSON object: `{"bench":"payload","run_sp_1mib_ms":…,"run_sp_16mib_ms":…,
//! "run_sp_mb_per_s":…,"map_bytes_mb_per_s":…,"map_vec_u8_mb_per_s":…}`
//! (medians). A `run_sp` call sends its argument to a fresh process and
//! gets the same bytes back, so it moves twice the size; its MB/s is for
//! the 16 MiB call. The maps send 64 arguments of 1 MiB each to 2 workers,
//! once as `serde_bytes::ByteBuf` (encoded as one block of bytes) and once
//! as `Vec<u8>` (which serde encodes byte by byte).

use std::time::Instant;

use serde_bytes::ByteBuf;

#[derive(rkyv::Archive, rkyv::Serialize)]
struct NoModel {
    unused: u8,
}

fn echo(bytes: ByteBuf) -> ByteBuf {
    bytes
}

fn length(_: &ArchivedNoModel, bytes: ByteBuf) -> usize {
    bytes.len()
}

fn length_vec(_: &ArchivedNoModel, bytes: Vec<u8>) -> usize {
    bytes.len()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `reps` `run_sp` echoes of `size` bytes.
fn run_sp_ms(size: usize, reps: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    for _ in 0..reps {
        let arg = ByteBuf::from(vec![7u8; size]);
        let start = Instant::now();
        let back = procpool::run_sp(echo, arg)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(back.len(), size);
    }
    Ok(median(&mut times))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    const MIB: usize = 1 << 20;
    // Start the fork server, so no call below pays for it.
    run_sp_ms(1, 3)?;
    let small_ms = run_sp_ms(MIB, 21)?;
    let large_ms = run_sp_ms(16 * MIB, 11)?;
    let run_sp_mb_per_s = 2.0 * (16 * MIB) as f64 / (large_ms / 1e3) / 1e6;

    let store = procpool::persist(&NoModel { unused: 0 })?;
    let tasks = 64;
    let mut bytes_rates = Vec::new();
    let mut vec_rates = Vec::new();
    let mut by_bytes = procpool::invoker(&store, length, 2)?;
    let mut by_vec = procpool::invoker(&store, length_vec, 2)?;
    for _ in 0..7 {
        let args: Vec<ByteBuf> = (0..tasks).map(|_| ByteBuf::from(vec![7u8; MIB])).collect();
        let start = Instant::now();
        let total: usize = by_bytes.map(args).map(|r| r.unwrap_or(0)).sum();
        bytes_rates.push(total as f64 / start.elapsed().as_secs_f64() / 1e6);
        assert_eq!(total, tasks * MIB);

        let args: Vec<Vec<u8>> = (0..tasks).map(|_| vec![7u8; MIB]).collect();
        let start = Instant::now();
        let total: usize = by_vec.map(args).map(|r| r.unwrap_or(0)).sum();
        vec_rates.push(total as f64 / start.elapsed().as_secs_f64() / 1e6);
        assert_eq!(total, tasks * MIB);
    }
    let map_bytes = median(&mut bytes_rates);
    let map_vec = median(&mut vec_rates);

    println!("payload: run_sp echoes a ByteBuf; maps send {tasks} × 1 MiB to 2 workers");
    println!("  run_sp, 1 MiB each way      {small_ms:>10.2} ms (median of 21)");
    println!(
        "  run_sp, 16 MiB each way     {large_ms:>10.2} ms (median of 11, {run_sp_mb_per_s:.0} MB/s)"
    );
    println!("  map, ByteBuf arguments      {map_bytes:>10.0} MB/s (median of 7)");
    println!("  map, Vec<u8> arguments      {map_vec:>10.0} MB/s (median of 7)");
    println!(
        "{{\"bench\":\"payload\",\"run_sp_1mib_ms\":{small_ms:.2},\"run_sp_16mib_ms\":{large_ms:.2},\"run_sp_mb_per_s\":{run_sp_mb_per_s:.0},\"map_bytes_mb_per_s\":{map_bytes:.0},\"map_vec_u8_mb_per_s\":{map_vec:.0}}}"
    );
    Ok(())
}
