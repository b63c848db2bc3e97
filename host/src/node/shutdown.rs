//! Stopping a member: one signal that every task watches.
//!
//! Anything may start the stop (a signal handler, `Server::shutdown`, a task
//! that failed); it only ever goes one way. Tasks wait on their
//! [`ShutdownSignal`] in a `select!` next to their work and drain what they
//! hold before they return (the core finishes the write it is persisting, the
//! apply thread applies what it was handed).

use std::sync::Arc;
use tokio::sync::watch;

/// Starts the stop of every task of one member.
#[derive(Clone, Debug)]
pub struct Shutdown {
    sender: Arc<watch::Sender<bool>>,
}

/// What a task watches to learn that the member is stopping.
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// A member that is not stopping.
    pub fn new() -> Shutdown {
        let (sender, _) = watch::channel(false);
        Shutdown { sender: Arc::new(sender) }
    }

    /// Starts stopping. Idempotent; later signals see it too.
    pub fn begin(&self) {
        self.sender.send_replace(true);
    }

    /// A signal for one task.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal { receiver: self.sender.subscribe() }
    }
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown::new()
    }
}

impl ShutdownSignal {
    /// Resolves once the member is stopping (at once if it already is).
    pub async fn wait(&mut self) {
        // An error means every `Shutdown` is gone, which only happens when
        // the member is gone: stop too.
        let _ = self.receiver.wait_for(|stopping| *stopping).await;
    }
}
