//! One isolated call (`run_sp`) of a trivial function, from a parent that
//! holds 1 GiB of its own memory (forking such a parent directly costs
//! about 30 ms; the fork server does not grow with it).
//!
//! `cargo bench --bench run_sp` prints a summary, then as its last line one
//! JSON object: `{"bench":"run_sp","median_ms":…,"p99_ms":…}`.

use std::time::Instant;

fn add_one(x: u64) -> u64 {
    x + 1
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    // 1 GiB of private memory, every page touched.
    let ballast: Vec<u8> = vec![1u8; 1 << 30];
    let calls = 1_000;
    for i in 0..20 {
        procpool::run_sp(add_one, i)?;
    }
    let mut times = Vec::with_capacity(calls);
    for i in 0..calls as u64 {
        let start = Instant::now();
        let r = procpool::run_sp(add_one, i)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r, i + 1);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let p99 = times[(times.len() as f64 * 0.99) as usize - 1];
    println!(
        "run_sp: {calls} isolated calls of a trivial function, parent holding {} MiB",
        ballast.len() >> 20
    );
    println!("  median {median:.3} ms, p99 {p99:.3} ms");
    println!("{{\"bench\":\"run_sp\",\"median_ms\":{median:.3},\"p99_ms\":{p99:.3}}}");
    std::hint::black_box(&ballast);
    Ok(())
}
