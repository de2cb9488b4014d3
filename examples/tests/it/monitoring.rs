//! The Grafana dashboard and the Prometheus alert rules in `examples/monitoring/` name only
//! metrics the outbox describes, and the dashboard shows every one of them: a renamed or
//! removed metric fails here rather than as an empty panel or an alert that never fires.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    with_local_recorder,
};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Collects the names that `outbox::metrics::describe()` describes, with their kinds; records
/// nothing.
#[derive(Default)]
struct Described(Mutex<BTreeMap<String, Kind>>);

impl Described {
    fn add(&self, name: KeyName, kind: Kind) {
        self.0
            .lock()
            .unwrap()
            .insert(name.as_str().to_owned(), kind);
    }
}

impl Recorder for Described {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(key, Kind::Counter);
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(key, Kind::Gauge);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(key, Kind::Histogram);
    }

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn described() -> BTreeMap<String, Kind> {
    let recorder = Described::default();
    with_local_recorder(&recorder, outbox::metrics::describe);
    recorder.0.into_inner().unwrap()
}

fn monitoring_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("monitoring")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every `outbox_...` word of `text`.
fn outbox_names(text: &str) -> Vec<&str> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("outbox_") {
        let preceded = rest[..at].chars().next_back().is_some_and(is_name);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        if !preceded {
            names.push(&tail[..end]);
        }
        rest = &tail[end..];
    }
    names
}

/// The described metric that `used` refers to: itself, or a histogram through one of the
/// series Prometheus exporters derive from it (`_bucket`, `_sum`, `_count`).
fn metric_of<'a>(used: &'a str, described: &BTreeMap<String, Kind>) -> Option<&'a str> {
    if described.contains_key(used) {
        return Some(used);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        used.strip_suffix(suffix)
            .filter(|base| described.get(*base) == Some(&Kind::Histogram))
    })
}

/// Every expression of the dashboard's panels.
fn dashboard_expressions(dashboard: &Value) -> Vec<String> {
    let mut expressions = Vec::new();
    let panels = dashboard["panels"].as_array().expect("a panels array");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("each target has an expr");
            expressions.push(expr.to_owned());
        }
    }
    expressions
}

#[test]
fn the_dashboard_and_the_alerts_name_only_described_metrics_and_show_them_all() {
    let described = described();
    assert!(
        described.len() >= 14,
        "describe() described too little: {described:?}"
    );
    assert!(described.contains_key(outbox::metrics::RELAY_LAG));
    assert!(described.contains_key(outbox::metrics::CONSUMER_LAG));

    let dashboard_text = monitoring_file("grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    let expressions = dashboard_expressions(&dashboard);
    assert!(expressions.len() >= described.len(), "{expressions:?}");
    let alerts = monitoring_file("alerts.yml");
    let alert_tests = monitoring_file("alerts.test.yml");

    let mut unknown = Vec::new();
    for (file, text) in [
        ("grafana-dashboard.json", dashboard_text.as_str()),
        ("alerts.yml", alerts.as_str()),
        ("alerts.test.yml", alert_tests.as_str()),
    ] {
        let names = outbox_names(text);
        assert!(!names.is_empty(), "{file} names no outbox_ metric");
        for name in names {
            if metric_of(name, &described).is_none() {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not described by outbox::metrics::describe(): {unknown:?}"
    );

    let shown: Vec<&str> = expressions
        .iter()
        .flat_map(|expr| outbox_names(expr))
        .filter_map(|name| metric_of(name, &described))
        .collect();
    let missing: Vec<&String> = described
        .keys()
        .filter(|name| !shown.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard shows no panel of {missing:?}"
    );
}

#[test]
fn names_are_found_as_whole_words() {
    assert_eq!(
        outbox_names("rate(outbox_a_total[5m]) / x_outbox_b + outbox_c_bucket{le=\"1\"}"),
        ["outbox_a_total", "outbox_c_bucket"]
    );
    let described = BTreeMap::from([
        ("outbox_h".to_owned(), Kind::Histogram),
        ("outbox_c_total".to_owned(), Kind::Counter),
    ]);
    assert_eq!(metric_of("outbox_h_bucket", &described), Some("outbox_h"));
    assert_eq!(
        metric_of("outbox_c_total", &described),
        Some("outbox_c_total")
    );
    assert_eq!(metric_of("outbox_c_total_sum", &described), None);
    assert_eq!(metric_of("outbox_x", &described), None);
}
