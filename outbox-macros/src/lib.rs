//! The `#[publish]` attribute of the [`outbox`](https://docs.rs/outbox) crate, which re-exports it
//! as `outbox::publish`. Use it through `outbox`: the generated code names `::outbox::...`.
//!
//! The expansion goes in stages, one module each: `attr` parses the arguments of every
//! `#[publish]` on the struct, `ast` reads the struct (columns, primary key), `validate`
//! checks them together and reports every mistake at the user's tokens, `expand` writes the
//! code. Errors are collected in `errors` and all reported at once.
//!
//! # Where the attribute goes
//!
//! On the `Model` struct, anywhere among its attributes: above or below
//! `#[derive(DeriveEntityModel)]`, and above or below SeaORM 2's `#[sea_orm::model]`. Below
//! `#[sea_orm::model]`, SeaORM copies the attribute onto the `ModelEx` struct it generates; the
//! attribute leaves `ModelEx` untouched there.

mod ast;
mod attr;
mod errors;
mod expand;
mod validate;

use proc_macro::TokenStream;

/// Publishes a SeaORM entity through the outbox: every save (and, if asked, every delete) of the
/// entity writes one outbox row per `#[publish]` attribute, in the same transaction.
///
/// Put it on the entity's `Model`:
///
/// ```ignore
/// use sea_orm::entity::prelude::*;
///
/// #[outbox::publish(destination = "/topic/orders", version = "v1", fields(total))]
/// #[outbox::publish(destination = "/topic/audit", serializer = audit_body, on(insert, update, delete))]
/// #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
/// #[sea_orm(table_name = "orders")]
/// pub struct Model {
///     #[sea_orm(primary_key)]
///     pub id: i32,
///     pub total: i64,
/// }
///
/// #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
/// pub enum Relation {}
///
/// // No `impl ActiveModelBehavior for ActiveModel {}`: the attribute writes it
/// // (keeping it gives E0119, conflicting implementations).
///
/// fn audit_body(order: &Model) -> serde_json::Value {
///     serde_json::json!({ "order": order.id, "total": order.total })
/// }
/// ```
///
/// (Not compiled here, where `outbox` is not a dependency: the crate documentation of `outbox`
/// has a compiled example, and `outbox/tests/macro_expansion.rs` one for every argument.)
///
/// # Arguments
///
/// - `destination = "/topic/orders"` (required): where the messages are sent.
/// - `version = "v1"`: stored with each row; the row's destination becomes `"/topic/orders.v1"`.
///   The whole destination must fit in 255 characters, the version in 100.
/// - `fields(a, b)`: the body is `{"id": <primary key>, "a": .., "b": ..}`.
/// - `serializer = path::to_fn`: the body is the result of a `fn(&Model) -> T` where
///   `T: serde::Serialize`. Not together with `fields`.
/// - With neither, the body is `{"id": <primary key>, ..}` with every column under its field name
///   (`#[sea_orm(ignore)]` fields, which are no columns, are left out).
///   The `"id"` of a composite primary key is an array: `[a, b]`.
/// - `on(insert, update, delete)`: the events that publish; the default is `on(insert, update)`.
///   A delete publishes `{"id": <primary key>}`, read from the `ActiveModel` being deleted.
/// - `allow_autocommit`: saving the entity outside a transaction is allowed (for the whole
///   entity, if any of its attributes says so). By default such a save is refused.
/// - `manual`: generate only the `outbox::write::Publish` impl, not the `ActiveModelBehavior` impl:
///   write your own hooks and call `outbox::write::hooks::*` from them. All the attributes of a
///   struct must agree on it.
///
/// Several attributes on one struct are several routes: one outbox row each, in attribute order.
///
/// The rows are written by SeaORM's `ActiveModelBehavior` hooks, so they follow what runs those
/// hooks: `ActiveModel::insert`, `update`, `save` and `delete`, not `insert_many`,
/// `update_many`, `delete_many`, `Entity::insert(..).exec` or `delete_by_id`.
///
/// # Errors
///
/// Every mistake is a compile error at the tokens that are wrong: a missing, empty or too long
/// destination, an empty version, an unknown or repeated argument, an unknown, repeated or empty
/// list of fields, `fields` with `serializer`, an unknown event, a struct not named `Model` or
/// without a primary key, a field type that is not `Serialize`, a serializer of the wrong
/// signature.
#[proc_macro_attribute]
pub fn publish(arguments: TokenStream, input: TokenStream) -> TokenStream {
    expand::publish(arguments.into(), input.into()).into()
}
