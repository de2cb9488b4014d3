//! Support for the code that `#[publish]` generates. Not a public API: its items may change in
//! any release. The traits here exist so that a type error in generated code is reported with a
//! message of this crate, at the user's tokens, instead of a trait-bound cascade.

pub use sea_orm;
pub use sea_orm::entity::prelude::async_trait;
pub use serde_json;

use sea_orm::ActiveValue;
use serde::Serialize;
use serde_json::{Map, Value};

/// A value that can go into a message body.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be published: it does not implement `serde::Serialize`",
    label = "this field's type is not `serde::Serialize`",
    note = "implement or derive `serde::Serialize` for the field's type, or leave the field out of `fields(...)`"
)]
pub trait PublishField {
    /// The value as JSON, as Django's serializer encodes a column of its type (see
    /// `django_json`): date-times and times to milliseconds, UTC as `Z`.
    fn to_json(&self) -> Result<Value, serde_json::Error>;
}

impl<T: Serialize + ?Sized> PublishField for T {
    fn to_json(&self) -> Result<Value, serde_json::Error> {
        super::django_json::to_value(self)
    }
}

/// A value a message's ordering key is made of.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a message key: it does not implement `ToString` (`std::fmt::Display`)",
    label = "this key's type does not print",
    note = "a key is a field whose type implements `Display` (numbers, strings, UUIDs), or a function `fn(&Model) -> impl ToString`"
)]
pub trait PublishKey {
    /// The key as text.
    fn to_key(&self) -> String;
}

impl<T: ToString + ?Sized> PublishKey for T {
    fn to_key(&self) -> String {
        self.to_string()
    }
}

/// The key a key function returned (called by the generated code, so that a wrong signature is
/// reported at the function's path).
pub fn key_of<T: PublishKey>(key: T) -> String {
    key.to_key()
}

/// The key of a deleted row, from a primary-key column of its active model; `None` when the
/// column is not set (the delete is then refused as one without its primary key).
pub fn active_key_string<T>(value: &ActiveValue<T>) -> Option<String>
where
    T: Into<sea_orm::Value> + PublishKey,
{
    match value {
        ActiveValue::Set(v) | ActiveValue::Unchanged(v) => Some(v.to_key()),
        ActiveValue::NotSet => None,
    }
}

/// What a `serializer` returns: any `serde::Serialize` value.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a message body: it does not implement `serde::Serialize`",
    label = "this serializer's result is not `serde::Serialize`",
    note = "a serializer is a function `fn(&Model) -> T` where `T: serde::Serialize`"
)]
pub trait PublishBody {
    /// The body as JSON.
    fn to_body(&self) -> Result<Value, serde_json::Error>;
}

impl<T: Serialize> PublishBody for T {
    fn to_body(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }
}

/// Encodes what a serializer returned (the serializer is called by the generated code, so that
/// a wrong signature is reported at the serializer's path).
pub fn serializer_body<T: PublishBody>(body: T) -> Result<Value, serde_json::Error> {
    body.to_body()
}

/// Builds a JSON object body field by field.
#[derive(Debug, Default)]
pub struct ObjectBuilder(Map<String, Value>);

impl ObjectBuilder {
    /// An empty object.
    pub fn new() -> Self {
        Self(Map::new())
    }

    /// Adds `name: value`; a later field of the same name replaces an earlier one.
    pub fn field<T: PublishField + ?Sized>(
        mut self,
        name: &str,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        self.0.insert(name.to_owned(), value.to_json()?);
        Ok(self)
    }

    /// The object.
    pub fn finish(self) -> Value {
        Value::Object(self.0)
    }
}

/// The JSON value of one primary-key column of an active model, `None` when it is not set.
pub fn active_value<T>(value: &ActiveValue<T>) -> Result<Option<Value>, serde_json::Error>
where
    T: Into<sea_orm::Value> + PublishField,
{
    match value {
        ActiveValue::Set(v) | ActiveValue::Unchanged(v) => v.to_json().map(Some),
        ActiveValue::NotSet => Ok(None),
    }
}

/// A primary key from its columns: the value of a single column, an array for a composite key,
/// `None` when any column is not set.
pub fn active_key(columns: Vec<Option<Value>>) -> Option<Value> {
    let mut values: Vec<Value> = columns.into_iter().collect::<Option<_>>()?;
    if values.len() == 1 {
        values.pop()
    } else {
        Some(Value::Array(values))
    }
}
