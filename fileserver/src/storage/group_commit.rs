//! Group commit: writes that arrive while a commit is in flight share the next one.
//! Invariant: at most one leader at a time; a submitter returns only once its job ran or
//! was dropped, and one finding jobs pending with no leader leads, so none is stranded.

use std::sync::mpsc::{Receiver, TryRecvError};

use parking_lot::{Condvar, Mutex};

/// Most jobs one batch takes, so one commit's work (and the wait of the first job in it)
/// stays bounded. The queue itself holds at most one job per blocked storage thread,
/// which tokio's blocking pool bounds.
const BATCH_JOBS_MAX: usize = 256;

/// The queue of one volume's writes.
///
/// There is no committer thread, so a volume with no writes costs nothing: the first
/// submitter to find no leader runs one batch of the oldest jobs queued (up to
/// `BATCH_JOBS_MAX`), hands leadership back and wakes the others; whoever still waits and
/// finds jobs pending leads the next batch, the old leader too if its job was not in it.
pub(super) struct GroupCommit<J> {
    queue: Mutex<Queue<J>>,
    changed: Condvar,
}

struct Queue<J> {
    pending: Vec<J>,
    leading: bool,
}

impl<J> GroupCommit<J> {
    pub(super) fn new() -> GroupCommit<J> {
        GroupCommit {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                leading: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Queues `job`, whose answer arrives on `answer`, and waits for it; if no one leads,
    /// runs batches with `run` until the answer is there. `None` if the job was dropped
    /// unanswered (its batch could not run).
    pub(super) fn submit<R>(
        &self,
        job: J,
        answer: &Receiver<R>,
        mut run: impl FnMut(Vec<J>),
    ) -> Option<R> {
        let mut queue = self.queue.lock();
        queue.pending.push(job);
        loop {
            // Checked under the lock: a leader answers before it takes the lock to hand
            // over and notify, so an answer missed here is followed by a wake-up.
            match answer.try_recv() {
                Ok(value) => return Some(value),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if !queue.leading && !queue.pending.is_empty() {
                queue.leading = true;
                let take = queue.pending.len().min(BATCH_JOBS_MAX);
                let batch: Vec<J> = queue.pending.drain(..take).collect();
                drop(queue);
                let handover = Handover(self);
                run(batch);
                drop(handover);
                queue = self.queue.lock();
                continue;
            }
            self.changed.wait(&mut queue);
        }
    }
}

/// Gives up leadership and wakes the waiters, also when a batch panics.
struct Handover<'a, J>(&'a GroupCommit<J>);

impl<J> Drop for Handover<'_, J> {
    fn drop(&mut self) {
        self.0.queue.lock().leading = false;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc::sync_channel;

    use super::*;

    type Job = Box<dyn FnOnce() + Send>;

    #[test]
    fn concurrent_submitters_share_batches_and_all_get_answers() {
        let group: Arc<GroupCommit<Job>> = Arc::new(GroupCommit::new());
        let batches = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..16)
            .map(|n| {
                let group = Arc::clone(&group);
                let batches = Arc::clone(&batches);
                std::thread::spawn(move || {
                    let (sender, receiver) = sync_channel(1);
                    let job: Job = Box::new(move || {
                        let _ = sender.send(n);
                    });
                    group.submit(job, &receiver, |jobs| {
                        batches.lock().push(jobs.len());
                        for job in jobs {
                            job();
                        }
                    })
                })
            })
            .collect();
        let mut answers: Vec<i32> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        answers.sort_unstable();
        assert_eq!(answers, (0..16).collect::<Vec<_>>());
        assert_eq!(batches.lock().iter().sum::<usize>(), 16);
    }

    #[test]
    fn a_dropped_job_answers_none() {
        let group: GroupCommit<Job> = GroupCommit::new();
        let (sender, receiver) = sync_channel::<u8>(1);
        let job: Job = Box::new(move || drop(sender));
        assert_eq!(group.submit(job, &receiver, drop), None);
    }
}
