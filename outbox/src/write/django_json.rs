//! Column values as Django's JSON serializer writes them, for the bodies `#[publish]` builds from
//! columns (the default body and `fields(...)`), so that a Python consumer of django-outbox-pattern
//! and ours read the same body whichever side wrote it.
//!
//! Django's encoder (`DjangoJSONEncoder`) differs from chrono's serde output in its date-times and
//! times: it keeps milliseconds only (and none at all when the microseconds are zero), writes UTC
//! as `Z`, and a date-time stored with a time zone comes back from the database in UTC. Dates,
//! UUIDs (as hyphenated strings), JSON columns, numbers, booleans and `None` (`null`) already agree,
//! and so do decimals (SeaORM's `with-rust_decimal`): `rust_decimal` writes a string keeping the
//! value's scale, `"12.50"`, as Django writes `str(Decimal)` (unless its `serde-float` feature makes
//! them numbers). On SQLite, SeaORM reads a decimal back through an `f64`: the value a body is made
//! from has lost the column's scale (`"12.5"`).
//!
//! chrono's types serialize through `Serializer::collect_str`, and nothing else a column holds does
//! (strings use `serialize_str`), so the one serializer method that re-encodes is `collect_str`:
//! its text is re-encoded when it is a chrono date-time, naive date-time or time, and kept as it is
//! otherwise. Only the column's own value and an `Option` around it are looked at: values nested in
//! a JSON column are JSON already.

use std::fmt::Display;

use chrono::{DateTime, NaiveDateTime, NaiveTime, SecondsFormat, Timelike, Utc};
use serde::Serialize;
use serde::ser;
use serde_json::Value;

/// `value` as JSON, encoded as Django's serializer encodes a column of its type.
pub(crate) fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, serde_json::Error> {
    value.serialize(Column)
}

/// Django's text for the text chrono wrote, or `None` when it is not a date-time or a time.
fn django_text(text: &str) -> Option<String> {
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        let utc = instant.with_timezone(&Utc);
        // Whole seconds without a fraction, as Python's `isoformat` does when microseconds are 0.
        let format = if utc.nanosecond() / 1_000 == 0 {
            SecondsFormat::Secs
        } else {
            SecondsFormat::Millis
        };
        return Some(utc.to_rfc3339_opts(format, true));
    }
    if let Ok(naive) = text.parse::<NaiveDateTime>() {
        let fraction = if naive.nanosecond() / 1_000 == 0 {
            ""
        } else {
            "%.3f"
        };
        return Some(
            naive
                .format(&format!("%Y-%m-%dT%H:%M:%S{fraction}"))
                .to_string(),
        );
    }
    if let Ok(time) = text.parse::<NaiveTime>() {
        let fraction = if time.nanosecond() / 1_000 == 0 {
            ""
        } else {
            "%.3f"
        };
        return Some(time.format(&format!("%H:%M:%S{fraction}")).to_string());
    }
    None
}

/// The serializer of one column value: serde_json's, except for `collect_str` (see the module).
struct Column;

type Json = serde_json::value::Serializer;

impl ser::Serializer for Column {
    type Ok = Value;
    type Error = serde_json::Error;
    type SerializeSeq = <Json as ser::Serializer>::SerializeSeq;
    type SerializeTuple = <Json as ser::Serializer>::SerializeTuple;
    type SerializeTupleStruct = <Json as ser::Serializer>::SerializeTupleStruct;
    type SerializeTupleVariant = <Json as ser::Serializer>::SerializeTupleVariant;
    type SerializeMap = <Json as ser::Serializer>::SerializeMap;
    type SerializeStruct = <Json as ser::Serializer>::SerializeStruct;
    type SerializeStructVariant = <Json as ser::Serializer>::SerializeStructVariant;

    fn collect_str<T: Display + ?Sized>(self, value: &T) -> Result<Value, Self::Error> {
        let text = value.to_string();
        Ok(Value::String(django_text(&text).unwrap_or(text)))
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, Self::Error> {
        value.serialize(Column)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, Self::Error> {
        value.serialize(Column)
    }

    fn serialize_bool(self, v: bool) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_bool(v)
    }
    fn serialize_i8(self, v: i8) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_i8(v)
    }
    fn serialize_i16(self, v: i16) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_i16(v)
    }
    fn serialize_i32(self, v: i32) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_i32(v)
    }
    fn serialize_i64(self, v: i64) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_i64(v)
    }
    fn serialize_i128(self, v: i128) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_i128(v)
    }
    fn serialize_u8(self, v: u8) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_u8(v)
    }
    fn serialize_u16(self, v: u16) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_u16(v)
    }
    fn serialize_u32(self, v: u32) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_u32(v)
    }
    fn serialize_u64(self, v: u64) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_u64(v)
    }
    fn serialize_u128(self, v: u128) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_u128(v)
    }
    fn serialize_f32(self, v: f32) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_f32(v)
    }
    fn serialize_f64(self, v: f64) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_f64(v)
    }
    fn serialize_char(self, v: char) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_char(v)
    }
    fn serialize_str(self, v: &str) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_str(v)
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_bytes(v)
    }
    fn serialize_none(self) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_none()
    }
    fn serialize_unit(self) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_unit()
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_unit_struct(name)
    }
    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_unit_variant(name, index, variant)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, Self::Error> {
        serde_json::value::Serializer.serialize_newtype_variant(name, index, variant, value)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, Self::Error> {
        serde_json::value::Serializer.serialize_seq(len)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, Self::Error> {
        serde_json::value::Serializer.serialize_tuple(len)
    }
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, Self::Error> {
        serde_json::value::Serializer.serialize_tuple_struct(name, len)
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, Self::Error> {
        serde_json::value::Serializer.serialize_tuple_variant(name, index, variant, len)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, Self::Error> {
        serde_json::value::Serializer.serialize_map(len)
    }
    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, Self::Error> {
        serde_json::value::Serializer.serialize_struct(name, len)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, Self::Error> {
        serde_json::value::Serializer.serialize_struct_variant(name, index, variant, len)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{FixedOffset, NaiveDate, TimeZone};
    use serde_json::json;

    use super::*;

    #[test]
    fn date_times_keep_milliseconds_in_utc() {
        let utc = Utc
            .with_ymd_and_hms(2024, 1, 2, 3, 4, 5)
            .unwrap()
            .with_nanosecond(678_901_234)
            .unwrap();
        assert_eq!(to_value(&utc).unwrap(), json!("2024-01-02T03:04:05.678Z"));
        let shifted = utc.with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap());
        assert_eq!(
            to_value(&shifted).unwrap(),
            json!("2024-01-02T03:04:05.678Z")
        );
        let whole = Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(
            to_value(&Some(whole)).unwrap(),
            json!("2024-01-02T03:04:05Z")
        );
        // Microseconds that round to no millisecond still show the fraction, as in Python.
        let tiny = whole.with_nanosecond(123_000).unwrap();
        assert_eq!(to_value(&tiny).unwrap(), json!("2024-01-02T03:04:05.000Z"));
    }

    #[test]
    fn naive_values_keep_no_zone() {
        let naive = NaiveDate::from_ymd_opt(2024, 1, 2)
            .unwrap()
            .and_hms_micro_opt(3, 4, 5, 678_901)
            .unwrap();
        assert_eq!(to_value(&naive).unwrap(), json!("2024-01-02T03:04:05.678"));
        assert_eq!(to_value(&naive.time()).unwrap(), json!("03:04:05.678"));
        assert_eq!(to_value(&naive.date()).unwrap(), json!("2024-01-02"));
        let whole = NaiveTime::from_hms_opt(3, 4, 5).unwrap();
        assert_eq!(to_value(&whole).unwrap(), json!("03:04:05"));
    }

    #[test]
    fn other_values_are_serde_json_values() {
        assert_eq!(
            to_value("2024-01-02T03:04:05.678901Z").unwrap(),
            json!("2024-01-02T03:04:05.678901Z"),
            "a string column is never re-encoded"
        );
        assert_eq!(to_value(&None::<i32>).unwrap(), Value::Null);
        let doc = json!({"a": [1, null], "at": "2024-01-02T03:04:05.678901Z"});
        assert_eq!(to_value(&doc).unwrap(), doc);
        let id = uuid::Uuid::nil();
        assert_eq!(to_value(&id).unwrap(), json!(id.hyphenated().to_string()));
    }
}
