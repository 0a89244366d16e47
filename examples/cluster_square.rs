//! Cluster mode in one program: `cluster_square agent` on each machine
//! runs a node agent; `cluster_square` sends a map to them. Start the
//! engine first: `nats-server -js -a 127.0.0.1 -sd /tmp/nats` (Debian:
//! `apt-get install nats-server`), then
//! `cargo run --release --features cluster --example cluster_square -- agent`
//! in one terminal and the same without `agent` in another.

fn square(x: u64) -> u64 {
    x * x
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let registry = procpool::cluster::Registry::new().map("square", square);
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    if std::env::args().any(|a| a == "agent") {
        // On each machine: `cluster_square agent`.
        let options = procpool::cluster::AgentOptions::default();
        return Ok(procpool::cluster::run_agent(&url, &registry, &options)?);
    }
    let mut cluster = procpool::cluster::Cluster::connect(&url)?;
    let squares = cluster.map::<u64, u64>(&registry, "square", 0..1_000_000u64)?;
    assert_eq!(squares[3], Ok(9));
    println!("{} squares from the cluster", squares.len());
    Ok(())
}
