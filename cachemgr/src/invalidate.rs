//! Kernel cache invalidation, off the request path: callback breaks queue work here and
//! one thread tells the kernel through fuser's `Notifier`.
//! Invariant: nothing that answers a FUSE request or a server's break ever waits on the
//! kernel: a notification can block on an inode lock held by a FUSE request in flight,
//! and that request may be waiting for us. The queue is bounded; when it is full the
//! notification is dropped (the kernel's attribute and entry TTLs are short anyway).

use std::ffi::OsStr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};

use fuser::{INodeNo, Notifier};
use tracing::debug;

use crate::inode::Ino;

/// Notifications waiting for the invalidation thread.
const QUEUE_MAX: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes and cached pages of an inode.
    Inode(Ino),
    /// The dentry `name` in directory `parent`.
    Entry { parent: Ino, name: String },
}

#[derive(Clone)]
pub struct Invalidator {
    queue: SyncSender<Invalidation>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl Invalidator {
    /// Starts the invalidation thread; it ends when every `Invalidator` is dropped.
    pub fn start() -> std::io::Result<Invalidator> {
        let (queue, work) = sync_channel(QUEUE_MAX);
        let notifier = Arc::new(OnceLock::new());
        let thread_notifier = notifier.clone();
        std::thread::Builder::new()
            .name("holdfast-inval".into())
            .spawn(move || run(work, thread_notifier))?;
        Ok(Invalidator { queue, notifier })
    }

    /// Called once the mount exists.
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    pub fn push(&self, invalidation: Invalidation) {
        if self.notifier.get().is_none() {
            return; // not mounted yet: the kernel caches nothing
        }
        match self.queue.try_send(invalidation) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => debug!("kernel invalidation queue full; dropping one"),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn run(work: Receiver<Invalidation>, notifier: Arc<OnceLock<Notifier>>) {
    while let Ok(invalidation) = work.recv() {
        let Some(notifier) = notifier.get() else {
            continue;
        };
        let result = match &invalidation {
            Invalidation::Inode(ino) => notifier.inval_inode(INodeNo(ino.0), 0, 0),
            Invalidation::Entry { parent, name } => {
                notifier.inval_entry(INodeNo(parent.0), OsStr::new(name))
            }
        };
        if let Err(e) = result {
            // ENOENT (kernel forgot the inode) is mapped to Ok by fuser; anything else
            // usually means the mount is going away.
            debug!(?invalidation, error = %e, "kernel invalidation failed");
        }
    }
}
