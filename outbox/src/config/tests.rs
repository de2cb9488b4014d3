//! The settings as a whole: defaults, variables, ranges and the relations between settings.

use std::time::Duration;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_broker_url_selects_amqp_and_refuses_what_contradicts_it() {
    let c = OutboxConfig::from_vars(vars(&[(
        "OUTBOX_BROKER_URL",
        "amqp://app:S3cret-pw@a:5672/prod, amqp://app:S3cret-pw@b:5672/prod",
    )]))
    .unwrap();
    assert!(c.uses_amqp());
    assert_eq!(c.broker_url.len(), 2);
    assert_eq!(
        c.broker_urls_redacted(),
        "amqp://app:***@a:5672/prod,amqp://app:***@b:5672/prod"
    );
    assert!(!format!("{c:?}").contains("S3cret-pw"));
    assert!(!OutboxConfig::default().uses_amqp());

    let refused = |pairs: &[(&str, &str)]| {
        let err = OutboxConfig::from_vars(vars(pairs))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("S3cret-pw"), "{err}");
        err
    };
    let url = ("OUTBOX_BROKER_URL", "amqp://app:S3cret-pw@a:5672/prod");
    for (variable, value) in [
        ("OUTBOX_STOMP_HOST_AND_PORTS", "b:61613"),
        ("OUTBOX_STOMP_USERNAME", "other"),
        ("OUTBOX_STOMP_PASSCODE", "other"),
        ("OUTBOX_STOMP_VHOST", "other"),
        ("OUTBOX_STOMP_USE_SSL", "true"),
    ] {
        let err = refused(&[url, (variable, value)]);
        assert!(err.contains(variable), "{err}");
    }
    let err = refused(&[(
        "OUTBOX_BROKER_URL",
        "amqp://app:S3cret-pw@a:5672/,amqps://app:S3cret-pw@b:5671/",
    )]);
    assert!(err.contains("mixes"), "{err}");
    let err = refused(&[("OUTBOX_BROKER_URL", "stomp://app:S3cret-pw@a:61613")]);
    assert!(err.contains("OUTBOX_BROKER_URL"), "{err}");
    let err = refused(&[("OUTBOX_BROKER_URL", "amqp://app:S3cret-pw@/vhost")]);
    assert!(err.contains("no host"), "{err}");
    // TLS with amqps:// is consistent.
    OutboxConfig::from_vars(vars(&[
        ("OUTBOX_BROKER_URL", "amqps://app:S3cret-pw@a:5671/"),
        ("OUTBOX_STOMP_USE_SSL", "true"),
    ]))
    .unwrap();
}

#[test]
fn the_unroutable_policy_is_read() {
    assert_eq!(OutboxConfig::default().unroutable, Unroutable::Retry);
    for (value, policy) in [
        ("retry", Unroutable::Retry),
        ("FAIL", Unroutable::Fail),
        ("drop", Unroutable::Drop),
    ] {
        let c = OutboxConfig::from_vars(vars(&[("OUTBOX_UNROUTABLE", value)])).unwrap();
        assert_eq!(c.unroutable, policy);
    }
    assert!(OutboxConfig::from_vars(vars(&[("OUTBOX_UNROUTABLE", "keep")])).is_err());
}

#[test]
fn defaults_are_those_of_django_outbox_pattern() {
    let c = OutboxConfig::default();
    assert_eq!(c.maximum_retry_attempts, 50);
    assert_eq!(c.pause_for_retry, Duration::from_secs(240));
    assert_eq!(c.wait_retry, Duration::from_secs(60));
    assert_eq!(c.published_chunk_size, 200);
    assert_eq!(c.relay_batches_in_flight, 3);
    assert_eq!(c.producer_waiting_time, Duration::from_secs(1));
    assert_eq!(c.maximum_backoff, Duration::from_secs(3600));
    assert_eq!(c.days_to_keep_data, 30);
    assert_eq!(c.remove_data_cache_ttl, Duration::from_secs(86400));
    assert_eq!(c.stomp_queue_headers["prefetch-count"], "1");
    assert!(c.validate().is_ok());
}

#[test]
fn variables_override_the_defaults() {
    let c = OutboxConfig::from_vars(vars(&[
        ("OUTBOX_STOMP_HOST_AND_PORTS", "a:61613, b:61614"),
        ("OUTBOX_PRODUCER_WAITING_TIME", "0.25"),
        ("OUTBOX_STOMP_HEARTBEATS", "0,5000"),
        (
            "OUTBOX_STOMP_QUEUE_HEADERS",
            r#"{"durable": "true", "prefetch-count": 50}"#,
        ),
        ("OUTBOX_TEST_POSTGRES_URL", "ignored"),
        ("PATH", "ignored"),
    ]))
    .unwrap();
    assert_eq!(
        c.stomp_host_and_ports,
        vec![("a".to_owned(), 61613), ("b".to_owned(), 61614)]
    );
    assert_eq!(c.producer_waiting_time, Duration::from_millis(250));
    assert_eq!(c.stomp_heartbeats, (Duration::ZERO, Duration::from_secs(5)));
    assert_eq!(c.stomp_queue_headers["prefetch-count"], "50");
}

#[test]
fn malformed_and_unknown_variables_are_named() {
    for (name, value) in [
        ("OUTBOX_MAXIMUM_RETRY_ATTEMPTS", "fifty"),
        ("OUTBOX_STOMP_HOST_AND_PORTS", "nohost"),
        ("OUTBOX_STOMP_USE_SSL", "maybe"),
        ("OUTBOX_WAIT_RETRY", "-1"),
        ("OUTBOX_MAXIMUM_RETRIES", "3"),
    ] {
        let err = OutboxConfig::from_vars(vars(&[(name, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn a_passcode_never_shows() {
    let c = OutboxConfig::from_vars(vars(&[("OUTBOX_STOMP_PASSCODE", "s3cret")])).unwrap();
    assert_eq!(c.stomp_passcode.expose(), "s3cret");
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn a_lease_shorter_than_the_receipt_timeout_is_refused() {
    let err = OutboxConfig::from_vars(vars(&[
        ("OUTBOX_PRODUCER_LEASE", "5"),
        ("OUTBOX_RECEIPT_TIMEOUT", "10"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("OUTBOX_PRODUCER_LEASE"), "{err}");
}

#[test]
fn every_duration_and_count_outside_its_range_is_refused_naming_the_variable_and_range() {
    for (name, value, range) in [
        (
            "OUTBOX_DAYS_TO_KEEP_DATA",
            "99999999",
            "between 1 and 36500",
        ),
        ("OUTBOX_DAYS_TO_KEEP_DATA", "0", "between 1 and 36500"),
        (
            "OUTBOX_PRODUCER_LEASE",
            "99999999999999",
            "between 1 and 86400 seconds",
        ),
        (
            "OUTBOX_REMOVE_DATA_CACHE_TTL",
            "99999999999999",
            "between 0 and 2592000 seconds",
        ),
        (
            "OUTBOX_PUBLISHED_CHUNK_SIZE",
            "100000",
            "between 1 and 32761",
        ),
        ("OUTBOX_PUBLISHED_CHUNK_SIZE", "0", "between 1 and 32761"),
        ("OUTBOX_RELAY_BATCHES_IN_FLIGHT", "0", "between 1 and 64"),
        ("OUTBOX_RELAY_BATCHES_IN_FLIGHT", "65", "between 1 and 64"),
        (
            "OUTBOX_PAUSE_FOR_RETRY",
            "99999999999999",
            "between 0 and 2592000 seconds",
        ),
        (
            "OUTBOX_WAIT_RETRY",
            "2592001",
            "between 0 and 2592000 seconds",
        ),
        (
            "OUTBOX_CONSUMER_RETRY_WAIT",
            "99999999999999",
            "between 0 and 3600 seconds",
        ),
        (
            "OUTBOX_CONSUMER_CALLBACK_TIMEOUT",
            "0",
            "between 0.01 and 86400 seconds",
        ),
        (
            "OUTBOX_CONSUMER_SHUTDOWN_TIMEOUT",
            "1e12",
            "between 0 and 86400 seconds",
        ),
        (
            "OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS",
            "101",
            "between 0 and 100",
        ),
        ("OUTBOX_CONSUMER_GROUP_SIZE", "65", "between 1 and 64"),
        ("OUTBOX_CONSUMER_GROUP_SIZE", "0", "between 1 and 64"),
        (
            "OUTBOX_CONSUMER_GROUP_WAIT",
            "1.5",
            "between 0 and 1 seconds",
        ),
        (
            "OUTBOX_MAXIMUM_BACKOFF",
            "0",
            "between 0.01 and 86400 seconds",
        ),
        (
            "OUTBOX_RECEIPT_TIMEOUT",
            "1e15",
            "between 0.01 and 3600 seconds",
        ),
        (
            "OUTBOX_PRODUCER_WAITING_TIME",
            "0",
            "between 0.01 and 3600 seconds",
        ),
        (
            "OUTBOX_MAXIMUM_RETRY_ATTEMPTS",
            "0",
            "between 1 and 1000000",
        ),
        (
            "OUTBOX_STOMP_MAX_FRAME_SIZE",
            "100",
            "between 4096 and 1073741824",
        ),
        (
            "OUTBOX_STOMP_HEARTBEATS",
            "5000000000,0",
            "between 0 and 3600000 milliseconds",
        ),
        (
            "OUTBOX_DB_STATEMENT_TIMEOUT",
            "0.05",
            "between 0.1 and 3600 seconds",
        ),
        (
            "OUTBOX_DB_STATEMENT_TIMEOUT",
            "3601",
            "between 0.1 and 3600 seconds",
        ),
        (
            "OUTBOX_DB_LOCK_TIMEOUT",
            "0",
            "between 0.1 and 3600 seconds",
        ),
    ] {
        let err = OutboxConfig::from_vars(vars(&[(name, value)]))
            .expect_err(&format!("{name}={value} accepted"))
            .to_string();
        assert!(err.contains(name), "{err}");
        assert!(err.contains(range), "{name}={value}: {err}");
    }
}

#[test]
fn the_bounds_themselves_are_accepted() {
    let c = OutboxConfig::from_vars(vars(&[
        ("OUTBOX_DAYS_TO_KEEP_DATA", "36500"),
        ("OUTBOX_PUBLISHED_CHUNK_SIZE", "32761"),
        ("OUTBOX_RELAY_BATCHES_IN_FLIGHT", "64"),
        ("OUTBOX_STOMP_HEARTBEATS", "3600000,0"),
        ("OUTBOX_CONSUMER_CALLBACK_TIMEOUT", "0.01"),
        ("OUTBOX_CONSUMER_MAX_RETRY_ATTEMPTS", "0"),
        ("OUTBOX_CONSUMER_GROUP_SIZE", "64"),
        ("OUTBOX_CONSUMER_GROUP_WAIT", "0"),
        ("OUTBOX_PAUSE_FOR_RETRY", "0"),
        ("OUTBOX_PRODUCER_LEASE", "86400"),
        ("OUTBOX_RECEIPT_TIMEOUT", "3600"),
    ]))
    .unwrap();
    assert_eq!(c.consumer_callback_timeout, Duration::from_millis(10));
    // The extremes reach no overflow of the dates they are added to.
    let now = chrono::Utc::now();
    let _ = now + chrono::Duration::days(i64::from(c.days_to_keep_data));
    let _ = std::time::Instant::now() + c.receipt_timeout + c.producer_lease;
}

#[test]
fn settings_built_in_code_are_checked_too() {
    let c = OutboxConfig {
        days_to_keep_data: 0,
        ..OutboxConfig::default()
    };
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("OUTBOX_DAYS_TO_KEEP_DATA"), "{err}");
    let c = OutboxConfig {
        consumer_retry_wait: Duration::MAX,
        ..OutboxConfig::default()
    };
    assert!(c.validate().is_err());
    let c = OutboxConfig {
        stomp_heartbeats: (
            Duration::ZERO,
            Duration::from_millis(u64::from(u32::MAX) + 1),
        ),
        ..OutboxConfig::default()
    };
    assert!(c.validate().is_err());
}

#[test]
fn the_default_callback_timeout_lets_every_attempt_end_before_rabbitmq_s_consumer_timeout() {
    let c = OutboxConfig::default();
    let attempts = c.consumer_max_retry_attempts + 1;
    let waits: u32 = (1..=c.consumer_max_retry_attempts).sum();
    let worst = c.consumer_callback_timeout * attempts + c.consumer_retry_wait * waits;
    assert!(worst < Duration::from_secs(30 * 60), "{worst:?}");
}

#[test]
fn a_refused_value_shows_no_credentials() {
    let err = OutboxConfig::from_vars(vars(&[(
        "OUTBOX_DATABASE_URL",
        "postgres://app:hunter2@db/app",
    )]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("OUTBOX_DATABASE_URL"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = OutboxConfig::from_vars(vars(&[("OUTBOX_BROKER_PASSWORD", "hunter2")]))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn the_database_bounds_are_read_and_the_lock_timeout_stays_within_the_statement_timeout() {
    let c = OutboxConfig::default();
    assert_eq!(c.db_statement_timeout, Duration::from_secs(30));
    assert_eq!(c.db_lock_timeout, Duration::from_secs(10));
    let c = OutboxConfig::from_vars(vars(&[
        ("OUTBOX_DB_STATEMENT_TIMEOUT", "2.5"),
        ("OUTBOX_DB_LOCK_TIMEOUT", "0.5"),
    ]))
    .unwrap();
    assert_eq!(c.db_statement_timeout, Duration::from_millis(2500));
    assert_eq!(c.db_lock_timeout, Duration::from_millis(500));
    let err = OutboxConfig::from_vars(vars(&[
        ("OUTBOX_DB_STATEMENT_TIMEOUT", "5"),
        ("OUTBOX_DB_LOCK_TIMEOUT", "6"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("OUTBOX_DB_LOCK_TIMEOUT"), "{err}");
    assert!(err.contains("OUTBOX_DB_STATEMENT_TIMEOUT"), "{err}");
}

#[test]
fn tls_without_hostname_verification_is_refused_unless_a_private_ca_is_trusted() {
    for tls in [
        ("OUTBOX_STOMP_USE_SSL", "true"),
        ("OUTBOX_BROKER_URL", "amqps://app:S3cret-pw@rabbit:5671/"),
    ] {
        let err =
            OutboxConfig::from_vars(vars(&[tls, ("OUTBOX_STOMP_TLS_VERIFY_HOSTNAME", "false")]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("OUTBOX_STOMP_TLS_VERIFY_HOSTNAME"), "{err}");
        assert!(err.contains("OUTBOX_STOMP_CA_CERTS"), "{err}");
        assert!(!err.contains("S3cret-pw"), "{err}");
        // With a private CA, the chain still ties the certificate to that CA: accepted.
        OutboxConfig::from_vars(vars(&[
            tls,
            ("OUTBOX_STOMP_TLS_VERIFY_HOSTNAME", "false"),
            ("OUTBOX_STOMP_CA_CERTS", "/etc/ssl/private-ca.pem"),
        ]))
        .unwrap();
    }
    // Without TLS the setting does nothing, and is not refused.
    OutboxConfig::from_vars(vars(&[("OUTBOX_STOMP_TLS_VERIFY_HOSTNAME", "false")])).unwrap();
}
