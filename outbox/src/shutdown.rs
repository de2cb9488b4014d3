//! Stopping: on SIGTERM (what container runtimes and systemd send), SIGINT (Ctrl-C) or SIGQUIT
//! (which django-outbox-pattern's consumer handles as SIGTERM; it replaces the default core dump),
//! or through the handle of a relay or consumer started on a task of its own.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

use crate::error::Error;

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

/// Completes when the process receives SIGTERM, SIGINT or SIGQUIT. If the signal handlers cannot
/// be installed, it never completes (and says so), rather than stopping at once.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(mut term), Ok(mut int), Ok(mut quit)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                    _ = int.recv() => tracing::info!("SIGINT received; stopping"),
                    _ = quit.recv() => tracing::info!("SIGQUIT received; stopping"),
                }
            }
            (Err(err), _, _) | (_, Err(err), _) | (_, _, Err(err)) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM/SIGINT/SIGQUIT");
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

/// Completes at the first [`signal`], after arranging that a second one, while the caller
/// stops gracefully, ends the process at once (exit code 1): an operator who signals twice means
/// it, and whatever was not acknowledged is delivered again later.
pub(crate) async fn signal_then_exit_on_second() {
    signal().await;
    // Listening again at once. tokio keeps a signal's handler installed once set, so a second
    // signal in the instant before this listens is never the default kill (nor a core dump).
    tokio::spawn(async {
        signal().await;
        tracing::warn!("second signal during shutdown; exiting at once");
        std::process::exit(1);
    });
}
