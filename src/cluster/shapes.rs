//! The shapes a cluster job takes, as local work has them: a map (read
//! lazily and handed back as results arrive, or gathered in input order), a
//! processor with a collector here, a map-reduce whose values are folded on
//! the agents, and a backend for [`fold`](crate::fold).

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use procpool_worker::worker::task::{capturing, catch};

use super::job::{Job, Ready};
use super::{Cluster, ClusterError, Registry};
use crate::error::TaskError;
use crate::{Mapper, ParallelMap, Summary};

/// The results of [`Cluster::map_unordered`], as they arrive: each with
/// the index of its argument, or the one error that ended the job. Dropping
/// it cancels the job.
pub struct MapUnordered<'c, A, R, I> {
    job: Job<'c>,
    args: I,
    exhausted: bool,
    ready: Ready<R, ()>,
    ended: bool,
    _types: PhantomData<fn(A)>,
}

impl<'c, A, R, I> MapUnordered<'c, A, R, I> {
    pub(super) fn new(job: Job<'c>, args: I) -> Self {
        MapUnordered {
            job,
            args,
            exhausted: false,
            ready: Ready::default(),
            ended: false,
            _types: PhantomData,
        }
    }
}

impl<A, R, I> std::fmt::Debug for MapUnordered<'_, A, R, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapUnordered")
            .field("job", &format_args!("{:016x}", self.job.id))
            .field("batches_in_flight", &self.job.batches_in_flight())
            .finish_non_exhaustive()
    }
}

impl<A, R, I> Iterator for MapUnordered<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
    R: DeserializeOwned,
{
    type Item = Result<(usize, Result<R, TaskError>), ClusterError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Dropping a subscription spawns its unsubscribe on the runtime.
        let handle = self.job.rt.handle().clone();
        let _inside = handle.enter();
        loop {
            if let Some((index, result)) = self.ready.outcomes.pop_front() {
                // Indices count arguments taken from an iterator.
                return Some(Ok((index as usize, result)));
            }
            if self.ended {
                return None;
            }
            let step = self.send_more().and_then(|()| {
                if self.exhausted && self.job.is_settled() {
                    self.ended = true;
                    return Ok(());
                }
                self.job.poll(&mut self.ready)
            });
            if let Err(e) = step {
                self.ended = true;
                return Some(Err(e));
            }
        }
    }
}

impl<A, R, I> MapUnordered<'_, A, R, I>
where
    I: Iterator<Item = A>,
    A: Serialize,
{
    /// Reads arguments and sends them in batches, until as many batches
    /// as allowed are in flight or the input ends.
    fn send_more(&mut self) -> Result<(), ClusterError> {
        while !self.exhausted && !self.job.is_full() {
            match self.args.next() {
                Some(arg) => {
                    self.job.add(arg, &mut self.ready)?;
                }
                None => {
                    self.exhausted = true;
                    self.job.flush()?;
                }
            }
        }
        Ok(())
    }
}

/// Gathers an unordered job's results in input order.
pub(super) fn ordered<R, I>(results: I) -> Result<Vec<Result<R, TaskError>>, ClusterError>
where
    I: Iterator<Item = Result<(usize, Result<R, TaskError>), ClusterError>>,
{
    let mut slots: Vec<Option<Result<R, TaskError>>> = Vec::new();
    for item in results {
        let (index, result) = item?;
        if slots.len() <= index {
            slots.resize_with(index + 1, || None);
        }
        slots[index] = Some(result);
    }
    Ok(slots
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| Err(TaskError::pool(i as u64, "no result came back"))))
        .collect())
}

/// A processor on the cluster, as RLTK's remote `Task`: tasks added one by
/// one run on the agents (its input handler is the exposed function), and
/// each result comes to the collector here (its output handler) as it
/// arrives. Made by [`Cluster::processor`].
///
/// [`add_task`](Self::add_task) blocks while as many batches as allowed
/// are in flight, handing results to the collector meanwhile. A panic in
/// the collector stops the processor: `add_task` and
/// [`join`](Self::join) then return it. Dropping the processor without
/// `join` cancels the job.
pub struct ClusterProcessor<'c, A, R, C> {
    job: Job<'c>,
    ready: Ready<R, ()>,
    collector: C,
    summary: Summary,
    stopped: Option<ClusterError>,
    _types: PhantomData<fn(A)>,
}

impl<A, R, C> std::fmt::Debug for ClusterProcessor<'_, A, R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterProcessor")
            .field("job", &format_args!("{:016x}", self.job.id))
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl<'c, A, R, C> ClusterProcessor<'c, A, R, C>
where
    A: Serialize,
    R: DeserializeOwned,
    C: FnMut(u64, Result<R, TaskError>),
{
    pub(super) fn new(job: Job<'c>, collector: C) -> Self {
        ClusterProcessor {
            job,
            ready: Ready::default(),
            collector,
            summary: Summary::default(),
            stopped: None,
            _types: PhantomData,
        }
    }

    /// Adds a task; returns its index. Blocks while as many batches as
    /// allowed are in flight, collecting results meanwhile. A task goes
    /// out at once when nothing else is in flight, else with its batch.
    ///
    /// See the example on [`Cluster::processor`].
    ///
    /// # Errors
    ///
    /// The error that stopped the processor: a panic in the collector, a
    /// batch the server would not store, or the job's timeout.
    pub fn add_task(&mut self, arg: A) -> Result<u64, ClusterError> {
        let handle = self.job.rt.handle().clone();
        let _inside = handle.enter();
        self.check()?;
        let step = self.job.add(arg, &mut self.ready).and_then(|index| {
            if self.job.is_settled() {
                self.job.flush()?;
            }
            while self.job.is_full() && self.stopped.is_none() {
                self.job.poll(&mut self.ready)?;
                self.deliver();
            }
            Ok(index)
        });
        self.deliver();
        match step {
            Ok(index) => self.check().map(|()| index),
            Err(e) => Err(self.stop(e)),
        }
    }

    /// Sends what is pending, waits until every task added has been
    /// collected, and says how it went.
    ///
    /// See the example on [`Cluster::processor`].
    ///
    /// # Errors
    ///
    /// As for [`add_task`](Self::add_task).
    pub fn join(mut self) -> Result<Summary, ClusterError> {
        let handle = self.job.rt.handle().clone();
        let _inside = handle.enter();
        self.check()?;
        let step = self.job.flush().and_then(|()| {
            while !self.job.is_settled() && self.stopped.is_none() {
                self.job.poll(&mut self.ready)?;
                self.deliver();
            }
            Ok(())
        });
        self.deliver();
        if let Err(e) = step {
            return Err(self.stop(e));
        }
        self.check().map(|()| self.summary)
    }

    /// Hands what came back to the collector, under `catch_unwind`.
    fn deliver(&mut self) {
        while self.stopped.is_none()
            && let Some((index, result)) = self.ready.outcomes.pop_front()
        {
            let failed = result.is_err();
            let collector = &mut self.collector;
            if let Err(failure) = capturing(|| catch(|| collector(index, result))) {
                let error = TaskError::from_failure(index, failure);
                self.stopped = Some(ClusterError::task(error));
                return;
            }
            if failed {
                self.summary.failed += 1;
            } else {
                self.summary.done += 1;
            }
        }
    }

    fn check(&self) -> Result<(), ClusterError> {
        match &self.stopped {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn stop(&mut self, error: ClusterError) -> ClusterError {
        self.stopped.get_or_insert(error).clone()
    }
}

/// Runs a map-reduce job over `items` (see [`Cluster::map_reduce`]).
pub(super) fn run_map_reduce<A, R>(
    mut job: Job<'_>,
    reducer: fn(R, R) -> R,
    items: impl IntoIterator<Item = A>,
) -> Result<Option<R>, ClusterError>
where
    A: Serialize,
    R: DeserializeOwned,
{
    let handle = job.rt.handle().clone();
    let _inside = handle.enter();
    let mut ready: Ready<(), R> = Ready::default();
    let mut total: Option<R> = None;
    // The failure of the lowest task index, as for local work.
    let mut failure: Option<TaskError> = None;
    let fail = |error: TaskError, failure: &mut Option<TaskError>| {
        if failure
            .as_ref()
            .is_none_or(|kept| error.task_index() < kept.task_index())
        {
            *failure = Some(error);
        }
    };
    let mut items = items.into_iter();
    let mut exhausted = false;
    loop {
        // New input stops at the first failure; what was sent finishes.
        while !exhausted && failure.is_none() && !job.is_full() {
            match items.next() {
                Some(item) => {
                    job.add(item, &mut ready)?;
                }
                None => {
                    exhausted = true;
                    job.flush()?;
                }
            }
        }
        if failure.is_some() && !exhausted {
            exhausted = true;
            job.flush()?;
        }
        while let Some((_, outcome)) = ready.outcomes.pop_front() {
            if let Err(error) = outcome {
                fail(error, &mut failure);
            }
        }
        while let Some((first, partial)) = ready.partials.pop_front() {
            match partial {
                Err(error) => fail(error, &mut failure),
                Ok(None) => {}
                Ok(Some(partial)) => {
                    total = match total.take() {
                        None => Some(partial),
                        Some(sum) => match capturing(|| catch(|| reducer(sum, partial))) {
                            Ok(sum) => Some(sum),
                            Err(panic) => {
                                fail(TaskError::from_failure(first, panic), &mut failure);
                                None
                            }
                        },
                    };
                }
            }
        }
        if exhausted && job.is_settled() {
            break;
        }
        job.poll(&mut ready)?;
    }
    match failure {
        Some(error) => Err(ClusterError::task(error)),
        None => Ok(total),
    }
}

/// The cluster as a [`ParallelMap`] backend for [`fold`](crate::fold): the
/// same domain code that runs sequentially, on threads or on local
/// processes runs on the agents. Each [`Mapper`] it is given must be
/// exposed in its registry ([`Registry::mapper`]). Made by
/// [`Cluster::backend`].
pub struct ClusterBackend<'c> {
    pub(super) cluster: &'c mut Cluster,
    pub(super) registry: &'c Registry,
}

impl std::fmt::Debug for ClusterBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBackend")
            .field("cluster", &self.cluster)
            .field("registry", &self.registry)
            .finish()
    }
}

impl ParallelMap for ClusterBackend<'_> {
    fn map<A, R>(&mut self, f: Mapper<A, R>, args: Vec<A>) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let Some(name) = self.registry.name_of(f.job()) else {
            return Err(TaskError::pool(
                0,
                "this function is not exposed in the cluster's registry (Registry::mapper)",
            ));
        };
        let results = self
            .cluster
            .map::<A, R>(self.registry, &name, args)
            .map_err(|e| match e.task_error() {
                Some(error) => error.clone(),
                None => TaskError::pool(0, e.to_string()),
            })?;
        results.into_iter().collect()
    }
}
