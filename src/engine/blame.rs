//! Which task a dead worker's death is charged to, and what runs again.
//!
//! Pure bookkeeping over the batches the worker held and what its status
//! page said, so it is tested here without starting a process.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::DEATHS_BEFORE_START;
use super::batch::Batch;
use crate::error::Death;

/// Deaths charged to tasks over one run.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Deaths each task has caused (only tasks that caused one).
    deaths: HashMap<u64, u32>,
    /// Workers that died holding this task alone in the batch they were to
    /// run next, before it started.
    deaths_before_start: HashMap<u64, u32>,
}

/// What the worker was doing when it died, as far as the parent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LastWords {
    /// The task its status page says it was running.
    pub running: Option<u64>,
    /// The task it was stopped for, having run past its time limit.
    pub timed_out: Option<u64>,
}

/// What follows a worker's death.
#[derive(Debug, Default)]
pub(super) struct Aftermath {
    /// Batches to run before anything else queued, in this order.
    pub first: Vec<Batch>,
    /// Batches to run after what is queued already, in this order.
    pub later: Vec<Batch>,
    /// Tasks that fail, and how their worker died.
    pub failed: Vec<(u64, Death)>,
}

impl Ledger {
    /// Charges the death of a worker that held `held` (oldest first) and
    /// said `last`; a task fails once it has caused `max_tries` deaths, or
    /// at once if it ran past `time_limit`.
    ///
    /// The task it was running (or was stopped for) is the culprit: the
    /// tasks before it in its batch ran and run again, unblamed; the culprit
    /// runs again alone, so a second death names it for certain; the rest
    /// runs again later. With no task running, none is blamed: the batch it
    /// was to run next (the only one it could have been reading) runs again
    /// in halves, and only a task alone in its batch counts such deaths.
    pub(super) fn after_death(
        &mut self,
        held: VecDeque<Batch>,
        last: LastWords,
        max_tries: u32,
        time_limit: Duration,
    ) -> Aftermath {
        let mut after = Aftermath::default();
        let culprit = last.timed_out.or(last.running).filter(|&c| {
            held.iter()
                .any(|b| (b.first_index..b.first_index + u64::from(b.count())).contains(&c))
        });
        for (position, batch) in held.into_iter().enumerate() {
            let n = batch.count() as usize;
            let Some(c) =
                culprit.filter(|&c| c >= batch.first_index && c < batch.first_index + n as u64)
            else {
                if culprit.is_none() && position == 0 {
                    self.died_before_start(batch, &mut after);
                } else {
                    after.later.push(batch);
                }
                continue;
            };
            let at = (c - batch.first_index) as usize;
            if at > 0 {
                after.later.push(batch.slice(0..at));
            }
            let deaths = self.deaths.entry(c).or_insert(0);
            *deaths += 1;
            if last.timed_out == Some(c) {
                after.failed.push((c, Death::Timeout(time_limit)));
            } else if *deaths >= max_tries {
                after.failed.push((c, Death::Crash));
            } else {
                after.first.push(batch.slice(at..at + 1));
            }
            if at + 1 < n {
                after.later.push(batch.slice(at + 1..n));
            }
        }
        after
    }

    /// A batch whose worker died before starting any of its tasks: no task
    /// is blamed. If the batch itself kills workers (they die reading it, or
    /// a task hides its start), running it in halves finds the one task that
    /// does; after [`DEATHS_BEFORE_START`] such deaths alone in its batch,
    /// that task fails.
    fn died_before_start(&mut self, batch: Batch, after: &mut Aftermath) {
        let n = batch.count() as usize;
        if n > 1 {
            after.first.push(batch.slice(0..n / 2));
            after.first.push(batch.slice(n / 2..n));
            return;
        }
        let index = batch.first_index;
        let deaths = self.deaths_before_start.entry(index).or_insert(0);
        *deaths += 1;
        if *deaths < DEATHS_BEFORE_START {
            after.first.push(batch);
        } else {
            after
                .failed
                .push((index, Death::BeforeStart(DEATHS_BEFORE_START)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(1);

    /// A batch of tasks `first..first + n` whose arguments are their indices.
    fn batch(first: u64, n: u64) -> Batch {
        let mut b = Batch::new(first);
        for i in first..first + n {
            b.offsets.push(b.items.len() as u32);
            b.items.extend_from_slice(&i.to_le_bytes());
        }
        b
    }

    /// The tasks of `batches`, each as (index, argument).
    fn tasks(batches: &[Batch]) -> Vec<(u64, u64)> {
        batches
            .iter()
            .flat_map(|b| {
                (0..b.count() as usize).map(move |i| {
                    let arg = u64::from_le_bytes(b.item(i).try_into().unwrap());
                    (b.first_index + i as u64, arg)
                })
            })
            .collect()
    }

    fn indices(batches: &[Batch]) -> Vec<u64> {
        let t = tasks(batches);
        // Each task keeps its own argument through every slicing.
        assert!(t.iter().all(|(i, a)| i == a), "{t:?}");
        t.into_iter().map(|(i, _)| i).collect()
    }

    fn running(task: u64) -> LastWords {
        LastWords {
            running: Some(task),
            timed_out: None,
        }
    }

    const IDLE: LastWords = LastWords {
        running: None,
        timed_out: None,
    };

    #[test]
    fn the_running_task_runs_again_alone_and_its_neighbours_unblamed() {
        let mut ledger = Ledger::default();
        let held = VecDeque::from([batch(10, 5), batch(15, 5)]);
        let after = ledger.after_death(held, running(12), 2, LIMIT);
        assert_eq!(indices(&after.first), [12]);
        assert_eq!(indices(&after.later), [10, 11, 13, 14, 15, 16, 17, 18, 19]);
        assert!(after.failed.is_empty());
    }

    #[test]
    fn a_task_fails_after_max_tries_deaths_and_no_other_is_charged() {
        let mut ledger = Ledger::default();
        let after = ledger.after_death(VecDeque::from([batch(0, 4)]), running(2), 2, LIMIT);
        assert!(after.failed.is_empty());
        // Its second death, alone in its batch this time.
        let after = ledger.after_death(
            VecDeque::from([batch(2, 1), batch(4, 3)]),
            running(2),
            2,
            LIMIT,
        );
        assert_eq!(after.failed, [(2, Death::Crash)]);
        assert!(after.first.is_empty());
        assert_eq!(indices(&after.later), [4, 5, 6]);
        // Its neighbours were never charged: one death each is not the end.
        let after = ledger.after_death(VecDeque::from([batch(5, 1)]), running(5), 2, LIMIT);
        assert!(after.failed.is_empty());
        assert_eq!(indices(&after.first), [5]);
    }

    #[test]
    fn a_timed_out_task_fails_at_once() {
        let mut ledger = Ledger::default();
        let last = LastWords {
            running: Some(3),
            timed_out: Some(3),
        };
        let after = ledger.after_death(VecDeque::from([batch(0, 6)]), last, 5, LIMIT);
        assert_eq!(after.failed, [(3, Death::Timeout(LIMIT))]);
        assert_eq!(indices(&after.later), [0, 1, 2, 4, 5]);
        assert!(after.first.is_empty());
    }

    #[test]
    fn with_max_tries_one_the_culprit_fails_at_its_first_death() {
        let mut ledger = Ledger::default();
        let after = ledger.after_death(VecDeque::from([batch(7, 1)]), running(7), 1, LIMIT);
        assert_eq!(after.failed, [(7, Death::Crash)]);
    }

    #[test]
    fn a_death_with_no_task_running_blames_none_and_halves_the_next_batch() {
        let mut ledger = Ledger::default();
        let held = VecDeque::from([batch(0, 5), batch(5, 3)]);
        let after = ledger.after_death(held, IDLE, 1, LIMIT);
        assert!(after.failed.is_empty());
        assert_eq!(after.first.len(), 2);
        assert_eq!(indices(&after.first[..1]), [0, 1]);
        assert_eq!(indices(&after.first[1..]), [2, 3, 4]);
        assert_eq!(indices(&after.later), [5, 6, 7]);
    }

    #[test]
    fn a_running_task_that_is_not_held_counts_as_no_task() {
        // Its results went out before the death: it is not the worker's now.
        let mut ledger = Ledger::default();
        let after = ledger.after_death(VecDeque::from([batch(20, 2)]), running(3), 1, LIMIT);
        assert!(after.failed.is_empty());
        assert_eq!(indices(&after.first), [20, 21]);
    }

    #[test]
    fn a_task_that_kills_workers_before_it_starts_is_found_and_fails_alone() {
        // Whatever batch holds task 6 kills its worker before any task
        // starts. Follow the run: deaths split the batch until 6 is alone,
        // then 6 fails after DEATHS_BEFORE_START deaths; nothing else does.
        let mut ledger = Ledger::default();
        let mut queue = VecDeque::from([batch(0, 16)]);
        let mut failed = Vec::new();
        let mut done = Vec::new();
        let mut deaths = 0;
        while let Some(next) = queue.pop_front() {
            let first = next.first_index;
            if (first..first + u64::from(next.count())).contains(&6) {
                deaths += 1;
                let after = ledger.after_death(VecDeque::from([next]), IDLE, 1, LIMIT);
                for b in after.first.into_iter().rev() {
                    queue.push_front(b);
                }
                queue.extend(after.later);
                failed.extend(after.failed);
            } else {
                done.extend(indices(&[next]));
            }
            assert!(deaths < 100, "the search does not end");
        }
        assert_eq!(failed, [(6, Death::BeforeStart(DEATHS_BEFORE_START))]);
        done.sort_unstable();
        assert_eq!(done, (0..16).filter(|&i| i != 6).collect::<Vec<_>>());
        // Four halvings, then the deaths of 6 alone.
        assert_eq!(deaths, 4 + DEATHS_BEFORE_START);
    }
}
