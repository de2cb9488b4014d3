//! A fake STOMP broker on 127.0.0.1, for what no real broker does on cue: one that is alive
//! (it logs in, sends heartbeats) but never confirms anything, one that promises a frame it never
//! finishes, and one that accepts connections and never says a word.
//!
//! It reads and discards whatever the client sends. Each accepted connection runs on a task of
//! its own; dropping the broker closes the listener and every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How the fake broker behaves on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers CONNECT with CONNECTED (`heart-beat:1000,0`), sends a heartbeat every second,
    /// and never sends a RECEIPT: a broker alive but not confirming (a quorum queue without its
    /// majority, a sick node).
    NeverReceipts,
    /// Answers CONNECT with CONNECTED, then sends the start of a frame whose `content-length`
    /// promises far more than ever comes, then heartbeats every second: a socket that looks
    /// alive and can never deliver a frame again.
    LyingContentLength,
    /// Accepts the TCP connection and never sends a byte: a login that never ends.
    Silent,
}

/// A fake STOMP broker (see the module docs). Dropping it closes everything.
pub struct FakeBroker {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    frames: Arc<AtomicUsize>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl FakeBroker {
    /// Listens on an ephemeral port of 127.0.0.1.
    pub async fn start(behaviour: Behaviour) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("the fake broker cannot listen on 127.0.0.1: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the fake broker has no local address: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let frames = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn(accept(
            listener,
            behaviour,
            accepted.clone(),
            frames.clone(),
        ));
        FakeBroker {
            addr,
            accepted,
            frames,
            acceptor,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Frames received from clients (NUL-terminated), CONNECTs included.
    pub fn frames(&self) -> usize {
        self.frames.load(Ordering::SeqCst)
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        // The connections are tasks of the acceptor's JoinSet: aborted with it.
        self.acceptor.abort();
    }
}

async fn accept(
    listener: TcpListener,
    behaviour: Behaviour,
    accepted: Arc<AtomicUsize>,
    frames: Arc<AtomicUsize>,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        connections.spawn(serve(stream, behaviour, frames.clone()));
        // Reap the connections that ended.
        while connections.try_join_next().is_some() {}
    }
}

/// Serves one connection until the client closes it.
async fn serve(stream: TcpStream, behaviour: Behaviour, frames: Arc<AtomicUsize>) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let mut chunk = vec![0u8; 64 * 1024];
    if behaviour == Behaviour::Silent {
        while matches!(reader.read(&mut chunk).await, Ok(n) if n > 0) {}
        return;
    }
    // The CONNECT frame, whole.
    let mut seen = Vec::new();
    while !seen.contains(&0) {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    frames.fetch_add(seen.iter().filter(|b| **b == 0).count(), Ordering::SeqCst);
    let mut answer = b"CONNECTED\nversion:1.2\nheart-beat:1000,0\nserver:fake\n\n\0".to_vec();
    if behaviour == Behaviour::LyingContentLength {
        answer.extend_from_slice(b"RECEIPT\nreceipt-id:0\ncontent-length:1000000\n\nabc");
    }
    if writer.write_all(&answer).await.is_err() {
        return;
    }
    let heartbeats = async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            if writer.write_all(b"\n").await.is_err() {
                return;
            }
        }
    };
    let discard = async move {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    frames.fetch_add(
                        chunk[..n].iter().filter(|b| **b == 0).count(),
                        Ordering::SeqCst,
                    );
                }
            }
        }
    };
    tokio::select! {
        () = heartbeats => {}
        () = discard => {}
    }
}
