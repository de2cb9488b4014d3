//! The checks: do the arguments make sense together and against the struct? Each mistake becomes
//! an error at the tokens the user wrote; all of them are collected, then [`check`] either returns
//! a [`Publish`] that code generation can trust, or nothing.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{ExprPath, Ident, LitStr};

use crate::ast::{Column, Model};
use crate::attr::{self, Event};
use crate::errors::Errors;

/// The longest destination the outbox table stores (`published.destination` is `varchar(255)`),
/// version suffix included.
const MAX_DESTINATION: usize = 255;
/// The longest version (`published.version`).
const MAX_VERSION: usize = 100;

/// What to generate, checked.
pub struct Publish {
    pub model: Ident,
    /// The key columns: one is `"id": value`, several are `"id": [a, b]`.
    pub primary_key: Vec<Member>,
    pub routes: Vec<Route>,
    pub allow_autocommit: bool,
    /// Generate the `Publish` impl only; the user writes `ActiveModelBehavior`.
    pub manual: bool,
}

pub struct Route {
    pub destination: LitStr,
    pub version: Option<LitStr>,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub body: Body,
    pub key: Option<RouteKey>,
}

/// A route's ordering key, checked.
pub enum RouteKey {
    /// A field of the model (a primary-key field when the route publishes deletes).
    Field(Member),
    /// A function of the model.
    Function(ExprPath),
}

pub enum Body {
    /// `{"id": key, ...}` with these fields after the key.
    Object(Vec<Member>),
    /// Whatever the function returns.
    Serializer(ExprPath),
}

/// A field that goes into a body.
pub struct Member {
    /// The JSON key: the field's name without `r#`.
    pub key: String,
    pub field: Ident,
    /// Where a type error about this field is reported: the user's name for it in `fields(...)`,
    /// else the field's type.
    pub span: Span,
}

/// Checks everything that can be checked: mistakes in an attribute go into that attribute's
/// errors, mistakes of the struct into `errors`.
pub fn check(model: &Model, routes: &mut [attr::Route], errors: &mut Errors) -> Option<Publish> {
    check_model(model, errors);
    let mut checked = Vec::new();
    for route in routes.iter_mut().filter(|route| !route.malformed) {
        let mut route_errors = std::mem::take(&mut route.errors);
        checked.extend(check_route(model, route, &mut route_errors));
        route.errors = route_errors;
    }
    check_manual_agrees(routes);
    let clean = errors.is_empty() && routes.iter().all(|route| route.errors.is_empty());
    if !clean || checked.len() != routes.len() {
        return None;
    }
    Some(Publish {
        model: model.ident.clone(),
        primary_key: model
            .primary_key()
            .into_iter()
            .map(|column| member(column, column.ty.span()))
            .collect(),
        routes: checked,
        allow_autocommit: routes.iter().any(|route| route.allow_autocommit.is_some()),
        manual: routes.first().is_some_and(|route| route.manual.is_some()),
    })
}

fn check_model(model: &Model, errors: &mut Errors) {
    if model.ident != "Model" {
        errors.spanned(
            &model.ident,
            format!(
                "#[publish] goes on the `Model` struct of a SeaORM entity, not on `{}`",
                model.ident
            ),
        );
        // Not an entity's model: whether it has a key is beside the point.
        return;
    }
    if model.primary_key().is_empty() {
        errors.spanned(
            &model.ident,
            format!(
                "`{}` has no primary key: mark its key field with `#[sea_orm(primary_key)]`; \
                 a message's \"id\" is the primary key",
                model.ident
            ),
        );
    }
}

/// One route, or `None` when it has errors (all reported).
fn check_route(model: &Model, route: &attr::Route, errors: &mut Errors) -> Option<Route> {
    let before = errors.len();
    let destination = check_destination(route, errors);
    check_version(route, errors);
    if let Some(destination) = destination {
        check_stored_length(route, destination, errors);
    }
    if let (Some(_), Some(serializer)) = (&route.fields, &route.serializer) {
        errors.spanned(
            serializer,
            "`fields` and `serializer` cannot be used together: with a serializer, the \
             function's result is the whole body",
        );
    }
    let fields = route
        .fields
        .as_ref()
        .map(|fields| check_fields(model, fields, errors));
    if let Some(on) = &route.on
        && on.events.is_empty()
    {
        errors.spanned(
            &on.keyword,
            "`on()` is empty: list the events to publish on, from `insert`, `update` and \
             `delete`, or leave `on` out to publish on insert and update",
        );
    }
    let has = |event: Event| match &route.on {
        Some(on) => on.events.iter().any(|(written, _)| *written == event),
        None => event != Event::Delete,
    };
    let key = route
        .key
        .as_ref()
        .and_then(|key| check_key(model, key, has(Event::Delete), errors));
    if errors.len() != before {
        return None;
    }

    let body = match (&route.serializer, fields) {
        (Some(serializer), _) => Body::Serializer(serializer.path.clone()),
        (None, Some(fields)) => Body::Object(fields),
        (None, None) => Body::Object(every_column(model)),
    };
    Some(Route {
        destination: destination?.clone(),
        version: route.version.clone(),
        insert: has(Event::Insert),
        update: has(Event::Update),
        delete: has(Event::Delete),
        body,
        key,
    })
}

/// The key must be a column (a primary-key column for a route that publishes deletes: a delete
/// sees only the key its caller set) or a function (not with deletes: there is no model to call
/// it with). Whether the field's type or the function's result prints is the compiler's to say,
/// at the user's tokens.
fn check_key(
    model: &Model,
    key: &attr::KeyValue,
    publishes_deletes: bool,
    errors: &mut Errors,
) -> Option<RouteKey> {
    match key {
        attr::KeyValue::Field(name) => {
            let Some(column) = model.column(name) else {
                errors.spanned(
                    name,
                    format!(
                        "{}; a key function is written as a path: `key = self::{name}`",
                        unknown_field(model, name)
                    ),
                );
                return None;
            };
            if publishes_deletes && !column.primary_key {
                errors.spanned(
                    name,
                    format!(
                        "this route publishes deletes, and a delete sees only the primary key \
                         its caller set: the key must be a primary-key field, and `{name}` is not"
                    ),
                );
                return None;
            }
            Some(RouteKey::Field(member(column, name.span())))
        }
        attr::KeyValue::Function(path) => {
            if publishes_deletes {
                errors.spanned(
                    path,
                    "this route publishes deletes, and a delete has no model to call a key \
                     function with: the key must be a primary-key field",
                );
                return None;
            }
            Some(RouteKey::Function(path.clone()))
        }
    }
}

fn check_destination<'a>(route: &'a attr::Route, errors: &mut Errors) -> Option<&'a LitStr> {
    match &route.destination {
        Some(destination) if destination.value().is_empty() => {
            errors.spanned(
                destination,
                "`destination` is empty: name where the messages go, like \"/topic/orders\"",
            );
            None
        }
        Some(destination) => Some(destination),
        None => {
            // A `destination` with a value of the wrong kind was reported where it was written.
            if !route.has_key("destination") {
                errors.spanned(
                    &route.at,
                    "missing `destination = \"...\"`: where this route's messages are sent, \
                     like `#[publish(destination = \"/topic/orders\")]`",
                );
            }
            None
        }
    }
}

fn check_version(route: &attr::Route, errors: &mut Errors) {
    let Some(version) = &route.version else {
        return;
    };
    let length = version.value().chars().count();
    if length == 0 {
        errors.spanned(
            version,
            "`version` is empty: leave it out, or give one like \"v1\"",
        );
    } else if length > MAX_VERSION {
        errors.spanned(
            version,
            format!(
                "`version` is {length} characters long; the outbox stores at most {MAX_VERSION}"
            ),
        );
    }
}

/// The stored destination is `"<destination>.<version>"`: it must fit the outbox's column.
fn check_stored_length(route: &attr::Route, destination: &LitStr, errors: &mut Errors) {
    let mut stored = destination.value();
    if let Some(version) = &route.version {
        stored = format!("{stored}.{}", version.value());
    }
    let length = stored.chars().count();
    if length > MAX_DESTINATION {
        errors.spanned(
            destination,
            format!(
                "the destination is {length} characters long, version suffix included; the \
                 outbox stores at most {MAX_DESTINATION}"
            ),
        );
    }
}

fn check_fields(model: &Model, fields: &attr::FieldList, errors: &mut Errors) -> Vec<Member> {
    if fields.names.is_empty() {
        errors.spanned(
            &fields.keyword,
            "`fields()` is empty: list the fields to publish besides the primary key, or leave \
             `fields` out to publish every column",
        );
    }
    let single_key = match model.primary_key().as_slice() {
        [key] => Some(key.ident.clone()),
        _ => None,
    };
    let mut members = Vec::new();
    for (index, name) in fields.names.iter().enumerate() {
        if fields.names[..index].contains(name) {
            errors.spanned(name, format!("field `{name}` is listed twice"));
            continue;
        }
        let Some(column) = model.column(name) else {
            errors.spanned(name, unknown_field(model, name));
            continue;
        };
        if single_key.as_ref() == Some(name) {
            // The key is already the body's "id"; Django's body never repeats it under its own
            // name either.
            continue;
        }
        if name.unraw() == "id" {
            errors.spanned(
                name,
                "field `id` is not the primary key, but a message's \"id\" is always the \
                 primary key: publish this field through a `serializer`",
            );
            continue;
        }
        members.push(member(column, name.span()));
    }
    members
}

fn unknown_field(model: &Model, name: &Ident) -> String {
    let columns: Vec<String> = model
        .columns
        .iter()
        .map(|column| format!("`{}`", column.ident))
        .collect();
    let columns = columns.join(", ");
    if model.relations.contains(name) {
        format!(
            "`{name}` is a relation, not a column of `{}`; its columns are {columns}",
            model.ident
        )
    } else {
        format!(
            "no field `{name}` in `{}`; its fields are {columns}",
            model.ident
        )
    }
}

/// The body without `fields` or `serializer`: every column after the key, except an `id` field
/// (the body's "id" is the key), a single-column key of another name (already the body's "id", as
/// in Django's body, which never holds both) and `#[sea_orm(ignore)]` fields, which are no columns.
fn every_column(model: &Model) -> Vec<Member> {
    let single_key = match model.primary_key().as_slice() {
        [key] => Some(key.ident.clone()),
        _ => None,
    };
    model
        .columns
        .iter()
        .filter(|column| {
            !column.ignored
                && column.ident.unraw() != "id"
                && single_key.as_ref() != Some(&column.ident)
        })
        .map(|column| member(column, column.ty.span()))
        .collect()
}

fn member(column: &Column, at: Span) -> Member {
    Member {
        key: column.ident.unraw().to_string(),
        field: column.ident.clone(),
        // Resolves names as the macro's own tokens do, but reports errors at the user's.
        span: Span::call_site().located_at(at),
    }
}

/// `manual` decides whether `ActiveModelBehavior` is generated, once per struct: every attribute
/// must say the same.
fn check_manual_agrees(routes: &mut [attr::Route]) {
    let Some((first, rest)) = routes.split_first_mut() else {
        return;
    };
    let manual = first.manual.is_some();
    for route in rest {
        match (&route.manual, manual) {
            (Some(flag), false) => route.errors.spanned(
                flag,
                "this #[publish] is `manual` but the first one is not: the attributes of a \
                 struct must all be `manual` or none",
            ),
            (None, true) => route.errors.spanned(
                &route.at,
                "the first #[publish] is `manual` but this one is not: the attributes of a \
                 struct must all be `manual` or none",
            ),
            _ => {}
        }
    }
}
