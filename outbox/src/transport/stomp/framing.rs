//! Finding where each frame from the broker ends, before async-stomp's codec decodes it.
//!
//! async-stomp's `ClientCodec` fails a whole frame it cannot decode (a header value that is not
//! UTF-8, which RabbitMQ passes on from AMQP publishers), and a tokio-util stream ends after a
//! decode error: the connection drops, the broker redelivers the same message at the head of its
//! queue, and the queue stalls. Its size bound, besides, applies only to an unfinished frame
//! already buffered past the bound, so a frame that arrives whole in one read is accepted at any
//! size. This layer finds each frame's end itself, from the `content-length` header or the NUL
//! that ends the frame, and hands the codec one complete frame at a time. A frame the codec
//! refuses, or one larger than the configured maximum, becomes an [`Inbound::Undecodable`]
//! carrying the headers that settle it (`ack`, `subscription`, `message-id`), read leniently.
//! An oversized frame is never buffered whole: its bytes are discarded as they arrive.

use std::io;

use async_stomp::FromServer;
use async_stomp::Message;
use async_stomp::client::ClientCodec;
use tokio_util::bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// The longest reason kept from the codec's error (its text can quote the frame).
const MAX_REASON: usize = 200;

/// One frame from the broker, as far as it could be read.
#[derive(Debug)]
pub(super) enum Inbound {
    /// A frame the codec decoded.
    Frame(Message<FromServer>),
    /// A complete frame the codec could not decode, or one over the size limit.
    Undecodable(Undecodable),
}

/// What could be read of a frame that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Undecodable {
    /// The command (`MESSAGE`, ...), lossily as text.
    pub(super) command: String,
    /// The `ack` header: what a NACK of it carries.
    pub(super) ack: Option<String>,
    /// The `subscription` header.
    pub(super) subscription: Option<String>,
    /// The `message-id` header.
    pub(super) message_id: Option<String>,
    /// The `destination` header, lossily as text.
    pub(super) destination: Option<String>,
    /// The frame's size in bytes, as far as known.
    pub(super) size: usize,
    /// Why it was set aside.
    pub(super) reason: String,
}

/// Where the decoder is: between frames, or discarding an oversized one.
#[derive(Debug)]
enum State {
    Between,
    /// Discarding the body of an oversized frame: `left` bytes of it, then its NUL.
    SkippingBody {
        left: usize,
        frame: Undecodable,
    },
    /// Discarding an oversized frame up to its NUL.
    SkippingToNul {
        frame: Undecodable,
    },
}

/// Frames the broker's byte stream into [`Inbound`]s, decoding each with async-stomp's codec.
#[derive(Debug)]
pub(super) struct FrameDecoder {
    codec: ClientCodec,
    max_frame_size: usize,
    state: State,
}

impl FrameDecoder {
    /// A decoder that sets aside frames larger than `max_frame_size` bytes.
    pub(super) fn new(max_frame_size: usize) -> Self {
        // The codec sees only complete frames within the bound: its own bound never applies.
        Self {
            codec: ClientCodec::with_max_frame_size(max_frame_size.saturating_add(1)),
            max_frame_size,
            state: State::Between,
        }
    }
}

impl Decoder for FrameDecoder {
    type Item = Inbound;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, io::Error> {
        loop {
            match std::mem::replace(&mut self.state, State::Between) {
                State::SkippingBody { left, frame } => {
                    let taken = left.min(src.len());
                    src.advance(taken);
                    self.state = if taken == left {
                        State::SkippingToNul { frame }
                    } else {
                        State::SkippingBody {
                            left: left - taken,
                            frame,
                        }
                    };
                    if src.is_empty() {
                        return Ok(None);
                    }
                }
                State::SkippingToNul { frame } => match memchr(0, src) {
                    Some(end) => {
                        src.advance(end + 1);
                        return Ok(Some(Inbound::Undecodable(frame)));
                    }
                    None => {
                        src.clear();
                        self.state = State::SkippingToNul { frame };
                        return Ok(None);
                    }
                },
                State::Between => return self.decode_next(src),
            }
        }
    }
}

impl FrameDecoder {
    fn decode_next(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, io::Error> {
        // Heartbeats: end-of-lines between frames.
        let heartbeats = src
            .iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count();
        src.advance(heartbeats);
        if src.is_empty() {
            return Ok(None);
        }
        let Some((head, body_start)) = read_head(src) else {
            if src.len() > self.max_frame_size {
                return Err(invalid(format!(
                    "a frame's headers exceed the maximum frame size of {} bytes",
                    self.max_frame_size
                )));
            }
            return Ok(None);
        };
        let oversized = |size: usize, max: usize| {
            let mut frame = head.known.clone();
            frame.size = size;
            frame.reason = format!(
                "the frame ({size} bytes) exceeds the maximum of {max} bytes (OUTBOX_STOMP_MAX_FRAME_SIZE)"
            );
            frame
        };
        let frame_len = match head.content_length {
            Some(length) => {
                let frame_len = body_start.saturating_add(length).saturating_add(1);
                if frame_len > self.max_frame_size {
                    // Discard it as it arrives: never buffer it whole.
                    src.advance(body_start);
                    self.state = State::SkippingBody {
                        left: length,
                        frame: oversized(frame_len, self.max_frame_size),
                    };
                    return self.decode(src);
                }
                if src.len() < frame_len {
                    return Ok(None);
                }
                if src[frame_len - 1] != 0 {
                    return Err(invalid(format!(
                        "a {} frame is not NUL-terminated where its content-length says",
                        head.known.command
                    )));
                }
                frame_len
            }
            None => match memchr(0, &src[body_start..]) {
                Some(nul) => body_start + nul + 1,
                None if src.len() > self.max_frame_size => {
                    let size = src.len();
                    src.clear();
                    self.state = State::SkippingToNul {
                        frame: oversized(size, self.max_frame_size),
                    };
                    return Ok(None);
                }
                None => return Ok(None),
            },
        };
        let mut frame = src.split_to(frame_len);
        if frame_len > self.max_frame_size {
            return Ok(Some(Inbound::Undecodable(oversized(
                frame_len,
                self.max_frame_size,
            ))));
        }
        let set_aside = |reason: String| {
            let mut undecodable = head.known.clone();
            undecodable.size = frame_len;
            undecodable.reason = reason;
            Inbound::Undecodable(undecodable)
        };
        Ok(Some(match self.codec.decode(&mut frame) {
            Ok(Some(message)) => Inbound::Frame(message),
            Ok(None) => set_aside("the codec found the frame incomplete".into()),
            Err(err) => set_aside(short(&err.to_string())),
        }))
    }
}

/// A frame's command and the headers that matter, read without requiring UTF-8.
#[derive(Debug, Clone)]
struct Head {
    /// What an undecodable frame reports (its size and reason filled in later).
    known: Undecodable,
    content_length: Option<usize>,
}

/// Reads the command and headers at the start of `src`; `None` until the blank line that ends
/// them has arrived. Returns them and where the body starts.
fn read_head(src: &[u8]) -> Option<(Head, usize)> {
    let mut lines = Vec::new();
    let mut start = 0;
    let body_start = loop {
        let end = start + memchr(b'\n', &src[start..])?;
        let line = &src[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = end + 1;
        if line.is_empty() {
            break start;
        }
        lines.push(line);
    };
    let command = lines.first().copied().unwrap_or_default();
    // CONNECTED's headers are not escaped (STOMP 1.2); every other server frame's are.
    let escaped = command != b"CONNECTED";
    let mut head = Head {
        known: Undecodable {
            command: String::from_utf8_lossy(command).into_owned(),
            ack: None,
            subscription: None,
            message_id: None,
            destination: None,
            size: 0,
            reason: String::new(),
        },
        content_length: None,
    };
    let mut content_length_seen = false;
    for line in lines.iter().skip(1) {
        let Some(colon) = memchr(b':', line) else {
            continue;
        };
        let (name, raw) = (&line[..colon], &line[colon + 1..]);
        let value = || {
            let value = if escaped { unescape(raw) } else { raw.to_vec() };
            String::from_utf8_lossy(&value).into_owned()
        };
        // STOMP 1.2: of repeated headers, the first counts.
        match name {
            b"ack" if head.known.ack.is_none() => head.known.ack = Some(value()),
            b"subscription" if head.known.subscription.is_none() => {
                head.known.subscription = Some(value())
            }
            b"message-id" if head.known.message_id.is_none() => {
                head.known.message_id = Some(value())
            }
            b"destination" if head.known.destination.is_none() => {
                head.known.destination = Some(value())
            }
            b"content-length" if !content_length_seen => {
                content_length_seen = true;
                head.content_length = std::str::from_utf8(raw)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            }
            _ => {}
        }
    }
    Some((head, body_start))
}

/// STOMP 1.2 header unescaping; an unknown escape is kept as it is (leniently).
fn unescape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b'c') => out.push(b':'),
            Some(b'\\') => out.push(b'\\'),
            Some(&other) => out.extend_from_slice(&[b'\\', other]),
            None => out.push(b'\\'),
        }
    }
    out
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

fn short(reason: &str) -> String {
    match reason.char_indices().nth(MAX_REASON) {
        Some((cut, _)) => format!("{}...", &reason[..cut]),
        None => reason.to_owned(),
    }
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut FrameDecoder, chunks: &[&[u8]]) -> Vec<Inbound> {
        let mut buffer = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            while let Some(item) = decoder.decode(&mut buffer).expect("decodes") {
                out.push(item);
            }
        }
        out
    }

    fn message(extra: &[u8], body: &[u8]) -> Vec<u8> {
        let mut frame =
            b"MESSAGE\ndestination:/topic/t\nmessage-id:m-1\nsubscription:s-1\nack:a\\c1\n"
                .to_vec();
        frame.extend_from_slice(extra);
        frame.extend_from_slice(format!("content-length:{}\n\n", body.len()).as_bytes());
        frame.extend_from_slice(body);
        frame.push(0);
        frame.push(b'\n');
        frame
    }

    fn undecodable(item: &Inbound) -> &Undecodable {
        match item {
            Inbound::Undecodable(u) => u,
            Inbound::Frame(f) => panic!("decoded: {:?}", f.content),
        }
    }

    fn is_message(item: &Inbound, body: &[u8]) -> bool {
        matches!(item, Inbound::Frame(Message { content: FromServer::Message { body: Some(b), .. }, .. }) if b == body)
    }

    #[test]
    fn a_header_that_is_not_utf8_is_set_aside_with_its_ack_and_the_next_frame_decodes() {
        let mut decoder = FrameDecoder::new(1024);
        let bad = message(b"x-bad:\xff\xfe\n", b"{}");
        let good = message(b"", b"ok");
        let items = decode_all(&mut decoder, &[b"\n", &bad, b"\n\n", &good]);
        assert_eq!(items.len(), 2);
        let bad = undecodable(&items[0]);
        assert_eq!(bad.command, "MESSAGE");
        assert_eq!(bad.ack.as_deref(), Some("a:1"), "unescaped");
        assert_eq!(bad.subscription.as_deref(), Some("s-1"));
        assert_eq!(bad.message_id.as_deref(), Some("m-1"));
        assert!(!bad.reason.is_empty());
        assert!(is_message(&items[1], b"ok"));
    }

    #[test]
    fn an_oversized_body_is_skipped_as_it_arrives_and_never_buffered_whole() {
        let mut decoder = FrameDecoder::new(1024);
        let big = message(b"", &vec![b'x'; 10_000]);
        let good = message(b"", b"ok");
        let mut buffer = BytesMut::new();
        let mut items = Vec::new();
        let mut most_buffered = 0;
        for chunk in big.chunks(300).chain(good.chunks(7)) {
            buffer.extend_from_slice(chunk);
            most_buffered = most_buffered.max(buffer.len());
            while let Some(item) = decoder.decode(&mut buffer).unwrap() {
                items.push(item);
            }
        }
        assert!(most_buffered <= 1024, "buffered {most_buffered} bytes");
        assert_eq!(items.len(), 2);
        let skipped = undecodable(&items[0]);
        assert_eq!(skipped.ack.as_deref(), Some("a:1"));
        assert!(skipped.reason.contains("exceeds the maximum of 1024"));
        assert!(is_message(&items[1], b"ok"));
    }

    #[test]
    fn an_oversized_frame_without_content_length_is_skipped_to_its_nul() {
        let mut decoder = FrameDecoder::new(100);
        let mut big = b"MESSAGE\nsubscription:s\nmessage-id:m\nack:k\n\n".to_vec();
        big.extend(std::iter::repeat_n(b'y', 500));
        big.push(0);
        let good = message(b"", b"ok");
        let items = decode_all(&mut decoder, &[&big[..150], &big[150..], &good]);
        assert_eq!(items.len(), 2);
        assert_eq!(undecodable(&items[0]).ack.as_deref(), Some("k"));
        assert!(is_message(&items[1], b"ok"));
    }

    #[test]
    fn a_complete_frame_over_the_bound_is_refused_here_though_the_codec_alone_takes_it() {
        // The codec checks its bound only on an unfinished frame: a frame that arrives whole is
        // accepted at any size. Framed's buffer grows by doubling from 8 KiB, so with a bound
        // that is a power of two it sits exactly at the bound, not past it, when the read that
        // completes a frame of up to twice the bound arrives.
        let big = message(b"", &vec![b'x'; 2_000_000]);
        let mut alone = BytesMut::from(&big[..]);
        let taken = ClientCodec::with_max_frame_size(1_048_576).decode(&mut alone);
        assert!(matches!(taken, Ok(Some(_))), "the codec alone accepts it");
        let mut decoder = FrameDecoder::new(1_048_576);
        let items = decode_all(&mut decoder, &[&big]);
        assert_eq!(items.len(), 1);
        assert!(
            undecodable(&items[0])
                .reason
                .contains("exceeds the maximum")
        );
    }

    #[test]
    fn frames_split_anywhere_decode_and_receipts_pass() {
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut stream = b"RECEIPT\nreceipt-id:7\n\n\0\n".to_vec();
        stream.extend(message(b"x-weird:a\\cb\\nc\n", b"body"));
        for split in 0..stream.len() {
            let items = decode_all(&mut decoder, &[&stream[..split], &stream[split..]]);
            assert_eq!(items.len(), 2, "split at {split}");
            assert!(matches!(
                &items[0],
                Inbound::Frame(Message { content: FromServer::Receipt { receipt_id }, .. }) if receipt_id == "7"
            ));
            assert!(is_message(&items[1], b"body"));
        }
    }

    #[test]
    fn a_content_length_that_lies_ends_the_connection() {
        let mut decoder = FrameDecoder::new(1024);
        let mut buffer = BytesMut::from(&b"MESSAGE\ncontent-length:2\n\nabc\0"[..]);
        assert!(decoder.decode(&mut buffer).is_err());
    }
}
