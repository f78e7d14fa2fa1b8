//! Kernel cache invalidation off the request path: callback breaks queue it here and one
//! thread tells the kernel through the mount's `KernelNotifier`.
//! Invariant: nothing that answers a FUSE request or a server's break ever waits on the
//! kernel; a notification that finds the queue full is dropped.

use std::ffi::OsStr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};

use tracing::debug;

use crate::inode::Ino;

/// Notifications waiting for the invalidation thread. One that finds the queue full is
/// dropped: the kernel's attribute and entry TTLs are short, so the harm is bounded.
const QUEUE_MAX: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Attributes and cached pages of an inode.
    Inode(Ino),
    /// The dentry `name` in directory `parent`.
    Entry { parent: Ino, name: String },
}

/// How the invalidation thread tells the kernel to forget what it cached; the mount
/// gives one once it exists.
pub trait KernelNotifier: Send + Sync + 'static {
    /// Attributes and cached pages of `ino`.
    fn invalidate_inode(&self, ino: Ino) -> std::io::Result<()>;
    /// The dentry `name` in directory `parent`.
    fn invalidate_entry(&self, parent: Ino, name: &OsStr) -> std::io::Result<()>;
}

/// Hands invalidations to a thread of their own: a notification can block on an inode
/// lock held by a FUSE request in flight, and that request may be waiting for the very
/// caller (a break being acknowledged, a request being answered) that would notify.
#[derive(Clone)]
pub struct Invalidator {
    queue: SyncSender<Invalidation>,
    notifier: Arc<OnceLock<Box<dyn KernelNotifier>>>,
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
    pub fn set_notifier(&self, notifier: impl KernelNotifier) {
        let _ = self.notifier.set(Box::new(notifier));
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

fn run(work: Receiver<Invalidation>, notifier: Arc<OnceLock<Box<dyn KernelNotifier>>>) {
    while let Ok(invalidation) = work.recv() {
        let Some(notifier) = notifier.get() else {
            continue;
        };
        let result = match &invalidation {
            Invalidation::Inode(ino) => notifier.invalidate_inode(*ino),
            Invalidation::Entry { parent, name } => {
                notifier.invalidate_entry(*parent, OsStr::new(name))
            }
        };
        if let Err(e) = result {
            // A kernel that forgot the inode is no failure (the notifier answers Ok);
            // anything else usually means the mount is going away.
            debug!(?invalidation, error = %e, "kernel invalidation failed");
        }
    }
}
