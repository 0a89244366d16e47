//! Whether a client is still there. Each client keeps a key of its own
//! fresh in a key-value bucket whose entries expire; an agent drops the
//! batches of a client whose key has expired (it died without cancelling
//! its job) and deletes that client's results, so a crashed client leaves
//! neither work nor data behind for long.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};

use super::ClusterError;

/// The bucket of live clients.
const BUCKET: &str = "procpool_clients";
/// How long a client's key lives without being refreshed: a client silent
/// that long is taken for dead.
pub(crate) const EXPIRY: Duration = Duration::from_secs(30);
/// How often a client refreshes its key.
const REFRESH: Duration = Duration::from_secs(5);
/// How long an agent trusts that a client it saw is still there.
const TRUST: Duration = Duration::from_secs(5);

/// The key of client `client`.
fn key(client: u64) -> String {
    format!("{client:016x}")
}

/// The bucket, made if it is not there (as the stream a key-value bucket
/// is: `create_key_value` would first ask the server for account details
/// that servers before 2.10 describe in an older form).
async fn bucket(js: &jetstream::Context) -> Result<kv::Store, ClusterError> {
    use jetstream::stream;
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{BUCKET}"),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: EXPIRY,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| ClusterError::new(format!("cannot make the bucket {BUCKET}: {e}")))?;
    js.get_key_value(BUCKET)
        .await
        .map_err(|e| ClusterError::new(format!("cannot open the bucket {BUCKET}: {e}")))
}

/// Says `client` is there, and keeps saying it every few seconds on the
/// runtime, until the returned task is aborted.
pub(crate) async fn keep_alive(
    js: &jetstream::Context,
    client: u64,
) -> Result<tokio::task::JoinHandle<()>, ClusterError> {
    let store = bucket(js).await?;
    let key = key(client);
    store
        .put(&key, bytes::Bytes::new())
        .await
        .map_err(|e| ClusterError::new(format!("cannot register this client: {e}")))?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH).await;
            if let Err(e) = store.put(&key, bytes::Bytes::new()).await {
                log::warn!(target: "procpool", "cannot refresh this client's key: {e}");
            }
        }
    }))
}

/// An agent's view of which clients are there.
#[derive(Default)]
pub(crate) struct Clients {
    store: Option<kv::Store>,
    seen: HashMap<u64, Instant>,
    /// Clients found gone whose results were deleted.
    gone: HashSet<u64>,
}

impl Clients {
    /// Whether `client` has gone (its key expired). When the server cannot
    /// say, it is taken to be there.
    pub(crate) fn is_gone(
        &mut self,
        rt: &tokio::runtime::Runtime,
        js: &jetstream::Context,
        client: u64,
    ) -> bool {
        if self.gone.contains(&client) {
            return true;
        }
        if self
            .seen
            .get(&client)
            .is_some_and(|at| at.elapsed() < TRUST)
        {
            return false;
        }
        if self.store.is_none() {
            self.store = rt.block_on(bucket(js)).ok();
        }
        let Some(store) = &self.store else {
            return false;
        };
        match rt.block_on(store.get(key(client))) {
            Ok(Some(_)) => {
                self.seen.insert(client, Instant::now());
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Deletes the results of a client that has gone, once.
    pub(crate) fn forget(
        &mut self,
        rt: &tokio::runtime::Runtime,
        results: &jetstream::stream::Stream,
        client: u64,
    ) {
        if self.gone.insert(client) {
            let subject = super::wire::client_results(client);
            let _ = rt.block_on(results.purge().filter(subject).into_future());
        }
    }
}
