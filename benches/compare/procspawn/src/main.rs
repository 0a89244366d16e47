//! procspawn on the workloads of benches/compare: trivial-task throughput
//! with a 2-process pool, one task alone, and one isolated call. Prints one
//! JSON object per workload.

use std::time::{Duration, Instant};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() as f64 * 0.99) as usize - 1]
}

fn main() {
    procspawn::init();
    let tasks: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);

    // Throughput: a pool of 2, a window of 64 tasks in flight (procspawn
    // holds 4 descriptors per queued task, so 100k at once runs out).
    let pool = procspawn::Pool::new(2).expect("pool");
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let mut window = std::collections::VecDeque::new();
        let mut sum = 0u64;
        for x in 0..tasks {
            window.push_back(pool.spawn(x, |x| x + 1));
            if window.len() >= 64 {
                sum += window.pop_front().unwrap().join().expect("join");
            }
        }
        for h in window {
            sum += h.join().expect("join");
        }
        assert_eq!(sum, tasks * (tasks + 1) / 2);
        rates.push(tasks as f64 / start.elapsed().as_secs_f64());
    }
    println!("{{\"tool\":\"procspawn 1.0.2 Pool\",\"workload\":\"throughput\",\"tasks_per_s\":{:.0}}}", median(&mut rates));

    // One task alone, the pool idle before it.
    let mut trips = Vec::new();
    for x in 0..500u64 {
        std::thread::sleep(Duration::from_millis(1));
        let start = Instant::now();
        let r = pool.spawn(x, |x| x + 1).join().expect("join");
        trips.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(r, x + 1);
    }
    println!(
        "{{\"tool\":\"procspawn 1.0.2 Pool\",\"workload\":\"round_trip\",\"median_us\":{:.1},\"p99_us\":{:.1}}}",
        median(&mut trips),
        p99(&mut trips)
    );
    drop(pool);

    // One isolated call.
    let mut calls = Vec::new();
    for x in 0..300u64 {
        let start = Instant::now();
        let r = procspawn::spawn(x, |x| x + 1).join().expect("join");
        calls.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r, x + 1);
    }
    println!(
        "{{\"tool\":\"procspawn 1.0.2 spawn\",\"workload\":\"isolated\",\"median_ms\":{:.3},\"p99_ms\":{:.3}}}",
        median(&mut calls),
        p99(&mut calls)
    );
}
