//! W3C trace context across the broker (the `opentelemetry` feature): a row written inside a
//! span that OpenTelemetry records (through `tracing-opentelemetry`) carries that span's
//! `traceparent` and `tracestate` headers, and the consumer's `outbox.message` span continues
//! the trace they name. Without an OpenTelemetry layer no span has a context, and no header is
//! written: the wire is as without the feature.
//!
//! The two headers are written and read here, to the W3C Trace Context format, rather than
//! through the process's global propagator, so that whatever a service installs there (B3,
//! Jaeger) the messages stay readable by django-outbox-pattern services instrumented with
//! OpenTelemetry's W3C propagator.

use std::collections::BTreeMap;
use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header naming the trace and the parent span.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendors' trace state.
pub(crate) const TRACESTATE: &str = "tracestate";

/// The current span's trace context as headers; none when the span has no valid context (no
/// OpenTelemetry layer, or no span).
pub(crate) fn current_headers() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return Vec::new();
    }
    let mut headers = vec![(TRACEPARENT.to_owned(), traceparent(span_context))];
    let state = span_context.trace_state().header();
    if !state.is_empty() {
        headers.push((TRACESTATE.to_owned(), state));
    }
    headers
}

/// `00-<trace id>-<span id>-<flags>`, lowercase hex.
fn traceparent(span_context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    )
}

/// The remote parent a message's headers name, if their `traceparent` is valid (a malformed
/// `tracestate` is dropped, the parent kept, as the W3C specification asks).
pub(crate) fn remote_parent(headers: &BTreeMap<String, String>) -> Option<opentelemetry::Context> {
    let span_context = message_context(
        headers.get(TRACEPARENT)?,
        headers.get(TRACESTATE).map(String::as_str),
    )?;
    Some(opentelemetry::Context::new().with_remote_span_context(span_context))
}

/// The remote span context a message's `traceparent` and `tracestate` name, if the
/// `traceparent` is valid.
fn message_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let span_context = parse_traceparent(traceparent)?;
    let state = tracestate
        .and_then(|value| TraceState::from_str(value).ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags(),
        true,
        state,
    ))
}

/// Links the relay's batch span to the trace of each claimed row that carries one: one link
/// per row with a valid `traceparent` (rows without one cost a map lookup), no span per
/// message. Nothing is done when the span is disabled (no subscriber records it). The
/// OpenTelemetry SDK keeps at most its span limit's links per span (128 by default), dropping
/// the rest.
pub(crate) fn link_batch<'a>(
    span: &tracing::Span,
    rows_headers: impl IntoIterator<Item = &'a serde_json::Value>,
) {
    if span.is_disabled() {
        return;
    }
    for headers in rows_headers {
        let Some(traceparent) = headers.get(TRACEPARENT).and_then(|v| v.as_str()) else {
            continue;
        };
        let tracestate = headers.get(TRACESTATE).and_then(|v| v.as_str());
        if let Some(context) = message_context(traceparent, tracestate) {
            span.add_link(context);
        }
    }
}

/// Reads `version-traceid-spanid-flags`. Version `ff` and all-zero ids are invalid; a later
/// version may append fields, which are ignored.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let is_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !is_hex(trace_id, 32) || !is_hex(span_id, 16) || !is_hex(flags, 2) {
        return None;
    }
    let span_context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    );
    span_context.is_valid().then_some(span_context)
}

/// Makes the message's remote parent, if its headers name one, the parent of `span`.
pub(crate) fn continue_trace(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    if let Some(parent) = remote_parent(headers)
        && let Err(err) = span.set_parent(parent)
    {
        tracing::debug!(error = %err, "could not continue the message's trace");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_back_as_written() {
        let written = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let read = parse_traceparent(written).expect("valid");
        assert_eq!(traceparent(&read), written);
        assert!(read.is_sampled());
        let unsampled =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        // A later version may add fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later")
                .is_some()
        );
    }

    #[test]
    fn a_batch_links_to_each_valid_traceparent_only() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;

        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("unit")));
        let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let second = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let rows = [
            serde_json::json!({ TRACEPARENT: first, TRACESTATE: "congo=t61rcWkgMzE" }),
            serde_json::json!({ "dop-msg-id": "no trace" }),
            serde_json::json!({ TRACEPARENT: "00-not-a-trace-01" }),
            serde_json::json!({ TRACEPARENT: 7 }),
            serde_json::json!({ TRACEPARENT: second }),
        ];
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("outbox.batch");
            link_batch(&span, &rows);
        });
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1);
        let links: Vec<String> = spans[0]
            .links
            .iter()
            .map(|link| traceparent(&link.span_context))
            .collect();
        assert_eq!(links, [first, second]);
        assert_eq!(
            spans[0].links[0].span_context.trace_state().header(),
            "congo=t61rcWkgMzE"
        );
        assert!(spans[0].links.iter().all(|l| l.span_context.is_remote()));

        // Without an OpenTelemetry layer: nothing to link, nothing done.
        let span = tracing::info_span!("outbox.batch");
        link_batch(&span, &rows);
    }

    #[test]
    fn tracestate_is_kept_and_a_malformed_one_dropped() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
        let headers = |state: &str| {
            BTreeMap::from([
                (TRACEPARENT.to_owned(), parent.clone()),
                (TRACESTATE.to_owned(), state.to_owned()),
            ])
        };
        let kept = remote_parent(&headers("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(
            kept.span().span_context().trace_state().header(),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        assert!(kept.span().span_context().is_remote());
        let dropped = remote_parent(&headers("not a state")).unwrap();
        assert_eq!(dropped.span().span_context().trace_state().header(), "");
    }
}
