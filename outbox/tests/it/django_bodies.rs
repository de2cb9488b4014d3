//! The bodies `#[publish]` builds from columns (the default body and `fields(...)`) against the
//! bodies django-outbox-pattern's `@publish` writes for the same values, made by the library's own
//! serializer in the Django project of `interop/` (the virtualenv whose interpreter
//! `OUTBOX_TEST_PYTHON` names; without it these tests fail). Each column type is saved on
//! PostgreSQL, MariaDB and SQLite, and the body read back from the outbox. Bodies are compared as
//! JSON values: key order and spacing differ by design.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use outbox_tests::{Backend, TestDb, on_every_backend};
use sea_orm::ActiveValue::Set;
use sea_orm::prelude::Decimal;
use sea_orm::{ConnectionTrait, EntityTrait};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

mod sample {
    use sea_orm::entity::prelude::*;

    /// One column of each type whose encoding Django's serializer decides, under a key that is
    /// not called `id`.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "samples")]
    #[outbox::publish(destination = "/topic/samples")]
    #[outbox::publish(destination = "/topic/samples_some", fields(created, r#ref, sample_id))]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sample_id: i64,
        pub created: Option<DateTimeUtc>,
        pub shifted: Option<DateTimeWithTimeZone>,
        pub naive: Option<DateTime>,
        pub day: Option<Date>,
        pub at: Option<Time>,
        pub r#ref: Option<Uuid>,
        pub doc: Option<Json>,
        pub note: Option<String>,
        pub count: Option<i32>,
        pub flag: Option<bool>,
        pub ratio: Option<f64>,
        pub price: Option<Decimal>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

async fn create_table(t: &TestDb) {
    let sql = match t.backend {
        Backend::Postgres => {
            "CREATE TABLE samples (sample_id bigint PRIMARY KEY, created timestamptz, \
             shifted timestamptz, naive timestamp, day date, at time, ref uuid, doc jsonb, \
             note varchar(100), count integer, flag boolean, ratio double precision, \
             price numeric(10,2))"
        }
        Backend::MariaDb => {
            "CREATE TABLE samples (sample_id bigint PRIMARY KEY, created timestamp(6) NULL, \
             shifted timestamp(6) NULL, naive datetime(6), day date, at time(6), ref binary(16), \
             doc json, note varchar(100), count integer, flag boolean, ratio double, \
             price decimal(10,2))"
        }
        // `real(10, 2)` as sea-orm-migration creates a decimal column on SQLite (REAL affinity).
        // In a NUMERIC-affinity column (Django's `decimal`), a whole value such as 100.00 is
        // stored as an INTEGER, which SeaORM, reading a decimal through an `f64`, refuses.
        Backend::Sqlite => {
            "CREATE TABLE samples (sample_id bigint PRIMARY KEY, created timestamp_with_timezone_text, \
             shifted timestamp_with_timezone_text, naive datetime_text, day date_text, \
             at time_text, ref uuid_text, doc json_text, note varchar(100), count integer, \
             flag boolean, ratio real, price real(10, 2))"
        }
    };
    t.db.execute_unprepared(sql).await.expect("create samples");
}

fn python() -> PathBuf {
    match std::env::var_os("OUTBOX_TEST_PYTHON") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "OUTBOX_TEST_PYTHON is not set: these tests compare bodies with those of the Python \
             library django-outbox-pattern. Make its virtualenv with `python3 -m venv \
             /tmp/interop && /tmp/interop/bin/pip install -r interop/requirements.txt` and set \
             OUTBOX_TEST_PYTHON=/tmp/interop/bin/python (.ci/run does both)"
        ),
    }
}

/// The body django-outbox-pattern's `@publish([Config(fields=fields)])` writes for a `Sample`
/// holding `values` (`manage.py body` of the `interop/` project).
async fn django_body(values: &Value, fields: Option<&[&str]>) -> Value {
    let request = json!({"values": values, "fields": fields});
    let mut child = tokio::process::Command::new(python())
        .args(["manage.py", "body"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../interop"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run manage.py body");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(request.to_string().as_bytes())
        .await
        .expect("write the request");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("manage.py body ends within 60 s")
        .expect("wait for manage.py body");
    assert!(
        output.status.success(),
        "manage.py body failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("manage.py body prints JSON")
}

/// The bodies our outbox holds for the sample saved with `values`, per destination.
async fn our_bodies(t: &TestDb, sample: sample::ActiveModel) -> (Value, Value) {
    let saved = outbox::insert(&t.db, sample)
        .await
        .expect("save the sample");
    let rows = outbox::Published::find()
        .all(&t.db)
        .await
        .expect("read the outbox");
    let body = |destination: &str| {
        rows.iter()
            .find(|row| row.destination == destination && row.body["id"] == json!(saved.sample_id))
            .unwrap_or_else(|| panic!("a row to {destination} for sample {}", saved.sample_id))
            .body
            .clone()
    };
    (body("/topic/samples"), body("/topic/samples_some"))
}

fn decimal(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

/// Django's body as ours holds it on `backend`. Equal, except for a decimal on SQLite: there
/// the column (NUMERIC affinity) stores the text SeaORM binds as a REAL or INTEGER, and SeaORM
/// reads a `Decimal` back through an `f64`, so the value our body is made from has lost the
/// column's scale ("12.50" comes back as 12.5). Django quantizes to `decimal_places` when it
/// reads. The value is the same number, its trailing zeros dropped.
fn as_read_back(backend: Backend, mut django: Value) -> Value {
    if backend == Backend::Sqlite
        && let Some(text) = django["price"].as_str()
    {
        django["price"] = json!(decimal(text).normalize().to_string());
    }
    django
}

fn at_utc(text: &str) -> DateTime<Utc> {
    text.parse().expect("a date-time")
}

async fn every_column_type(backend: Backend) {
    let t = TestDb::new(backend).await;
    create_table(&t).await;
    let reference = Uuid::parse_str("6313c61e-c9bc-4fed-a281-14869720efa2").unwrap();
    let doc = json!({"a": [1, null, "two"], "nested": {"b": true, "x": 1.5}});
    let naive: NaiveDateTime = NaiveDate::from_ymd_opt(2024, 1, 2)
        .unwrap()
        .and_hms_micro_opt(3, 4, 5, 678_901)
        .unwrap();
    let shifted: DateTime<FixedOffset> = "2024-01-02T05:04:05.678901+02:00".parse().unwrap();

    // Fractions of a second (kept to milliseconds), an offset, every type set.
    let (default, some) = our_bodies(
        &t,
        sample::ActiveModel {
            sample_id: Set(7),
            created: Set(Some(at_utc("2024-01-02T03:04:05.678901Z"))),
            shifted: Set(Some(shifted)),
            naive: Set(Some(naive)),
            day: Set(Some(naive.date())),
            at: Set(Some(naive.time())),
            r#ref: Set(Some(reference)),
            doc: Set(Some(doc.clone())),
            note: Set(Some("wörld: colon\\backslash\nnewline".to_owned())),
            count: Set(Some(-3)),
            flag: Set(Some(true)),
            ratio: Set(Some(1.5)),
            price: Set(Some(decimal("12.50"))),
        },
    )
    .await;
    let values = json!({
        "sample_id": 7,
        "created": "2024-01-02T03:04:05.678901Z",
        "shifted": "2024-01-02T05:04:05.678901+02:00",
        "naive": "2024-01-02T03:04:05.678901",
        "day": "2024-01-02",
        "at": "03:04:05.678901",
        "ref": reference.to_string(),
        "doc": doc,
        "note": "wörld: colon\\backslash\nnewline",
        "count": -3,
        "flag": true,
        "ratio": 1.5,
        "price": "12.50",
    });
    assert_eq!(
        default,
        as_read_back(backend, django_body(&values, None).await),
        "{backend:?}: default body"
    );
    assert_eq!(
        some,
        django_body(&values, Some(&["created", "ref", "sample_id"])).await,
        "{backend:?}: fields(created, ref, sample_id)"
    );
    assert_eq!(default["created"], json!("2024-01-02T03:04:05.678Z"));
    let price = if backend == Backend::Sqlite {
        "12.5"
    } else {
        "12.50"
    };
    assert_eq!(default["price"], json!(price), "a decimal as str(Decimal)");
    assert!(default.get("sample_id").is_none(), "the key only as \"id\"");

    // Whole seconds (no fraction at all, as Python writes them) and every nullable column null.
    let (default, some) = our_bodies(
        &t,
        sample::ActiveModel {
            sample_id: Set(8),
            created: Set(Some(at_utc("2024-01-02T03:04:05Z"))),
            shifted: Set(None),
            naive: Set(Some(naive.date().and_hms_opt(3, 4, 5).unwrap())),
            day: Set(None),
            at: Set(Some(NaiveTime::from_hms_opt(3, 4, 5).unwrap())),
            r#ref: Set(None),
            doc: Set(None),
            note: Set(None),
            count: Set(None),
            flag: Set(None),
            ratio: Set(None),
            price: Set(None),
        },
    )
    .await;
    let values = json!({
        "sample_id": 8,
        "created": "2024-01-02T03:04:05Z",
        "naive": "2024-01-02T03:04:05",
        "at": "03:04:05",
    });
    assert_eq!(
        default,
        django_body(&values, None).await,
        "{backend:?}: default body, whole seconds"
    );
    assert_eq!(
        some,
        django_body(&values, Some(&["created", "ref", "sample_id"])).await,
        "{backend:?}: fields(...), whole seconds"
    );
    assert_eq!(default["price"], Value::Null);

    // Decimals: a sign, a leading zero, every digit of numeric(10,2), trailing zeros kept.
    for (sample_id, text) in [(9, "-0.05"), (10, "12345678.90"), (11, "100.00")] {
        let (default, _) = our_bodies(
            &t,
            sample::ActiveModel {
                sample_id: Set(sample_id),
                price: Set(Some(decimal(text))),
                ..Default::default()
            },
        )
        .await;
        let values = json!({"sample_id": sample_id, "price": text});
        let django = django_body(&values, None).await;
        assert_eq!(django["price"], json!(text), "Django writes str(Decimal)");
        assert_eq!(
            default,
            as_read_back(backend, django),
            "{backend:?}: the decimal {text}"
        );
        if backend != Backend::Sqlite {
            assert_eq!(default["price"], json!(text), "{backend:?}");
        }
    }
    t.drop_database().await;
}

on_every_backend!(every_column_type);
