//! A TCP proxy that breaks the link on command, for testing what the library does when the
//! network misbehaves between it and the broker: connections cut, a black hole, a slow link, a
//! broker that refuses connections.
//!
//! Each accepted connection is forwarded to the upstream address by two copying tasks, one per
//! direction. Commands go through a `watch` channel that every task listens to, so they apply at
//! once to the open connections as well as to those opened later. Nothing polls: a stalled task
//! waits on the channel, a reading task on its socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy is told to do; every connection task watches it.
#[derive(Debug, Clone, Default)]
struct Control {
    /// Forward nothing, keep the sockets open.
    stall: bool,
    /// Wait this long before forwarding each chunk.
    slow: Option<Duration>,
    /// Close new connections as soon as they are accepted.
    refuse: bool,
    /// Bumped by `cut()`: a connection opened under an older value closes.
    cut_epoch: u64,
    /// The proxy was dropped.
    shutdown: bool,
}

struct Counters {
    open: AtomicUsize,
    accepted: AtomicUsize,
}

/// A fault-injecting TCP proxy on 127.0.0.1 (see the module docs). Dropping it closes everything.
pub struct FaultProxy {
    addr: SocketAddr,
    control: watch::Sender<Control>,
    counters: Arc<Counters>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("the fault proxy cannot listen on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the fault proxy has no local address: {e}"));
        let (control, watcher) = watch::channel(Control::default());
        let counters = Arc::new(Counters {
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(listener, upstream, watcher, counters.clone()));
        FaultProxy {
            addr,
            control,
            counters,
            acceptor,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection now, on both sides. Later connections are not affected.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cut_epoch += 1);
    }

    /// `true`: forward no byte in either direction, keeping every socket open (a black hole),
    /// for open and new connections alike. `false`: forward again, including what was held.
    pub fn stall(&self, stalled: bool) {
        self.control.send_modify(|c| c.stall = stalled);
    }

    /// Delays each forwarded chunk by `delay` (`None`: no delay).
    pub fn slow(&self, delay: Option<Duration>) {
        self.control.send_modify(|c| c.slow = delay);
    }

    /// `true`: accept new connections and close them at once (as a broker that is going down
    /// does). Open connections are not affected.
    pub fn refuse(&self, refusing: bool) {
        self.control.send_modify(|c| c.refuse = refusing);
    }

    /// Connections currently open (accepted, not refused, not yet closed).
    pub fn connections(&self) -> usize {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start, refused ones included.
    pub fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.control.send_modify(|c| c.shutdown = true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    counters: Arc<Counters>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors or similar: give the system a moment rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let current = control.borrow().clone();
        if current.refuse || current.shutdown {
            drop(client);
            continue;
        }
        counters.open.fetch_add(1, Ordering::SeqCst);
        let control = control.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            forward(client, upstream, control, current.cut_epoch).await;
            counters.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Forwards one connection until either side closes it, or a cut or the proxy's drop ends it.
async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    epoch: u64,
) {
    let server = tokio::select! {
        connected = TcpStream::connect(upstream) => match connected {
            Ok(server) => server,
            Err(_) => return,
        },
        () = ended(&mut control, epoch) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, control.clone(), epoch),
        pump(server_read, client_write, control, epoch),
    );
    // Both halves of both sockets are dropped here: the sockets close.
}

/// Copies one direction, obeying the controls, until end of stream or the connection ends.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    epoch: u64,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if flowing(&mut control, epoch).await.is_none() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut chunk) => read,
            () = ended(&mut control, epoch) => return,
        };
        let count = match read {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        // The stall may have begun while the read was pending: hold the bytes until it ends.
        let Some(delay) = flowing(&mut control, epoch).await else {
            return;
        };
        if let Some(delay) = delay {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = ended(&mut control, epoch) => return,
            }
        }
        tokio::select! {
            written = to.write_all(&chunk[..count]) => if written.is_err() { return },
            () = ended(&mut control, epoch) => return,
        }
    }
    // End of stream from one side: pass the half-close on, keep the other direction going.
    let _ = to.shutdown().await;
}

/// Waits while stalled; the current per-chunk delay once flowing, `None` once the connection
/// must end.
async fn flowing(control: &mut watch::Receiver<Control>, epoch: u64) -> Option<Option<Duration>> {
    loop {
        let current = control.borrow_and_update().clone();
        if current.shutdown || current.cut_epoch != epoch {
            return None;
        }
        if !current.stall {
            return Some(current.slow);
        }
        if control.changed().await.is_err() {
            return None;
        }
    }
}

/// Resolves once the connection must end: cut, or the proxy dropped.
async fn ended(control: &mut watch::Receiver<Control>, epoch: u64) {
    loop {
        {
            let current = control.borrow_and_update();
            if current.shutdown || current.cut_epoch != epoch {
                return;
            }
        }
        if control.changed().await.is_err() {
            return;
        }
    }
}
