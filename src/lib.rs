//! Process-level parallelism around a large, read-only model.
//!
//! procpool starts worker processes that all read one model through shared
//! memory (one physical copy, no per-worker deserialisation), feeds them
//! batches of arguments, and gives back results in order. A panic fails only
//! its task; a worker that dies fails only what it held and is replaced.
//!
//! # The parts
//!
//! - [`persist`] archives a model (any `rkyv::Archive` type) into a sealed
//!   shared-memory [`ModelStore`]; [`persist_to_path`] and
//!   [`ModelStore::load`] keep it in a file between runs.
//! - [`invoker`] (or [`InvokerBuilder`]) starts workers for a function
//!   `fn(&ArchivedModel, A) -> R`; [`Invoker::map`] and
//!   [`Invoker::map_unordered`] apply it to a stream of arguments.
//! - [`pool`] (or [`PoolBuilder`]) does the same for a plain `fn(A) -> R`,
//!   with no model.
//! - [`processor`] (or [`ProcessorBuilder`]) takes tasks one by one from a
//!   producer and hands each result to a collector here.
//! - [`map_reduce`] (or [`MapReduceBuilder`]) maps and reduces in the
//!   workers; only partial results travel.
//! - [`fold`] folds an input in chunks on a swappable [`ParallelMap`]
//!   backend: [`Sequential`], [`Threads`] or [`Processes`].
//! - [`pipeline`] chains stateless, stateful, windowed, chunked and
//!   in-parent stages that run at once on processes of their own, and
//!   yields the output lazily, in input order ([`Pipeline`]).
//! - [`run_sp`] (or [`Isolated`]) runs one call in a fresh process.
//! - [`proc_count`] says how many processes to use.
//! - [`init`] starts the fork server early; call it first in `main`.
//!
//! # Starting workers
//!
//! By default workers are forked from a *fork server*: a copy of this program
//! re-executed once, single-threaded, at [`init`] or at the first pool. The
//! program itself may run any number of threads. A re-executed copy never
//! reaches `main`: procpool's entry point takes over before it, so code in
//! `main` runs once, and `cargo test` binaries and examples work unchanged.
//! See [`StartMethod`] for the alternatives.
//!
//! Functions cross the process boundary as plain `fn` items, named by their
//! offset in the executable, which both sides check is the same build.
//! Arguments and results are serde types, encoded with postcard.
//!
//! # Logging
//!
//! Records logged with the `log` crate in a worker, at or above the parent's
//! `log::max_level()`, are re-emitted through the parent's logger with
//! `worker` and `task` key-values; `tracing` users receive them through
//! `tracing-log`. A worker's stderr reaches the parent's stderr, each line
//! prefixed with `[procpool worker N]`.
//!
//! # Example
//!
//! ```
//! #[derive(rkyv::Archive, rkyv::Serialize)]
//! struct Model { item_vectors: Vec<f32>, dim: u32 }
//!
//! fn dot(model: &ArchivedModel, (item, query): (u32, Vec<f32>)) -> f32 {
//!     let dim = model.dim.to_native() as usize;
//!     let row = &model.item_vectors[item as usize * dim..][..dim];
//!     row.iter().zip(&query).map(|(a, b)| a.to_native() * b).sum()
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     procpool::init();
//!     let store = procpool::persist(&Model { item_vectors: vec![1.0; 4 * 1000], dim: 4 })?;
//!     let mut invoker = procpool::invoker(&store, dot, 2)?;
//!     for score in invoker.map((0..1000).map(|i| (i, vec![0.5; 4]))) {
//!         assert_eq!(score?, 2.0);
//!     }
//!     Ok(())
//! }
//! ```

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![doc(test(attr(deny(warnings))))]

mod batching;
#[cfg(feature = "cluster")]
pub mod cluster;
mod config;
mod engine;
mod error;
mod fold;
mod invoker;
mod isolated;
mod launch;
mod map;
mod map_reduce;
mod pipeline;
mod pool;
mod processor;
mod progress;
mod seed;
mod store;

pub use config::{NUM_PROCS_ENV, THREAD_ENV_VARS, available_cpus, proc_count};
pub use error::{
    ConfigError, ExitInfo, PipelineError, PoolError, StageKind, StoreError, TaskError,
};
pub use fold::{Mapper, ParallelMap, Processes, Sequential, Threads, fold};
pub use invoker::{Invoker, InvokerBuilder, TaskFn, invoker};
pub use isolated::{Isolated, run_sp};
pub use launch::{ForkPermit, StartMethod};
pub use map::{Map, MapUnordered};
pub use map_reduce::{MapReduce, MapReduceBuilder, map_reduce};
pub use pipeline::{DEFAULT_IN_FLIGHT, Output, Pipeline, SequentialOutput, pipeline};
pub use pool::{Pool, PoolBuilder, pool};
pub use processor::{Processor, ProcessorBuilder, Summary, processor};
pub use progress::Progress;
#[cfg(feature = "progress-bar")]
pub use progress::progress_bar;
pub use seed::{SEED_ENV, seed, worker_id};
pub use store::{
    ArchivedModel, Model, ModelStore, StoreSink, persist, persist_to_path, persist_with_schema,
};

/// Starts the fork server now, while the program is small and has one
/// thread. Call it first in `main`; without it the server starts at the
/// first pool. A failure here is reported again, as an error, by the first
/// pool.
///
/// ```
/// procpool::init(); // the first line of `main`
/// ```
pub fn init() {
    if let Err(e) = launch::fork_server::ensure_started() {
        log::warn!(target: "procpool", "cannot start the fork server: {e}");
    }
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
