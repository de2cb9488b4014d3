//! A raw STOMP 1.2 client for tests, written against the specification and nothing else, so that
//! it can check the library's own transport from the outside: what a Python consumer or producer
//! would see on the same broker.
//!
//! It is deliberately small: one TCP connection, no heart-beats (`heart-beat:0,0`), frames read
//! into a buffer of its own so that every read is cancel-safe (a test may wrap any call in
//! `tokio::time::timeout` and go on using the peer afterwards). Frames that arrive while it waits
//! for something else (a MESSAGE while waiting for a RECEIPT) are kept, not lost.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// The broker the tests use: RabbitMQ's STOMP plugin, guest/guest, vhost `/`.
pub use crate::settings::RABBITMQ_STOMP;

/// How long [`StompPeer::send`] and the other round trips wait for their RECEIPT.
const ROUND_TRIP: Duration = Duration::from_secs(10);

/// One STOMP frame, headers unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    /// The first header named `name` (STOMP 1.2: the first occurrence wins).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as text (lossy), for assertions and messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A STOMP connection to a broker.
pub struct StompPeer {
    stream: TcpStream,
    /// Bytes read but not yet parsed into frames.
    buffer: Vec<u8>,
    /// MESSAGE and ERROR frames read while waiting for a RECEIPT.
    frames: VecDeque<Frame>,
    /// Receipt ids that arrived while nobody was waiting for them.
    receipts: HashSet<String>,
    next_id: u64,
    /// The CONNECTED frame's headers.
    pub connected: Frame,
}

impl StompPeer {
    /// Connects as guest/guest to vhost `/` with heart-beats off.
    pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<StompPeer> {
        StompPeer::connect_as(addr, "guest", "guest").await
    }

    /// Connects with the given credentials to vhost `/`; an ERROR answer is an error naming its
    /// `message` header.
    pub async fn connect_as(
        addr: impl ToSocketAddrs,
        login: &str,
        passcode: &str,
    ) -> io::Result<StompPeer> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut peer = StompPeer {
            stream,
            buffer: Vec::new(),
            frames: VecDeque::new(),
            receipts: HashSet::new(),
            next_id: 0,
            connected: Frame {
                command: String::new(),
                headers: Vec::new(),
                body: Vec::new(),
            },
        };
        let headers = [
            ("accept-version", "1.2"),
            ("host", "/"),
            ("login", login),
            ("passcode", passcode),
            ("heart-beat", "0,0"),
        ];
        peer.write_frame("CONNECT", &headers, b"").await?;
        let answer = tokio::time::timeout(ROUND_TRIP, peer.read_frame())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no CONNECTED frame"))??;
        match answer {
            Some(frame) if frame.command == "CONNECTED" => {
                peer.connected = frame;
                Ok(peer)
            }
            Some(frame) => Err(broker_error(&frame)),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the broker closed the connection during CONNECT",
            )),
        }
    }

    /// Subscribes with `ack:client-individual` unless `headers` names another `ack`, and waits
    /// until the broker has set the subscription up (a RECEIPT), so that a SEND right after it
    /// is routed to it. Returns the subscription id (`headers` may set `id`).
    pub async fn subscribe(
        &mut self,
        destination: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<String> {
        let id = match headers.iter().find(|(key, _)| *key == "id") {
            Some((_, id)) => id.to_string(),
            None => self.fresh_id("sub"),
        };
        let mut all = vec![("destination", destination), ("id", id.as_str())];
        if !headers.iter().any(|(key, _)| *key == "ack") {
            all.push(("ack", "client-individual"));
        }
        all.extend(headers.iter().filter(|(key, _)| *key != "id").copied());
        self.round_trip("SUBSCRIBE", &all, b"").await?;
        Ok(id)
    }

    /// Closes a subscription; UNSUBSCRIBE carries only the id (see PITFALLS: queue headers here
    /// would delete a durable queue).
    pub async fn unsubscribe(&mut self, id: &str) -> io::Result<()> {
        self.round_trip("UNSUBSCRIBE", &[("id", id)], b"").await
    }

    /// Sends a message and waits for its RECEIPT; an ERROR is an error naming its `message`.
    pub async fn send(
        &mut self,
        destination: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let receipt = self
            .send_without_waiting(destination, headers, body)
            .await?;
        tokio::time::timeout(ROUND_TRIP, self.wait_receipt(&receipt))
            .await
            .map_err(|_| timed_out("SEND", &receipt))?
    }

    /// Writes a SEND asking for a receipt and returns the receipt id, for
    /// [`StompPeer::wait_receipt`].
    pub async fn send_without_waiting(
        &mut self,
        destination: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<String> {
        let receipt = self.fresh_id("receipt");
        let mut all = vec![("destination", destination), ("receipt", receipt.as_str())];
        all.extend_from_slice(headers);
        self.write_frame("SEND", &all, body).await?;
        Ok(receipt)
    }

    /// Waits (without a time limit: wrap it in a timeout) for the RECEIPT of `receipt`, keeping
    /// MESSAGE frames for [`StompPeer::next_message`]. Cancel-safe.
    pub async fn wait_receipt(&mut self, receipt: &str) -> io::Result<()> {
        loop {
            if self.receipts.remove(receipt) {
                return Ok(());
            }
            let error_at = self.frames.iter().position(|f| f.command == "ERROR");
            if let Some(error) = error_at.and_then(|at| self.frames.remove(at)) {
                return Err(broker_error(&error));
            }
            match self.read_frame().await? {
                Some(frame) if frame.command == "RECEIPT" => {
                    if let Some(id) = frame.header("receipt-id") {
                        self.receipts.insert(id.to_owned());
                    }
                }
                Some(frame) => self.frames.push_back(frame),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed while waiting for receipt {receipt}"),
                    ));
                }
            }
        }
    }

    /// The next MESSAGE (or ERROR) frame, or `None` when none comes within `timeout` or the
    /// connection ends.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<Frame> {
        if let Some(frame) = self.frames.pop_front() {
            return Some(frame);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Ok(Ok(Some(frame))) if frame.command == "RECEIPT" => {
                    if let Some(id) = frame.header("receipt-id") {
                        self.receipts.insert(id.to_owned());
                    }
                }
                Ok(Ok(Some(frame))) => return Some(frame),
                _ => return None,
            }
        }
    }

    /// Acknowledges a MESSAGE (its `ack` header, as STOMP 1.2 says).
    pub async fn ack(&mut self, message: &Frame) -> io::Result<()> {
        let id = ack_id(message)?;
        self.round_trip("ACK", &[("id", id.as_str())], b"").await
    }

    /// Rejects a MESSAGE without requeueing it (`requeue:false`): dead-lettered where the queue
    /// has a dead-letter route.
    pub async fn nack(&mut self, message: &Frame) -> io::Result<()> {
        let id = ack_id(message)?;
        self.round_trip("NACK", &[("id", id.as_str()), ("requeue", "false")], b"")
            .await
    }

    /// DISCONNECT with a receipt, then closes the socket.
    pub async fn disconnect(mut self) -> io::Result<()> {
        self.round_trip("DISCONNECT", &[], b"").await?;
        self.stream.shutdown().await
    }

    /// Writes `command` with `headers` (plus a `receipt`) and waits for the RECEIPT.
    pub async fn round_trip(
        &mut self,
        command: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let receipt = self.fresh_id("receipt");
        let mut all = headers.to_vec();
        all.push(("receipt", receipt.as_str()));
        self.write_frame(command, &all, body).await?;
        tokio::time::timeout(ROUND_TRIP, self.wait_receipt(&receipt))
            .await
            .map_err(|_| timed_out(command, &receipt))?
    }

    /// Writes one frame: header values escaped (except in CONNECT), `content-length` added for a
    /// non-empty body.
    pub async fn write_frame(
        &mut self,
        command: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let escape_values = command != "CONNECT" && command != "STOMP";
        let mut frame = Vec::with_capacity(body.len() + 256);
        frame.extend_from_slice(command.as_bytes());
        frame.push(b'\n');
        for (key, value) in headers {
            frame.extend_from_slice(key.as_bytes());
            frame.push(b':');
            if escape_values {
                frame.extend_from_slice(escape(value).as_bytes());
            } else {
                frame.extend_from_slice(value.as_bytes());
            }
            frame.push(b'\n');
        }
        if !body.is_empty() {
            frame.extend_from_slice(format!("content-length:{}\n", body.len()).as_bytes());
        }
        frame.push(b'\n');
        frame.extend_from_slice(body);
        frame.push(0);
        self.stream.write_all(&frame).await
    }

    /// Reads the next frame of any command; `Ok(None)` at end of stream. Cancel-safe: bytes
    /// already read stay in the buffer.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = parse_frame(&mut self.buffer)? {
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 8192];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(None);
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    fn fresh_id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("{kind}-{}", self.next_id)
    }
}

fn ack_id(message: &Frame) -> io::Result<String> {
    message
        .header("ack")
        .or_else(|| message.header("message-id"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("{} frame without ack header", message.command)))
}

fn broker_error(frame: &Frame) -> io::Error {
    io::Error::other(format!(
        "{}: {} ({})",
        frame.command,
        frame.header("message").unwrap_or(""),
        frame.text().trim()
    ))
}

fn timed_out(command: &str, receipt: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no RECEIPT {receipt} for {command} within {ROUND_TRIP:?}"),
    )
}

/// Takes one complete frame off the front of `buffer`, if there is one. Leading end-of-lines
/// (heart-beats, the `\n` RabbitMQ writes after each NUL) are skipped.
fn parse_frame(buffer: &mut Vec<u8>) -> io::Result<Option<Frame>> {
    let start = buffer
        .iter()
        .position(|b| *b != b'\n' && *b != b'\r')
        .unwrap_or(buffer.len());
    buffer.drain(..start);
    let Some(head_end) = buffer.windows(2).position(|w| w == b"\n\n").or_else(|| {
        buffer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 2)
    }) else {
        return Ok(None);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut lines = head.lines();
    let command = lines.next().unwrap_or("").to_owned();
    // STOMP 1.2: CONNECTED frames are not escaped; every other frame's headers are.
    let unescaped = command != "CONNECTED";
    let mut headers = Vec::new();
    for line in lines {
        let (key, value) = line.split_once(':').ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad header {line:?}"))
        })?;
        if unescaped {
            headers.push((unescape(key)?, unescape(value)?));
        } else {
            headers.push((key.to_owned(), value.to_owned()));
        }
    }
    let body_start = head_end + 2;
    let length = headers
        .iter()
        .find(|(key, _)| key == "content-length")
        .map(|(_, value)| value.parse::<usize>())
        .transpose()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let body_end = match length {
        Some(length) => {
            if buffer.len() < body_start + length + 1 {
                return Ok(None);
            }
            if buffer[body_start + length] != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "frame body not followed by NUL",
                ));
            }
            body_start + length
        }
        None => match buffer[body_start..].iter().position(|b| *b == 0) {
            Some(at) => body_start + at,
            None => return Ok(None),
        },
    };
    let body = buffer[body_start..body_end].to_vec();
    buffer.drain(..=body_end);
    Ok(Some(Frame {
        command,
        headers,
        body,
    }))
}

/// STOMP 1.2 header escaping.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ':' => out.push_str("\\c"),
            c => out.push(c),
        }
    }
    out
}

/// STOMP 1.2 header unescaping; an undefined escape is an error, as the specification says.
pub fn unescape(value: &str) -> io::Result<String> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('c') => out.push(':'),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("undefined escape \\{other:?} in header {value:?}"),
                ));
            }
        }
    }
    Ok(out)
}

/// `<prefix>_<uuid>`: a name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Deletes a RabbitMQ queue (vhost `/`) with `rabbitmqctl delete_queue`, RabbitMQ's STOMP plugin
/// having no way to delete a queue without redeclaring it. A queue that does not exist is not an
/// error. Panics if `rabbitmqctl` cannot be run or fails otherwise: a test that cannot clean up
/// should say so.
pub fn delete_queue(name: &str) {
    let output = Command::new("rabbitmqctl")
        .args(["--quiet", "delete_queue", name])
        .output()
        .unwrap_or_else(|e| panic!("running `rabbitmqctl delete_queue {name}` failed: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && !stderr.contains("not found") {
        panic!(
            "`rabbitmqctl delete_queue {name}` failed ({}): {stderr}",
            output.status
        );
    }
}

/// Deletes the queues when dropped, also when the test panics.
pub struct QueueCleanup(pub Vec<String>);

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            // Never panic inside a panic: report instead.
            if let Err(e) = std::panic::catch_unwind(|| delete_queue(name)) {
                eprintln!("could not delete queue {name}: {e:?}");
            }
        }
    }
}

/// The messages in a queue, ready and unacked, as `rabbitmqctl list_queues` reports them;
/// `None` if the queue does not exist.
pub fn queue_message_count(name: &str) -> Option<usize> {
    queue_figure(name, "messages")
}

/// One column of `rabbitmqctl list_queues` for the queue `name` (`messages`, `messages_ready`,
/// `consumers`...); `None` if the queue does not exist.
pub fn queue_figure(name: &str, column: &str) -> Option<usize> {
    let output = Command::new("rabbitmqctl")
        .args([
            "--quiet",
            "list_queues",
            "--no-table-headers",
            "name",
            column,
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(queue, _)| *queue == name)
        .and_then(|(_, count)| count.trim().parse().ok())
}

/// A durable queue `<key>_q` bound to `/topic/<key>`, read by a raw client with automatic
/// acknowledgements; the queue is deleted when the cleanup goes.
pub async fn topic_reader(key: &str) -> (StompPeer, QueueCleanup) {
    let queue = format!("{key}_q");
    let mut peer = StompPeer::connect(RABBITMQ_STOMP)
        .await
        .expect("connect to RabbitMQ");
    peer.subscribe(
        &format!("/topic/{key}"),
        &[
            ("ack", "auto"),
            ("durable", "true"),
            ("auto-delete", "false"),
            ("x-queue-name", queue.as_str()),
        ],
    )
    .await
    .expect("subscribe");
    (peer, QueueCleanup(vec![queue]))
}
