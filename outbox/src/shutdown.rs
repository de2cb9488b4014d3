//! Stopping: on SIGTERM (what container runtimes and systemd send) or SIGINT (Ctrl-C), or through
//! the handle of a relay or consumer started on a task of its own.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::Error;

/// A relay or consumer running on a task of its own, and the means to stop it.
pub(crate) struct Stoppable {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// The future a [`Stoppable`]'s task is given: it completes when stopping is asked for, or when
/// the handle is dropped.
pub(crate) type StopRequested = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Stoppable {
    /// Spawns `run`, handing it the future that says when to stop.
    pub(crate) fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(StopRequested) -> Fut,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let requested: StopRequested = Box::pin(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        });
        Self {
            stop,
            task: tokio::spawn(run(requested)),
        }
    }

    /// Asks the task to stop and waits for it.
    pub(crate) async fn stop(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits for the task to end.
    pub(crate) async fn join(self) -> Result<(), Error> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(Error::Stopped(join.to_string())),
        }
    }
}

/// Completes when the process receives SIGTERM or SIGINT. If the signal handlers cannot be
/// installed, it never completes (and says so), rather than stopping at once.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                    _ = int.recv() => tracing::info!("SIGINT received; stopping"),
                }
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM/SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received; stopping");
        } else {
            std::future::pending::<()>().await;
        }
    }
}
