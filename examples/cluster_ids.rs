//! Ids, not records: the records sit in a shared store (a NATS key-value
//! bucket), the cluster's tasks carry only record ids, and each worker
//! reads the records it needs itself. Task messages then hold a few bytes
//! per task however large the records are.
//!
//! Start a server (`nats-server -js -a 127.0.0.1 -sd /tmp/nats`), one or
//! more agents:
//! `cargo run --release --features cluster --example cluster_ids -- agent`,
//! then the client: the same command without `agent`. `NATS_URL` says
//! where the server is (default `nats://127.0.0.1:4222`).

use std::sync::OnceLock;

use async_nats::jetstream::kv;

/// The bucket holding one user's ratings per key.
const BUCKET: &str = "procpool_example_ratings";
const USERS: u32 = 2_000;

/// A user's ratings: (item, rating) pairs, as stored in the bucket.
type Ratings = Vec<(u32, f32)>;

/// Made-up ratings for `user`: a few hundred of them.
pub(crate) fn ratings_of(user: u32) -> Ratings {
    (0..200 + user % 300)
        .map(|i| (i * 7 + user, ((user + i) % 5 + 1) as f32))
        .collect()
}

/// The bucket, as a worker process reaches it: one connection per worker,
/// made on its first task.
fn bucket() -> Result<&'static (tokio::runtime::Runtime, kv::Store), String> {
    static BUCKET_HANDLE: OnceLock<Result<(tokio::runtime::Runtime, kv::Store), String>> =
        OnceLock::new();
    BUCKET_HANDLE
        .get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let store = rt.block_on(async {
                let client = async_nats::connect(url())
                    .await
                    .map_err(|e| e.to_string())?;
                async_nats::jetstream::new(client)
                    .get_key_value(BUCKET)
                    .await
                    .map_err(|e| e.to_string())
            })?;
            Ok((rt, store))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// What runs on the agents: a user's mean rating, read from the bucket by
/// id. A missing or unreadable record is this task's error (a panic).
pub(crate) fn mean_rating(user: u32) -> f32 {
    let (rt, store) = bucket().unwrap_or_else(|e| panic!("cannot reach {BUCKET}: {e}"));
    let bytes = rt
        .block_on(store.get(user.to_string()))
        .unwrap_or_else(|e| panic!("cannot read user {user}: {e}"))
        .unwrap_or_else(|| panic!("no record for user {user}"));
    let ratings: Ratings = postcard::from_bytes(&bytes).expect("a ratings record");
    ratings.iter().map(|(_, r)| r).sum::<f32>() / ratings.len() as f32
}

/// Makes the bucket (a stream as NATS key-value buckets are) if it is not
/// there. `create_key_value` would first ask the server for account details
/// that servers before 2.10 (Debian's 2.9.10) describe in an older form.
async fn make_bucket(
    js: &async_nats::jetstream::Context,
) -> Result<kv::Store, Box<dyn std::error::Error>> {
    use async_nats::jetstream::stream;
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{BUCKET}"),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(BUCKET).await?)
}

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Puts every user's ratings in the bucket (as whoever owns the data
/// would, once); the bytes of records stored.
pub(crate) fn publish_records(url: &str) -> Result<usize, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = async_nats::connect(url).await?;
        let js = async_nats::jetstream::new(client);
        let store = make_bucket(&js).await?;
        let mut total = 0;
        for user in 0..USERS {
            let bytes = postcard::to_allocvec(&ratings_of(user))?;
            total += bytes.len();
            store.put(user.to_string(), bytes.into()).await?;
        }
        Ok(total)
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    procpool::init();
    let registry = procpool::cluster::Registry::new().map("mean_rating", mean_rating);
    if std::env::args().any(|a| a == "agent") {
        let options = procpool::cluster::AgentOptions::default();
        return Ok(procpool::cluster::run_agent(&url(), &registry, &options)?);
    }
    let record_bytes = publish_records(&url())?;
    // The tasks carry ids only.
    let id_bytes: usize = (0..USERS)
        .map(|user| postcard::to_allocvec(&user).map_or(0, |b| b.len()))
        .sum();
    let mut cluster = procpool::cluster::Cluster::connect(&url())?;
    let means = cluster.map::<u32, f32>(&registry, "mean_rating", 0..USERS)?;
    for (user, mean) in means.iter().enumerate().take(3) {
        println!(
            "user {user}: mean rating {:.3}",
            mean.as_ref().map_err(|e| e.to_string())?
        );
    }
    let failed = means.iter().filter(|m| m.is_err()).count();
    println!(
        "{USERS} users: {failed} failed; the tasks carried {id_bytes} bytes of ids for \
         {record_bytes} bytes of records"
    );
    Ok(())
}
